"""TLSEndpoint over memory buffers: whatever way the ciphertext is cut into
chunks, the plaintext comes out whole and in order (the receive loop stops
when nothing is left to decrypt rather than on SSLWantReadError, so these
check that it never stops early)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_session import _self_signed

from tap.tls import TLSEndpoint, server_context


def _pair(tmp: Path) -> tuple[TLSEndpoint, TLSEndpoint]:
    cert, key = _self_signed(tmp)
    server = TLSEndpoint(server_context(cert, key), server_side=True)
    client = TLSEndpoint(ssl.create_default_context(cafile=str(cert)), server_side=False,
                         server_hostname="localhost")
    to_server = client.start()
    for _ in range(10):
        if to_server:
            server.receive(to_server)
        back = server.outgoing()
        if back:
            client.receive(back)
        to_server = client.outgoing()
        if client.handshake_done and server.handshake_done and not to_server and not back:
            break
    assert client.handshake_done and server.handshake_done
    return client, server


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[TLSEndpoint, TLSEndpoint]:
    return _pair(tmp_path_factory.mktemp("tls"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.binary(min_size=1, max_size=40000), min_size=1, max_size=6),
       cuts=st.lists(st.integers(min_value=1, max_value=20000), max_size=12))
def test_any_split_of_the_ciphertext_gives_the_plaintext_in_order(
        pair: tuple[TLSEndpoint, TLSEndpoint], messages: list[bytes], cuts: list[int]) -> None:
    client, server = pair
    for m in messages:  # messages over 16 KB span several TLS records
        client.send(m)
    wire = client.outgoing()
    received = bytearray()
    pos = 0
    for size in cuts:
        received += server.receive(wire[pos:pos + size])
        pos += size
    received += server.receive(wire[pos:])
    assert bytes(received) == b"".join(messages)


def test_many_records_in_one_chunk_come_out_in_one_call(
        pair: tuple[TLSEndpoint, TLSEndpoint]) -> None:
    client, server = pair
    parts = [bytes([i]) * (100 + i) for i in range(50)]
    for p in parts:
        client.send(p)  # one record each
    assert server.receive(client.outgoing()) == b"".join(parts)


def test_a_partial_record_waits_for_its_end(pair: tuple[TLSEndpoint, TLSEndpoint]) -> None:
    client, server = pair
    client.send(b"first")
    client.send(b"second")
    wire = client.outgoing()
    half = len(wire) - 3
    assert server.receive(wire[:half]) == b"first"
    assert server.receive(wire[half:]) == b"second"
