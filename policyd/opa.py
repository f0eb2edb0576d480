"""Asking a real OPA server, through its REST Data API.

Queries go through opa-python-client's ``AsyncOpaClient.query_rule``
(``POST /v1/data/<package>/<rule>``). Its automatic Rego v0 -> v1 rewrite
applies only to policy uploads (``update_policy_from_string``'s
``rego_compat``, default True): :meth:`OpaEngine.put_policy` always passes
``rego_compat=False`` so a module is loaded exactly as its author wrote it,
or refused.

Fail closed: each call has a deadline; a refused connection, a timeout or
an HTTP error raises :class:`OpaUnavailable`, which the caller turns into a
deny. Nothing is kept between calls but the HTTP connection pool, so a
restarted OPA is used again on the next call.

The policy revision is a SHA-256 over every module OPA has loaded (id and
source, from ``GET /v1/policies``) and the ``data.pgwarden_data`` document.
It is polled (default every second) so an edit picked up by ``opa run
--watch`` changes the revision without anyone restarting; a decision carries
the revision known when it was taken (stale by at most one poll interval).

``GET /v1/policies`` carries every module's AST too (~300 kB for the default
pack), too much to fetch every second. When policyd sees the policy folder
OPA watches (``policy_dir``, e.g. a shared volume), each poll only stats its
files and asks OPA's ``/health``; the full fetch runs when a file changed
(repeatedly for a few seconds, until OPA has reloaded) and every
``full_poll_every`` seconds to catch policies pushed through OPA's REST API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from opa_client.opa_async import AsyncOpaClient

log = structlog.get_logger("policyd.opa")

STATEMENT_PACKAGE = "pgwarden.statement"
CONNECT_PACKAGE = "pgwarden.connect"
DECISION_RULE = "decision"
DATA_ROOT = "pgwarden_data"


class OpaUnavailable(Exception):
    """OPA could not answer within the deadline (down, slow, or erroring)."""


class OpaEngine:
    """One OPA server, its current revision, and the watchers of it."""

    def __init__(self, url: str, *, deadline: float = 0.5,
                 revision_interval: float = 1.0, policy_dir: Path | None = None,
                 full_poll_every: float = 30.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.url = f"{parts.scheme}://{parts.hostname}:{parts.port or 8181}"
        self.deadline = deadline
        self.revision_interval = revision_interval
        self.policy_dir = policy_dir
        self.full_poll_every = full_poll_every
        self._stamp: tuple[tuple[str, int, int], ...] = ()
        self._full_until = 0.0  # keep fetching in full until then (a reload pending)
        self._last_full = 0.0
        # retries=0: the deadline is ours to keep; a retry loop inside the
        # client would stretch a refused connection into seconds.
        self._client = AsyncOpaClient(host=parts.hostname or "127.0.0.1",
                                      port=parts.port or 8181, ssl=parts.scheme == "https",
                                      retries=0, timeout=deadline)
        self._http: aiohttp.ClientSession | None = None
        self._stack = contextlib.AsyncExitStack()
        self._revision = ""
        self._ready = False
        self._changed = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        # Called with (previous, new) whenever the revision changes, the
        # first one included (previous ""): policyd records it as evidence.
        self.on_change: Callable[[str, str], None] | None = None

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        await self._stack.enter_async_context(self._client)
        # Background fetches (revision, health) get more time than a decision:
        # a slow 300 kB /v1/policies must not make OPA look down.
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=max(5.0, self.deadline * 2)))
        await self.refresh_revision()
        self._poller = asyncio.create_task(self._poll(), name="opa-revision-poll")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self._stack.aclose()
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- queries ---------------------------------------------------------------
    @property
    def revision(self) -> str:
        return self._revision

    @property
    def ready(self) -> bool:
        """OPA answered the last revision poll."""
        return self._ready

    async def query(self, package: str, input_doc: dict[str, Any],
                    rule: str = DECISION_RULE) -> Any:
        """The rule's value, or None when undefined. Raises OpaUnavailable."""
        try:
            async with asyncio.timeout(self.deadline):
                body = await self._client.query_rule(input_doc, package, rule)
        except TimeoutError as exc:
            raise OpaUnavailable(f"no answer within {self.deadline * 1000:.0f} ms") from exc
        except aiohttp.ClientResponseError as exc:  # e.g. a policy eval error: HTTP 500
            raise OpaUnavailable(f"OPA answered HTTP {exc.status}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise OpaUnavailable(type(exc).__name__) from exc
        if not isinstance(body, dict):
            raise OpaUnavailable("unexpected response from OPA")
        return body.get("result")

    async def put_policy(self, module_id: str, source: str) -> None:
        """Load a module through the Policy API, verbatim (no v0 rewrite)."""
        async with asyncio.timeout(max(self.deadline, 30.0)):  # recompiles every module
            await self._client.update_policy_from_string(source, module_id, rego_compat=False)

    async def delete_policy(self, module_id: str) -> None:
        async with asyncio.timeout(max(self.deadline, 30.0)):  # recompiles every module
            await self._client.delete_policy(module_id)

    # -- revision --------------------------------------------------------------
    async def refresh_revision(self) -> str:
        """Recompute the revision from what OPA has loaded now."""
        try:
            revision = await self._compute_revision()
        except (OpaUnavailable, TimeoutError, aiohttp.ClientError, OSError, ValueError):
            if self._ready:
                log.warning("opa_unavailable", url=self.url)
            self._ready = False
            return self._revision
        if not self._ready:
            log.info("opa_available", url=self.url, policy_revision=revision)
        self._ready = True
        if revision != self._revision:
            if self._revision:
                log.info("policy_reloaded", previous=self._revision, policy_revision=revision)
            if self.on_change is not None:
                try:
                    self.on_change(self._revision, revision)
                except Exception as exc:  # the record failing must not stop decisions
                    log.error("policy_change_not_recorded", error=type(exc).__name__)
            self._revision = revision
            self._changed.set()
            self._changed = asyncio.Event()
        return revision

    async def _compute_revision(self) -> str:
        assert self._http is not None, "start() first"
        async with asyncio.timeout(max(5.0, self.deadline * 2)):
            async with self._http.get(f"{self.url}/v1/policies") as resp:
                resp.raise_for_status()
                policies = await resp.json()
            async with self._http.get(f"{self.url}/v1/data/{DATA_ROOT}") as resp:
                resp.raise_for_status()
                data = await resp.json()
        digest = hashlib.sha256()
        for module in sorted(policies.get("result", []), key=lambda m: m.get("id", "")):
            digest.update(module.get("id", "").encode())
            digest.update(b"\0")
            digest.update(module.get("raw", "").encode())
            digest.update(b"\0")
        digest.update(json.dumps(data.get("result"), sort_keys=True).encode())
        return "sha256:" + digest.hexdigest()[:16]

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.revision_interval)
            await self.poll_once()

    async def poll_once(self) -> None:
        """One poll: a full revision fetch when it may have changed, else a health check."""
        now = time.monotonic()
        if self.policy_dir is not None:
            stamp = _stamp(self.policy_dir)
            if stamp != self._stamp:
                self._stamp = stamp
                self._full_until = now + max(5.0, 5 * self.revision_interval)
        full = (self.policy_dir is None or not self._ready or now < self._full_until
                or now - self._last_full >= self.full_poll_every)
        if full:
            self._last_full = now
            await self.refresh_revision()
            return
        if not await self._healthy():
            log.warning("opa_unavailable", url=self.url)
            self._ready = False

    async def _healthy(self) -> bool:
        assert self._http is not None, "start() first"
        try:
            async with asyncio.timeout(self.deadline), self._http.get(
                    f"{self.url}/health") as resp:
                return resp.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def watch(self) -> AsyncIterator[tuple[str, bool]]:
        """(revision, ready) now, then after every change of the revision."""
        last: tuple[str, bool] | None = None
        while True:
            event = self._changed
            current = (self._revision, self._ready)
            if current != last:
                last = current
                yield current
            with contextlib.suppress(TimeoutError):
                # Readiness flips do not set the event; look again now and then.
                async with asyncio.timeout(self.revision_interval):
                    await event.wait()


def _stamp(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of every file under the policy folder: cheap to take."""
    out = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append((path, st.st_mtime_ns, st.st_size))
    return tuple(sorted(out))
