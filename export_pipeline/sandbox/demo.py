"""``export-pipeline demo``: the main job against the bundled sandbox, twice (a full export, then
an incremental one after the sandbox changed some locations). The demo is about the bundled
sandbox's locations provider, so it lives here and the CLI only dispatches to it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path


def run_demo(data_dir: Path, *, rows: int, changes: int, keep: bool, log_level: str) -> int:
    import dagster as dg

    from export_pipeline.core.ledger import Ledger, Warehouse
    from export_pipeline.definitions import build_defs, default_resources
    from export_pipeline.defs.resources import SyncSettingsResource, WarehouseResource
    from export_pipeline.sandbox.bundle import start_sandbox

    warehouse_path = data_dir / "warehouse.duckdb"
    if not keep and data_dir.exists():
        # The sandbox starts from scratch each time, so the demo's warehouse does too.
        for name in ("warehouse.duckdb", "warehouse.duckdb.wal", "read", "raw", "parquet", "work"):
            target = data_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    print(f"starting the sandbox providers on loopback ({rows} locations)...", flush=True)
    with ExitStack() as stack:
        sandbox = stack.enter_context(start_sandbox(n_locations=rows))
        os.environ.update(sandbox.env())
        os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")  # loopback only
        resources = default_resources()
        resources["warehouse"] = WarehouseResource(path=str(warehouse_path), data_dir=str(data_dir))
        resources["sync_settings"] = SyncSettingsResource(
            poll_initial_seconds=0.25,
            # The sandbox serves its files on loopback: allow its ports, nothing else.
            allowed_download_hosts=sandbox.allowed_download_hosts(),
        )
        defs = build_defs(resources)
        job = defs.resolve_job_def("locations_sync")
        instance = stack.enter_context(dg.DagsterInstance.ephemeral())
        ledger = Ledger(Warehouse(warehouse_path))
        summary = []
        for step in ("full", "incremental"):
            if step == "incremental":
                sandbox.simulate_activity(changes)
                print(
                    f"sandbox changed: {changes} locations updated, {changes // 2} added",
                    flush=True,
                )
            t0 = time.perf_counter()
            result = job.execute_in_process(
                instance=instance,
                raise_on_error=False,
                run_config={"loggers": {"console": {"config": {"log_level": log_level.upper()}}}},
            )
            seconds = time.perf_counter() - t0
            if not result.success:
                for event in result.all_events:
                    if event.is_failure:
                        print(event.message, file=sys.stderr)
                print(f"{step} sync FAILED", file=sys.stderr)
                return 1
            record = ledger.last_loaded("locations", "locations")
            assert record is not None
            with Warehouse(warehouse_path).connect() as con:
                files = [
                    f"{name} ({size:,} bytes)"
                    for name, size in con.execute(
                        "SELECT name, size_bytes FROM pipeline.export_files "
                        "WHERE provider = 'locations' AND export_id = ? ORDER BY name",
                        [record.export_id],
                    ).fetchall()
                ]
            summary.append(
                {
                    "sync": step,
                    "export_id": record.export_id,
                    "modified_since": record.modified_since.isoformat()
                    if record.modified_since
                    else None,
                    "files": files,
                    "rows": record.rows_loaded,
                    "seconds": round(seconds, 2),
                }
            )
            print(
                f"{step:<12} export {record.export_id}  rows {record.rows_loaded:>7}  "
                f"{seconds:6.2f}s  since {summary[-1]['modified_since'] or '(full)'}  "
                f"files {', '.join(files)}",
                flush=True,
            )
        with Warehouse(warehouse_path).connect() as con:
            counts = {
                name: con.execute(f"SELECT count(*) FROM locations.{name}").fetchone()[0]
                for name in ("locations", "evses", "connectors")
            }
            cursor = ledger.cursor("locations", "locations")
    print(
        f"warehouse {warehouse_path}: locations.locations={counts['locations']} rows, "
        f"locations.evses={counts['evses']}, locations.connectors={counts['connectors']}; "
        f"cursor={cursor.isoformat() if cursor else None}"
    )
    print(json.dumps({"syncs": summary, "tables": counts}))
    return 0
