"""Which table column a result column is: RowDescription gives a table OID
and an attribute number; masking rules name ``schema.table.column``. And
which function a protocol-level FunctionCall names: it carries only the
function's OID, and the policy decides on ``schema.function`` as it does for
the same call written in SQL.

The catalog is loaded per database, off the data path, over a connection of
its own made with the gateway's credentials for ``catalog_role``; it is
refreshed periodically so new tables are picked up. Until a database's
catalog is loaded, columns have no identity: a statement whose plan has
column rules waits for the first load (``Runtime.decide``, bounded by
``catalog_wait``; a cached decision is not used meanwhile) and is refused
if it does not come, rather than leaving its rows to content detection
alone (which misses a stored value that fails the Luhn check).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from tap.protocol import quote_ident

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

_FUNCTIONS = """
SELECT p.oid::int8, n.nspname, p.proname, p.prorettype::int8
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
LIMIT 500000
"""

ColumnRow = tuple[int, int, str, str, str]  # table OID, attnum, schema, table, column
FunctionRow = tuple[int, str, str, int]  # function OID, schema, name, result type OID
Loader = Callable[[str], Awaitable[tuple[list[ColumnRow], list[FunctionRow]]]]


class Catalog:
    """(database, table OID, attnum) -> "schema.table.column", and
    (database, function OID) -> the function's quoted qualified name and its
    result type (a FunctionCall's result is masked by that type)."""

    def __init__(self, loader: Loader, *, max_age: float = 60.0) -> None:
        self._loader = loader
        self._max_age = max_age
        self._maps: dict[str, dict[tuple[int, int], str]] = {}
        # database -> function OID -> (quoted qualified name, result type OID)
        self._functions: dict[str, dict[int, tuple[str, int]]] = {}
        self._loaded_at: dict[str, float] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}

    def resolver(self, database: str) -> Callable[[int, int], str | None]:
        """A resolver for one database; triggers a (re)load when stale."""
        self.ensure(database)

        def resolve(table_oid: int, column: int) -> str | None:
            m = self._maps.get(database)
            return m.get((table_oid, column)) if m is not None else None
        return resolve

    def function_name(self, database: str, oid: int) -> str | None:
        """``"schema"."name"`` of the function with this OID, or None while
        the database's catalog is not loaded or no such function exists."""
        self.ensure(database)
        m = self._functions.get(database)
        found = m.get(oid) if m is not None else None
        return found[0] if found is not None else None

    def function_result_type(self, database: str, oid: int) -> int | None:
        """The result type OID of the function with this OID, or None while
        the database's catalog is not loaded or no such function exists."""
        m = self._functions.get(database)
        found = m.get(oid) if m is not None else None
        return found[1] if found is not None else None

    def loaded(self, database: str) -> bool:
        """Whether the database's catalog has been loaded (once at least)."""
        return database in self._maps

    async def wait_loaded(self, database: str, timeout: float) -> bool:
        """Wait (up to ``timeout``) until the database's catalog is loaded;
        True if it is. A FunctionCall that arrives before the first load
        waits here instead of being refused as unknown."""
        self.ensure(database)
        task = self._loading.get(database)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return self.loaded(database)

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
            rows, functions = await self._loader(database)
            self._maps[database] = {(oid, att): f"{ns}.{rel}.{col}"
                                    for oid, att, ns, rel, col in rows}
            self._functions[database] = {
                oid: (f"{quote_ident(ns)}.{quote_ident(name)}", rettype)
                for oid, ns, name, rettype in functions}
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
    async def load(database: str) -> tuple[list[ColumnRow], list[FunctionRow]]:
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
            columns = [(int(r[0]), int(r[1]), str(r[2]), str(r[3]), str(r[4]))
                       for r in await cur.fetchall()]
            cur = await conn.execute(_FUNCTIONS)
            functions = [(int(r[0]), str(r[1]), str(r[2]), int(r[3]))
                         for r in await cur.fetchall()]
            return columns, functions
    return load
