"""Integration fixtures: one real local stack per test session.

``stack`` is a :class:`pgwarden.stack.LocalStack` started in a temporary
directory by the same code as ``pgwarden up``: PostgreSQL 15 (seeded ``shop``
database, every statement logged to ``stack.pg_log``), the inline and the
ext_proc tap, and one Envoy serving the inline gateway, the ext_proc gateway
and a plain tcp_proxy baseline, all on 127.0.0.1 and free ports.

What tests use most:

- ``stack.app_dsn_direct``: role ``app`` on ``shop`` straight to PostgreSQL;
- ``stack.gateway_dsn[mode]``: the same through Envoy and the ``mode`` tap
  (``gateway_dsn`` fixture: the one for the parametrised ``mode``);
- ``stack.gateway_tls_dsn[mode]``: with ``sslmode=verify-full`` against the
  test CA (``stack.ca_file``); the tap terminates TLS;
- ``stack.envoy_tcp_dsn``: Envoy tcp_proxy straight to PostgreSQL (baseline);
- ``stack.upstream_dsn``: superuser over the unix socket, for set-up only;
- ``stack.pg_log_mark()`` / ``stack.pg_log_since(mark)``: what reached the
  server meanwhile (prove a blocked statement never did);
- ``stack.passwords`` for clients that cannot read a libpq passfile;
  ``stack.tap_pids``, ``stack.workdir``, ``stack.ports``.

DSNs carry ``passfile=`` rather than a password, so they can be printed in
assertion messages without leaking a secret.

``PGWARDEN_TEST_BACKEND`` picks how PostgreSQL, OPA and Envoy run: ``local``
processes (the default), ``containers`` (testcontainers; fails if no Docker
engine answers) or ``auto`` (containers when Docker answers). The rest of the
stack and every test are the same either way: pgwarden/stack_containers.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgwarden.stack import TAP_MODES, LocalStack, start_stack, stop_stack
from pgwarden.stack_containers import servers_from_env

Stack = LocalStack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    running = start_stack(tmp_path_factory.mktemp("stack"), ephemeral=True,
                          servers=servers_from_env())
    try:
        yield running
    finally:
        stop_stack(running, remove_data=True)


@pytest.fixture(params=TAP_MODES)
def mode(request: pytest.FixtureRequest) -> str:
    """The tap driver under test: every gateway test runs against both."""
    return str(request.param)


@pytest.fixture
def gateway_dsn(stack: LocalStack, mode: str) -> str:
    return stack.gateway_dsn[mode]


@pytest.fixture
def gateway_tls_dsn(stack: LocalStack, mode: str) -> str:
    return stack.gateway_tls_dsn[mode]
