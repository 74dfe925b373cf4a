"""Reads during a load: a reader polling the read path vs the same load alone.

Run from the repo root::

    python -m benchmarks.read_during_load                 # 200,000 locations, reader every 1 s
    python -m benchmarks.read_during_load --repeat 3      # medians of 3 pairs
    python -m benchmarks.read_during_load --control       # also: a reader on the writer's file

What runs where (the machinery of ``benchmarks.ingest``):

* The **parent** runs the locations sandbox on loopback and the producer thread, and the reader.
* Each **load child** runs ``benchmarks.ingest``'s real ingest (``ExportRunner.sync``: request,
  download, Parquet, merge, ledger, COMMIT, then the read replica's publish) twice into one
  work dir: a warm-up full export (not reported) so that a replica exists, then the measured
  one (a full export again: 200,000 rows merged over 200,000).
* The **reader** (a separate process) opens the published replica read-only every
  ``--interval`` seconds, counts ``locations.locations`` and ``pipeline.exports``, closes it.
  ``--control`` adds a run whose reader opens the writer's ``warehouse.duckdb`` read-only
  instead, the way analysts did before the read path existed.

Pairs alternate (alone, with reader) so that drift on a shared machine hits both. The last line
is one JSON object; ``ratio_with_reader`` = median seconds with the reader / median alone.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import ChildRun, emit_json, median, rounded, run_child
from benchmarks.ingest import _Producer

MODULE = "benchmarks.read_during_load"
DEFAULT_ROWS = 200_000
REQUIRED_KEYS = (
    "rows",
    "seconds_alone",
    "seconds_with_reader",
    "ratio_with_reader",
    "reader_queries",
    "reader_errors",
    "publish_seconds",
)


def _child_load(base_url: str, workdir: Path, fmt: str) -> dict[str, Any]:
    """``benchmarks.ingest``'s measured ingest (it times the replica's publish as well)."""
    from benchmarks.ingest import _child_ingest

    return _child_ingest(base_url, workdir, fmt, None)


def _reader(target: str, interval: float, stop: Any, out: Any) -> None:
    """Poll ``target``: 'replica:<dir>' (the read path) or 'file:<path>' (the writer's file)."""
    import duckdb

    from export_pipeline.core.replica import open_replica

    kind, _, where = target.partition(":")
    queries, errors, messages = 0, 0, []
    out.put("started")
    while not stop.is_set():
        try:
            if kind == "replica":
                con = open_replica(Path(where))
            else:
                con = duckdb.connect(where, read_only=True)
            try:
                con.execute("SELECT count(*) FROM locations.locations").fetchone()
                con.execute("SELECT count(*) FROM pipeline.exports").fetchone()
            finally:
                con.close()
            queries += 1
        except Exception as exc:
            errors += 1
            if len(messages) < 3:
                messages.append(f"{type(exc).__name__}: {exc}"[:200])
        stop.wait(interval)
    out.put((queries, errors, messages))


def _load(base_url: str, token: str, work: Path, fmt: str) -> ChildRun:
    from export_pipeline.providers.locations import TOKEN_ENV_VAR

    return run_child(
        MODULE,
        ["--child", "load", "--base-url", base_url, "--workdir", str(work), "--format", fmt],
        env={TOKEN_ENV_VAR: token},
    )


def _measure(
    base_url: str, token: str, work: Path, fmt: str, reader: str | None, interval: float
) -> dict[str, Any]:
    """Warm-up load, then the measured load (with the reader polling ``reader`` if given)."""
    _load(base_url, token, work, fmt)  # a replica (and a table to merge into) exists now
    outcome: dict[str, Any] = {"queries": 0, "errors": 0, "messages": []}
    if reader is None:
        run = _load(base_url, token, work, fmt)
    else:
        target = (
            f"replica:{work / 'read'}"
            if reader == "replica"
            else f"file:{work / 'warehouse.duckdb'}"
        )
        ctx = multiprocessing.get_context("spawn")
        out, stop = ctx.Queue(), ctx.Event()
        process = ctx.Process(target=_reader, args=(target, interval, stop, out))
        process.start()
        out.get(timeout=60)
        time.sleep(min(interval, 1.0))  # the reader is polling before the load starts
        try:
            run = _load(base_url, token, work, fmt)
        finally:
            stop.set()
            queries, errors, messages = out.get(timeout=60)
            process.join(timeout=30)
        outcome = {"queries": queries, "errors": errors, "messages": messages}
    r = run.result
    return {"seconds": r["seconds"], "publish_seconds": r["publish_seconds"], **outcome, **r}


def run(rows: int, fmt: str, repeat: int, interval: float, control: bool) -> dict[str, Any]:
    from export_pipeline.sandbox.locations import State, create_app
    from export_pipeline.sandbox.server import RunningServer

    alone: list[dict[str, Any]] = []
    reading: list[dict[str, Any]] = []
    controls: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        root = Path(tmp)
        state = State(
            n_locations=rows, ready_after_seconds=86_400, directory=root / "sandbox", seed=1
        )
        state.processing_after_seconds = 0.0
        with state, RunningServer(create_app(state)) as server, _Producer(state):
            print(f"sandbox: {rows:,} locations ({fmt}) at {server.base_url}", flush=True)
            plan = [("alone", None), ("reader", "replica")] * repeat
            if control:
                plan.append(("control", "file"))
            for i, (label, reader) in enumerate(plan):
                work = root / f"run{i}"
                m = _measure(server.base_url, state.token, work, fmt, reader, interval)
                {"alone": alone, "reader": reading, "control": controls}[label].append(m)
                print(
                    f"{label:<8} load {m['seconds']:.2f}s (publish {m['publish_seconds']:.2f}s)"
                    + (
                        f"; reader: {m['queries']} queries, {m['errors']} errors "
                        f"{m['messages'][:1]}"
                        if reader
                        else ""
                    ),
                    flush=True,
                )
                shutil.rmtree(work, ignore_errors=True)
    seconds_alone = median([m["seconds"] for m in alone])
    seconds_reading = median([m["seconds"] for m in reading])
    summary: dict[str, Any] = {
        "rows": rows,
        "format": fmt,
        "runs": repeat,
        "reader_interval_seconds": interval,
        "seconds_alone": rounded(seconds_alone),
        "seconds_with_reader": rounded(seconds_reading),
        "ratio_with_reader": rounded(seconds_reading / seconds_alone),
        "reader_queries": sum(m["queries"] for m in reading),
        "reader_errors": sum(m["errors"] for m in reading),
        "publish_seconds": rounded(median([m["publish_seconds"] for m in alone + reading])),
        "load_seconds": rounded(median([m["load_seconds"] for m in alone + reading])),
        "publish_share_of_load": rounded(
            median([m["publish_seconds"] / m["seconds"] for m in alone + reading])
        ),
    }
    if controls:
        summary["control_reader_on_writer_file"] = {
            "queries": sum(m["queries"] for m in controls),
            "errors": sum(m["errors"] for m in controls),
            "example": (controls[0]["messages"] or [None])[0],
        }
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--format", choices=("json", "csv"), default="json")
    parser.add_argument("--repeat", type=int, default=1, help="(alone, with reader) pairs")
    parser.add_argument("--interval", type=float, default=1.0, help="reader's poll, seconds")
    parser.add_argument("--control", action="store_true", help="also read the writer's file")
    parser.add_argument("--child", choices=("load",), help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "load":
        emit_json(_child_load(args.base_url, args.workdir, args.format))
        return 0
    emit_json(run(args.rows, args.format, args.repeat, args.interval, args.control))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
