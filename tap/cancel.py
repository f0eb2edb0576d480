"""Gateway-issued cancel keys.

Clients never see PostgreSQL's BackendKeyData: the tap hands out its own
random key and keeps the mapping here, so a CancelRequest reaching the tap
(on any new connection, in either driver) is rewritten to the server's real
key. A key nobody issued cancels nothing. The registry is per tap process;
with several tap replicas, Envoy must send a client's cancel connection to
the replica that issued the key (see docs/operators.md).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable


class CancelRegistry:
    __slots__ = ("_map", "_owners")

    def __init__(self) -> None:
        self._map: dict[tuple[int, bytes], tuple[int, bytes]] = {}
        # What to call when a client cancels: drops a statement held for a
        # decision or an approval, which PostgreSQL has not seen yet.
        self._owners: dict[tuple[int, bytes], Callable[[], None]] = {}

    def register(self, server_pid: int, server_key: bytes, *, key_length: int = 4,
                 on_cancel: Callable[[], None] | None = None) -> tuple[int, bytes]:
        while True:
            pid = secrets.randbits(31) or 1
            key = secrets.token_bytes(key_length)
            if (pid, key) not in self._map:
                self._map[(pid, key)] = (server_pid, server_key)
                if on_cancel is not None:
                    self._owners[(pid, key)] = on_cancel
                return pid, key

    def lookup(self, pid: int, key: bytes) -> tuple[int, bytes] | None:
        return self._map.get((pid, key))

    def cancel(self, pid: int, key: bytes) -> tuple[int, bytes] | None:
        """Look the key up and tell its session a cancel arrived."""
        target = self._map.get((pid, key))
        owner = self._owners.get((pid, key))
        if owner is not None:
            owner()
        return target

    def unregister(self, pid: int, key: bytes) -> None:
        self._map.pop((pid, key), None)
        self._owners.pop((pid, key), None)

    def __len__(self) -> int:
        return len(self._map)
