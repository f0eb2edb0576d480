"""`pgwarden doctor` against a real deployment on this machine: PostgreSQL,
both taps and Envoy as `pgwarden up` starts them (pgwarden.stack), a real
OPA on rego/, policyd, maskd and a PostgreSQL audit store.

The doctor runs as the operator runs it (the `pgwarden` executable in a
subprocess). Killing a component must be named in the report; starting it
again must turn the report green without touching the rest. Waiting for a
component to come back is a bounded retry of the doctor, never a timing
assertion.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml

from pgwarden.stack import (
    LocalStack,
    Proc,
    free_port,
    spawn,
    start_stack,
    stop,
    stop_stack,
    wait_for_port,
)
from policyd.audit.store import upgrade
from policyd.opa_process import OpaProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent
PGWARDEN = str(Path(sys.executable).parent / "pgwarden")


@dataclass
class Deployment:
    stack: LocalStack
    opa: OpaProcess
    policyd: Proc
    maskd: Proc
    config: Path
    args: list[str]

    def restart_opa(self) -> None:
        self.opa = OpaProcess(paths=[ROOT / "rego"], port=self.opa.port,
                              log_path=self.stack.workdir / "opa.log").start()


def doctor(dep: Deployment) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PGWARDEN, "doctor", *dep.args], capture_output=True, text=True,
                          timeout=180, check=False)


def doctor_until(dep: Deployment, rc: int, tries: int = 20) -> subprocess.CompletedProcess[str]:
    """The doctor's report once it exits with ``rc`` (components notice a
    restart on their own poll); the last report otherwise."""
    result = doctor(dep)
    for _ in range(tries - 1):
        if result.returncode == rc:
            break
        result = doctor(dep)
    return result


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Check name -> status from the report."""
    out: dict[str, str] = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ("OK", "FAIL", "SKIP"):
            name = " ".join(parts[1:3]) if parts[1] == "tap" else parts[1]
            out[name] = parts[0]
    return out


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    workdir = tmp_path_factory.mktemp("doctor")
    stack = start_stack(workdir)
    procs: list[Proc] = []
    opa: OpaProcess | None = None
    try:
        opa = OpaProcess(paths=[ROOT / "rego"], log_path=workdir / "opa.log").start()
        policyd_port, maskd_port = free_port(), free_port()
        policyd = spawn("policyd", [PGWARDEN, "policyd", "serve", "--listen",
                                    f"127.0.0.1:{policyd_port}", "--opa-url", opa.url,
                                    "--revision-interval", "0.2"], workdir / "policyd.log")
        procs.append(policyd)
        maskd = spawn("maskd", [PGWARDEN, "maskd", "serve", "--listen",
                                f"127.0.0.1:{maskd_port}"], workdir / "maskd.log",
                      env={"PGWARDEN_MASK_KEY": secrets.token_hex(32)})
        procs.append(maskd)
        wait_for_port(policyd_port, proc=policyd)
        wait_for_port(maskd_port, proc=maskd)

        # The audit store: its own database on the stack's server, migrated.
        with psycopg.connect(stack.postgres.admin_dsn(), autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'pgwarden_audit'"
                                ).fetchone():
                conn.execute("CREATE DATABASE pgwarden_audit")
        audit_url = (f"postgresql://postgres@/pgwarden_audit?host={stack.postgres.socket_dir}"
                     f"&port={stack.postgres.port}")
        upgrade(audit_url)

        config = workdir / "pgwarden.yaml"
        config.write_text(yaml.safe_dump({
            "tap": {
                "listen": f"127.0.0.1:{stack.ports['tap_extproc']}",
                "upstream": f"127.0.0.1:{stack.postgres.port}",
                "auth_mode": "passthrough",
                "upstream_tls": {"sslmode": "verify-full", "ca_file": str(stack.ca_file)},
                "secrets_file": str(stack.secrets.file),
                "policyd": {"target": f"127.0.0.1:{policyd_port}"},
                # policyd here runs without --config (decisions only): the
                # taps write their own audit store and hold nothing.
                "approvals": False,
                "audit": {"url": audit_url, "ship_to": "store"},
            },
            "policyd": {"opa_url": opa.url},
        }))
        args = [
            "--config", str(config),
            "--envoy-admin", f"http://127.0.0.1:{stack.ports['envoy_admin']}",
            "--tap", f"extproc=127.0.0.1:{stack.ports['tap_extproc']}",
            "--tap", f"inline=127.0.0.1:{stack.ports['tap_inline']}",
            "--maskd", f"127.0.0.1:{maskd_port}",
            "--upstream-role", "app", "--upstream-dbname", "shop",
            "--timeout", "5",
        ]
        dep = Deployment(stack, opa, policyd, maskd, config, args)
        yield dep
        opa = dep.opa
    finally:
        if opa is not None:
            opa.stop()
        for proc in reversed(procs):
            stop(proc)
        stop_stack(stack, remove_data=True)


def test_config_of_the_deployment_is_valid(deployment: Deployment) -> None:
    result = subprocess.run([PGWARDEN, "config", "check", str(deployment.config)],
                            capture_output=True, text=True, timeout=120, check=False,
                            env={k: v for k, v in os.environ.items()
                                 if not k.startswith("PGWARDEN__")})
    assert result.returncode == 0, result.stderr


def test_healthy_deployment_is_all_ok(deployment: Deployment) -> None:
    result = doctor_until(deployment, 0)
    assert result.returncode == 0, result.stdout + result.stderr
    status = lines(result)
    expected = {"envoy", "tap extproc", "tap inline", "policyd", "opa", "maskd", "audit",
                "upstream"}
    assert {n for n, s in status.items() if s == "OK"} == expected, result.stdout
    assert "0 problems" in result.stdout
    assert "policy revision sha256:" in result.stdout
    assert "logged in as app" in result.stdout
    # Nothing secret in the report.
    for password in deployment.stack.passwords.values():
        assert password not in result.stdout + result.stderr


def test_unexpected_policy_revision_is_named(deployment: Deployment) -> None:
    dep = Deployment(deployment.stack, deployment.opa, deployment.policyd, deployment.maskd,
                     deployment.config, [*deployment.args, "--expect-revision", "sha256:00"])
    result = doctor(dep)
    assert result.returncode == 1
    assert lines(result)["policyd"] == "FAIL", result.stdout
    assert "sha256:00" in result.stdout and "serves policy revision sha256:" in result.stdout


def test_a_policyd_without_the_services_the_taps_rely_on_is_named(
        deployment: Deployment, tmp_path: Path) -> None:
    """With the defaults (tap.approvals, tap.audit.ship_to: policyd) the taps
    hold statements through policyd and ship their spools to it; a policyd
    started without --config hosts neither: the doctor says so."""
    config = yaml.safe_load(deployment.config.read_text())
    del config["tap"]["approvals"], config["tap"]["audit"]["ship_to"]
    relying = tmp_path / "pgwarden.yaml"
    relying.write_text(yaml.safe_dump(config))
    args = list(deployment.args)
    args[args.index("--config") + 1] = str(relying)
    result = doctor(Deployment(deployment.stack, deployment.opa, deployment.policyd,
                               deployment.maskd, relying, args))
    assert result.returncode == 1
    assert lines(result)["policyd"] == "FAIL", result.stdout
    assert "does not host the approval service and the audit sink" in result.stdout
    assert "--config" in result.stdout


def test_killed_opa_is_named_and_its_return_restores_service(deployment: Deployment) -> None:
    deployment.opa.stop()
    try:
        result = doctor(deployment)
        assert result.returncode == 1
        status = lines(result)
        assert status["opa"] == "FAIL", result.stdout
        assert "opa" in result.stdout.splitlines()[-1]  # the summary names it
        assert "hint:" in result.stdout
        # The rest of the data path is still reported healthy.
        for name in ("envoy", "tap extproc", "tap inline", "maskd", "audit", "upstream"):
            assert status[name] == "OK", result.stdout
    finally:
        deployment.restart_opa()
    result = doctor_until(deployment, 0)
    assert result.returncode == 0, result.stdout


def test_killed_tap_is_named(deployment: Deployment) -> None:
    deployment.stack.stop_tap("extproc")
    try:
        result = doctor(deployment)
        assert result.returncode == 1
        assert lines(result)["tap extproc"] == "FAIL", result.stdout
        assert lines(result)["tap inline"] == "OK", result.stdout
    finally:
        deployment.stack.restart_tap("extproc")
    result = doctor_until(deployment, 0)
    assert result.returncode == 0, result.stdout


def test_killed_maskd_is_named(deployment: Deployment) -> None:
    stop(deployment.maskd)
    result = doctor(deployment)
    assert result.returncode == 1
    assert lines(result)["maskd"] == "FAIL", result.stdout


def test_version_reports_the_postgresql_server(deployment: Deployment) -> None:
    result = subprocess.run([PGWARDEN, "version", "--dsn", deployment.stack.app_dsn_direct],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    line = next(li for li in result.stdout.splitlines() if li.startswith("postgresql"))
    assert line.split()[1][:2].isdigit(), line  # e.g. "15.10 (Debian ...)"
    assert "protocol    3.0, 3.2" in result.stdout
