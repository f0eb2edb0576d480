"""TLS without a socket: ``ssl.MemoryBIO`` lets the sans-IO core encrypt and
decrypt byte strings, so both drivers (inline sockets and Envoy ext_proc
chunks) share one TLS implementation."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


class TLSError(Exception):
    """The TLS layer failed (bad handshake, bad certificate, bad record)."""


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """How the tap connects to PostgreSQL: libpq's sslmode vocabulary."""

    mode: str = "disable"  # disable | require | verify-ca | verify-full
    ca_file: str | None = None
    server_hostname: str | None = None
    cert_file: str | None = None  # client certificate (upstream cert auth)
    key_file: str | None = None

    def context(self) -> ssl.SSLContext | None:
        if self.mode == "disable":
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.mode == "require":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.mode == "verify-ca":
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
        elif self.mode == "verify-full":
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            raise ValueError(f"unknown upstream sslmode {self.mode!r}")
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def server_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """TLS context for client connections terminated at the tap.

    ALPN "postgresql" is offered so PostgreSQL 17+ clients using direct TLS
    (``sslnegotiation=direct``) are accepted as well.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.set_alpn_protocols(["postgresql"])
    return ctx


class TLSEndpoint:
    """One side of a TLS session over memory buffers.

    ``receive(ciphertext)`` returns decrypted application bytes; ``send(plain)``
    queues plaintext; ``outgoing()`` drains ciphertext that must be written to
    the peer (handshake records included).
    """

    __slots__ = ("_in", "_obj", "_out", "_pending", "handshake_done")

    def __init__(self, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=server_side,
                                 server_hostname=server_hostname)
        self._pending = bytearray()  # plaintext written before the handshake ended
        self.handshake_done = False

    def start(self) -> bytes:
        """Begin the handshake (client side sends its ClientHello)."""
        self._handshake()
        return self.outgoing()

    def _handshake(self) -> None:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        except ssl.SSLError as exc:
            raise TLSError(f"TLS handshake failed: {exc.reason or exc.__class__.__name__}") from exc
        self.handshake_done = True
        if self._pending:
            data = bytes(self._pending)
            self._pending.clear()
            self._write(data)

    def receive(self, data: bytes) -> bytes:
        self._in.write(data)
        if not self.handshake_done:
            self._handshake()
            if not self.handshake_done:
                return b""
        chunks = []
        obj, incoming = self._obj, self._in
        while True:
            try:
                chunk = obj.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                break
            except ssl.SSLError as exc:
                raise TLSError(f"TLS record error: {exc.reason or exc.__class__.__name__}") from exc
            if not chunk:
                break
            chunks.append(chunk)
            # Nothing left to decrypt (no ciphertext in the BIO, no plaintext
            # buffered by OpenSSL): stop without provoking SSLWantReadError,
            # whose exception was half the cost of a small record here.
            if not incoming.pending and not obj.pending():
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def send(self, data: bytes) -> None:
        if not self.handshake_done:
            self._pending += data
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._obj.write(view)
            view = view[n:]

    def outgoing(self) -> bytes:
        return self._out.read()

    def close(self) -> bytes:
        """Start a clean TLS shutdown; return the close_notify record to send.

        Without it, clients report "unexpected eof" (libpq does, for example,
        on the cancel connection it encrypts).
        """
        if not self.handshake_done:
            return b""
        try:
            self._obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError, ValueError):
            pass
        return self.outgoing()

    @property
    def selected_alpn(self) -> str | None:
        return self._obj.selected_alpn_protocol()
