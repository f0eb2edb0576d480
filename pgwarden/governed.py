"""The governed gateway of the local stack: what an agent actually uses.

Next to the transparent data-path taps (client credentials passed through,
every statement allowed: ``PGWARDEN_GATEWAY_DSN``), this starts the full
product: OPA on ``rego/``, policyd, a development OIDC issuer, and two taps
(inline and ext_proc) that accept only a token over TLS, decide every
statement with the policy, mask results, hold risky statements for approval,
log in to PostgreSQL with credentials only they hold, and record everything
in the audit store. Envoy fronts them on ``PGWARDEN_AGENT_DSN`` (inline) and
``PGWARDEN_AGENT_EXTPROC_DSN`` (ext_proc).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml
from psycopg.conninfo import make_conninfo

from pgwarden import stack as st

ROLE_FOR_CATALOG = "fraud_reader"


def _policyd_command() -> list[str]:
    return [sys.executable, "-m", "policyd.cli"]


def write_config(stack: st.LocalStack, *, policyd_port: int, tap_listen: str,
                 opa_url: str | None = None) -> Path:
    """The YAML configuration the governed taps run with (no inline secret:
    passwords stay in the 0600 secrets file, the key in its own file)."""
    from pgwarden.devissuer import ensure_dev_keys

    issuer = ensure_dev_keys(stack.workdir / "identity")
    key_file = stack.workdir / "identity" / "mask.key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    identity = issuer.identity_settings(audience="pgwarden").model_dump(mode="json",
                                                                       exclude_none=True)
    config: dict[str, Any] = {
        "tap": {
            "listen": tap_listen,
            "upstream": f"{st.HOST}:{stack.postgres.port}",
            "tls": {"cert_file": str(stack.certs.server_cert),
                    "key_file": str(stack.certs.server_key), "require": True},
            "upstream_tls": {"sslmode": "verify-full", "ca_file": str(stack.certs.ca),
                             "server_hostname": "localhost"},
            "auth_mode": "token",
            "secrets_file": str(stack.secrets.file),
            "catalog_role": ROLE_FOR_CATALOG,
            "policyd": {"target": f"{st.HOST}:{policyd_port}", "deadline_seconds": 2.0},
            "mask": {"hmac_key_file": str(key_file)},
            "audit": {"url": f"sqlite:///{stack.workdir / 'audit.db'}",
                      "spool_dir": str(stack.workdir / "spool"),
                      "checkpoint_file": str(stack.workdir / "audit-checkpoints.jsonl"),
                      "signing_key_file": str(stack.workdir / "identity" / "audit-signing.key")},
        },
        # A shared 2-core machine answers in far less, but not always
        # within OPA's 0.5 s default.
        "policyd": {"listen": f"{st.HOST}:{policyd_port}", "opa_deadline_seconds": 2.0,
                    **({"opa_url": opa_url} if opa_url else {})},
        "identity": identity,
    }
    path = stack.workdir / "pgwarden.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_governed(stack: st.LocalStack) -> st.ServiceContribution:
    """OPA, policyd, two governed taps and their Envoy (registered service).
    If any of them fails to start, the ones already started are stopped."""
    contribution = st.ServiceContribution()
    try:
        return _start(stack, contribution)
    except BaseException:
        for proc in reversed(contribution.procs):
            st.stop(proc)
        raise


def _start(stack: st.LocalStack, contribution: st.ServiceContribution) -> st.ServiceContribution:
    workdir = stack.workdir
    repo = Path(__file__).resolve().parent.parent
    opa_port = st.free_port()
    opa = stack.servers.opa(workdir, repo / "rego", opa_port)
    contribution.procs.append(opa)

    policyd_port = st.free_port()
    config = write_config(stack, policyd_port=policyd_port, tap_listen=f"{st.HOST}:0",
                          opa_url=f"http://{st.HOST}:{opa_port}")
    # Where it listens, its OPA and OPA's deadline come from the config's
    # `policyd` section, as in a deployment.
    policyd = st.spawn("policyd", [*_policyd_command(), "serve", "--policy-dir",
                                   str(repo / "rego"), "--config", str(config)],
                       workdir / "policyd.log")
    policyd.ports["grpc"] = policyd_port
    contribution.procs.append(policyd)
    st.wait_for_port(policyd_port, proc=policyd)

    ports: dict[str, int] = {}
    for mode in st.TAP_MODES:
        port = st.free_port()
        ports[mode] = port
        proc = st.start_tap(mode, port, stack.postgres.port, None,
                            ["--config", str(config)], workdir=workdir, name=f"agent-tap-{mode}")
        contribution.procs.append(proc)

    values: dict[str, object] = {
        "ADMIN_PORT": st.free_port(), "ENVOY_TCP_PORT": st.free_port(),
        "POSTGRES_PORT": stack.postgres.port, "MAX_CONNECTIONS": st.MAX_CONNECTIONS,
        "GATEWAY_INLINE_PORT": st.free_port(), "GATEWAY_EXTPROC_PORT": st.free_port(),
        "TAP_INLINE_PORT": ports["inline"], "TAP_EXTPROC_PORT": ports["extproc"],
    }
    envoy_config = st.compose_envoy(["inline.yaml", "extproc.yaml"], workdir / "envoy-agent.yaml",
                                    **values)
    envoy = stack.servers.envoy(envoy_config, workdir=workdir,
                                admin_port=int(str(values["ADMIN_PORT"])),
                                listen_ports=[int(str(values["GATEWAY_INLINE_PORT"])),
                                              int(str(values["GATEWAY_EXTPROC_PORT"]))],
                                name="envoy-agent")
    envoy.ports["inline"] = int(str(values["GATEWAY_INLINE_PORT"]))
    envoy.ports["extproc"] = int(str(values["GATEWAY_EXTPROC_PORT"]))
    contribution.procs.append(envoy)

    console_port = st.free_port()
    console = st.spawn("console", [st.tap_command()[0], "console", "serve", "--listen",
                                   f"{st.HOST}:{console_port}", "--store",
                                   f"sqlite:///{workdir / 'audit.db'}", "--identity-config",
                                   str(config), "--key",
                                   str(workdir / "identity" / "audit-signing.key"),
                                   "--checkpoints", str(workdir / "audit-checkpoints.jsonl")],
                       workdir / "console.log")
    console.ports["http"] = console_port
    contribution.procs.append(console)
    st.wait_for_port(console_port, proc=console)

    def agent_dsn(port: int) -> str:
        return make_conninfo("", host="localhost", port=port, dbname="shop", user="agent",
                             sslmode="verify-full", sslrootcert=str(stack.certs.ca))

    contribution.env.update({
        "PGWARDEN_AGENT_DSN": agent_dsn(envoy.ports["inline"]),
        "PGWARDEN_AGENT_EXTPROC_DSN": agent_dsn(envoy.ports["extproc"]),
        "PGWARDEN_CONFIG": str(config),
        "PGWARDEN_POLICYD": f"{st.HOST}:{policyd_port}",
        "PGWARDEN_CONSOLE_URL": f"http://{st.HOST}:{console_port}/",
        "PGWARDEN_OPA_URL": f"http://{st.HOST}:{opa_port}",
        "PGWARDEN_AUDIT_URL": f"sqlite:///{workdir / 'audit.db'}",
        "PGWARDEN_IDENTITY_DIR": str(workdir / "identity"),
        "PGWARDEN_AUDIT_KEY": str(workdir / "identity" / "audit-signing.key"),
        "PGWARDEN_AUDIT_CHECKPOINTS": str(workdir / "audit-checkpoints.jsonl"),
    })
    return contribution
