"""A locations simulator on loopback and runners (one per simulated run) sharing a warehouse."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from export_pipeline.core.ingest import ExportRunner, IngestSettings
from export_pipeline.core.ledger import Ledger, Warehouse
from export_pipeline.core.storage import LocalStorage
from export_pipeline_tests.providers.locations.conftest import (  # noqa: F401  (fixture)
    FAST_RETRY,
    LocationsSandbox,
    locations_sandbox,
)

MakeRunner = Callable[..., ExportRunner]


@pytest.fixture
def make_runner(
    locations_sandbox: LocationsSandbox,  # noqa: F811
    tmp_path: Path,
) -> Iterator[MakeRunner]:
    """``make_runner(owner="run-a", **settings)``: another run against the same warehouse and
    data dir, as a second Dagster run (or a second process) would be."""
    locations_sandbox.state.ready_after_seconds = 0
    made: list[ExportRunner] = []

    def make(owner: str | None = None, **settings: object) -> ExportRunner:
        provider = locations_sandbox.provider_with()
        runner = ExportRunner(
            provider,
            Ledger(Warehouse(tmp_path / "w.duckdb")),
            LocalStorage(tmp_path / "data"),
            IngestSettings(poll_initial_seconds=0.02, retry=FAST_RETRY, **settings),  # type: ignore[arg-type]
            owner=owner,
        )
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.provider.close()


def table_rows(runner: ExportRunner) -> tuple[int, int]:
    """(rows, distinct ids) of locations.locations."""
    with runner.ledger.warehouse.connect(read_only=True) as con:
        row = con.execute("SELECT count(*), count(DISTINCT id) FROM locations.locations").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def exports(runner: ExportRunner) -> list[tuple[str, str, int]]:
    with runner.ledger.warehouse.connect(read_only=True) as con:
        return con.execute(
            "SELECT export_id, state, permanent_failures FROM pipeline.exports "
            "ORDER BY requested_at"
        ).fetchall()
