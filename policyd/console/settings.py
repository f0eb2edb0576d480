"""What the console needs to know: where the evidence is, how tokens are
validated, and which groups may read or decide."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from policyd.identity import IdentitySettings


@dataclass(frozen=True)
class ConsoleSettings:
    """Console configuration; every default is the restrictive choice.

    ``reader_groups`` may sign in and read; ``approver_groups`` may also
    approve or deny held statements. A valid token in neither is refused at
    sign-in, so an agent's own token does not open the evidence of others.
    """

    store_url: str
    identity: IdentitySettings
    approvals_url: str | None = None  # default: the audit store's URL
    reader_groups: frozenset[str] = frozenset({"auditors"})
    approver_groups: frozenset[str] = frozenset({"approvers"})
    session_seconds: float = 900.0  # PCI DSS 8.2.8: 15 minutes
    cookie_secure: bool = True
    signing_key: Path | None = None  # audit checkpoint key (or its .pub) for verify
    checkpoints: Path | None = None
    max_sessions_listed: int = 500

    @property
    def console_groups(self) -> frozenset[str]:
        return self.reader_groups | self.approver_groups


def load_identity_config(path: Path) -> IdentitySettings:
    """Identity settings from a YAML file: either a pgwarden configuration
    (its ``identity`` section) or a file holding just those settings.

    Relative ``jwks_file`` paths are taken from the current directory, as
    everywhere else in pgwarden."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of identity settings")
    section = data.get("identity", data)
    if not isinstance(section, dict):
        raise ValueError(f"{path}: 'identity' must be a mapping")
    return IdentitySettings.model_validate(section)
