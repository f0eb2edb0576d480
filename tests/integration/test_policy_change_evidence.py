"""Which policy was in force, from when, is evidence (issue 6: "policy
changes seen"; PCI DSS 10.2.1, 10.2.2): policyd records the revision it
starts deciding with and every reload as a gateway ``policy_reload`` event in
the audit store, each naming the revision before it, and records its own
start and stop (10.2.1.6).

A policyd process started the way deployments start it (``policyd serve
--config``, its audit store a SQLite file of this test) decides with a real
OPA watching a copy of ``rego/``; the test edits a data file of the copy.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent import config_path

from pgwarden import stack as st
from pgwarden.stack import LocalStack
from policyd.opa_process import OpaProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent


def gateway_events(db: Path) -> list[tuple[str, str, str, dict[str, Any]]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            rows = conn.execute("SELECT action, component, policy_revision, detail "
                                "FROM audit_gateway_events ORDER BY seq").fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
    return [(a, c, r or "", json.loads(d) if isinstance(d, str) else (d or {}))
            for a, c, r, d in rows]


def wait_for(check: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def test_policyd_records_each_policy_revision_it_decides_with(stack: LocalStack,
                                                               tmp_path: Path) -> None:
    rego = tmp_path / "rego"
    shutil.copytree(ROOT / "rego", rego)
    db = tmp_path / "audit.db"
    config: dict[str, Any] = yaml.safe_load(config_path(stack).read_text())
    port = st.free_port()
    with OpaProcess(paths=[rego]) as opa:
        config["policyd"] = {"listen": f"{st.HOST}:{port}", "opa_url": opa.url,
                             "opa_deadline_seconds": 2.0}
        config["tap"]["audit"].update({
            "url": f"sqlite:///{db}", "spool_dir": str(tmp_path / "spool"),
            "checkpoint_file": str(tmp_path / "checkpoints.jsonl"),
            "signing_key_file": str(tmp_path / "audit-signing.key")})
        cfg = tmp_path / "pgwarden.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = st.spawn("policyd-evidence", [
            sys.executable, "-m", "policyd.cli", "serve", "--config", str(cfg),
            "--revision-interval", "0.2", "--policy-dir", str(rego)], tmp_path / "policyd.log")
        try:
            st.wait_for_port(port, proc=proc)

            def reloads() -> list[tuple[str, str, str, dict[str, Any]]]:
                return [e for e in gateway_events(db)
                        if e[0] == "policy_reload" and e[1] == "policyd"]

            (first,) = wait_for(reloads, "the first revision in the audit store")
            assert first[2] and first[3]["previous_revision"] is None, first

            groups = rego / "pgwarden_data" / "groups.json"
            doc = json.loads(groups.read_text())
            doc["groups"]["fraud-readers"]["databases"] = []
            groups.write_text(json.dumps(doc))
            def two() -> list[tuple[str, str, str, dict[str, Any]]] | None:
                got = reloads()
                return got if len(got) >= 2 else None

            seen = wait_for(two, "the reload in the audit store")
            second = seen[1]
            assert second[2] not in ("", first[2])
            assert second[3]["previous_revision"] == first[2]
        finally:
            st.stop(proc)  # SIGTERM: policyd closes its audit writer
    actions = [(a, c) for a, c, _, _ in gateway_events(db) if c == "policyd"]
    assert actions[0] == ("start", "policyd") and actions[-1] == ("stop", "policyd"), actions
    log = (tmp_path / "policyd.log").read_text()
    assert "Traceback" not in log, log[-3000:]
