"""One YAML file for every pgwarden daemon, validated by pydantic.

Every setting has a safe default (TLS required for tokens, fail closed, no
policy means *deny*, not allow). Environment variables override the file:
``PGWARDEN__TAP__LISTEN=127.0.0.1:7000`` sets ``tap.listen`` (double
underscores separate the path). Secrets are referenced (a file path or an
environment variable name), never written inline.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "PGWARDEN__"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _hostport(value: str) -> str:
    if value.startswith("unix:"):
        return value
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (or unix:/path), got {value!r}")
    return value


class ClientTLS(_Strict):
    cert_file: Path | None = None
    key_file: Path | None = None
    require: bool = True

    @model_validator(mode="after")
    def _pair(self) -> ClientTLS:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        return self


class UpstreamTLSConfig(_Strict):
    sslmode: Literal["disable", "require", "verify-ca", "verify-full"] = "verify-full"
    ca_file: Path | None = None
    server_hostname: str | None = None


class PolicyTarget(_Strict):
    target: str = "127.0.0.1:50061"
    deadline_seconds: float = Field(1.0, gt=0, le=30)
    cache_size: int = Field(10_000, ge=0)

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return _hostport(value)


class MaskConfig(_Strict):
    hmac_key_file: Path | None = None
    hmac_key_env: str | None = "PGWARDEN_MASK_KEY"


class AuditSinkConfig(_Strict):
    url: str = "sqlite:///.run/audit.db"
    spool_dir: Path = Path(".run/spool")
    checkpoint_file: Path = Path(".run/audit-checkpoints.jsonl")
    signing_key_file: Path = Path(".run/identity/audit-signing.key")
    # "refuse": when neither the store nor the spool can take an event, new
    # statements are refused (PCI DSS 10.7.2). "allow" is for development only.
    on_spool_failure: Literal["refuse", "allow"] = "refuse"
    # Where the tap's spool is shipped: to policyd's audit sink service
    # (store writes off the tap's CPU), or straight into the store.
    ship_to: Literal["policyd", "store"] = "policyd"


class TapConfig(_Strict):
    listen: str = "127.0.0.1:6543"
    upstream: str = "127.0.0.1:5432"
    tls: ClientTLS = Field(default_factory=ClientTLS)
    upstream_tls: UpstreamTLSConfig = Field(default_factory=UpstreamTLSConfig)
    auth_mode: Literal["token", "passthrough"] = "token"
    allow_plaintext_tokens: bool = False
    max_message_size: int = Field(64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    idle_timeout_seconds: float = Field(900, gt=0)  # PCI DSS 8.2.8: 15 minutes
    # Largest result (DataRow and CopyData bytes) one execution may return;
    # past it the session ends with SQLSTATE 54000. None: no limit.
    max_result_bytes: int | None = Field(None, ge=1024)
    # SIGTERM: statements in flight get this long to finish before their
    # sessions are ended (keep it under the pod's termination grace period).
    drain_seconds: float = Field(10, ge=0, le=3600)
    secrets_file: Path | None = None
    # Role whose gateway-held credentials read pg_attribute, so masking rules
    # can name table columns (none: content detection only).
    catalog_role: str | None = None
    policyd: PolicyTarget | None = Field(default_factory=PolicyTarget)
    # Held statements wait for a human through policyd's approval service
    # (same target); without it a statement needing approval is refused.
    approvals: bool = True
    mask: MaskConfig = Field(default_factory=MaskConfig)
    audit: AuditSinkConfig | None = Field(default_factory=AuditSinkConfig)
    health_listen: str | None = None

    @field_validator("listen", "upstream")
    @classmethod
    def _addresses(cls, value: str) -> str:
        return _hostport(value)

    @model_validator(mode="after")
    def _safe(self) -> TapConfig:
        if self.auth_mode == "token" and not self.tls.cert_file and not self.allow_plaintext_tokens:
            raise ValueError("auth_mode 'token' needs tls.cert_file and tls.key_file "
                             "(tokens must not cross the network in clear); set "
                             "allow_plaintext_tokens: true only for loopback development")
        return self


class PolicydConfig(_Strict):
    listen: str = "127.0.0.1:50061"
    opa_url: str = "http://127.0.0.1:8181"
    opa_deadline_seconds: float = Field(0.5, gt=0, le=30)


class PgwardenConfig(_Strict):
    tap: TapConfig = Field(default_factory=lambda: TapConfig(allow_plaintext_tokens=True))
    policyd: PolicydConfig = Field(default_factory=PolicydConfig)
    identity: dict[str, Any] | None = None  # policyd.identity.IdentitySettings fields


class ConfigError(Exception):
    """Every problem of a configuration file, each with its path and a hint."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> None:
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__") if p]
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[path[-1]] = yaml.safe_load(value) if value else value


def load(path: Path | str | None, environ: dict[str, str] | None = None) -> PgwardenConfig:
    """Read, override from the environment, validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML ({exc})"]) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping"])
        data = loaded or {}
    _apply_env(data, dict(os.environ if environ is None else environ))
    try:
        config = PgwardenConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(err) for err in exc.errors()]) from exc
    if config.identity is not None:
        from policyd.identity import IdentitySettings

        try:
            IdentitySettings.model_validate(config.identity)
        except ValidationError as exc:
            raise ConfigError([_describe(err, prefix=("identity",)) for err in exc.errors()]) from exc
    return config


def _describe(err: Any, prefix: tuple[str, ...] = ()) -> str:
    where = ".".join(str(p) for p in (*prefix, *err["loc"])) or "(top level)"
    kind = err["type"]
    hint = {
        "extra_forbidden": "unknown setting: check its spelling and section",
        "missing": "this setting is required",
        "literal_error": "use one of the values listed",
    }.get(kind, "")
    return f"{where}: {err['msg']}" + (f" (hint: {hint})" if hint else "")
