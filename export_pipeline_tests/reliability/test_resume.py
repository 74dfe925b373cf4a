"""Resumable work: Range from the bytes on disk when the host honours it, a clean restart when
it does not; the simulator counts every body byte it sends, so bytes sent twice are seen."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route

from export_pipeline.core.errors import LimitExceededError
from export_pipeline.core.model import ExportRequest, RemoteFile
from export_pipeline.core.netpolicy import UrlPolicy
from export_pipeline.core.transfer import DownloadLimits, download_files
from export_pipeline.providers.locations import LOCATIONS
from export_pipeline.sandbox.server import RunningServer
from export_pipeline_tests.providers.locations.conftest import N_LOCATIONS, LocationsSandbox
from export_pipeline_tests.reliability.conftest import MakeRunner, table_rows

JSON = ExportRequest(params={"format": "json"})
LOOPBACK = UrlPolicy.from_setting("loopback")


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


@pytest.fixture
def gzip_host(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    """A file host serving one gzip file with Range support (Starlette's FileResponse)."""
    text = b"".join(b'{"id": %d, "pad": "%s"}\n' % (i, b"x" * 40) for i in range(20000))
    body = gzip.compress(text, compresslevel=1)
    served = tmp_path / "served.jsonl.gz"
    served.write_bytes(body)
    app = Starlette(routes=[Route("/f.jsonl.gz", lambda request: FileResponse(served))])
    with RunningServer(app) as server:
        yield f"{server.base_url}/f.jsonl.gz", body


def _leave_partial(dest: Path, body: bytes, size: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "f.jsonl.gz.part").write_bytes(body[:size])
    (dest / "f.jsonl.gz.part.json").write_text(json.dumps({"accept_ranges": True}))


def test_a_resumed_gzip_file_is_byte_identical(gzip_host: tuple[str, bytes], tmp_path: Path):
    url, body = gzip_host
    _leave_partial(tmp_path / "dl", body, len(body) // 3)
    file = RemoteFile(url=url, name="f.jsonl.gz", size_bytes=len(body))
    [got] = download_files(
        [file], tmp_path / "dl", provider="p", export_id="e", url_policy=LOOPBACK, resume=True
    )
    assert got.path.read_bytes() == body
    assert got.sha256 == hashlib.sha256(body).hexdigest()  # the bytes on disk were hashed too


def test_the_gzip_guard_counts_the_bytes_on_disk_of_a_resumed_file(
    gzip_host: tuple[str, bytes], tmp_path: Path
) -> None:
    url, body = gzip_host
    _leave_partial(tmp_path / "dl", body, len(body) // 2)
    file = RemoteFile(url=url, name="f.jsonl.gz", size_bytes=len(body))
    # The half on disk already inflates past this cap: the resume must not reset the count.
    limits = DownloadLimits(max_decompressed_bytes=len(body), max_expansion_ratio=None)
    with pytest.raises(LimitExceededError, match="gzip"):
        download_files(
            [file],
            tmp_path / "dl",
            provider="p",
            export_id="e",
            url_policy=LOOPBACK,
            resume=True,
            limits=limits,
        )
    assert not list((tmp_path / "dl").iterdir())  # refused: nothing left to resume
