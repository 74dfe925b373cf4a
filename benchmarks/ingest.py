"""Locations ingest benchmark: the real pipeline vs DuckDB's own ``read_json`` of the same file.

Run from the repo root::

    python -m benchmarks.ingest                      # 200,000 locations, JSON
    python -m benchmarks.ingest --rows 50000 --format csv
    python -m benchmarks.ingest --rows-sweep 50000,200000   # peak RSS at several sizes
    python -m benchmarks.ingest --repeat 3           # medians of 3 runs (a noisy machine)

What runs where:

* The **parent** runs the locations sandbox (``State`` + ``create_app`` on a loopback uvicorn
  server) and a "producer" thread that writes each requested export file in the background, as
  a real operator would. Its memory is not measured.
* The **ingest child** (a fresh ``python -m benchmarks.ingest --child ingest``) runs the real
  code path: ``LocationsProvider.from_settings`` -> ``ExportRunner(provider,
  Ledger(Warehouse(warehouse.duckdb)), LocalStorage(data), IngestSettings(...)).sync(LOCATIONS,
  ExportRequest(params={"format": ...}))``: request, poll, streaming download, Parquet, merge
  into DuckDB, ledger and cursor committed in one transaction.
* The **download-floor child** fetches the same export's file from the same server with a
  plain streamed GET (bytes discarded): what any loader pays to get the bytes.
* The **local child** (``--child local``) runs the pipeline without the download: it ingests
  the same export from the file the ingest child downloaded, linked into a fresh storage's raw
  tier, where the runner re-reads a verified file instead of downloading it.
* The **baseline child** loads the very file the ingest downloaded with DuckDB's default
  ``CREATE TABLE locations AS SELECT * FROM read_json(file, format := 'array')`` into a fresh
  DuckDB file (``read_csv`` with auto-detection for ``--format csv``); it also times the same
  read with a full type scan (``sample_size := -1``) as context.

``ratio_end_to_end`` = ``seconds`` / (download floor + baseline); ``ratio_without_download`` =
the local child's ``seconds`` / baseline: measured, not the sync less its download phase, as
in ``benchmarks.mews_multipart`` (whose parts are parsed while the later ones download, so
there the difference would leave out the work done meanwhile).

Each child reports its own peak RSS (``ru_maxrss``); the parent also polls it every 20 ms.
The last line of output is one JSON object with the figures. ``seconds`` excludes only the
wait for the provider to prepare the file (see ``_child_ingest``); ``seconds_without_download``
is the local child's, which leaves out the download, whose pace is the sandbox server's (curl
gets the same rate). Peak RSS is bounded by ``IngestSettings.duckdb_memory_limit``
(``--memory-limit``), not by the export's size: below the cap it still rises with rows, because
DuckDB caches what it wrote; ``peak_rss_mb`` is the higher of the two ingests'.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
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

MODULE = "benchmarks.ingest"
DEFAULT_ROWS = 200_000
# Keys the final JSON line always carries (the smoke test checks them).
REQUIRED_KEYS = (
    "rows",
    "format",
    "bytes",
    "seconds",
    "baseline_seconds",
    "ratio_vs_duckdb",
    "peak_rss_mb",
    "baseline_peak_rss_mb",
    "ratio_without_download",
    "download_floor_seconds",
    "ratio_end_to_end",
)


# --------------------------------------------------------------------------- children


def _child_ingest(
    base_url: str,
    workdir: Path,
    fmt: str,
    memory_limit: str | None,
    local: tuple[str, Path] | None = None,
) -> dict[str, Any]:
    """One full export through the real code path, timed phase by phase from the outside.

    What ``seconds`` covers: the whole ``sync()`` minus the time it spent in
    ``wait_until_ready`` -- i.e. the request, the status confirmation, the streaming download,
    normalising to Parquet, and the load transaction (merge + views + ledger + cursor + COMMIT).
    The excluded wait is the provider preparing the file (in the sandbox: generating it in the
    parent's producer thread), which is not the pipeline's work and which the baseline, reading
    a finished file, does not pay either.

    ``local`` (an export id and its downloaded file): the pipeline without the download. The
    file is linked into a fresh storage's raw tier, where a run finds it verified and re-reads
    it (``ExportRunner._verified``), and ``ingest`` loads that export: everything a sync does
    after the download, by the same code.
    """
    import duckdb

    from export_pipeline.core import ingest as ingest_module
    from export_pipeline.core.ingest import ExportRunner, IngestSettings
    from export_pipeline.core.ledger import Ledger, Warehouse
    from export_pipeline.core.model import ExportRequest
    from export_pipeline.core.storage import LocalStorage
    from export_pipeline.providers.locations import (
        LOCATIONS,
        TOKEN_ENV_VAR,
        LocationsProvider,
    )

    load_like_a_run_worker()
    rss_at_start = current_rss_mb()  # interpreter + imports: the floor of any peak
    workdir.mkdir(parents=True, exist_ok=True)
    warehouse_path = workdir / "warehouse.duckdb"
    limit = {"duckdb_memory_limit": memory_limit} if memory_limit else {}
    provider = LocationsProvider.from_settings(
        base_url=base_url, token=os.environ[TOKEN_ENV_VAR], timeout=120.0
    )
    runner = ExportRunner(
        provider,
        Ledger(Warehouse(warehouse_path)),
        LocalStorage(workdir / "data"),
        # Short polls, so the untimed wait does not overshoot the moment the file is ready.
        # Everything else is the default, unless --memory-limit says otherwise.
        IngestSettings(poll_initial_seconds=0.05, poll_max_seconds=0.25, **limit),
    )
    phases = Phases()
    # Timing wrappers only: each calls the real function with the real arguments.
    runner.start = phases.wrap("request", runner.start)  # type: ignore[method-assign]
    runner.wait_until_ready = phases.wrap("wait", settled(runner.wait_until_ready))  # type: ignore[method-assign]
    runner._download = phases.wrap("download", runner._download)  # type: ignore[method-assign]
    ingest_module.to_parquet = phases.wrap("normalise", ingest_module.to_parquet)  # type: ignore[assignment]
    ingest_module.load_parquet = phases.wrap("merge", ingest_module.load_parquet)  # type: ignore[assignment]
    time_closing_steps(phases)

    if local is not None:
        export_id, file = local
        raw = runner.storage.local_dir("raw", LOCATIONS, export_id)
        os.link(file, raw / file.name)
    with phases.time("sync"):
        if local is not None:
            result = runner.ingest(LOCATIONS, local[0], source="benchmark")
        else:
            result = runner.sync(LOCATIONS, ExportRequest(params={"format": fmt}))
    if local is not None and len(result.reused_files) != 1:
        raise RuntimeError(f"re-read {len(result.reused_files)} of 1 file")
    peak = self_peak_rss_mb()
    s = phases.seconds

    # Not timed: the table really holds the export.
    with duckdb.connect(str(warehouse_path), read_only=True) as con:
        row = con.execute("SELECT count(*) FROM locations.locations").fetchone()
    table_rows = int(row[0]) if row else 0
    assert result.raw_uri is not None and len(result.files) == 1, result
    return {
        "export_id": result.export_id,
        "rows": result.rows,
        "table_rows": table_rows,
        "bytes": result.bytes_downloaded,
        "raw_file": str(Path(result.raw_uri) / result.files[0]),
        "seconds": s["sync"] - s.get("wait", 0.0),
        "cpu_seconds": phases.cpu_seconds["sync"] - phases.cpu_seconds.get("wait", 0.0),
        "download_cpu_seconds": phases.cpu_seconds.get("download", 0.0),
        "sync_seconds": s["sync"],
        "wait_seconds": s.get("wait", 0.0),
        "request_seconds": s.get("request", 0.0),
        "download_seconds": s.get("download", 0.0),
        "normalise_seconds": s.get("normalise", 0.0),
        "merge_seconds": s.get("merge", 0.0),
        # From the end of normalising to the end of sync(): publish + the load transaction
        # (merge, views, ledger, cursor, COMMIT).
        "load_seconds": phases.ended_at["sync"] - phases.ended_at["normalise"],
        "peak_rss_mb": round(peak, 1),
        "rss_at_start_mb": round(rss_at_start, 1),
        "peak_rss_mb_after": phases.peak_rss_mb_after,
        # The read replica published after the COMMIT (inside sync(), so inside "seconds").
        "publish_seconds": s.get("publish", 0.0),
        # The load transaction's COMMIT statement (the data written durably), publish excluded.
        "commit_seconds": s.get("commit", 0.0),
        "staging_tail_seconds": s.get("staging_tail", 0.0),
        "duckdb_memory_limit": runner.settings.duckdb_memory_limit,
    }


def _child_baseline(source: Path, db_path: Path, fmt: str) -> dict[str, Any]:
    """DuckDB on its own: the same file into a table of a fresh DuckDB file, default settings.

    Timed: connect, ``CREATE TABLE AS SELECT * FROM read_json(...)``, close (the checkpoint
    that makes it durable) -- the same things the ingest's load transaction pays for.
    """
    import duckdb

    rss_at_start = current_rss_mb()
    for stale in (db_path, db_path.with_name(db_path.name + ".wal")):
        stale.unlink(missing_ok=True)
    path = "'" + str(source).replace("'", "''") + "'"
    if fmt == "json":
        reader = f"read_json({path}, format := 'array')"
    else:
        reader = f"read_csv({path}, header := true)"
    start, cpu = time.perf_counter(), time.process_time()
    con = duckdb.connect(str(db_path))
    con.execute(f"CREATE TABLE locations AS SELECT * FROM {reader}")
    con.close()
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu
    peak = self_peak_rss_mb()
    full_scan_seconds = None
    if fmt == "json":
        # Context, not the baseline: a full type scan, which keeps keys first seen after the
        # default 20,480-record sample (what the pipeline must do).
        start = time.perf_counter()
        with duckdb.connect(str(db_path)) as con:
            con.execute(
                "CREATE TABLE locations_full_scan AS SELECT * FROM "
                f"read_json({path}, format := 'array', sample_size := -1)"
            )
        full_scan_seconds = time.perf_counter() - start
    with duckdb.connect(str(db_path), read_only=True) as con:
        row = con.execute("SELECT count(*) FROM locations").fetchone()
    return {
        "rows": int(row[0]) if row else 0,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "full_scan_seconds": full_scan_seconds,
        "peak_rss_mb": round(peak, 1),
        "rss_at_start_mb": round(rss_at_start, 1),
    }


# --------------------------------------------------------------------------- parent


class _Producer:
    """Writes each export the sandbox is asked for in a background thread, like a real operator.

    The sandbox is started with a very long ``ready_after_seconds``, so its status answers stay
    PENDING/PROCESSING (quickly) until this thread has finished the file; then COMPLETED.
    """

    def __init__(self, state: Any) -> None:
        self.state = state
        self._stop = threading.Event()
        self._done: set[str] = set()
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True, name="producer")

    def _run(self) -> None:
        while not self._stop.is_set():
            for export_id in list(self.state.requests_by_id):
                if export_id in self._done:
                    continue
                self._done.add(export_id)
                try:
                    self.state.complete(export_id)
                except BaseException as exc:  # surfaced by the parent, never swallowed
                    self.errors.append(exc)
            self._stop.wait(0.01)

    def __enter__(self) -> _Producer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _run_size(
    rows: int, fmt: str, repeat: int, keep: Path | None, memory_limit: str | None
) -> dict[str, Any]:
    """Sandbox of ``rows`` locations; ``repeat`` x (ingest, floor, local, baseline); medians."""
    from export_pipeline.providers.locations import TOKEN_ENV_VAR
    from export_pipeline.sandbox.locations import State, create_app
    from export_pipeline.sandbox.server import RunningServer

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-ingest-") if keep is None else None
    root = Path(tmp_ctx.name) if tmp_ctx is not None else keep
    assert root is not None
    ingests: list[ChildRun] = []
    baselines: list[ChildRun] = []
    floors: list[ChildRun] = []
    locals_: list[ChildRun] = []
    try:
        state = State(
            n_locations=rows, ready_after_seconds=86_400, directory=root / "sandbox", seed=1
        )
        state.processing_after_seconds = 0.0
        with state, RunningServer(create_app(state)) as server, _Producer(state) as producer:
            print(f"sandbox: {rows:,} locations ({fmt}) at {server.base_url}", flush=True)
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
                        "--format",
                        fmt,
                        *limit,
                    ],
                    env={TOKEN_ENV_VAR: state.token},
                )
                if producer.errors:
                    raise RuntimeError("the sandbox failed to write the export") from (
                        producer.errors[0]
                    )
                r = ingest.result
                if r["rows"] != rows or r["table_rows"] != rows:
                    raise RuntimeError(f"ingest loaded {r['rows']}/{r['table_rows']} of {rows}")
                print(
                    f"{label}ingest: {r['rows']:,} rows, {r['bytes'] / 1e6:.1f} MB in "
                    f"{r['seconds']:.2f}s (download {r['download_seconds']:.2f}s, normalise "
                    f"{r['normalise_seconds']:.2f}s, load {r['load_seconds']:.2f}s; not timed: "
                    f"waiting for the provider {r['wait_seconds']:.2f}s), "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
                floors.append(
                    measure_download_floor(
                        MODULE,
                        server.base_url,
                        r["export_id"],
                        env={TOKEN_ENV_VAR: state.token},
                        expected_bytes=r["bytes"],
                    )
                )
                locals_.append(
                    measure_without_download(
                        MODULE,
                        server.base_url,
                        root / f"local{i}",
                        r["export_id"],
                        ["--format", fmt, "--file", r["raw_file"], *limit],
                        env={TOKEN_ENV_VAR: state.token},
                        rows=rows,
                        label=label,
                        what="file",
                    )
                )
                baseline = run_child(
                    MODULE,
                    [
                        "--child",
                        "baseline",
                        "--file",
                        r["raw_file"],
                        "--db",
                        str(work / "baseline.duckdb"),
                        "--format",
                        fmt,
                    ],
                )
                b = baseline.result
                if b["rows"] != rows:
                    raise RuntimeError(f"baseline loaded {b['rows']} of {rows} rows")
                print(
                    f"{label}duckdb read_{'json' if fmt == 'json' else 'csv'} baseline: "
                    f"{b['seconds']:.2f}s, peak RSS {b['peak_rss_mb']:.0f} MB "
                    f"-> ratio {r['seconds'] / b['seconds']:.2f}",
                    flush=True,
                )
                ingests.append(ingest)
                baselines.append(baseline)
                if keep is None:  # a 200k export is ~300 MB on disk, three times over
                    shutil.rmtree(work, ignore_errors=True)
                    state.expire(r["export_id"])
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return _summary(rows, fmt, ingests, baselines, floors, locals_)


def _summary(
    rows: int,
    fmt: str,
    ingests: list[ChildRun],
    baselines: list[ChildRun],
    floors: list[ChildRun],
    locals_: list[ChildRun],
) -> dict[str, Any]:
    phases = (
        "request_seconds",
        "download_seconds",
        "normalise_seconds",
        "load_seconds",
        "merge_seconds",
        "publish_seconds",
        "commit_seconds",
        "staging_tail_seconds",
        "wait_seconds",
        "sync_seconds",
    )
    summary = {
        "rows": rows,
        "format": fmt,
        **compare_summary(ingests, baselines, phases, floors, without_download=locals_),
    }
    if fmt == "json":
        full_scan = median([run.result["full_scan_seconds"] for run in baselines])
        summary["baseline_full_scan_seconds"] = rounded(full_scan)
        summary["ratio_vs_duckdb_full_scan"] = rounded(summary["seconds"] / full_scan)
    return summary


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes like 50000,200000, got {text!r}"
        ) from None
    if not sizes or any(n <= 0 for n in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest",
        description="Locations export through the real pipeline vs DuckDB's read_json.",
    )
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="locations in the export")
    parser.add_argument("--format", choices=("json", "csv"), default="json")
    parser.add_argument(
        "--rows-sweep",
        type=_sizes,
        metavar="N,N,...",
        help="run each size in turn (one JSON line each) to show peak RSS does not grow with rows",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; medians reported")
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="IngestSettings.duckdb_memory_limit for the ingest, e.g. 256MB (default: its default)",
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
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.child == "ingest":
        emit_json(_child_ingest(args.base_url, args.workdir, args.format, args.memory_limit))
        return 0
    if args.child == "local":
        local = (args.export_id, args.file)
        emit_json(_child_ingest(args.base_url, args.workdir, args.format, args.memory_limit, local))
        return 0
    if args.child == "baseline":
        emit_json(_child_baseline(args.file, args.db, args.format))
        return 0
    if args.child == "download":
        from export_pipeline.providers.locations import TOKEN_ENV_VAR, LocationsProvider

        provider = LocationsProvider.from_settings(
            base_url=args.base_url, token=os.environ[TOKEN_ENV_VAR], timeout=120.0
        )
        return download_child(provider, args.export_id)
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")

    sizes = args.rows_sweep or [args.rows]
    summaries = []
    for rows in sizes:
        keep = args.keep / f"rows-{rows}" if args.keep else None
        summary = _run_size(rows, args.format, args.repeat, keep, args.memory_limit)
        summaries.append(summary)
        if len(sizes) > 1:
            emit_json(summary)
    final = dict(summaries[-1])
    if len(sizes) > 1:
        final["rss_by_rows"] = {
            str(s["rows"]): {
                "peak_rss_mb": s["peak_rss_mb"],
                "baseline_peak_rss_mb": s["baseline_peak_rss_mb"],
                "seconds": s["seconds"],
                "baseline_seconds": s["baseline_seconds"],
                "ratio_vs_duckdb": s["ratio_vs_duckdb"],
            }
            for s in summaries
        }
    emit_json(final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
