"""Start and stop a real OPA server for the tests and the local stack.

``opa run --server --watch rego/`` on 127.0.0.1 and a free port: OPA reloads
the policies and data files when they change, which is how a policy edit
reaches the gateway without restarting anything (policyd notices the new
revision, taps drop their cached decisions).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REGO = ROOT / "rego"


class OpaNotFound(RuntimeError):
    pass


def find_opa() -> str:
    """The opa binary: $PGWARDEN_OPA_BIN, the repo's .cache/bin/opa, or PATH."""
    env = os.environ.get("PGWARDEN_OPA_BIN")
    if env:
        return env
    local = ROOT / ".cache" / "bin" / "opa"
    if local.exists():
        return str(local)
    found = shutil.which("opa")
    if found:
        return found
    raise OpaNotFound(
        "opa binary not found: run `GOBIN=$PWD/.cache/bin go install "
        "github.com/open-policy-agent/opa@v1.22.3` or set PGWARDEN_OPA_BIN")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class OpaProcess:
    """One OPA server process; use as a context manager or start()/stop()."""

    paths: list[Path] = field(default_factory=lambda: [DEFAULT_REGO])
    port: int = 0
    binary: str = ""
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> OpaProcess:
        if not self.port:
            self.port = free_port()
        binary = self.binary or find_opa()
        cmd = [
            binary, "run", "--server", "--addr", f"127.0.0.1:{self.port}",
            "--watch", "--skip-version-check", "--log-level", "error",
            *[str(p) for p in self.paths],
        ]
        if self.log_path:
            with open(self.log_path, "ab") as out:  # the child keeps its own copy
                self._proc = subprocess.Popen(cmd, stdout=out, stderr=out)
        else:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"opa exited with {self._proc.returncode} "
                                   f"(is the port {self.port} taken? do the policies compile?)")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:  # noqa: S310
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"opa not healthy on {self.url} after {timeout}s")

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> OpaProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
