"""The read path of the embedded warehouse: a replica published after each load, which readers
open instead of the writer's file. Real loads (locations sandbox over HTTP), real processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.ingest import ExportRunner, IngestSettings
from export_pipeline.core.ledger import Ledger
from export_pipeline.core.model import ExportRequest
from export_pipeline.core.replica import open_replica, read_manifest
from export_pipeline.core.storage import LocalStorage
from export_pipeline.core.warehouse import DuckDBWarehouse
from export_pipeline.providers.locations import LOCATIONS, LocationsProvider
from export_pipeline.sandbox.bundle import Sandbox
from export_pipeline_tests.warehouse.replica_reader import poll_replica


@pytest.fixture
def simulators() -> tuple[str, ...]:
    return ("locations",)  # the sandbox starts only these


@pytest.fixture
def runner(sandbox: Sandbox, tmp_path: Path) -> Iterator[ExportRunner]:
    sandbox.locations.ready_after_seconds = 0
    env = sandbox.env()
    provider = LocationsProvider.from_settings(
        base_url=env["LOCATIONS_API_URL"],
        token=env["LOCATIONS_API_TOKEN"],
        retry=RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, jitter=0.0),
    )
    yield ExportRunner(
        provider,
        Ledger(DuckDBWarehouse(tmp_path / "data" / "warehouse.duckdb")),
        LocalStorage(tmp_path / "data"),
        IngestSettings(poll_initial_seconds=0.02),
    )
    provider.close()


def sync(runner: ExportRunner) -> None:
    since = runner.ledger.cursor("locations", "locations")
    runner.sync(LOCATIONS, ExportRequest(modified_since=since))


def test_each_load_publishes_a_replica_with_the_whole_current_state(
    runner: ExportRunner, sandbox: Sandbox, tmp_path: Path
) -> None:
    read_dir = tmp_path / "data" / "read"
    sync(runner)
    # The first load made the table exactly the export's Parquet: the replica links those
    # files (same inodes) instead of writing the table again.
    first = read_manifest(read_dir)["tables"]["locations.locations"]
    tier = sorted((tmp_path / "data" / "parquet" / "locations").rglob("*.parquet"))
    assert sorted(os.stat(p).st_ino for p in first) == sorted(os.stat(p).st_ino for p in tier)
    sandbox.locations.mutate(updated=30, added=10)
    sync(runner)
    with runner.ledger.warehouse.connect(read_only=True) as con:
        truth = con.execute("SELECT count(*), sum(hash(id)) FROM locations.locations").fetchone()
        evses = con.execute("SELECT count(*) FROM locations.evses").fetchone()
    assert truth[0] == 310
    replica = open_replica(read_dir)
    assert (
        replica.execute("SELECT count(*), sum(hash(id)) FROM locations.locations").fetchone()
        == truth
    )
    assert replica.execute("SELECT count(*) FROM locations.evses").fetchone() == evses
    assert replica.execute(
        "SELECT count(*) FROM pipeline.exports WHERE state = 'loaded'"
    ).fetchone() == (2,)
    # Read-only, and no file outside the replica's own Parquet can be read or written.
    with pytest.raises(duckdb.Error):
        replica.execute("CREATE TABLE x AS SELECT 1")
    with pytest.raises(duckdb.Error):
        replica.execute(f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'")
    replica.close()
    # Other tools: the current Parquet of each table (not one delta set per export), exact
    # counts: a merge into a non-empty table writes the table as one file.
    tables = read_manifest(read_dir)["tables"]
    assert len(tables["locations.locations"]) == 1
    assert pq.read_table(tables["locations.locations"][0]).num_rows == 310
    assert set(tables) >= {"locations.locations", "pipeline.exports", "pipeline.cursors"}
    parquet_tier = list((tmp_path / "data" / "parquet" / "locations").rglob("*.parquet"))
    assert sum(pq.read_metadata(p).num_rows for p in parquet_tier) == 340  # deltas: 300 + 40


def test_a_reader_keeps_its_state_while_a_publish_replaces_it(
    runner: ExportRunner, sandbox: Sandbox, tmp_path: Path
) -> None:
    sync(runner)
    reader = open_replica(tmp_path / "data" / "read")
    sandbox.locations.mutate(added=25)
    sync(runner)  # publishes a new replica while `reader` holds the old one open
    assert reader.execute("SELECT count(*) FROM locations.locations").fetchone() == (300,)
    reader.close()
    fresh = open_replica(tmp_path / "data" / "read")
    assert fresh.execute("SELECT count(*) FROM locations.locations").fetchone() == (325,)
    fresh.close()


def test_a_reader_process_queries_throughout_loads_without_an_error(
    runner: ExportRunner, sandbox: Sandbox, tmp_path: Path
) -> None:
    """A separate process polls the replica (a new read-only open per query, as `sql` does)
    while this one loads: zero errors, and it saw the table change under it."""
    read_dir = tmp_path / "data" / "read"
    sync(runner)  # the first replica exists before the reader starts
    ctx = multiprocessing.get_context("spawn")
    out, stop = ctx.Queue(), ctx.Event()
    reader = ctx.Process(target=poll_replica, args=(str(read_dir), 0.02, stop, out))
    reader.start()
    try:
        assert out.get(timeout=60) == "started"
        for _ in range(3):
            sandbox.locations.mutate(updated=50, added=100)
            sync(runner)
        time.sleep(0.3)
    finally:
        stop.set()
        queries, errors, counts = out.get(timeout=60)
        reader.join(timeout=30)
    assert errors == [], errors
    assert queries > 10
    assert {300, 600} <= set(counts)  # before and after the loads, seen by the same reader


def test_sql_command_reads_while_a_writer_holds_the_warehouse(
    runner: ExportRunner, tmp_path: Path
) -> None:
    sync(runner)
    data_dir = tmp_path / "data"

    def sql(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "export_pipeline.cli",
                "sql",
                "--data-dir",
                str(data_dir),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    # A load in progress holds the writer's file: a read-only open of it would fail now.
    writer = duckdb.connect(str(data_dir / "warehouse.duckdb"))
    writer.execute("BEGIN")
    writer.execute("DELETE FROM locations.locations")  # uncommitted: readers must not see it
    try:
        direct = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import duckdb; duckdb.connect({str(data_dir / 'warehouse.duckdb')!r}, "
                "read_only=True)",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert direct.returncode != 0 and "lock" in direct.stderr
        listing = sql()
        assert listing.returncode == 0, listing.stderr
        listed = {
            tuple(cell.strip() for cell in line.split("|"))
            for line in listing.stdout.splitlines()[2:-1]
        }
        assert {
            ("locations.locations", "table"),
            ("locations.evses", "view"),
            ("pipeline.exports", "table"),
        } <= listed

        as_json = sql("SELECT count(*) AS n FROM locations.locations", "--format", "json")
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout) == [{"n": 300}]

        as_csv = sql("SELECT export_id, state FROM pipeline.exports ORDER BY 1", "--format", "csv")
        assert as_csv.returncode == 0, as_csv.stderr
        header, row = as_csv.stdout.strip().splitlines()
        assert header == "export_id,state" and row.endswith(",loaded")

        table = sql("SELECT 1 AS one, NULL AS nothing")
        assert table.stdout.splitlines()[0].split() == ["one", "|", "nothing"]
        assert "(1 row)" in table.stdout

        refused = sql("CREATE TABLE x AS SELECT 1")
        assert refused.returncode == 2 and "read-only" in refused.stderr
        refused = sql(f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'")
        assert refused.returncode == 2 and not (tmp_path / "x.csv").exists()
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_sql_command_without_a_replica_says_what_to_do(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "export_pipeline.cli", "sql", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "published after each load" in out.stderr
