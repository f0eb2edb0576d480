"""The auditor and approver console, end to end.

A scripted session is written into a fresh SQLite audit store with the audit
package's own writer and emit helpers (so the records are chained, scrubbed
and checkpointed exactly as in production), plus one pending approval in the
approvals store. Then:

* plain HTTP tests (FastAPI TestClient) pin down sign-in, authorisation, CSRF
  and the evidence-access records;
* a browser test starts ``pgwarden console serve`` on a free loopback port and
  drives real headless Chromium through sign-in, the sessions list, one
  replay, the approvals queue as a read-only auditor (no button, a forged POST
  refused) and one approval as an approver. Screenshots are kept in
  ``test-artifacts/console-*.png``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from pgwarden.devissuer import DevIssuer, ensure_dev_keys
from policyd.approvals.models import params_digest
from policyd.approvals.store import ApprovalStore
from policyd.audit import emit
from policyd.audit.events import ApprovalEvent, SessionEndEvent
from policyd.audit.models import table_of
from policyd.audit.store import AuditStore
from policyd.audit.writer import AuditWriter
from policyd.console.app import create_app
from policyd.console.settings import ConsoleSettings
from policyd.console.signin import COOKIE_NAME
from tap.hooks import (
    Decision,
    Identity,
    RecordRows,
    SessionInfo,
    StatementRequest,
    Verdict,
)

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
RAW_PAN = "4111111111111111"
MASKED_PAN = "XXXXXXXXXXXX1111"
DENY_REASON = "DROP DATABASE is prohibited for every identity"
HOLD_SQL = "SELECT * FROM payments WHERE amount > 10000"


@dataclass
class Seeded:
    url: str
    key: Path
    checkpoints: Path
    session_id: str
    approval_id: str
    issuer: DevIssuer
    workdir: Path


def _seed(workdir: Path) -> Seeded:
    """One fraud-detection session: a masked read, a blocked DROP DATABASE, a
    held statement with its pending approval, then the end of the session."""
    url = f"sqlite:///{workdir / 'audit.db'}"
    key = workdir / "audit-signing.key"
    checkpoints = workdir / "audit-checkpoints.jsonl"
    agent = Identity(
        subject="fraud-nightly",
        groups=("fraud-readers",),
        issuer="https://dev-issuer.pgwarden.invalid",
        kind="agent",
    )
    info = SessionInfo(
        session_id="s-console-0001",
        database="shop",
        user="fraud-nightly",
        upstream_role="fraud_reader",
        client_addr="127.0.0.1:50123",
        application_name="fraud-job",
        tls=True,
    )
    t0 = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)

    def req(sql: str) -> StatementRequest:
        return StatementRequest(identity=agent, session=info, sql=sql)

    read = Decision(
        verdict=Verdict.ALLOW,
        reasons=("fraud-readers may read payments (masked)",),
        decision_id="d-1",
        policy_revision="rev-1",
        record_rows=RecordRows.MASKED_ROWS,
    )
    deny = Decision(
        verdict=Verdict.DENY, reasons=(DENY_REASON,), decision_id="d-2", policy_revision="rev-1"
    )
    hold = Decision(
        verdict=Verdict.HOLD,
        reasons=("large payments need a human approval",),
        decision_id="d-3",
        policy_revision="rev-1",
        approval_id="ap_aaaaaaaaaaaa",
    )
    approvals = ApprovalStore(url)
    try:
        pending = approvals.create(
            identity=agent,
            sql=HOLD_SQL,
            params_digest=params_digest(None),
            database="shop",
            session_id=info.session_id,
            reason="large payments need a human approval",
            approver_groups=("approvers",),
            hold_seconds=3600,
            statement_seq=3,
            approval_id="ap_aaaaaaaaaaaa",
        )
    finally:
        approvals.close()
    events: list[Any] = [
        emit.session_start(agent, info, driver_mode="inline", ts=t0),
        # Recorded before forwarding; the outcome follows as a statement_result.
        emit.statement(
            req(f"SELECT card_number, amount FROM payments WHERE card_number = '{RAW_PAN}'"),
            read,
            statement_seq=1,
            started_at=t0 + timedelta(seconds=1),
        ),
        emit.statement_result(
            info.session_id,
            1,
            read,
            finished_at=t0 + timedelta(seconds=2),
            command_tag="SELECT 1",
            rows_returned=1,
            masked_counts={"public.payments.card_number": 1},
            recorded_rows=[[MASKED_PAN, "12.50"]],
        ),
        emit.statement(
            req("DROP DATABASE shop"),
            deny,
            statement_seq=2,
            started_at=t0 + timedelta(seconds=3),
            error_sqlstate="42501",
            error_message="pgwarden refused the statement: " + DENY_REASON,
        ),
        emit.statement(req(HOLD_SQL), hold, statement_seq=3, started_at=t0 + timedelta(seconds=4)),
        ApprovalEvent(
            session_id=info.session_id,
            ts=t0 + timedelta(seconds=4),
            approval_id=pending.approval_id,
            action="requested",
            statement_seq=3,
            reason="large payments need a human approval",
        ),
        SessionEndEvent(
            session_id=info.session_id,
            ts=t0 + timedelta(seconds=9),
            reason="client_terminate",
            statements=3,
        ),
    ]
    writer = AuditWriter(
        url,
        workdir / "spool.jsonl",
        signing_key=key,
        checkpoint_file=checkpoints,
        component="test-seed",
    )
    writer.start()
    assert writer.submit(events)
    # A generous wait: the machine is shared and SQLite fsyncs every batch.
    assert writer.close(timeout=180), f"seeded events not all stored: {writer.stats}"
    return Seeded(
        url=url,
        key=key,
        checkpoints=checkpoints,
        session_id=info.session_id,
        approval_id=pending.approval_id,
        issuer=ensure_dev_keys(workdir / "identity"),
        workdir=workdir,
    )


@pytest.fixture
def seeded(tmp_path: Path) -> Seeded:
    return _seed(tmp_path)


def _settings(s: Seeded) -> ConsoleSettings:
    return ConsoleSettings(
        store_url=s.url,
        identity=s.issuer.identity_settings(),
        cookie_secure=False,
        signing_key=s.key,
        checkpoints=s.checkpoints,
    )


@pytest.fixture
def client(seeded: Seeded) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(seeded)), follow_redirects=False) as c:
        yield c


def _sign_in(client: TestClient, token: str) -> Any:
    return client.post("/signin", data={"token": token, "next": "/sessions"})


def _csrf(page: str) -> str:
    marker = 'name="csrf" value="'
    start = page.index(marker) + len(marker)
    return page[start : page.index('"', start)]


def _approval_status(url: str, approval_id: str) -> str:
    store = ApprovalStore(url)
    try:
        rec = store.get(approval_id)
        assert rec is not None
        return rec.status.value
    finally:
        store.close()


def _evidence_reads(url: str) -> list[dict[str, Any]]:
    from policyd.audit.models import EvidenceAccessRecord

    store = AuditStore(url)
    try:
        t = table_of(EvidenceAccessRecord)
        with store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(t).order_by(t.c.seq))]
    finally:
        store.close()


# -- HTTP: sign-in, authorisation, CSRF ------------------------------------------------


def test_pages_need_sign_in(client: TestClient) -> None:
    for path in ("/sessions", "/sessions/s-console-0001", "/approvals", "/verify"):
        r = client.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/signin"), path
    r = client.post("/approvals/ap_aaaaaaaaaaaa", data={"decision": "approve", "reason": "x"})
    assert r.status_code == 401


def test_sign_in_cookie_keeps_no_token(client: TestClient, seeded: Seeded) -> None:
    token = seeded.issuer.mint("alice", groups=["auditors"], kind="human")
    r = _sign_in(client, token)
    assert r.status_code == 303 and r.headers["location"] == "/sessions"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Max-Age=" in cookie
    value = client.cookies[COOKIE_NAME]
    for part in token.split("."):
        assert part not in value and part not in cookie
    page = client.get("/sessions").text
    assert "alice" in page and token not in page


def test_bad_tokens_are_refused_without_detail(client: TestClient, seeded: Seeded) -> None:
    expired = seeded.issuer.mint(
        "alice", groups=["auditors"], extra_claims={"exp": int(time.time()) - 3600}
    )
    for token in ("not-a-token", expired):
        r = _sign_in(client, token)
        assert r.status_code == 401
        assert "not accepted" in r.text and COOKIE_NAME not in r.headers.get("set-cookie", "")
        assert "expired" not in r.text.lower()  # which check failed is for the audit trail
    # A valid token in none of the console's groups does not open the evidence.
    r = _sign_in(client, seeded.issuer.mint("fraud-nightly", groups=["fraud-readers"]))
    assert r.status_code == 403 and "in none of the console" in r.text
    assert client.get("/sessions").status_code == 303


def test_forged_cookie_is_ignored(client: TestClient, seeded: Seeded) -> None:
    _sign_in(client, seeded.issuer.mint("alice", groups=["auditors"]))
    body, mac = client.cookies[COOKIE_NAME].split(".")
    client.cookies.set(COOKIE_NAME, body[:-2] + "AA." + mac)
    assert client.get("/sessions").status_code == 303


def test_read_only_user_cannot_decide(client: TestClient, seeded: Seeded) -> None:
    _sign_in(client, seeded.issuer.mint("alice", groups=["auditors"]))
    page = client.get("/approvals").text
    assert seeded.approval_id in page
    assert 'value="approve"' not in page and "read-only" in page
    csrf = _csrf(page)  # the sign-out form carries it: a valid token for this session
    r = client.post(
        f"/approvals/{seeded.approval_id}",
        data={"csrf": csrf, "decision": "approve", "reason": "looks fine"},
    )
    assert r.status_code == 403 and "may only read" in r.text
    assert _approval_status(seeded.url, seeded.approval_id) == "pending"


def test_approver_needs_csrf_token(client: TestClient, seeded: Seeded) -> None:
    _sign_in(client, seeded.issuer.mint("bob", groups=["approvers"], kind="human"))
    page = client.get("/approvals").text
    assert 'value="approve"' in page
    for forged in ({}, {"csrf": "x" * 43}):
        r = client.post(
            f"/approvals/{seeded.approval_id}",
            data={"decision": "approve", "reason": "forged", **forged},
        )
        assert r.status_code == 403 and "CSRF" in r.text
    # A same-session token posted from another origin is refused too.
    r = client.post(
        f"/approvals/{seeded.approval_id}",
        data={"csrf": _csrf(page), "decision": "approve", "reason": "x"},
        headers={"Origin": "https://evil.example"},
    )
    assert r.status_code == 403
    assert _approval_status(seeded.url, seeded.approval_id) == "pending"

    r = client.post(
        f"/approvals/{seeded.approval_id}",
        data={"csrf": _csrf(page), "decision": "deny", "reason": "not during the freeze"},
    )
    assert r.status_code == 303
    assert _approval_status(seeded.url, seeded.approval_id) == "denied"
    after = client.get(r.headers["location"]).text
    assert "denied" in after and "not during the freeze" in after
    # The decision is in the session's evidence with who and why.
    replay = client.get(f"/sessions/{seeded.session_id}").text
    assert "by bob" in replay and "not during the freeze" in replay


def test_requester_cannot_approve_own_request(seeded: Seeded) -> None:
    settings = _settings(seeded)
    with TestClient(create_app(settings), follow_redirects=False) as c:
        # The agent itself, even if someone put it in the approvers group.
        _sign_in(c, seeded.issuer.mint("fraud-nightly", groups=["approvers", "fraud-readers"]))
        page = c.get("/approvals").text
        assert 'value="approve"' not in page
        r = c.post(
            f"/approvals/{seeded.approval_id}",
            data={"csrf": _csrf(page), "decision": "approve", "reason": "mine"},
        )
        assert r.status_code == 303 and r.headers["location"] == "/approvals"
        assert "may not decide" in c.get("/approvals").text
        # The message is shown once, and a crafted link cannot supply one.
        assert "may not decide" not in c.get("/approvals").text
        assert "call 555" not in c.get("/approvals", params={"failed": "call 555"}).text
    assert _approval_status(seeded.url, seeded.approval_id) == "pending"


def test_every_read_is_recorded(client: TestClient, seeded: Seeded) -> None:
    _sign_in(client, seeded.issuer.mint("alice", groups=["auditors"]))
    client.get("/sessions", params={"subject": "fraud-nightly", "decision": "denied"})
    client.get(f"/sessions/{seeded.session_id}")
    client.get("/approvals")
    client.get("/verify")
    reads = _evidence_reads(seeded.url)
    assert [(r["action"], r["target"]) for r in reads] == [
        ("list", "sessions"),
        ("replay", seeded.session_id),
        ("console", "approvals"),
        ("verify", "all"),
    ]
    assert all(r["accessor"].startswith("console:alice") for r in reads)
    assert reads[0]["detail"]["subject"] == "fraud-nightly"


def test_sessions_filters(client: TestClient, seeded: Seeded) -> None:
    _sign_in(client, seeded.issuer.mint("alice", groups=["auditors"]))
    assert seeded.session_id in client.get("/sessions", params={"group": "fraud-readers"}).text
    assert seeded.session_id in client.get("/sessions", params={"decision": "denied"}).text
    assert seeded.session_id not in client.get("/sessions", params={"subject": "someone"}).text
    assert seeded.session_id not in client.get("/sessions", params={"since": "2099-01-01"}).text
    bad = client.get("/sessions", params={"since": "yesterday-ish"})
    assert bad.status_code == 400 and "Since:" in bad.text


def test_verify_names_a_changed_record(client: TestClient, seeded: Seeded) -> None:
    _sign_in(client, seeded.issuer.mint("alice", groups=["auditors"]))
    assert "PASS" in client.get("/verify").text
    store = AuditStore(seeded.url)
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE audit_statements SET sql = 'SELECT 1' WHERE statement_seq = 2"
            )
            seq = conn.exec_driver_sql(
                "SELECT seq FROM audit_statements WHERE statement_seq = 2"
            ).scalar()
    finally:
        store.close()
    page = client.get("/verify").text
    assert "FAIL" in page and "audit_statements" in page and f"<td>{seq}</td>" in page


def test_sign_in_lasts_no_longer_than_the_token(client: TestClient, seeded: Seeded) -> None:
    r = _sign_in(client, seeded.issuer.mint("alice", groups=["auditors"], ttl=60))
    max_age = int(r.headers["set-cookie"].split("Max-Age=")[1].split(";")[0])
    assert 0 < max_age <= 60


def test_identity_config_file_forms(tmp_path: Path) -> None:
    from policyd.console.settings import load_identity_config

    bare = tmp_path / "identity.yaml"
    bare.write_text("issuer: https://idp.example\naudience: pgwarden\njwks_file: jwks.json\n")
    assert load_identity_config(bare).issuer == "https://idp.example"
    full = tmp_path / "pgwarden.yaml"
    full.write_text("identity:\n  issuer: https://idp.example\n  audience: pgwarden\n"
                    "  jwks_url: https://idp.example/jwks\n")
    assert load_identity_config(full).jwks_url == "https://idp.example/jwks"
    bad = tmp_path / "bad.yaml"
    bad.write_text("identity:\n  issuer: https://idp.example\n  audience: pgwarden\n"
                   "  jwks_url: http://idp.example/jwks\n")
    with pytest.raises(ValueError, match="https"):
        load_identity_config(bad)


def test_unrecorded_read_shows_nothing(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(_settings(seeded))
    with TestClient(app, follow_redirects=False) as c:
        _sign_in(c, seeded.issuer.mint("alice", groups=["auditors"]))

        def broken(*_a: Any, **_k: Any) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(app.state.console.audit, "append", broken)
        r = c.get(f"/sessions/{seeded.session_id}")
        assert r.status_code == 503 and "could not be recorded" in r.text
        assert "DROP DATABASE" not in r.text and "fraud-nightly" not in r.text


def test_sign_out_ends_the_session(client: TestClient, seeded: Seeded) -> None:
    _sign_in(client, seeded.issuer.mint("alice", groups=["auditors"]))
    page = client.get("/sessions").text
    assert client.post("/signout", data={"csrf": "wrong"}).status_code == 403
    r = client.post("/signout", data={"csrf": _csrf(page)})
    assert r.status_code == 303 and r.headers["location"] == "/signin"
    assert client.get("/sessions").status_code == 303


def test_pages_carry_security_headers(client: TestClient, seeded: Seeded) -> None:
    r = client.get("/signin")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-frame-options"] == "DENY"


# -- browser -----------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _chromium_or_skip() -> None:
    """Install Debian's chromium if it is missing (scripts/bootstrap.sh should
    have); skip only when it cannot be installed here."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    why = "not root and chromium is not installed"
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        got = subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
            capture_output=True, text=True, env=env, timeout=900,
        )
        if got.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
            got = subprocess.run(
                ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"],
                capture_output=True, text=True, env=env, timeout=900,
            )
        why = f"apt-get install chromium chromium-driver failed: {got.stderr.strip()[-300:]}"
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"headless Chromium is not available and could not be installed ({why})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PGWARDEN = str(Path(sys.executable).with_name("pgwarden"))


@contextlib.contextmanager
def _serve(workdir: Path, args: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``pgwarden console serve`` as an operator would; yield its URL."""
    port = _free_port()
    log_path = workdir / f"console-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [PGWARDEN, "console", "serve", "--listen", f"127.0.0.1:{port}", *args],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("console did not start:\n" + log_path.read_text())
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def console_url(seeded: Seeded) -> Iterator[str]:
    """The production form: identity settings from a configuration file."""
    config = seeded.workdir / "pgwarden.yaml"
    config.write_text(
        "identity:\n"
        f"  issuer: {seeded.issuer.issuer}\n"
        "  audience: pgwarden\n"
        f"  jwks_file: {seeded.issuer.jwks_path}\n"
        "  algorithms: [EdDSA]\n"
    )
    with _serve(
        seeded.workdir,
        ["--store", seeded.url, "--identity-config", str(config),
         "--key", str(seeded.key), "--checkpoints", str(seeded.checkpoints)],
    ) as url:
        yield url


def _mint_cli(keys: Path, sub: str, groups: str) -> str:
    """A development token as docs/console.md says to get one."""
    got = subprocess.run(
        [PGWARDEN, "token", "mint", "--keys", str(keys), "--sub", sub, "--groups", groups,
         "--kind", "human"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return got.stdout.strip()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_serve_trusts_the_dev_issuer_by_default(seeded: Seeded) -> None:
    """`pgwarden console serve --store URL` with only the development issuer."""
    keys = seeded.workdir / "identity"
    with _serve(seeded.workdir, ["--store", seeded.url], env={"PGWARDEN_DEV_KEYS": str(keys)}) as url:
        token = _mint_cli(keys, "alice", "auditors")
        opener = urllib.request.build_opener(_NoRedirect())
        form = urllib.parse.urlencode({"token": token, "next": "/sessions"}).encode()
        try:
            opener.open(urllib.request.Request(url + "/signin", data=form), timeout=30)
            pytest.fail("sign-in did not redirect")
        except urllib.error.HTTPError as answer:
            assert answer.code == 303 and answer.headers["location"] == "/sessions"
            cookie = answer.headers["set-cookie"]
        assert cookie.startswith(COOKIE_NAME + "=") and "HttpOnly" in cookie
        # On loopback the cookie is not marked Secure (plain HTTP never leaves the host).
        assert "Secure" not in cookie


@pytest.fixture
def browser() -> Iterator[Any]:
    _chromium_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="pgw-console-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _shot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"console-{name}.png"))


def _browser_sign_in(driver: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    assert "Sign in" in driver.title
    box = driver.find_element(By.ID, "token")
    # send_keys types character by character; set the value directly instead.
    driver.execute_script("arguments[0].value = arguments[1];", box, token)
    driver.find_element(By.ID, "signin").click()
    # The click only starts the form's POST: wait (bounded) for the signed-in
    # page, so that the next get() cannot abort the sign-in before its cookie
    # is set (seen once in CI: the approvals page then showed the sign-in form).
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.ID, "signed-in-as"))


def _after_click(driver: Any, element_id: str) -> Any:
    """The element of the page a click leads to, once that page has loaded
    (a form POST and its redirect can still be under way when click() returns)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.ID, element_id))
    return found[0]


def test_console_in_a_real_browser(seeded: Seeded, console_url: str, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    # An auditor: sign in, list sessions, open the replay.
    _browser_sign_in(d, console_url, _mint_cli(seeded.workdir / "identity", "alice", "auditors"))
    assert d.find_element(By.ID, "signed-in-as").text == "alice"
    assert "Sessions" in d.title
    link = d.find_element(By.LINK_TEXT, seeded.session_id)
    row = d.find_element(By.CSS_SELECTOR, "#sessions tbody tr").text
    assert "fraud-nightly" in row
    _shot(d, "sessions")

    link.click()
    timeline = _after_click(d, "timeline").text
    assert "DROP DATABASE shop" in timeline
    assert DENY_REASON in timeline
    assert "42501" in timeline
    assert MASKED_PAN in timeline  # the row as the client saw it
    assert "HOLD" in timeline and "ap_aaaaaaaaaaaa" in timeline
    denied = d.find_element(By.ID, "stmt-2")
    assert "DENY" in denied.text and DENY_REASON in denied.text
    assert RAW_PAN not in d.page_source
    _shot(d, "replay")

    # Read-only: the queue is visible, deciding is not offered, a forged POST fails.
    d.find_element(By.LINK_TEXT, "Approvals").click()
    queue = _after_click(d, "pending").text
    assert HOLD_SQL in queue and "fraud-nightly" in queue
    assert not d.find_elements(By.CSS_SELECTOR, "button.approve")
    d.execute_script(
        """const f = document.createElement('form');
           f.method = 'post'; f.action = '/approvals/' + arguments[0];
           for (const [k, v] of [['decision', 'approve'], ['reason', 'forged']]) {
             const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i);
           }
           document.body.appendChild(f); f.submit();""",
        seeded.approval_id,
    )
    WebDriverWait(d, 30).until(lambda d: "CSRF" in d.find_element(By.TAG_NAME, "body").text)
    assert _approval_status(seeded.url, seeded.approval_id) == "pending"

    # An approver approves with a reason; the store records it.
    d.delete_all_cookies()
    _browser_sign_in(d, console_url, seeded.issuer.mint("bob", groups=["approvers"], kind="human"))
    d.get(console_url + "/approvals")
    request = d.find_element(By.ID, seeded.approval_id)
    request.find_element(By.NAME, "reason").send_keys("ticket FRAUD-42, one-off review")
    _shot(d, "approvals")
    request.find_element(By.CSS_SELECTOR, "button.approve").click()
    assert "approved" in _after_click(d, "approval-done").text
    assert _approval_status(seeded.url, seeded.approval_id) == "approved"
    assert "ticket FRAUD-42" in d.find_element(By.ID, "recent").text
    _shot(d, "approved")

    d.find_element(By.LINK_TEXT, "Audit verification").click()
    assert _after_click(d, "verify-status").text.startswith("PASS")
    _shot(d, "verify")
    assert RAW_PAN not in d.page_source
