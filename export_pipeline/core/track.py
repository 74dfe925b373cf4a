"""The track step: what the exports of one provider are doing now, in one bounded pass.

Pushed events are absorbed first (each named export confirmed with the provider), then the open
exports the ledger knows are polled in batches of ``status_batch_size``, least recently checked
first, until a time budget is spent. The ledger records every answer; what is READY afterwards
is what a scheduler (the Dagster sensor, ``defs/sensors.py``) launches ingests for. No Dagster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from export_pipeline.core.ingest import ExportRunner
from export_pipeline.core.ledger import ExportRecord
from export_pipeline.core.model import ExportRequest, ExportState, ExportStatus, batched

log = logging.getLogger(__name__)

MAX_EXPORTS_PER_PASS = 5000
EVENTS_PER_PASS = 1000


class PushedEvent(Protocol):
    seq: int
    source: str
    body: Mapping[str, Any]


class EventSource(Protocol):
    """Where pushed events wait (``webhooks.store.EventStore``)."""

    def pending(self, *, source: str, limit: int) -> Sequence[PushedEvent]: ...

    def mark_consumed(self, seqs: Sequence[int]) -> None: ...


@dataclass
class TrackResult:
    """What one pass saw and did."""

    open: int = 0  # open exports in the ledger before polling
    polled: int = 0
    calls: int = 0
    pushed: set[str] = field(default_factory=set)  # export ids confirmed from pushed events
    new_partitions: list[str] = field(default_factory=list)  # partitions events revealed
    ready: list[ExportRecord] = field(default_factory=list)


def track(
    runner: ExportRunner,
    events: EventSource | None = None,
    *,
    budget_seconds: float = 30.0,
    max_exports: int = MAX_EXPORTS_PER_PASS,
    logger: logging.Logger | logging.LoggerAdapter[Any] | Any = None,
    clock: Callable[[], float] = time.monotonic,
) -> TrackResult:
    """Absorb pushed events (half the budget at most), poll open exports, return the READY ones.

    Errors from the provider or the warehouse propagate (a scheduler skips the tick); what was
    already recorded stays recorded, and unconsumed events wait for the next pass.
    """
    logger = logger or log
    started = clock()
    result = TrackResult()
    if events is not None and runner.provider.pushes_events:
        result.new_partitions, result.pushed = absorb_events(
            runner, events, logger, deadline=started + budget_seconds / 2, clock=clock
        )
    open_ = runner.ledger.open_exports(runner.name, limit=max_exports)
    result.open = len(open_)
    # Pushed exports were just confirmed with the provider; no second call this pass.
    to_poll = [r.export_id for r in open_ if r.export_id not in result.pushed]
    for chunk in batched(to_poll, runner.provider.status_batch_size):
        if clock() - started > budget_seconds:
            logger.info(
                f"time budget reached after {result.polled} of {len(to_poll)} exports; "
                "the rest are polled next time (least recently checked first)"
            )
            break
        runner.refresh(chunk)
        result.polled += len(chunk)
        result.calls += 1
    kinds = {k.name for k in runner.provider.kinds}
    result.ready = [
        r
        for r in runner.ledger.open_exports(runner.name, limit=max_exports)
        if r.state is ExportState.READY and r.kind in kinds
    ]
    return result


def absorb_events(
    runner: ExportRunner,
    store: EventSource,
    logger: Any = None,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[str], set[str]]:
    """Pushed events -> ledger. Returns (new partition keys, export ids that were pushed).

    An event is a hint, not proof: it only says *which* exports to look at now. Each export
    named by an event that is not already finished in the ledger is confirmed with the provider
    in this very pass (one batched status call), and the ledger records the provider's answer,
    not the event's. Exports we did not request (mapping exports made automatically when a job
    completes, say) are adopted the same way.

    Why not trust a COMPLETED event and let the run find out: the sensor launches each export
    once (``run_key = provider:export_id``) and the daemon never launches a key that already has
    a run, even a failed one. A premature event (provider still PENDING) would spend the key on
    a run that can only fail, and the export would then never be launched again.

    Events for exports already loaded (or otherwise finished) are consumed without a call.
    Events left when ``deadline`` (a ``clock()`` value) passes stay pending for the next pass;
    so do all events when the provider cannot be reached (the error propagates).
    """
    logger = logger or log
    provider = runner.provider
    name = runner.name
    events = store.pending(source=name, limit=EVENTS_PER_PASS)
    kind = provider.kinds[0]
    consumed: list[int] = []
    seqs_by_export: dict[str, list[int]] = {}
    partition_of: dict[str, str | None] = {}
    for event in events:
        try:
            partition, status = provider.parse_event(event.body)
        except ValueError as exc:  # the receiver validated it; a parser change could still refuse
            logger.warning(f"event {event.seq} from {event.source} no longer parses: {exc}")
            consumed.append(event.seq)
            continue
        seqs_by_export.setdefault(status.export_id, []).append(event.seq)
        partition_of.setdefault(status.export_id, partition)

    to_confirm: list[str] = []
    for export_id, seqs in seqs_by_export.items():
        record = runner.ledger.get(name, export_id)
        if record is not None and record.state.is_terminal:
            consumed.extend(seqs)  # loaded (or failed, expired, lost): nothing an event changes
        else:
            to_confirm.append(export_id)

    new_partitions: list[str] = []
    pushed: set[str] = set()
    try:
        for chunk in batched(to_confirm, provider.status_batch_size):
            if deadline is not None and clock() > deadline:
                logger.info(
                    f"time budget reached after confirming {len(pushed)} of {len(to_confirm)} "
                    "pushed exports; the rest stay pending for the next pass"
                )
                break
            statuses = provider.get_statuses(list(chunk))
            for export_id in chunk:
                status = statuses.get(export_id) or ExportStatus(
                    export_id=export_id, state=ExportState.LOST
                )
                partition = partition_of[export_id]
                if runner.ledger.get(name, export_id) is None:
                    runner.ledger.record_request(
                        kind, ExportRequest(partition=partition), status, source="webhook"
                    )
                    if partition and status.state.is_open:
                        new_partitions.append(partition)
                else:
                    runner.ledger.apply_status(name, status)
                if status.state is not ExportState.READY:
                    logger.info(
                        f"pushed event for {name} export {export_id}: the provider says "
                        f"{status.state.value}"
                        + (f" ({status.error_code})" if status.error_code else "")
                    )
                pushed.add(export_id)
                consumed.extend(seqs_by_export[export_id])
    finally:
        # What was applied to the ledger is done; the rest is read again next pass.
        store.mark_consumed(consumed)
    return new_partitions, pushed
