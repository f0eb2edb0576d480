"""Which table column a result column is: RowDescription gives a table OID
and an attribute number; masking rules name ``schema.table.column``.

The catalog is loaded per database, off the data path, over a connection of
its own made with the gateway's credentials for ``catalog_role``; it is
refreshed periodically so new tables are picked up. Until a database's
catalog is loaded, columns have no identity and only content detection
applies to them (which still catches every Luhn-valid PAN); the window is the
first statement of the first session to a database after start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("pgwarden.tap.catalog")

_QUERY = """
SELECT c.oid::int8, a.attnum::int4, n.nspname, c.relname, a.attname
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%'
LIMIT 500000
"""

Loader = Callable[[str], Awaitable[list[tuple[int, int, str, str, str]]]]


class Catalog:
    """(database, table OID, attnum) -> "schema.table.column"."""

    def __init__(self, loader: Loader, *, max_age: float = 60.0) -> None:
        self._loader = loader
        self._max_age = max_age
        self._maps: dict[str, dict[tuple[int, int], str]] = {}
        self._loaded_at: dict[str, float] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}

    def resolver(self, database: str) -> Callable[[int, int], str | None]:
        """A resolver for one database; triggers a (re)load when stale."""
        self.ensure(database)

        def resolve(table_oid: int, column: int) -> str | None:
            m = self._maps.get(database)
            return m.get((table_oid, column)) if m is not None else None
        return resolve

    def ensure(self, database: str) -> None:
        fresh = time.monotonic() - self._loaded_at.get(database, -1e9) < self._max_age
        if fresh or database in self._loading:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._loading[database] = loop.create_task(self._load(database))

    async def _load(self, database: str) -> None:
        try:
            rows = await self._loader(database)
            self._maps[database] = {(oid, att): f"{ns}.{rel}.{col}"
                                    for oid, att, ns, rel, col in rows}
            self._loaded_at[database] = time.monotonic()
        except Exception as exc:
            log.warning("catalog_load_failed", database=database, error=exc.__class__.__name__)
            self._loaded_at[database] = time.monotonic() - self._max_age + 5  # retry in 5 s
        finally:
            self._loading.pop(database, None)

    async def load_now(self, database: str) -> None:
        await self._load(database)


def psycopg_loader(host: str, port: int, role: str, password: str | None,
                   sslmode: str = "prefer", sslrootcert: str | None = None) -> Loader:
    async def load(database: str) -> list[tuple[int, int, str, str, str]]:
        import psycopg

        kwargs: dict[str, object] = {"host": host, "port": port, "user": role, "dbname": database,
                                     "sslmode": sslmode, "connect_timeout": 5,
                                     "application_name": "pgwarden-catalog"}
        if password is not None:
            kwargs["password"] = password
        if sslrootcert:
            kwargs["sslrootcert"] = sslrootcert
        async with await psycopg.AsyncConnection.connect(**kwargs) as conn:  # type: ignore[arg-type]
            cur = await conn.execute(_QUERY)
            return [(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]))
                    for r in await cur.fetchall()]
    return load
