"""Resumable work: Range from the bytes on disk when the host honours it, a clean restart when
it does not; the simulator counts every body byte it sends, so bytes sent twice are seen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from export_pipeline.core.model import ExportRequest
from export_pipeline.providers.locations import LOCATIONS
from export_pipeline_tests.locations.conftest import N_LOCATIONS, LocationsSandbox
from export_pipeline_tests.reliability.conftest import MakeRunner, table_rows

JSON = ExportRequest(params={"format": "json"})


def _served_file(sandbox: LocationsSandbox, export_id: str) -> bytes:
    export = sandbox.state.get_export(export_id)
    assert export is not None and export.path is not None
    return export.path.read_bytes()


def test_a_cut_body_resumes_with_range_and_no_byte_is_sent_twice(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    state = locations_sandbox.state
    state.truncate_next_download = True
    result = make_runner().sync(LOCATIONS, JSON)
    served = _served_file(locations_sandbox, result.export_id)
    assert state.downloads == 2  # the cut answer, then the rest
    assert state.bytes_sent == len(served)  # nothing sent twice
    assert result.bytes_downloaded == len(served)
    assert (Path(result.raw_uri or "") / result.files[0]).read_bytes() == served
    assert table_rows(make_runner()) == (N_LOCATIONS, N_LOCATIONS)


def test_a_host_that_ignores_range_gets_a_clean_restart(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    state = locations_sandbox.state
    state.truncate_next_download = True
    state.ignore_range = True
    result = make_runner().sync(LOCATIONS, JSON)
    served = _served_file(locations_sandbox, result.export_id)
    assert state.bytes_sent == len(served) // 2 + len(served)  # half, then all of it again
    assert (Path(result.raw_uri or "") / result.files[0]).read_bytes() == served
    assert table_rows(make_runner()) == (N_LOCATIONS, N_LOCATIONS)


def test_the_partial_file_of_a_dead_attempt_is_resumed_not_downloaded_again(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    runner = make_runner()
    record, _ = runner.start(LOCATIONS, JSON)
    status, _ = locations_sandbox.wait(record.export_id)
    served = _served_file(locations_sandbox, record.export_id)
    name = status.files[0].name
    # What a run killed mid-download leaves: its attempt dir (named after its pid) with the
    # bytes it had and the note that the host resumes.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = runner.storage.work_dir(LOCATIONS, record.export_id, f"20260101T000000-{dead.pid}-abc")
    (work / "raw").mkdir()
    half = len(served) // 2
    (work / "raw" / f"{name}.part").write_bytes(served[:half])
    (work / "raw" / f"{name}.part.json").write_text(
        json.dumps({"accept_ranges": True, "validator": None})
    )
    sent_before = locations_sandbox.state.bytes_sent

    result = make_runner().ingest(LOCATIONS, record.export_id)
    assert locations_sandbox.state.bytes_sent - sent_before == len(served) - half
    assert (Path(result.raw_uri or "") / name).read_bytes() == served
    assert not work.exists()  # the dead attempt's leftovers were taken over, then cleared
    assert table_rows(runner) == (N_LOCATIONS, N_LOCATIONS)


def test_a_live_runs_partial_file_is_left_alone(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    runner = make_runner()
    record, _ = runner.start(LOCATIONS, JSON)
    locations_sandbox.wait(record.export_id)
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=-1)
    try:
        work = runner.storage.work_dir(LOCATIONS, record.export_id, f"20260101T0-{live.pid}-x")
        (work / "raw").mkdir()
        part = work / "raw" / "some.json.part"
        part.write_bytes(b"[{")
        result = make_runner().ingest(LOCATIONS, record.export_id)
        assert result.rows == N_LOCATIONS
        assert part.read_bytes() == b"[{"  # another live process's file: untouched
    finally:
        live.kill()
        live.wait()
