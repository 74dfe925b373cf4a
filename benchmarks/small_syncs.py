"""Small-sync benchmark: a full ``mews_sync`` (9 kinds x 50 rows) on the sandbox, as launched.

Run from the repo root::

    python -m benchmarks.small_syncs                # project executor vs a process per step
    python -m benchmarks.small_syncs --no-baseline  # only the project's job (seconds)
    python -m benchmarks.small_syncs --job deliveries_sync

What runs where: the parent starts the sandbox (all four simulators on loopback) and points the
project's resources at it through the same environment variables a user sets, in a fresh
working directory (so ``data/warehouse.duckdb`` is new). Each measured run is
``dagster.execute_job`` of the reconstructable job on a real on-disk ``DagsterInstance``: the
job's own executor decides how steps run, exactly as for a run launched from the UI or a
schedule (``execute_in_process`` would hide the executor). The default ``SyncSettingsResource``
is used (poll intervals a user gets), not the tests' fast settings.
A sync run plans no checks: ``data_checks_sensor`` runs them afterwards, in runs of their own.

* ``seconds``: the job as the project defines it (its executor and asset shape).
* ``baseline_seconds``: the same steps under ``multiprocess_executor`` (one process
  per step, Dagster's default and the project's shape before), in the same run; ``ratio`` is
  ``seconds / baseline_seconds``.

The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from benchmarks._common import REPO_ROOT, emit_json, rounded

_JOB_ENV = "SMALL_SYNCS_JOB"
_EXECUTOR_ENV = "SMALL_SYNCS_EXECUTOR"


def _job() -> dg.JobDefinition:
    """The job to measure, rebuilt in every process the executor starts (reconstructable)."""
    from export_pipeline.definitions import build_defs

    defs = build_defs()
    name = os.environ[_JOB_ENV]
    job = defs.resolve_job_def(name)
    if os.environ.get(_EXECUTOR_ENV) != "multiprocess":
        return job
    baseline = dg.define_asset_job(
        f"{name}_one_process_per_step",
        # Without checks, as the sync job plans none: the same steps (asset checks defined
        # for these assets would otherwise join the selection as steps of their own).
        selection=dg.AssetSelection.assets(*job.asset_layer.executable_asset_keys).without_checks(),
        executor_def=dg.multiprocess_executor,
    )
    return dg.Definitions(
        assets=list(defs.assets or []),
        asset_checks=list(defs.asset_checks or []),
        jobs=[baseline],
        resources=defs.resources,
    ).resolve_job_def(baseline.name)


def _measure(instance: dg.DagsterInstance, executor: str) -> tuple[float, bool, int]:
    os.environ[_EXECUTOR_ENV] = executor
    t0 = time.perf_counter()
    with dg.execute_job(dg.reconstructable(_job), instance=instance) as result:
        seconds = time.perf_counter() - t0
        steps = len({e.step_key for e in result.all_events if e.is_step_success})
        return seconds, result.success, steps


def _rows(warehouse: Path, tables: Sequence[str]) -> int:
    import duckdb

    with duckdb.connect(str(warehouse), read_only=True) as con:
        return sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.small_syncs")
    parser.add_argument("--job", default="mews_sync")
    parser.add_argument("--rows", type=int, default=50, help="rows per Mews entity type")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    args = parser.parse_args(argv)

    from export_pipeline.definitions import BINDINGS
    from export_pipeline.sandbox.bundle import start_sandbox

    provider = args.job.removesuffix("_sync")
    kinds = next(b for b in BINDINGS if b.name == provider).kinds
    tables = [k.table for k in kinds if k.key != "mapping/results"]
    figures: dict[str, Any] = {"benchmark": "small_syncs", "job": args.job}
    old_cwd, old_env = Path.cwd(), dict(os.environ)
    # Steps in child processes import this module and the project from the repo root.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [old_env.get("PYTHONPATH")])]
    )
    os.environ[_JOB_ENV] = args.job
    try:
        with (
            start_sandbox(n_locations=50, mews_options={"default_count": args.rows}) as sandbox,
            tempfile.TemporaryDirectory(prefix="small_syncs_") as tmp,
        ):
            os.environ.update(sandbox.env())
            runs = [("project", "seconds")]
            if args.baseline:
                runs.append(("multiprocess", "baseline_seconds"))
            for executor, key in runs:
                work = Path(tmp) / executor
                (work / "home").mkdir(parents=True)
                os.chdir(work)
                with dg.DagsterInstance.local_temp(str(work / "home")) as instance:
                    seconds, ok, steps = _measure(instance, executor)
                if not ok:
                    print(f"{args.job} ({executor}) FAILED", file=sys.stderr)
                    return 1
                rows = _rows(work / "data" / "warehouse.duckdb", tables)
                print(f"{executor:<12} {seconds:7.2f}s  {steps} steps  {rows} rows", flush=True)
                figures[key] = rounded(seconds, 2)
                figures["rows" if executor == "project" else "baseline_rows"] = rows
                figures["steps" if executor == "project" else "baseline_steps"] = steps
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    if "baseline_seconds" in figures:
        figures["ratio"] = rounded(figures["seconds"] / figures["baseline_seconds"], 3)
    figures["cpus"] = os.cpu_count()
    emit_json(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
