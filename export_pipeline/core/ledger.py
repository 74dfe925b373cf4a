"""The ledger: a durable record of every export, its files and the incremental cursors.

It lives in the warehouse itself (schema ``pipeline``) so that loading an export, marking it
loaded and moving the cursor commit in one DuckDB transaction. DuckDB allows one writing
process at a time, so connections are opened briefly and retried while another process holds
the lock (see :meth:`Warehouse.connect`).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import psutil
import pyarrow as pa

from export_pipeline.core.model import (
    ALLOWED_TRANSITIONS,
    ExportKind,
    ExportRequest,
    ExportState,
    ExportStatus,
    can_transition,
)
from export_pipeline.core.warehouse import DuckDBWarehouse as Warehouse
from export_pipeline.core.warehouse import Warehouse as WarehouseBackend

__all__ = ["LEDGER_SCHEMA", "ExportRecord", "Ledger", "Warehouse", "WarehouseBackend"]

LEDGER_SCHEMA = "pipeline"
log = logging.getLogger(__name__)

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {LEDGER_SCHEMA};
CREATE TABLE IF NOT EXISTS {LEDGER_SCHEMA}.exports (
    provider VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    export_id VARCHAR NOT NULL,
    partition_key VARCHAR NOT NULL DEFAULT '',
    state VARCHAR NOT NULL,
    provider_status VARCHAR,
    modified_since TIMESTAMPTZ,
    window_end TIMESTAMPTZ,
    request_params JSON,
    source VARCHAR,
    requested_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    polls INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    expires_at TIMESTAMPTZ,
    provider_timestamp TIMESTAMPTZ,
    expected_rows BIGINT,
    rows_loaded BIGINT,
    bytes_downloaded BIGINT,
    loaded_at TIMESTAMPTZ,
    raw_uri VARCHAR,
    parquet_uri VARCHAR,
    error_code VARCHAR,
    error_message VARCHAR,
    replaced_by VARCHAR,
    detail JSON,
    permanent_failures INTEGER NOT NULL DEFAULT 0,
    lease_owner VARCHAR,
    lease_expires_at TIMESTAMPTZ,
    PRIMARY KEY (provider, export_id)
);
CREATE TABLE IF NOT EXISTS {LEDGER_SCHEMA}.export_files (
    provider VARCHAR NOT NULL,
    export_id VARCHAR NOT NULL,
    name VARCHAR NOT NULL,
    announced_bytes BIGINT,
    size_bytes BIGINT,
    sha256 VARCHAR,
    rows BIGINT,
    PRIMARY KEY (provider, export_id, name)
);
CREATE TABLE IF NOT EXISTS {LEDGER_SCHEMA}.cursors (
    provider VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    partition_key VARCHAR NOT NULL DEFAULT '',
    cursor_value TIMESTAMPTZ,
    export_id VARCHAR,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, kind, partition_key)
);
"""


# Columns added after the first release: warehouses made before gain them in place.
_ADDED_COLUMNS = {
    "permanent_failures": "INTEGER DEFAULT 0",
    "lease_owner": "VARCHAR",
    "lease_expires_at": "TIMESTAMPTZ",
}


def _ledger_columns(con: duckdb.DuckDBPyConnection) -> dict[str, set[str]]:
    """The ledger's tables and their columns, as they are now (one catalog query)."""
    have: dict[str, set[str]] = {}
    # A literal, not a parameter: the first Python parameter DuckDB binds in a process imports
    # pandas (0.2 s), which this check, run once per warehouse, need not pay for.
    for table, column in con.execute(
        "SELECT table_name, column_name FROM information_schema.columns "
        f"WHERE table_schema = '{LEDGER_SCHEMA}'"
    ).fetchall():
        have.setdefault(table, set()).add(column)
    return have


def ensure_ledger(
    con: duckdb.DuckDBPyConnection, *, constraints: bool = True, own_transaction: bool = True
) -> None:
    """Create the ledger tables and add columns added since. ``constraints=False`` for a
    DuckLake warehouse, which has no PRIMARY KEY / UNIQUE: the ledger's writes keep keys
    unique themselves (insert-if-absent, MERGE) and lake commits are serialised or re-run.

    A ledger that is complete is only read (one catalog query, no write). Otherwise the DDL
    runs as one transaction (one commit instead of one per statement); with
    ``own_transaction=False`` it joins the one ``con`` is in (DuckLake's first attach)."""
    ddl = _DDL if constraints else re.sub(r",\s*PRIMARY KEY \([^)]*\)", "", _DDL)
    for attempt in range(3):
        have = _ledger_columns(con)
        exports = have.get("exports")
        missing = [name for name in _ADDED_COLUMNS if exports is None or name not in exports]
        if exports is not None and not missing and {"export_files", "cursors"} <= have.keys():
            return
        own = own_transaction
        if own:
            con.execute("BEGIN TRANSACTION")
        try:
            con.execute(ddl)
            if exports is not None:  # made before: gains the columns added since
                for name in missing:
                    con.execute(
                        f"ALTER TABLE {LEDGER_SCHEMA}.exports ADD COLUMN {name} "
                        f"{_ADDED_COLUMNS[name]}"
                    )
            if own:
                con.execute("COMMIT")
            return
        except duckdb.TransactionException:
            # Another thread of this process created the ledger at the same moment: look again.
            if not own or attempt == 2:
                raise
            with suppress(duckdb.Error):
                con.execute("ROLLBACK")
        except BaseException:
            if own:
                with suppress(duckdb.Error):
                    con.execute("ROLLBACK")
            raise


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ExportRecord:
    """One row of ``pipeline.exports``."""

    provider: str
    kind: str
    export_id: str
    partition_key: str
    state: ExportState
    provider_status: str | None
    modified_since: datetime | None
    window_end: datetime | None
    request_params: dict[str, Any]
    source: str | None
    requested_at: datetime
    updated_at: datetime
    polls: int
    attempts: int
    expires_at: datetime | None
    provider_timestamp: datetime | None
    expected_rows: int | None
    rows_loaded: int | None
    bytes_downloaded: int | None
    loaded_at: datetime | None
    raw_uri: str | None
    parquet_uri: str | None
    error_code: str | None
    error_message: str | None
    replaced_by: str | None
    detail: dict[str, Any]
    permanent_failures: int = 0
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None

    @property
    def request(self) -> ExportRequest:
        return ExportRequest(
            modified_since=self.modified_since,
            window_end=self.window_end,
            params=self.request_params,
            partition=self.partition_key or None,
        )


_COLUMNS = [f for f in ExportRecord.__dataclass_fields__]


@dataclass(frozen=True)
class Lease:
    """The answer to :meth:`Ledger.claim`: granted, or who holds the export until when."""

    granted: bool
    owner: str | None
    expires_at: datetime | None
    taken_over_from: str | None = None  # an expired or dead holder this claim replaced


def _record(row: tuple[Any, ...]) -> ExportRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["state"] = ExportState(values["state"])
    values["request_params"] = json.loads(values["request_params"] or "{}")
    values["detail"] = json.loads(values["detail"] or "{}")
    values["permanent_failures"] = values["permanent_failures"] or 0
    return ExportRecord(**values)


_LOCK_PID = re.compile(r"PID (\d+)")
# Command lines of processes that write the warehouse: a Dagster run, the CLI, the demo.
_WRITERS = ("dagster", "export-pipeline", "export_pipeline")


def lock_holder(error: str) -> tuple[str, str]:
    """Who holds the warehouse, from DuckDB's lock error (it names the PID), and what to do.

    A pipeline process is a load; anything else (the duckdb CLI, a notebook, a BI tool) is
    taken for a reader, which blocks loads as long as it keeps the file open.
    """
    match = _LOCK_PID.search(error)
    if not match:
        return "another process", "try again when it ends"
    pid = int(match.group(1))
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        cmdline = ""
    shown = f" (PID {pid})" + (f" `{cmdline[:120]}`" if cmdline else "")
    if any(w in cmdline for w in _WRITERS):
        return (
            f"a pipeline process{shown}, a load or another run",
            "it ends by itself; runs take turns on the warehouse",
        )
    return (
        f"a reader or another program{shown}",
        "DuckDB lets no load in while another process has the file open: close that "
        "session; readers query the read replica instead (`export-pipeline sql`, README: Analysts)",
    )


class Ledger:
    """Reads and writes ``pipeline.*``. Methods taking ``con`` join the caller's transaction."""

    def __init__(self, warehouse: WarehouseBackend) -> None:
        self.warehouse = warehouse

    # -- reads ---------------------------------------------------------------------------

    def get(self, provider: str, export_id: str) -> ExportRecord | None:
        with self.warehouse.connect() as con:
            return self._get(con, provider, export_id)

    def _get(
        self, con: duckdb.DuckDBPyConnection, provider: str, export_id: str
    ) -> ExportRecord | None:
        row = con.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM {LEDGER_SCHEMA}.exports "
            "WHERE provider = ? AND export_id = ?",
            [provider, export_id],
        ).fetchone()
        return _record(row) if row else None

    def open_exports(
        self,
        provider: str,
        *,
        kind: str | None = None,
        partition_key: str | None = None,
        limit: int | None = None,
    ) -> list[ExportRecord]:
        """Exports not yet loaded nor terminally failed, least recently checked first."""
        sql = (
            f"SELECT {', '.join(_COLUMNS)} FROM {LEDGER_SCHEMA}.exports "
            "WHERE provider = ? AND state IN ('pending', 'processing', 'ready')"
        )
        params: list[Any] = [provider]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        if partition_key is not None:
            sql += " AND partition_key = ?"
            params.append(partition_key)
        sql += " ORDER BY updated_at, requested_at"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self.warehouse.connect() as con:
            return [_record(r) for r in con.execute(sql, params).fetchall()]

    def last_loaded(self, provider: str, kind: str, partition_key: str = "") -> ExportRecord | None:
        with self.warehouse.connect() as con:
            row = con.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM {LEDGER_SCHEMA}.exports "
                "WHERE provider = ? AND kind = ? AND partition_key = ? AND state = 'loaded' "
                "ORDER BY loaded_at DESC LIMIT 1",
                [provider, kind, partition_key],
            ).fetchone()
        return _record(row) if row else None

    def cursor(self, provider: str, kind: str, partition_key: str = "") -> datetime | None:
        with self.warehouse.connect() as con:
            # max(): on a DuckLake lake with a PostgreSQL catalog, two loads committing at once
            # can each insert the kind's first cursor row (no key, and DuckLake does not
            # conflict on inserts); the cursor is the newest of them, as the MERGE keeps it.
            row = con.execute(
                f"SELECT max(cursor_value) FROM {LEDGER_SCHEMA}.cursors "
                "WHERE provider = ? AND kind = ? AND partition_key = ?",
                [provider, kind, partition_key],
            ).fetchone()
        return _aware(row[0]) if row else None

    # -- writes ----------------------------------------------------------------------------

    def record_request(
        self,
        kind: ExportKind,
        request: ExportRequest,
        status: ExportStatus,
        *,
        source: str,
    ) -> ExportRecord:
        """Insert a newly requested (or newly discovered) export; an existing id is kept."""
        with self.warehouse.transaction() as con:
            self._record_request(con, kind, request, status, source=source)
            record = self._get(con, kind.provider, status.export_id)
        assert record is not None
        return record

    def _record_request(
        self,
        con: duckdb.DuckDBPyConnection,
        kind: ExportKind,
        request: ExportRequest,
        status: ExportStatus,
        *,
        source: str,
    ) -> None:
        now = utcnow()
        existing = self._get(con, kind.provider, status.export_id)
        if existing is None:
            con.execute(
                f"INSERT INTO {LEDGER_SCHEMA}.exports (provider, kind, export_id, "
                "partition_key, state, provider_status, modified_since, window_end, "
                "request_params, source, requested_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    kind.provider,
                    kind.name,
                    status.export_id,
                    request.partition or "",
                    ExportState.PENDING.value,
                    None,
                    request.modified_since,
                    request.window_end,
                    json.dumps(dict(request.params), default=str),
                    source,
                    now,
                    now,
                ],
            )
        self._apply_status(con, kind.provider, status, count_poll=False)

    def apply_status(
        self, provider: str, status: ExportStatus, *, con: duckdb.DuckDBPyConnection | None = None
    ) -> ExportRecord | None:
        """Record what the provider said; illegal moves (e.g. out of LOADED) are ignored. With
        ``con``, inside that open transaction (a write beside it would conflict with it)."""
        if con is not None:
            self._apply_status(con, provider, status)
            return self._get(con, provider, status.export_id)
        with self.warehouse.transaction() as own:
            self._apply_status(own, provider, status)
            return self._get(own, provider, status.export_id)

    def apply_statuses(self, provider: str, statuses: Sequence[ExportStatus]) -> None:
        if not statuses:
            return
        with self.warehouse.transaction() as con:
            self._apply_statuses(con, provider, statuses)

    def _apply_statuses(
        self,
        con: duckdb.DuckDBPyConnection,
        provider: str,
        statuses: Sequence[ExportStatus],
        *,
        count_poll: bool = True,
    ) -> None:
        """:meth:`_apply_status` for many exports in one UPDATE statement.

        A sensor tick applies up to thousands of answers (Mews: 1000 per getAll call); one
        statement per export cost milliseconds each, seconds per tick. The same rules apply:
        an illegal move is ignored (checked in SQL against ALLOWED_TRANSITIONS), and for an
        id that appears twice the last answer counts.
        """
        latest = list({s.export_id: s for s in statuses}.values())
        if not latest:
            return
        polls, now = 1 if count_poll else 0, utcnow()
        if len(latest) == 1:
            # One answer (a request, a poll): its values as parameters. Registering an Arrow
            # table costs more than the UPDATE, and its first use imports pyarrow.dataset.
            s = latest[0]
            source = (
                "(SELECT CAST($4 AS VARCHAR) AS export_id, CAST($5 AS VARCHAR) AS state, "
                "CAST($6 AS VARCHAR) AS provider_status, CAST($7 AS TIMESTAMPTZ) AS expires_at, "
                "CAST($8 AS TIMESTAMPTZ) AS provider_timestamp, "
                "CAST($9 AS BIGINT) AS expected_rows, CAST($10 AS VARCHAR) AS error_code, "
                "CAST($11 AS VARCHAR) AS error_message, CAST($12 AS VARCHAR) AS detail)"
            )
            values = [
                s.export_id,
                s.state.value,
                s.provider_status,
                _aware(s.expires_at),
                _aware(s.provider_timestamp),
                s.expected_rows,
                s.error_code,
                s.error_message,
                json.dumps(dict(s.detail), default=str) if s.detail else None,
            ]
            con.execute(_update_statuses_sql(source), [polls, now, provider, *values])
            return
        rows = pa.table(
            {
                "export_id": pa.array([s.export_id for s in latest], pa.string()),
                "state": pa.array([s.state.value for s in latest], pa.string()),
                "provider_status": pa.array([s.provider_status for s in latest], pa.string()),
                "expires_at": _timestamps([s.expires_at for s in latest]),
                "provider_timestamp": _timestamps([s.provider_timestamp for s in latest]),
                "expected_rows": pa.array([s.expected_rows for s in latest], pa.int64()),
                "error_code": pa.array([s.error_code for s in latest], pa.string()),
                "error_message": pa.array([s.error_message for s in latest], pa.string()),
                "detail": pa.array(
                    [json.dumps(dict(s.detail), default=str) if s.detail else None for s in latest],
                    pa.string(),
                ),
            }
        )
        with _registered(con, rows) as view:
            con.execute(_update_statuses_sql(view), [polls, now, provider])

    def _apply_status(
        self,
        con: duckdb.DuckDBPyConnection,
        provider: str,
        status: ExportStatus,
        *,
        count_poll: bool = True,
    ) -> None:
        self._apply_statuses(con, provider, [status], count_poll=count_poll)

    def record_error(
        self,
        provider: str,
        export_id: str,
        *,
        code: str | None,
        message: str,
        state: ExportState | None = None,
        replaced_by: str | None = None,
        count_attempt: bool = True,
    ) -> None:
        """Note a failed attempt (and optionally a terminal state) without touching data.

        ``count_attempt=False`` for refusals that are not a failed ingest (not ready yet)."""
        with self.warehouse.transaction() as con:
            current = self._get(con, provider, export_id)
            if current is None:
                return
            new_state = state if state and can_transition(current.state, state) else current.state
            con.execute(
                f"UPDATE {LEDGER_SCHEMA}.exports SET attempts = attempts + ?, error_code = ?, "
                "error_message = ?, state = ?, replaced_by = coalesce(?, replaced_by), "
                "updated_at = ? WHERE provider = ? AND export_id = ?",
                [
                    1 if count_attempt else 0,
                    code,
                    message[:2000],
                    new_state.value,
                    replaced_by,
                    utcnow(),
                    provider,
                    export_id,
                ],
            )

    # -- poison budget, abandon ----------------------------------------------------------

    def record_permanent_failure(
        self,
        provider: str,
        export_id: str,
        *,
        code: str,
        message: str,
        budget: int,
        owner: str | None = None,
    ) -> ExportRecord | None:
        """Count a failure that another attempt at the same export cannot fix by itself (parse,
        integrity, a link still dead after fresh ones). At ``budget`` such failures the export
        is retired (FAILED, with the reason), so the next run requests a new one instead of
        adopting it again. Releases ``owner``'s lease in the same transaction."""
        with self.warehouse.transaction() as con:
            current = self._get(con, provider, export_id)
            if current is None:
                return None
            failures = current.permanent_failures + 1
            retire = failures >= budget and can_transition(current.state, ExportState.FAILED)
            text = message[:2000]
            if retire:
                text = f"retired after {failures} permanent failure(s) (budget {budget}): {text}"
            con.execute(
                f"UPDATE {LEDGER_SCHEMA}.exports SET attempts = attempts + 1, "
                "permanent_failures = ?, error_code = ?, error_message = ?, state = ?, "
                "lease_owner = CASE WHEN lease_owner = ? THEN NULL ELSE lease_owner END, "
                "lease_expires_at = CASE WHEN lease_owner = ? THEN NULL "
                "ELSE lease_expires_at END, updated_at = ? WHERE provider = ? AND export_id = ?",
                [
                    failures,
                    code,
                    text[:2000],
                    (ExportState.FAILED if retire else current.state).value,
                    owner,
                    owner,
                    utcnow(),
                    provider,
                    export_id,
                ],
            )
            return self._get(con, provider, export_id)

    def abandon(self, provider: str, export_id: str, *, reason: str = "") -> ExportRecord:
        """An operator gives up on an export on purpose: it becomes FAILED (``ABANDONED``) and
        its lease is released, so no run adopts it again and the next one requests anew."""
        with self.warehouse.transaction() as con:
            current = self._get(con, provider, export_id)
            if current is None:
                raise KeyError(f"no {provider} export {export_id!r} in the ledger")
            if current.state is ExportState.LOADED:
                raise ValueError(
                    f"{provider} export {export_id} is already loaded; there is nothing to abandon"
                )
            con.execute(
                f"UPDATE {LEDGER_SCHEMA}.exports SET state = 'failed', error_code = 'ABANDONED', "
                "error_message = ?, lease_owner = NULL, lease_expires_at = NULL, updated_at = ? "
                "WHERE provider = ? AND export_id = ?",
                [
                    f"abandoned by an operator{': ' + reason if reason else ''}"[:2000],
                    utcnow(),
                    provider,
                    export_id,
                ],
            )
            record = self._get(con, provider, export_id)
        assert record is not None
        return record

    # -- lease: one run at a time works on an export ----------------------------------

    def claim(
        self,
        provider: str,
        export_id: str,
        owner: str,
        *,
        ttl_seconds: float,
        is_dead: Callable[[str], bool] | None = None,
        con: duckdb.DuckDBPyConnection | None = None,
    ) -> Lease:
        """Take (or renew) the lease on an export for ``owner``, unless another owner holds it.

        A lease whose expiry has passed, or whose owner ``is_dead`` says died, is taken over.
        The check and the write are one transaction: DuckDB lets one process write at a time,
        so two runs never both get the lease. With ``con``, in the caller's open transaction
        (committed, or rolled back, with it).
        """
        if con is not None:
            return self._claim(con, provider, export_id, owner, ttl_seconds, is_dead)
        for attempt in range(20):
            try:
                with self.warehouse.transaction() as con:
                    return self._claim(con, provider, export_id, owner, ttl_seconds, is_dead)
            except duckdb.TransactionException:
                # Two threads of one process claimed at once; the loser asks again.
                time.sleep(0.01 * (attempt + 1))
        raise RuntimeError(f"could not claim {provider} export {export_id}: write conflicts")

    def _claim(
        self,
        con: duckdb.DuckDBPyConnection,
        provider: str,
        export_id: str,
        owner: str,
        ttl_seconds: float,
        is_dead: Callable[[str], bool] | None,
    ) -> Lease:
        row = con.execute(
            f"SELECT lease_owner, lease_expires_at FROM {LEDGER_SCHEMA}.exports "
            "WHERE provider = ? AND export_id = ?",
            [provider, export_id],
        ).fetchone()
        if row is None:
            raise KeyError(f"no {provider} export {export_id!r} in the ledger")
        holder, expires = row[0], _aware(row[1])
        now = utcnow()
        previous = None
        if holder and holder != owner:
            expired = expires is None or expires <= now
            if not expired and not (is_dead is not None and is_dead(holder)):
                return Lease(granted=False, owner=holder, expires_at=expires)
            previous = holder
        until = now + timedelta(seconds=ttl_seconds)
        con.execute(
            f"UPDATE {LEDGER_SCHEMA}.exports SET lease_owner = ?, lease_expires_at = ? "
            "WHERE provider = ? AND export_id = ?",
            [owner, until, provider, export_id],
        )
        return Lease(granted=True, owner=owner, expires_at=until, taken_over_from=previous)

    def release(self, provider: str, export_id: str, owner: str) -> None:
        """Give the lease back (only ``owner``'s own lease; someone else's is left alone)."""
        with self.warehouse.transaction() as con:
            con.execute(
                f"UPDATE {LEDGER_SCHEMA}.exports SET lease_owner = NULL, lease_expires_at = NULL "
                "WHERE provider = ? AND export_id = ? AND lease_owner = ?",
                [provider, export_id, owner],
            )

    def release_run(self, run_id: str) -> list[tuple[str, str]]:
        """Release every lease a (dead) run holds; returns the (provider, export_id) freed."""
        with self.warehouse.transaction() as con:
            freed = con.execute(
                f"SELECT provider, export_id FROM {LEDGER_SCHEMA}.exports "
                "WHERE lease_owner = ? OR starts_with(lease_owner, ?)",
                [run_id, f"{run_id}@"],
            ).fetchall()
            con.execute(
                f"UPDATE {LEDGER_SCHEMA}.exports SET lease_owner = NULL, lease_expires_at = NULL "
                "WHERE lease_owner = ? OR starts_with(lease_owner, ?)",
                [run_id, f"{run_id}@"],
            )
        return [(p, e) for p, e in freed]

    def is_loaded(self, con: duckdb.DuckDBPyConnection, provider: str, export_id: str) -> bool:
        row = con.execute(
            f"SELECT state FROM {LEDGER_SCHEMA}.exports WHERE provider = ? AND export_id = ?",
            [provider, export_id],
        ).fetchone()
        return bool(row and row[0] == ExportState.LOADED.value)

    def mark_loaded(
        self,
        con: duckdb.DuckDBPyConnection,
        kind: ExportKind,
        export_id: str,
        *,
        rows: int,
        bytes_downloaded: int,
        raw_uri: str | None,
        parquet_uri: str | None,
        files: Sequence[dict[str, Any]],
        cursor_value: datetime | None,
        partition_key: str = "",
    ) -> None:
        """Inside the load transaction: the export becomes LOADED and the cursor moves forward.

        ``partition_key`` is the partition the rows were loaded into; it is written to the export
        too, because a run may load an export into another partition than the ledger first
        guessed (a user's run names the partition; the load checked every row against it).
        """
        now = utcnow()
        con.execute(
            f"UPDATE {LEDGER_SCHEMA}.exports SET state = 'loaded', rows_loaded = ?, "
            "bytes_downloaded = ?, loaded_at = ?, raw_uri = ?, parquet_uri = ?, "
            "partition_key = ?, attempts = attempts + 1, error_code = NULL, "
            "error_message = NULL, lease_owner = NULL, lease_expires_at = NULL, "
            "updated_at = ? WHERE provider = ? AND export_id = ?",
            [
                rows,
                bytes_downloaded,
                now,
                raw_uri,
                parquet_uri,
                partition_key,
                now,
                kind.provider,
                export_id,
            ],
        )
        con.execute(
            f"DELETE FROM {LEDGER_SCHEMA}.export_files WHERE provider = ? AND export_id = ?",
            [kind.provider, export_id],
        )
        for f in files:
            con.execute(
                f"INSERT INTO {LEDGER_SCHEMA}.export_files VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    kind.provider,
                    export_id,
                    f["name"],
                    f.get("announced_bytes"),
                    f.get("size_bytes"),
                    f.get("sha256"),
                    f.get("rows"),
                ],
            )
        # The cursor never moves backwards: an older export loaded late must not rewind it.
        # MERGE, not ON CONFLICT: a DuckLake ledger has no primary key.
        con.execute(
            f"MERGE INTO {LEDGER_SCHEMA}.cursors AS cursors USING (SELECT ? AS provider, "
            "? AS kind, ? AS partition_key, CAST(? AS TIMESTAMPTZ) AS cursor_value, "
            "? AS export_id, CAST(? AS TIMESTAMPTZ) AS updated_at) AS excluded "
            "ON cursors.provider = excluded.provider AND cursors.kind = excluded.kind "
            "AND cursors.partition_key = excluded.partition_key "
            "WHEN MATCHED THEN UPDATE SET "
            "cursor_value = CASE WHEN excluded.cursor_value IS NULL THEN cursors.cursor_value "
            "WHEN cursors.cursor_value IS NULL OR excluded.cursor_value > cursors.cursor_value "
            "THEN excluded.cursor_value ELSE cursors.cursor_value END, "
            "export_id = CASE WHEN excluded.cursor_value IS NULL "
            "OR cursors.cursor_value IS NULL OR excluded.cursor_value >= cursors.cursor_value "
            "THEN excluded.export_id ELSE cursors.export_id END, "
            "updated_at = excluded.updated_at "
            "WHEN NOT MATCHED THEN INSERT (provider, kind, partition_key, cursor_value, "
            "export_id, updated_at) VALUES (excluded.provider, excluded.kind, "
            "excluded.partition_key, excluded.cursor_value, excluded.export_id, "
            "excluded.updated_at)",
            [kind.provider, kind.name, partition_key, cursor_value, export_id, now],
        )


# "from>to" for every legal state change, as a SQL list (the values are our own enum words).
_ALLOWED_MOVES = ", ".join(
    sorted(f"'{a.value}>{b.value}'" for a, targets in ALLOWED_TRANSITIONS.items() for b in targets)
)


def _update_statuses_sql(source: str) -> str:
    """The UPDATE applying the answers in ``source`` (a relation with the columns of
    :meth:`Ledger._apply_statuses`). Parameters: $1 the polls increment, $2 now, $3 the
    provider; ``source``'s own from $4."""
    return (
        f"UPDATE {LEDGER_SCHEMA}.exports AS e SET state = s.state, "
        "provider_status = s.provider_status, "
        "expires_at = coalesce(s.expires_at, e.expires_at), "
        "provider_timestamp = coalesce(s.provider_timestamp, e.provider_timestamp), "
        "expected_rows = coalesce(s.expected_rows, e.expected_rows), "
        "error_code = coalesce(s.error_code, e.error_code), "
        "error_message = coalesce(s.error_message, e.error_message), "
        "detail = coalesce(CAST(s.detail AS JSON), e.detail), "
        "polls = e.polls + $1, updated_at = $2 "
        f"FROM {source} AS s WHERE e.provider = $3 AND e.export_id = s.export_id "
        f"AND e.state || '>' || s.state IN ({_ALLOWED_MOVES})"
    )


def _timestamps(values: Sequence[datetime | None]) -> pa.Array:
    """Aware datetimes as an Arrow TIMESTAMPTZ column (naive ones are taken as UTC)."""
    return pa.array([_aware(v) for v in values], pa.timestamp("us", tz="UTC"))


@contextmanager
def _registered(con: duckdb.DuckDBPyConnection, rows: pa.Table) -> Iterator[str]:
    """``rows`` visible to SQL under a unique name for the duration of the block."""
    name = f"_ledger_rows_{uuid.uuid4().hex[:12]}"
    con.register(name, rows)
    try:
        yield name
    finally:
        con.unregister(name)


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
