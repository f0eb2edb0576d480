"""Upstream credentials the gateway holds, per PostgreSQL role.

The agent never learns them (PCI DSS 8.6.2: no passwords in scripts or agents'
configuration); the tap uses them to log in to PostgreSQL as the role the policy
mapped the token to. Two sources, environment winning over the file field by
field so a deployment can keep a file and override one password from its secret
manager:

* a YAML (or JSON) file, refused when group or other can read or write it, like
  libpq refuses a loose ``~/.pgpass``::

      roles:
        etl: "..."                 # shorthand: password, scram-sha-256
        app_reader:
          method: scram-sha-256
          password: "..."
        reporting:
          method: cert
          cert_file: /etc/pgwarden/reporting.crt
          key_file: /etc/pgwarden/reporting.key

  A flat ``{"role": "password", ...}`` document (what ``pgwarden up`` writes
  to its ``secrets.json``) is read as that shorthand for every role.

* environment variables ``PGWARDEN_SECRET_<ROLE>_<FIELD>``, where ``<ROLE>`` is
  the role name upper-cased with every non-alphanumeric character turned into
  ``_`` and ``<FIELD>`` is ``METHOD``, ``PASSWORD``, ``PASSWORD_FILE``,
  ``CERT_FILE`` or ``KEY_FILE``.

Secret values are wrapped in :class:`Secret`, whose repr and str are masked, so
an accidental log line, exception or ``repr(credential)`` shows ``'***'``.
"""

from __future__ import annotations

import enum
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tap.hooks import UpstreamLogin

__all__ = [
    "ENV_PREFIX",
    "Method",
    "Secret",
    "SecretStore",
    "SecretsError",
    "UnknownRole",
    "UpstreamCredential",
    "env_role_name",
    "load_secrets",
]

ENV_PREFIX = "PGWARDEN_SECRET_"
# Longest first: "_PASSWORD_FILE" must not be read as role "X_PASSWORD" + "_FILE".
_ENV_FIELDS = ("PASSWORD_FILE", "CERT_FILE", "KEY_FILE", "PASSWORD", "METHOD")
_FILE_FIELDS = frozenset({"method", "password", "password_file", "cert_file", "key_file"})
_MAX_SECRET_FILE = 1 << 20


class SecretsError(Exception):
    """The secrets configuration is unusable; the message says how to fix it and
    never contains a secret value."""


class UnknownRole(SecretsError, KeyError):
    """No credential is configured for a role the policy mapped to."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Method(enum.StrEnum):
    """How the tap authenticates to PostgreSQL as the role."""

    SCRAM_SHA_256 = "scram-sha-256"
    MD5 = "md5"
    PASSWORD = "password"  # noqa: S105 - method name; cleartext only over TLS upstream
    TRUST = "trust"
    CERT = "cert"


_NEEDS_PASSWORD = frozenset({Method.SCRAM_SHA_256, Method.MD5, Method.PASSWORD})


class Secret:
    """A string that does not show itself. Call :meth:`reveal` at the one place
    that needs the value (the SCRAM exchange), nowhere else."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> Any:  # pickling would be one more way out
        raise TypeError("Secret values are not picklable")


@dataclass(frozen=True, slots=True)
class UpstreamCredential:
    """How to log in to PostgreSQL as ``role``. Safe to log: the password is a
    :class:`Secret` and the repr says only whether one is set."""

    role: str
    method: Method
    password: Secret | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    source: str = ""  # "file", "env" or "file+env": for operators, no secret

    def __repr__(self) -> str:
        parts = [f"role={self.role!r}", f"method={self.method.value!r}"]
        if self.password is not None:
            parts.append("password='***'")
        if self.cert_file is not None:
            parts.append(f"cert_file={str(self.cert_file)!r}")
        if self.key_file is not None:
            parts.append(f"key_file={str(self.key_file)!r}")
        if self.source:
            parts.append(f"source={self.source!r}")
        return f"UpstreamCredential({', '.join(parts)})"

    __str__ = __repr__

    def as_login(self) -> UpstreamLogin:
        """The tap's view of this credential (``tap.hooks.UpstreamLogin``): the
        one place the password leaves its :class:`Secret` wrapper, straight into
        a structure whose repr hides it too."""
        return UpstreamLogin(
            role=self.role,
            method=self.method.value,
            password=self.password.reveal() if self.password is not None else None,
            cert_file=str(self.cert_file) if self.cert_file is not None else None,
            key_file=str(self.key_file) if self.key_file is not None else None,
        )


def env_role_name(role: str) -> str:
    """The ``<ROLE>`` part of environment variable names for ``role``."""
    return re.sub(r"[^A-Za-z0-9]", "_", role).upper()


def _check_private(path: Path, what: str) -> None:
    """Refuse files others may read or write (group/other bits set)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SecretsError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise SecretsError(f"cannot stat {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SecretsError(f"{what} {path} is not a regular file")
    if st.st_mode & 0o077:
        raise SecretsError(
            f"{what} {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )


def _read_private(path: Path, what: str) -> str:
    _check_private(path, what)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(_MAX_SECRET_FILE + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretsError(f"cannot read {what} {path}: {type(exc).__name__}") from None
    if len(text) > _MAX_SECRET_FILE:
        raise SecretsError(f"{what} {path} is larger than {_MAX_SECRET_FILE} bytes")
    return text


def _build(
    role: str, fields: Mapping[str, str], source: str, base: Path | None
) -> UpstreamCredential:
    """A credential from string fields, or SecretsError naming the role and field."""

    def path_of(name: str) -> Path | None:
        value = fields.get(name)
        if not value:
            return None
        p = Path(value)
        return p if p.is_absolute() or base is None else base / p

    password: Secret | None = None
    if fields.get("password") is not None and fields.get("password_file"):
        raise SecretsError(f"role {role!r}: set password or password_file, not both")
    if fields.get("password") is not None:
        password = Secret(fields["password"])
    pw_file = path_of("password_file")
    if pw_file is not None:
        password = Secret(_read_private(pw_file, f"password file of role {role!r}").rstrip("\r\n"))

    cert_file, key_file = path_of("cert_file"), path_of("key_file")
    raw_method = fields.get("method")
    if raw_method:
        try:
            method = Method(raw_method.strip().lower())
        except ValueError:
            choices = ", ".join(m.value for m in Method)
            raise SecretsError(
                f"role {role!r}: unknown method {raw_method!r}; choose one of {choices}"
            ) from None
    elif password is not None:
        method = Method.SCRAM_SHA_256
    elif cert_file is not None:
        method = Method.CERT
    else:
        # Fail closed: "trust" must be asked for, never inferred from nothing.
        raise SecretsError(
            f"role {role!r}: no method and no password; set method (e.g. scram-sha-256) "
            f"and password, or PGWARDEN_SECRET_{env_role_name(role)}_PASSWORD"
        )

    if method in _NEEDS_PASSWORD and (password is None or password.reveal() == ""):
        raise SecretsError(
            f"role {role!r}: method {method.value} needs a password "
            f"(password, password_file or PGWARDEN_SECRET_{env_role_name(role)}_PASSWORD)"
        )
    if method is Method.CERT:
        if cert_file is None or key_file is None:
            raise SecretsError(f"role {role!r}: method cert needs cert_file and key_file")
        if not cert_file.is_file():
            raise SecretsError(f"role {role!r}: cert_file {cert_file} does not exist")
        # libpq refuses a key others can read; refuse it at load time, not at
        # the first connection.
        _check_private(key_file, f"key file of role {role!r}")
    return UpstreamCredential(
        role=role,
        method=method,
        password=password,
        cert_file=cert_file,
        key_file=key_file,
        source=source,
    )


class SecretStore:
    """Credentials by role, validated at load time so a broken entry stops the
    gateway at start rather than at a client's first connection."""

    def __init__(
        self,
        file_entries: Mapping[str, Mapping[str, str]] | None = None,
        env_entries: Mapping[str, Mapping[str, str]] | None = None,
        *,
        base_dir: Path | None = None,
        path: Path | None = None,
    ) -> None:
        self.path = path
        self._base = base_dir
        self._file = {k: dict(v) for k, v in (file_entries or {}).items()}
        self._env = {k: dict(v) for k, v in (env_entries or {}).items()}
        self._credentials: dict[str, UpstreamCredential] = {}
        for role in self._file:
            self._credentials[role] = self._resolve(role)
        for env_name in self._env:
            if not any(env_role_name(r) == env_name for r in self._file):
                # Environment-only roles are known by their normalised name; a
                # lookup with the real role name finds them through env_role_name.
                self._credentials[env_name] = self._resolve_env_only(env_name)

    def _resolve(self, role: str) -> UpstreamCredential:
        fields = dict(self._file[role])
        env = self._env.get(env_role_name(role), {})
        if env and ("password" in env or "password_file" in env):
            # An overriding password replaces both ways of giving one.
            fields.pop("password", None)
            fields.pop("password_file", None)
        fields.update(env)
        source = "file+env" if env else "file"
        return _build(role, fields, source, self._base)

    def _resolve_env_only(self, env_name: str) -> UpstreamCredential:
        return _build(env_name, self._env[env_name], "env", None)

    def roles(self) -> tuple[str, ...]:
        """Configured role names (environment-only roles in their env spelling)."""
        return tuple(sorted(self._credentials))

    def for_role(self, role: str) -> UpstreamCredential:
        """The credential to log in as ``role``; :class:`UnknownRole` otherwise."""
        cred = self._credentials.get(role)
        if cred is not None:
            return cred
        env_cred = self._credentials.get(env_role_name(role))
        if env_cred is not None and env_role_name(role) in self._env:
            return UpstreamCredential(
                role=role,
                method=env_cred.method,
                password=env_cred.password,
                cert_file=env_cred.cert_file,
                key_file=env_cred.key_file,
                source=env_cred.source,
            )
        raise UnknownRole(
            f"no upstream credential for role {role!r}; add it to the secrets file or set "
            f"{ENV_PREFIX}{env_role_name(role)}_PASSWORD"
        )

    def __contains__(self, role: object) -> bool:
        if not isinstance(role, str):
            return False
        return role in self._credentials or env_role_name(role) in self._env

    def __repr__(self) -> str:
        return f"SecretStore(roles={list(self.roles())!r}, path={str(self.path)!r})"


def _env_entries(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    entries: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):]
        for suffix in _ENV_FIELDS:
            if rest.endswith("_" + suffix) and len(rest) > len(suffix) + 1:
                role = rest[: -(len(suffix) + 1)]
                entries.setdefault(role, {})[suffix.lower()] = value
                break
    return entries


def _file_entries(path: Path) -> dict[str, dict[str, str]]:
    text = _read_private(path, "secrets file")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # The YAML error shows the offending line, which may hold a password.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise SecretsError(f"secrets file {path} is not valid YAML/JSON{where}") from None
    if doc is None:
        return {}
    if (
        isinstance(doc, dict)
        and "roles" not in doc
        and doc
        and all(isinstance(k, str) and isinstance(v, str) for k, v in doc.items())
    ):
        # Shorthand {role: password}, as `pgwarden up` writes its secrets.json.
        doc = {"roles": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("roles", {}), dict):
        raise SecretsError(f"secrets file {path}: expected a mapping with a 'roles' mapping")
    unknown_top = set(doc) - {"roles"}
    if unknown_top:
        raise SecretsError(f"secrets file {path}: unknown keys {sorted(unknown_top)}")
    entries: dict[str, dict[str, str]] = {}
    for role, spec in (doc.get("roles") or {}).items():
        if not isinstance(role, str) or not role:
            raise SecretsError(f"secrets file {path}: role names must be non-empty strings")
        if isinstance(spec, str):
            spec = {"password": spec}  # shorthand: a password alone means SCRAM
        if not isinstance(spec, dict):
            raise SecretsError(
                f"secrets file {path}: role {role!r} must be a mapping or a password string"
            )
        unknown = set(spec) - _FILE_FIELDS
        if unknown:
            raise SecretsError(
                f"secrets file {path}: role {role!r} has unknown fields {sorted(map(str, unknown))}"
            )
        fields: dict[str, str] = {}
        for key, value in spec.items():
            if value is None:
                continue
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise SecretsError(f"secrets file {path}: role {role!r} field {key!r} must be text")
            fields[key] = str(value)
        entries[role] = fields
    return entries


def load_secrets(
    path: Path | str | None = None, *, environ: Mapping[str, str] | None = None
) -> SecretStore:
    """Load credentials from ``path`` (when given) and the environment.

    Raises :class:`SecretsError` when the file is readable or writable by group
    or others (the message says what to chmod), unreadable, malformed, or when
    an entry is incomplete. Relative ``*_file`` paths in the file are relative
    to the file's directory.
    """
    env = _env_entries(os.environ if environ is None else environ)
    if path is None:
        return SecretStore({}, env)
    p = Path(path)
    return SecretStore(_file_entries(p), env, base_dir=p.parent, path=p)
