"""The CSV header decides deliveries' columns: a full sync over the sandbox (real HTTP, real S3)
whose files have an extra column and lack a declared one."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from export_pipeline.core.checks import values_in_range
from export_pipeline.core.ingest import ExportRunner, IngestSettings
from export_pipeline.core.ledger import Ledger, Warehouse
from export_pipeline.core.storage import LocalStorage
from export_pipeline.sandbox import deliveries as sandbox_module
from export_pipeline_tests.providers.deliveries.conftest import FAST_RETRY, DeliveriesSandbox
from export_pipeline_tests.providers.deliveries.test_deliveries_provider import (
    DAY,
    SANDBOX_POLICY,
    window,
)


def test_extra_and_missing_header_columns(
    deliveries_sandbox: DeliveriesSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = deliveries_sandbox
    kind = sandbox.provider.kind("outbound_messages")
    declared = list(sandbox_module.CSV_COLUMNS["outbound"])
    # The API changed its file: endpoint_url and attempt_count gone, a new "direction" column.
    header = [c for c in declared if c not in ("endpoint_url", "attempt_count")] + ["direction"]
    monkeypatch.setitem(sandbox_module.CSV_COLUMNS, "outbound", tuple(header))
    sandbox.state.add_messages(5, at=DAY, direction="outbound")
    expected = sandbox.state.rows_for("outbound", DAY, DAY + timedelta(days=1))
    runner = ExportRunner(
        sandbox.provider,
        Ledger(Warehouse(tmp_path / "w.duckdb")),
        LocalStorage(tmp_path / "data"),
        IngestSettings(poll_initial_seconds=0.02, retry=FAST_RETRY, url_policy=SANDBOX_POLICY),
    )
    result = runner.sync(kind, window(DAY, DAY + timedelta(days=1)))
    assert result.rows == len(expected) > 5
    assert result.missing_columns == ("attempt_count", "endpoint_url")
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:
        columns = [r[0] for r in con.execute("DESCRIBE deliveries.outbound_messages").fetchall()]
        assert "direction" in columns
        assert "endpoint_url" not in columns and "attempt_count" not in columns
        directions = con.execute(
            "SELECT DISTINCT direction FROM deliveries.outbound_messages"
        ).fetchall()
        assert directions == [("outbound",)]
        # The blocking range check passes: a column the files lack is reported, not failed.
        outcome = values_in_range(con, kind)
        assert outcome.passed, outcome.description
        assert "attempt_count" in outcome.metadata["columns_absent"]
