"""Shared pytest configuration.

Everything under tests/integration/ is marked ``integration`` automatically,
so ``pytest -m "not integration"`` runs the fast unit tests only and
``pytest -m integration`` the tests that start real PostgreSQL, Envoy and OPA.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in item.path.resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
