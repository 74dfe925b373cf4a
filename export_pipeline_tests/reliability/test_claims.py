"""One claim per export across runs: a lease in the ledger, waited for, taken over when dead."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from export_pipeline.core.errors import ExportClaimedError
from export_pipeline.core.ingest import IngestResult
from export_pipeline.core.model import ExportRequest
from export_pipeline.providers.locations import LOCATIONS
from export_pipeline_tests.providers.locations.conftest import N_LOCATIONS, LocationsSandbox
from export_pipeline_tests.reliability.conftest import MakeRunner, exports, table_rows

JSON = ExportRequest(params={"format": "json"})


def _ready_export(make_runner: MakeRunner, sandbox: LocationsSandbox) -> str:
    record, _ = make_runner().start(LOCATIONS, JSON)
    sandbox.wait(record.export_id)
    return record.export_id


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_meeting_a_live_claim_stops_naming_the_holder_and_touches_nothing(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner, tmp_path: Path
) -> None:
    export_id = _ready_export(make_runner, locations_sandbox)
    holder = make_runner(owner="run-holder")
    assert holder.ledger.claim("locations", export_id, holder.owner, ttl_seconds=600).granted

    other = make_runner(owner="run-other", claim_wait_seconds=0.2, claim_poll_seconds=0.05)
    with pytest.raises(ExportClaimedError) as info:
        other.ingest(LOCATIONS, export_id)
    message = str(info.value)
    assert "run run-holder" in message and f"pid {holder.owner.rsplit(':', 1)[1]}" in message
    assert "abandon" in message  # says what to do
    record = other.ledger.get("locations", export_id)
    assert record is not None and record.lease_owner == holder.owner
    assert record.attempts == 0 and record.error_code is None  # not a failed attempt
    assert locations_sandbox.state.downloads == 0
    assert not (
        tmp_path / "data" / "work" / "locations" / "locations" / export_id
    ).exists() or not any(
        (tmp_path / "data" / "work" / "locations" / "locations" / export_id).iterdir()
    )


def test_an_expired_claim_is_taken_over(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    export_id = _ready_export(make_runner, locations_sandbox)
    gone = make_runner(owner="run-gone")
    # A holder on another machine whose lease ran out (it stopped renewing it).
    assert gone.ledger.claim("locations", export_id, "run-gone@elsewhere:1", ttl_seconds=0).granted
    result = make_runner(owner="run-next", claim_wait_seconds=0).ingest(LOCATIONS, export_id)
    assert not result.skipped and result.rows == N_LOCATIONS
    record = gone.ledger.get("locations", export_id)
    assert record is not None and record.lease_owner is None  # released after the load


def test_a_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    export_id = _ready_export(make_runner, locations_sandbox)
    runner = make_runner(owner="run-next", claim_wait_seconds=0)
    dead = f"run-killed@{socket.gethostname()}:{_dead_pid()}"
    assert runner.ledger.claim("locations", export_id, dead, ttl_seconds=3600).granted
    result = runner.ingest(LOCATIONS, export_id)
    assert result.rows == N_LOCATIONS and result.waited_for is None


def test_a_second_run_on_the_same_export_waits_and_finds_it_loaded(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    export_id = _ready_export(make_runner, locations_sandbox)
    first = make_runner(owner="run-first")
    assert first.ledger.claim("locations", export_id, first.owner, ttl_seconds=600).granted
    waiting = threading.Event()

    def sleep(seconds: float) -> None:
        waiting.set()
        threading.Event().wait(min(seconds, 0.05))

    second = make_runner(owner="run-second")
    second._sleep = sleep
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(second.ingest, LOCATIONS, export_id)
        assert waiting.wait(30)  # the second run is waiting on the first one's claim
        loaded = first.ingest(LOCATIONS, export_id)
        skipped: IngestResult = later.result(timeout=60)
    assert not loaded.skipped and loaded.rows == N_LOCATIONS
    assert skipped.skipped and skipped.waited_for == first.owner
    assert locations_sandbox.state.downloads == 1
    assert table_rows(first) == (N_LOCATIONS, N_LOCATIONS)


def test_two_runs_at_once_on_one_export_load_it_once_and_never_trample(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    export_id = _ready_export(make_runner, locations_sandbox)
    runners = [make_runner(owner=f"run-{i}") for i in range(2)]
    start = threading.Barrier(2)

    def go(i: int) -> IngestResult:
        start.wait()
        return runners[i].ingest(LOCATIONS, export_id)

    with ThreadPoolExecutor(2) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(go, i) for i in range(2)]]
    assert sorted(r.skipped for r in results) == [False, True]
    assert locations_sandbox.state.downloads == 1
    assert table_rows(runners[0]) == (N_LOCATIONS, N_LOCATIONS)
    assert exports(runners[0]) == [(export_id, "loaded", 0)]
    loaded = next(r for r in results if not r.skipped)
    assert all(Path(p).is_file() for p in loaded.parquet_paths)
