"""Logging in to PostgreSQL with credentials only the gateway holds.

Sans-IO like the session: fed the server's Authentication* messages, it
returns the PasswordMessage bytes to send. SCRAM is done by ``scramp``
(never channel-bound: the tap's upstream TLS is its own, and -PLUS would
buy nothing here that verify-full does not).
"""

from __future__ import annotations

import hashlib
import struct

from scramp import ScramClient

from tap import protocol as pg
from tap.hooks import UpstreamLogin


class UpstreamAuthError(Exception):
    """The server asked for something the gateway cannot or will not do.
    The message names the method, never a secret."""


class UpstreamAuthenticator:
    __slots__ = ("_login", "_scram")

    def __init__(self, login: UpstreamLogin) -> None:
        self._login = login
        self._scram: ScramClient | None = None

    def _password(self, method: str) -> str:
        if self._login.password is None:
            raise UpstreamAuthError(
                f"the database asks for {method} authentication for role {self._login.role!r}, "
                "but the gateway holds no password for it")
        return self._login.password

    def answer(self, body: bytes) -> bytes | None:
        """Answer one AuthenticationRequest body; None when nothing is sent."""
        if len(body) < 4:
            raise pg.ProtocolError("authentication request truncated")
        (code,) = struct.unpack_from("!i", body, 0)
        if code == 0:
            return None
        if code == 3:
            return _password_message(self._password("password").encode() + b"\0")
        if code == 5:
            salt = body[4:8]
            user = self._login.role.encode()
            inner = hashlib.md5(self._password("md5").encode() + user).hexdigest()  # noqa: S324 - PostgreSQL's md5 method
            outer = hashlib.md5(inner.encode() + salt).hexdigest()  # noqa: S324
            return _password_message(b"md5" + outer.encode() + b"\0")
        if code == 10:
            mechanisms = pg.sasl_mechanisms(body)
            if "SCRAM-SHA-256" not in mechanisms:
                raise UpstreamAuthError("the database offers no SASL mechanism the gateway supports")
            self._scram = ScramClient(["SCRAM-SHA-256"], self._login.role, self._password("SCRAM"))
            first = self._scram.get_client_first().encode()
            return _password_message(b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
        if code == 11:
            if self._scram is None:
                raise pg.ProtocolError("SASLContinue without SASL")
            self._scram.set_server_first(body[4:].decode())
            return _password_message(self._scram.get_client_final().encode())
        if code == 12:
            if self._scram is None:
                raise pg.ProtocolError("SASLFinal without SASL")
            try:
                self._scram.set_server_final(body[4:].decode())
            except Exception as exc:
                # The server could not prove it knows the password: not our database.
                raise UpstreamAuthError("the database failed SCRAM server verification") from exc
            return None
        raise UpstreamAuthError(f"the database asks for an authentication method ({code}) "
                                "the gateway does not support")


def _password_message(body: bytes) -> bytes:
    return pg.Message(b"p", body).encode()
