"""A durable store for pushed export events, separate from the DuckDB warehouse.

Why a store of its own: DuckDB allows one writer per file, and the webhook receiver must answer
the sender within seconds whatever the pipeline is doing. So the receiver only appends events to
this small SQLite file (WAL mode, ``synchronous=FULL``: committed means on disk), and a Dagster
sensor reads the pending ones, turns them into ingest runs and marks them consumed.

Every call opens and closes its own connection, so one ``EventStore`` can be shared by threads
(the receiver runs store calls in a thread pool) and several processes (receiver + Dagster daemon)
can use the same file; ``busy_timeout`` makes them wait for each other instead of failing at once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def event_sources() -> frozenset[str]:
    """The providers that push events (``ExportProvider.pushes_events``)."""
    from export_pipeline.providers.registry import PROVIDERS

    return frozenset(cls.name for cls in PROVIDERS if cls.pushes_events)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    source       TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    export_id    TEXT NOT NULL,
    status       TEXT NOT NULL,
    body         TEXT NOT NULL,
    received_at  TEXT NOT NULL,
    consumed_at  TEXT,
    UNIQUE (source, event_id)
);
CREATE INDEX IF NOT EXISTS webhook_events_pending
    ON webhook_events (source, seq) WHERE consumed_at IS NULL;
"""

# SQLite limits the number of bound parameters per statement; stay well below it.
_MAX_PARAMS = 500


@dataclass(frozen=True)
class StoredEvent:
    """One recorded event. ``status`` is our ``ExportState`` value (e.g. ``"ready"``,
    ``"failed"``) as the provider parser mapped it; ``body`` is the sender's JSON with its
    secrets redacted by the receiver (``core.redact``)."""

    seq: int
    source: str
    event_id: str
    export_id: str
    status: str
    body: dict[str, Any]
    received_at: datetime
    consumed_at: datetime | None


def _now() -> datetime:
    return datetime.now(UTC)


def _to_text(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _from_text(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class EventStore:
    """Append-only-ish event log in SQLite: ``record`` (receiver), ``pending`` and
    ``mark_consumed`` (sensor).

    ``busy_timeout_seconds`` is how long a call waits for another writer before raising
    ``sqlite3.OperationalError``; the receiver keeps it short and answers 503 so the sender
    retries later, rather than holding the HTTP request open.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_seconds: float = 5.0,
        sources: frozenset[str] | None = None,
    ) -> None:
        self.path = Path(path)
        # Which sources ``record`` takes: default, the registry's providers that push events.
        self.sources = sources
        self.busy_timeout_seconds = busy_timeout_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            # journal_mode is persistent in the file; switching needs a moment of exclusivity,
            # which busy_timeout (set in _connect) waits for when several processes start.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(
                    f"could not switch {self.path} to WAL mode (got {mode!r})"
                )
            conn.executescript(_SCHEMA)

    def __repr__(self) -> str:
        return f"EventStore({str(self.path)!r})"

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: autocommit; multi-statement writes use explicit BEGIN IMMEDIATE
        # so the write lock is taken up front (no deadlock-prone lock upgrades).
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout_seconds,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_seconds * 1000)}")
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    def record(
        self,
        *,
        source: str,
        event_id: str,
        export_id: str,
        status: str,
        body: Mapping[str, Any],
    ) -> bool:
        """Store one event; True if new, False if ``(source, event_id)`` was already stored.

        The insert is committed (and fsynced, ``synchronous=FULL``) before this returns, so the
        receiver may acknowledge the delivery right after. Raises ``sqlite3.OperationalError``
        when the file is locked for longer than the busy timeout or cannot be written.
        """
        if source not in (sources := self.sources or event_sources()):
            raise ValueError(f"unknown event source {source!r}; expected one of {sorted(sources)}")
        if not event_id:
            raise ValueError("event_id must not be empty")
        payload = json.dumps(dict(body), separators=(",", ":"), sort_keys=True)
        with self._connect() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO webhook_events"
                " (source, event_id, export_id, status, body, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (source, event_id, export_id, status, payload, _to_text(_now())),
            )
            return cursor.rowcount == 1

    def pending(self, *, source: str | None = None, limit: int = 500) -> list[StoredEvent]:
        """Events not yet consumed, oldest first (by arrival order, ``seq``)."""
        if limit <= 0:
            return []
        sql = "SELECT * FROM webhook_events WHERE consumed_at IS NULL"
        params: list[Any] = []
        if source is not None:
            sql += " AND source = ?"
            params.append(source)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(sql, params).fetchall()
        return [self._row_to_event(row) for row in rows]

    def get(self, seq: int) -> StoredEvent | None:
        """One event by ``seq`` whether consumed or not (for investigation and tests)."""
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute("SELECT * FROM webhook_events WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else self._row_to_event(row)

    def count(self, *, source: str | None = None) -> int:
        """Number of stored events, consumed or not."""
        sql = "SELECT count(*) FROM webhook_events"
        params: tuple[Any, ...] = ()
        if source is not None:
            sql += " WHERE source = ?"
            params = (source,)
        with self._connect() as conn:
            return int(conn.execute(sql, params).fetchone()[0])

    def mark_consumed(self, seqs: Sequence[int]) -> None:
        """Mark events as handled so ``pending`` stops returning them.

        Idempotent: already-consumed events keep their first ``consumed_at``; unknown seqs are
        ignored. All seqs are marked in one transaction (all or nothing).
        """
        ids = sorted({int(seq) for seq in seqs})
        if not ids:
            return
        stamp = _to_text(_now())
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(ids), _MAX_PARAMS):
                    chunk = ids[start : start + _MAX_PARAMS]
                    marks = ",".join("?" * len(chunk))
                    conn.execute(
                        "UPDATE webhook_events SET consumed_at = ?"
                        f" WHERE consumed_at IS NULL AND seq IN ({marks})",
                        (stamp, *chunk),
                    )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _row_to_event(row: sqlite3.Row) -> StoredEvent:
        received_at = _from_text(row["received_at"])
        assert received_at is not None  # NOT NULL column
        return StoredEvent(
            seq=int(row["seq"]),
            source=row["source"],
            event_id=row["event_id"],
            export_id=row["export_id"],
            status=row["status"],
            body=json.loads(row["body"]),
            received_at=received_at,
            consumed_at=_from_text(row["consumed_at"]),
        )
