"""Issue 7 through the real governed gateway: a risky statement is held inside
a live session until a human decides from the CLI.

As a ``fraud-readers`` agent, with psql and psycopg 3, through Envoy and the
governed tap in both driver modes: ``SELECT * FROM payments WHERE amount >
10000`` waits; ``pgwarden approvals approve`` (an ``approvers`` token) lets it
run and its rows arrive masked; ``deny`` ends it with SQLSTATE PW001 and the
approval id; a hold that times out can be approved late for exactly one
identical retry; nobody approves their own request (or their actor's); a
client cancel during the hold returns promptly and marks the request
cancelled; ``pgwarden replay`` shows the hold, the approver, the reason and
the wait.

Every test uses its own token subject, so requests and sessions of one test
are told apart from everything else running on the shared stack. Nothing
here prints a token or a PAN.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from agent import MODES, agent_dsn, audit_url, mint, policyd_target
from psycopg.conninfo import make_conninfo

from maskd.detect import contains_pan, find_pans
from pgwarden.stack import LocalStack
from policyd.approvals.client import RemoteApprovals
from policyd.approvals.models import ApprovalRecord
from policyd.approvals.store import ApprovalError

pytestmark = pytest.mark.integration

HELD_SQL = "SELECT * FROM payments WHERE amount > 10000"
READERS = ["fraud-readers"]
APPROVER = "alice"
PGWARDEN = str(Path(sys.executable).parent / "pgwarden")
CLIENTS = ("psql", "psycopg")
PENDING_TIMEOUT = 60.0  # for the request to show up (a CLI start is slow on a busy box)
CLI_TIMEOUT = 120
WAIT_BEFORE_APPROVING = 3.0


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True, repr=False)
class Expected:
    rows: int  # rows of HELD_SQL, read directly
    pans: frozenset[str]  # every seeded card number

    def __repr__(self) -> str:  # pytest shows fixture values: never the PANs
        return f"Expected({self.rows} rows, {len(self.pans)} card numbers)"


@pytest.fixture(scope="module")
def expected(stack: LocalStack) -> Expected:
    with psycopg.connect(make_conninfo(stack.upstream_dsn, dbname="shop")) as su:
        row = su.execute("SELECT count(*) FROM payments WHERE amount > 10000").fetchone()
        pans = su.execute("SELECT card_number FROM payments").fetchall()
    assert row is not None and row[0] > 0, "the seed has no payment above 10,000"
    return Expected(int(row[0]), frozenset(str(p[0]) for p in pans))


def unique_sub(what: str) -> str:
    return f"fraud-bot-{what}-{uuid.uuid4().hex[:8]}"


def approver_token(stack: LocalStack) -> str:
    return mint(stack, APPROVER, ["approvers"], kind="human")


def approvals_cli(stack: LocalStack, *args: str, token: str) -> subprocess.CompletedProcess[str]:
    """``pgwarden approvals ...`` with the token in PGWARDEN_TOKEN (not argv)."""
    env = {**os.environ, "PGWARDEN_TOKEN": token}
    return subprocess.run([PGWARDEN, "approvals", *args, "--policyd", policyd_target(stack)],
                          capture_output=True, text=True, env=env, timeout=CLI_TIMEOUT,
                          check=False)


def _remote(stack: LocalStack, call: Any) -> Any:
    async def main() -> Any:
        async with RemoteApprovals(policyd_target(stack)) as remote:
            return await call(remote)

    return asyncio.run(main())


def requests_of(stack: LocalStack, sub: str, status: str | None = None) -> list[ApprovalRecord]:
    token = approver_token(stack)
    records: list[ApprovalRecord] = _remote(stack, lambda r: r.list(token, status, 1000))
    return [rec for rec in records if rec.subject == sub]


def wait_pending(stack: LocalStack, sub: str, *, exclude: frozenset[str] = frozenset(),
                 timeout: float = PENDING_TIMEOUT) -> ApprovalRecord:
    """The pending request of ``sub`` (not one of ``exclude``), once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = [r for r in requests_of(stack, sub, "pending") if r.approval_id not in exclude]
        if fresh:
            assert len(fresh) == 1, f"{len(fresh)} pending requests for one held statement"
            return fresh[0]
        time.sleep(0.3)
    raise AssertionError(f"no pending approval request for {sub} after {timeout:.0f}s")


def record(stack: LocalStack, approval_id: str) -> ApprovalRecord:
    token = approver_token(stack)
    rec: ApprovalRecord = _remote(stack, lambda r: r.get(token, approval_id))
    return rec


def wait_status(stack: LocalStack, approval_id: str, status: str,
                timeout: float = 30.0) -> ApprovalRecord:
    deadline = time.monotonic() + timeout
    rec = record(stack, approval_id)
    while rec.status.value != status and time.monotonic() < deadline:
        time.sleep(0.3)
        rec = record(stack, approval_id)
    return rec


def deny_quietly(stack: LocalStack, approval_id: str) -> None:
    """Clean-up: end a hold a failed test left behind (not the CLI: fast)."""
    token = approver_token(stack)
    try:
        _remote(stack, lambda r: r.decide(token, approval_id, False, "test clean-up"))
    except ApprovalError:  # already decided: nothing to clean
        pass


def no_pan(expected: Expected, output: str, what: str) -> None:
    data = output.encode("utf-8", "replace")
    spans = len(find_pans(data))
    seeded = sum(1 for p in expected.pans if p in output)
    hidden = contains_pan(data)
    assert spans == 0, f"{what}: {spans} Luhn-valid issuer-prefixed digit run(s)"
    assert seeded == 0, f"{what}: {seeded} seeded card number(s)"
    assert not hidden, f"{what}: a PAN in a hidden form"


def assert_masked_rows(expected: Expected, cards: list[str], what: str) -> None:
    n = len(cards)
    assert n == expected.rows, f"{what}: {n} rows arrived, {expected.rows} expected"
    masked = sum(1 for c in cards if c[-4:].isdigit() and not any(ch.isdigit() for ch in c[:-4]))
    assert masked == n, f"{what}: {n - masked} card numbers not masked to their last four"
    no_pan(expected, "\n".join(cards), what)


# --------------------------------------------------------------------------- held clients


@dataclass
class Held:
    """One statement sent through the gateway, running in the background."""

    client: str
    sub: str
    started: float = 0.0
    finished: float = 0.0
    cards: list[str] = field(default_factory=list, repr=False)
    sqlstate: str = ""
    error: str = ""  # exception class the client raised, if any
    message: str = field(default="", repr=False)
    ok: bool = False
    conn: psycopg.Connection[Any] | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def waiting(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        assert self._proc is not None
        return self._proc.poll() is None

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), f"{self.client}: still waiting after {timeout}s"
        elif self._proc is not None:
            try:
                out, err = self._proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.communicate()
                raise AssertionError(f"psql still waiting after {timeout}s") from None
            self.finished = time.monotonic()
            self._psql_result(out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def _psql_result(self, out: str, err: str) -> None:
        assert self._proc is not None
        self.ok = self._proc.returncode == 0
        self.cards = [line.split("|")[1] for line in out.splitlines() if line.count("|") >= 5]
        self.message = err
        for line in err.splitlines():
            # VERBOSITY=verbose: "ERROR:  PW001: message"
            if line.startswith("ERROR:") and line.count(":") >= 2:
                self.sqlstate = line.split(":", 2)[1].strip()
                break


def start_psycopg(stack: LocalStack, mode: str, sub: str, *, autocommit: bool = True,
                  conn: psycopg.Connection[Any] | None = None) -> Held:
    held = Held("psycopg", sub)
    held.conn = conn or psycopg.connect(agent_dsn(stack, mode), password=mint(stack, sub, READERS),
                                        autocommit=autocommit)

    def run() -> None:
        assert held.conn is not None
        try:
            with held.conn.cursor() as cur:
                cur.execute(HELD_SQL)
                names = [d.name for d in cur.description or ()]
                col = names.index("card_number")
                held.cards = [str(r[col]) for r in cur.fetchall()]
            held.ok = True
        except psycopg.Error as exc:
            held.sqlstate = exc.sqlstate or ""
            held.error = type(exc).__name__
            held.message = f"{exc} {exc.diag.message_detail or ''} {exc.diag.message_hint or ''}"
        except Exception as exc:  # reported by the test, not lost in the thread
            held.error = type(exc).__name__
        finally:
            held.finished = time.monotonic()

    held.started = time.monotonic()
    held._thread = threading.Thread(target=run, daemon=True)
    held._thread.start()
    return held


def start_psql(stack: LocalStack, mode: str, sub: str) -> Held:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=mint(stack, sub, READERS), PGCONNECT_TIMEOUT="15",
               LC_ALL="C.UTF-8", LANG="C.UTF-8")
    held = Held("psql", sub)
    held.started = time.monotonic()
    held._proc = subprocess.Popen(
        ["psql", agent_dsn(stack, mode), "-X", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1",
         "-v", "VERBOSITY=verbose", "-c", HELD_SQL],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return held


def start(client: str, stack: LocalStack, mode: str, sub: str) -> Held:
    return start_psql(stack, mode, sub) if client == "psql" else start_psycopg(stack, mode, sub)


@pytest.fixture
def cleanup(stack: LocalStack) -> Iterator[list[Held]]:
    """Whatever a test started is ended: pending holds denied, clients closed."""
    started: list[Held] = []
    yield started
    for held in started:
        for rec in requests_of(stack, held.sub, "pending"):
            deny_quietly(stack, rec.approval_id)
        if held._proc is not None and held._proc.poll() is None:
            held._proc.kill()
            held._proc.communicate()
        if held._thread is not None:
            held._thread.join(30)
        if held.conn is not None:
            held.conn.close()


# --------------------------------------------------------------------------- approve / deny


@pytest.mark.parametrize("client", CLIENTS)
def test_held_statement_runs_after_cli_approval_with_masked_rows(
        stack: LocalStack, expected: Expected, mode: str, client: str,
        cleanup: list[Held]) -> None:
    sub = unique_sub("approve")
    held = start(client, stack, mode, sub)
    cleanup.append(held)
    rec = wait_pending(stack, sub)
    assert rec.statement == HELD_SQL
    assert "10000" in rec.reason, "the request should say why it is held"
    assert rec.database == "shop"
    # Other sessions, even of the same agent, are not held meanwhile.
    with psycopg.connect(agent_dsn(stack, mode), password=mint(stack, sub, READERS),
                         autocommit=True) as other:
        got = other.execute("SELECT id FROM payments WHERE id = 1").fetchall()
    assert got == [(1,)], "another session was affected by the hold"
    assert held.waiting, f"{client} ({mode}) did not wait for the approval"

    approved = approvals_cli(stack, "approve", rec.approval_id, "--reason", "fraud case 4711",
                             token=approver_token(stack))
    assert approved.returncode == 0, f"approve exited {approved.returncode}: {approved.stderr}"
    assert rec.approval_id in approved.stdout and "approved" in approved.stdout

    held.join(60)
    assert held.ok, f"{client} ({mode}) failed after approval: SQLSTATE {held.sqlstate}"
    assert_masked_rows(expected, held.cards, f"{client} ({mode}) approved rows")
    no_pan(expected, held.message, f"{client} ({mode}) messages")
    done = record(stack, rec.approval_id)
    assert done.status.value in ("approved", "spent")
    assert done.approver == APPROVER and done.approver_reason == "fraud case 4711"


@pytest.mark.parametrize("client", CLIENTS)
def test_denied_statement_fails_with_pw001_and_the_approval_id(
        stack: LocalStack, expected: Expected, mode: str, client: str,
        cleanup: list[Held]) -> None:
    sub = unique_sub("deny")
    # psycopg outside autocommit: the statement runs inside a transaction
    # block, which must end up consistently failed, then usable.
    held = (start_psycopg(stack, mode, sub, autocommit=False) if client == "psycopg"
            else start_psql(stack, mode, sub))
    cleanup.append(held)
    rec = wait_pending(stack, sub)
    assert held.waiting, f"{client} ({mode}) did not wait for the approval"

    denied = approvals_cli(stack, "deny", rec.approval_id, "--reason", "not for this case",
                           token=approver_token(stack))
    assert denied.returncode == 0, f"deny exited {denied.returncode}: {denied.stderr}"

    held.join(60)
    assert not held.ok, f"{client} ({mode}): a denied statement ran"
    assert held.sqlstate == "PW001", f"{client} ({mode}): SQLSTATE {held.sqlstate!r}, not PW001"
    assert rec.approval_id in held.message, "the error should carry the approval id"
    assert held.cards == [], "no row may arrive for a denied statement"
    assert record(stack, rec.approval_id).status.value == "denied"

    if held.conn is not None:
        conn = held.conn
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,), "the connection should stay usable"
        conn.commit()


def test_parameterised_statement_is_held_and_runs_with_its_values(
        stack: LocalStack, expected: Expected, mode: str, cleanup: list[Held]) -> None:
    """Extended protocol with a Bind value: the request shows the text with
    its placeholder, and what runs after the approval is that statement with
    the values the client sent."""
    sub = unique_sub("params")
    conn = psycopg.connect(agent_dsn(stack, mode), password=mint(stack, sub, READERS),
                           autocommit=True)
    held = Held("psycopg", sub, conn=conn)
    cleanup.append(held)

    def run() -> None:
        try:
            cur = conn.execute("SELECT card_number FROM payments WHERE amount > %s", (10000,))
            held.cards = [str(r[0]) for r in cur.fetchall()]
            held.ok = True
        except psycopg.Error as exc:
            held.sqlstate = exc.sqlstate or ""
        finally:
            held.finished = time.monotonic()

    held._thread = threading.Thread(target=run, daemon=True)
    held._thread.start()
    rec = wait_pending(stack, sub)
    assert "$1" in rec.statement, "the request should show the statement as sent"
    approved = approvals_cli(stack, "approve", rec.approval_id, "--reason", "param check",
                             token=approver_token(stack))
    assert approved.returncode == 0, approved.stderr
    held.join(60)
    assert held.ok, f"({mode}) failed after approval: SQLSTATE {held.sqlstate}"
    assert_masked_rows(expected, held.cards, f"parameterised ({mode})")


def test_messages_after_a_held_statement_wait_their_turn(
        stack: LocalStack, expected: Expected, mode: str, cleanup: list[Held]) -> None:
    """Pipelined after the held statement, a harmless query is answered only
    after it, in order."""
    sub = unique_sub("pipeline")
    conn = psycopg.connect(agent_dsn(stack, mode), password=mint(stack, sub, READERS),
                           autocommit=True)
    held = Held("psycopg", sub, conn=conn)
    cleanup.append(held)
    after: list[Any] = []

    def run() -> None:
        try:
            with conn.pipeline():
                first = conn.execute(HELD_SQL)
                second = conn.execute("SELECT 'after the hold'")
            names = [d.name for d in first.description or ()]
            col = names.index("card_number")
            held.cards = [str(r[col]) for r in first.fetchall()]
            after.extend(second.fetchall())
            held.ok = True
        except psycopg.Error as exc:
            held.sqlstate = exc.sqlstate or ""
        finally:
            held.finished = time.monotonic()

    held._thread = threading.Thread(target=run, daemon=True)
    held._thread.start()
    rec = wait_pending(stack, sub)
    time.sleep(1.0)
    assert held.waiting and not after, "the pipelined query was answered during the hold"
    approved = approvals_cli(stack, "approve", rec.approval_id, "--reason", "pipeline check",
                             token=approver_token(stack))
    assert approved.returncode == 0, approved.stderr
    held.join(60)
    assert held.ok, f"({mode}) pipeline failed after approval: SQLSTATE {held.sqlstate}"
    assert_masked_rows(expected, held.cards, f"pipelined held statement ({mode})")
    assert after == [("after the hold",)]


# --------------------------------------------------------------------------- approvers


@pytest.mark.parametrize("who", ["self", "actor"])
def test_requester_cannot_approve_own_request(stack: LocalStack, mode: str, who: str,
                                              cleanup: list[Held]) -> None:
    """``self``: a token with the requester's own subject and the approvers
    group. ``actor``: the human the agent acts for (RFC 8693 ``act``)."""
    sub = unique_sub("self")
    if who == "self":
        conn = psycopg.connect(agent_dsn(stack, mode), password=mint(stack, sub, READERS),
                               autocommit=True)
        own = mint(stack, sub, ["approvers"], kind="human")
    else:
        actor = f"carol-{uuid.uuid4().hex[:6]}"
        conn = psycopg.connect(agent_dsn(stack, mode),
                               password=mint(stack, sub, READERS, act=actor), autocommit=True)
        own = mint(stack, actor, ["approvers"], kind="human")
    held = start_psycopg(stack, mode, sub, conn=conn)
    cleanup.append(held)
    rec = wait_pending(stack, sub)

    attempt = approvals_cli(stack, "approve", rec.approval_id, "--reason", "looks fine to me",
                            token=own)
    assert attempt.returncode == 1, f"self-approval exited {attempt.returncode}, expected 1"
    assert "refused" in attempt.stderr
    assert record(stack, rec.approval_id).status.value == "pending"
    assert held.waiting, "the statement must still be held after a refused self-approval"

    # A real approver still decides it.
    deny_quietly(stack, rec.approval_id)
    held.join(60)
    assert held.sqlstate == "PW001"


# --------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("client", CLIENTS)
def test_cancel_during_hold_returns_promptly_and_marks_cancelled(
        stack: LocalStack, mode: str, client: str, cleanup: list[Held]) -> None:
    sub = unique_sub("cancel")
    held = start(client, stack, mode, sub)
    cleanup.append(held)
    rec = wait_pending(stack, sub)
    assert held.waiting

    cancelled_at = time.monotonic()
    if held.conn is not None:
        conn = held.conn
        threading.Thread(target=conn.cancel, daemon=True).start()
    else:
        assert held._proc is not None
        held._proc.send_signal(signal.SIGINT)  # psql sends a CancelRequest
    # "Promptly": long before the hold (120 s in rego data) would have ended.
    held.join(30)
    took = held.finished - cancelled_at
    assert took < 30, f"{client} ({mode}) took {took:.1f}s to return after the cancel"
    assert not held.ok, f"{client} ({mode}): the cancelled statement ran"
    assert held.sqlstate in ("57014", "PW003"), f"{client} ({mode}): SQLSTATE {held.sqlstate!r}"
    assert held.cards == []
    final = wait_status(stack, rec.approval_id, "cancelled")
    assert final.status.value == "cancelled", f"request is {final.status.value}, not cancelled"

    if held.conn is not None:
        assert held.conn.execute("SELECT 1").fetchone() == (1,), "connection unusable"


# --------------------------------------------------------------------------- late approval


def _hold_seconds() -> float:
    data = json.loads((Path(__file__).resolve().parents[2] / "rego" / "pgwarden_data"
                       / "rules.json").read_text())
    return float(data["rules"]["approval"]["hold_seconds"])


@pytest.mark.timeout(900)
def test_late_approval_grants_exactly_one_identical_retry(
        stack: LocalStack, expected: Expected, cleanup: list[Held]) -> None:
    """The one slow test: both modes wait out the hold side by side."""
    hold = _hold_seconds()
    assert 0 < hold <= 300, f"hold time {hold}s in rego data"
    helds = {}
    for mode in MODES:
        helds[mode] = start_psycopg(stack, mode, unique_sub(f"late-{mode}"))
        cleanup.append(helds[mode])
    recs = {mode: wait_pending(stack, h.sub) for mode, h in helds.items()}

    for mode, held in helds.items():
        held.join(hold + 90)
        assert held.sqlstate == "PW002", (
            f"{mode}: {held.error or 'no error'} with SQLSTATE {held.sqlstate!r} after the hold "
            f"({held.finished - held.started:.0f}s), not PW002")
        assert recs[mode].approval_id in held.message, f"{mode}: approval id not in the message"
        assert record(stack, recs[mode].approval_id).status.value == "expired"

    for mode, rec in recs.items():
        late = approvals_cli(stack, "approve", rec.approval_id, "--reason", "late but fine",
                             token=approver_token(stack))
        assert late.returncode == 0, f"{mode}: late approve exited {late.returncode}: {late.stderr}"
        assert "retry" in late.stdout, "the approver should be told it grants one retry"

    for mode, held in helds.items():
        assert held.conn is not None
        # A different statement does not use the grant: it is held on its own.
        other = Held("psycopg", held.sub)
        other_done = threading.Event()

        def run_other(conn: psycopg.Connection[Any] = held.conn, out: Held = other,
                      done: threading.Event = other_done) -> None:
            try:
                conn.execute(HELD_SQL + " AND amount < 40000").fetchall()
                out.ok = True
            except psycopg.Error as exc:
                out.sqlstate = exc.sqlstate or ""
            finally:
                done.set()

        threading.Thread(target=run_other, daemon=True).start()
        different = wait_pending(stack, held.sub, exclude=frozenset({recs[mode].approval_id}))
        assert not other_done.is_set(), f"{mode}: a different statement used the late grant"
        deny_quietly(stack, different.approval_id)
        assert other_done.wait(60) and other.sqlstate == "PW001"
        assert record(stack, recs[mode].approval_id).status.value == "approved", (
            f"{mode}: the late grant was spent by a different statement")

        # The identical statement, same identity, same connection: runs at once.
        retry = start_psycopg(stack, mode, held.sub, conn=held.conn)
        retry.join(60)
        assert retry.ok, f"{mode}: the late-approved retry failed: SQLSTATE {retry.sqlstate}"
        assert_masked_rows(expected, retry.cards, f"{mode} late-approved retry")
        assert record(stack, recs[mode].approval_id).status.value == "spent"

        # The grant is spent: the next identical statement is held again.
        again = start_psycopg(stack, mode, held.sub, conn=held.conn)
        fresh = wait_pending(stack, held.sub,
                             exclude=frozenset({recs[mode].approval_id, different.approval_id}))
        assert again.waiting, f"{mode}: the second retry was not held"
        deny_quietly(stack, fresh.approval_id)
        again.join(60)
        assert again.sqlstate == "PW001"


# --------------------------------------------------------------------------- replay


def _replay(stack: LocalStack, session_id: str, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PGWARDEN, "replay", session_id, "--store", audit_url(stack),
                           "--format", fmt], capture_output=True, text=True, timeout=CLI_TIMEOUT,
                          check=False)


def _ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_replay_shows_hold_approver_reason_and_wait(
        stack: LocalStack, expected: Expected, mode: str, cleanup: list[Held]) -> None:
    sub = unique_sub("replay")
    held = start_psycopg(stack, mode, sub)
    cleanup.append(held)
    rec = wait_pending(stack, sub)
    time.sleep(WAIT_BEFORE_APPROVING)
    approved = approvals_cli(stack, "approve", rec.approval_id, "--reason", "ticket FRAUD-8812",
                             token=approver_token(stack))
    assert approved.returncode == 0, approved.stderr
    held.join(60)
    assert held.ok
    assert rec.session_id, "the request should name the held session"

    transcript, records = "", []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = _replay(stack, rec.session_id, "text")
        if text.returncode == 0 and "approved by" in text.stdout and HELD_SQL in text.stdout:
            transcript = text.stdout
            js = _replay(stack, rec.session_id, "json")
            assert js.returncode == 0, js.stderr
            records = json.loads(js.stdout)["records"]
            break
        time.sleep(1)
    shows = {
        "the held statement": HELD_SQL in transcript,
        "the hold (request)": f"approval {rec.approval_id} requested" in transcript,
        "why it was held": rec.reason in transcript,
        "the approver and reason": f"approved by {APPROVER}: ticket FRAUD-8812" in transcript,
        "the requester": f"subject={sub}" in transcript,
    }
    missing = [k for k, v in shows.items() if not v]
    assert not missing, f"replay ({mode}) does not show: {missing}"
    no_pan(expected, transcript, f"replay ({mode})")

    # The wait: from the request to the approval, at least the time we let
    # pass between seeing the request pending and approving it.
    actions = {r["action"]: _ts(r["ts"]) for r in records
               if r.get("type") == "approval" and r.get("approval_id") == rec.approval_id}
    assert {"requested", "approved"} <= set(actions), f"approval records: {sorted(actions)}"
    waited = (actions["approved"] - actions["requested"]).total_seconds()
    assert waited >= WAIT_BEFORE_APPROVING, (
        f"replay ({mode}): the recorded wait {waited:.1f}s is shorter than the hold we saw")
