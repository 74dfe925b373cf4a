"""A multi-part export is parsed part by part as the parts land, while the later ones are still
downloading, over real loopback HTTP (the Mews simulator) into a real DuckDB file.

Overlap is observed on disk, never on a clock: a gate in front of the simulator holds the last
part's body until the first part's Parquet exists in the runner's work directory. A runner
that parsed only after the whole download would never get there; the gate lets the body go
after a deadline and records that it had to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from export_pipeline.core.errors import ExportPipelineError, LinkExpiredError, ParseError
from export_pipeline.core.ingest import ExportRunner, IngestSettings
from export_pipeline.core.model import ExportRequest, ExportState
from export_pipeline.providers.mews import MewsProvider
from export_pipeline.sandbox.mews import State, create_app
from export_pipeline.sandbox.server import RunningServer
from export_pipeline_tests.reliability.test_parallel_download import (
    PARTS,
    RETRY,
    mews_runner,
    mews_state,
)

ROWS = 800
RESERVATION = next(k for k in MewsProvider.kinds if k.params["entity_type"] == "Reservation")


@dataclass
class HoldLastPart:
    """ASGI wrapper over the simulator's file host: the last part's body waits until a Parquet
    of part 0 is on disk under ``root`` (``parsed_first``), or ``deadline`` seconds. With
    ``refuse``, the last part is refused every time instead (a signed link the host no longer
    honours; fresh ones too while ``refuse`` lasts)."""

    app: ASGIApp
    root: Path
    deadline: float = 20.0
    refuse: int = 0  # how many of the last part's requests are refused
    # Once part 0 is parsed, send this process SIGUSR1 (what stops the run's main thread) and
    # hold the last part until ``let_go`` (or the deadline).
    terminate: bool = False
    let_go: threading.Event = field(default_factory=threading.Event)
    # Called once, with the export's id, when the last part is first let through.
    on_last: Callable[[str], None] | None = None
    released: bool = False
    parsed_first: list[bool] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/files/"):
            part = int(path.rsplit("/", 1)[1].split(".")[0])
            if part == PARTS - 1:
                loop = asyncio.get_running_loop()
                until = loop.time() + self.deadline
                while not self._first_parsed() and loop.time() < until:
                    await asyncio.sleep(0.01)
                self.parsed_first.append(self._first_parsed())
                if self.terminate:
                    os.kill(os.getpid(), signal.SIGUSR1)
                    while not self.let_go.is_set() and loop.time() < until:
                        await asyncio.sleep(0.01)
                self.released = True
                if self.on_last is not None:
                    on_last, self.on_last = self.on_last, None
                    on_last(path.rsplit("/", 2)[1])
                if self.refuse:
                    self.refuse -= 1
                    query = parse_qs(scope["query_string"].decode())
                    query["signature"] = ["0" * 64]
                    scope = dict(scope, query_string=urlencode(query, doseq=True).encode())
        await self.app(scope, receive, send)

    def _first_parsed(self) -> bool:
        """Part 0's Parquet is written whole (its footer is there): it has been staged."""
        for path in self.root.glob("data/**/parquet/part-0000.parquet*"):
            with contextlib.suppress(OSError):
                if path.read_bytes()[-4:] == b"PAR1":
                    return True
        return False


@dataclass
class Sandbox:
    state: State
    gate: HoldLastPart
    base_url: str
    root: Path

    def runner(self, **settings: object) -> ExportRunner:
        base = IngestSettings(poll_initial_seconds=0.02, retry=RETRY)
        return mews_runner(
            self.state,
            self.base_url,
            self.root,
            replace(base, **settings),  # type: ignore[arg-type]
        )


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    state = mews_state(tmp_path / "mews", ROWS)
    gate = HoldLastPart(create_app(state), tmp_path)
    with RunningServer(gate) as server:
        yield Sandbox(state, gate, server.base_url, tmp_path)
    state.close()


def _table_rows(runner: ExportRunner) -> tuple[int, int] | None:
    with runner.ledger.warehouse.connect(read_only=True) as con:
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'mews' AND table_name = 'reservation'"
        ).fetchone()
        if not exists or not exists[0]:
            return None
        row = con.execute("SELECT count(*), count(DISTINCT Id) FROM mews.reservation").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_the_first_part_is_parsed_while_the_last_one_downloads(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    runner = sandbox.runner()
    with caplog.at_level(logging.INFO):
        result = runner.sync(RESERVATION, ExportRequest())
    runner.provider.close()
    assert sandbox.gate.parsed_first == [True]
    # The run log says how the parts are read (the Dagster UI shows it on the step).
    said = f"parsing each of {PARTS} parts as it lands (2 downloading at once)"
    assert any(said in r.getMessage() for r in caplog.records)
    assert result.rows == ROWS
    assert len(result.files) == PARTS
    assert _table_rows(runner) == (ROWS, ROWS)
    # The ledger holds every part's hash (taken as each landed) and the export is loaded.
    with runner.ledger.warehouse.connect(read_only=True) as con:
        hashed = con.execute(
            "SELECT count(*) FROM pipeline.export_files WHERE export_id = ? AND sha256 <> ''",
            [result.export_id],
        ).fetchone()
    assert hashed == (PARTS,)
    record = runner.ledger.get(runner.name, result.export_id)
    assert record is not None and record.state is ExportState.LOADED


def test_without_it_the_parse_waits_for_every_part(sandbox: Sandbox) -> None:
    """The setting off: the gate sees no Parquet before the last part (the check can fail)."""
    sandbox.gate.deadline = 1.0
    runner = sandbox.runner(parse_while_downloading=False)
    result = runner.sync(RESERVATION, ExportRequest())
    runner.provider.close()
    assert sandbox.gate.parsed_first == [False]
    assert _table_rows(runner) == (ROWS, ROWS)
    assert result.rows == ROWS


def test_a_part_that_never_downloads_fails_the_sync_with_the_downloads_error(
    sandbox: Sandbox,
) -> None:
    """The last part's link is refused, fresh links too, while the first parts are parsed:
    the sync fails with the download's error (not a parse error), nothing is loaded, and the
    parts that did land stay in the raw tier for the next attempt."""
    sandbox.gate.refuse = 99
    runner = sandbox.runner()
    with pytest.raises(LinkExpiredError) as failed:
        runner.sync(RESERVATION, ExportRequest())
    runner.provider.close()
    assert failed.value.file is not None and failed.value.file.startswith("part-")
    assert all(sandbox.gate.parsed_first)  # the first part was parsed meanwhile
    assert _table_rows(runner) is None
    record = runner.ledger.get(runner.name, failed.value.export_id or "")
    assert record is not None and record.state is not ExportState.LOADED
    landed = sorted(p.name for p in (sandbox.root / "data").rglob("part-*.jsonl"))
    assert landed == [f"part-{n:04d}.jsonl" for n in range(PARTS - 1)]


def test_the_setting_is_resource_config() -> None:
    from export_pipeline.defs.resources import SyncSettingsResource

    assert SyncSettingsResource().ingest().parse_while_downloading is True
    off = SyncSettingsResource(parse_while_downloading=False).ingest()
    assert off.parse_while_downloading is False


def test_a_fresh_link_asked_for_while_the_parts_are_parsed_is_recorded_by_the_load(
    sandbox: Sandbox,
) -> None:
    """The last part's link is refused once, after part 0 was parsed and staged: the fresh
    status is written in the load's own transaction (a write beside it, from the download's
    thread, made that transaction fail with "Conflict on update")."""
    sandbox.gate.refuse = 1
    runner = sandbox.runner()
    result = runner.sync(RESERVATION, ExportRequest())
    runner.provider.close()
    assert sandbox.gate.parsed_first == [True, True]  # refused, then asked for again
    assert _table_rows(runner) == (ROWS, ROWS)
    record = runner.ledger.get(runner.name, result.export_id)
    assert record is not None and record.state is ExportState.LOADED


def test_an_export_that_expires_while_its_parts_are_parsed_is_recorded_expired(
    sandbox: Sandbox,
) -> None:
    """Mews expires the export once part 0 is parsed, before the last part is sent: the fresh
    status says Expired, the ledger records it once the staged transaction is rolled back, and
    the sync requests a new export and loads that one."""
    expired: list[str] = []

    def expire(export_id: str) -> None:
        sandbox.state.expire(export_id)
        expired.append(export_id)

    sandbox.gate.on_last = expire
    runner = sandbox.runner()
    result = runner.sync(RESERVATION, ExportRequest())
    runner.provider.close()
    assert len(expired) == 1 and result.export_id != expired[0]
    first = runner.ledger.get(runner.name, expired[0])
    assert first is not None and first.state is ExportState.EXPIRED
    assert _table_rows(runner) == (ROWS, ROWS)


def test_a_status_that_lists_other_files_meanwhile_fails_the_attempt_and_the_next_loads_them(
    sandbox: Sandbox,
) -> None:
    """Once part 0 is parsed, the last part's link is refused and the fresh status lists one
    part fewer: the parse waited for a part that will not land, so the attempt fails with a
    retryable error (not a parse error), nothing is loaded, and the next run loads the parts
    the status lists now, re-read from the raw tier instead of downloaded again."""
    sandbox.gate.refuse = 1
    sandbox.gate.on_last = sandbox.state.drop_last_part
    runner = sandbox.runner()
    with pytest.raises(ExportPipelineError) as failed:
        runner.sync(RESERVATION, ExportRequest())
    assert "files changed while they downloaded" in str(failed.value)
    assert failed.value.retryable is True and not isinstance(failed.value, ParseError)
    assert _table_rows(runner) is None
    export_id = failed.value.export_id or ""
    record = runner.ledger.get(runner.name, export_id)
    assert record is not None and record.state is not ExportState.LOADED
    result = runner.ingest(RESERVATION, export_id)
    runner.provider.close()
    listed = ROWS * (PARTS - 1) // PARTS
    assert result.rows == listed and _table_rows(runner) == (listed, listed)
    assert sorted(result.reused_files) == [f"part-{n:04d}.jsonl" for n in range(PARTS - 1)]


class _Terminated(BaseException):
    """What a terminated run's main thread meets (Dagster raises a BaseException too)."""


def test_a_run_stopped_while_it_parses_stops_its_download_too(sandbox: Sandbox) -> None:
    """The run is stopped (a signal in its main thread) once part 0 is parsed, while the last
    part is held on the wire: the sync ends without waiting for that download, the parts
    that landed stay in the raw tier, and nothing is loaded."""

    def stop(signum: int, frame: object) -> None:
        raise _Terminated()

    sandbox.gate.terminate = True
    sandbox.gate.deadline = 60.0
    previous = signal.signal(signal.SIGUSR1, stop)
    runner = sandbox.runner()
    try:
        with pytest.raises(_Terminated):
            runner.sync(RESERVATION, ExportRequest())
        held = not sandbox.gate.released
    finally:
        sandbox.gate.let_go.set()
        signal.signal(signal.SIGUSR1, previous)
        runner.provider.close()
    assert sandbox.gate.parsed_first == [True]
    assert held  # the sync was over while the last part was still being held back
    assert _table_rows(runner) is None
    landed = sorted(p.name for p in (sandbox.root / "data").rglob("part-*.jsonl"))
    assert landed == [f"part-{n:04d}.jsonl" for n in range(PARTS - 1)]
