"""The development issuer and `pgwarden token`: keys on disk with the right
modes, tokens the validator accepts, rotation with a grace period."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pgwarden.cli import app
from pgwarden.devissuer import DEV_ISSUER, DevIssuerError, ensure_dev_keys
from policyd.identity import TokenValidator


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_private_key_and_jwks(tmp_path: Path) -> None:
    d = tmp_path / ".run" / "identity"
    iss = ensure_dev_keys(d)
    key_file = d / "keys" / f"{iss.current_kid}.pem"
    assert mode(key_file) == 0o600
    assert mode(d) == 0o700
    jwks = json.loads(iss.jwks_path.read_text())
    (jwk,) = jwks["keys"]
    assert jwk["kid"] == iss.current_kid
    assert jwk["kty"] == "OKP" and jwk["alg"] == "EdDSA" and jwk["use"] == "sig"
    assert "d" not in jwk  # public half only
    assert iss.issuer == DEV_ISSUER


def test_idempotent(tmp_path: Path) -> None:
    first = ensure_dev_keys(tmp_path / "id")
    second = ensure_dev_keys(tmp_path / "id", algorithm="ES256")  # existing dir wins
    assert second.current_kid == first.current_kid
    assert second.algorithm == "EdDSA"


def test_es256_keys(tmp_path: Path) -> None:
    iss = ensure_dev_keys(tmp_path / "id", algorithm="ES256")
    (jwk,) = iss.public_jwks()["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-256", "ES256")


def test_rotate_keeps_old_key_published(tmp_path: Path) -> None:
    iss = ensure_dev_keys(tmp_path / "id")
    old = iss.current_kid
    new = iss.rotate(grace_seconds=3600)
    kids = [k["kid"] for k in json.loads(iss.jwks_path.read_text())["keys"]]
    assert kids == [old, new]
    reloaded = ensure_dev_keys(tmp_path / "id")
    assert reloaded.current_kid == new
    assert TokenValidator(reloaded.identity_settings()).validate(reloaded.mint("a")).subject == "a"


def test_mint_claims(tmp_path: Path) -> None:
    iss = ensure_dev_keys(tmp_path / "id")
    v = TokenValidator(iss.identity_settings())
    result = v.validate_detailed(iss.mint("ci-bot", ["a", "b"], ttl=60, act="alice"))
    claims = result.claims
    assert claims["exp"] - claims["iat"] == 60
    assert claims["act"] == {"sub": "alice"}
    assert claims["aud"] == "pgwarden"
    assert result.identity.groups == ("a", "b")
    with pytest.raises(ValueError):
        iss.mint("")
    with pytest.raises(ValueError):
        iss.mint("a", ttl=0)
    with pytest.raises(ValueError):
        iss.mint("a", kind="robot")


def test_broken_directory_says_how_to_fix(tmp_path: Path) -> None:
    iss = ensure_dev_keys(tmp_path / "id")
    (tmp_path / "id" / "keys" / f"{iss.current_kid}.pem").unlink()
    with pytest.raises(DevIssuerError, match="start afresh"):
        ensure_dev_keys(tmp_path / "id")


def test_cli_mint_prints_only_the_token(tmp_path: Path) -> None:
    keys = tmp_path / "id"
    result = CliRunner().invoke(
        app,
        ["token", "mint", "--sub", "ci-bot", "--groups", "analysts, fraud", "--ttl", "120",
         "--act", "alice", "--kind", "human", "--keys", str(keys)],
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("\n") == 1 and out.count(".") == 2
    identity = TokenValidator(ensure_dev_keys(keys).identity_settings()).validate(out.strip())
    assert identity.subject == "ci-bot"
    assert identity.groups == ("analysts", "fraud")
    assert (identity.kind, identity.actor) == ("human", "alice")


def test_cli_keys_dir_from_environment(tmp_path: Path) -> None:
    keys = tmp_path / "envkeys"
    runner = CliRunner()
    result = runner.invoke(
        app, ["token", "mint", "--sub", "x"], env={"PGWARDEN_DEV_KEYS": str(keys)}
    )
    assert result.exit_code == 0, result.output
    assert (keys / "jwks.json").exists()


def test_cli_init_and_rotate_write_nothing_on_stdout(tmp_path: Path) -> None:
    keys = tmp_path / "id"
    runner = CliRunner()
    init = runner.invoke(app, ["token", "init", "--keys", str(keys)])
    assert init.exit_code == 0 and init.stdout == ""
    assert "jwks" in init.stderr
    before = ensure_dev_keys(keys).current_kid
    rotated = runner.invoke(app, ["token", "rotate", "--keys", str(keys), "--grace", "10"])
    assert rotated.exit_code == 0 and rotated.stdout == ""
    assert ensure_dev_keys(keys).current_kid != before


def test_cli_rejects_bad_kind(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["token", "mint", "--sub", "x", "--kind", "robot", "--keys", str(tmp_path)]
    )
    assert result.exit_code != 0
    assert result.stdout == ""


def test_cli_verify_reads_stdin(tmp_path: Path) -> None:
    keys = tmp_path / "id"
    iss = ensure_dev_keys(keys)
    runner = CliRunner()
    ok = runner.invoke(
        app, ["token", "verify", "--keys", str(keys)], input=iss.mint("ci-bot", ["g"]) + "\n"
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["groups"] == ["g"]
    token = iss.mint("ci-bot", audience="other")
    bad = runner.invoke(app, ["token", "verify", "--keys", str(keys)], input=token + "\n")
    assert bad.exit_code == 1
    assert "wrong_audience" in bad.stderr
    assert token not in bad.stderr and bad.stdout == ""


def test_rotation_by_another_process_is_not_undone(tmp_path: Path) -> None:
    a = ensure_dev_keys(tmp_path / "id")
    b = ensure_dev_keys(tmp_path / "id")  # a second process, same directory
    first = a.rotate()
    second = b.rotate()  # b's view was stale; it must build on a's rotation
    kids = [k["kid"] for k in json.loads(a.jwks_path.read_text())["keys"]]
    assert first in kids and second in kids and len(kids) == 3
