"""`pgwarden maskd serve` refuses to start without a usable key."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from maskd.server import KEY_ENV, load_key
from pgwarden.cli import app


def test_serve_without_key_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    result = CliRunner().invoke(app, ["maskd", "serve", "--listen", "127.0.0.1:0"])
    assert result.exit_code != 0
    assert "masking key" in result.output


def test_load_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hex").write_text("00112233445566778899aabbccddeeff\n")
    assert load_key(tmp_path / "hex") == bytes.fromhex("00112233445566778899aabbccddeeff")
    (tmp_path / "raw").write_bytes(b"r" * 32)
    assert load_key(tmp_path / "raw") == b"r" * 32
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(ValueError, match="16 bytes"):
        load_key(tmp_path / "short")
    monkeypatch.setenv(KEY_ENV, "ab" * 16)
    assert load_key() == b"\xab" * 16
