"""Time-window increments (core/windows.py): generated schedules of windows never leave a gap.

The deliveries API has no "modified since": each run asks for ``[cursor - overlap, now - settle)``
and the cursor becomes that window's end once it is loaded. A row can only be missed if two
consecutive windows leave a hole, so the property below drives ``next_request``/``next_cursor``
through arbitrary schedules (tick times, overlaps, settle delays, runs that fail and do not move
the cursor) and checks the union of the loaded windows is one unbroken interval.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from export_pipeline.core.model import ExportKind, ExportRequest, Incremental, LoadMode
from export_pipeline.core.windows import (
    IncrementalSettings,
    due_requests,
    next_cursor,
    next_request,
    request_for,
)

WINDOW_KIND = ExportKind(
    provider="deliveries",
    name="outbound_messages",
    primary_key=("id",),
    load_mode=LoadMode.MERGE,
    incremental=Incremental.WINDOW,
)
SINCE_KIND = ExportKind(
    provider="locations",
    name="locations",
    primary_key=("id",),
    incremental=Incremental.MODIFIED_SINCE,
)

# Durations with microsecond resolution, so whole-second truncation is exercised too.
durations = st.integers(min_value=0, max_value=2 * 3600 * 10**6).map(
    lambda us: timedelta(microseconds=us)
)
first_ticks = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
)
# Gaps between ticks: from one microsecond (a tick right after another) to a missed day.
tick_gaps = st.integers(min_value=1, max_value=26 * 3600 * 10**6).map(
    lambda us: timedelta(microseconds=us)
)


@settings(max_examples=60, deadline=None)
@given(
    first_tick=first_ticks,
    gaps=st.lists(tick_gaps, min_size=1, max_size=25),
    loaded=st.lists(st.booleans(), min_size=26, max_size=26),
    overlap=durations,
    settle=durations,
    lookback=st.integers(min_value=1, max_value=14 * 24 * 3600).map(lambda s: timedelta(seconds=s)),
)
def test_generated_schedules_never_leave_a_gap(
    first_tick: datetime,
    gaps: list[timedelta],
    loaded: list[bool],
    overlap: timedelta,
    settle: timedelta,
    lookback: timedelta,
) -> None:
    config = IncrementalSettings(overlap=overlap, settle=settle, initial_lookback=lookback)
    ticks = [first_tick]
    for gap in gaps:
        ticks.append(ticks[-1] + gap)

    cursor: datetime | None = None
    requested: list[ExportRequest] = []
    landed: list[ExportRequest] = []
    for tick, ok in zip(ticks, loaded, strict=False):
        request = next_request(WINDOW_KIND, cursor, now=tick, settings=config)
        if request is None:
            # Nothing new only when the settled end does not pass the start (cursor - overlap).
            assert cursor is not None or lookback <= settle + timedelta(seconds=1)
            if cursor is not None:  # the settled end does not pass the cursor
                assert tick - settle < cursor + timedelta(seconds=1)
            continue
        start, end = request.modified_since, request.window_end
        assert start is not None and end is not None
        assert start < end
        assert end <= tick - settle  # never asks for rows still being written
        assert start.microsecond == 0 and end.microsecond == 0  # what providers are sent
        if cursor is None:
            assert start <= tick - lookback
        else:
            assert start <= cursor  # each window starts at or before the last loaded end
            assert end > cursor  # and brings something new: never the overlap alone
            assert start >= cursor - overlap - timedelta(seconds=1)  # and not needlessly early
        if requested:
            assert end >= requested[-1].window_end  # ends never go backwards
        requested.append(request)
        if ok:  # a failed run leaves the cursor where it was; the next window starts there
            new_cursor = next_cursor(WINDOW_KIND, request, provider_timestamp=None)
            assert new_cursor == end
            cursor = new_cursor if cursor is None else max(cursor, new_cursor)
            landed.append(request)

    if not landed:
        return
    # The loaded windows, in the order they ran, cover [first start, last end) without a hole.
    covered_until = landed[0].window_end
    for request in landed[1:]:
        assert request.modified_since <= covered_until, "gap between consecutive windows"
        covered_until = max(covered_until, request.window_end)
    assert covered_until == landed[-1].window_end == cursor


@settings(max_examples=40, deadline=None)
@given(
    cursor=first_ticks,
    ahead=durations,
    overlap=durations,
    settle=durations,
)
def test_a_window_is_skipped_exactly_when_nothing_new_is_settled(
    cursor: datetime, ahead: timedelta, overlap: timedelta, settle: timedelta
) -> None:
    cursor = cursor.replace(microsecond=0)  # cursors are window ends: whole seconds
    now = cursor + ahead
    config = IncrementalSettings(overlap=overlap, settle=settle)
    request = next_request(WINDOW_KIND, cursor, now=now, settings=config)
    start = (cursor - overlap).replace(microsecond=0)
    end = (now - settle).replace(microsecond=0)
    if end <= cursor:  # nothing new since the cursor: re-reading the overlap alone is pointless
        assert request is None
    else:
        assert request is not None
        assert (request.modified_since, request.window_end) == (start, end)


def test_first_window_and_continuation_by_example() -> None:
    config = IncrementalSettings(
        overlap=timedelta(minutes=5),
        settle=timedelta(minutes=2),
        initial_lookback=timedelta(days=7),
    )
    now = datetime(2026, 3, 1, 12, 0, 30, 987654, tzinfo=UTC)
    first = next_request(WINDOW_KIND, None, now=now, settings=config)
    assert first is not None
    assert first.modified_since == datetime(2026, 2, 22, 12, 0, 30, tzinfo=UTC)
    assert first.window_end == datetime(2026, 3, 1, 11, 58, 30, tzinfo=UTC)
    cursor = next_cursor(WINDOW_KIND, first, provider_timestamp=now)
    assert cursor == first.window_end  # the window's end, not the provider's clock

    later = next_request(WINDOW_KIND, cursor, now=now + timedelta(hours=1), settings=config)
    assert later is not None
    assert later.modified_since == cursor - timedelta(minutes=5)
    assert later.window_end == datetime(2026, 3, 1, 12, 58, 30, tzinfo=UTC)
    # Within settle of the cursor (and inside the overlap) there is nothing to ask for yet.
    assert next_request(
        WINDOW_KIND, cursor, now=cursor - timedelta(minutes=3), settings=config
    ) is (None)
    # A tick one minute after the cursor: now - settle is still before the cursor, so the
    # window would hold only the overlap (rows already loaded): skipped, not re-read.
    assert next_request(
        WINDOW_KIND, cursor, now=cursor + timedelta(minutes=1), settings=config
    ) is (None)
    # full_refresh ignores the cursor.
    again = next_request(WINDOW_KIND, cursor, now=now, settings=config, full_refresh=True)
    assert again is not None and again.modified_since == first.modified_since


def test_modified_since_kinds_are_not_truncated() -> None:
    """Only WINDOW bounds are cut to seconds; a modifiedSince cursor is the provider's own."""
    cursor = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
    request = next_request(
        SINCE_KIND, cursor, now=cursor, settings=IncrementalSettings(overlap=timedelta(seconds=1))
    )
    assert request is not None
    assert request.modified_since == cursor - timedelta(seconds=1)
    assert request.window_end is None
    assert next_request(SINCE_KIND, None, now=cursor).modified_since is None


class _Cursors:
    """Cursors by (provider, kind): what ``request_for``/``due_requests`` read of the ledger."""

    def __init__(self, values: dict[tuple[str, str], datetime]) -> None:
        self.values = values

    def cursor(self, provider: str, kind: str, partition_key: str = "") -> datetime | None:
        return self.values.get((provider, kind))


def test_an_explicit_window_wins_over_the_cursor() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    cursors = _Cursors({("locations", "locations"): now - timedelta(hours=1)})
    since = datetime(2026, 2, 1, tzinfo=UTC)

    given_window = request_for(
        SINCE_KIND, cursors, now=now, modified_since=since, params={"format": "csv"}
    )
    from_cursor = request_for(SINCE_KIND, cursors, now=now, settings=IncrementalSettings())
    full = request_for(SINCE_KIND, cursors, now=now, full_refresh=True)

    assert given_window == ExportRequest(modified_since=since, params={"format": "csv"})
    assert from_cursor is not None
    assert from_cursor.modified_since == now - timedelta(hours=1, minutes=5)
    assert full is not None and full.modified_since is None


def test_due_requests_leave_out_a_window_with_nothing_settled() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    settings_ = IncrementalSettings(overlap=timedelta(0), settle=timedelta(minutes=2))
    cursors = _Cursors({("deliveries", "outbound_messages"): now - timedelta(minutes=1)})

    due = due_requests([WINDOW_KIND, SINCE_KIND], cursors, now=now, settings=settings_)

    assert list(due) == [SINCE_KIND]  # the window kind's cursor is within `settle` of now
    later = due_requests([WINDOW_KIND], cursors, now=now + timedelta(hours=1), settings=settings_)
    assert later[WINDOW_KIND].modified_since == now - timedelta(minutes=1)
