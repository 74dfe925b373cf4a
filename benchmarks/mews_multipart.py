"""Mews multi-part benchmark: a JSON Lines snapshot in several parts through the real pipeline
vs DuckDB's own ``read_json`` of the same parts.

Run from the repo root::

    python -m benchmarks.mews_multipart                   # 1,000,000 reservations, 4 parts
    python -m benchmarks.mews_multipart --rows 200000     # a quicker check
    python -m benchmarks.mews_multipart --repeat 3        # medians of 3 runs (a noisy machine)
    python -m benchmarks.mews_multipart --memory-limit 512MB   # DuckDB's cap for the ingest

What runs where:

* The **parent** runs the Mews simulator (``State(parts=4, counts={"Reservation": N})`` +
  ``create_app`` on a loopback uvicorn server). When the export is due, the simulator writes the
  snapshot as 4 JSON Lines parts with their true ``SizeInBytes`` behind signed links. Its memory
  is not measured.
* The **ingest child** (a fresh ``python -m benchmarks.mews_multipart --child ingest``) runs the
  real code path: ``MewsProvider.from_settings`` -> ``ExportRunner(provider,
  Ledger(Warehouse(warehouse.duckdb)), LocalStorage(data), IngestSettings(...)).sync(reservation,
  ExportRequest())``: exports/add, getAll polling, the 4 parts downloaded in parallel and
  size-checked, Parquet with auto-detected nested types, snapshot replace of
  ``mews.reservation`` with ledger + cursor in one transaction.
* The **baseline child** loads the very parts the ingest downloaded with DuckDB's plain
  ``CREATE TABLE reservation AS SELECT * FROM read_json([parts], format :=
  'newline_delimited')`` (types auto-detected, as the ingest does) into a fresh DuckDB file.

``seconds`` is the ingest's ``sync()`` minus the time spent waiting for Mews to produce the
export (``wait_seconds``, reported): the simulator generating a million records is not the
pipeline's work, and the baseline, reading finished files, does not pay it either;
``seconds_without_download`` is a run without the download, whose pace is the simulator's server
(in the parent, on the same CPUs): the **local child** ingests the same export from the parts
the ingest child downloaded, linked into a fresh storage's raw tier, where the runner re-reads
verified files instead of downloading them. (The sync parses each part while the later ones
download, so its time less the download's would leave out work done meanwhile.) Peak RSS
follows ``IngestSettings.duckdb_memory_limit`` (``--memory-limit``): DuckDB keeps what it
wrote cached up to that cap; ``peak_rss_mb`` is the higher of the two ingests'. Each child
reports its own peak RSS (``ru_maxrss``); the parent also polls it every 20 ms. The last line of
output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks._common import (
    ChildRun,
    Phases,
    compare_summary,
    current_rss_mb,
    download_child,
    emit_json,
    load_like_a_run_worker,
    measure_download_floor,
    measure_without_download,
    median,
    rounded,
    run_child,
    self_peak_rss_mb,
    settled,
    time_closing_steps,
)

MODULE = "benchmarks.mews_multipart"
DEFAULT_ROWS = 1_000_000
DEFAULT_PARTS = 4
ENTITY_TYPE = "Reservation"
# A generated reservation is ~1.4 KB of JSON; the run keeps the simulator's parts, the
# downloaded parts, the Parquet, the warehouse and the baseline's DuckDB file on disk at once.
_BYTES_PER_ROW = 1_450
_DISK_FACTOR = 4
REQUIRED_KEYS = (
    "rows",
    "parts",
    "bytes",
    "seconds",
    "baseline_seconds",
    "ratio_vs_duckdb",
    "peak_rss_mb",
    "baseline_peak_rss_mb",
    "download_seconds",
    "normalise_seconds",
    "load_seconds",
    "ratio_without_download",
    "download_floor_seconds",
    "ratio_end_to_end",
)
TOKEN_ENV = ("MEWS_CLIENT_TOKEN", "MEWS_ACCESS_TOKEN")


# --------------------------------------------------------------------------- children


def _child_ingest(
    base_url: str,
    workdir: Path,
    memory_limit: str | None,
    local: tuple[str, list[Path]] | None = None,
) -> dict[str, Any]:
    """One Mews export of every reservation through the real code path, phase by phase.

    The wrappers only time the real functions (same arguments, same results). ``memory_limit``
    overrides ``IngestSettings.duckdb_memory_limit`` (None: the project's default).

    ``local`` (an export id and its downloaded parts): the pipeline without the download. The
    parts are linked into a fresh storage's raw tier, where a run finds them verified and
    re-reads them (``ExportRunner._verified``), and ``ingest`` loads that export: everything
    a sync does after the download, by the same code. (The sync overlaps its download with the
    parse, so its time less the download's is not this.)
    """
    import duckdb

    from export_pipeline.core import ingest as ingest_module
    from export_pipeline.core.ingest import ExportRunner, IngestSettings
    from export_pipeline.core.ledger import Ledger, Warehouse
    from export_pipeline.core.model import ExportRequest
    from export_pipeline.core.storage import LocalStorage
    from export_pipeline.providers.mews import MewsProvider

    load_like_a_run_worker()
    rss_at_start = current_rss_mb()  # interpreter + imports: the floor of any peak
    workdir.mkdir(parents=True, exist_ok=True)
    warehouse_path = workdir / "warehouse.duckdb"
    provider = MewsProvider.from_settings(
        base_url=base_url,
        body_credentials={
            "ClientToken": os.environ[TOKEN_ENV[0]],
            "AccessToken": os.environ[TOKEN_ENV[1]],
        },
        timeout=120.0,
    )
    kind = next(k for k in MewsProvider.kinds if k.params["entity_type"] == ENTITY_TYPE)
    # Short polls, so the untimed wait does not overshoot the moment the parts are ready;
    # a long timeout, because the simulator generates a million records first.
    settings = IngestSettings(
        poll_initial_seconds=0.05, poll_max_seconds=0.25, wait_timeout_seconds=7200
    )
    if memory_limit:
        settings = replace(settings, duckdb_memory_limit=memory_limit)
    runner = ExportRunner(
        provider, Ledger(Warehouse(warehouse_path)), LocalStorage(workdir / "data"), settings
    )
    phases = Phases()
    runner.start = phases.wrap("request", runner.start)  # type: ignore[method-assign]
    runner.wait_until_ready = phases.wrap("wait", settled(runner.wait_until_ready))  # type: ignore[method-assign]
    runner._download = phases.wrap("download", runner._download)  # type: ignore[method-assign]
    ingest_module.to_parquet = phases.wrap("normalise", ingest_module.to_parquet)  # type: ignore[assignment]
    ingest_module.load_parquet = phases.wrap("snapshot_replace", ingest_module.load_parquet)  # type: ignore[assignment]
    time_closing_steps(phases)

    if local is not None:
        export_id, parts = local
        raw = runner.storage.local_dir("raw", kind, export_id)
        for part in parts:
            os.link(part, raw / part.name)
    with phases.time("sync"):
        if local is not None:
            result = runner.ingest(kind, local[0], source="benchmark")
        else:
            result = runner.sync(kind, ExportRequest(), source="benchmark")
    if local is not None and len(result.reused_files) != len(local[1]):
        raise RuntimeError(f"re-read {len(result.reused_files)} of {len(local[1])} parts")
    peak = self_peak_rss_mb()
    provider.close()
    s = phases.seconds

    # Not timed: the table really holds the snapshot, nested columns kept nested.
    with duckdb.connect(str(warehouse_path), read_only=True) as con:
        table_rows = con.execute("SELECT count(*) FROM mews.reservation").fetchone()[0]
        customer_type = con.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = 'mews' "
            "AND table_name = 'reservation' AND column_name = 'Customer'"
        ).fetchone()[0]
    assert result.raw_uri is not None
    return {
        "export_id": result.export_id,
        "rows": result.rows,
        "table_rows": int(table_rows),
        "customer_type": customer_type,
        "bytes": result.bytes_downloaded,
        "raw_files": [str(Path(result.raw_uri) / name) for name in result.files],
        "seconds": s["sync"] - s.get("wait", 0.0),
        "cpu_seconds": phases.cpu_seconds["sync"] - phases.cpu_seconds.get("wait", 0.0),
        "download_cpu_seconds": phases.cpu_seconds.get("download", 0.0),
        "sync_seconds": s["sync"],
        "wait_seconds": s.get("wait", 0.0),
        "request_seconds": s.get("request", 0.0),
        "download_seconds": s.get("download", 0.0),
        "normalise_seconds": s.get("normalise", 0.0),
        "snapshot_replace_seconds": s.get("snapshot_replace", 0.0),
        # From the end of normalising to the end of sync(): publish + the load transaction
        # (snapshot replace, ledger, cursor, COMMIT).
        "load_seconds": phases.ended_at["sync"] - phases.ended_at["normalise"],
        "peak_rss_mb": round(peak, 1),
        "rss_at_start_mb": round(rss_at_start, 1),
        "peak_rss_mb_after": phases.peak_rss_mb_after,
        # The read replica published after the COMMIT (inside sync(), so inside "seconds").
        "publish_seconds": s.get("publish", 0.0),
        # The load transaction's COMMIT statement (the data written durably), publish excluded.
        "commit_seconds": s.get("commit", 0.0),
        "staging_tail_seconds": s.get("staging_tail", 0.0),
        "duckdb_memory_limit": settings.duckdb_memory_limit,
    }


def _child_baseline(files: list[Path], db_path: Path) -> dict[str, Any]:
    """DuckDB on its own: the same parts into a table of a fresh DuckDB file, default settings.

    Timed: connect, ``CREATE TABLE AS SELECT * FROM read_json([...])``, close (the checkpoint
    that makes it durable): what the ingest's load transaction pays for too.
    """
    import duckdb

    rss_at_start = current_rss_mb()
    for stale in (db_path, db_path.with_name(db_path.name + ".wal")):
        stale.unlink(missing_ok=True)
    paths = "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"
    start, cpu = time.perf_counter(), time.process_time()
    con = duckdb.connect(str(db_path))
    con.execute(
        "CREATE TABLE reservation AS SELECT * FROM "
        f"read_json({paths}, format := 'newline_delimited')"
    )
    con.close()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu
    peak = self_peak_rss_mb()
    # Context, not the baseline: read_json's default guesses types from a 20,480-record sample
    # (keys seen only later are dropped); the pipeline must scan everything, as this does.
    start = time.perf_counter()
    with duckdb.connect(str(db_path)) as con:
        con.execute(
            "CREATE TABLE reservation_full_scan AS SELECT * FROM "
            f"read_json({paths}, format := 'newline_delimited', sample_size := -1)"
        )
    full_scan_seconds = time.perf_counter() - start
    with duckdb.connect(str(db_path), read_only=True) as con:
        rows = con.execute("SELECT count(*) FROM reservation").fetchone()[0]
    return {
        "rows": int(rows),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "full_scan_seconds": full_scan_seconds,
        "peak_rss_mb": round(peak, 1),
        "rss_at_start_mb": round(rss_at_start, 1),
    }


# --------------------------------------------------------------------------- parent


def _check_disk(root: Path, rows: int) -> None:
    need = rows * _BYTES_PER_ROW * _DISK_FACTOR
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(
            f"{rows:,} reservations need about {need / 1e9:.1f} GB free under {root}; "
            f"only {free / 1e9:.1f} GB are (use --rows or --keep DIR elsewhere)"
        )


def _run(
    rows: int, parts: int, repeat: int, keep: Path | None, memory_limit: str | None
) -> dict[str, Any]:
    """Simulator with ``rows`` reservations in ``parts`` parts; ``repeat`` x (ingest, baseline)."""
    from export_pipeline.sandbox.mews import State, create_app
    from export_pipeline.sandbox.server import RunningServer

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-mews-") if keep is None else None
    root = Path(tmp_ctx.name) if tmp_ctx is not None else keep
    assert root is not None
    root.mkdir(parents=True, exist_ok=True)
    _check_disk(root, rows)
    ingests: list[ChildRun] = []
    baselines: list[ChildRun] = []
    floors: list[ChildRun] = []
    locals_: list[ChildRun] = []
    try:
        state = State(
            counts={ENTITY_TYPE: rows},
            parts=parts,
            data_dir=root / "sandbox",
            pending_seconds=0.0,
            processing_seconds=0.0,
            link_ttl_seconds=86_400,
        )
        env = {TOKEN_ENV[0]: state.client_token, TOKEN_ENV[1]: state.access_token}
        with RunningServer(create_app(state)) as server:
            print(
                f"mews sandbox: {rows:,} reservations in {parts} JSONL parts at {server.base_url}",
                flush=True,
            )
            for i in range(repeat):
                work = root / f"run{i}"
                label = f"[{i + 1}/{repeat}] " if repeat > 1 else ""
                limit = ["--memory-limit", memory_limit] if memory_limit else []
                ingest = run_child(
                    MODULE,
                    [
                        "--child",
                        "ingest",
                        "--base-url",
                        server.base_url,
                        "--workdir",
                        str(work),
                        *limit,
                    ],
                    env=env,
                )
                r = ingest.result
                if r["rows"] != rows or r["table_rows"] != rows or len(r["raw_files"]) != parts:
                    raise RuntimeError(
                        f"ingest loaded {r['rows']}/{r['table_rows']} of {rows} rows "
                        f"from {len(r['raw_files'])} of {parts} parts"
                    )
                if not r["customer_type"].startswith("STRUCT("):
                    raise RuntimeError(f"Customer is not nested: {r['customer_type']}")
                print(
                    f"{label}ingest: {r['rows']:,} rows, {r['bytes'] / 1e6:.1f} MB in "
                    f"{len(r['raw_files'])} parts, {r['seconds']:.2f}s (download "
                    f"{r['download_seconds']:.2f}s, normalise {r['normalise_seconds']:.2f}s, "
                    f"load {r['load_seconds']:.2f}s; not timed: Mews producing the export "
                    f"{r['wait_seconds']:.2f}s), peak RSS {r['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
                floors.append(
                    measure_download_floor(
                        MODULE,
                        server.base_url,
                        r["export_id"],
                        env=env,
                        expected_bytes=r["bytes"],
                    )
                )
                locals_.append(
                    measure_without_download(
                        MODULE,
                        server.base_url,
                        root / f"local{i}",
                        r["export_id"],
                        ["--files", *r["raw_files"], *limit],
                        env=env,
                        rows=rows,
                        label=label,
                        what="parts",
                    )
                )
                baseline = run_child(
                    MODULE,
                    [
                        "--child",
                        "baseline",
                        "--db",
                        str(work / "baseline.duckdb"),
                        "--files",
                        *r["raw_files"],
                    ],
                )
                b = baseline.result
                if b["rows"] != rows:
                    raise RuntimeError(f"baseline loaded {b['rows']} of {rows} rows")
                print(
                    f"{label}duckdb read_json baseline: {b['seconds']:.2f}s, peak RSS "
                    f"{b['peak_rss_mb']:.0f} MB -> ratio {r['seconds'] / b['seconds']:.2f}",
                    flush=True,
                )
                ingests.append(ingest)
                baselines.append(baseline)
                if keep is None:  # 1M reservations are ~1.4 GB per copy
                    shutil.rmtree(work, ignore_errors=True)
                    state.expire(r["export_id"])
        state.close()
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return _summary(rows, parts, ingests, baselines, floors, locals_)


def _summary(
    rows: int,
    parts: int,
    ingests: list[ChildRun],
    baselines: list[ChildRun],
    floors: list[ChildRun] = (),  # type: ignore[assignment]
    locals_: list[ChildRun] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    phases = (
        "request_seconds",
        "download_seconds",
        "normalise_seconds",
        "load_seconds",
        "snapshot_replace_seconds",
        "publish_seconds",
        "commit_seconds",
        "staging_tail_seconds",
        "wait_seconds",
        "sync_seconds",
    )
    summary = {
        "rows": rows,
        "parts": parts,
        **compare_summary(ingests, baselines, phases, floors, without_download=locals_),
    }
    full_scan = median([run.result["full_scan_seconds"] for run in baselines])
    summary["baseline_full_scan_seconds"] = rounded(full_scan)
    summary["ratio_vs_duckdb_full_scan"] = rounded(
        median([run.result["seconds"] for run in ingests]) / full_scan
    )
    summary["cpus"] = os.cpu_count()
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mews_multipart",
        description="A multi-part Mews JSONL snapshot through the real pipeline vs read_json.",
    )
    parser.add_argument(
        "--rows", type=int, default=DEFAULT_ROWS, help="reservations in the snapshot"
    )
    parser.add_argument("--parts", type=int, default=DEFAULT_PARTS, help="JSONL parts")
    parser.add_argument("--repeat", type=int, default=1, help="runs; medians reported")
    parser.add_argument(
        "--memory-limit",
        help="IngestSettings.duckdb_memory_limit for the ingest, e.g. 512MB (default: the "
        "project's default)",
    )
    parser.add_argument(
        "--keep", type=Path, help="work in this directory and keep the files (default: temp)"
    )
    # Hidden: how the parent starts the measured children.
    parser.add_argument(
        "--child", choices=("ingest", "local", "baseline", "download"), help=argparse.SUPPRESS
    )
    parser.add_argument("--export-id", help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--files", type=Path, nargs="+", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child == "ingest":
        emit_json(_child_ingest(args.base_url, args.workdir, args.memory_limit))
        return 0
    if args.child == "local":
        local = (args.export_id, list(args.files))
        emit_json(_child_ingest(args.base_url, args.workdir, args.memory_limit, local))
        return 0
    if args.child == "baseline":
        emit_json(_child_baseline(args.files, args.db))
        return 0
    if args.child == "download":
        from export_pipeline.providers.mews import MewsProvider

        provider = MewsProvider.from_settings(
            base_url=args.base_url,
            body_credentials={
                "ClientToken": os.environ[TOKEN_ENV[0]],
                "AccessToken": os.environ[TOKEN_ENV[1]],
            },
            timeout=120.0,
        )
        return download_child(provider, args.export_id)
    if args.rows < args.parts or args.parts < 1:
        raise SystemExit("--rows must be at least --parts, and --parts at least 1")
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    keep = args.keep / f"rows-{args.rows}" if args.keep else None
    emit_json(_run(args.rows, args.parts, args.repeat, keep, args.memory_limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
