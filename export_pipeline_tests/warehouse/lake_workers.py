"""Processes for the lake tests: writers that load exports, a reader that queries meanwhile.

Run with multiprocessing's ``spawn`` start method, so each is a fresh interpreter with its own
DuckDB, exactly like two Dagster runs on one machine (or on two, with a PostgreSQL catalog).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from export_pipeline.core.ledger import Ledger
from export_pipeline.core.load import ensure_views, load_parquet
from export_pipeline.core.model import ExportKind, ExportRequest, ExportState, ExportStatus
from export_pipeline.core.warehouse import DuckLakeWarehouse, Warehouse


def kind_of(provider: str) -> ExportKind:
    return ExportKind(provider=provider, name="items", primary_key=("id",))


def write_parquet(path: Path, provider: str, export_id: str, first: int, rows: int) -> Path:
    """Rows ``first .. first+rows-1`` of ``provider`` as normalise would write them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect() as con:
        con.execute(
            f"COPY (SELECT i AS id, '{provider}-' || i AS name, '{export_id}' AS _export_id, "
            f"'part-1.jsonl' AS _source_file FROM range({first}, {first + rows}) t(i)) "
            f"TO '{path}' (FORMAT parquet)"
        )
    return path


def load_export(
    warehouse: Warehouse,
    provider: str,
    export_id: str,
    parquet: Path,
    *,
    body_runs: list[int],
    during: Callable[[int], None] | None = None,
    kind: ExportKind | None = None,
) -> int | None:
    """What ExportRunner does around the load: the ledger records the export, then ONE
    transaction (re-run whole on a collision) merges it, marks it loaded, moves the cursor."""
    kind = kind or kind_of(provider)
    ledger = Ledger(warehouse)
    ledger.record_request(
        kind,
        ExportRequest(),
        ExportStatus(export_id=export_id, state=ExportState.READY),
        source="test",
    )
    for attempt in warehouse.transactions():
        with attempt as con:
            body_runs.append(1)
            if ledger.is_loaded(con, provider, export_id):
                return None
            if during is not None:
                during(len(body_runs))  # a test's hook: inside the open transaction
            load_parquet(con, kind, [parquet])
            ensure_views(con, kind)
            ledger.mark_loaded(
                con,
                kind,
                export_id,
                rows=0,
                bytes_downloaded=0,
                raw_uri=None,
                parquet_uri=str(parquet),
                files=[],
                cursor_value=None,
            )
            warehouse.label_commit(con, f"load {export_id}", provider=provider, export_id=export_id)
    return warehouse.last_committed_snapshot()


def writer(root: str, provider: str, loads: int, rows: int, out: Any) -> None:
    try:
        warehouse = DuckLakeWarehouse(
            str(Path(root) / "lake" / "catalog.sqlite"), str(Path(root) / "lake" / "files")
        )
        snapshots = []
        for n in range(loads):
            export_id = f"{provider}-{n}"
            parquet = write_parquet(
                Path(root) / "parquet" / provider / f"{n}.parquet", provider, export_id, n, rows
            )
            snapshots.append(load_export(warehouse, provider, export_id, parquet, body_runs=[]))
        out.put(("ok", provider, snapshots))
    except BaseException:
        out.put(("error", provider, traceback.format_exc()))


def reader(root: str, attach_sql: str, extension_dir: str, stop: Any, out: Any) -> None:
    """An analyst: a separate DuckDB attaching the lake READ_ONLY, querying in a loop."""
    queries = errors = 0
    messages: list[str] = []
    try:
        con = duckdb.connect(
            config={"extension_directory": extension_dir, "autoinstall_known_extensions": False}
        )
        con.execute(attach_sql)
        while not stop.is_set():
            try:
                con.execute("SELECT count(*) FROM lake.pipeline.exports").fetchall()
                for schema in ("alpha", "beta"):
                    exists = con.execute(
                        "SELECT count(*) FROM information_schema.tables "
                        "WHERE table_catalog = 'lake' AND table_schema = ?",
                        [schema],
                    ).fetchone()[0]
                    if exists:
                        con.execute(f"SELECT count(*) FROM lake.{schema}.items").fetchall()
                queries += 1
            except duckdb.Error as exc:
                errors += 1
                messages.append(str(exc)[:300])
            time.sleep(0.05)
        out.put(("reader", queries, errors, messages[:5]))
    except BaseException:
        out.put(("reader", queries, -1, [traceback.format_exc()]))


def claimant(
    catalog: str,
    data_path: str,
    data_dir: str,
    base_url: str,
    token: str,
    export_ids: list[str],
    owner: str,
    start: Any,
    out: Any,
) -> None:
    """A run in its own process (its own DuckDB and lake attachment): ingests ``export_ids`` of
    the locations sandbox in that order, through the real ExportRunner (claim, download,
    normalise, load, ledger), and reports ``(export_id, skipped, rows, waited_for, cursor)``
    for each."""
    from export_pipeline.core.ingest import ExportRunner, IngestSettings
    from export_pipeline.core.storage import LocalStorage
    from export_pipeline.providers.locations import LOCATIONS, LocationsProvider
    from export_pipeline_tests.providers.locations.conftest import FAST_RETRY

    try:
        provider = LocationsProvider.from_settings(base_url=base_url, token=token, retry=FAST_RETRY)
        runner = ExportRunner(
            provider,
            Ledger(DuckLakeWarehouse(catalog, data_path)),
            LocalStorage(Path(data_dir)),
            IngestSettings(
                poll_initial_seconds=0.02,
                retry=FAST_RETRY,
                claim_wait_seconds=120,
                claim_poll_seconds=0.05,
            ),
            owner=owner,
        )
        with runner.ledger.warehouse.connect():  # attach (loading the extensions) before the start
            pass
        start.wait(timeout=120)
        results = []
        for export_id in export_ids:
            result = runner.ingest(LOCATIONS, export_id)
            results.append(
                (export_id, result.skipped, result.rows, result.waited_for, result.cursor)
            )
        provider.close()
        out.put(("ok", owner, results))
    except BaseException:
        out.put(("error", owner, traceback.format_exc()))


def invalidated_lake(catalog: str, data_path: str) -> None:
    """Run as a script (``python -c``): DuckDB invalidates this process's lake instance while
    another thread is inside a transaction on it. Prints JSON: what each thread saw. A process
    that aborts (SIGABRT: a connection of the invalidated instance closed) prints nothing.

    The invalidation is real: DuckLake 1.4.4 fails a write to a table that the same transaction
    gave a JSON column by ALTER with an INTERNAL error, and DuckDB then invalidates the whole
    instance, as it does after an internal error at a commit (duckdb/ducklake#1198), which
    cannot be provoked on purpose.
    """
    import json
    import threading

    warehouse = DuckLakeWarehouse(catalog, data_path)
    with warehouse.transaction() as con:
        con.execute("CREATE TABLE main.t AS SELECT 1 AS id")
    inside, invalidated = threading.Event(), threading.Event()
    runs: list[str] = []

    def writer_thread() -> None:
        try:
            for attempt in warehouse.transactions():
                with attempt as con:
                    runs.append("run")
                    con.execute("SELECT count(*) FROM main.t").fetchall()
                    if len(runs) == 1:  # the first attempt's instance is invalidated meanwhile
                        inside.set()
                        invalidated.wait(timeout=120)
                    con.execute("INSERT INTO main.t VALUES (10)")
            runs.append("committed")
        except BaseException as exc:
            runs.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=writer_thread)
    thread.start()
    inside.wait(timeout=120)
    error = ""
    try:
        # Not through transaction(): the writer thread holds the writer lock.
        with warehouse.connect() as con:
            con.execute("BEGIN TRANSACTION")
            con.execute("ALTER TABLE main.t ADD COLUMN extra JSON")
            con.execute("INSERT INTO main.t (id) VALUES (2)")
    except duckdb.Error as exc:
        error = type(exc).__name__
    invalidated.set()
    thread.join(timeout=120)
    with warehouse.connect() as con:
        rows = con.execute("SELECT id FROM main.t ORDER BY id").fetchall()
    print(json.dumps({"error": error, "runs": runs, "rows": [r[0] for r in rows]}))
