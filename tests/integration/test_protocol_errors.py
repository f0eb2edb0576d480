"""Broken protocol through the gateway, with raw sockets.

A malformed message (length < 4, negative), an oversized one (beyond the
tap's maximum message size), garbage instead of a StartupMessage, and a
connection cut mid-message. Where the client can still hear an answer it gets
a FATAL ErrorResponse with SQLSTATE 08P01 (protocol_violation) and the
connection closes, and the tap records a ``protocol_error`` event in its
structured log; in every case the tap process stays alive, a session
opened in parallel keeps working, and PostgreSQL is left with no orphaned
backend.

The bytes are built here with struct, as the protocol documentation
describes them; only the SCRAM arithmetic comes from scramp.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from scramp import ScramClient

pytestmark = pytest.mark.integration

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
READ_TIMEOUT = 10.0

try:  # the tap's default maximum message size (the stack does not change it)
    from tap.protocol import DEFAULT_MAX_MESSAGE
except ImportError:  # pragma: no cover - the tap package is part of this repo
    DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024


# --------------------------------------------------------------------------- wire helpers


def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = struct.pack("!i", version)
    for key, value in params.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body: (code byte, cstring)*, NUL."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.index(b"\0", pos + 1)
        fields[code] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return fields


class Wire:
    """A raw PostgreSQL client connection (plain or TLS) to the gateway."""

    def __init__(self, host: str, port: int) -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=READ_TIMEOUT)
        self.buffer = b""
        self.reset = False  # the connection ended with a reset, not an orderly close

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> bool:
        while len(self.buffer) < n:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError) as exc:
                self.reset = self.reset or isinstance(exc, ConnectionResetError)
                chunk = b""
            if not chunk:
                return False
            self.buffer += chunk
        return True

    def read_byte(self) -> bytes:
        assert self._fill(1), "connection closed before the one-byte answer"
        byte, self.buffer = self.buffer[:1], self.buffer[1:]
        return byte

    def read_message(self) -> tuple[bytes, bytes] | None:
        """Next backend message, or None when the server closed the connection."""
        if not self._fill(5):
            return None
        kind = self.buffer[:1]
        (length,) = struct.unpack("!i", self.buffer[1:5])
        assert 4 <= length < 1 << 30, f"implausible backend message length {length}"
        if not self._fill(1 + length):
            return None
        body = self.buffer[5 : 1 + length]
        self.buffer = self.buffer[1 + length :]
        return kind, body

    def start_tls(self) -> None:
        self.send(struct.pack("!ii", 8, SSL_REQUEST))
        assert self.read_byte() == b"S", "the gateway declined TLS"
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock)

    def login(self, user: str, password: str, database: str, app_name: str) -> None:
        """StartupMessage, password/SCRAM authentication, until ReadyForQuery."""
        self.send(startup_message({"user": user, "database": database, "application_name": app_name}))
        scram: ScramClient | None = None
        while True:
            msg = self.read_message()
            assert msg is not None, "the gateway closed the connection during login"
            kind, body = msg
            if kind == b"E":
                pytest.fail(f"login failed: {error_fields(body)}")
            if kind == b"Z":
                return
            if kind != b"R":
                continue  # ParameterStatus, BackendKeyData, NegotiateProtocolVersion
            (code,) = struct.unpack("!i", body[:4])
            if code == 0:
                continue
            if code == 3:  # cleartext
                self.send(message(b"p", password.encode() + b"\0"))
            elif code == 10:  # SASL: mechanisms listed
                mechanisms = [m.decode() for m in body[4:].split(b"\0") if m]
                assert "SCRAM-SHA-256" in mechanisms, mechanisms
                scram = ScramClient(["SCRAM-SHA-256"], user, password)
                first = scram.get_client_first().encode()
                self.send(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first))
            elif code == 11:  # SASLContinue
                assert scram is not None
                scram.set_server_first(body[4:].decode())
                self.send(message(b"p", scram.get_client_final().encode()))
            elif code == 12:  # SASLFinal
                assert scram is not None
                scram.set_server_final(body[4:].decode())
            else:
                pytest.fail(f"unexpected authentication request {code}")

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(message(b"Q", sql.encode() + b"\0"))
        messages = []
        while True:
            msg = self.read_message()
            assert msg is not None, "connection closed during a query"
            messages.append(msg)
            if msg[0] == b"Z":
                return messages

    def expect_fatal_protocol_violation(self) -> dict[str, str]:
        """Read until an ErrorResponse; it must be FATAL 08P01, then EOF."""
        while True:
            msg = self.read_message()
            assert msg is not None, "the connection closed without an ErrorResponse"
            kind, body = msg
            if kind == b"E":
                fields = error_fields(body)
                assert fields.get("S") == "FATAL", fields
                assert fields.get("V", "FATAL") == "FATAL", fields
                assert fields.get("C") == "08P01", fields
                assert fields.get("M"), fields
                assert self.read_message() is None, "the connection stayed open after FATAL"
                return fields
            assert kind in (b"N", b"S"), f"unexpected {kind!r} before the error"

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- fixtures


class Target:
    def __init__(self, stack: Any, mode: str) -> None:
        self.stack = stack
        self.mode = mode
        params = conninfo_to_dict(stack.gateway_dsn[mode])
        self.host = str(params["host"])
        self.port = int(params["port"])
        self.user = str(params["user"])
        self.database = str(params["dbname"])
        self.password = str(params.get("password") or stack.passwords[self.user])
        self.pid = stack.tap_pids[mode]
        self.app_name = f"pgw-raw-{uuid.uuid4().hex[:8]}"
        # The log file of the process whose pid the stack reports for this mode.
        self.tap_log: Path = next(p.log for p in stack.procs.values() if p.pid == self.pid)
        self.log_mark = self.tap_log.stat().st_size

    def wire(self) -> Wire:
        return Wire(self.host, self.port)

    def logged_in(self, tls: bool = False) -> Wire:
        w = self.wire()
        if tls:
            w.start_tls()
        w.login(self.user, self.password, self.database, self.app_name)
        return w

    def backends(self) -> int:
        with psycopg.connect(self.stack.upstream_dsn, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (self.app_name,),
            ).fetchone()
        return int(row[0]) if row else 0

    def tap_events(self) -> list[dict[str, Any]]:
        """Structured log lines the tap wrote since this target was made."""
        with self.tap_log.open("rb") as fh:
            fh.seek(self.log_mark)
            lines = fh.read().decode(errors="replace").splitlines()
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def assert_protocol_error_recorded(self, logged_in: bool = True) -> None:
        """The tap recorded the violation (08P01) for the operator; for an
        established session, under the session id of this client's session."""
        deadline = time.monotonic() + 5
        while True:
            events = self.tap_events()
            sessions = {
                e.get("session_id")
                for e in events
                if e.get("event") == "session_start" and e.get("application_name") == self.app_name
            }
            errors = [
                e
                for e in events
                if e.get("event") == "protocol_error"
                and e.get("sqlstate") == "08P01"
                and (not logged_in or e.get("session_id") in sessions)
            ]
            if errors or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert errors, f"no protocol_error event in {self.tap_log.name} for this session"

    def assert_no_backend_left(self) -> None:
        deadline = time.monotonic() + 15
        while (left := self.backends()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == 0, f"{left} PostgreSQL backend(s) left behind by the broken session"


@pytest.fixture
def target(stack: Any, mode: str) -> Target:
    return Target(stack, mode)


@pytest.fixture
def bystander(stack: Any, mode: str) -> Iterator[psycopg.Connection[Any]]:
    """A healthy session through the same tap, open while the broken one fails."""
    dsn = make_conninfo(stack.gateway_dsn[mode], sslmode="disable")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE bystander_state (v int)")
        conn.execute("INSERT INTO bystander_state VALUES (1)")
        yield conn


@pytest.fixture(autouse=True)
def _tap_survives(target: Target, bystander: psycopg.Connection[Any]) -> Iterator[None]:
    yield
    proc = psutil.Process(target.pid)
    assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE, "the tap died"
    # The session opened before the failure still works (its temp table too).
    assert bystander.execute("SELECT v FROM bystander_state").fetchone() == (1,)
    # New sessions are accepted.
    fresh = target.logged_in()
    try:
        rows = [m for m in fresh.query("SELECT 'fresh session'") if m[0] == b"D"]
        assert rows and b"fresh session" in rows[0][1]
    finally:
        fresh.close()


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize(
    "length",
    [pytest.param(3, id="len3"), pytest.param(0, id="len0"), pytest.param(-1, id="negative")],
)
def test_message_length_below_four(target: Target, length: int, tls: bool) -> None:
    w = target.logged_in(tls=tls)
    try:
        w.send(b"Q" + struct.pack("!i", length) + b"SELECT 1\0")
        w.expect_fatal_protocol_violation()
    finally:
        w.close()
    target.assert_no_backend_left()
    target.assert_protocol_error_recorded()


@pytest.mark.parametrize(
    "length",
    [
        pytest.param(DEFAULT_MAX_MESSAGE + 1, id="max+1"),
        pytest.param(0x7FFFFFFF, id="2GiB"),
    ],
)
def test_oversized_message_is_refused_from_its_header(target: Target, length: int) -> None:
    """Only the 5-byte header and a little payload are sent: the tap must not
    wait for (or allocate) the announced size before refusing it."""
    w = target.logged_in()
    try:
        w.send(b"Q" + struct.pack("!i", length) + b"SELECT ")
        w.expect_fatal_protocol_violation()
    finally:
        w.close()
    target.assert_no_backend_left()
    target.assert_protocol_error_recorded()


def test_large_legal_message_passes(target: Target) -> None:
    """Positive control for the limit: a 4 MB Query is an ordinary message."""
    w = target.logged_in()
    try:
        literal = "x" * (4 * 1024 * 1024)
        replies = w.query(f"SELECT length('{literal}')")
        rows = [body for kind, body in replies if kind == b"D"]
        assert rows and str(len(literal)).encode() in rows[0]
    finally:
        w.close()


def test_unknown_message_type_after_login(target: Target) -> None:
    """A well-framed message of a type the protocol does not have."""
    w = target.logged_in()
    try:
        w.send(message(b"\x01", b"junk"))
        w.expect_fatal_protocol_violation()
    finally:
        w.close()
    target.assert_no_backend_left()
    target.assert_protocol_error_recorded()


# --------------------------------------------------------------------------- startup garbage


GARBAGE_STARTUPS = {
    # (A TLS ClientHello without SSLRequest is not garbage: the tap accepts
    # PostgreSQL 17's direct TLS, see test_clients_psycopg.py.)
    "http-request": b"GET / HTTP/1.1\r\nHost: db\r\n\r\n",
    "ssh-banner": b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
    "length-4": struct.pack("!i", 4),
    "length-too-big": struct.pack("!ii", 1_000_000, PROTOCOL_3_0) + b"user\0app\0\0",
    "no-terminator": struct.pack("!ii", 8 + 8, PROTOCOL_3_0) + b"user\0app",
    "negative-length": bytes.fromhex("ffffffff0003000075736572"),
}


@pytest.mark.parametrize("garbage", list(GARBAGE_STARTUPS), ids=list(GARBAGE_STARTUPS))
def test_garbage_instead_of_startup_message(target: Target, garbage: str) -> None:
    w = target.wire()
    try:
        w.send(GARBAGE_STARTUPS[garbage])
        fields = w.expect_fatal_protocol_violation()
        assert "\0" not in fields["M"]
    finally:
        w.close()
    if garbage != "no-terminator":  # that one PostgreSQL may refuse itself
        target.assert_protocol_error_recorded(logged_in=False)


def test_gssenc_request_is_declined_and_startup_continues(target: Target) -> None:
    w = target.wire()
    try:
        w.send(struct.pack("!ii", 8, GSSENC_REQUEST))
        assert w.read_byte() == b"N"
        w.login(target.user, target.password, target.database, target.app_name)
        assert any(kind == b"D" for kind, _ in w.query("SELECT 1"))
    finally:
        w.close()


# --------------------------------------------------------------------------- cut connections


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_connection_cut_mid_message(target: Target, tls: bool) -> None:
    """No answer is possible; the tap must drop the session and its upstream."""
    w = target.logged_in(tls=tls)
    assert target.backends() == 1
    w.send(b"Q" + struct.pack("!i", 200) + b"SELECT 'only part of")
    w.close()
    target.assert_no_backend_left()


def test_connection_cut_mid_startup(target: Target) -> None:
    w = target.wire()
    w.send(startup_message({"user": target.user, "database": target.database})[:11])
    w.close()
    target.assert_no_backend_left()


def test_connection_cut_mid_copy(target: Target) -> None:
    w = target.logged_in()
    w.query("CREATE TEMP TABLE cut_copy (v text)")
    w.send(message(b"Q", b"COPY cut_copy FROM STDIN\0"))
    msg = w.read_message()
    assert msg is not None and msg[0] == b"G", msg  # CopyInResponse
    w.send(message(b"d", b"row 1\n") + b"d" + struct.pack("!i", 1000) + b"row 2")
    w.close()
    target.assert_no_backend_left()


# --------------------------------------------------------------------------- a client that keeps sending


def send_until_closed(w: Wire, first: bytes, filler: bytes, timeout: float = READ_TIMEOUT) -> str:
    """Send ``first``, then ``filler`` over and over while reading whatever
    comes back into ``w.buffer``, until the gateway ends the connection.
    One thread, non-blocking (an SSL socket must not be read and written from
    two threads). Returns how the connection ended: "eof" or "reset"."""
    w.sock.setblocking(False)
    pending = first
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([w.sock], [w.sock] if pending is not None else [],
                                                  [], 0.5)
            if writable and pending is not None:
                try:
                    sent = w.sock.send(pending)
                    pending = pending[sent:] or filler
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    pass
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pending = None  # the gateway stopped reading: keep reading its answer
            if readable or (isinstance(w.sock, ssl.SSLSocket) and w.sock.pending()):
                try:
                    chunk = w.sock.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    continue
                except ConnectionResetError:
                    return "reset"
                except ssl.SSLEOFError:
                    return "eof"
                if not chunk:
                    return "eof"
                w.buffer += chunk
        raise AssertionError("the gateway did not end the connection")
    finally:
        w.sock.setblocking(True)


@pytest.mark.parametrize("via", ["envoy", "tap"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_fatal_reaches_a_client_that_keeps_sending(target: Target, tls: bool, via: str) -> None:
    """A pipelining client has more bytes on the way when the gateway ends its
    session. Closing a socket with unread bytes makes the kernel answer with
    a reset, and a proxy that sees a reset may drop what it had not yet
    passed on (the FATAL). The gateway therefore closes in order: the client
    reads the ErrorResponse and then an orderly end of stream, never a reset."""
    if via == "tap":
        if target.mode != "inline":
            pytest.skip("only the inline tap has a client socket of its own")
        target.port = target.stack.procs["tap-inline"].ports["listen"]
    w = target.logged_in(tls=tls)
    try:
        ending = send_until_closed(w, message(b"\x01", b"junk"), message(b"S", b"") * 2048)
        kinds = []
        while (msg := w.read_message()) is not None:
            kinds.append(msg[0])
            if msg[0] == b"E":
                fields = error_fields(msg[1])
                assert (fields.get("S"), fields.get("C")) == ("FATAL", "08P01"), fields
        assert b"E" in kinds, f"the connection ended ({ending}) without the FATAL: {kinds}"
        assert ending == "eof", "the gateway reset the connection instead of closing it"
    finally:
        w.close()
    target.assert_no_backend_left()
    target.assert_protocol_error_recorded()
