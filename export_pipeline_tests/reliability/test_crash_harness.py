"""The crash harness: SIGKILL a real run process at each step, then a rerun and an incremental
run must leave exactly the provider's rows, no duplicate key, a cursor that never passed the
committed data, and no second export where the first could be adopted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from export_pipeline.core.faults import ENV_VAR, POINTS
from export_pipeline.sandbox.locations import State
from export_pipeline_tests.providers.locations.conftest import LocationsSandbox
from export_pipeline_tests.reliability.crash_run import sync_once

ROOT = Path(__file__).resolve().parents[2]


def _killed_run(sandbox: LocationsSandbox, root: Path, point: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{ENV_VAR: point})
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "export_pipeline_tests.reliability.crash_run",
            sandbox.base_url,
            sandbox.state.token,
            str(root),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _warehouse(root: Path, sql: str) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(root / "warehouse.duckdb"), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(sql).fetchall()


def _assert_matches_provider(state: State, root: Path) -> None:
    want = {
        (doc["id"], doc["last_updated"])
        for doc in (state.location(i) for i in range(state.n_locations))
    }
    got = _warehouse(
        root,
        "SELECT id, replace(strftime(last_updated AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%gZ'), "
        "'.000Z', 'Z') FROM locations.locations",
    )
    assert len(got) == len(set(got)), "duplicate keys"
    assert set(got) == want
    # The cursor never passes what was committed: it is at most the newest loaded export's
    # own timestamp.
    [(cursor, newest)] = _warehouse(
        root,
        "SELECT (SELECT max(cursor_value) FROM pipeline.cursors), "
        "(SELECT max(provider_timestamp) FROM pipeline.exports WHERE state = 'loaded')",
    )
    assert newest is not None and cursor is not None and cursor <= newest


@pytest.mark.parametrize("point", POINTS)
def test_a_run_killed_at_any_step_is_recovered_by_the_next_one(
    locations_sandbox: LocationsSandbox, tmp_path: Path, point: str
) -> None:
    state = locations_sandbox.state
    state.ready_after_seconds = 0.05
    killed = _killed_run(locations_sandbox, tmp_path, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert state.call_counts["request"] == 1
    sent_before = state.bytes_sent

    rerun = sync_once(locations_sandbox.base_url, state.token, tmp_path)
    if point == "commit":
        # The killed run had committed: the rerun finds nothing open and asks for what changed.
        assert state.call_counts["request"] == 2 and not rerun.adopted
    else:
        # The export the killed run requested is adopted, never requested a second time.
        assert state.call_counts["request"] == 1 and rerun.adopted
        assert (
            rerun.export_id
            == _warehouse(tmp_path, "SELECT min(export_id) FROM pipeline.exports")[0][0]
        )
    if point in ("parquet", "merge"):
        # Its verified raw file is re-read, not downloaded again.
        assert rerun.reused_files and state.bytes_sent == sent_before
    if point == "download":
        # The partial file is resumed with Range: less than the whole file is sent again.
        assert 0 <= state.bytes_sent - sent_before < rerun.bytes_downloaded
    _assert_matches_provider(state, tmp_path)

    state.mutate(updated=5, added=3)
    incremental = sync_once(locations_sandbox.base_url, state.token, tmp_path)
    assert not incremental.adopted and incremental.rows >= 8
    _assert_matches_provider(state, tmp_path)
    [(leases,)] = _warehouse(tmp_path, "SELECT count(lease_owner) FROM pipeline.exports")
    assert leases == 0  # every claim was released or taken over
