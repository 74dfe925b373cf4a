"""The DuckLake backend for real: snapshots per load, time travel, concurrent writer processes,
a commit that collides and runs again, analysts attaching read-only, other tools reading files."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from export_pipeline.core.errors import ConfigurationError
from export_pipeline.core.model import ExportKind
from export_pipeline.core.storage import NewFiles
from export_pipeline.core.warehouse import (
    DuckLakeWarehouse,
    close_lakes,
    extension_directory,
    parse_catalog,
    warehouse_from_settings,
)
from export_pipeline_tests.warehouse.lake_workers import (
    load_export,
    reader,
    write_parquet,
    writer,
)


@pytest.fixture
def lake(tmp_path: Path):
    warehouse = DuckLakeWarehouse(
        str(tmp_path / "lake" / "catalog.sqlite"), str(tmp_path / "lake" / "files")
    )
    yield warehouse
    close_lakes()


def analyst(lake: DuckLakeWarehouse, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A separate DuckDB, as another process or tool would open, with the lake attached."""
    con = duckdb.connect(
        config={
            "extension_directory": str(extension_directory()),
            "autoinstall_known_extensions": False,
        }
    )
    con.execute(lake.attach_sql(read_only=read_only))
    return con


def test_each_load_is_one_snapshot_and_time_travel_reaches_every_export(
    lake: DuckLakeWarehouse, tmp_path: Path
) -> None:
    snapshots = []
    for n in range(3):
        parquet = write_parquet(tmp_path / f"{n}.parquet", "alpha", f"e{n}", first=n * 10, rows=15)
        snapshots.append(load_export(lake, "alpha", f"e{n}", parquet, body_runs=[]))
    assert all(s is not None for s in snapshots) and snapshots == sorted(set(snapshots))
    # The ledger names the snapshot of each export (commit message + extra info).
    assert [lake.snapshot_of_export("alpha", f"e{n}") for n in range(3)] == snapshots

    con = analyst(lake)
    for n, version in enumerate(snapshots):
        # As of export n: rows 0 .. n*10+14, the ledger shows exactly exports 0..n loaded.
        rows = con.execute(
            f"SELECT count(*), max(id) FROM lake.alpha.items AT (VERSION => {version})"
        ).fetchone()
        assert rows == (n * 10 + 15, n * 10 + 14)
        loaded = con.execute(
            "SELECT export_id FROM lake.pipeline.exports AT (VERSION => ?) "
            "WHERE state = 'loaded' ORDER BY export_id",
            [version],
        ).fetchall()
        assert loaded == [(f"e{i}",) for i in range(n + 1)]

    # Atomic: in no snapshot is an export's data visible without its ledger mark, or the reverse.
    def as_of(sql: str, version: int) -> set[str]:
        try:
            return {
                r[0] for r in con.execute(sql.format(at=f"AT (VERSION => {version})")).fetchall()
            }
        except duckdb.CatalogException:
            return set()  # the table did not exist yet at that version

    for version in range(snapshots[-1] + 1):
        data = as_of("SELECT DISTINCT _export_id FROM lake.alpha.items {at}", version)
        marks = as_of(
            "SELECT export_id FROM lake.pipeline.exports {at} WHERE state = 'loaded'", version
        )
        # Later exports overwrite earlier keys, so: every export with rows is marked loaded,
        # and the newest marked export has rows.
        assert data <= marks, version
        assert max(marks, default="") == max(data, default=""), version
    con.close()


def test_the_catalog_names_only_data_files_already_on_disk(
    lake: DuckLakeWarehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB writes Parquet without an fsync and DuckLake commits its catalog right after, so
    the data and delete files a load wrote, and the directories naming them, are fsynced before
    the commit that names them: after a power loss the catalog never names a file the kernel
    had kept only in memory. A power loss cannot be made here: ``os.fsync`` is watched (and
    still called), and at each call the committed catalog (SQLite) is read."""
    catalog_path = Path(lake.catalog_target)

    def named_by_catalog() -> set[str]:
        if not catalog_path.exists():
            return set()
        with contextlib.closing(sqlite3.connect(f"file:{catalog_path}?mode=ro", uri=True)) as db:
            try:
                rows = db.execute(
                    "SELECT path FROM ducklake_data_file UNION ALL "
                    "SELECT path FROM ducklake_delete_file"
                ).fetchall()
            except sqlite3.OperationalError:  # the catalog's tables are not made yet
                return set()
        return {Path(path).name for (path,) in rows}

    synced: dict[tuple[int, int], set[str]] = {}
    real_fsync = os.fsync

    def watched(fd: int) -> None:
        real_fsync(fd)
        info = os.fstat(fd)
        synced.setdefault((info.st_dev, info.st_ino), named_by_catalog())

    monkeypatch.setattr(os, "fsync", watched)
    # Then rows 10..14 again: the second load deletes their old versions (a delete file).
    for n, first in enumerate((0, 10)):
        parquet = write_parquet(tmp_path / f"{n}.parquet", "alpha", f"e{n}", first=first, rows=15)
        assert load_export(lake, "alpha", f"e{n}", parquet, body_runs=[]) is not None

    named = named_by_catalog()
    files = {p.name: p for p in Path(lake.data_path).rglob("*.parquet")}
    assert any(name in named for name in files) and set(named) <= set(files)
    with contextlib.closing(sqlite3.connect(f"file:{catalog_path}?mode=ro", uri=True)) as db:
        assert db.execute("SELECT count(*) FROM ducklake_delete_file").fetchone()[0] > 0
    for name in named:
        info = files[name].stat()
        key = (info.st_dev, info.st_ino)
        assert key in synced, f"{files[name]} was never written to the disk"
        assert name not in synced[key], f"{files[name]} was named before it was on disk"
        for folder in files[name].relative_to(lake.data_path).parents:
            folder_info = (Path(lake.data_path) / folder).stat()
            assert (folder_info.st_dev, folder_info.st_ino) in synced, folder


def test_a_commit_that_collides_runs_again_whole(lake: DuckLakeWarehouse, tmp_path: Path) -> None:
    """Another writer (its own DuckDB, not our process's lock) commits while our load is open:
    our COMMIT fails with SQLite's 'database is locked' and the whole block runs again."""
    parquet = write_parquet(tmp_path / "a.parquet", "alpha", "e1", first=0, rows=10)
    with lake.connect():  # our process attaches (and creates) the lake first
        pass
    foreign = analyst(lake, read_only=False)
    body_runs: list[int] = []

    def another_writer_commits(run: int) -> None:
        if run == 1:  # during our first attempt only
            foreign.execute("CREATE TABLE lake.main.elsewhere AS SELECT 1 AS x")

    snapshot = load_export(
        lake, "alpha", "e1", parquet, body_runs=body_runs, during=another_writer_commits
    )
    foreign.close()
    assert len(body_runs) == 2  # the first attempt collided, the second committed
    assert snapshot == lake.snapshot_of_export("alpha", "e1")
    with lake.connect() as con:
        assert con.execute("SELECT count(*) FROM alpha.items").fetchone() == (10,)
        assert con.execute(
            "SELECT count(*) FROM pipeline.exports WHERE export_id = 'e1' AND state = 'loaded'"
        ).fetchone() == (1,)


def test_writers_in_several_processes_load_while_an_analyst_reads(tmp_path: Path) -> None:
    """Two runs (processes) load different providers into one lake at once; a third process
    attached read-only queries throughout. Every load commits once; the reader sees no error."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()
    lake = DuckLakeWarehouse(
        str(tmp_path / "lake" / "catalog.sqlite"), str(tmp_path / "lake" / "files")
    )
    with lake.connect():  # create the catalog (and ledger) first, as a deployment's first run
        pass
    reading = ctx.Process(
        target=reader,
        args=(
            str(tmp_path),
            lake.attach_sql(read_only=True),
            str(extension_directory()),
            stop,
            out,
        ),
    )
    reading.start()
    writers = [
        ctx.Process(target=writer, args=(str(tmp_path), provider, 4, 5000, out))
        for provider in ("alpha", "beta")
    ]
    for process in writers:
        process.start()
    results = [out.get(timeout=240) for _ in writers]
    stop.set()
    reader_result = out.get(timeout=60)
    for process in [*writers, reading]:
        process.join(timeout=60)
    close_lakes()

    assert all(r[0] == "ok" for r in results), results
    snapshots = [s for r in results for s in r[2]]
    assert len(set(snapshots)) == 8 and None not in snapshots  # one snapshot per load
    _, queries, errors, messages = reader_result
    assert errors == 0, messages
    assert queries > 0
    with lake.connect(read_only=True) as con:
        for provider in ("alpha", "beta"):
            # Loads n = 0..3 of 5000 rows starting at n: keys 0..5002.
            assert con.execute(f"SELECT count(*) FROM {provider}.items").fetchone() == (5003,)
        assert con.execute(
            "SELECT count(*), count(DISTINCT export_id) FROM pipeline.exports "
            "WHERE state = 'loaded'"
        ).fetchone() == (8, 8)
    close_lakes()


def test_a_load_that_retypes_a_column_is_one_snapshot_with_its_ledger_mark(
    lake: DuckLakeWarehouse, tmp_path: Path
) -> None:
    """A column widened BIGINT -> DOUBLE (which DuckLake cannot do in place, so the table is
    rewritten) and a new JSON column: the rewrite, the rows, the view and the ledger mark are
    one snapshot; the view follows the new table; time travel reads the table as it was."""
    kind = ExportKind(
        provider="alpha",
        name="items",
        primary_key=("id",),
        views={"amounts": "SELECT id, amount FROM alpha.items"},
    )
    first = tmp_path / "e1.parquet"
    second = tmp_path / "e2.parquet"
    with duckdb.connect() as con:
        con.execute(
            f"COPY (SELECT i AS id, i * 10 AS amount, 'e1' AS _export_id FROM range(3) t(i)) "
            f"TO '{first}' (FORMAT parquet)"
        )
        con.execute(
            "COPY (SELECT 5 AS id, 2.5::DOUBLE AS amount, '{\"a\":1}'::JSON AS extra, "
            f"'e2' AS _export_id) TO '{second}' (FORMAT parquet)"
        )
    v1 = load_export(lake, "alpha", "e1", first, body_runs=[], kind=kind)
    v2 = load_export(lake, "alpha", "e2", second, body_runs=[], kind=kind)
    assert v1 is not None and v2 is not None
    con = analyst(lake)
    # Just before the load's snapshot (the ledger recorded the request): nothing of it yet.
    before = v2 - 1
    assert con.execute(
        f"SELECT count(*), typeof(any_value(amount)) FROM lake.alpha.items AT (VERSION => {before})"
    ).fetchone() == (3, "BIGINT")
    assert con.execute(
        f"SELECT state FROM lake.pipeline.exports AT (VERSION => {before}) WHERE export_id = 'e2'"
    ).fetchall() != [("loaded",)]
    assert con.execute("DESCRIBE lake.alpha.items").fetchall()[1][:2] == ("amount", "DOUBLE")
    assert con.execute(
        "SELECT id, amount, extra::VARCHAR FROM lake.alpha.items ORDER BY id"
    ).fetchall() == [(0, 0.0, None), (1, 10.0, None), (2, 20.0, None), (5, 2.5, '{"a":1}')]
    assert con.execute("SELECT sum(amount) FROM lake.alpha.amounts").fetchone() == (32.5,)
    assert con.execute(
        f"SELECT export_id FROM lake.pipeline.exports AT (VERSION => {v2}) "
        "WHERE state = 'loaded' ORDER BY 1"
    ).fetchall() == [("e1",), ("e2",)]
    assert con.execute(
        f"SELECT sum(amount), typeof(sum(amount)) FROM lake.alpha.items AT (VERSION => {v1})"
    ).fetchone() == (30, "HUGEINT")
    con.close()


def test_other_tools_read_the_lake_data_files(lake: DuckLakeWarehouse, tmp_path: Path) -> None:
    """The data files are plain Parquet: a tool without DuckDB (pyarrow here) reads the files
    the catalog lists and applies the listed delete files (positions of replaced rows)."""
    for n in range(2):
        parquet = write_parquet(tmp_path / f"{n}.parquet", "alpha", f"e{n}", first=n * 5, rows=10)
        load_export(lake, "alpha", f"e{n}", parquet, body_runs=[])
    con = analyst(lake)
    files = con.execute(
        "SELECT data_file, delete_file FROM ducklake_list_files('lake', 'items', schema => 'alpha')"
    ).fetchall()
    expected = con.execute("SELECT count(*) FROM lake.alpha.items").fetchone()[0]
    con.close()
    total = 0
    for data_file, delete_file in files:
        rows = pq.read_table(data_file).num_rows
        deleted = pq.read_table(delete_file).num_rows if delete_file else 0
        total += rows - deleted
    assert any(delete for _, delete in files)  # the merge replaced rows of the first file
    assert total == expected == 15


def test_settings_choose_the_backend(tmp_path: Path) -> None:
    assert warehouse_from_settings(path=tmp_path / "w.duckdb").backend == "duckdb"
    lake = warehouse_from_settings(
        backend="ducklake",
        lake_catalog=str(tmp_path / "c.sqlite"),
        lake_data_path=str(tmp_path / "files"),
    )
    assert lake.backend == "ducklake"
    with pytest.raises(ConfigurationError, match="unknown warehouse backend"):
        warehouse_from_settings(backend="iceberg")
    assert parse_catalog("postgres:dbname=lake host=127.0.0.1") == (
        "postgres",
        "dbname=lake host=127.0.0.1",
    )
    assert parse_catalog("data/lake/catalog.sqlite") == ("sqlite", "data/lake/catalog.sqlite")
    assert parse_catalog("sqlite:x.sqlite") == ("sqlite", "x.sqlite")
    # The DSN may hold a password: describe() (used in messages) never shows it.
    secret = DuckLakeWarehouse("postgres:dbname=lake password=hunter2", str(tmp_path / "f"))
    assert "hunter2" not in secret.describe()


def test_lake_data_files_on_s3(shared_s3, tmp_path: Path, monkeypatch) -> None:
    """data_path s3://…: the Parquet data files go to the (loopback) S3 server."""
    shared_s3.ensure_bucket("lake-files")
    client = shared_s3.client()
    creds = client._request_signer._credentials
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds.secret_key)
    monkeypatch.setenv("AWS_REGION", shared_s3.region)
    monkeypatch.setenv("AWS_ENDPOINT_URL", shared_s3.endpoint_url)
    lake = DuckLakeWarehouse(str(tmp_path / "catalog.sqlite"), "s3://lake-files/warehouse")
    parquet = write_parquet(tmp_path / "a.parquet", "alpha", "e1", first=0, rows=10)
    try:
        load_export(lake, "alpha", "e1", parquet, body_runs=[])
        with lake.connect() as con:
            assert con.execute("SELECT count(*) FROM alpha.items").fetchone() == (10,)
    finally:
        close_lakes()
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket="lake-files", Prefix="warehouse/").get(
            "Contents", []
        )
    ]
    assert any(k.startswith("warehouse/alpha/items/") and k.endswith(".parquet") for k in keys)


def test_sql_command_on_the_lake(lake: DuckLakeWarehouse, tmp_path: Path) -> None:
    parquet = write_parquet(tmp_path / "a.parquet", "alpha", "e1", first=0, rows=12)
    load_export(lake, "alpha", "e1", parquet, body_runs=[])
    base = [sys.executable, "-m", "export_pipeline.cli", "sql", "--backend", "ducklake"]
    where = [
        "--lake-catalog",
        str(tmp_path / "lake" / "catalog.sqlite"),
        "--lake-data-path",
        str(tmp_path / "lake" / "files"),
    ]
    listing = subprocess.run([*base, *where], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "alpha.items" in listing.stdout and "pipeline.exports" in listing.stdout
    count = subprocess.run(
        [*base, *where, "SELECT count(*) AS n FROM alpha.items", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert count.returncode == 0, count.stderr
    assert json.loads(count.stdout) == [{"n": 12}]
    refused = subprocess.run(
        [*base, *where, "DELETE FROM alpha.items"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2


def test_a_lake_instance_duckdb_invalidated_is_attached_again(tmp_path: Path) -> None:
    """An internal error makes DuckDB invalidate this process's cached lake instance: the
    thread whose transaction was on it runs again on a fresh one and commits; connections of the
    invalidated instance are never closed (that aborts the process: warehouse._keep_forever)."""
    script = (
        "import sys; from export_pipeline_tests.warehouse.lake_workers import invalidated_lake; "
        "invalidated_lake(sys.argv[1], sys.argv[2])"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "lake" / "catalog.sqlite"),
            str(tmp_path / "lake" / "files"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[:1500]  # -6: the process aborted
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["error"] == "InternalException"
    # The first attempt failed ("database has been invalidated"), the second committed.
    assert seen["runs"] == ["run", "run", "committed"], seen
    assert seen["rows"] == [1, 10]


def test_new_files_are_found_by_name_and_only_they_are_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the lake's commit uses: files there before :meth:`NewFiles.start` are not new; a
    file added since is, and so are the files of a directory made since; the directories that
    gained entries are written too. A file written once is not written again."""
    root = tmp_path / "files"
    (root / "t").mkdir(parents=True)
    (root / "t" / "old.parquet").write_bytes(b"old")
    new_files = NewFiles(root)
    new_files.start()

    synced: list[str] = []
    real_fsync = os.fsync

    def watched(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", watched)
    since = time.time_ns() - 1_000_000_000
    (root / "t" / "new.parquet").write_bytes(b"new")
    (root / "u").mkdir()
    (root / "u" / "first.parquet").write_bytes(b"first")
    new_files.sync(since)
    expected = [root / "t" / "new.parquet", root / "t", root / "u" / "first.parquet", root / "u"]
    assert sorted(synced) == sorted(str(p) for p in [*expected, root])

    # The next commit: nothing added, nothing written; then one more file in t.
    synced.clear()
    new_files.sync(time.time_ns())
    assert synced == []
    since = time.time_ns() - 1_000_000_000
    (root / "t" / "next.parquet").write_bytes(b"next")
    new_files.sync(since)
    # (Directories changed within the slack are written again; files listed before are not.)
    assert {str(root / "t" / "next.parquet"), str(root / "t")} <= set(synced)
    assert not {str(p) for p in expected[::2]} & set(synced)
    assert str(root / "t" / "old.parquet") not in synced


def _parquet_on_disk(lake: DuckLakeWarehouse) -> set[str]:
    return {str(p) for p in Path(lake.data_path).rglob("*.parquet")}


def test_maintenance_merges_small_files_and_forgets_only_what_is_past_the_window(
    lake: DuckLakeWarehouse, tmp_path: Path
) -> None:
    """Each load adds small files (data, ledger). Maintenance merges them; a window that
    reaches every snapshot keeps time travel to every export and deletes nothing; a window of
    zero expires every snapshot but the last and deletes the files only they named. The data
    as of now never changes; a dry run changes nothing. (The merged files reach the disk before
    the catalog names them: :meth:`_commit`, tested above.)"""
    snapshots = []
    for n in range(4):
        parquet = write_parquet(tmp_path / f"{n}.parquet", "alpha", f"e{n}", first=n * 10, rows=15)
        snapshots.append(load_export(lake, "alpha", f"e{n}", parquet, body_runs=[]))
    con = analyst(lake)

    def now() -> tuple[object, ...]:
        return (
            con.execute("SELECT count(*), max(id), sum(id) FROM lake.alpha.items").fetchone(),
            con.execute(
                "SELECT export_id, state FROM lake.pipeline.exports ORDER BY export_id"
            ).fetchall(),
        )

    current = now()
    files = _parquet_on_disk(lake)

    dry = lake.maintain(timedelta(0), grace=timedelta(0), dry_run=True)
    assert dry.snapshots_expired > 0 and dry.data_files_after == dry.data_files_before
    assert _parquet_on_disk(lake) == files and len(lake.snapshots()) > len(snapshots)

    kept = lake.maintain(timedelta(days=1), grace=timedelta(0))
    assert kept.data_files_after < kept.data_files_before
    # Nothing expired: only files no snapshot ever showed (a load's own staging) may go.
    assert kept.snapshots_expired == 0
    for n, version in enumerate(snapshots):
        rows = con.execute(
            f"SELECT count(*), max(id) FROM lake.alpha.items AT (VERSION => {version})"
        ).fetchone()
        assert rows == (n * 10 + 15, n * 10 + 14)
    assert now() == current

    done = lake.maintain(timedelta(0), grace=timedelta(0))
    assert done.snapshots_expired > 0 and done.files_deleted > 0
    assert [s["snapshot_id"] for s in lake.snapshots()] == [lake.snapshots()[-1]["snapshot_id"]]
    # Left on disk: exactly the files the last snapshot names, fewer than before.
    named: set[str] = set()
    for schema_name, table_name in con.execute(
        "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = 'lake'"
    ).fetchall():
        for data_file, delete_file in con.execute(
            "SELECT data_file, delete_file FROM ducklake_list_files('lake', ?, schema => ?)",
            [table_name, schema_name],
        ).fetchall():
            named |= {data_file} | ({delete_file} if delete_file else set())
    assert _parquet_on_disk(lake) == named and len(named) < len(files)
    assert now() == current
    with pytest.raises(duckdb.Error):
        con.execute(f"SELECT count(*) FROM lake.alpha.items AT (VERSION => {snapshots[0]})")
    con.close()


def test_the_retention_job_maintains_a_lake_only_when_told(
    lake: DuckLakeWarehouse, tmp_path: Path
) -> None:
    """``retention_job`` leaves a lake alone by default (every export stays reachable); with
    ``lake_snapshot_days`` it merges the lake's small files and expires the older snapshots,
    and says so in its metadata."""
    import dagster as dg

    from export_pipeline.defs.resources import WarehouseResource
    from export_pipeline.defs.schedules import RetentionResource, retention_job

    for n in range(3):
        parquet = write_parquet(tmp_path / f"{n}.parquet", "alpha", f"e{n}", first=n * 10, rows=15)
        load_export(lake, "alpha", f"e{n}", parquet, body_runs=[])
    resource = WarehouseResource(
        backend="ducklake",
        lake_catalog=lake.catalog_target,
        lake_data_path=lake.data_path,
        data_dir=str(tmp_path / "data"),
    )
    snapshots = len(lake.snapshots())

    def run(retention: RetentionResource) -> dict[str, object]:
        result = retention_job.execute_in_process(
            instance=dg.DagsterInstance.ephemeral(),
            resources={"warehouse": resource, "retention": retention},
        )
        assert result.success
        (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
        return {k: v.value for k, v in event.step_output_data.metadata.items()}

    untouched = run(RetentionResource())
    assert "lake_snapshots_expired" not in untouched and len(lake.snapshots()) == snapshots

    maintained = run(RetentionResource(lake_snapshot_days=0))
    assert maintained["lake_snapshots_expired"] == snapshots  # all but the merge's own
    assert [s["snapshot_id"] for s in lake.snapshots()] == [lake.snapshots()[-1]["snapshot_id"]]
    con = analyst(lake)
    assert con.execute("SELECT count(*), max(id) FROM lake.alpha.items").fetchone() == (35, 34)
    con.close()
