"""The committed gRPC code in pgwarden/_proto is what `make proto` generates
from proto/*.proto today: a contract edited without regenerating fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    _generator().generate(tmp_path)
    committed = ROOT / "pgwarden" / "_proto"
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    kept = {p.name: p.read_text() for p in committed.iterdir()
            if p.is_file() and p.suffix in (".py", ".pyi")}
    assert fresh.keys() == kept.keys(), "run `make proto`: generated files differ in name"
    stale = sorted(name for name in fresh if fresh[name] != kept[name])
    assert not stale, f"run `make proto`: {stale} differ from proto/*.proto"
