"""Schema and lineage before the first run, and the same words in DuckDB (issue 14)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb

from export_pipeline.definitions import BINDINGS, build_defs
from export_pipeline.providers.column_docs import tables_markdown
from export_pipeline_tests.dagster.conftest import DagsterSetup

REPO = Path(__file__).resolve().parents[2]


def test_every_asset_has_a_described_column_schema_before_any_run() -> None:
    with dg.instance_for_test():  # Definitions load under a live instance (test_definitions)
        specs = {s.key.to_user_string(): s for s in build_defs().resolve_all_asset_specs()}
    for binding in BINDINGS:
        for kind in binding.kinds:
            schema = specs[kind.key].metadata["dagster/column_schema"]
            described = {c.name: c.description for c in schema.columns}
            # Every declared column is there with words; so are the lineage columns.
            for name in kind.columns or {}:
                assert described.get(name), (kind.key, name)
            assert described.get("_export_id"), kind.key
            assert "Id" in described or kind.columns, kind.key
    for view in ("evses", "connectors"):
        spec = specs[f"locations/{view}"]
        assert [d.asset_key for d in spec.deps] == [dg.AssetKey(["locations", "locations"])]
        assert all(c.description for c in spec.metadata["dagster/column_schema"].columns)


def test_docs_tables_md_is_generated_from_the_code() -> None:
    assert (REPO / "docs" / "tables.md").read_text() == tables_markdown(), (
        "docs/tables.md is stale: python -m export_pipeline.providers.column_docs > docs/tables.md"
    )


def test_load_writes_comments_and_views_report_rows(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    result = setup.job("locations_sync").execute_in_process(instance=setup.instance)
    assert result.success
    with duckdb.connect(str(setup.warehouse_path), read_only=True) as con:
        comments = dict(
            con.execute(
                "SELECT table_name || '.' || column_name, comment FROM duckdb_columns() "
                "WHERE schema_name = 'locations'"
            ).fetchall()
        )
        evses = con.execute("SELECT count(*) FROM locations.evses").fetchone()[0]
        table = con.execute(
            "SELECT comment FROM duckdb_tables() WHERE schema_name = 'locations'"
        ).fetchone()[0]
    assert comments["locations.last_updated"].startswith("When the operator last changed")
    assert comments["evses.evse_uid"] == "EVSE uid, unique within the operator."
    assert table and table.startswith("Charging locations")
    # The view assets ran in the same job, after the table, and report their rows.
    mats = {
        m.asset_key.to_user_string(): m
        for m in result.get_asset_materialization_events()
        for m in [m.event_specific_data.materialization]
    }
    assert mats["locations/evses"].metadata["dagster/row_count"].value == evses > 0
    table_mat = mats["locations/locations"].metadata
    assert table_mat["dagster/row_count"].value == 300 == table_mat["rows"].value
