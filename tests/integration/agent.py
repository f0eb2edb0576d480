"""Helpers for tests of the governed gateway (token auth, policy, masking,
approvals, audit) that the `stack` fixture starts next to the data path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgwarden.devissuer import DevIssuer, ensure_dev_keys
from pgwarden.stack import LocalStack

MODES = ("inline", "extproc")


def agent_dsn(stack: LocalStack, mode: str, **params: Any) -> str:
    """Envoy → governed tap (TLS verify-full); the password is the token."""
    key = "PGWARDEN_AGENT_DSN" if mode == "inline" else "PGWARDEN_AGENT_EXTPROC_DSN"
    base = conninfo_to_dict(stack.extra_env[key])
    base.update(params)
    return make_conninfo("", **base)


def issuer(stack: LocalStack) -> DevIssuer:
    return ensure_dev_keys(stack.workdir / "identity")


def mint(stack: LocalStack, sub: str, groups: tuple[str, ...] | list[str], **kw: Any) -> str:
    return issuer(stack).mint(sub, groups=tuple(groups), **kw)


def policyd_target(stack: LocalStack) -> str:
    return stack.extra_env["PGWARDEN_POLICYD"]


def audit_url(stack: LocalStack) -> str:
    return stack.extra_env["PGWARDEN_AUDIT_URL"]


def config_path(stack: LocalStack) -> Path:
    return Path(stack.extra_env["PGWARDEN_CONFIG"])
