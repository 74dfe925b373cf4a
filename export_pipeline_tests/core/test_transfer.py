"""Downloads against real HTTP servers on loopback: retries, resume, redirects, typed failures."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from export_pipeline.core.errors import (
    ExportExpiredError,
    ExportPipelineError,
    IntegrityError,
    LinkExpiredError,
    TransientProviderError,
)
from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.model import RemoteFile
from export_pipeline.core.netpolicy import UrlPolicy
from export_pipeline.core.transfer import BackgroundDigests
from export_pipeline.core.transfer import download_file as _download_file
from export_pipeline.core.transfer import download_files as _download_files
from export_pipeline.sandbox.server import RunningServer
from export_pipeline_tests.core.conftest import PAYLOAD, PAYLOAD_SHA256, FileHosts

# The file hosts are on loopback, which the download policy refuses unless allowed.
LOOPBACK = UrlPolicy.from_setting("loopback")
download_file = functools.partial(_download_file, url_policy=LOOPBACK)
download_files = functools.partial(_download_files, url_policy=LOOPBACK)

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, jitter=0.0)
AUTH = {"Authorization": "Bearer secret-token"}


def _files_left(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_streams_file_to_disk_with_hash_and_size(file_hosts: FileHosts, tmp_path: Path) -> None:
    file = RemoteFile(
        url=f"{file_hosts.api_url}/files/a.bin", name="a.bin", size_bytes=len(PAYLOAD)
    )
    got = download_file(file, tmp_path, provider="p", export_id="e1", chunk_size=4096)
    assert got.path == tmp_path / "a.bin"
    assert got.path.read_bytes() == PAYLOAD
    assert got.size_bytes == len(PAYLOAD)
    assert got.sha256 == PAYLOAD_SHA256
    assert got.content_type == "application/octet-stream"
    assert _files_left(tmp_path) == ["a.bin"]  # no .part left behind


def test_files_downloaded_without_a_digest_are_hashed_beside_at_the_lowest_priority(
    file_hosts: FileHosts, tmp_path: Path
) -> None:
    """``digest=False`` keeps the hash off the download's threads; BackgroundDigests hashes the
    files on a thread of its own, at nice 19 where threads have their own priority (Linux)."""
    files = [
        RemoteFile(url=f"{file_hosts.api_url}/files/{n}", name=n, size_bytes=len(PAYLOAD))
        for n in ("a.bin", "b.bin")
    ]
    got = download_files(files, tmp_path, provider="p", export_id="e1", digest=False)
    assert [d.sha256 for d in got] == [None, None]
    with BackgroundDigests() as digests:
        digests.add(got[0].path)
        sums = digests.result([d.path for d in got])  # b.bin is added by result()
        (thread,) = [t for t in threading.enumerate() if t.name.startswith("digest")]
        priority = os.getpriority(os.PRIO_PROCESS, thread.native_id or 0)
    assert sums == {d.path: PAYLOAD_SHA256 for d in got}
    if sys.platform == "linux":
        assert priority == 19


def test_429_retry_after_is_honoured(file_hosts: FileHosts, tmp_path: Path) -> None:
    file = RemoteFile(url=f"{file_hosts.api_url}/flaky/b.bin", name="b.bin")
    started = time.monotonic()
    got = download_file(file, tmp_path, provider="p", export_id="e1", policy=FAST)
    assert got.sha256 == PAYLOAD_SHA256
    seen = file_hosts.api.requests_to("/flaky/b.bin")
    assert len(seen) == 3
    # Retry-After: 1 overrides FAST's 10 ms backoff: the server saw the gaps.
    assert seen[1].at - seen[0].at >= 0.95
    assert seen[2].at - seen[1].at >= 0.95
    assert time.monotonic() - started >= 1.9


def test_truncated_body_resumes_with_range(file_hosts: FileHosts, tmp_path: Path) -> None:
    file = RemoteFile(
        url=f"{file_hosts.api_url}/truncated/c.bin", name="c.bin", size_bytes=len(PAYLOAD)
    )
    got = download_file(file, tmp_path, provider="p", export_id="e1", policy=FAST, chunk_size=8192)
    assert got.path.read_bytes() == PAYLOAD
    assert got.sha256 == PAYLOAD_SHA256
    seen = file_hosts.api.requests_to("/truncated/c.bin")
    assert len(seen) == 2
    assert "range" not in seen[0].headers
    # Resumed where the cut happened, not from zero.
    resumed_at = int(seen[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < len(PAYLOAD)


def test_truncated_body_without_range_support_restarts(
    file_hosts: FileHosts, tmp_path: Path
) -> None:
    file = RemoteFile(url=f"{file_hosts.api_url}/truncated-norange/d.bin", name="d.bin")
    got = download_file(file, tmp_path, provider="p", export_id="e1", policy=FAST)
    assert got.path.read_bytes() == PAYLOAD
    assert got.sha256 == PAYLOAD_SHA256
    seen = file_hosts.api.requests_to("/truncated-norange/d.bin")
    assert len(seen) == 2
    assert "range" not in seen[1].headers


def test_credentials_never_follow_a_redirect_to_another_host(
    file_hosts: FileHosts, tmp_path: Path
) -> None:
    file_hosts.api.redirect_target = f"{file_hosts.storage_url}/files/e.bin?X-Amz-Signature=abc"
    file = RemoteFile(url=f"{file_hosts.api_url}/redirect/e.bin", name="e.bin", authenticated=True)
    api_host = httpx.URL(file_hosts.api_url).netloc.decode()
    got = download_file(
        file, tmp_path, provider="p", export_id="e1", headers=AUTH, api_host=api_host
    )
    assert got.sha256 == PAYLOAD_SHA256
    (at_api,) = file_hosts.api.requests_to("/redirect/e.bin")
    (at_storage,) = file_hosts.storage.requests_to("/files/e.bin")
    assert at_api.headers["authorization"] == "Bearer secret-token"
    assert "authorization" not in at_storage.headers


def test_credentials_not_sent_to_same_host_on_another_port(
    file_hosts: FileHosts, tmp_path: Path
) -> None:
    storage_port = httpx.URL(file_hosts.storage_url).port
    file_hosts.api.redirect_target = f"http://127.0.0.1:{storage_port}/files/f.bin"
    file = RemoteFile(url=f"{file_hosts.api_url}/redirect/f.bin", name="f.bin", authenticated=True)
    download_file(file, tmp_path, provider="p", export_id="e1", headers=AUTH)  # api_host defaulted
    assert file_hosts.api.requests_to("/redirect/f.bin")[0].headers["authorization"]
    assert "authorization" not in file_hosts.storage.requests_to("/files/f.bin")[0].headers


def test_presigned_link_gets_no_credentials_even_on_api_host(
    file_hosts: FileHosts, tmp_path: Path
) -> None:
    file = RemoteFile(url=f"{file_hosts.api_url}/files/g.bin", name="g.bin", authenticated=False)
    download_file(file, tmp_path, provider="p", export_id="e1", headers=AUTH)
    assert "authorization" not in file_hosts.api.requests_to("/files/g.bin")[0].headers


def test_expired_presigned_link_raises_link_expired(file_hosts: FileHosts, tmp_path: Path) -> None:
    file = RemoteFile(url=f"{file_hosts.api_url}/expired/h.bin", name="h.bin")
    with pytest.raises(LinkExpiredError) as info:
        download_file(file, tmp_path, provider="p", export_id="e1", headers=AUTH, policy=FAST)
    err = info.value
    assert (err.provider, err.export_id, err.file) == ("p", "e1", "h.bin")
    assert "403" in err.message and "Request has expired" in err.message
    assert len(err.message) < 400  # excerpt capped at 300 chars
    assert "secret-token" not in str(err)
    assert len(file_hosts.api.requests_to("/expired/h.bin")) == 1  # not retried
    assert _files_left(tmp_path) == []


def test_classifier_goes_first(file_hosts: FileHosts, tmp_path: Path) -> None:
    def classify(response: httpx.Response) -> ExportPipelineError | None:
        if response.status_code == 410 and response.json().get("code") == "EXPORT_EXPIRED":
            return ExportExpiredError("provider says the export expired", code="EXPORT_EXPIRED")
        return None

    file = RemoteFile(url=f"{file_hosts.api_url}/gone/i.bin", name="i.bin")
    with pytest.raises(ExportExpiredError) as info:
        download_file(file, tmp_path, provider="p", export_id="e1", classify=classify)
    assert info.value.code == "EXPORT_EXPIRED"
    assert (info.value.provider, info.value.export_id, info.value.file) == ("p", "e1", "i.bin")
    # Without the classifier a presigned 410 is an expired link.
    with pytest.raises(LinkExpiredError):
        download_file(file, tmp_path, provider="p", export_id="e1")


def test_size_mismatch_raises_integrity_error_and_leaves_nothing(
    file_hosts: FileHosts, tmp_path: Path
) -> None:
    announced = len(PAYLOAD) + 10
    file = RemoteFile(url=f"{file_hosts.api_url}/files/j.bin", name="j.bin", size_bytes=announced)
    with pytest.raises(IntegrityError) as info:
        download_file(file, tmp_path, provider="p", export_id="e1")
    err = info.value
    assert (err.provider, err.export_id, err.file) == ("p", "e1", "j.bin")
    assert str(announced) in err.message and str(len(PAYLOAD)) in err.message
    assert _files_left(tmp_path) == []


def test_persistent_503_gives_transient_error(file_hosts: FileHosts, tmp_path: Path) -> None:
    file = RemoteFile(url=f"{file_hosts.api_url}/unavailable/k.bin", name="k.bin")
    with pytest.raises(TransientProviderError) as info:
        download_file(file, tmp_path, provider="p", export_id="e1", policy=FAST)
    assert info.value.retryable and info.value.file == "k.bin"
    assert len(file_hosts.api.requests_to("/unavailable/k.bin")) == FAST.max_attempts
    assert _files_left(tmp_path) == []


def test_download_files_keeps_order(file_hosts: FileHosts, tmp_path: Path) -> None:
    names = [f"part-{i:04d}.bin" for i in range(6)]
    files = [RemoteFile(url=f"{file_hosts.api_url}/files/{n}", name=n) for n in names]
    got = download_files(files, tmp_path, max_concurrency=3, provider="p", export_id="e1")
    assert [d.name for d in got] == names
    assert all(d.sha256 == hashlib.sha256(d.path.read_bytes()).hexdigest() for d in got)
    assert _files_left(tmp_path) == names


def test_download_files_raises_first_error(file_hosts: FileHosts, tmp_path: Path) -> None:
    files = [
        RemoteFile(url=f"{file_hosts.api_url}/files/ok.bin", name="ok.bin"),
        RemoteFile(url=f"{file_hosts.api_url}/expired/bad.bin", name="bad.bin"),
    ]
    with pytest.raises(LinkExpiredError) as info:
        download_files(files, tmp_path, max_concurrency=2, provider="p", export_id="e1")
    assert info.value.file == "bad.bin"
    assert not any(name.endswith(".part") for name in _files_left(tmp_path))


def test_unsafe_file_name_is_refused(file_hosts: FileHosts, tmp_path: Path) -> None:
    file = RemoteFile(url=f"{file_hosts.api_url}/files/x.bin", name="../x.bin")
    with pytest.raises(ExportPipelineError):
        download_file(file, tmp_path / "d", provider="p", export_id="e1")
    assert not (tmp_path / "x.bin").exists()


def test_a_download_stopped_by_a_failing_sibling_keeps_its_bytes_to_resume(
    tmp_path: Path,
) -> None:
    """With ``resume``, a part stopped because another part's link died keeps its ``.part``
    (and the note that the host resumes), so the retry with a fresh link continues it."""
    body = bytes(range(256)) * 4096  # 1 MiB
    cut = asyncio.Event()
    ranges: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/dead.bin":  # refused once the other part was cut
            await cut.wait()
            # ... and once its half is on disk with its note: a refusal that races the cut
            # part's reading would stop it before it kept anything (nothing left to resume).
            part = tmp_path / "slow.bin.part"
            for _ in range(3000):
                if part.with_name(part.name + ".json").exists() and (
                    part.exists() and part.stat().st_size == len(body) // 2
                ):
                    break
                await asyncio.sleep(0.01)
            await Response("link expired", status_code=403)(scope, receive, send)
            return
        # /slow.bin: the first answer stops halfway (connection dropped); a Range gets the rest.
        headers = dict(scope["headers"])
        ranges.append(headers[b"range"].decode() if b"range" in headers else None)
        start = int(ranges[-1].split("=")[1].rstrip("-")) if ranges[-1] else 0
        rest = body[start:]
        head = [(b"content-length", str(len(rest)).encode()), (b"accept-ranges", b"bytes")]
        if start:
            head.append((b"content-range", f"bytes {start}-{len(body) - 1}/{len(body)}".encode()))
        await send(
            {"type": "http.response.start", "status": 206 if start else 200, "headers": head}
        )
        end = len(rest) if start else len(rest) // 2
        await send({"type": "http.response.body", "body": rest[:end], "more_body": not start})
        if not start:
            cut.set()  # returning without the last body message drops the connection

    # The cut part waits out a long backoff before its retry: the sibling's failure ends it.
    patient = RetryPolicy(max_attempts=3, base_delay=600, max_delay=600, jitter=0.0)
    with RunningServer(app) as server:
        slow_file = RemoteFile(url=f"{server.base_url}/slow.bin", name="slow.bin")
        dead_file = RemoteFile(url=f"{server.base_url}/dead.bin", name="dead.bin")
        kwargs = {"provider": "p", "export_id": "e1", "resume": True, "policy": patient}
        with pytest.raises(LinkExpiredError):
            download_files([slow_file, dead_file], tmp_path, **kwargs)
        kept = (tmp_path / "slow.bin.part").read_bytes()
        assert body.startswith(kept) and len(kept) == len(body) // 2
        assert (tmp_path / "slow.bin.part.json").exists()
        [got] = download_files([slow_file], tmp_path, **kwargs)
    assert got.path.read_bytes() == body
    assert got.sha256 == hashlib.sha256(body).hexdigest()
    assert ranges == [None, f"bytes={len(kept)}-"]


async def _hold(released: list[bool]) -> None:
    """Keep the connection open and silent until the test is over (at most 120 s)."""
    for _ in range(12000):
        if released:
            return
        await asyncio.sleep(0.01)


def _fails_while_stalled(app: Any, tmp_path: Path, released: list[bool], **kwargs: Any) -> None:
    """Download ``/stall.bin`` and ``/dead.bin`` with a 120 s read timeout: the dead link's
    error must come while the stalled host still holds its connection."""
    with RunningServer(app) as server:
        stalled = RemoteFile(url=f"{server.base_url}/stall.bin", name="stall.bin")
        dead = RemoteFile(url=f"{server.base_url}/dead.bin", name="dead.bin")
        try:
            with pytest.raises(LinkExpiredError):
                download_files(
                    [stalled, dead],
                    tmp_path,
                    provider="p",
                    export_id="e1",
                    timeout=120.0,
                    **kwargs,
                )
            assert not released  # the stalled host was still holding its bytes back
        finally:
            released.append(True)


@pytest.mark.timeout(60)  # the download's read timeout is 120 s: without abort() this hangs
def test_a_sibling_stalled_before_its_answer_is_cut_when_another_part_fails(
    tmp_path: Path,
) -> None:
    """One part's host takes the request and never answers; another part's link is dead. The
    export's error comes at once, not after the read timeout: the socket the stalled request
    connected with is shut down (known from the connect on, before any answer)."""
    asked = asyncio.Event()
    released: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/dead.bin":
            await asyncio.wait_for(asked.wait(), 30)  # refused once the other part is waiting
            await Response("link expired", status_code=403)(scope, receive, send)
            return
        asked.set()
        await _hold(released)  # no answer at all

    _fails_while_stalled(app, tmp_path, released)


def test_an_interrupted_download_stops_every_part_at_once(tmp_path: Path) -> None:
    """The run is terminated (here: a signal raising in the waiting thread, as Dagster's
    termination and Ctrl-C do) while one host never answers and another sends slowly: the
    interruption comes through at once, not when the parts end or time out."""
    import signal

    released: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow.bin":
            head = [(b"content-length", str(1 << 30).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": head})
        for _ in range(12000):  # a trickle, or no answer at all (at most 120 s)
            if released:
                return
            if scope["path"] == "/slow.bin":
                await send({"type": "http.response.body", "body": b"x" * 64, "more_body": True})
            await asyncio.sleep(0.01)

    class Terminated(Exception):
        pass

    def terminate(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGALRM, terminate)
    with RunningServer(app) as server:
        files = [
            RemoteFile(url=f"{server.base_url}/silent.bin", name="silent.bin"),
            RemoteFile(url=f"{server.base_url}/slow.bin", name="slow.bin"),
        ]
        start = time.monotonic()
        try:
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            with pytest.raises(Terminated):
                download_files(files, tmp_path, provider="p", export_id="e1", timeout=120.0)
            # Without stopping them the parts would hold the interruption for 120 s.
            assert time.monotonic() - start < 30
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            released.append(True)
    assert not (tmp_path / "slow.bin").exists()


@pytest.mark.timeout(60)  # the download's read timeout is 120 s: without abort() this hangs
def test_a_sibling_stalled_mid_body_is_cut_when_another_part_fails(tmp_path: Path) -> None:
    """One part's host stops sending halfway and holds the connection open; another part's
    link is dead. The export's error comes at once, not after the stalled read's timeout: the
    stalled body is cut (its socket shut down) and its bytes kept for the resume."""
    body = bytes(range(256)) * 4096  # 1 MiB
    released: list[bool] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/dead.bin":
            part = tmp_path / "stall.bin.part"
            for _ in range(3000):  # refused once the stalled part's half is on disk
                if part.exists() and part.stat().st_size == len(body) // 2:
                    break
                await asyncio.sleep(0.01)
            await Response("link expired", status_code=403)(scope, receive, send)
            return
        head = [(b"content-length", str(len(body)).encode()), (b"accept-ranges", b"bytes")]
        await send({"type": "http.response.start", "status": 200, "headers": head})
        await send(
            {"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True}
        )
        await _hold(released)  # then nothing

    _fails_while_stalled(app, tmp_path, released, resume=True)
    kept = (tmp_path / "stall.bin.part").read_bytes()
    assert kept == body[: len(body) // 2]
