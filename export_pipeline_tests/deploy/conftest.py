"""One PostgreSQL server per test session for the deployment tests (see postgres.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from export_pipeline_tests.deploy.postgres import PostgresServer, PostgresUnavailable


def _under_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback. Outside CI a machine without the Debian packages
    skips these tests with the reason; under CI (``CI=true``) that is a failure."""
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        if _under_ci():
            pytest.fail(f"CI=true but PostgreSQL is not available: {exc}")
        pytest.skip(f"PostgreSQL not available: {exc}")
    try:
        yield server
    finally:
        server.stop()
