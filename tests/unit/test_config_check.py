"""`pgwarden config check`: the shipped examples pass; a broken file names
every problem, with its place in the file and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pgwarden.cli import app
from pgwarden.config_cli import check

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

BROKEN = """\
tap:
  listen: 127.0.0.1:6543
  upstream: db-without-port
  auth_mode: token
  lisen: 127.0.0.1:7000
  upstream_tls:
    sslmode: verify-everything
policyd:
  listen: 127.0.0.1:50061
"""


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"pgwarden.yaml", "pgwarden-dev.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_pass(path: Path) -> None:
    code, out, err = run("config", "check", str(path), "--ignore-env")
    assert code == 0, err
    assert "OK" in out
    assert len(out.strip().splitlines()) == 1  # one-line summary


def test_production_example_has_no_inline_secret_and_no_warning() -> None:
    report = check(ROOT / "examples" / "pgwarden.yaml", {})
    assert report.ok
    assert report.warnings == []
    config_text = (ROOT / "examples" / "pgwarden.yaml").read_text()
    assert "password:" not in config_text
    assert "tls.cert_file" not in report.summary


def test_broken_file_names_each_problem(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    code, out, err = run("config", "check", str(path), "--ignore-env")
    assert code == 1
    assert out == ""
    problems = [line for line in err.splitlines() if line.startswith("error: ")]
    by_topic = {
        "unknown key": [p for p in problems if "tap.lisen" in p],
        "bad HOST:PORT": [p for p in problems if "tap.upstream" in p and "HOST:PORT" in p],
        "bad enum": [p for p in problems if "tap.upstream_tls.sslmode" in p],
    }
    for topic, found in by_topic.items():
        assert len(found) == 1, f"{topic} not reported exactly once in:\n{err}"
    assert "unknown setting" in by_topic["unknown key"][0]
    assert "verify-full" in by_topic["bad enum"][0]  # the allowed values are listed
    # Located in the file: the unknown key is on line 5, the enum on line 7.
    assert f"{path}:5:" in by_topic["unknown key"][0]
    assert f"{path}:7:" in by_topic["bad enum"][0]
    assert f"{path}:3:" in by_topic["bad HOST:PORT"][0]
    assert "3 problems" in err


def test_token_auth_without_tls_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text("tap:\n  auth_mode: token\n  upstream: db:5432\n")
    code, _, err = run("config", "check", str(path), "--ignore-env")
    assert code == 1
    assert "tls.cert_file" in err
    assert "allow_plaintext_tokens" in err  # the hint names the way out


def test_environment_override_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text((ROOT / "examples" / "pgwarden.yaml").read_text())
    code, _, err = run("config", "check", str(path),
                       env={"PGWARDEN__TAP__UPSTREAM": "no-port-here"})
    assert code == 1
    assert "tap.upstream" in err


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    code, _, err = run("config", "check", str(tmp_path / "missing.yaml"), "--ignore-env")
    assert code == 1 and "cannot read" in err
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    code, _, err = run("config", "check", str(path), "--ignore-env")
    assert code == 1 and "mapping" in err


def test_nothing_secret_is_echoed(tmp_path: Path) -> None:
    path = tmp_path / "inline.yaml"
    text = (ROOT / "examples" / "pgwarden.yaml").read_text().replace(
        "postgresql://pgwarden_audit@", "postgresql://pgwarden_audit:hunter2-not-a-real-one@")
    path.write_text(text)
    code, out, err = run("config", "check", str(path), "--ignore-env")
    assert code == 0
    assert "hunter2" not in out + err
    assert "password inline" in err


def test_unsafe_but_valid_settings_are_warned(tmp_path: Path) -> None:
    path = tmp_path / "dev.yaml"
    path.write_text(
        "tap:\n  auth_mode: passthrough\n  upstream_tls: {sslmode: disable}\n"
        "  audit: {on_spool_failure: allow}\n")
    report = check(path, {})
    assert report.ok
    text = "\n".join(report.warnings)
    for setting in ("tap.auth_mode", "tap.upstream_tls.sslmode", "tap.audit.on_spool_failure"):
        assert setting in text


def test_policyd_serve_takes_its_section_of_the_config_and_options_win(tmp_path: Path) -> None:
    """`policyd serve --config` uses the file's `policyd` section (a key the
    file documents must not be ignored); a command-line option wins."""
    from pgwarden.config import load
    from policyd.cli import serve_settings

    path = tmp_path / "pgwarden.yaml"
    path.write_text("policyd:\n  listen: 127.0.0.1:50999\n  opa_url: http://opa.internal:8181\n"
                    "  opa_deadline_seconds: 1.5\n")
    cfg = load(path, environ={})
    assert serve_settings(None, None, None, cfg) == ("127.0.0.1:50999", "http://opa.internal:8181",
                                                     1.5)
    assert serve_settings("0.0.0.0:50061", None, 0.25, cfg) == (
        "0.0.0.0:50061", "http://opa.internal:8181", 0.25)
    assert serve_settings(None, None, None, None) == ("127.0.0.1:50061", "http://127.0.0.1:8181",
                                                      0.5)
    env = load(path, environ={"PGWARDEN__POLICYD__OPA_DEADLINE_SECONDS": "3"})
    assert serve_settings(None, None, None, env)[2] == 3.0
