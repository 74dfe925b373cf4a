"""Incremental windows: the next request is computed from the cursor, never from hidden state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from export_pipeline.core.model import ExportKind, ExportRequest, Incremental


@dataclass(frozen=True)
class IncrementalSettings:
    # Re-read a little before the cursor: providers stamp rows and exports at slightly
    # different instants; the merge on primary key absorbs the duplicates this causes.
    overlap: timedelta = timedelta(minutes=5)
    # WINDOW kinds stop short of "now" so rows still being written are not cut in half.
    settle: timedelta = timedelta(minutes=2)
    # Where the very first WINDOW export starts (MODIFIED_SINCE kinds start with a full export).
    initial_lookback: timedelta = timedelta(days=7)


def next_request(
    kind: ExportKind,
    cursor: datetime | None,
    *,
    now: datetime,
    settings: IncrementalSettings = IncrementalSettings(),
    params: Mapping[str, Any] | None = None,
    partition: str | None = None,
    full_refresh: bool = False,
) -> ExportRequest | None:
    """The request that continues from ``cursor``; None when a WINDOW has nothing new yet
    (``now - settle`` does not pass the cursor).

    - NONE: every export is full.
    - MODIFIED_SINCE: ``cursor - overlap``; no cursor (or full_refresh) means a full export.
    - WINDOW: ``[cursor - overlap, now - settle)``; consecutive windows overlap, so no row can
      fall between two of them. Both bounds are cut to whole seconds (floor): providers are sent
      ``YYYY-MM-DDTHH:MM:SSZ`` (``providers.spec.format_time``), so without the cut the ledger
      and the cursor would claim a window up to ``…:SS.xxxxxx`` while the provider exported up
      to ``…:SS`` — the ledger must record exactly the window the provider was asked for.
    """
    params = dict(params or {})
    if kind.incremental is Incremental.NONE:
        return ExportRequest(params=params, partition=partition)
    if kind.incremental is Incremental.MODIFIED_SINCE:
        since = None if (cursor is None or full_refresh) else cursor - settings.overlap
        return ExportRequest(modified_since=since, params=params, partition=partition)
    end = _whole_seconds(now - settings.settle)
    start = _whole_seconds(
        now - settings.initial_lookback
        if (cursor is None or full_refresh)
        else cursor - settings.overlap
    )
    if end <= start:
        return None
    if cursor is not None and not full_refresh and end <= cursor:
        # Nothing new since the last loaded window (the cursor is within ``settle`` of now):
        # a window of the overlap alone would only re-read rows already loaded.
        return None
    return ExportRequest(modified_since=start, window_end=end, params=params, partition=partition)


class CursorSource(Protocol):
    """Where cursors are read (``core.ledger.Ledger``)."""

    def cursor(self, provider: str, kind: str, partition_key: str = "") -> datetime | None: ...


def request_for(
    kind: ExportKind,
    ledger: CursorSource,
    *,
    now: datetime,
    settings: IncrementalSettings = IncrementalSettings(),
    modified_since: datetime | None = None,
    window_end: datetime | None = None,
    params: Mapping[str, Any] | None = None,
    partition: str | None = None,
    full_refresh: bool = False,
) -> ExportRequest | None:
    """What a run asks for: the window it was given (a schedule or a user put it in the run
    config), else the one that continues from the kind's cursor (``next_request``)."""
    if modified_since is not None or window_end is not None:
        return ExportRequest(
            modified_since=modified_since,
            window_end=window_end,
            params=dict(params or {}),
            partition=partition,
        )
    cursor = ledger.cursor(kind.provider, kind.name, partition or "")
    return next_request(
        kind,
        cursor,
        now=now,
        settings=settings,
        params=params,
        partition=partition,
        full_refresh=full_refresh,
    )


def due_requests(
    kinds: Sequence[ExportKind],
    ledger: CursorSource,
    *,
    now: datetime,
    settings: IncrementalSettings = IncrementalSettings(),
) -> dict[ExportKind, ExportRequest]:
    """The next request of each kind that has one now (a WINDOW kind may have none yet): what a
    scheduled sync asks for, computed once so the run config can show it."""
    due: dict[ExportKind, ExportRequest] = {}
    for kind in kinds:
        request = next_request(
            kind, ledger.cursor(kind.provider, kind.name), now=now, settings=settings
        )
        if request is not None:
            due[kind] = request
    return due


def _whole_seconds(value: datetime) -> datetime:
    """Floor to the second: a floored start only widens a window, never opens a gap."""
    return value.replace(microsecond=0)


def next_cursor(kind: ExportKind, request: ExportRequest, provider_timestamp: datetime | None):
    """Where the cursor moves once an export is loaded: the provider's clock, never ours."""
    if kind.incremental is Incremental.WINDOW:
        return request.window_end
    return provider_timestamp


def as_utc_iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no timezone; use UTC, e.g. 2025-06-01T00:00:00Z")
    return parsed


__all__ = [
    "IncrementalSettings",
    "as_utc_iso",
    "next_cursor",
    "next_request",
    "parse_iso",
]
