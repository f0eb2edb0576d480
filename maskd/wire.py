"""DataRow field framing, so the tap can hand maskd whole DataRow messages.

PostgreSQL's DataRow ('D') body is ``int16 nfields`` then per field
``int32 length`` (-1 = NULL) and the bytes. Parsing and rebuilding here keeps
the tap's re-framing to one call and keeps lengths correct when a masked
value changes size.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["build_datarow", "build_datarow_message", "parse_datarow", "parse_datarow_message"]

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_HEAD = struct.Struct(">ci")
_NULL = b"\xff\xff\xff\xff"


def parse_datarow(payload: bytes) -> list[bytes | None]:
    """Field values of a DataRow body (without the 'D' and length).

    Raises ValueError on a truncated or inconsistent body: the caller must
    not forward a row it could not inspect."""
    try:
        n = _I16.unpack_from(payload)[0]
        pos = 2
        out: list[bytes | None] = []
        append = out.append
        unpack = _I32.unpack_from
        for _ in range(n):
            length = unpack(payload, pos)[0]
            pos += 4
            if length < 0:
                append(None)
            else:
                end = pos + length
                append(payload[pos:end])
                pos = end
    except struct.error as exc:
        raise ValueError("truncated DataRow") from exc
    if pos != len(payload):
        raise ValueError("DataRow length mismatch")
    return out


def build_datarow(values: Sequence[bytes | None]) -> bytes:
    """DataRow body for ``values``; lengths recomputed."""
    pack = _I32.pack
    parts = [_I16.pack(len(values))]
    for v in values:
        if v is None:
            parts.append(_NULL)
        else:
            parts.append(pack(len(v)))
            parts.append(v)
    return b"".join(parts)


def parse_datarow_message(message: bytes) -> list[bytes | None]:
    """Field values of a complete DataRow message (``b'D' + int32 + body``)."""
    kind, length = _HEAD.unpack_from(message)
    if kind != b"D" or length + 1 != len(message):
        raise ValueError("not a complete DataRow message")
    return parse_datarow(message[5:])


def build_datarow_message(values: Sequence[bytes | None]) -> bytes:
    """Complete DataRow message for ``values``."""
    body = build_datarow(values)
    return _HEAD.pack(b"D", len(body) + 4) + body
