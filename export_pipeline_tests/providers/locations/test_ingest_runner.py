"""ExportRunner without Dagster: the ledger, the one-transaction load, adoption, idempotence."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from export_pipeline.core.errors import ExportFailedError
from export_pipeline.core.ingest import ExportRunner, IngestSettings
from export_pipeline.core.ledger import Ledger
from export_pipeline.core.model import ExportRequest, ExportState
from export_pipeline.core.storage import LocalStorage
from export_pipeline.core.warehouse import close_lakes
from export_pipeline.providers.locations import LOCATIONS
from export_pipeline_tests.conftest import open_warehouse
from export_pipeline_tests.providers.locations.conftest import (
    FAST_RETRY,
    N_LOCATIONS,
    LocationsSandbox,
)


class CrashAfterLoadLedger(Ledger):
    """Fault injection: the process dies after the merge and the ledger update ran, before
    COMMIT. A crash at exactly that instant cannot be produced for real on demand."""

    def mark_loaded(self, con, *args, **kwargs) -> None:  # type: ignore[override]
        super().mark_loaded(con, *args, **kwargs)
        raise RuntimeError("simulated crash before commit")


@pytest.fixture
def runner(
    locations_sandbox: LocationsSandbox, tmp_path: Path, backend: str
) -> Iterator[ExportRunner]:
    """A runner on each backend in turn: the DuckDB file, then a DuckLake lake."""
    locations_sandbox.state.ready_after_seconds = 0
    provider = locations_sandbox.provider_with()
    yield ExportRunner(
        provider,
        Ledger(open_warehouse(backend, tmp_path / "wh")),
        LocalStorage(tmp_path / "data"),
        IngestSettings(poll_initial_seconds=0.02, retry=FAST_RETRY),
    )
    provider.close()


def _state(runner: ExportRunner) -> tuple:
    with runner.ledger.warehouse.connect() as con:
        return (
            con.execute("SELECT count(*), max(_export_id) FROM locations.locations").fetchone(),
            con.execute("SELECT cursor_value, export_id FROM pipeline.cursors").fetchall(),
            con.execute("SELECT export_id, state FROM pipeline.exports ORDER BY 1").fetchall(),
        )


def test_crash_before_commit_leaves_the_old_state(
    runner: ExportRunner, locations_sandbox: LocationsSandbox
) -> None:
    first = runner.sync(LOCATIONS, ExportRequest())
    assert first.rows == N_LOCATIONS
    before = _state(runner)

    locations_sandbox.state.mutate(updated=5, added=3)
    crashing = ExportRunner(
        runner.provider,
        CrashAfterLoadLedger(runner.ledger.warehouse),
        runner.storage,
        runner.settings,
    )
    since = runner.ledger.cursor("locations", "locations")
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.sync(LOCATIONS, ExportRequest(modified_since=since))
    after = _state(runner)
    assert after[0] == before[0]  # no row of the second export landed
    assert after[1] == before[1]  # the cursor did not move
    states = dict(after[2])
    assert states[first.export_id] == "loaded"
    second = next(i for i in states if i != first.export_id)
    assert states[second] == "ready"  # still open: the sensor or a re-run picks it up

    # The same export, retried by a healthy runner, loads exactly once.
    result = runner.ingest(LOCATIONS, second)
    assert result.rows == 8 and not result.skipped
    assert _state(runner)[0][0] == N_LOCATIONS + 3


def test_a_loaded_export_is_never_loaded_twice(runner: ExportRunner) -> None:
    result = runner.sync(LOCATIONS, ExportRequest())
    again = runner.ingest(LOCATIONS, result.export_id)
    assert again.skipped and again.rows == result.rows
    with runner.ledger.warehouse.connect() as con:
        assert con.execute("SELECT count(*) FROM locations.locations").fetchone()[0] == N_LOCATIONS


def test_an_open_export_is_adopted_not_requested_again(
    runner: ExportRunner, locations_sandbox: LocationsSandbox
) -> None:
    locations_sandbox.state.ready_after_seconds = 3600
    record, adopted = runner.start(LOCATIONS, ExportRequest())
    assert not adopted
    creates = locations_sandbox.state.call_counts["request"]
    again, adopted = runner.start(LOCATIONS, ExportRequest())
    assert adopted and again.export_id == record.export_id
    assert locations_sandbox.state.call_counts["request"] == creates


def test_ledger_survives_a_new_process(runner: ExportRunner, tmp_path: Path, backend: str) -> None:
    result = runner.sync(LOCATIONS, ExportRequest())
    # A brand-new connection (as another process would open) sees the committed ledger.
    close_lakes()
    with open_warehouse(backend, tmp_path / "wh").connect(read_only=True) as con:
        row = con.execute(
            "SELECT state, rows_loaded, expected_rows FROM pipeline.exports WHERE export_id = ?",
            [result.export_id],
        ).fetchone()
    assert row == (ExportState.LOADED.value, N_LOCATIONS, N_LOCATIONS)


def test_a_failed_export_is_not_loaded_later(
    runner: ExportRunner, locations_sandbox: LocationsSandbox
) -> None:
    """Failed is terminal: a later explicit ingest of the same id refuses instead of loading."""
    locations_sandbox.state.fail_next_export = ("EXPORT_GENERATION_FAILED", "disk full")
    record, _ = runner.start(LOCATIONS, ExportRequest())
    with pytest.raises(ExportFailedError):
        runner.wait_until_ready(LOCATIONS, record.export_id, timeout=10)
    runner.ledger.record_error(
        "locations",
        record.export_id,
        code="EXPORT_GENERATION_FAILED",
        message="disk full",
        state=ExportState.FAILED,
    )
    with pytest.raises(ExportFailedError, match="given up") as info:
        runner.ingest(LOCATIONS, record.export_id)
    assert info.value.code == "EXPORT_GENERATION_FAILED"
    assert runner.ledger.get("locations", record.export_id).state is ExportState.FAILED


def test_the_duckdb_file_is_loaded_while_parsing_into_the_same_table(
    runner: ExportRunner, backend: str, tmp_path: Path
) -> None:
    """On the DuckDB file the first load is staged while parsing and renamed into place (no
    row copied after normalise); with the setting off (and on DuckLake) the rows are copied.
    Either way the table and the ledger are the same."""
    result = runner.sync(LOCATIONS, ExportRequest())
    assert result.load is not None
    assert result.load.renamed is (backend == "duckdb")
    copied = ExportRunner(
        runner.provider,
        Ledger(open_warehouse(backend, tmp_path / "wh2")),
        LocalStorage(tmp_path / "data2"),
        replace(runner.settings, stage_while_parsing=False),
    )
    other = copied.sync(LOCATIONS, ExportRequest())
    assert other.load is not None and not other.load.renamed
    assert (other.load.rows_inserted, other.load.table_rows) == (
        result.load.rows_inserted,
        result.load.table_rows,
    )

    def table(r: ExportRunner) -> tuple[list, list]:
        with r.ledger.warehouse.connect() as con:
            described = con.execute("DESCRIBE locations.locations").fetchall()
            rows = con.execute(
                "SELECT * EXCLUDE (_export_id, _loaded_at) FROM locations.locations ORDER BY id"
            ).fetchall()
        return described, rows

    assert table(runner) == table(copied)


def test_the_ledger_names_only_files_already_on_disk(
    runner: ExportRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raw and Parquet files, and the directories that name them, are written to the disk
    (fsync) before the load's transaction records them in the ledger: after a power loss the
    ledger never names a file the kernel had kept only in memory. A power loss cannot be made
    here, so ``os.fsync`` is watched (and still called)."""
    synced: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def watched(fd: int) -> None:
        real_fsync(fd)
        info = os.fstat(fd)
        synced.add((info.st_dev, info.st_ino))

    monkeypatch.setattr(os, "fsync", watched)
    seen: dict[str, object] = {}

    class Watching(Ledger):
        def mark_loaded(self, con, kind, export_id, **kwargs) -> None:  # type: ignore[override]
            seen["synced"] = set(synced)
            seen["uris"] = (kwargs["raw_uri"], kwargs["parquet_uri"])
            super().mark_loaded(con, kind, export_id, **kwargs)

    watching = ExportRunner(
        runner.provider, Watching(runner.ledger.warehouse), runner.storage, runner.settings
    )
    result = watching.sync(LOCATIONS, ExportRequest())
    assert result.rows == N_LOCATIONS
    raw, parquet = (Path(str(uri)) for uri in seen["uris"])  # type: ignore[union-attr]
    named = [raw, raw.parent, parquet, parquet.parent, *raw.iterdir(), *parquet.iterdir()]
    assert any(p.suffix == ".parquet" for p in parquet.iterdir())
    assert any(p.is_file() for p in raw.iterdir())
    unsynced = [p for p in named if (p.stat().st_dev, p.stat().st_ino) not in seen["synced"]]  # type: ignore[operator]
    assert unsynced == []
