"""The parts of a multi-part export download at the same time, over real loopback HTTP (the Mews
simulator), and a fault in one part (a cut body, a killed run's partial files) resumes that part
only, with Range, while the others arrive whole.

Overlap is observed on the server side, never on a clock: a gate in front of the simulator
counts the part downloads in flight and holds every body until all parts are being asked for
at once. A client that fetched one part after another would never get there; the gate then
lets it through after a deadline, and the test fails on the count it saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.ingest import ExportRunner, IngestSettings
from export_pipeline.core.ledger import Ledger, Warehouse
from export_pipeline.core.model import ExportRequest
from export_pipeline.core.storage import LocalStorage
from export_pipeline.providers.mews import MewsProvider
from export_pipeline.sandbox.mews import State, create_app
from export_pipeline.sandbox.server import RunningServer

PARTS = 4
ROWS = 600
RETRY = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, jitter=0.0)
RESERVATION = next(k for k in MewsProvider.kinds if k.params["entity_type"] == "Reservation")
# A sequential client is let through after this long, so a regression fails instead of hanging.
GATE_DEADLINE_SECONDS = 20.0


class _Cut(Exception):
    """Raised into the file response to stop it halfway (the connection is then dropped)."""


@dataclass
class PartGate:
    """ASGI wrapper over the simulator's file host (``/files/...``).

    Records every part request (path, Range header, body bytes sent), the most part downloads
    in flight at once, and holds each body until ``want`` downloads are in flight. ``cut`` names
    parts (by number) whose first answer stops after half the body: a connection cut mid-file.
    ``revoke`` names parts whose first request is answered, once every other part was sent
    whole, as if the host had stopped honouring its signed link meanwhile (a rotated signing
    key): the gate spoils the signature and the simulator gives its own 403, which Mews
    clients answer by polling for fresh links.
    """

    app: ASGIApp
    want: int
    cut: set[int] = field(default_factory=set)
    revoke: set[int] = field(default_factory=set)
    completed: int = 0  # part bodies sent whole
    in_flight: int = 0
    max_in_flight: int = 0
    requests: list[tuple[int, str | None]] = field(default_factory=list)
    sent: dict[int, int] = field(default_factory=dict)
    _all_in: asyncio.Event | None = None
    _deadline: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/files/"):
            await self.app(scope, receive, send)
            return
        part = int(path.rsplit("/", 1)[1].split(".")[0])
        headers = dict(scope["headers"])
        range_ = headers.get(b"range")
        self.requests.append((part, range_.decode() if range_ else None))
        loop = asyncio.get_running_loop()
        if self._all_in is None:
            self._all_in = asyncio.Event()
            self._deadline = loop.time() + GATE_DEADLINE_SECONDS
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        finished = False

        def done() -> None:
            nonlocal finished
            if not finished:
                finished = True
                self.in_flight -= 1

        if self.in_flight >= self.want:
            self._all_in.set()
        try:
            assert self._deadline is not None
            # Several requests at once, or the deadline: a sequential client gets through late.
            # Each waiter expires on its own; the test then fails on max_in_flight.
            remaining = max(0.0, self._deadline - loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_in.wait(), remaining)
            cut = part in self.cut
            self.cut.discard(part)
            if part in self.revoke:
                self.revoke.discard(part)
                while self.completed < self.want - 1 and loop.time() < self._deadline:
                    await asyncio.sleep(0.01)
                query = parse_qs(scope["query_string"].decode())
                query["signature"] = ["0" * 64]
                scope = dict(scope, query_string=urlencode(query, doseq=True).encode())
            await self._serve(part, scope, receive, send, cut=cut, done=done)
        finally:
            done()

    async def _serve(
        self, part: int, scope: Scope, receive: Receive, send: Send, *, cut: bool, done: Any
    ) -> None:
        announced: int | None = None
        ok = False

        async def counting(message: dict[str, Any]) -> None:
            nonlocal announced, ok
            if message["type"] == "http.response.body" and not message.get("more_body"):
                # Out of flight *before* the last bytes leave: the client cannot have asked
                # for its next part yet, so one-after-another never counts as two at once.
                done()
                self.completed += ok
            if message["type"] == "http.response.start":
                length = dict(message.get("headers", [])).get(b"content-length")
                announced = int(length) if length else None
                ok = message["status"] < 300
            elif message["type"] == "http.response.body" and ok:
                body = message.get("body", b"")
                if cut and announced and self.sent.get(part, 0) + len(body) > announced // 2:
                    body = body[: announced // 2 - self.sent.get(part, 0)]
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    self.sent[part] = self.sent.get(part, 0) + len(body)
                    raise _Cut()
                self.sent[part] = self.sent.get(part, 0) + len(body)
            await send(message)

        try:
            await self.app(scope, receive, counting)
        except _Cut:
            # Returning without the final body message makes uvicorn drop the connection.
            return


@dataclass
class MultipartSandbox:
    state: State
    gate: PartGate
    base_url: str
    root: Path

    def runner(self) -> ExportRunner:
        return mews_runner(
            self.state,
            self.base_url,
            self.root,
            IngestSettings(poll_initial_seconds=0.02, retry=RETRY, download_concurrency=PARTS),
        )

    def served(self, export_id: str) -> list[bytes]:
        export = self.state._exports[export_id]
        return [path.read_bytes() for path, _ in export.parts]


def mews_state(data_dir: Path, rows: int) -> State:
    """A Mews simulator whose reservation exports come in PARTS parts, ready at once."""
    return State(
        counts={"Reservation": rows},
        parts=PARTS,
        data_dir=data_dir,
        pending_seconds=0.0,
        processing_seconds=0.0,
    )


def mews_runner(state: State, base_url: str, root: Path, settings: IngestSettings) -> ExportRunner:
    """A runner against the simulator, its warehouse and storage under ``root``."""
    provider = MewsProvider.from_settings(
        base_url=base_url,
        body_credentials={"ClientToken": state.client_token, "AccessToken": state.access_token},
        retry=RETRY,
    )
    return ExportRunner(
        provider,
        Ledger(Warehouse(root / "w.duckdb")),
        LocalStorage(root / "data"),
        settings,
    )


@pytest.fixture
def multipart(tmp_path: Path) -> Iterator[MultipartSandbox]:
    state = mews_state(tmp_path / "mews", ROWS)
    gate = PartGate(create_app(state), want=PARTS)
    with RunningServer(gate) as server:
        yield MultipartSandbox(state, gate, server.base_url, tmp_path)
    state.close()


def _check_loaded(sandbox: MultipartSandbox, runner: ExportRunner, result: Any) -> None:
    served = sandbox.served(result.export_id)
    raw = Path(result.raw_uri)
    assert [(raw / name).read_bytes() for name in result.files] == served
    with runner.ledger.warehouse.connect(read_only=True) as con:
        rows = con.execute("SELECT count(*), count(DISTINCT Id) FROM mews.reservation").fetchone()
        hashes = con.execute(
            "SELECT sha256 FROM pipeline.export_files WHERE export_id = ? ORDER BY name",
            [result.export_id],
        ).fetchall()
    assert rows == (ROWS, ROWS)
    by_name = dict(zip(result.files, served, strict=True))
    assert sorted(h for (h,) in hashes) == sorted(
        hashlib.sha256(body).hexdigest() for body in by_name.values()
    )


def test_parts_download_at_once_and_a_cut_part_resumes_alone(
    multipart: MultipartSandbox, caplog: pytest.LogCaptureFixture
) -> None:
    multipart.gate.cut = {2}
    runner = multipart.runner()
    with caplog.at_level(logging.INFO):
        result = runner.sync(RESERVATION, ExportRequest())
    runner.provider.close()
    gate = multipart.gate
    assert gate.max_in_flight == PARTS  # every part was being served at the same time
    served = multipart.served(result.export_id)
    half = len(served[2]) // 2
    # Part 2 was cut at half and resumed from there; the others came whole, each once.
    assert sorted(gate.requests, key=lambda r: (r[0], r[1] or "")) == [
        (0, None),
        (1, None),
        (2, None),
        (2, f"bytes={half}-"),
        (3, None),
    ]
    assert gate.sent == {i: len(body) for i, body in enumerate(served)}  # nothing sent twice
    _check_loaded(multipart, runner, result)
    # The run log reports each part finished with its full size (progress from 4 threads).
    for name, body in zip(result.files, served, strict=True):
        assert any(
            f"downloaded {name} {len(body):,} bytes of {len(body):,}" in r.getMessage()
            for r in caplog.records
        ), name


def test_a_killed_runs_partial_parts_resume_while_the_rest_download(
    multipart: MultipartSandbox,
) -> None:
    runner = multipart.runner()
    record, _ = runner.start(RESERVATION, ExportRequest())
    runner.wait_until_ready(RESERVATION, record.export_id, timeout=30)
    served = multipart.served(record.export_id)
    names = [f.name for f in runner.status(record.export_id).files]
    # What a run SIGKILLed mid-download leaves: its attempt dir (named after its dead pid) with
    # the bytes of the parts it had started and the notes that the host resumes.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = runner.storage.work_dir(RESERVATION, record.export_id, f"20260101T0-{dead.pid}-abc")
    (work / "raw").mkdir()
    kept = {0: len(served[0]) // 3, 3: len(served[3]) - 1}
    for part, size in kept.items():
        (work / "raw" / f"{names[part]}.part").write_bytes(served[part][:size])
        (work / "raw" / f"{names[part]}.part.json").write_text(
            json.dumps({"accept_ranges": True, "validator": None})
        )

    result = multipart.runner().ingest(RESERVATION, record.export_id)
    gate = multipart.gate
    assert gate.max_in_flight == PARTS
    assert sorted(gate.requests, key=lambda r: r[0]) == [
        (0, f"bytes={kept[0]}-"),
        (1, None),
        (2, None),
        (3, f"bytes={kept[3]}-"),
    ]
    assert gate.sent == {i: len(body) - kept.get(i, 0) for i, body in enumerate(served)}
    assert not work.exists()  # the dead attempt's leftovers were taken over, then cleared
    _check_loaded(multipart, runner, result)
    runner.provider.close()


def test_a_dead_link_refetches_only_the_part_that_did_not_arrive(
    multipart: MultipartSandbox, caplog: pytest.LogCaptureFixture
) -> None:
    multipart.gate.revoke = {1}
    runner = multipart.runner()
    with caplog.at_level(logging.WARNING):
        result = runner.sync(RESERVATION, ExportRequest())
    runner.provider.close()
    assert any("download link expired" in r.getMessage() for r in caplog.records)
    gate = multipart.gate
    assert gate.max_in_flight == PARTS
    # The three parts that arrived were kept (in the raw tier at once); after the fresh
    # status only part 1 was asked for again.
    assert sorted(gate.requests) == [(0, None), (1, None), (1, None), (2, None), (3, None)]
    served = multipart.served(result.export_id)
    assert gate.sent == {i: len(body) for i, body in enumerate(served)}
    _check_loaded(multipart, runner, result)
