"""pgwarden doctor and version without a deployment: what an operator sees
when nothing answers, how targets come from the configuration, and that no
secret reaches the report. The end-to-end run is tests/integration/test_doctor.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pgwarden import doctor
from pgwarden.cli import app
from pgwarden.version import collect, protocol_versions

ROOT = Path(__file__).resolve().parent.parent.parent


def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_redact_url_hides_only_the_password() -> None:
    url = "postgresql://audit:s3cret-value@db:5432/audit?sslmode=verify-full"
    shown = doctor.redact_url(url)
    assert "s3cret-value" not in shown
    assert shown == "postgresql://audit:***@db:5432/audit?sslmode=verify-full"
    assert doctor.redact_url("sqlite:///x.db") == "sqlite:///x.db"


def test_targets_come_from_the_config_and_options_win() -> None:
    targets = doctor.targets_from(
        ROOT / "examples" / "pgwarden.yaml", envoy_admin=None, taps=["inline=10.0.0.1:6543"],
        tap_mode="extproc", policyd=None, opa_url=None, maskd="maskd:50062", audit_url=None,
        upstream=None, upstream_role=None, upstream_dbname="shop", expect_revision=None,
        timeout=1.0)
    assert targets.taps == (("inline", "10.0.0.1:6543"),)
    assert targets.policyd == "policyd:50061"
    assert targets.upstream == "postgres:5432"
    assert targets.audit_url is not None and targets.audit_url.startswith("postgresql://")
    assert targets.maskd == "maskd:50062"
    assert targets.tap_health == "0.0.0.0:9090"
    # The catalog role is the one doctor logs in as, with the configured TLS.
    assert targets.upstream_login is not None
    assert targets.upstream_login.role == "pgwarden_catalog"
    assert targets.upstream_login.sslmode == "verify-full"


def test_bad_tap_option_is_refused() -> None:
    with pytest.raises(ValueError, match="MODE=HOST:PORT"):
        doctor.targets_from(None, envoy_admin=None, taps=["10.0.0.1:6543"], tap_mode="extproc",
                            policyd=None, opa_url=None, maskd=None, audit_url=None,
                            upstream=None, upstream_role=None, upstream_dbname="postgres",
                            expect_revision=None, timeout=1.0)


def test_nothing_running_every_component_is_named(tmp_path: Path) -> None:
    port = closed_port()
    targets = doctor.Targets(
        envoy_admin=f"http://127.0.0.1:{port}", taps=(("extproc", f"127.0.0.1:{port}"),
                                                       ("inline", f"127.0.0.1:{port}")),
        policyd=f"127.0.0.1:{port}", opa_url=f"http://127.0.0.1:{port}",
        maskd=f"127.0.0.1:{port}", audit_url=f"sqlite:///{tmp_path}/missing.db",
        upstream=f"127.0.0.1:{port}", timeout=1.0)
    results = doctor.run_checks(targets)
    assert [r.name for r in results] == ["envoy", "tap extproc", "tap inline", "policyd", "opa",
                                         "maskd", "audit", "upstream"]
    assert all(r.status == "FAIL" and r.hint for r in results), results
    assert not (tmp_path / "missing.db").exists()  # the doctor creates nothing
    report = doctor.render(results)
    assert report.splitlines()[-1].startswith("8 problems: envoy, tap extproc")
    assert "connection refused" in report


def test_unknown_components_are_skipped_not_failed() -> None:
    results = doctor.run_checks(doctor.Targets(timeout=1.0))
    assert {r.status for r in results} == {"SKIP"}
    assert doctor.render(results).splitlines()[-1] == "0 problems"


def test_sqlite_audit_store_ok_and_missing_tables(tmp_path: Path) -> None:
    import sqlite3

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    result = doctor.check_audit(f"sqlite:///{empty}", 1.0)
    assert result.status == "FAIL" and "audit init" in result.hint

    from policyd.audit.store import upgrade

    store = tmp_path / "audit.db"
    upgrade(f"sqlite:///{store}")
    result = doctor.check_audit(f"sqlite:///{store}", 1.0)
    assert result.status == "OK", result


def test_doctor_command_exit_code_and_bad_config(tmp_path: Path) -> None:
    port = closed_port()
    runner = CliRunner()
    result = runner.invoke(app, ["doctor", "--envoy-admin", "none", "--tap",
                                 f"inline=127.0.0.1:{port}", "--policyd", f"127.0.0.1:{port}",
                                 "--opa-url", f"http://127.0.0.1:{port}", "--audit-url",
                                 f"sqlite:///{tmp_path}/none.db", "--upstream",
                                 f"127.0.0.1:{port}", "--timeout", "1"])
    assert result.exit_code == 1
    assert "FAIL  tap inline" in result.stdout
    assert "SKIP  envoy" in result.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text("tap:\n  lisen: x\n")
    result = runner.invoke(app, ["doctor", "--config", str(broken)])
    assert result.exit_code == 2
    assert "config check" in result.stderr


def test_version_reports_protocols_and_tools() -> None:
    assert protocol_versions() == ("3.0", "3.2")
    found = collect()
    assert found.pgwarden and found.python.startswith("3.11")
    assert found.postgresql is None
    # Found on this machine (make setup installs both); "not found (...)" elsewhere.
    assert found.envoy.split()[0].count(".") == 2 or found.envoy.startswith("not found")
    assert found.opa[0].isdigit() or found.opa.startswith("not found")


def test_version_command_json() -> None:
    import json

    result = CliRunner().invoke(app, ["version", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert set(data) == {"pgwarden", "python", "envoy", "opa", "postgresql", "protocols"}
    assert data["protocols"] == ["3.0", "3.2"]
