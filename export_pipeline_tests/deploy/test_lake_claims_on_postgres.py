"""Two runs in two processes claim and load the same exports on a DuckLake lake whose catalog
is a real PostgreSQL server (the multi-machine setup): no shared lock file here, so only
DuckLake's conflict checks and the whole-transaction retry keep each export loaded once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from export_pipeline.core.ledger import Ledger
from export_pipeline.core.model import ExportKind, ExportRequest, ExportState, ExportStatus
from export_pipeline.core.warehouse import DuckLakeWarehouse
from export_pipeline_tests.deploy.postgres import PostgresServer
from export_pipeline_tests.providers.locations.conftest import (  # noqa: F401  (fixture)
    LocationsSandbox,
    locations_sandbox,
)
from export_pipeline_tests.warehouse.test_lake_claims import two_claimants_load_two_exports


def test_two_processes_claim_and_load_exports_once_on_a_postgres_catalog(
    postgres: PostgresServer,
    locations_sandbox: LocationsSandbox,  # noqa: F811
    tmp_path: Path,
) -> None:
    postgres.create_database("lake_claims")
    dsn = (
        f"host={postgres.host} port={postgres.port} dbname=lake_claims "
        f"user={postgres.user} password={postgres.password}"
    )
    two_claimants_load_two_exports(
        locations_sandbox, f"postgres:{dsn}", str(tmp_path / "lake" / "files"), tmp_path / "data"
    )


class OwnLake(DuckLakeWarehouse):
    """A lake attached by its own DuckDB instance, as in another process (the class normally
    shares one attachment per process)."""

    _db: duckdb.DuckDBPyConnection | None = None

    def _database(self) -> duckdb.DuckDBPyConnection:
        if self._db is None:
            self._db = self._open()
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


@pytest.fixture
def two_lakes(postgres: PostgresServer, tmp_path: Path) -> Iterator[tuple[OwnLake, OwnLake]]:
    database = f"lake_{tmp_path.name[-20:].lower().replace('-', '_')}"
    postgres.create_database(database)
    catalog = (
        f"postgres:host={postgres.host} port={postgres.port} dbname={database} "
        f"user={postgres.user} password={postgres.password}"
    )
    lakes = (OwnLake(catalog, str(tmp_path / "files")), OwnLake(catalog, str(tmp_path / "files")))
    yield lakes
    for lake in lakes:
        lake.close()


KIND = ExportKind(provider="alpha", name="items", primary_key=("id",))


def _record(ledger: Ledger, export_id: str) -> None:
    ledger.record_request(
        KIND,
        ExportRequest(),
        ExportStatus(export_id=export_id, state=ExportState.READY),
        source="test",
    )


def test_claims_from_two_instances_at_once_grant_one_lease(
    two_lakes: tuple[OwnLake, OwnLake],
) -> None:
    """Each round, two DuckDB instances (two runs' connections) claim one export at the same
    moment: DuckLake sees both delete the same row, one commit fails, and that claimant asks
    again and finds the other's lease. Exactly one is granted, every round."""
    ledgers = [Ledger(lake) for lake in two_lakes]
    rounds = 8
    for n in range(rounds):
        _record(ledgers[0], f"e{n}")
    start = threading.Barrier(2)

    def claim(i: int, export_id: str) -> bool:
        start.wait(timeout=30)
        return ledgers[i].claim("alpha", export_id, f"run-{i}@host:{i}", ttl_seconds=600).granted

    with ThreadPoolExecutor(2) as pool:
        for n in range(rounds):
            granted = [
                f.result(timeout=60) for f in [pool.submit(claim, i, f"e{n}") for i in (0, 1)]
            ]
            assert sorted(granted) == [False, True], (n, granted)
            holder = ledgers[0].get("alpha", f"e{n}")
            assert (
                holder is not None
                and holder.lease_owner == f"run-{granted.index(True)}@host:{granted.index(True)}"
            )


def test_two_loads_committing_at_once_leave_the_newest_cursor(
    two_lakes: tuple[OwnLake, OwnLake],
) -> None:
    """Two runs mark two exports of one kind loaded, the first ever: their transactions
    overlap (B commits while A's is open). A PostgreSQL catalog lets both commit, each having
    inserted a cursor row (DuckLake does not conflict on inserts); the cursor read is still
    the newest one, whichever committed last."""
    a, b = (Ledger(lake) for lake in two_lakes)
    _record(a, "e-new")
    _record(a, "e-old")
    newer = datetime(2024, 5, 2, tzinfo=UTC)
    older = datetime(2024, 5, 1, tzinfo=UTC)

    def mark(ledger: Ledger, con: duckdb.DuckDBPyConnection, export_id: str, at: datetime) -> None:
        ledger.mark_loaded(
            con,
            KIND,
            export_id,
            rows=1,
            bytes_downloaded=1,
            raw_uri=None,
            parquet_uri=None,
            files=[],
            cursor_value=at,
        )

    with a.warehouse.transaction() as con_a:
        mark(a, con_a, "e-new", newer)
        with b.warehouse.transaction() as con_b:
            mark(b, con_b, "e-old", older)
    assert a.cursor("alpha", "items") == newer
    assert b.cursor("alpha", "items") == newer
