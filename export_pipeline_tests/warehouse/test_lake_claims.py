"""Two runs in two processes claim and load the same provider's exports on one DuckLake lake
(SQLite catalog here; test_lake_claims_on_postgres runs the same on a PostgreSQL catalog):
each export is loaded by exactly one of them, the other waits or moves on, nothing is loaded
twice, and the cursor and the ledger agree with what landed."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from export_pipeline.core.ingest import ExportRunner, IngestSettings
from export_pipeline.core.ledger import Ledger
from export_pipeline.core.model import ExportRequest
from export_pipeline.core.storage import LocalStorage
from export_pipeline.core.warehouse import DuckLakeWarehouse, close_lakes
from export_pipeline.providers.locations import LOCATIONS
from export_pipeline_tests.providers.locations.conftest import (  # noqa: F401  (fixture)
    FAST_RETRY,
    N_LOCATIONS,
    LocationsSandbox,
    locations_sandbox,
)
from export_pipeline_tests.warehouse.lake_workers import claimant

JSON = ExportRequest(params={"format": "json"})


def two_claimants_load_two_exports(
    sandbox: LocationsSandbox, catalog: str, data_path: str, data_dir: Path
) -> None:
    """The scenario, for any catalog: two exports requested, then two processes each ingest
    both (in opposite orders, started together). Asserts everything the module promises."""
    sandbox.state.ready_after_seconds = 0
    lake = DuckLakeWarehouse(catalog, data_path)
    requester = ExportRunner(
        sandbox.provider_with(),
        Ledger(lake),
        LocalStorage(data_dir),
        IngestSettings(poll_initial_seconds=0.02, retry=FAST_RETRY),
    )
    ids = []
    for _ in range(2):
        record, adopted = requester.start(LOCATIONS, JSON, adopt=False)
        assert not adopted
        sandbox.wait(record.export_id)
        ids.append(record.export_id)
    requester.provider.close()

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    out = ctx.Queue()
    orders = {"run-a": ids, "run-b": ids[::-1]}
    workers = [
        ctx.Process(
            target=claimant,
            args=(
                catalog,
                data_path,
                str(data_dir),
                sandbox.base_url,
                sandbox.state.token,
                order,
                owner,
                start,
                out,
            ),
        )
        for owner, order in orders.items()
    ]
    for worker in workers:
        worker.start()
    reports = [out.get(timeout=240) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert all(status == "ok" for status, _, _ in reports), reports

    outcomes = [(owner, *result) for _, owner, results in reports for result in results]
    for export_id in ids:
        mine = [o for o in outcomes if o[1] == export_id]
        loaded = [o for o in mine if not o[2]]
        skipped = [o for o in mine if o[2]]
        # Exactly one run loaded it (all rows); the other found it loaded, after waiting for
        # the winner's claim or not at all.
        assert len(loaded) == 1 and len(skipped) == 1, outcomes
        assert loaded[0][3] == N_LOCATIONS
        waited_for = skipped[0][4]
        assert waited_for is None or waited_for.startswith(f"{loaded[0][0]}@"), outcomes
    assert sandbox.state.downloads == 2  # each export's file fetched once

    close_lakes()  # read what another process sees
    lake = DuckLakeWarehouse(catalog, data_path)
    ledger = Ledger(lake)
    with lake.connect() as con:
        assert con.execute(
            "SELECT count(*), count(DISTINCT id) FROM locations.locations"
        ).fetchone() == (N_LOCATIONS, N_LOCATIONS)
        rows = con.execute(
            "SELECT export_id, state, rows_loaded, lease_owner FROM pipeline.exports "
            "ORDER BY export_id"
        ).fetchall()
        assert rows == sorted((e, "loaded", N_LOCATIONS, None) for e in ids)
        # One cursor row for the kind, at the newest export's cursor (whichever committed last).
        cursors = con.execute(
            "SELECT cursor_value, export_id FROM pipeline.cursors "
            "WHERE provider = 'locations' AND kind = 'locations'"
        ).fetchall()
    newest = max(o[5] for o in outcomes if not o[2])
    assert len(cursors) == 1 and cursors[0][0] == newest, (cursors, outcomes)
    # One load snapshot per export, each labelled with it: nothing was committed twice.
    loads = [
        s["extra"].get("export_id")
        for s in lake.snapshots()
        if (s["message"] or "").startswith("load ")
    ]
    assert sorted(loads) == sorted(ids)
    assert ledger.cursor("locations", "locations") == cursors[0][0]
    close_lakes()


def test_two_processes_claim_and_load_exports_once_on_a_sqlite_catalog(
    locations_sandbox: LocationsSandbox,  # noqa: F811
    tmp_path: Path,
) -> None:
    two_claimants_load_two_exports(
        locations_sandbox,
        str(tmp_path / "lake" / "catalog.sqlite"),
        str(tmp_path / "lake" / "files"),
        tmp_path / "data",
    )
