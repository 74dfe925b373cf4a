"""Helpers shared by the benchmarks: measured child processes, phase timing, JSON output.

Why child processes: a process's peak RSS (``ru_maxrss``) only ever grows, so two measurements
in one process contaminate each other, and a sandbox server running alongside would count too.
Each measured piece of work therefore runs in a fresh ``python -m <benchmark> --child ...``
that reports its own ``ru_maxrss`` at the end (exact: the kernel's high-water mark), while the
parent also polls the child's RSS with psutil as a cross-check.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
_MB = 1024 * 1024

P = ParamSpec("P")
R = TypeVar("R")


def self_peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MB if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    return psutil.Process().memory_info().rss / _MB


def emit_json(payload: Mapping[str, Any]) -> None:
    """Print one JSON object on one line (the machine-readable result) and flush."""
    print(json.dumps(payload, separators=(", ", ": "), default=str), flush=True)


def last_json_line(text: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of ``text`` (a benchmark's result)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no output")
    value = json.loads(lines[-1])
    if not isinstance(value, dict):
        raise ValueError(f"last line is not a JSON object: {lines[-1][:200]}")
    return value


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Phases:
    """Wall-clock and CPU seconds of named phases, plus the process's peak RSS as each ended.

    ``wrap`` times every call of a function without changing what it does, so the real code
    path can be measured from the outside (``runner.method = phases.wrap("x", runner.method)``).
    A phase that runs more than once is summed.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    # The process's CPU time (every thread: DuckDB's workers too), blind to other tenants.
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    ended_at: dict[str, float] = field(default_factory=dict)
    peak_rss_mb_after: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.seconds[name] = self.seconds.get(name, 0.0) + (end - start)
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu
            self.ended_at[name] = end
            self.peak_rss_mb_after[name] = round(self_peak_rss_mb(), 1)

    def wrap(self, name: str, fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            with self.time(name):
                return fn(*args, **kwargs)

        return timed


class ChildFailedError(RuntimeError):
    """A benchmark child process exited non-zero or printed no JSON result."""


@dataclass(frozen=True)
class ChildRun:
    result: dict[str, Any]  # the child's last stdout line, parsed
    polled_peak_rss_mb: float  # highest RSS the parent saw (child + its children), ~20 ms polls
    wall_seconds: float  # including the interpreter's start-up and imports


def settle() -> None:
    """Write every dirty page of the machine to disk before a measurement starts.

    The kernel writes dirty pages back up to 30 s after they were written, so without this
    the gigabytes one step writes (the simulator's export, the ingest's raw files and Parquet,
    the baseline's DuckDB file) are written back during whichever measurement comes next, on
    the same two cores and disk: the order of the steps, not their code, decided who paid.
    """
    os.sync()


def settled(wait: Callable[..., Any]) -> Callable[..., Any]:
    """``wait`` (the untimed wait for the simulator's export), then :func:`settle`: a real
    provider's files are on its own storage, not dirty pages of the machine that downloads."""

    def call(*args: Any, **kwargs: Any) -> Any:
        result = wait(*args, **kwargs)
        settle()
        return result

    return call


def run_child(
    module: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    poll_seconds: float = 0.02,
    timeout: float | None = None,
) -> ChildRun:
    """Run ``python -m module args`` from the repo root and return its JSON result.

    The child's stdout is read in a thread (so a chatty child cannot block on a full pipe)
    while this thread samples the RSS of the child and its descendants. The child's stderr is
    passed through, so its logs and tracebacks stay visible.
    """
    settle()  # untimed: what the previous step wrote is not this one's to write back
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    cmd = [sys.executable, "-m", module, *args]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=child_env, stdout=subprocess.PIPE, stderr=None, text=True
    )
    chunks: list[str] = []
    reader = threading.Thread(
        target=lambda: chunks.append(proc.stdout.read() if proc.stdout else ""), daemon=True
    )
    reader.start()
    peak = 0.0
    try:
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            if timeout is not None and time.perf_counter() - started > timeout:
                proc.kill()
                raise ChildFailedError(f"{module} {' '.join(args[:2])} timed out after {timeout}s")
            peak = max(peak, _tree_rss_mb(watched))
            time.sleep(poll_seconds)
    except psutil.NoSuchProcess:
        pass
    finally:
        proc.wait()
        reader.join()
    wall = time.perf_counter() - started
    output = "".join(chunks)
    if proc.returncode != 0:
        raise ChildFailedError(
            f"{module} child {list(args[:2])} exited with {proc.returncode}; "
            f"stdout tail: {output[-2000:]}"
        )
    try:
        result = last_json_line(output)
    except ValueError as exc:
        raise ChildFailedError(f"{module} child printed no JSON result: {exc}") from exc
    return ChildRun(result=result, polled_peak_rss_mb=round(peak, 1), wall_seconds=wall)


def _tree_rss_mb(process: psutil.Process) -> float:
    total = 0
    for p in (process, *process.children(recursive=True)):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / _MB


def stream_export(provider: Any, export_id: str, *, parallel: int = 1) -> dict[str, Any]:
    """A plain streamed GET of the export's files from the same server, bytes discarded:
    one file after another (``parallel=1``) or up to ``parallel`` files at once. Returns
    seconds and bytes.

    The file list comes from the provider's status answer (the links are secrets, so they are
    fetched here, never passed on a command line or printed).
    """
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    status = provider.get_statuses([export_id])[export_id]

    def fetch(client: httpx.Client, remote: Any) -> int:
        got = 0
        with client.stream("GET", remote.url, headers=provider.file_headers(remote)) as r:
            r.raise_for_status()
            for chunk in r.iter_raw(1 << 20):
                got += len(chunk)
        return got

    workers = max(1, min(parallel, len(status.files)))
    start, cpu = time.perf_counter(), time.process_time()
    with (
        httpx.Client(timeout=300.0, follow_redirects=True) as client,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        total = sum(pool.map(lambda remote: fetch(client, remote), status.files))
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "bytes": total,
    }


def measure_without_download(
    module: str,
    base_url: str,
    workdir: Path,
    export_id: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    rows: int,
    label: str,
    what: str,
) -> ChildRun:
    """The pipeline without the download: a ``--child local`` run of ``module`` that ingests
    ``export_id`` from the file(s) the sync downloaded (``args`` names them, with any other
    option), re-read from a fresh storage's raw tier under ``workdir`` (removed afterwards)."""
    local = run_child(
        module,
        [
            "--child",
            "local",
            "--base-url",
            base_url,
            "--workdir",
            str(workdir),
            "--export-id",
            export_id,
            *args,
        ],
        env=env,
    )
    loaded = (local.result["rows"], local.result["table_rows"])
    if loaded != (rows, rows):
        raise RuntimeError(f"local ingest loaded {loaded[0]}/{loaded[1]} of {rows} rows")
    print(
        f"{label}ingest of the downloaded {what} (no download): "
        f"{local.result['seconds']:.2f}s, peak RSS {local.result['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    shutil.rmtree(workdir, ignore_errors=True)
    return local


def measure_download_floor(
    module: str,
    base_url: str,
    export_id: str,
    *,
    env: Mapping[str, str],
    expected_bytes: int,
) -> ChildRun:
    """Run ``python -m module --child download`` (which calls :func:`download_child`) and check
    it fetched as many bytes as the ingest did. The tokens travel in ``env``, never in argv."""
    floor = run_child(
        module,
        ["--child", "download", "--base-url", base_url, "--export-id", export_id],
        env=env,
    )
    if floor.result["bytes"] != expected_bytes:
        raise ChildFailedError(
            f"download floor got {floor.result['bytes']} bytes, the ingest {expected_bytes}"
        )
    return floor


def download_child(provider: Any, export_id: str, *, parallel: int = 4) -> int:
    """The body of a benchmark's ``--child download``: the floor's figures as its JSON line.

    The floor is the *best* plain GET of the same files: one after another, and (for several
    files) ``parallel`` at once as the pipeline fetches them; ``seconds`` is the faster of the
    two, both are reported. Sequential runs first, so both read the server's files warm.
    """
    sequential = stream_export(provider, export_id)
    figures: dict[str, Any] = {
        "seconds": sequential["seconds"],
        "cpu_seconds": sequential["cpu_seconds"],
        "bytes": sequential["bytes"],
        "sequential_seconds": sequential["seconds"],
    }
    status = provider.get_statuses([export_id])[export_id]
    if len(status.files) > 1 and parallel > 1:
        concurrent = stream_export(provider, export_id, parallel=parallel)
        if concurrent["bytes"] != sequential["bytes"]:
            raise ChildFailedError(
                f"parallel floor got {concurrent['bytes']} bytes, sequential {sequential['bytes']}"
            )
        figures["parallel_seconds"] = concurrent["seconds"]
        faster = min((sequential, concurrent), key=lambda run: run["seconds"])
        figures["seconds"], figures["cpu_seconds"] = faster["seconds"], faster["cpu_seconds"]
    emit_json(figures)
    return 0


def load_like_a_run_worker() -> None:
    """Import what a Dagster run worker has loaded before a step starts, where the sync
    pays for it otherwise.

    The worker loads the code location (``export_pipeline.definitions``) before it runs the
    asset, and the code location imports pandas (``core/preview.py``). DuckDB 1.4 imports
    pandas at the first parameter it binds in a process (duckdb/duckdb#18658), so a cold
    child would charge its sync ~0.17 s of import that no run pays inside its step. Only
    pandas is imported here, not the whole code location (whose ~120 MB of Dagster would
    only add to the peak RSS measured); the peak already held pandas, imported mid-sync.
    """
    import pandas  # noqa: F401


def time_closing_steps(phases: Phases) -> None:
    """Time the steps after the load inside ``sync()`` as their own phases: the staged load's
    tail (``staging_tail``: the wait for its last inserts after normalise), the read replica's
    publish (``core/replica.py``) and the load's COMMIT (``commit``: the COMMIT statement of
    the transaction that loaded the rows, the publish after it left out), by wrapping the real
    functions. Ledger-only transactions (polls, claims) are not counted in ``commit``."""
    from export_pipeline.core import replica
    from export_pipeline.core.stage import StagedLoad
    from export_pipeline.core.warehouse import DuckDBWarehouse

    replica.publish = phases.wrap("publish", replica.publish)  # type: ignore[assignment]
    # The wait for the staged load's last inserts once normalise is done (core/stage.py).
    StagedLoad.take = phases.wrap("staging_tail", StagedLoad.take)  # type: ignore[method-assign]
    commit = DuckDBWarehouse._commit

    def timed_commit(self: DuckDBWarehouse, con: Any) -> None:
        if id(con) not in self._to_publish:  # not a load (label_commit marks loads)
            commit(self, con)
            return
        published = phases.seconds.get("publish", 0.0)
        with phases.time("commit"):
            commit(self, con)
        phases.seconds["commit"] -= phases.seconds.get("publish", 0.0) - published

    DuckDBWarehouse._commit = timed_commit  # type: ignore[method-assign]


def compare_summary(
    ingests: Sequence[ChildRun],
    baselines: Sequence[ChildRun],
    phase_keys: Sequence[str],
    floors: Sequence[ChildRun] = (),
    *,
    without_download: Sequence[ChildRun] = (),
) -> dict[str, Any]:
    """The figures every benchmark reports: medians over runs, ratios against the baseline
    measured in the same run, peak RSS of each side, and the ingest's phase timings.

    ``without_download``: runs of the pipeline on files already on disk, one per ingest. The
    figures without the download come from them; otherwise from each ingest less its download
    phase (right only where nothing overlaps the download)."""

    def med(runs: Sequence[ChildRun], key: str) -> float:
        return median([run.result[key] for run in runs])

    seconds = med(ingests, "seconds")
    baseline_seconds = med(baselines, "seconds")
    # The download runs at the sandbox server's pace (a Python uvicorn in the parent, sharing
    # the CPUs), so the work both sides do on local files is reported on its own too.
    local_all = [r.result["seconds"] for r in without_download] or [
        r.result["seconds"] - r.result["download_seconds"] for r in ingests
    ]
    local_seconds = median(local_all)
    summary: dict[str, Any] = {
        "bytes": ingests[0].result["bytes"],
        "runs": len(ingests),
        "seconds": rounded(seconds),
        "baseline_seconds": rounded(baseline_seconds),
        "ratio_vs_duckdb": rounded(seconds / baseline_seconds),
        "seconds_without_download": rounded(local_seconds),
        "ratio_without_download": rounded(local_seconds / baseline_seconds),
        # The pipeline's: with the download and, where measured apart, without it.
        "peak_rss_mb": max(run.result["peak_rss_mb"] for run in [*ingests, *without_download]),
        "baseline_peak_rss_mb": max(run.result["peak_rss_mb"] for run in baselines),
        "polled_peak_rss_mb": max(run.polled_peak_rss_mb for run in [*ingests, *without_download]),
        "baseline_polled_peak_rss_mb": max(run.polled_peak_rss_mb for run in baselines),
        "rss_at_start_mb": ingests[0].result["rss_at_start_mb"],
        "peak_rss_mb_after": ingests[-1].result["peak_rss_mb_after"],
        "duckdb_memory_limit": ingests[0].result["duckdb_memory_limit"],
    }
    if floors:
        # The whole sync over what any loader must pay: fetching the bytes from the same server
        # (a plain streamed GET, same run) plus DuckDB's own read_json of them.
        floor = med(floors, "seconds")
        summary["download_floor_seconds"] = rounded(floor)
        # The floor is the better of a sequential and a parallel plain GET; both for context.
        for mode in ("sequential", "parallel"):
            if all(f"{mode}_seconds" in run.result for run in floors):
                summary[f"download_floor_{mode}_seconds"] = rounded(med(floors, f"{mode}_seconds"))
        summary["ratio_end_to_end"] = rounded(seconds / (floor + baseline_seconds))
    runs = [*ingests, *baselines, *floors]
    if all("cpu_seconds" in run.result for run in runs):
        # The same ratios in CPU seconds of each child (the simulator's, in the parent, apart):
        # blind to what other tenants of a shared machine do, so steadier from run to run.
        cpu = med(ingests, "cpu_seconds")
        baseline_cpu = med(baselines, "cpu_seconds")
        local_cpu = median(
            [r.result["cpu_seconds"] for r in without_download]
            or [r.result["cpu_seconds"] - r.result["download_cpu_seconds"] for r in ingests]
        )
        summary["cpu_seconds"] = rounded(cpu)
        summary["baseline_cpu_seconds"] = rounded(baseline_cpu)
        summary["cpu_ratio_without_download"] = rounded(local_cpu / baseline_cpu)
        if floors:
            floor_cpu = med(floors, "cpu_seconds")
            summary["download_floor_cpu_seconds"] = rounded(floor_cpu)
            summary["cpu_ratio_end_to_end"] = rounded(cpu / (floor_cpu + baseline_cpu))
    for key in phase_keys:
        summary[key] = rounded(med(ingests, key))
    if len(ingests) > 1:
        summary["seconds_all"] = [rounded(run.result["seconds"]) for run in ingests]
        summary["baseline_seconds_all"] = [rounded(run.result["seconds"]) for run in baselines]
        # Each repeat against the baseline run right after it: on a shared machine whose speed
        # drifts, the spread of these says how far apart two figures must be to mean anything.
        pairs = list(zip(ingests, baselines, strict=False))
        summary["ratio_without_download_all"] = [
            rounded(local / b.result["seconds"])
            for local, b in zip(local_all, baselines, strict=False)
        ]
        if len(floors) == len(ingests):
            summary["ratio_end_to_end_all"] = [
                rounded(i.result["seconds"] / (f.result["seconds"] + b.result["seconds"]))
                for (i, b), f in zip(pairs, floors, strict=True)
            ]
    return summary
