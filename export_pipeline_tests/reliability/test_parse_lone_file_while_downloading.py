"""A lone export file is parsed while it downloads, its bytes read as they reach the disk, over
real loopback HTTP (the locations simulator) into a real DuckDB file.

Overlap is observed on disk, never on a clock: a gate in front of the simulator's file host
holds the body at ``HOLD_AT`` bytes until the parse has begun writing Parquet in the runner's
work directory. A runner that parsed only once the file had landed would never get there; the
gate lets the body go after a deadline and records that it had to. DuckDB reads a JSON file in
blocks of 32 MiB, so the export is bigger than one block and the hold is past the first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from export_pipeline.core.errors import ParseError, TransientProviderError
from export_pipeline.core.ingest import ExportRunner, IngestSettings
from export_pipeline.core.ledger import Ledger, Warehouse
from export_pipeline.core.model import ExportRequest, ExportState
from export_pipeline.core.storage import LocalStorage
from export_pipeline.providers.locations import LOCATIONS, LocationsProvider
from export_pipeline.sandbox.locations import State, create_app
from export_pipeline.sandbox.server import RunningServer
from export_pipeline_tests.providers.locations.conftest import FAST_RETRY

ROWS = 30_000  # ~48 MB of JSON array: more than one of DuckDB's 32 MiB read blocks
HOLD_AT = 40 << 20


class _Cut(Exception):
    """Raised into the file host's send: the server drops the connection mid-body."""


@dataclass
class HoldBody:
    """ASGI wrapper over the simulator: each download's body stops at ``HOLD_AT`` bytes until
    the runner has begun writing Parquet under ``root`` (``parsed_before_end`` records whether
    it had, or ``deadline`` passed). ``cut``: that many downloads are then dropped there
    instead of going on (with the simulator's ``ignore_range``, a retry starts the file over)."""

    app: ASGIApp
    root: Path
    deadline: float = 30.0
    cut: int = 0
    parsed_before_end: list[bool] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/downloads/"):
            await self.app(scope, receive, send)
            return
        sent = 0
        held = False

        async def holding(message: Message) -> None:
            nonlocal sent, held
            if message["type"] == "http.response.body" and not held:
                sent += len(message.get("body", b""))
                if sent >= HOLD_AT:
                    held = True
                    await self._hold()
            await send(message)

        await self.app(scope, receive, holding)

    async def _hold(self) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.deadline
        while not self._parse_began() and loop.time() < until:
            await asyncio.sleep(0.01)
        self.parsed_before_end.append(self._parse_began())
        if self.cut:
            self.cut -= 1
            await asyncio.sleep(0.5)  # the parse reads on meanwhile, up to the hold
            raise _Cut("connection dropped mid-body")

    def _parse_began(self) -> bool:
        return any(p.name != ".tmp" for p in self.root.glob("data/**/parquet/*"))


@dataclass
class Sandbox:
    state: State
    gate: HoldBody
    base_url: str
    root: Path

    def runner(self, name: str = "w", **settings: object) -> ExportRunner:
        """A runner with a warehouse and storage of its own, the one the gate watches."""
        self.gate.root = self.root / name
        provider = LocationsProvider.from_settings(
            base_url=self.base_url, token=self.state.token, retry=FAST_RETRY
        )
        return ExportRunner(
            provider,
            Ledger(Warehouse(self.root / name / "w.duckdb")),
            LocalStorage(self.root / name / "data"),
            IngestSettings(poll_initial_seconds=0.02, retry=FAST_RETRY, **settings),  # type: ignore[arg-type]
        )


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    state = State(n_locations=ROWS, seed=3, ready_after_seconds=0, directory=tmp_path / "sim")
    gate = HoldBody(create_app(state), tmp_path / "w")
    with RunningServer(gate) as server:
        yield Sandbox(state, gate, server.base_url, tmp_path)
    state.close()


def _rows(runner: ExportRunner) -> list[tuple]:
    """The table's rows without the lineage columns, in key order."""
    with runner.ledger.warehouse.connect(read_only=True) as con:
        return con.execute(
            "SELECT * EXCLUDE (_export_id, _source_file, _loaded_at) FROM locations.locations "
            "ORDER BY id"
        ).fetchall()


def test_a_lone_file_is_parsed_while_it_downloads(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    runner = sandbox.runner()
    with caplog.at_level(logging.INFO):
        result = runner.sync(LOCATIONS, ExportRequest())
    runner.provider.close()
    assert sandbox.gate.parsed_before_end == [True]
    assert result.rows == ROWS
    assert any("parsing it as it downloads" in r.getMessage() for r in caplog.records)
    record = runner.ledger.get(runner.name, result.export_id)
    assert record is not None and record.state is ExportState.LOADED
    with runner.ledger.warehouse.connect(read_only=True) as con:
        hashed = con.execute(
            "SELECT count(*) FROM pipeline.export_files WHERE export_id = ? AND sha256 <> ''",
            [result.export_id],
        ).fetchone()
    assert hashed == (1,)
    # The same export parsed once it had landed gives the same table, row for row.
    sandbox.gate.deadline = 0.5
    later = sandbox.runner("landed", parse_while_downloading=False)
    again = later.sync(LOCATIONS, ExportRequest())
    later.provider.close()
    assert sandbox.gate.parsed_before_end == [True, False]
    assert again.rows == ROWS
    assert _rows(later) == _rows(runner)


def test_a_download_that_starts_over_mid_parse_is_parsed_again_once_landed(
    sandbox: Sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection drops after the parse has read the first block, and the host answers the
    retry with the whole file again (it ignores Range): the bytes read are void, so the file is
    parsed again once it has landed, and every row lands once."""
    sandbox.gate.cut = 1
    sandbox.state.ignore_range = True
    runner = sandbox.runner()
    with caplog.at_level(logging.INFO):
        result = runner.sync(LOCATIONS, ExportRequest())
    runner.provider.close()
    assert sandbox.gate.parsed_before_end[0] is True
    said = [m for r in caplog.records if "parsed again once it" in (m := r.getMessage())]
    assert said and "started over" in said[0]
    assert result.rows == ROWS
    with runner.ledger.warehouse.connect(read_only=True) as con:
        assert con.execute(
            "SELECT count(*), count(DISTINCT id) FROM locations.locations"
        ).fetchone() == (ROWS, ROWS)


def test_a_file_that_never_lands_fails_the_sync_with_the_downloads_error(
    sandbox: Sandbox,
) -> None:
    """Every attempt is cut while the parse reads: the sync fails with the download's error
    (not a parse error), and nothing is loaded."""
    sandbox.gate.cut = 99
    sandbox.state.ignore_range = True
    runner = sandbox.runner()
    with pytest.raises(TransientProviderError) as failed:
        runner.sync(LOCATIONS, ExportRequest())
    runner.provider.close()
    assert not isinstance(failed.value, ParseError)
    assert sandbox.gate.parsed_before_end[0] is True
    record = runner.ledger.get(runner.name, failed.value.export_id or "")
    assert record is not None and record.state is not ExportState.LOADED
    with runner.ledger.warehouse.connect(read_only=True) as con:
        assert con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'locations'"
        ).fetchone() == (0,)
