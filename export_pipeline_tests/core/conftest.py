"""Shared fixtures for the core tests: a real file host on loopback (two of them, for redirects).

The file host is a small Starlette app whose routes reproduce what download links do in the wild:
plain files with Range support, 429 with Retry-After, a body cut short mid-stream, a 302 to a
presigned URL on another host, an expired signature. Every request is recorded (path, headers,
time) so the tests can assert what went over the wire, not what our code believes it sent.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import duckdb
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from export_pipeline.sandbox.server import RunningServer

PAYLOAD = bytes((i * 7919 + i // 251) % 256 for i in range(300_000))
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    at: float


@dataclass
class FileHost:
    """Recorder and switches shared between the test thread and the server thread."""

    payload: bytes = PAYLOAD
    seen: list[Seen] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    redirect_target: str = ""  # absolute URL the /redirect route points at
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, path: str, headers: dict[str, str]) -> int:
        """Record one request and return how many times this path was hit (1-based)."""
        with self.lock:
            self.seen.append(Seen(path, headers, time.monotonic()))
            self.counters[path] = self.counters.get(path, 0) + 1
            return self.counters[path]

    def requests_to(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path == path]


def _ranged(host: FileHost, range_header: str | None, *, accept_ranges: bool = True) -> Response:
    data = host.payload
    extra = {"Accept-Ranges": "bytes"} if accept_ranges else {}
    if range_header and accept_ranges:
        start = int(range_header.removeprefix("bytes=").split("-")[0])
        headers = {**extra, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        return Response(data[start:], 206, headers, media_type="application/octet-stream")
    return Response(data, 200, extra, media_type="application/octet-stream")


class Truncating:
    """Raw ASGI: the first answer promises the full Content-Length, sends a third, then dies.

    Starlette's responses cannot lie about their length, so this speaks ASGI directly; raising
    after the body has started makes uvicorn drop the connection, exactly like a proxy timeout.
    Later answers honour Range (when ``accept_ranges``) so a client can resume.
    """

    def __init__(self, host: FileHost, *, accept_ranges: bool) -> None:
        self.host = host
        self.accept_ranges = accept_ranges

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        hit = self.host.record(request.url.path, dict(request.headers))
        if hit > 1:
            response = _ranged(
                self.host, request.headers.get("range"), accept_ranges=self.accept_ranges
            )
            await response(scope, receive, send)
            return
        data = self.host.payload
        headers = [
            (b"content-length", str(len(data)).encode()),
            (b"content-type", b"application/octet-stream"),
        ]
        if self.accept_ranges:
            headers.append((b"accept-ranges", b"bytes"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": data[: len(data) // 3], "more_body": True}
        )
        raise ConnectionAbortedError("simulated connection cut mid-body")


def create_file_app(host: FileHost) -> Starlette:
    async def files(request: Request) -> Response:
        host.record(request.url.path, dict(request.headers))
        return _ranged(host, request.headers.get("range"))

    async def flaky(request: Request) -> Response:
        hit = host.record(request.url.path, dict(request.headers))
        if hit <= 2:
            return Response("slow down", 429, {"Retry-After": "1"})
        return _ranged(host, None)

    async def always_503(request: Request) -> Response:
        host.record(request.url.path, dict(request.headers))
        return Response("unavailable", 503)

    async def redirect(request: Request) -> Response:
        host.record(request.url.path, dict(request.headers))
        return RedirectResponse(host.redirect_target, status_code=302)

    async def expired(request: Request) -> Response:
        host.record(request.url.path, dict(request.headers))
        body = "<Error><Code>AccessDenied</Code><Message>Request has expired</Message>" + "x" * 2000
        return Response(body, 403, media_type="application/xml")

    async def gone(request: Request) -> Response:
        host.record(request.url.path, dict(request.headers))
        return Response('{"code": "EXPORT_EXPIRED"}', 410, media_type="application/json")

    return Starlette(
        routes=[
            Route("/files/{name}", files),
            Route("/flaky/{name}", flaky),
            Route("/unavailable/{name}", always_503),
            Route("/redirect/{name}", redirect),
            Route("/expired/{name}", expired),
            Route("/gone/{name}", gone),
            Route("/truncated/{name}", Truncating(host, accept_ranges=True)),
            Route("/truncated-norange/{name}", Truncating(host, accept_ranges=False)),
        ]
    )


@dataclass
class FileHosts:
    api: FileHost
    api_url: str
    storage: FileHost
    storage_url: str


@pytest.fixture
def file_hosts() -> Iterator[FileHosts]:
    """Two real servers: the "API" on 127.0.0.1, "storage" as localhost on another port."""
    api, storage = FileHost(), FileHost()
    with (
        RunningServer(create_file_app(api)) as api_srv,
        RunningServer(create_file_app(storage)) as st_srv,
    ):
        storage_url = f"http://localhost:{st_srv.port}"
        yield FileHosts(api=api, api_url=api_srv.base_url, storage=storage, storage_url=storage_url)


def duckdb_threads() -> int:
    """DuckDB's threads on this machine: as many parts as normalise converts side by side."""
    with duckdb.connect() as con:
        return int(con.execute("SELECT current_setting('threads')").fetchone()[0])  # type: ignore[index]
