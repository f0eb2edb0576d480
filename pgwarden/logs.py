"""Structured logging: one JSON object a line on stderr.

Every event passes through a scrubber before it is rendered, so a PAN that
reaches a log call by accident (an error message quoting a value, say) is
masked; tokens and passwords are never passed to the logger at all.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = frozenset({"password", "token", "secret", "authorization", "jwt"})


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        from maskd.detect import scrub

        return scrub(value)
    if isinstance(value, dict):
        return {k: ("[redacted]" if k.lower() in _SECRET_KEYS else _scrub_value(v))
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    return value


def scrub_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return {k: ("[redacted]" if k.lower() in _SECRET_KEYS else _scrub_value(v))
            for k, v in event.items()}


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (test runners and
    daemons swap it; a stream bound at configure time may be closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "info") -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            scrub_processor,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
