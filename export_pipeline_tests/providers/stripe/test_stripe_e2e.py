"""Stripe end to end through the real core: request -> poll -> download (with the secret key,
from the file host) -> Parquet -> DuckDB, then an increment from the provider's own cursor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from export_pipeline.core.errors import ExportFailedError
from export_pipeline.core.ingest import ExportRunner, IngestSettings
from export_pipeline.core.ledger import Ledger, Warehouse
from export_pipeline.core.model import ExportRequest
from export_pipeline.core.storage import LocalStorage
from export_pipeline.core.windows import IncrementalSettings, next_request
from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.sandbox.stripe import StripeSandbox
from export_pipeline_tests.providers.stripe.conftest import FAST_RETRY


@pytest.fixture
def runner(stripe: SpecProvider, tmp_path: Path) -> Iterator[ExportRunner]:
    yield ExportRunner(
        stripe,
        Ledger(Warehouse(tmp_path / "w.duckdb")),
        LocalStorage(tmp_path / "data"),
        IngestSettings(poll_initial_seconds=0.02, retry=FAST_RETRY),
    )


def _table(runner: ExportRunner) -> list[tuple]:
    with runner.ledger.warehouse.connect() as con:
        return con.execute(
            "SELECT count(*), count(DISTINCT balance_transaction_id), min(created_utc), "
            "sum(net) FROM stripe.balance_change_from_activity"
        ).fetchall()


def test_full_then_incremental_sync(
    runner: ExportRunner, stripe_sandbox: StripeSandbox, tmp_path: Path
) -> None:
    state = stripe_sandbox.state
    kind = runner.provider.kind("balance_change_from_activity")
    first = runner.sync(kind, ExportRequest())
    assert first.rows == 300 and not first.skipped
    assert first.cursor is not None and int(first.cursor.timestamp()) == state.data_available_end
    # The file came from the file host with the secret key; the key went nowhere else.
    file_calls = [c for c in state.calls if c[1].startswith("/v1/files/")]
    assert file_calls and all(auth == f"Bearer {state.token}" for _, _, auth in file_calls)

    count, distinct, _first, net = _table(runner)[0]
    assert (count, distinct) == (300, 300)
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        types = dict(
            con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'stripe' AND table_name = 'balance_change_from_activity'"
            ).fetchall()
        )
    assert types["net"] == "DECIMAL(18,2)" and types["created_utc"] == "TIMESTAMP WITH TIME ZONE"
    assert types["description"] == "VARCHAR"
    expected_net = sum(float(r[6]) for r in state.rows_between(0, state.data_available_end))
    assert float(net) == pytest.approx(expected_net)

    # Stripe prepares 50 more transactions; the next request starts at the cursor - overlap.
    state.make_available(50)
    with runner.ledger.warehouse.connect() as con:
        cursor = con.execute("SELECT max(cursor_value) FROM pipeline.cursors").fetchone()[0]
    request = next_request(kind, cursor, now=first.cursor, settings=IncrementalSettings())
    assert request is not None and request.window_end is None
    second = runner.sync(kind, request)
    # [cursor - 5 min overlap, new data_available_end): one transaction every 10 minutes, so
    # exactly the 50 new ones (the first of them stamped at the old data_available_end).
    assert second.rows == 50
    assert request.modified_since is not None
    assert stripe_sandbox.state.runs[second.export_id].interval_start == int(
        request.modified_since.timestamp()
    )
    assert _table(runner)[0][:2] == (350, 350)
    assert int(second.cursor.timestamp()) == state.data_available_end


def test_a_failed_run_loads_nothing(runner: ExportRunner, stripe_sandbox: StripeSandbox) -> None:
    stripe_sandbox.state.fail_next_runs = 1
    kind = runner.provider.kind("balance_change_from_activity")
    with pytest.raises(ExportFailedError, match="could not be generated"):
        runner.sync(kind, ExportRequest())
    with runner.ledger.warehouse.connect() as con:
        assert con.execute("SELECT count(*) FROM pipeline.cursors").fetchone()[0] == 0
        states = con.execute("SELECT state FROM pipeline.exports").fetchall()
    assert states == [("failed",)]
