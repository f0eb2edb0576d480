"""PostgreSQL frontend/backend protocol 3.0 (and 3.2) framing and codecs.

Pure functions and small classes over ``bytes``: no sockets, no event loop.
Message layouts follow the PostgreSQL documentation, chapter "Frontend/Backend
Protocol", section "Message Formats".
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

try:  # the C twins of the per-message loops (tap/_wire.c), built by pip install
    from tap import _wire as _native
except ImportError:  # pragma: no cover - a source tree without the build
    _native = None  # type: ignore[assignment]

# Special startup-phase request codes (sent in place of a protocol version).
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2

# The largest startup packet PostgreSQL itself accepts (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10_000
MAX_CANCEL_KEY = 256
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024

# Error codes the tap itself raises (PostgreSQL Appendix A).
PROTOCOL_VIOLATION = "08P01"
INSUFFICIENT_PRIVILEGE = "42501"
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"  # noqa: S105 - an SQLSTATE, not a password
CONNECTION_FAILURE = "08006"
CANNOT_CONNECT_NOW = "57P03"
ADMIN_SHUTDOWN = "57P01"
IDLE_SESSION_TIMEOUT = "57P05"
SYSTEM_ERROR = "58000"
PROGRAM_LIMIT_EXCEEDED = "54000"
# Held-for-approval outcomes get a class of their own (user-defined class "PW").
APPROVAL_DENIED = "PW001"
APPROVAL_EXPIRED = "PW002"
APPROVAL_CANCELLED = "PW003"

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!ci")


class ProtocolError(Exception):
    """The peer sent bytes that are not valid protocol: the session must end
    with a FATAL 08P01. The message is safe to show (it never quotes payload)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One typed message: ``type`` is a single byte, ``body`` excludes the header."""

    type: bytes
    body: bytes

    def encode(self) -> bytes:
        return _HDR.pack(self.type, len(self.body) + 4) + self.body


@dataclass(frozen=True, slots=True)
class StartupPacket:
    """An untyped startup-phase packet: StartupMessage, SSLRequest, GSSENCRequest
    or CancelRequest. ``code`` is the protocol version or request code."""

    code: int
    body: bytes  # everything after the code

    def encode(self) -> bytes:
        return _I32.pack(len(self.body) + 8) + _I32.pack(self.code) + self.body


class StartupReader:
    """Reassembles untyped startup-phase packets from arbitrary chunks."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> StartupPacket | None:
        """Return the first complete packet, if any; the rest stays buffered."""
        self._buf += data
        if len(self._buf) < 4:
            return None
        (length,) = _I32.unpack_from(self._buf, 0)
        if length < 8 or length > MAX_STARTUP_PACKET:
            raise ProtocolError("invalid length of startup packet")
        if len(self._buf) < length:
            return None
        (code,) = _I32.unpack_from(self._buf, 4)
        body = bytes(self._buf[8:length])
        del self._buf[:length]
        return StartupPacket(code, body)

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


_FRAME_HEADER = struct.Struct("!Bi")  # type byte, length


def _bad_length(length: int, max_size: int) -> ProtocolError:
    if length < 4:
        return ProtocolError("invalid message length")
    return ProtocolError(f"message of {length} bytes exceeds the gateway limit of {max_size}")


def split_frames(data: bytes | bytearray, max_size: int) -> tuple[list[tuple[int, int, int]], int]:
    """Frame every complete message at the start of ``data``: a list of
    ``(type_byte, start, end)`` and the offset of the first incomplete one.
    A length below 4 or above ``max_size`` raises :class:`ProtocolError`.
    The reference for ``tap/_wire.c``'s ``split_frames``."""
    frames: list[tuple[int, int, int]] = []
    append = frames.append
    header = _FRAME_HEADER.unpack_from
    pos = 0
    end = len(data)
    while end - pos >= 5:
        kind, length = header(data, pos)
        if not 4 <= length <= max_size:
            raise _bad_length(length, max_size)
        stop = pos + 1 + length
        if stop > end:
            break
        append((kind, pos, stop))
        pos = stop
    return frames, pos


def run_end_py(frames: list[tuple[int, int, int]], i: int, kind: int) -> int:
    """The first index at or after ``i`` whose frame is not of type ``kind``
    (or ``len(frames)``): where a run of one message type ends. The
    reference for ``tap/_wire.c``'s ``run_end``."""
    n = len(frames)
    while i < n and frames[i][0] == kind:
        i += 1
    return i


run_end = run_end_py if _native is None else _native.run_end


def _native_split(data: bytes | bytearray,
                  max_size: int) -> tuple[list[tuple[int, int, int]], int]:
    assert _native is not None
    frames, pos, bad = _native.split_frames(data, max_size)
    if bad is not None:
        raise _bad_length(bad, max_size)
    return frames, pos


_split = split_frames if _native is None else _native_split


class MessageReader:
    """Reassembles typed messages from arbitrary chunks.

    ``feed`` returns every message completed by the chunk, in order; a partial
    message stays buffered (bounded by ``max_size``) until its last byte arrives.
    """

    __slots__ = ("_buf", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self.max_size = max_size

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        end = len(buf)
        while end - pos >= 5:
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big", signed=True)
            if length < 4:
                raise ProtocolError("invalid message length")
            if length > self.max_size:
                raise ProtocolError(
                    f"message of {length} bytes exceeds the gateway limit of {self.max_size}"
                )
            stop = pos + 1 + length
            if stop > end:
                break
            out.append(Message(bytes(buf[pos : pos + 1]), bytes(buf[pos + 5 : stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return out

    def split(self, data: bytes) -> tuple[list[tuple[int, int, int]], bytes]:
        """Fast path for pass-through: frame without copying message bodies.

        Returns ``(frames, block)`` where ``block`` holds every complete message
        and ``frames`` lists ``(type_byte, start, end)`` offsets into it (start at
        the type byte, end exclusive). Incomplete tail bytes stay buffered.
        """
        if self._buf:
            self._buf += data
            block_src: bytes | bytearray = self._buf
        else:
            block_src = data
        frames, pos = _split(block_src, self.max_size)
        if block_src is self._buf:
            block = bytes(self._buf[:pos])
            del self._buf[:pos]
        else:
            block = data[:pos] if pos != len(data) else data
            if pos != len(data):
                self._buf += data[pos:]
        return frames, block


# --------------------------------------------------------------------------
# Decoders


def cstring(body: bytes, pos: int) -> tuple[str, int]:
    """Read a NUL-terminated string at ``pos``; return it and the next offset."""
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolError("unterminated string in message")
    return body[pos:end].decode("utf-8", "replace"), end + 1


def startup_params(body: bytes) -> dict[str, str]:
    """Parameters of a StartupMessage body (after the version code)."""
    params: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        if body[pos] == 0:
            return params
        key, pos = cstring(body, pos)
        value, pos = cstring(body, pos)
        params[key] = value
    raise ProtocolError("startup message parameters are not terminated")


def encode_startup(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return StartupPacket(version, body).encode()


def query_text(body: bytes) -> str:
    text, _ = cstring(body, 0)
    return text


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    query: str
    param_types: tuple[int, ...]


def decode_parse(body: bytes) -> Parse:
    name, pos = cstring(body, 0)
    query, pos = cstring(body, pos)
    if pos + 2 > len(body):
        raise ProtocolError("Parse message truncated")
    (n,) = _I16.unpack_from(body, pos)
    pos += 2
    if n < 0 or pos + 4 * n > len(body):
        raise ProtocolError("Parse message parameter types truncated")
    types = struct.unpack_from(f"!{n}I", body, pos) if n else ()
    return Parse(name, query, tuple(types))


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


def decode_bind(body: bytes) -> Bind:
    try:
        portal, pos = cstring(body, 0)
        statement, pos = cstring(body, pos)
        (nf,) = _I16.unpack_from(body, pos)
        pos += 2
        pformats = struct.unpack_from(f"!{nf}h", body, pos) if nf > 0 else ()
        pos += 2 * max(nf, 0)
        (np_,) = _I16.unpack_from(body, pos)
        params, pos = _values(body, pos + 2, np_, "Bind parameter")
        (nr,) = _I16.unpack_from(body, pos)
        pos += 2
        rformats = struct.unpack_from(f"!{nr}h", body, pos) if nr > 0 else ()
    except struct.error as exc:
        raise ProtocolError("Bind message truncated") from exc
    if nf < 0 or np_ < 0 or nr < 0:
        raise ProtocolError("negative count in Bind message")
    return Bind(portal, statement, tuple(pformats), tuple(params), tuple(rformats))


def _values(body: bytes, pos: int, count: int, what: str) -> tuple[list[bytes | None], int]:
    """``count`` length-prefixed values (length -1: NULL) from ``pos``; the
    values and the offset after them. struct.error when truncated."""
    values: list[bytes | None] = []
    for _ in range(count):
        (ln,) = _I32.unpack_from(body, pos)
        pos += 4
        if ln == -1:
            values.append(None)
            continue
        if ln < 0 or pos + ln > len(body):
            raise ProtocolError(f"{what} length out of range")
        values.append(body[pos:pos + ln])
        pos += ln
    return values, pos


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """The frontend FunctionCall ('F'): a function by OID and its arguments."""

    oid: int
    arg_formats: tuple[int, ...]
    args: tuple[bytes | None, ...]
    result_format: int


def decode_function_call(body: bytes) -> FunctionCall:
    try:
        (oid,) = struct.unpack_from("!I", body, 0)
        pos = 4
        (nf,) = _I16.unpack_from(body, pos)
        pos += 2
        if nf < 0:
            raise ProtocolError("negative count in FunctionCall message")
        formats = struct.unpack_from(f"!{nf}h", body, pos) if nf else ()
        pos += 2 * nf
        (na,) = _I16.unpack_from(body, pos)
        if na < 0:
            raise ProtocolError("negative count in FunctionCall message")
        args, pos = _values(body, pos + 2, na, "FunctionCall argument")
        (result_format,) = _I16.unpack_from(body, pos)
    except struct.error as exc:
        raise ProtocolError("FunctionCall message truncated") from exc
    return FunctionCall(oid, tuple(formats), tuple(args), result_format)


def quote_ident(name: str) -> str:
    """An SQL identifier, always quoted (so case, keywords and odd
    characters survive the round trip through the policy's parser)."""
    return '"' + name.replace('"', '""') + '"'


def execute_sql(statement: str, nargs: int) -> str:
    """A Bind of a named statement the session did not Parse, as the SQL
    EXECUTE it amounts to (SQL PREPARE and protocol Parse share one
    namespace)."""
    args = ", ".join(f"${i}" for i in range(1, nargs + 1))
    return f"EXECUTE {quote_ident(statement)}" + (f"({args})" if args else "")


def fetch_sql(portal: str, max_rows: int) -> str:
    """An Execute of a named portal the session did not Bind (a cursor from
    SQL DECLARE: the same namespace), as the SQL FETCH it amounts to."""
    count = str(max_rows) if max_rows > 0 else "ALL"
    return f"FETCH FORWARD {count} FROM {quote_ident(portal)}"


def execute_max_rows(body: bytes) -> int:
    """The row limit of an Execute message (0: no limit)."""
    _, pos = cstring(body, 0)
    if len(body) < pos + 4:
        raise ProtocolError("Execute message too short")
    return int.from_bytes(body[pos:pos + 4], "big", signed=True)


def function_call_sql(oid: int, nargs: int, name: str | None) -> str:
    """A FunctionCall as SQL the policy can analyse: the function ``name``
    (quoted, qualified) with one parameter per argument; opaque (and so
    refused by the policy) when the function is not known."""
    if name is None:
        return f"<function call oid {oid}>"
    args = ", ".join(f"${i}" for i in range(1, nargs + 1))
    return f"SELECT {name}({args})"


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    table_oid: int
    column: int
    type_oid: int
    type_size: int
    type_mod: int
    format: int


_FIELD = struct.Struct("!IhIhih")


@functools.lru_cache(maxsize=512)
def decode_row_description(body: bytes) -> tuple[Field, ...]:
    """Fields of a RowDescription body. Memoised: a prepared statement's
    description comes back at every execution (libpq describes the portal
    each time), and the result is an immutable tuple of frozen fields."""
    try:
        (n,) = _I16.unpack_from(body, 0)
        pos = 2
        fields = []
        for _ in range(n):
            name, pos = cstring(body, pos)
            table, col, typ, size, mod, fmt = _FIELD.unpack_from(body, pos)
            pos += _FIELD.size
            fields.append(Field(name, table, col, typ, size, mod, fmt))
    except struct.error as exc:
        raise ProtocolError("RowDescription truncated") from exc
    return tuple(fields)


def decode_data_row(body: bytes) -> list[bytes | None]:
    try:
        (n,) = _I16.unpack_from(body, 0)
        pos = 2
        values: list[bytes | None] = []
        for _ in range(n):
            (ln,) = _I32.unpack_from(body, pos)
            pos += 4
            if ln < 0:
                values.append(None)
            else:
                values.append(body[pos : pos + ln])
                pos += ln
    except struct.error as exc:
        raise ProtocolError("DataRow truncated") from exc
    return values


def encode_data_row(values: Iterable[bytes | None]) -> bytes:
    parts = []
    count = 0
    for v in values:
        count += 1
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(v)) + v)
    body = _I16.pack(count) + b"".join(parts)
    return b"D" + _I32.pack(len(body) + 4) + body


def decode_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse, keyed by their code letter."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        value, pos = cstring(body, pos + 1)
        out[code] = value
    return out


def encode_fields(kind: bytes, fields: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items()) + b"\0"
    return kind + _I32.pack(len(body) + 4) + body


def decode_backend_key(body: bytes) -> tuple[int, bytes]:
    if len(body) < 8 or len(body) > 4 + MAX_CANCEL_KEY:
        raise ProtocolError("BackendKeyData has an invalid length")
    (pid,) = _I32.unpack_from(body, 0)
    return pid, body[4:]


def encode_backend_key(pid: int, key: bytes) -> bytes:
    return Message(b"K", _I32.pack(pid) + key).encode()


def decode_cancel(body: bytes) -> tuple[int, bytes]:
    """Body of a CancelRequest after the request code: pid and secret key."""
    if len(body) < 8 or len(body) > 4 + MAX_CANCEL_KEY:
        raise ProtocolError("CancelRequest has an invalid length")
    (pid,) = _I32.unpack_from(body, 0)
    return pid, body[4:]


def encode_cancel(pid: int, key: bytes) -> bytes:
    return StartupPacket(CANCEL_REQUEST, _I32.pack(pid) + key).encode()


def decode_notification(body: bytes) -> tuple[int, str, str]:
    (pid,) = _I32.unpack_from(body, 0)
    channel, pos = cstring(body, 4)
    payload, _ = cstring(body, pos)
    return pid, channel, payload


def encode_notification(pid: int, channel: str, payload: str) -> bytes:
    return Message(b"A", _I32.pack(pid) + channel.encode() + b"\0" + payload.encode() + b"\0").encode()


# --------------------------------------------------------------------------
# Encoders for messages the tap originates


def error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail:
        fields["D"] = detail
    if hint:
        fields["H"] = hint
    return encode_fields(b"E", fields)


def notice_response(message: str, *, severity: str = "NOTICE", sqlstate: str = "00000") -> bytes:
    return encode_fields(b"N", {"S": severity, "V": severity, "C": sqlstate, "M": message})


def ready_for_query(status: bytes) -> bytes:
    return b"Z\x00\x00\x00\x05" + status


def auth_request(code: int, extra: bytes = b"") -> bytes:
    return Message(b"R", _I32.pack(code) + extra).encode()


AUTH_OK = auth_request(0)
AUTH_CLEARTEXT = auth_request(3)


def parameter_status(name: str, value: str) -> bytes:
    return Message(b"S", name.encode() + b"\0" + value.encode() + b"\0").encode()


def simple_query(sql: str) -> bytes:
    return Message(b"Q", sql.encode() + b"\0").encode()


def parse_message(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = name.encode() + b"\0" + sql.encode() + b"\0" + _I16.pack(len(types))
    body += b"".join(struct.pack("!I", t) for t in types)
    return Message(b"P", body).encode()


def sasl_mechanisms(body: bytes) -> list[str]:
    """Mechanism names of an AuthenticationSASL body (after the int32 code)."""
    names = []
    pos = 4
    while pos < len(body) and body[pos] != 0:
        name, pos = cstring(body, pos)
        names.append(name)
    return names


def encode_sasl_mechanisms(names: list[str]) -> bytes:
    return auth_request(10, b"".join(n.encode() + b"\0" for n in names) + b"\0")


def iter_frames(block: bytes) -> Iterator[Message]:
    """Iterate complete messages of a block (test helper and slow paths)."""
    reader = MessageReader()
    yield from reader.feed(block)
    if reader.pending:
        raise ProtocolError("trailing partial message")
