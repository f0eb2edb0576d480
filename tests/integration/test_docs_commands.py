"""Every command the documentation quotes is run here, or is on a short,
checked allow-list (issue 9: "the docs cannot rot").

``docs_commands.py`` finds the commands in README.md and docs/*.md (fenced
``sh``/``bash``/``console`` blocks, unmarked blocks whose lines start with a
known program, inline code spans such as `` `pgwarden audit verify` ``).
Each one is then

- **run** against the real stack of the ``stack`` fixture (the governed
  gateway with tokens, policy, masking, approvals and audit), in a sandbox
  directory that looks like the repository after ``make up``: ``.venv``,
  ``.cache``, ``rego`` link to the repository, ``.run`` is the stack's state
  directory (with the ``env`` and ``pids.json`` that ``pgwarden up`` writes),
  and the environment is what ``source .run/env`` gives. Placeholders
  (``SESSION_ID``, ``ap_6n2kq4xw7m3d``, ``FILE``...) become real values; usage
  synopses (``[--format text|json]``) are expanded so every option and every
  alternative runs at least once. Each run asserts its exit code and what the
  output must show. Commands that change state (``audit prune``, ``token
  rotate``, ``opa fmt --write``...) run on copies; or
- **allow-listed** (:data:`ALLOW`): commands that cannot run here (Kubernetes,
  a benchmark of minutes, ``make down`` which would stop the shared stack),
  each naming where it is covered; the entries are checked (``make -n``, the
  named files and tests exist); or
- a **mention**: an inline span that only names a command another quote gives
  in full (`` `pgwarden replay` `` next to ``pgwarden replay SESSION_ID``).

The suite fails when the docs quote a command that is none of these, when a
quoted ``pgwarden`` subcommand or option does not exist (checked against the
command tree and ``pgwarden <sub> --help``), and when a run misbehaves.

Runs are independent and execute on a small thread pool (``DOCS_WORKERS``,
default 3) as soon as the module starts; each test waits for its own run.
Nothing printed or asserted on carries a raw PAN, a token or a password:
outputs pass :meth:`Ctx.safe` before they reach a message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import psycopg
import pytest
import yaml
from agent import agent_dsn, mint, policyd_target
from docs_commands import (
    ROOT,
    DocCommand,
    doc_files,
    extract_all,
    extract_file,
    family,
    mentions,
    normalize_program,
    option_spans,
    pgwarden_invocations,
    resolve,
    split_words,
    variants,
)
from psycopg.conninfo import conninfo_to_dict

from maskd.detect import find_pans, scrub
from pgwarden import stack as st
from pgwarden.stack import LocalStack
from policyd.approvals.client import RemoteApprovals
from policyd.approvals.store import ApprovalError

pytestmark = pytest.mark.integration

HELD_SQL = "SELECT * FROM payments WHERE amount > 10000"
READERS = ["fraud-readers"]
DEV_ISSUER = "https://dev-issuer.pgwarden.invalid"
APPROVER = "bob"  # as docs/approvals.md mints the approver
WORKERS = int(os.environ.get("DOCS_WORKERS", "3"))
RUN_TIMEOUT = 240.0
# What an interactive psql session quoted in the docs is given to type.
PSQL_INPUT = "SELECT card_number FROM payments ORDER BY id LIMIT 3;\nDROP DATABASE shop;\n"
JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")
MASKED_CARD = re.compile(r"X{6,}\d{4}")


# --------------------------------------------------------------------------- what the docs quote

COMMANDS: list[DocCommand] = extract_all()
MENTIONS: dict[DocCommand, str] = mentions(COMMANDS)

# Placeholders in quoted commands → ⟨name⟩ tokens, filled in at run time.
# Keys are families (a trailing " *" matches every subcommand).
SESSION_WORDS = ("SESSION_ID", "ID", "<session-id>", "<session>", "<id>")
PLACEHOLDERS: dict[str, list[tuple[str, str]]] = {
    "pgwarden replay": [(w, "⟨session⟩") for w in SESSION_WORDS],
    "pgwarden sessions list": [("SUBJECT", "⟨subject⟩"), ("<subject>", "⟨subject⟩"),
                               ("GROUP", "⟨group⟩")],
    "pgwarden audit export": [("FILE", "⟨out⟩")],
    "pgwarden audit verify": [("KEY_OR_PUB", "⟨pub⟩"), ("FILE", "⟨checkpoints⟩")],
    "pgwarden audit ship": [("PATH", "⟨spool⟩"), ("URL", "⟨store⟩"), ("HOST:PORT", "⟨policyd⟩")],
    "pgwarden audit init": [("URL", "⟨new_store⟩")],
    "pgwarden approvals *": [("ap_6n2kq4xw7m3d", "⟨approval⟩"), ("<id>", "⟨approval⟩"),
                             ("TEXT", "⟨reason⟩")],
    "pgwarden token mint": [("DIR", "⟨keys⟩")],
    "pgwarden maskd serve": [("KEY", "⟨mask_key⟩")],
    "pgwarden doctor": [("FILE", "⟨doctor_config⟩")],
    # the production example: `examples/pgwarden.yaml` is what the page says to start from
    "pgwarden config check": [("/etc/pgwarden/pgwarden.yaml", "examples/pgwarden.yaml")],
    "pgwarden console serve": [
        ("postgresql://pgwarden@audit-db/pgwarden", "⟨store⟩"),
        ("/etc/pgwarden/pgwarden.yaml", "⟨config⟩"),
        ("/etc/pgwarden/audit-signing.pub", "⟨pub⟩"),
        ("/var/lib/pgwarden/audit-checkpoints.jsonl", "⟨checkpoints⟩"),
    ],
    "pgwarden token verify": [("https://.../certs", "⟨jwks_url⟩"), ("https://...", "⟨issuer⟩")],
    "pgwarden policyd input": [('"SELECT …"', "⟨sql⟩")],
    "psql": [("host=gateway.example", "host=⟨agent_host⟩"), ("port=6432", "port=⟨agent_port⟩"),
             ("sslrootcert=ca.pem", "sslrootcert=⟨ca⟩")],
}
TOKEN = re.compile(r"⟨(\w+)⟩")
LEFTOVER = re.compile(r"^(?:[A-Z][A-Z_:]+|<[^>]+>|\.\.\.)$|…|https://\.\.\.")


def templatize(fam: str, text: str) -> str:
    rules = list(PLACEHOLDERS.get(fam, ()))
    rules += [r for key, rs in PLACEHOLDERS.items()
              if key.endswith(" *") and fam.startswith(key[:-1]) for r in rs]
    for word, token in rules:
        text = re.sub(r"(?<![\w./-])" + re.escape(word) + r"(?![\w./-])", token, text)
    return text


def leftovers(template: str) -> list[str]:
    """Words that still look like placeholders (nothing to run them with)."""
    return [w for w in split_words(template) if LEFTOVER.search(w) and "$" not in w]


@dataclass(frozen=True)
class Case:
    """One distinct command line to run (a quote, or one form of a synopsis)."""

    family: str
    template: str
    prelude: tuple[str, ...]
    where: tuple[str, ...]

    @property
    def bare(self) -> bool:
        """The block sets its environment up itself (``source .run/env``)."""
        return any(split_words(p)[:1] in (["source"], ["."]) for p in self.prelude) or \
            split_words(self.template)[:1] in (["source"], ["."])

    @property
    def id(self) -> str:
        text = f"{self.where[0]} {self.template}"
        return text if len(text) <= 140 else text[:137] + "..."


# --------------------------------------------------------------------------- allow-list


@dataclass(frozen=True)
class Allowed:
    """A quoted command this test does not run, and where it is covered."""

    why: str
    covered_by: tuple[str, ...]  # files, or "file::test_function"; each must exist
    make_recipe: str = ""  # for a make target: what `make -n TARGET` must print


K8S = Allowed("needs a Kubernetes cluster; the manifests are schema-validated by "
              "tests/unit/test_deploy.py", ("deploy/k8s/base/kustomization.yaml",
                                           "tests/unit/test_deploy.py"))
ALLOW: dict[str, Allowed] = {
    "make test": Allowed("what CI runs; this test is part of it", ("Makefile",),
                         make_recipe="pytest"),
    "make setup": Allowed("installs the toolchain (scripts/bootstrap.sh); `make test` in CI "
                          "runs it first", ("scripts/bootstrap.sh",),
                          make_recipe="scripts/bootstrap.sh"),
    "make down": Allowed("it stops the stack recorded in .run: here that is the shared test "
                         "stack; `pgwarden down` is covered by test_stack.py",
                         ("tests/integration/test_stack.py::"
                          "test_up_is_idempotent_and_down_stops_everything",),
                         make_recipe="pgwarden down"),
    "make bench": Allowed("a measurement taking minutes; figures in bench/RESULTS.md",
                          ("bench/run.py", "bench/RESULTS.md"), make_recipe="bench/run.py"),
    "make proto": Allowed("regenerates pgwarden/_proto from proto/ (a developer step)",
                          ("scripts/gen_proto.py",), make_recipe="scripts/gen_proto.py"),
    "pgbench": Allowed("the measured figures: `make bench` (bench/run.py) runs pgbench -S "
                       "-c 8 and -c 1; pgbench through the gateway is tested by test_pgbench.py",
                       ("bench/run.py", "tests/integration/test_pgbench.py")),
    "pytest": Allowed("runs test modules; `make test` (CI) runs every module under tests/; "
                      "the named modules are checked to exist", ()),
    "python bench/maskd_bench.py": Allowed("a benchmark; `make bench` records its figure",
                                           ("bench/maskd_bench.py",)),
    "python bench/cpu_per_txn.py": Allowed("a measurement taking minutes; its figures are "
                                           "quoted in bench/RESULTS.md",
                                           ("bench/cpu_per_txn.py", "bench/RESULTS.md")),
    "python bench/slow_client_memory.py": Allowed("a measurement taking minutes; its figures "
                                                  "are quoted in bench/RESULTS.md",
                                                  ("bench/slow_client_memory.py",
                                                   "bench/RESULTS.md")),
    "python bench/floors.py": Allowed("a measurement taking minutes (two stacks per round); "
                                      "its figures are quoted in bench/RESULTS.md",
                                      ("bench/floors.py", "bench/echo_tap.py",
                                       "bench/RESULTS.md")),
    "python bench/latency_floor.py": Allowed("a measurement taking minutes (one client "
                                             "against five targets); its figures are quoted "
                                             "in bench/RESULTS.md",
                                             ("bench/latency_floor.py", "bench/echo_tap.py",
                                              "bench/RESULTS.md")),
    "python bench/policy_bench.py": Allowed("a measurement starting OPA and policyd; "
                                            "`make bench` does not run it, its figures are "
                                            "bench/RESULTS.md's \"Policy decisions\"",
                                            ("bench/policy_bench.py", "bench/RESULTS.md")),
    "kubectl rollout": K8S,
    "kubectl exec": K8S,
}


# --------------------------------------------------------------------------- shell runs


class Raw(str):
    """Command output, a token, a page: shown only through :meth:`Ctx.safe`
    (pytest prints the repr of values in a failed assertion)."""

    def __repr__(self) -> str:
        return f"<{len(self)} characters>"


def secret(value: str) -> Raw:
    return Raw(value)


@dataclass
class Done:
    rc: int
    out: Raw
    err: Raw


@dataclass
class DocsSession:
    """One agent session with an allowed, a denied and a held (approved)
    statement: what the evidence commands are run against."""

    session_id: str
    subject: str


@dataclass(repr=False)
class Ctx:
    stack: LocalStack
    sandbox: Path
    tmp: Path
    base_env: dict[str, str]
    docs_env: dict[str, str]
    values: dict[str, str]
    session: DocsSession
    pans: frozenset[str]
    secrets: tuple[str, ...]
    approver_token: Raw = field(default=Raw(""))

    def __repr__(self) -> str:
        return f"Ctx({self.sandbox})"

    # -- output that may be shown
    def safe(self, text: str) -> str:
        text = JWT.sub("<token>", text)
        for secret in self.secrets:
            text = text.replace(secret, "<secret>")
        text = scrub(text)
        return text if len(text) < 4000 else text[:1500] + "\n[...]\n" + text[-2000:]

    def show(self, done: Done) -> str:
        return self.safe(f"exit {done.rc}\n--- stdout\n{done.out}\n--- stderr\n{done.err}")

    def no_pan(self, text: str, what: str) -> None:
        # hashes and ids are long hex runs: their digit groups are no card numbers
        ids = re.sub(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}|[0-9a-f]{16,}", "<id>", text)
        spans = len(find_pans(ids))
        seeded = sum(1 for p in self.pans if p in text)
        assert spans == 0 and seeded == 0, \
            f"{what}: {spans} PAN-like digit run(s), {seeded} seeded card number(s) in the output"

    # -- command lines
    def fill(self, template: str, **extra: str) -> str:
        values = {**self.values, **extra}

        def one(m: re.Match[str]) -> str:
            name = m.group(1)
            assert name in values, f"no value for the placeholder ⟨{name}⟩ in {template!r}"
            value = values[name]
            return value if re.fullmatch(r"[\w@%+=:,./-]+", value) else shlex.quote(value)

        text = TOKEN.sub(one, template)
        left = leftovers(text)
        assert not left, f"placeholders left in {text!r}: {left}"
        return text

    def env(self, case: Case, **extra: str) -> dict[str, str]:
        env = dict(self.base_env if case.bare else self.docs_env)
        env.update(extra)
        return env

    def script(self, case: Case, command: str, *, pre: str = "", **extra: str) -> str:
        lines = ["set -o pipefail"]
        if pre:
            lines.append(pre)
        if case.prelude:
            lines += ["set -e", *(self.fill(p, **extra) for p in case.prelude), "set +e"]
        lines.append(command)
        return "\n".join(lines) + "\n"

    def sh(self, case: Case, command: str | None = None, *, cwd: Path | None = None,
           env: dict[str, str] | None = None, stdin: str | None = None, pre: str = "",
           timeout: float = RUN_TIMEOUT, **extra: str) -> Done:
        text = command if command is not None else self.fill(case.template, **extra)
        proc = subprocess.run(["bash", "-c", self.script(case, text, pre=pre, **extra)],
                              cwd=cwd or self.sandbox, env=env or self.env(case), input=stdin,
                              capture_output=True, text=True, timeout=timeout, check=False)
        return Done(proc.returncode, Raw(proc.stdout), Raw(proc.stderr))

    # -- scratch copies for commands that change what they touch
    def scratch(self, *, identity: bool = True, store: bool = True,
                rego: bool = False) -> tuple[Path, dict[str, str]]:
        root = Path(tempfile.mkdtemp(prefix="scratch-", dir=self.tmp))
        for name in (".venv", ".cache", "examples"):
            (root / name).symlink_to(ROOT / name)
        if rego:
            shutil.copytree(ROOT / "rego", root / "rego")
        else:
            (root / "rego").symlink_to(ROOT / "rego")
        run = root / ".run"
        run.mkdir()
        live = self.stack.workdir
        if identity:
            shutil.copytree(live / "identity", run / "identity")
        env = dict(self.docs_env)
        if store:
            # checkpoints first: the copied store then holds every record they sign
            ckpt = Path(self.docs_env["PGWARDEN_AUDIT_CHECKPOINTS"])
            if ckpt.exists():
                shutil.copy2(ckpt, run / "audit-checkpoints.jsonl")
            src = sqlite3.connect(audit_db(self.stack), timeout=30)
            dst = sqlite3.connect(run / "audit.db")
            with contextlib.closing(src), contextlib.closing(dst):
                src.backup(dst)
        env.update(PGWARDEN_AUDIT_URL=f"sqlite:///{run / 'audit.db'}",
                   PGWARDEN_AUDIT_KEY=str(run / "identity" / "audit-signing.key"),
                   PGWARDEN_AUDIT_CHECKPOINTS=str(run / "audit-checkpoints.jsonl"),
                   PGWARDEN_IDENTITY_DIR=str(run / "identity"))
        (run / "env").write_text("".join(f"export {k}={shlex.quote(v)}\n"
                                         for k, v in sorted(env.items())
                                         if k.startswith("PGWARDEN_")))
        return root, env


def audit_db(stack: LocalStack) -> Path:
    url = stack.extra_env["PGWARDEN_AUDIT_URL"]
    assert url.startswith("sqlite:///"), url
    return Path(url[len("sqlite:///"):])


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as c:
        return c.execute(sql, params).fetchall()


def free_port() -> int:
    return st.free_port()


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def words_after(template: str, option: str) -> str | None:
    words = split_words(template)
    for i, w in enumerate(words[:-1]):
        if w == option:
            return words[i + 1]
    return None


# --------------------------------------------------------------------------- approvals


def _remote(ctx: Ctx, call: Callable[[RemoteApprovals], Any]) -> Any:
    async def main() -> Any:
        async with RemoteApprovals(policyd_target(ctx.stack)) as remote:
            return await call(remote)

    return asyncio.run(main())


@dataclass
class Held:
    """A ``fraud-readers`` agent waiting in HELD_SQL for an approver."""

    sub: str
    approval_id: str = ""
    cards: list[str] = field(default_factory=list, repr=False)
    sqlstate: str = ""
    finished: threading.Event = field(default_factory=threading.Event)


def wait_pending(ctx: Ctx, sub: str, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = _remote(ctx, lambda r: r.list(ctx.approver_token, "pending", 1000))
        mine = [rec.approval_id for rec in records if rec.subject == sub]
        if mine:
            return str(mine[0])
        time.sleep(0.3)
    raise AssertionError(f"no pending approval request for {sub} after {timeout:.0f}s")


@contextlib.contextmanager
def held_request(ctx: Ctx) -> Iterator[Held]:
    held = Held(f"docs-held-{uuid.uuid4().hex[:8]}")
    conn = psycopg.connect(agent_dsn(ctx.stack, "inline"), autocommit=True, connect_timeout=30,
                           password=secret(mint(ctx.stack, held.sub, READERS)))

    def run() -> None:
        try:
            with conn.cursor() as cur:
                cur.execute(HELD_SQL)
                names = [d.name for d in cur.description or ()]
                held.cards = [str(r[names.index("card_number")]) for r in cur.fetchall()]
        except psycopg.Error as exc:
            held.sqlstate = exc.sqlstate or "?"
        finally:
            held.finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        held.approval_id = wait_pending(ctx, held.sub)
        yield held
    finally:
        if held.approval_id and not held.finished.is_set():
            with contextlib.suppress(ApprovalError):
                _remote(ctx, lambda r: r.decide(ctx.approver_token, held.approval_id, False,
                                                "docs test clean-up"))
        thread.join(60)
        conn.close()


# --------------------------------------------------------------------------- daemons


@contextlib.contextmanager
def daemon(ctx: Ctx, case: Case, command: str, *, port: int | None, env: dict[str, str],
           cwd: Path | None = None, **extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """Start a quoted server command; wait until it listens on ``port``."""
    log = ctx.tmp / f"daemon-{uuid.uuid4().hex[:8]}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", "-c", ctx.script(case, "exec " + command, **extra)],
                                cwd=cwd or ctx.sandbox, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while port is not None and not port_open(port):
            assert proc.poll() is None, \
                f"`{command}` exited {proc.returncode}:\n{ctx.safe(log.read_text())}"
            assert time.monotonic() < deadline, f"`{command}` does not listen on {port}"
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def listen_on(command: str, port: int) -> str:
    if re.search(r"--listen\s+\S+", command):
        return re.sub(r"--listen\s+\S+", f"--listen 127.0.0.1:{port}", command)
    return f"{command} --listen 127.0.0.1:{port}"


def grpc_serving(target: str, timeout: float = 60.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    status = "no answer"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if status == "SERVING":
                    return
            except grpc.RpcError as exc:
                status = str(exc.code())
            time.sleep(0.5)
    raise AssertionError(f"{target}: gRPC health {status}, not SERVING")


# --------------------------------------------------------------------------- runners
# One per family of command; each runs the quoted command line and asserts
# what the documentation says it does.


def run_setup(ctx: Ctx, case: Case) -> None:
    line = ctx.fill(case.template)
    words = split_words(re.sub(r"\$\([^()]*\)", "X", line))
    if words[0] in ("source", "."):
        names = ["PGWARDEN_AGENT_DSN", "PGWARDEN_AGENT_EXTPROC_DSN", "PGWARDEN_IDENTITY_DIR",
                 "PGWARDEN_POLICYD", "PGWARDEN_AUDIT_URL"]
    else:
        names = [w.split("=", 1)[0] for w in words if "=" in w]
    checks = [f'[ -n "${{{n}:-}}" ] || {{ echo "{n} is not set" >&2; exit 1; }}' for n in names]
    if "token mint" in line:  # the value is a token: check its shape, never print it
        checks += [f'[[ "${n}" =~ ^eyJ[^.]+\\.[^.]+\\.[^.]+$ ]] || {{ echo "{n} is no JWT" >&2; '
                   f"exit 1; }}" for n in names]
    done = ctx.sh(case, line + "\n" + "\n".join(checks))
    assert done.rc == 0, ctx.show(done)


def run_psql(ctx: Ctx, case: Case) -> None:
    done = ctx.sh(case, stdin=PSQL_INPUT)
    assert done.rc == 0, ctx.show(done)
    masked = MASKED_CARD.findall(done.out)
    assert len(masked) == 3, f"3 masked card numbers expected:\n{ctx.show(done)}"
    assert "refused by policy" in done.err, f"DROP DATABASE should be refused:\n{ctx.show(done)}"
    ctx.no_pan(done.out + done.err, case.template)


def run_sessions_list(ctx: Ctx, case: Case) -> None:
    done = ctx.sh(case)
    assert done.rc == 0, ctx.show(done)
    text = ctx.fill(case.template)
    group = words_after(text, "--group")
    sub = words_after(text, "--sub")
    expected = group in (None, "fraud-readers") and sub in (None, ctx.session.subject)
    sid = ctx.session.session_id
    if words_after(text, "--format") == "json":
        listed = {row["session_id"] for row in json.loads(done.out)}
    else:
        assert done.out.startswith(("STARTED", "no sessions")), ctx.show(done)
        listed = {w for line in done.out.splitlines()[1:] for w in line.split()}
    shown = sid in listed
    assert shown == expected, \
        f"docs session {sid} {'missing from' if expected else 'wrongly in'}:\n{ctx.show(done)}"


def run_replay(ctx: Ctx, case: Case) -> None:
    done = ctx.sh(case)
    assert done.rc == 0, ctx.show(done)
    ctx.no_pan(done.out, case.template)
    sid = ctx.session.session_id
    if words_after(ctx.fill(case.template), "--format") == "json":
        doc = json.loads(done.out)
        assert doc["session_id"] == sid
        types = {r["type"] for r in doc["records"]}
        assert {"session_start", "statement", "approval", "session_end"} <= types, types
        verdicts = {r.get("verdict") for r in doc["records"] if r["type"] == "statement"}
        assert {"allow", "deny"} <= verdicts, verdicts
    else:
        for expected in (f"Session {sid}", f"subject={ctx.session.subject}", "DENY",
                         "requested: ", f"approved by {APPROVER}: ", "session ended"):
            assert expected in done.out, f"{expected!r} not in the replay:\n{ctx.show(done)}"


SCHEMA = json.loads((ROOT / "docs" / "audit-export-schema.json").read_text())


def run_audit_export(ctx: Ctx, case: Case) -> None:
    out_file = ctx.tmp / f"export-{uuid.uuid4().hex[:8]}.jsonl"
    done = ctx.sh(case, out=str(out_file))
    assert done.rc == 0, ctx.show(done)
    text = Raw(out_file.read_text()) if "⟨out⟩" in case.template else done.out
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, f"nothing exported:\n{ctx.show(done)}"
    grep = re.search(r"grep '\"(\w+)\"'", case.template)
    if grep:
        assert all(rec["type"] == grep.group(1) for rec in lines), \
            f"`{case.template}` printed other record types"
        return
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for rec in [*lines[:200], *lines[-200:]]:
        errors = [e.message for e in validator.iter_errors(rec)]
        assert not errors, ctx.safe(f"{rec.get('type')} line does not fit the schema: "
                                    f"{errors[:3]}")
    sessions = {rec["session_id"] for rec in lines}
    assert ctx.session.session_id in sessions, "the docs session is not in the export"
    ctx.no_pan(text, case.template)


def run_audit_verify(ctx: Ctx, case: Case, env: dict[str, str] | None = None,
                     cwd: Path | None = None) -> None:
    done = ctx.sh(case, env=env, cwd=cwd)
    assert done.rc == 0, ctx.show(done)
    if words_after(ctx.fill(case.template), "--format") == "json":
        doc = json.loads(done.out)
        assert doc["ok"] is True and doc["problems"] == [] and doc["records"] > 0, doc
    else:
        assert done.out.startswith("OK: "), ctx.show(done)


def run_audit_prune(ctx: Ctx, case: Case) -> None:
    root, env = ctx.scratch()  # never the shared store
    done = ctx.sh(case, cwd=root, env=env)
    assert done.rc == 0, ctx.show(done)
    assert "pruned" in done.out, ctx.show(done)
    after = ctx.sh(case, "pgwarden audit verify", cwd=root, env=env)
    assert after.rc == 0 and after.out.startswith("OK: "), \
        f"the pruned copy must still verify:\n{ctx.show(after)}"


def run_audit_init(ctx: Ctx, case: Case) -> None:
    root, env = ctx.scratch(store=False)
    db = root / "fresh" / "audit.db"
    db.parent.mkdir()
    done = ctx.sh(case, cwd=root, env=env, new_store=f"sqlite:///{db}")
    assert done.rc == 0, ctx.show(done)
    tables = {r[0] for r in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"audit_statements", "audit_sessions", "audit_evidence_access"} <= tables, tables


def run_audit_ship(ctx: Ctx, case: Case) -> None:
    from policyd.audit.events import GatewayEvent
    from policyd.audit.writer import AuditWriter

    root, env = ctx.scratch()
    spool = root / "spool" / "audit-spool.jsonl"
    spool.parent.mkdir()
    event = GatewayEvent(action="start", component="docs-test", instance=uuid.uuid4().hex)
    producer = AuditWriter(env["PGWARDEN_AUDIT_URL"], spool, ship=False,
                           signing_key=env["PGWARDEN_AUDIT_KEY"],
                           checkpoint_file=env["PGWARDEN_AUDIT_CHECKPOINTS"])
    producer.start()
    try:
        assert producer.submit([event])
    finally:
        producer.close()
    to_policyd = "--policyd" in case.template
    target = audit_db(ctx.stack) if to_policyd else root / ".run" / "audit.db"
    command = ctx.fill(case.template, spool=str(spool), store=env["PGWARDEN_AUDIT_URL"])
    with daemon(ctx, case, command, port=None, env=env, cwd=root) as proc:
        deadline = time.monotonic() + 60
        sql = "SELECT count(*) FROM audit_gateway_events WHERE event_id = ?"
        while query(target, sql, (event.event_id,))[0][0] == 0:
            assert proc.poll() is None, f"`{command}` exited {proc.returncode}"
            assert time.monotonic() < deadline, f"`{command}` did not store the spooled event"
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, f"`{command}` should stop cleanly on SIGTERM"
    assert query(target, sql, (event.event_id,))[0][0] == 1, "stored exactly once"


def run_approvals(ctx: Ctx, case: Case) -> None:
    sub = case.family.split()[-1]
    extra = {} if any("PGWARDEN_TOKEN" in p for p in case.prelude) else \
        {"PGWARDEN_TOKEN": ctx.approver_token}
    with held_request(ctx) as held:
        done = ctx.sh(case, env=ctx.env(case, **extra), approval=held.approval_id,
                      reason="docs test")
        assert done.rc == 0, ctx.show(done)
        ctx.no_pan(done.out, case.template)
        as_json = "--json" in split_words(case.template)
        if sub == "list":
            if as_json:
                ids = {a["approval_id"]: a["status"] for a in json.loads(done.out)["approvals"]}
                assert ids.get(held.approval_id) == "pending", ctx.show(done)
            else:
                assert held.approval_id in done.out, ctx.show(done)
        elif sub == "show":
            if as_json:
                rec = json.loads(done.out)
                assert rec["approval_id"] == held.approval_id and rec["statement"] == HELD_SQL
            else:
                assert held.approval_id in done.out and HELD_SQL in done.out, ctx.show(done)
        elif sub == "approve":
            assert held.finished.wait(60), "the approved statement did not finish"
            assert not held.sqlstate, f"approved statement failed with {held.sqlstate}"
            assert held.cards and all(MASKED_CARD.fullmatch(c) for c in held.cards), \
                f"{len(held.cards)} rows, not all card numbers masked"
        elif sub == "deny":
            assert held.finished.wait(60), "the denied statement did not end"
            assert held.sqlstate == "PW001", held.sqlstate
        else:
            raise AssertionError(f"no expectations for `pgwarden approvals {sub}`")


def run_approvals_http(ctx: Ctx, case: Case) -> None:
    port = free_port()
    command = listen_on(ctx.fill(case.template), port)
    with daemon(ctx, case, command, port=port, env=ctx.env(case)):
        base = f"http://127.0.0.1:{port}"
        anonymous = httpx.get(f"{base}/approvals", timeout=30)
        assert anonymous.status_code == 401, anonymous.status_code
        assert anonymous.headers.get("www-authenticate", "").startswith("Bearer")
        listed = httpx.get(f"{base}/approvals", timeout=30,
                           headers={"Authorization": f"Bearer {ctx.approver_token}"})
        assert listed.status_code == 200 and "approvals" in listed.json(), listed.status_code


def run_console(ctx: Ctx, case: Case) -> None:
    port = free_port()
    command = listen_on(ctx.fill(case.template), port)
    with daemon(ctx, case, command, port=port, env=ctx.env(case)), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        token = secret(mint(ctx.stack, "alice", ["auditors"], kind="human"))  # as the page does
        signed = client.post("/signin", data={"token": token, "next": "/sessions"})
        assert signed.status_code == 303, f"sign-in answered {signed.status_code}"
        page = client.get(f"/sessions/{ctx.session.session_id}")
        assert page.status_code == 200, page.status_code
        html = Raw(page.text)
        assert ctx.session.subject in html, "the replay page does not show the session"
        ctx.no_pan(html, "console replay page")


def run_maskd(ctx: Ctx, case: Case) -> None:
    key = ctx.tmp / f"mask-{uuid.uuid4().hex[:6]}.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(32).hex())
    port = free_port()
    command = listen_on(ctx.fill(case.template, mask_key=str(key)), port)
    with daemon(ctx, case, command, port=port, env=ctx.env(case)):
        grpc_serving(f"127.0.0.1:{port}")


def run_policyd_serve(ctx: Ctx, case: Case) -> None:
    """The mention names the daemon; its defaults are production addresses, so
    it is pointed at this stack's OPA and the pack in rego/."""
    port = free_port()
    command = listen_on(ctx.fill(case.template), port)
    command += ' --opa-url "$PGWARDEN_OPA_URL" --policy-dir rego'
    with daemon(ctx, case, command, port=port, env=ctx.env(case)):
        grpc_serving(f"127.0.0.1:{port}")


def run_tap_process(ctx: Ctx, case: Case) -> None:
    """`pgwarden tap extproc` is what the stack fixture runs for every
    integration test (pgwarden.stack.start_tap): find that live process."""
    wanted = split_words(normalize_program(case.template))[1:]
    found = []
    for name, proc in ctx.stack.procs.items():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
            names = [Path(a).name for a in argv]
            if "pgwarden" in names and argv[names.index("pgwarden") + 1:][:len(wanted)] == wanted:
                found.append(name)
                port = int(argv[argv.index("--listen") + 1].rsplit(":", 1)[1])
                assert proc.alive() and port_open(port), f"{name} is not serving"
    assert found, f"no process of the stack runs `{case.template}`"


def run_policyd_input(ctx: Ctx, case: Case) -> None:
    done = ctx.sh(case)
    assert done.rc == 0, ctx.show(done)
    doc = json.loads(done.out)
    assert doc["identity"]["groups"] == READERS
    assert doc["session"]["upstream_role"] == "fraud_reader"
    assert [s["command"] for s in doc["analysis"]["statements"]] == ["select"]
    spent = re.search(r"--card-lookups (\d+)", case.template)
    assert doc["history"]["card_lookups"] == (int(spent.group(1)) if spent else 0)


def run_opa_eval(ctx: Ctx, case: Case) -> None:
    """The docs: pipe `pgwarden policyd input ...` into this command."""
    feed = ctx.fill('pgwarden policyd input ⟨sql⟩ -g fraud-readers --role fraud_reader | ')
    done = ctx.sh(case, feed + ctx.fill(case.template))
    assert done.rc == 0, ctx.show(done)
    decision = json.loads(done.out)["result"][0]["expressions"][0]["value"]
    assert decision["allow"] is True and decision["approval"]["required"] is True, decision


def run_opa(ctx: Ctx, case: Case) -> None:
    words = split_words(case.template)
    if "fmt" in words and "--write" in words:  # on a copy: the check is that nothing changes
        root, env = ctx.scratch(identity=False, store=False, rego=True)
        before = {p: p.read_bytes() for p in (root / "rego").rglob("*") if p.is_file()}
        done = ctx.sh(case, cwd=root, env=env)
        assert done.rc == 0, ctx.show(done)
        changed = [str(p.relative_to(root)) for p, data in before.items()
                   if p.read_bytes() != data]
        assert not changed, f"`opa fmt --write` rewrote {changed}: rego/ is not formatted"
        return
    done = ctx.sh(case)
    assert done.rc == 0, ctx.show(done)
    if "--coverage" in words:
        coverage = json.loads(done.out)["coverage"]
        assert coverage >= 90, f"coverage of rego/ is {coverage}%"
    elif "test" in words:
        assert "PASS" in done.out and "FAIL" not in done.out, ctx.show(done)


def run_events_schema(ctx: Ctx, case: Case) -> None:
    """Regenerating the schema (into a copy of docs/) gives the file as committed."""
    root, env = ctx.scratch(identity=False, store=False)
    (root / "docs").mkdir()
    done = ctx.sh(case, cwd=root, env=env)
    assert done.rc == 0, ctx.show(done)
    target = re.search(r">\s*(\S+)", case.template)
    text = (root / target.group(1)).read_text() if target else done.out
    assert json.loads(text) == SCHEMA, \
        f"`{case.template}` does not give docs/audit-export-schema.json"


def _claims(token: Raw) -> tuple[dict[str, Any], dict[str, Any]]:
    def part(text: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return data

    head, body, _sig = token.split(".")
    return part(head), part(body)


def jwks_kids(identity: Path) -> set[str]:
    return {k["kid"] for k in json.loads((identity / "jwks.json").read_text())["keys"]}


def run_token_mint(ctx: Ctx, case: Case) -> None:
    done = ctx.sh(case)
    assert done.rc == 0, ctx.show(done)
    lines = [Raw(line) for line in done.out.splitlines()]
    assert len(lines) == 1 and JWT.fullmatch(lines[0]), "mint must print one token, alone"
    header, claims = _claims(lines[0])
    text = ctx.fill(case.template)
    assert claims["sub"] == words_after(text, "--sub")
    assert claims["groups"] == (words_after(text, "--groups") or "").split(",")
    assert claims["kind"] == (words_after(text, "--kind") or "agent")
    if words_after(text, "--ttl"):
        assert claims["exp"] - claims["iat"] == int(words_after(text, "--ttl") or 0)
    if words_after(text, "--act"):
        assert claims["act"] == {"sub": words_after(text, "--act")}
    assert claims["iss"] == DEV_ISSUER and claims["aud"] in ("pgwarden", ["pgwarden"])
    assert header["kid"] in jwks_kids(ctx.stack.workdir / "identity"), \
        "signed with a key the stack's JWKS does not publish"


def run_token_rotate(ctx: Ctx, case: Case) -> None:
    root, env = ctx.scratch(store=False)
    identity = root / ".run" / "identity"
    before = jwks_kids(identity)
    done = ctx.sh(case, cwd=root, env=env)
    assert done.rc == 0, ctx.show(done)
    after = jwks_kids(identity)
    assert before < after and len(after) == len(before) + 1, \
        "rotate must add a key and keep the old one published"


def run_token_init(ctx: Ctx, case: Case) -> None:
    root, env = ctx.scratch(identity=False, store=False)
    done = ctx.sh(case, cwd=root, env=env)
    assert done.rc == 0, ctx.show(done)
    identity = root / ".run" / "identity"
    assert (identity / "jwks.json").is_file() and (identity / "issuer.json").is_file()
    assert identity.stat().st_mode & 0o777 == 0o700
    private = list((identity / "keys").iterdir())
    assert private and all(p.stat().st_mode & 0o777 == 0o600 for p in private)


class _Jwks(http.server.BaseHTTPRequestHandler):
    body = b""
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(200 if self.path == "/certs" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args: Any) -> None:
        pass


def run_token_verify(ctx: Ctx, case: Case) -> None:
    """Against a JWKS served over HTTPS (the stack's development keys, its
    certificate for localhost); the provider's token comes from the dev issuer."""
    handler = type("Jwks", (_Jwks,), {"body": (ctx.stack.workdir / "identity" /
                                               "jwks.json").read_bytes(), "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(ctx.stack.certs.server_cert, ctx.stack.certs.server_key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://localhost:{server.server_address[1]}/certs"
        pre = "get-a-token() { pgwarden token mint --sub ci-bot --groups fraud-readers; }"
        done = ctx.sh(case, env=ctx.env(case, SSL_CERT_FILE=str(ctx.stack.ca_file)), pre=pre,
                      jwks_url=url, issuer=DEV_ISSUER)
    finally:
        server.shutdown()
        server.server_close()
    assert done.rc == 0, ctx.show(done)
    identity = json.loads(done.out)
    assert identity["subject"] == "ci-bot" and identity["issuer"] == DEV_ISSUER, identity
    assert identity["kid"] in jwks_kids(ctx.stack.workdir / "identity")
    assert handler.hits >= 1, "the JWKS URL was not fetched"


def run_config_check(ctx: Ctx, case: Case) -> None:
    done = ctx.sh(case)
    assert done.rc == 0 and ": OK: " in done.out, ctx.show(done)


def run_doctor(ctx: Ctx, case: Case) -> None:
    done = ctx.sh(case, doctor_config=str(ctx.values["doctor_config"]))
    report = {}
    for line in done.out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("OK", "FAIL", "SKIP"):
            report[" ".join(parts[1:3]) if parts[1] == "tap" else parts[1]] = parts[0]
    expected = {"tap extproc": "OK", "policyd": "OK", "opa": "OK", "maskd": "SKIP",
                "audit": "OK", "upstream": "OK"}
    assert {k: report.get(k) for k in expected} == expected, ctx.show(done)
    # Envoy's admin address is no configuration setting (--envoy-admin, default
    # 127.0.0.1:9901): nothing of this stack listens there.
    assert done.rc == (0 if report.get("envoy") == "OK" else 1), ctx.show(done)


def run_version(ctx: Ctx, case: Case) -> None:
    done = ctx.sh(case)
    assert done.rc == 0, ctx.show(done)
    names = [line.split()[0] for line in done.out.splitlines() if line.strip()]
    assert names[:4] == ["pgwarden", "python", "envoy", "opa"], names
    assert re.search(r"^protocol\s+3\.0, 3\.2$", done.out, re.M), ctx.show(done)


def _guard_stack(ctx: Ctx) -> None:
    """`pgwarden up` on an unhealthy state directory stops what it records
    and starts afresh: only ever run it on the healthy shared stack."""
    state = st.read_state(ctx.stack.workdir)
    assert state is not None and st.healthy(state), \
        "the stack is not healthy: not running `pgwarden up` on its state"


def run_pgwarden_up(ctx: Ctx, case: Case) -> None:
    """Its default state directory is the repository's .run: pointed at the
    test stack's instead, it must find it running and print its DSNs."""
    _guard_stack(ctx)
    done = ctx.sh(case, ctx.fill(case.template) + " --workdir .run")
    assert done.rc == 0, ctx.show(done)
    assert "already running" in done.out and "PGWARDEN_GATEWAY_DSN=" in done.out, ctx.show(done)


def make_recipe(target: str) -> list[str]:
    proc = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert proc.returncode == 0, f"`make -n {target}`: {proc.stderr.strip()}"
    return [line for line in proc.stdout.splitlines()
            if line.strip() and not line.startswith(("make[", "make:"))]


def run_make(ctx: Ctx, case: Case) -> None:
    """What the target runs (``make -n``), minus the toolchain set-up that
    `make test` runs in CI, executed against the test stack (the state
    directory option pointed at it)."""
    target = case.family.split()[1]
    setup = set(make_recipe("setup"))
    lines = [line for line in make_recipe(target) if line not in setup]
    assert any("pgwarden up" in line for line in lines), lines
    lines = [line + " --workdir .run" if "pgwarden up" in line or "pgwarden.demo" in line
             else line for line in lines]
    _guard_stack(ctx)
    done = ctx.sh(case, " && ".join(lines), timeout=300)
    assert done.rc == 0, ctx.show(done)
    if target == "up":
        assert "already running" in done.out, ctx.show(done)
    if target == "demo":
        assert "The demo behaved as described." in done.out, ctx.show(done)
        ctx.no_pan(done.out, "make demo")


RUNNERS: dict[str, Callable[[Ctx, Case], None]] = {
    "setup": run_setup,
    "psql": run_psql,
    "make demo": run_make,
    "make up": run_make,
    "pgwarden up": run_pgwarden_up,
    "pgwarden sessions list": run_sessions_list,
    "pgwarden replay": run_replay,
    "pgwarden audit export": run_audit_export,
    "pgwarden audit verify": run_audit_verify,
    "pgwarden audit prune": run_audit_prune,
    "pgwarden audit init": run_audit_init,
    "pgwarden audit ship": run_audit_ship,
    "pgwarden approvals list": run_approvals,
    "pgwarden approvals show": run_approvals,
    "pgwarden approvals approve": run_approvals,
    "pgwarden approvals deny": run_approvals,
    "pgwarden approvals serve-http": run_approvals_http,
    "pgwarden console serve": run_console,
    "pgwarden maskd serve": run_maskd,
    "pgwarden policyd serve": run_policyd_serve,
    "pgwarden policyd input": run_policyd_input,
    "pgwarden tap extproc": run_tap_process,
    "pgwarden token mint": run_token_mint,
    "pgwarden token rotate": run_token_rotate,
    "pgwarden token init": run_token_init,
    "pgwarden token verify": run_token_verify,
    "pgwarden config check": run_config_check,
    "pgwarden doctor": run_doctor,
    "pgwarden version": run_version,
    "opa test": run_opa,
    "opa fmt": run_opa,
    "opa check": run_opa,
    "opa eval": run_opa_eval,
    "python -m policyd.audit.events": run_events_schema,
}


def uncovered(commands: list[DocCommand]) -> list[str]:
    """Quoted commands that are neither run, nor allow-listed, nor a mention."""
    found = mentions(commands)
    return [f"{cmd}   [{family(cmd.text) or '?'}]" for cmd in commands
            if cmd not in found and family(cmd.text) not in RUNNERS
            and family(cmd.text) not in ALLOW]


def needed(prelude: tuple[str, ...], command: str) -> tuple[str, ...]:
    """The set-up lines a command depends on: ``source`` and ``export`` lines
    (they reach child processes unseen), and ``VAR=...`` lines whose variable
    it (or a kept line) uses. Saves minting tokens nobody reads."""
    kept: list[str] = []
    uses = command
    for line in reversed(prelude):
        words = split_words(re.sub(r"\$\([^()]*\)", "X", line))
        names = [w.split("=", 1)[0] for w in words if "=" in w]
        if words[0] in ("source", ".", "export") or \
                any(re.search(rf"\${{?{n}\b", uses) for n in names):
            kept.insert(0, line)
            uses += "\n" + line
    return tuple(kept)


def build_cases(commands: list[DocCommand]) -> list[Case]:
    found = mentions(commands)
    cases: dict[tuple[str, tuple[str, ...]], Case] = {}
    for cmd in commands:
        fam = family(cmd.text)
        if cmd in found or fam not in RUNNERS:
            continue
        prelude = tuple(templatize(family(p), p) for p in needed(cmd.prelude, cmd.text))
        for form in variants(cmd.text):
            template = templatize(fam, form)
            # `source .run/env` gives what every other run gets anyway
            key = (normalize_program(template),
                   tuple(p for p in prelude if split_words(p)[:1] not in (["source"], ["."])))
            if key in cases:
                old = cases[key]
                cases[key] = Case(fam, old.template, prelude, (*old.where, cmd.where))
            else:
                cases[key] = Case(fam, template, prelude, (cmd.where,))
    return list(cases.values())


CASES = build_cases(COMMANDS)


# --------------------------------------------------------------------------- static checks


def test_the_docs_quote_commands_and_every_one_is_run_or_allow_listed() -> None:
    texts = {normalize_program(c.text) for c in COMMANDS}
    for known in ("make demo", "pgwarden audit verify", "pgwarden config check "
                  "/etc/pgwarden/pgwarden.yaml", "opa test rego/ -v"):
        assert known in texts, f"the extractor no longer finds `{known}` in the docs"
    missing = uncovered(COMMANDS)
    assert not missing, ("the docs quote commands no test runs; add a runner to RUNNERS "
                         "(or, if it cannot run here, an ALLOW entry naming where it is "
                         "covered):\n" + "\n".join(missing))
    left = [f"{c.where[0]}: {c.template} -> {leftovers(c.template)}" for c in CASES
            if leftovers(c.template)]
    assert not left, "placeholders with no value to run them with (PLACEHOLDERS):\n" + \
        "\n".join(left)


def test_an_unknown_command_in_the_docs_is_reported(tmp_path: Path) -> None:
    """The guard itself: a new command without a runner turns the suite red."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "Run `pgwarden frobnicate --now` or:\n\n```sh\n$ PGX=1 pgwarden audit verify \\\n"
        "    --since 2d   # comment\nmake release\n```\n\n```\nkubectl delete ns x\n"
        "not a command\n```\n")
    found = extract_file(tmp_path / "README.md", tmp_path)
    assert [c.text for c in found] == ["PGX=1 pgwarden audit verify --since 2d",
                                       "make release", "kubectl delete ns x",
                                       "pgwarden frobnicate --now"]
    missing = uncovered(found)
    assert [m.split(": ", 1)[1] for m in missing] == [
        "make release   [make release]", "kubectl delete ns x   [kubectl delete]",
        "pgwarden frobnicate --now   [pgwarden]"]
    assert resolve(["frobnicate", "--now"]).problems


def test_allow_listed_commands_are_what_they_claim() -> None:
    used = {family(c.text) for c in COMMANDS}
    stale = sorted(set(ALLOW) - used)
    assert not stale, f"ALLOW entries no quoted command needs any more: {stale}"
    for fam, allowed in ALLOW.items():
        for ref in allowed.covered_by:
            path, _, test = ref.partition("::")
            assert (ROOT / path).exists(), f"{fam}: {path} does not exist"
            if test:
                assert f"def {test}(" in (ROOT / path).read_text(), f"{fam}: no {ref}"
        if fam.startswith("make "):
            recipe = "\n".join(make_recipe(fam.split()[1]))
            assert allowed.make_recipe in recipe, \
                f"`make -n {fam.split()[1]}` no longer runs {allowed.make_recipe!r}"
    for cmd in COMMANDS:
        if family(cmd.text) == "pytest":
            paths = [w for w in split_words(cmd.text) if w.startswith("tests/")]
            assert paths, f"{cmd}: names no test module"
            for p in paths:
                assert (ROOT / p).is_file(), f"{cmd}: {p} does not exist"


@pytest.fixture(scope="module")
def help_texts(monkeypatch_module: pytest.MonkeyPatch) -> Callable[[tuple[str, ...]], str]:
    from typer.testing import CliRunner

    from pgwarden.cli import app

    monkeypatch_module.setenv("COLUMNS", "250")
    monkeypatch_module.setenv("TERMINAL_WIDTH", "250")
    monkeypatch_module.setenv("NO_COLOR", "1")
    cache: dict[tuple[str, ...], str] = {}

    def get(path: tuple[str, ...]) -> str:
        if path not in cache:
            result = CliRunner().invoke(app, [*path, "--help"])
            assert result.exit_code == 0, f"`pgwarden {' '.join(path)} --help` failed"
            cache[path] = result.output
        return cache[path]

    return get


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_quoted_pgwarden_subcommands_and_options_exist(
        help_texts: Callable[[tuple[str, ...]], str]) -> None:
    problems: list[str] = []
    checked = 0
    for cmd in COMMANDS:
        for form in variants(cmd.text):
            for args in pgwarden_invocations(form):
                resolved = resolve(args)
                problems += [f"{cmd.where}: {p}" for p in resolved.problems]
                text = help_texts(tuple(resolved.path))
                for word in resolved.rest:
                    name = word.split("=", 1)[0]
                    if name.startswith("-") and len(name) > 1 and not name[1].isdigit():
                        checked += 1
                        if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
                            problems.append(f"{cmd.where}: `pgwarden {' '.join(resolved.path)} "
                                            f"--help` does not list {name}")
    assert checked > 50, f"only {checked} quoted options found: is the extractor broken?"
    assert not problems, "\n".join(sorted(set(problems)))


# Options the prose quotes that belong to other programs, with the program.
FOREIGN_OPTIONS = {"--watch": ["opa", "run", "--help"], "--drain-time-s": ["envoy", "--help"]}


def test_options_quoted_in_prose_exist() -> None:
    """`` `--since` ``, `` `--envoy-admin` ``: each must be an option of a
    ``pgwarden`` command the same page quotes (or of the program named in
    FOREIGN_OPTIONS)."""
    by_file: dict[str, set[str]] = {}
    for cmd in COMMANDS:
        for form in variants(cmd.text):
            for args in pgwarden_invocations(form):
                command = resolve(args).command
                names = by_file.setdefault(cmd.path, set())
                for param in command.params:
                    names.update(param.opts)
    binaries = {"opa": st.opa_binary(), "envoy": st.envoy_binary()}
    problems = []
    for path in doc_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, opt in option_spans(path):
            if opt in by_file.get(rel, set()):
                continue
            if opt in FOREIGN_OPTIONS:
                prog, *args = FOREIGN_OPTIONS[opt]
                out = subprocess.run([binaries[prog], *args], capture_output=True, text=True,
                                     timeout=60, check=False)
                if opt in out.stdout + out.stderr:
                    continue
            problems.append(f"{rel}:{line}: {opt} is no option of any pgwarden command "
                            f"quoted on that page")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the stack side


def _seeded_pans(stack: LocalStack) -> frozenset[str]:
    with psycopg.connect(stack.upstream_dsn, dbname="shop") as admin:
        rows = admin.execute("SELECT card_number FROM payments UNION "
                             "SELECT card_number FROM customers").fetchall()
    return frozenset(str(r[0]) for r in rows)


def _docs_session(stack: LocalStack, approver_token: Raw) -> DocsSession:
    subject = f"docs-agent-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(agent_dsn(stack, "inline"), autocommit=True, connect_timeout=30,
                         password=secret(mint(stack, subject, READERS))) as conn:
        conn.execute("SELECT card_number FROM payments ORDER BY id LIMIT 2").fetchall()
        with pytest.raises(psycopg.Error):
            conn.execute("DROP DATABASE shop")
        result: list[int] = []
        thread = threading.Thread(
            target=lambda: result.append(len(conn.execute(HELD_SQL).fetchall())), daemon=True)
        thread.start()
        records: list[Any] = []
        deadline = time.monotonic() + 90
        while not records and time.monotonic() < deadline:
            time.sleep(0.3)
            records = [r for r in asyncio.run(_list_pending(stack, approver_token))
                       if r.subject == subject]
        assert records, "the held statement of the docs session never became a request"
        asyncio.run(_decide(stack, approver_token, records[0].approval_id))
        thread.join(60)
        assert result and result[0] > 0, "the approved statement returned nothing"
    db = audit_db(stack)
    deadline = time.monotonic() + 60
    while True:
        rows = query(db, "SELECT s.session_id FROM audit_sessions s JOIN audit_session_ends e "
                         "ON e.session_id = s.session_id WHERE s.subject = ?", (subject,))
        if rows:
            return DocsSession(str(rows[0][0]), subject)
        assert time.monotonic() < deadline, "the docs session's end was never recorded"
        time.sleep(0.3)


async def _list_pending(stack: LocalStack, token: Raw) -> list[Any]:
    async with RemoteApprovals(policyd_target(stack)) as remote:
        return list(await remote.list(token, "pending", 1000))


async def _decide(stack: LocalStack, token: Raw, approval_id: str) -> None:
    async with RemoteApprovals(policyd_target(stack)) as remote:
        await remote.decide(token, approval_id, True, "docs test: the evidence commands")


def _doctor_config(stack: LocalStack, path: Path) -> Path:
    """The stack's configuration with the addresses doctor reads from it: the
    governed ext_proc tap (its taps get their ports on the command line) and
    this stack's OPA."""
    config = yaml.safe_load(Path(stack.extra_env["PGWARDEN_CONFIG"]).read_text())
    config["tap"]["listen"] = f"127.0.0.1:{stack.procs['agent-tap-extproc'].ports['listen']}"
    config["policyd"]["opa_url"] = stack.extra_env["PGWARDEN_OPA_URL"]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def ctx(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    tmp = tmp_path_factory.mktemp("docs-commands")
    sandbox = tmp / "repo"
    sandbox.mkdir()
    for name in (".venv", ".cache", "rego", "examples", "Makefile"):
        (sandbox / name).symlink_to(ROOT / name)
    (sandbox / ".run").symlink_to(stack.workdir)
    (sandbox / "home").mkdir()
    # What `make up` leaves in .run: the env file to source, the state for
    # `pgwarden up` (idempotent) and the demo. Removed again afterwards.
    written = [p for p in (stack.workdir / "env", stack.workdir / "pids.json") if not p.exists()]
    st.write_state(stack)
    base_env = {
        "HOME": str(sandbox / "home"), "PATH": f"{sandbox}/.venv/bin:{sandbox}/.cache/bin:"
        "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": str(tmp),
        "PGWARDEN_OPERATOR": "docs-commands-test", "PGCONNECT_TIMEOUT": "30",
    }
    docs_env = {**base_env, **stack.env()}
    approver = secret(mint(stack, APPROVER, ["approvers"], kind="human"))
    session = _docs_session(stack, approver)
    agent = conninfo_to_dict(stack.extra_env["PGWARDEN_AGENT_DSN"])
    identity = stack.workdir / "identity"
    values = {
        "session": session.session_id, "subject": session.subject, "group": READERS[0],
        "pub": str(identity / "audit-signing.pub"), "keys": str(identity),
        "checkpoints": stack.extra_env["PGWARDEN_AUDIT_CHECKPOINTS"],
        "policyd": stack.extra_env["PGWARDEN_POLICYD"],
        "config": stack.extra_env["PGWARDEN_CONFIG"],
        "store": stack.extra_env["PGWARDEN_AUDIT_URL"], "ca": str(stack.ca_file),
        "agent_host": "localhost", "agent_port": str(agent["port"]), "sql": HELD_SQL,
        "doctor_config": str(_doctor_config(stack, tmp / "doctor.yaml")),
    }
    secrets = (*stack.passwords.values(), (identity / "mask.key").read_text().strip())
    try:
        yield Ctx(stack, sandbox, tmp, base_env, docs_env, values, session,
                  _seeded_pans(stack), secrets, approver)
    finally:
        for path in written:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def runs(ctx: Ctx, request: pytest.FixtureRequest) -> Iterator[dict[Case, Future[None]]]:
    """Every selected run, started at once on a small pool."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_quoted_command_runs"
                and hasattr(item, "callspec")]
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="docs")
    futures = {case: pool.submit(RUNNERS[case.family], ctx, case) for case in selected}
    try:
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_quoted_command_runs(case: Case, runs: dict[Case, Future[None]]) -> None:
    runs[case].result(timeout=900)
