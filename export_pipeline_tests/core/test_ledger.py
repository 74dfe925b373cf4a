"""The one state machine and the ledger that records it, without a provider or Dagster: pure
transitions, then the ledger on a real DuckDB file (single and batched status answers follow
the same rules, the cursor, leases)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from export_pipeline.core.ledger import Ledger
from export_pipeline.core.model import (
    ALLOWED_TRANSITIONS,
    ExportKind,
    ExportRequest,
    ExportState,
    ExportStatus,
    Incremental,
    can_transition,
)
from export_pipeline.core.warehouse import DuckDBWarehouse

S = ExportState
KIND = ExportKind("acme", "orders", ("id",), incremental=Incremental.MODIFIED_SINCE)
T0 = datetime(2026, 1, 1, tzinfo=UTC)

# -- the state machine (pure) -----------------------------------------------------------------


@pytest.mark.parametrize("terminal", [S.LOADED, S.FAILED, S.EXPIRED, S.LOST])
def test_nothing_leaves_a_terminal_state(terminal: ExportState) -> None:
    assert terminal.is_terminal and not terminal.is_open
    assert [s for s in ExportState if can_transition(terminal, s)] == [terminal]


def test_only_a_ready_export_can_be_loaded() -> None:
    assert [s for s in ExportState if can_transition(s, S.LOADED)] == [S.READY, S.LOADED]


def test_providers_may_skip_steps_forward_but_never_go_back() -> None:
    assert can_transition(S.PENDING, S.READY)  # PENDING -> READY in one poll
    assert can_transition(S.PENDING, S.FAILED)
    assert not can_transition(S.PROCESSING, S.PENDING)
    assert not can_transition(S.READY, S.PROCESSING)
    assert not can_transition(S.READY, S.PENDING)
    # Every state is in the table, and every open state may end in each terminal one but LOADED.
    assert set(ALLOWED_TRANSITIONS) == set(ExportState)
    for state in (S.PENDING, S.PROCESSING, S.READY):
        assert {S.FAILED, S.EXPIRED, S.LOST} <= ALLOWED_TRANSITIONS[state]


# -- the ledger ---------------------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(DuckDBWarehouse(tmp_path / "w.duckdb", publish_reads=False))


def _status(export_id: str, state: ExportState, **kw: object) -> ExportStatus:
    return ExportStatus(export_id=export_id, state=state, **kw)  # type: ignore[arg-type]


def test_a_request_is_recorded_once_with_its_window(ledger: Ledger) -> None:
    request = ExportRequest(modified_since=T0, params={"format": "csv"})
    first = ledger.record_request(KIND, request, _status("e1", S.PENDING), source="run")
    again = ledger.record_request(KIND, ExportRequest(), _status("e1", S.PROCESSING), source="x")

    assert (first.state, first.source, first.modified_since) == (S.PENDING, "run", T0)
    # The same id again keeps the first request and takes the new status.
    assert (again.state, again.source, again.modified_since) == (S.PROCESSING, "run", T0)
    assert again.request_params == {"format": "csv"}


@pytest.mark.parametrize("batched", [False, True])
def test_status_answers_follow_the_state_machine(ledger: Ledger, batched: bool) -> None:
    ledger.record_request(KIND, ExportRequest(), _status("e1", S.PENDING), source="run")

    def apply(status: ExportStatus) -> ExportState:
        if batched:
            # Two answers take the batched (Arrow) path; one takes the single-answer path.
            ledger.apply_statuses("acme", [status, _status("unknown", S.READY)])
        else:
            ledger.apply_status("acme", status)
        record = ledger.get("acme", "e1")
        assert record is not None
        return record.state

    expires = T0 + timedelta(hours=1)
    assert apply(_status("e1", S.READY, expires_at=expires, expected_rows=7)) is S.READY
    assert apply(_status("e1", S.PENDING)) is S.READY  # a stale answer is ignored
    assert apply(_status("e1", S.EXPIRED, error_code="GONE")) is S.EXPIRED
    assert apply(_status("e1", S.READY)) is S.EXPIRED  # terminal stays terminal
    record = ledger.get("acme", "e1")
    assert record is not None
    # Fields the provider stopped sending keep their last value (coalesce), errors are kept.
    assert (record.expires_at, record.expected_rows, record.error_code) == (expires, 7, "GONE")


def test_an_older_ledger_gains_the_columns_added_since(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    with duckdb.connect(str(path)) as con:  # the first release's exports table, one row
        con.execute(
            "CREATE SCHEMA pipeline; CREATE TABLE pipeline.exports (provider VARCHAR NOT NULL, "
            "kind VARCHAR NOT NULL, export_id VARCHAR NOT NULL, partition_key VARCHAR NOT NULL "
            "DEFAULT '', state VARCHAR NOT NULL, provider_status VARCHAR, modified_since "
            "TIMESTAMPTZ, window_end TIMESTAMPTZ, request_params JSON, source VARCHAR, "
            "requested_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL, polls INTEGER "
            "NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, expires_at TIMESTAMPTZ, "
            "provider_timestamp TIMESTAMPTZ, expected_rows BIGINT, rows_loaded BIGINT, "
            "bytes_downloaded BIGINT, loaded_at TIMESTAMPTZ, raw_uri VARCHAR, parquet_uri "
            "VARCHAR, error_code VARCHAR, error_message VARCHAR, replaced_by VARCHAR, detail "
            "JSON, PRIMARY KEY (provider, export_id)); INSERT INTO pipeline.exports (provider, "
            "kind, export_id, state, requested_at, updated_at) VALUES ('acme', 'orders', 'old', "
            "'pending', now(), now())"
        )
    ledger = Ledger(DuckDBWarehouse(path, publish_reads=False))

    old = ledger.get("acme", "old")
    assert old is not None and (old.state, old.permanent_failures, old.lease_owner) == (
        S.PENDING,
        0,
        None,
    )
    with duckdb.connect(str(path), read_only=True) as con:
        tables = con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'pipeline' ORDER BY 1"
        ).fetchall()
    assert tables == [("cursors",), ("export_files",), ("exports",)]
    assert ledger.claim("acme", "old", "run-1", ttl_seconds=60).granted


def test_a_batch_with_one_id_twice_takes_the_last_answer(ledger: Ledger) -> None:
    for i in ("a", "b"):
        ledger.record_request(KIND, ExportRequest(), _status(i, S.PENDING), source="run")

    ledger.apply_statuses(
        "acme", [_status("a", S.PROCESSING), _status("b", S.FAILED), _status("a", S.READY)]
    )

    states = {r.export_id: r.state for r in ledger.open_exports("acme")}
    assert states == {"a": S.READY}
    assert ledger.get("acme", "b").state is S.FAILED  # type: ignore[union-attr]


def test_polls_are_counted_but_the_request_itself_is_not(ledger: Ledger) -> None:
    ledger.record_request(KIND, ExportRequest(), _status("e1", S.PENDING), source="run")
    ledger.apply_status("acme", _status("e1", S.PROCESSING))
    ledger.apply_statuses("acme", [_status("e1", S.PROCESSING)])

    assert ledger.get("acme", "e1").polls == 2  # type: ignore[union-attr]


def test_an_unknown_id_is_not_invented_by_a_status(ledger: Ledger) -> None:
    assert ledger.apply_status("acme", _status("nobody", S.READY)) is None
    assert ledger.get("acme", "nobody") is None


def test_the_cursor_starts_empty(ledger: Ledger) -> None:
    assert ledger.cursor("acme", "orders") is None
    assert ledger.last_loaded("acme", "orders") is None
