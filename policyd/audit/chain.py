"""Tamper evidence: signed checkpoints, verification and pruning
(PCI DSS 10.3.2-10.3.4, 10.5.1).

The hash chain alone shows that records were changed, deleted, inserted or
reordered *unless* the whole chain after the change was recomputed: anyone
with write access to the store can do that, since SHA-256 needs no key. So
the chain head is signed, every N records or T seconds, with an Ed25519 key
that lives outside the database (a key file, mode 0600), and the signature
goes to a separate append-only checkpoint file. A rewritten chain no longer
matches the signed hashes; records deleted from the end are missing below a
signed ``seq``. Records written after the last checkpoint are protected by the
chain only, until the next checkpoint: that window is N records / T seconds.

Each checkpoint line also carries the SHA-256 of the line before it, so
removing or editing a checkpoint line is itself detected.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from policyd.audit.events import format_ts
from policyd.audit.models import GENESIS, chain_hash
from policyd.audit.store import AuditStore, Record

DEFAULT_KEY = ".run/audit-signing.key"
DEFAULT_CHECKPOINTS = ".run/audit-checkpoints.jsonl"
CHECKPOINT_VERSION = 1


class SigningKeyError(Exception):
    """The signing key is missing, unreadable or too widely readable."""


def key_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get("PGWARDEN_AUDIT_KEY") or DEFAULT_KEY)


def checkpoints_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get("PGWARDEN_AUDIT_CHECKPOINTS") or DEFAULT_CHECKPOINTS)


def load_or_create_key(path: Path, *, create: bool = True) -> Ed25519PrivateKey:
    """Load the PEM Ed25519 key at ``path``; generate it (mode 0600) if absent
    and ``create`` (development). Refuses a key readable by group or others."""
    if not path.exists():
        if not create:
            raise SigningKeyError(f"audit signing key {path} not found")
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        pub = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        path.with_suffix(".pub").write_bytes(pub)
        return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SigningKeyError(f"audit signing key {path} has mode {mode:o}; run `chmod 600 {path}`")
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is not an Ed25519 private key")
    return loaded


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        return load_or_create_key(path, create=False).public_key()
    loaded = serialization.load_pem_public_key(data)
    if not isinstance(loaded, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is not an Ed25519 public key")
    return loaded


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class CheckpointLog:
    """The append-only checkpoint file. ``append`` signs; ``read`` does not
    verify (``verify`` does)."""

    def __init__(self, path: Path, key: Ed25519PrivateKey | None = None) -> None:
        self.path = path
        self.key = key

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def append(self, kind: str, seq: int, head_hash: str, **extra: Any) -> dict[str, Any]:
        """Sign and append a checkpoint of the chain head ``(seq, head_hash)``."""
        if self.key is None:
            raise SigningKeyError("no signing key loaded")
        with self._locked() as fd:
            lines = self._lines()
            prev = hashlib.sha256(lines[-1].encode()).hexdigest() if lines else GENESIS
            body: dict[str, Any] = {
                "v": CHECKPOINT_VERSION,
                "kind": kind,
                "seq": seq,
                "hash": head_hash,
                "ts": format_ts(datetime.now(UTC)),
                "prev": prev,
                "key_id": key_id(self.key.public_key()),
                **extra,
            }
            body["sig"] = base64.b64encode(self.key.sign(_canonical(body))).decode()
            os.write(fd, json.dumps(body, sort_keys=True).encode() + b"\n")
            os.fsync(fd)
        return body

    def _lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return [ln for ln in self.path.read_text().splitlines() if ln.strip()]

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self._lines()]


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of ``verify``; ``table``/``seq`` name the record."""

    kind: str  # changed | deleted | inserted | reordered | broken_link | session_chain | checkpoint
    table: str
    seq: int
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.table} seq {self.seq}: {self.message}"


@dataclass
class VerifyReport:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    checkpoints_covered: int = 0
    start: str = "genesis"
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "checkpoints": self.checkpoints,
            "checkpoints_covered": self.checkpoints_covered,
            "start": self.start,
            "problems": [
                {"kind": p.kind, "table": p.table, "seq": p.seq, "message": p.message}
                for p in self.problems
            ],
        }


def _check_checkpoints(
    cps: list[dict[str, Any]], lines: list[str], public: Ed25519PublicKey | None
) -> list[Problem]:
    problems: list[Problem] = []
    prev = GENESIS
    for i, (cp, line) in enumerate(zip(cps, lines, strict=True), start=1):
        body = {k: v for k, v in cp.items() if k != "sig"}
        if cp.get("prev") != prev:
            problems.append(
                Problem(
                    "checkpoint",
                    "checkpoints",
                    int(cp.get("seq", 0)),
                    f"checkpoint line {i} does not follow line {i - 1} "
                    "(a checkpoint was removed or edited)",
                )
            )
        if public is not None:
            try:
                public.verify(base64.b64decode(cp.get("sig", "")), _canonical(body))
            except (InvalidSignature, ValueError):
                problems.append(
                    Problem(
                        "checkpoint",
                        "checkpoints",
                        int(cp.get("seq", 0)),
                        f"checkpoint line {i} has an invalid signature",
                    )
                )
        prev = hashlib.sha256(line.encode()).hexdigest()
    return problems


def _original_seq(rec: Record, window: int = 64) -> int | None:
    """If ``rec`` hashes correctly under another ``seq``, it was moved."""
    row = dict(rec.row)
    for k in itertools.chain.from_iterable(
        (rec.seq - d, rec.seq + d) for d in range(1, window + 1)
    ):
        if k < 1:
            continue
        row["seq"] = k
        if chain_hash(str(row["prev_hash"]), rec.table, row) == rec.row["hash"]:
            return k
    return None


def verify(
    store: AuditStore,
    log: CheckpointLog,
    public: Ed25519PublicKey | None,
    *,
    since: str | None = None,
) -> VerifyReport:
    """Recompute the chains and check them against the signed checkpoints.

    Starts at genesis, or at the last prune anchor, or (``since``, an ISO
    UTC timestamp) at the last checkpoint at or before that time.
    """
    report = VerifyReport()
    # The chain head first: a live gateway keeps appending while the
    # records are read, and a head read afterwards can name records the
    # reading never reached (the head moves with its records, in one
    # transaction, so everything up to this head is there to be read).
    head_seq, _ = store.head()
    lines = log._lines()
    cps = [json.loads(ln) for ln in lines]
    report.checkpoints = len(cps)
    report.problems += _check_checkpoints(cps, lines, public)

    start_seq, prev = 1, GENESIS
    anchored = False
    anchors = [c for c in cps if c.get("kind") == "anchor"]
    if anchors:
        a = anchors[-1]
        start_seq, prev = int(a["first_seq"]), str(a["anchor_prev_hash"])
        anchored = True
        report.start = f"prune anchor (first seq {start_seq})"
    if since is not None:
        usable = [c for c in cps if c["ts"] <= since and int(c["seq"]) >= start_seq - 1]
        if usable:
            c = usable[-1]
            start_seq, prev = int(c["seq"]) + 1, str(c["hash"])
            anchored = True
            report.start = f"checkpoint at seq {c['seq']} ({c['ts']})"
    by_seq = {int(c["seq"]): c for c in cps if int(c["seq"]) >= start_seq}

    expected = start_seq
    sessions: dict[str, tuple[int, str]] = {}
    records = store.iter_records(start_seq, until_seq=head_seq)
    for seq, group_iter in itertools.groupby(records, key=lambda r: r.seq):
        group = list(group_iter)
        rec = next(
            (
                r
                for r in group
                if r.row["prev_hash"] == prev and chain_hash(prev, r.table, r.row) == r.row["hash"]
            ),
            group[0],
        )
        for extra in group:
            if extra is not rec:
                report.problems.append(
                    Problem(
                        "inserted",
                        extra.table,
                        seq,
                        f"a second record claims seq {seq} (the chain has it in {rec.table})",
                    )
                )
        row = rec.row
        report.records += 1
        if report.first_seq is None:
            report.first_seq = seq
        found_problem = False
        if seq > expected:
            missing = f"{expected}" if seq - 1 == expected else f"{expected}..{seq - 1}"
            report.problems.append(
                Problem(
                    "deleted", rec.table, seq, f"record(s) seq {missing} missing before this record"
                )
            )
            found_problem = True
        if chain_hash(str(row["prev_hash"]), rec.table, row) != row["hash"]:
            moved = _original_seq(rec)
            if moved is not None:
                report.problems.append(
                    Problem("reordered", rec.table, seq, f"record was written as seq {moved}")
                )
            else:
                report.problems.append(
                    Problem("changed", rec.table, seq, "content does not match its hash")
                )
            found_problem = True
        elif row["prev_hash"] != prev and not found_problem:
            report.problems.append(
                Problem(
                    "broken_link",
                    rec.table,
                    seq,
                    "does not follow the record before it (a record was inserted "
                    "before it, or the previous record was replaced)",
                )
            )
            found_problem = True
        sid = str(row["session_id"])
        sseq, sprev = sessions.get(sid, (0, GENESIS))
        first_seen = sid not in sessions
        if not found_problem:
            if first_seen and anchored:
                pass  # the session may have begun in the pruned or skipped part
            elif int(row["session_seq"]) != sseq + 1 or row["session_prev_hash"] != sprev:
                report.problems.append(
                    Problem(
                        "session_chain",
                        rec.table,
                        seq,
                        f"session {sid or '(gateway)'} chain broken at session_seq "
                        f"{row['session_seq']} (expected {sseq + 1})",
                    )
                )
            if chain_hash(str(row["session_prev_hash"]), rec.table, row) != row["session_hash"]:
                report.problems.append(
                    Problem("changed", rec.table, seq, "session hash does not match")
                )
        sessions[sid] = (int(row["session_seq"]), str(row["session_hash"]))
        cp = by_seq.get(seq)
        if cp is not None:
            report.checkpoints_covered += 1
            if cp["hash"] != row["hash"]:
                report.problems.append(
                    Problem(
                        "checkpoint",
                        rec.table,
                        seq,
                        f"differs from the signed checkpoint of {cp['ts']}: "
                        "the chain up to here was rewritten",
                    )
                )
        prev = str(row["hash"])
        expected = seq + 1
        report.last_seq = seq

    last = expected - 1
    signed_beyond = [int(c["seq"]) for c in cps if int(c["seq"]) > last]
    if signed_beyond:
        top = max(signed_beyond)
        report.problems.append(
            Problem(
                "deleted",
                "?",
                last + 1,
                f"records seq {last + 1}..{top} are missing (a checkpoint signed seq {top})",
            )
        )
    if head_seq > last and not signed_beyond:
        report.problems.append(
            Problem(
                "deleted",
                "?",
                last + 1,
                f"records seq {last + 1}..{head_seq} are missing (chain head is {head_seq})",
            )
        )
    return report


_DURATION = re.compile(r"^(\d+)([smhdw])$")


def parse_since(value: str, now: datetime | None = None) -> str:
    """``7d``/``12h``/``30m`` ago, or an ISO date or time, as store timestamp text."""
    now = now or datetime.now(UTC)
    m = _DURATION.match(value.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        delta = {
            "s": timedelta(seconds=n),
            "m": timedelta(minutes=n),
            "h": timedelta(hours=n),
            "d": timedelta(days=n),
            "w": timedelta(weeks=n),
        }[unit]
        return format_ts(now - delta)
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return format_ts(parsed)


@dataclass(frozen=True, slots=True)
class PruneResult:
    deleted: int
    first_kept_seq: int | None
    cutoff: str


class PruneRefused(Exception):
    """The store does not verify; pruning would launder a tampered chain."""


def prune(
    store: AuditStore,
    log: CheckpointLog,
    public: Ed25519PublicKey,
    older_than: str,
    *,
    now: datetime | None = None,
) -> PruneResult:
    """Delete records older than ``older_than`` (e.g. ``365d``) and sign an
    anchor checkpoint so the remaining chain still verifies.

    Verifies first and refuses to prune a store that does not verify: the
    anchor would otherwise vouch for tampered records.
    """
    cutoff = parse_since(older_than, now)
    report = verify(store, log, public)
    if not report.ok:
        raise PruneRefused(
            "audit store does not verify; not pruning: " + "; ".join(map(str, report.problems[:5]))
        )
    head_seq, head_hash = store.head()
    first = store.first_seq_at_or_after(cutoff)
    if first is None:
        first = head_seq + 1
        anchor_prev = head_hash
    else:
        rec = store.record(first)
        assert rec is not None
        anchor_prev = str(rec.row["prev_hash"])
    if report.first_seq is None or first <= report.first_seq:
        return PruneResult(0, report.first_seq, cutoff)
    log.append(
        "anchor", head_seq, head_hash, first_seq=first, anchor_prev_hash=anchor_prev, cutoff=cutoff
    )
    deleted = store.delete_before(first)
    return PruneResult(deleted, first if first <= head_seq else None, cutoff)
