"""EventStore on disk: idempotent record, pending order, consumption, concurrency."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import export_pipeline
from export_pipeline.webhooks.store import EventStore


def record(
    store: EventStore, event_id: str, *, source: str = "locations", export_id: str = "e1"
) -> bool:
    return store.record(
        source=source, event_id=event_id, export_id=export_id, status="ready", body={"id": event_id}
    )


def test_record_is_idempotent_per_source_and_event_id(store: EventStore) -> None:
    assert record(store, "a") is True
    assert record(store, "a") is False
    assert record(store, "a", source="mapping") is True  # ids are per sender
    assert store.count() == 2
    assert store.count(source="locations") == 1


def test_pending_is_oldest_first_filtered_and_limited(store: EventStore) -> None:
    for i in range(5):
        record(store, f"l{i}", export_id=f"x{i}")
        record(store, f"m{i}", source="mapping")

    assert [e.event_id for e in store.pending(source="locations")] == [f"l{i}" for i in range(5)]
    assert [e.event_id for e in store.pending(limit=3)] == ["l0", "m0", "l1"]
    seqs = [e.seq for e in store.pending()]
    assert seqs == sorted(seqs)
    event = store.pending(source="locations", limit=1)[0]
    assert event.body == {"id": "l0"}
    assert event.received_at.tzinfo is not None


def test_mark_consumed_hides_events_and_keeps_them(store: EventStore) -> None:
    for i in range(3):
        record(store, f"e{i}")
    first, second, _third = store.pending()

    store.mark_consumed([first.seq, second.seq, 999_999])
    first_stamp = store.get(first.seq).consumed_at  # type: ignore[union-attr]
    store.mark_consumed([first.seq])  # idempotent: the first consumption time is kept

    assert [e.event_id for e in store.pending()] == ["e2"]
    consumed = store.get(first.seq)
    assert consumed is not None and consumed.consumed_at is not None
    assert consumed.consumed_at == first_stamp
    # A consumed event is still a duplicate: a late redelivery is not a new event.
    assert record(store, "e0") is False


def test_mark_consumed_many_seqs_at_once(store: EventStore) -> None:
    for i in range(1200):
        record(store, f"e{i}")
    seqs = [e.seq for e in store.pending(limit=2000)]

    store.mark_consumed(seqs)

    assert store.pending() == []


def test_unknown_source_is_refused(store: EventStore) -> None:
    with pytest.raises(ValueError, match="unknown event source"):
        record(store, "a", source="mews")


def test_file_is_wal_and_survives_a_new_instance(store_path: Path) -> None:
    record(EventStore(store_path), "a")

    reopened = EventStore(store_path)

    assert [e.event_id for e in reopened.pending()] == ["a"]
    with sqlite3.connect(store_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_threads_record_each_event_once(store_path: Path) -> None:
    # The default busy timeout: this test is about correctness under contention (8 writers
    # fsyncing on a busy machine), not about how quickly a locked store gives up.
    store = EventStore(store_path)
    errors: list[BaseException] = []
    results: list[bool] = []
    lock = threading.Lock()

    def work(worker: int) -> None:
        try:
            for i in range(40):
                # Every worker records the same 40 ids: exactly one insert per id may win.
                new = record(store, f"e{i}")
                with lock:
                    results.append(new)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert results.count(True) == 40
    assert store.count() == 40


def test_another_process_sees_recorded_events(store: EventStore, store_path: Path) -> None:
    record(store, "from-parent")
    script = (
        "import sys; from pathlib import Path;"
        "from export_pipeline.webhooks.store import EventStore;"
        "s = EventStore(Path(sys.argv[1]));"
        "s.record(source='mapping', event_id='from-child', export_id='f', status='ready', body={});"
        "print(','.join(e.event_id for e in s.pending()))"
    )

    root = Path(export_pipeline.__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", script, str(store_path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )

    assert out.stdout.strip() == "from-parent,from-child"
    assert [e.event_id for e in store.pending()] == ["from-parent", "from-child"]


def test_locked_file_raises_operational_error(store: EventStore, store_path: Path) -> None:
    blocker = sqlite3.connect(store_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            record(store, "blocked")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert record(store, "blocked") is True
