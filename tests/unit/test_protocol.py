"""Framing and codecs of tap.protocol, with byte strings only."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tap import protocol as pg


def msg(t: bytes, body: bytes) -> bytes:
    return pg.Message(t, body).encode()


messages = st.lists(
    st.tuples(st.sampled_from([b"Q", b"D", b"T", b"C", b"Z", b"E", b"N", b"d", b"P", b"B"]),
              st.binary(max_size=300)),
    min_size=1, max_size=30)


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    chunks, last = [], 0
    for c in cuts:
        chunks.append(data[last:c])
        last = c
    chunks.append(data[last:])
    return chunks


@given(messages, st.lists(st.integers(min_value=0, max_value=100_000), max_size=20))
def test_any_split_yields_the_same_messages(items: list[tuple[bytes, bytes]],
                                            points: list[int]) -> None:
    stream = b"".join(msg(t, b) for t, b in items)
    reader = pg.MessageReader()
    got: list[pg.Message] = []
    for chunk in _cuts(stream, points):
        got += reader.feed(chunk)
    assert [(m.type, m.body) for m in got] == items
    assert reader.pending == 0


@given(messages, st.lists(st.integers(min_value=0, max_value=100_000), max_size=20))
def test_split_fast_path_matches_feed(items: list[tuple[bytes, bytes]], points: list[int]) -> None:
    stream = b"".join(msg(t, b) for t, b in items)
    reader = pg.MessageReader()
    out = bytearray()
    types = []
    for chunk in _cuts(stream, points):
        frames, block = reader.split(chunk)
        for t, s, e in frames:
            types.append(bytes([t]))
            assert block[s:s + 1] == bytes([t])
            assert e <= len(block)
        out += block
    assert bytes(out) == stream
    assert types == [t for t, _ in items]


def test_message_is_passed_on_as_soon_as_complete() -> None:
    reader = pg.MessageReader()
    m = msg(b"D", b"\x00\x01\x00\x00\x00\x01x")
    assert reader.feed(m[:-1]) == []
    assert reader.feed(m[-1:] + b"C") == [pg.Message(b"D", b"\x00\x01\x00\x00\x00\x01x")]
    assert reader.pending == 1


@pytest.mark.parametrize("length", [0, 3, -1])
def test_invalid_length_is_a_protocol_error(length: int) -> None:
    with pytest.raises(pg.ProtocolError):
        pg.MessageReader().feed(b"Q" + struct.pack("!i", length))


def test_oversized_message_is_refused_before_it_is_buffered() -> None:
    reader = pg.MessageReader(max_size=1024)
    with pytest.raises(pg.ProtocolError, match="exceeds the gateway limit"):
        reader.feed(b"Q" + struct.pack("!i", 4096) + b"x" * 10)


def test_startup_reader_and_params() -> None:
    packet = pg.encode_startup({"user": "alice", "database": "shop"})
    r = pg.StartupReader()
    assert r.feed(packet[:5]) is None
    p = r.feed(packet[5:])
    assert p is not None and p.code == pg.PROTOCOL_3_0
    assert pg.startup_params(p.body) == {"user": "alice", "database": "shop"}


def test_startup_packet_length_bounds() -> None:
    with pytest.raises(pg.ProtocolError):
        pg.StartupReader().feed(struct.pack("!ii", 4, 0))
    with pytest.raises(pg.ProtocolError):
        pg.StartupReader().feed(struct.pack("!ii", 20_000, pg.PROTOCOL_3_0))


def test_parse_bind_roundtrip() -> None:
    body = pg.parse_message("s1", "select $1", (23,))[5:]
    p = pg.decode_parse(body)
    assert (p.name, p.query, p.param_types) == ("s1", "select $1", (23,))
    bind = (b"p1\0s1\0" + struct.pack("!hh", 1, 0) + struct.pack("!h", 2)
            + struct.pack("!i", 2) + b"42" + struct.pack("!i", -1) + struct.pack("!hh", 1, 1))
    b = pg.decode_bind(bind)
    assert b.portal == "p1" and b.statement == "s1"
    assert b.params == (b"42", None)
    assert b.result_formats == (1,)


def test_bind_truncated_is_protocol_error() -> None:
    with pytest.raises(pg.ProtocolError):
        pg.decode_bind(b"p\0s\0\x00\x01")


def test_data_row_roundtrip() -> None:
    encoded = pg.encode_data_row([b"a", None, b""])
    assert pg.decode_data_row(encoded[5:]) == [b"a", None, b""]


def test_error_fields_roundtrip() -> None:
    e = pg.error_response("42501", "nope", detail="d", hint="h")
    fields = pg.decode_fields(e[5:])
    assert fields["C"] == "42501" and fields["M"] == "nope" and fields["S"] == "ERROR"


def test_cancel_key_lengths() -> None:
    # Protocol 3.2 allows keys of up to 256 bytes; more is a violation.
    pid, key = pg.decode_cancel(struct.pack("!i", 7) + b"k" * 256)
    assert pid == 7 and len(key) == 256
    with pytest.raises(pg.ProtocolError):
        pg.decode_cancel(struct.pack("!i", 7) + b"k" * 257)


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_reader_never_raises_anything_but_protocol_error(data: bytes) -> None:
    reader = pg.MessageReader(max_size=4096)
    try:
        reader.feed(data)
    except pg.ProtocolError:
        pass


def test_cli_default_message_limit_matches_the_protocol_module() -> None:
    from tap import cli

    assert cli.DEFAULT_MAX_MESSAGE == pg.DEFAULT_MAX_MESSAGE
