"""Assemble a tap :class:`~tap.runtime.Runtime` from the configuration:
the policy client and its in-process decision cache, the token
authenticator with the gateway-held credentials, masking and the audit sink.

This is the one module that imports the service packages; the session and
the drivers never do.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import structlog

from pgwarden import metrics
from pgwarden.config import PgwardenConfig
from tap.hooks import Decision, Identity, StatementRequest
from tap.runtime import AUDIT_DENY, Runtime, TapSettings
from tap.session import Hooks

log = structlog.get_logger("pgwarden.tap")


def tap_settings(config: PgwardenConfig) -> TapSettings:
    tap = config.tap
    return TapSettings(
        tls_cert=str(tap.tls.cert_file) if tap.tls.cert_file else None,
        tls_key=str(tap.tls.key_file) if tap.tls.key_file else None,
        require_client_tls=tap.tls.require and bool(tap.tls.cert_file),
        upstream_sslmode=tap.upstream_tls.sslmode,
        upstream_ca=str(tap.upstream_tls.ca_file) if tap.upstream_tls.ca_file else None,
        upstream_hostname=tap.upstream_tls.server_hostname,
        max_message_size=tap.max_message_size,
        auth_mode=tap.auth_mode,
        allow_plaintext_tokens=tap.allow_plaintext_tokens,
        idle_timeout=tap.idle_timeout_seconds,
        max_result_bytes=tap.max_result_bytes,
    )


async def _deny_all(request: StatementRequest) -> Decision:
    from policyd import decision as dec

    return dec.deny("no policy service is configured for this gateway; every statement is refused")


async def build_runtime(config: PgwardenConfig, stack: AsyncExitStack) -> Runtime:
    """A runtime whose resources are closed with ``stack``."""
    runtime = Runtime(settings=tap_settings(config))
    tap = config.tap
    decide_cached: Any = None
    if tap.policyd is not None:
        from policyd.client import DecisionCache, PolicyClient

        client = PolicyClient(tap.policyd.target, deadline=tap.policyd.deadline_seconds,
                              cache=DecisionCache(tap.policyd.cache_size))
        await stack.enter_async_context(client)
        runtime.decider = client.decide
        decide_cached = client.cache.get
        runtime.policy_client = client
        if tap.approvals:
            from policyd.approvals.client import ApprovalClient

            approvals = ApprovalClient(tap.policyd.target)
            await stack.enter_async_context(approvals)
            runtime.approvals = approvals
    else:
        runtime.decider = _deny_all

    masking, catalog = _masking(config)
    function_name = catalog.function_name if catalog is not None else None
    result_type = catalog.function_result_type if catalog is not None else None
    runtime.catalog = catalog

    cached = decide_cached if decide_cached is not None else (lambda _r: None)

    def guarded(request: StatementRequest) -> Decision | None:
        if not runtime.audit_ok:
            return AUDIT_DENY
        found = cached(request)
        if found is not None and runtime.needs_catalog(found, request.session.database):
            found = None  # the slow path waits for the catalog (Runtime.decide)
        if found is not None:
            metrics.DECISION_CACHE_HITS.inc()
        else:
            metrics.DECISION_CACHE_MISSES.inc()
        return found

    def hooks() -> Hooks:
        return Hooks(decide_cached=guarded, masker_factory=masking, function_name=function_name,
                     function_result_type=result_type)

    if tap.audit is not None:
        runtime.audit = _audit_sink(config, stack)

    runtime.hook_factory = hooks

    if tap.auth_mode == "token":
        runtime.authenticator = _token_authenticator(config, runtime)
    return runtime


def _token_authenticator(config: PgwardenConfig, runtime: Runtime) -> Any:
    from policyd.identity import (
        ConnectGrant,
        FailureThrottle,
        IdentitySettings,
        TokenAuthenticator,
        TokenValidator,
    )
    from policyd.secrets import load_secrets

    if config.identity is None:
        raise SystemExit("auth_mode 'token' needs an 'identity:' section (issuer, audience, JWKS)")
    validator = TokenValidator(IdentitySettings.model_validate(config.identity))
    credentials = load_secrets(config.tap.secrets_file)
    client = getattr(runtime, "policy_client", None)

    async def decide_connect(identity: Identity, database: str, user: str) -> ConnectGrant:
        if client is None:
            return ConnectGrant(role=None, reason="no policy service configured")
        d = await client.decide_connect(identity, database)
        if not d.allowed:
            return ConnectGrant(role=None, reason="; ".join(d.reasons) or "not allowed",
                                decision_id=d.decision_id)
        return ConnectGrant(role=d.upstream_role, decision_id=d.decision_id)

    return TokenAuthenticator(validator, credentials, decide_connect, throttle=FailureThrottle())


def _mask_key(config: PgwardenConfig) -> bytes:
    import os
    import secrets as pysecrets

    mask = config.tap.mask
    if mask.hmac_key_file is not None:
        raw = mask.hmac_key_file.read_bytes().strip()
        if len(raw) < 32:
            raise SystemExit(f"{mask.hmac_key_file}: the masking key must hold at least 32 bytes")
        return raw
    if mask.hmac_key_env and os.environ.get(mask.hmac_key_env):
        return os.environ[mask.hmac_key_env].encode()
    log.warning("mask_key_ephemeral", detail="no masking key configured: hmac masking and result "
                "digests use a per-process key and cannot be compared across restarts")
    return pysecrets.token_bytes(32)


def _masking(config: PgwardenConfig) -> tuple[Any, Any]:
    """The masking factory and the catalog (None without ``catalog_role``)
    that names result columns and FunctionCall targets."""
    from tap.catalog import Catalog, psycopg_loader
    from tap.masking import MaskingFactory

    tap = config.tap
    lookup = None
    catalog = None
    if tap.catalog_role is not None:
        from policyd.secrets import load_secrets

        cred = load_secrets(tap.secrets_file).for_role(tap.catalog_role)
        host, _, port = tap.upstream.rpartition(":")
        ssl = tap.upstream_tls
        catalog = Catalog(psycopg_loader(
            host, int(port), tap.catalog_role,
            cred.password.reveal() if cred.password is not None else None,
            sslmode=ssl.sslmode if ssl.sslmode != "disable" else "disable",
            sslrootcert=str(ssl.ca_file) if ssl.ca_file else None))
        lookup = catalog.resolver
    factory = MaskingFactory(key=_mask_key(config))
    if lookup is not None:
        factory.catalog = lookup
    return factory, catalog


def _audit_sink(config: PgwardenConfig, stack: AsyncExitStack) -> Any:
    import socket

    from policyd.audit.writer import AuditWriter
    from tap.audit_sink import AuditSink

    audit = config.tap.audit
    assert audit is not None
    audit.spool_dir.mkdir(parents=True, exist_ok=True)
    sink = None
    if audit.ship_to == "policyd" and config.tap.policyd is not None:
        from policyd.audit.sinks import GrpcSink

        # Store writes (validation, hashing, inserts) happen in policyd's
        # process; the tap only appends to its spool and ships it.
        sink = GrpcSink(config.tap.policyd.target)
    writer = AuditWriter(
        audit.url, audit.spool_dir / f"tap-{config.tap.listen.replace(':', '_')}.spool",
        fail_closed=audit.on_spool_failure == "refuse", component="tap",
        signing_key=audit.signing_key_file, checkpoint_file=audit.checkpoint_file, sink=sink)
    writer.start()
    stack.callback(writer.close)
    return AuditSink(writer, instance=f"{socket.gethostname()}:{config.tap.listen}")
