"""What an operator sees in the run's own event log while a sync runs (issue 14)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from export_pipeline_tests.dagster.conftest import DagsterSetup


@pytest.fixture
def simulators() -> tuple[str, ...]:
    return ("locations",)  # the sandbox starts only these


def run_log(setup: DagsterSetup, run_id: str) -> list[str]:
    """The run's log messages as stored in the instance's event log (what the UI shows)."""
    return [
        e.user_message
        for e in setup.instance.all_logs(run_id)
        if e.is_dagster_event is False and e.user_message
    ]


def test_progress_is_in_the_run_log(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    setup.sandbox.locations.rate_limit_next = 1  # one 429 -> a retry with its reason
    result = setup.job("locations_sync").execute_in_process(
        instance=setup.instance, raise_on_error=True
    )
    lines = run_log(setup, result.run_id)
    text = "\n".join(lines)
    export_id = (
        result.asset_materializations_for_node("locations__locations")[0]
        .metadata["export_id"]
        .value
    )
    assert f"requested locations/locations export {export_id}" in text
    assert "window full" in text
    # Each state change while waiting, then the download with bytes and rate.
    assert any(f"export {export_id} is ready" in line for line in lines), text
    assert any("downloaded" in line and "bytes" in line and "MB/s" in line for line in lines)
    assert "parsed 300 rows" in text
    assert "loaded 300 rows into locations.locations" in text
    assert "HTTP 429" in text and "retry 1/" in text


def test_lock_wait_names_the_holder(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    setup.job("locations_sync").execute_in_process(instance=setup.instance)
    # DuckDB locks per process: another process holds the write lock for a moment.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(2)",
            str(setup.warehouse_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        result = setup.job("locations_sync").execute_in_process(instance=setup.instance)
    finally:
        holder.wait(timeout=60)
    assert result.success
    text = "\n".join(run_log(setup, result.run_id))
    assert "waiting for the warehouse write lock" in text, text
    assert f"(PID {holder.pid})" in text, text
