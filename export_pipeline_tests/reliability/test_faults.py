"""Faults of the fault matrix (docs/reliability.md) that had no test elsewhere: Retry-After as
an HTTP date, a burst of 5xx, a connection reset before the answer, a provider that never
finishes, a byte-order mark."""

from __future__ import annotations

import functools
import gzip
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import duckdb
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from export_pipeline.core.errors import ExportTimeoutError
from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.model import ExportKind, ExportRequest, RemoteFile
from export_pipeline.core.netpolicy import UrlPolicy
from export_pipeline.core.normalise import to_parquet
from export_pipeline.core.transfer import download_file as _download_file
from export_pipeline.providers.locations import LOCATIONS
from export_pipeline.sandbox.server import RunningServer
from export_pipeline_tests.providers.locations.conftest import LocationsSandbox
from export_pipeline_tests.reliability.conftest import MakeRunner, exports

BODY = b'{"id": 1}\n{"id": 2}\n'
FAST = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, jitter=0.0)
# These file hosts are on loopback, which the download URL policy refuses unless allowed.
download_file = functools.partial(_download_file, url_policy=UrlPolicy.from_setting("loopback"))


class Host:
    """A file host that answers each path with a scripted list of faults, then the body."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}
        self.script: dict[str, list[Response]] = {}

    def app(self) -> Starlette:
        async def serve(request: Request) -> Response:
            path = request.url.path
            self.seen.setdefault(path, []).append(time.monotonic())
            queue = self.script.get(path, [])
            return queue.pop(0) if queue else Response(BODY, media_type="application/x-ndjson")

        return Starlette(routes=[Route("/{name}", serve)])


@pytest.fixture
def host() -> Iterator[tuple[Host, str]]:
    h = Host()
    with RunningServer(h.app()) as server:
        yield h, server.base_url


def test_retry_after_as_an_http_date_is_honoured(host: tuple[Host, str], tmp_path: Path) -> None:
    h, url = host
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    h.script["/a.jsonl"] = [
        Response("slow down", 429, {"Retry-After": format_datetime(when, True)})
    ]
    file = RemoteFile(url=f"{url}/a.jsonl", name="a.jsonl", size_bytes=len(BODY))
    got = download_file(file, tmp_path, provider="p", export_id="e", policy=FAST)
    assert got.path.read_bytes() == BODY
    first, second = h.seen["/a.jsonl"]
    # The date lies 1-2 s ahead (whole seconds); FAST alone would retry after 10 ms.
    assert second - first >= 0.9


def test_a_burst_of_5xx_is_ridden_out(host: tuple[Host, str], tmp_path: Path) -> None:
    h, url = host
    h.script["/b.jsonl"] = [Response("busy", s) for s in (502, 503, 500, 504)]
    file = RemoteFile(url=f"{url}/b.jsonl", name="b.jsonl", size_bytes=len(BODY))
    got = download_file(file, tmp_path, provider="p", export_id="e", policy=FAST)
    assert got.path.read_bytes() == BODY and len(h.seen["/b.jsonl"]) == 5


def test_a_connection_reset_before_the_answer_is_retried(tmp_path: Path) -> None:
    """A real TCP reset (RST, SO_LINGER 0) on the first connection, a good answer on the next."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    connections = []

    def serve() -> None:
        for n in range(2):
            conn, _ = listener.accept()
            connections.append(n)
            conn.recv(65536)
            if n == 0:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                continue
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\nConnection: close\r\n\r\n"
            conn.sendall(head.encode() + BODY)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        file = RemoteFile(url=f"http://127.0.0.1:{port}/c.jsonl", name="c.jsonl")
        got = download_file(file, tmp_path, provider="p", export_id="e", policy=FAST)
    finally:
        thread.join(10)
        listener.close()
    assert got.path.read_bytes() == BODY and connections == [0, 1]


def test_a_provider_that_never_finishes_times_out_and_the_export_stays_adoptable(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    state = locations_sandbox.state
    state.ready_after_seconds = 3600
    request = ExportRequest(params={"format": "json"})
    with pytest.raises(ExportTimeoutError, match="after waiting") as info:
        make_runner().sync(LOCATIONS, request, timeout=0.3)
    assert "sensor ingests it once it is ready" in str(info.value)
    [(export_id, status, _)] = exports(make_runner())
    assert status in ("pending", "processing")
    with pytest.raises(ExportTimeoutError):
        make_runner().sync(LOCATIONS, request, timeout=0.1)
    assert state.call_counts["request"] == 1  # adopted, not asked again
    assert exports(make_runner())[0][0] == export_id


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("bom.csv", "id,name\r\nL1,Köln\r\nL2,Liège\r\n"),
        ("bom.jsonl", '{"id": "L1", "name": "Köln"}\n{"id": "L2", "name": "Liège"}\n'),
        ("bom.jsonl.gz", '{"id": "L1", "name": "Köln"}\n{"id": "L2", "name": "Liège"}\n'),
        ("bom.json", '[{"id": "L1", "name": "Köln"}, {"id": "L2", "name": "Liège"}]'),
    ],
)
def test_a_byte_order_mark_is_not_part_of_the_first_column(
    tmp_path: Path, name: str, text: str
) -> None:
    source = tmp_path / name
    content = b"\xef\xbb\xbf" + text.encode()
    source.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    kind = ExportKind(provider="locations", name="locations", primary_key=("id",))
    result = to_parquet(
        [source], tmp_path / "out", kind=kind, export_id="X", loaded_at=datetime.now(UTC)
    )
    assert result.rows == 2
    with duckdb.connect() as con:
        rows = con.execute(
            "SELECT id, name FROM read_parquet(?) ORDER BY id", [str(result.parquet_paths[0])]
        ).fetchall()
    assert rows == [("L1", "Köln"), ("L2", "Liège")]
