"""The track step (``core/track.py``) without Dagster: events confirmed with the provider,
batched polling within a budget, what is READY afterwards. The provider is an in-memory one
(the provider-over-HTTP layer is tested against the simulators); the ledger is a real DuckDB
file; the event source is the receiver's real SQLite store."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from export_pipeline.core.ingest import ExportRunner
from export_pipeline.core.ledger import Ledger
from export_pipeline.core.model import ExportKind, ExportRequest, ExportState, ExportStatus
from export_pipeline.core.storage import LocalStorage
from export_pipeline.core.track import track
from export_pipeline.core.warehouse import DuckDBWarehouse
from export_pipeline.webhooks.store import EventStore

KIND = ExportKind("memo", "things", ("id",), partitions="jobs")


class MemoProvider:
    """An export API held in a dict: id -> state word. Counts its status calls."""

    name: ClassVar[str] = "memo"
    kinds: ClassVar[tuple[ExportKind, ...]] = (KIND,)
    status_batch_size: ClassVar[int] = 10
    pushes_events: ClassVar[bool] = True
    api: Any = None
    api_host = "memo.invalid"

    def __init__(self) -> None:
        self.states: dict[str, ExportState] = {}
        self.calls: list[list[str]] = []

    def kind(self, name: str) -> ExportKind:
        return KIND

    def request_export(self, kind: ExportKind, request: ExportRequest) -> ExportStatus:
        export_id = f"e{len(self.states)}"
        self.states[export_id] = ExportState.PENDING
        return ExportStatus(export_id=export_id, state=ExportState.PENDING)

    def get_statuses(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        assert len(export_ids) <= self.status_batch_size
        self.calls.append(list(export_ids))
        return {
            i: ExportStatus(export_id=i, state=self.states[i])
            for i in export_ids
            if i in self.states
        }

    @classmethod
    def parse_event(cls, body: Mapping[str, Any]) -> tuple[str | None, ExportStatus]:
        if "export" not in body:
            raise ValueError("no export in the event")
        # The event claims READY; the provider's own answer is what counts.
        return body.get("job"), ExportStatus(export_id=body["export"], state=ExportState.READY)

    def close(self) -> None:
        pass


@pytest.fixture
def provider() -> MemoProvider:
    return MemoProvider()


@pytest.fixture
def runner(provider: MemoProvider, tmp_path: Path) -> ExportRunner:
    ledger = Ledger(DuckDBWarehouse(tmp_path / "w.duckdb", publish_reads=False))
    return ExportRunner(provider, ledger, LocalStorage(tmp_path / "data"))


@pytest.fixture
def events(tmp_path: Path) -> EventStore:
    return EventStore(tmp_path / "events.sqlite3", sources=frozenset({"memo"}))


def _push(store: EventStore, event_id: str, body: dict[str, Any]) -> None:
    store.record(
        source="memo",
        event_id=event_id,
        export_id=str(body.get("export", "?")),
        status="ready",
        body=body,
    )


def test_open_exports_are_polled_in_batches_and_ready_ones_returned(
    runner: ExportRunner, provider: MemoProvider
) -> None:
    for _ in range(25):
        runner.start(KIND, ExportRequest(), adopt=False)
    provider.states.update({"e3": ExportState.READY, "e7": ExportState.FAILED})

    result = track(runner)

    assert (result.open, result.polled, result.calls) == (25, 25, 3)
    assert [len(c) for c in provider.calls] == [10, 10, 5]
    assert [r.export_id for r in result.ready] == ["e3"]
    assert runner.ledger.get("memo", "e7").state is ExportState.FAILED


def test_the_budget_stops_polling_and_the_rest_waits(
    runner: ExportRunner, provider: MemoProvider
) -> None:
    for _ in range(25):
        runner.start(KIND, ExportRequest(), adopt=False)
    ticks = iter(range(100))  # each clock() call is one "second" later

    result = track(runner, budget_seconds=1.5, clock=lambda: float(next(ticks)))

    assert result.open == 25 and result.polled == 10 and result.calls == 1


def test_pushed_events_are_confirmed_with_the_provider_not_trusted(
    runner: ExportRunner, provider: MemoProvider, events: EventStore
) -> None:
    provider.states.update({"x1": ExportState.PROCESSING, "x2": ExportState.READY})
    _push(events, "ev1", {"export": "x1", "job": "job-a"})
    _push(events, "ev2", {"export": "x2", "job": "job-b"})
    _push(events, "ev3", {"nothing": True})  # no longer parses: consumed, logged

    result = track(runner, events)

    # One batched confirmation call; the poll leaves the just-confirmed exports alone.
    assert provider.calls == [["x1", "x2"]]
    assert result.pushed == {"x1", "x2"}
    assert sorted(result.new_partitions) == ["job-a", "job-b"]
    assert runner.ledger.get("memo", "x1").state is ExportState.PROCESSING  # not the event's word
    assert [r.export_id for r in result.ready] == ["x2"]
    assert events.pending(source="memo") == []


def test_events_for_finished_exports_cost_no_call(
    runner: ExportRunner, provider: MemoProvider, events: EventStore
) -> None:
    record, _ = runner.start(KIND, ExportRequest(), adopt=False)
    provider.states[record.export_id] = ExportState.FAILED
    runner.refresh([record.export_id])
    provider.calls.clear()
    _push(events, "ev1", {"export": record.export_id})

    result = track(runner, events)

    assert provider.calls == [] and result.pushed == set()
    assert events.pending(source="memo") == []


def test_an_unreachable_provider_leaves_events_pending(
    runner: ExportRunner, provider: MemoProvider, events: EventStore
) -> None:
    from export_pipeline.core.errors import TransientProviderError

    def down(export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        raise TransientProviderError("provider down", provider="memo")

    provider.get_statuses = down  # type: ignore[method-assign]
    _push(events, "ev1", {"export": "x1"})

    with pytest.raises(TransientProviderError):
        track(runner, events)

    assert [e.export_id for e in events.pending(source="memo")] == ["x1"]
    assert runner.ledger.get("memo", "x1") is None
