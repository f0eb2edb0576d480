"""Regenerate pgwarden/_proto from proto/*.proto (one command: `make proto`).

The output is committed; tests/unit/test_proto_fresh.py regenerates into a
temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(p.name for p in (ROOT / "proto").glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes absolute imports between generated modules; make them
    # package-relative so the modules live inside pgwarden._proto.
    for path in out.glob("*_pb2*.py"):
        text = path.read_text()
        text = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        path.write_text(text)
    (out / "__init__.py").write_text('"""Generated gRPC code: run `make proto`, never edit."""\n')


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "pgwarden" / "_proto")
