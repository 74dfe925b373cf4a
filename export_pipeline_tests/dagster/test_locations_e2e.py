"""The spine end to end: Dagster's real APIs -> sandbox over HTTP -> Parquet -> DuckDB on disk."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from export_pipeline.core.model import ExportRequest, ExportState
from export_pipeline.definitions import BINDINGS
from export_pipeline.defs.assets import make_runner
from export_pipeline_tests.dagster.conftest import DagsterSetup


@pytest.fixture
def simulators() -> tuple[str, ...]:
    return ("locations",)  # the sandbox starts only these


LOCATIONS = next(b for b in BINDINGS if b.name == "locations")
KIND = LOCATIONS.kinds[0]


def materialize(setup: DagsterSetup, config: dict | None = None, raise_on_error: bool = True):
    """Run the project's real `locations_sync` job (asset + its checks) in process."""
    return setup.job("locations_sync").execute_in_process(
        run_config={"ops": {"locations__locations": {"config": config or {}}}},
        instance=setup.instance,
        raise_on_error=raise_on_error,
    )


def query(setup: DagsterSetup, sql: str, params: list | None = None):
    with setup.resources["warehouse"].warehouse().connect(read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


# The same end-to-end tests on both warehouse backends (the embedded file and DuckLake).
both_backends = pytest.mark.parametrize("warehouse_backend", ["duckdb", "ducklake"])


def ledger_rows(setup: DagsterSetup):
    return query(
        setup,
        "SELECT export_id, state, modified_since, provider_timestamp, rows_loaded, error_code "
        "FROM pipeline.exports ORDER BY requested_at",
    )


@both_backends
def test_full_then_incremental_sync(dagster_setup: DagsterSetup, warehouse_backend: str) -> None:
    setup = dagster_setup
    result = materialize(setup)
    assert result.success
    n = 300  # the sandbox fixture's size
    assert query(setup, "SELECT count(*) FROM locations.locations")[0][0] == n
    first = ledger_rows(setup)
    assert len(first) == 1 and first[0][1] == "loaded" and first[0][2] is None  # full export
    checks = setup.run_checks(result).get_asset_check_evaluations()
    assert {c.check_name for c in checks} == {"rows_match_provider", "primary_key_unique"}
    assert all(c.passed for c in checks)

    # Metadata a user wants to see on the materialization.
    mat = result.asset_materializations_for_node("locations__locations")[0]
    for key in (
        "export_id",
        "rows",
        "bytes",
        "duration_seconds",
        "format",
        "parquet_path",
        "dagster/column_schema",
        "preview",
    ):
        assert key in mat.metadata, key
    assert mat.metadata["rows"].value == n
    if warehouse_backend == "ducklake":  # the load's snapshot, for time travel
        first_snapshot = mat.metadata["lake_snapshot_id"].value
        assert (
            first_snapshot
            == query(
                setup,
                "SELECT max(snapshot_id) FROM lake.snapshots() "
                "WHERE json_extract_string(commit_extra_info, '$.export_id') = ?",
                [mat.metadata["export_id"].value],
            )[0][0]
        )

    # The provider changes data: some locations updated, some added.
    before = dict(query(setup, "SELECT id, last_updated FROM locations.locations"))
    setup.sandbox.locations.mutate(updated=20, added=7)
    result = materialize(setup)
    assert result.success
    rows = ledger_rows(setup)
    assert len(rows) == 2 and rows[1][1] == "loaded"
    # The incremental request started at the provider's timestamp of the first export minus overlap.
    overlap = timedelta(seconds=300)
    assert rows[1][2] == first[0][3] - overlap
    # Updated rows replaced, new rows added, nothing duplicated.
    assert query(setup, "SELECT count(*) FROM locations.locations")[0][0] == n + 7
    assert (
        query(
            setup,
            "SELECT count(*) FROM (SELECT country_code, party_id, id FROM locations.locations "
            "GROUP BY ALL HAVING count(*) > 1)",
        )[0][0]
        == 0
    )
    after = dict(query(setup, "SELECT id, last_updated FROM locations.locations"))
    changed = [i for i in before if after[i] != before[i]]
    assert len(changed) == 20
    second_export = rows[1][0]
    assert (
        query(
            setup, "SELECT count(*) FROM locations.locations WHERE _export_id = ?", [second_export]
        )[0][0]
        == rows[1][4]
        == 27
    )
    # The cursor is the provider's exportTimestamp of the last loaded export.
    cursor = query(setup, "SELECT cursor_value, export_id FROM pipeline.cursors")
    assert cursor == [(rows[1][3], second_export)]
    # Analyst views unnest the nested structure.
    evses = query(setup, "SELECT count(*) FROM locations.evses")[0][0]
    connectors = query(setup, "SELECT count(*) FROM locations.connectors")[0][0]
    assert evses >= n + 7 and connectors >= evses
    if warehouse_backend == "ducklake":  # time travel: the table as the first export left it
        assert query(
            setup, f"SELECT count(*) FROM locations.locations AT (VERSION => {first_snapshot})"
        ) == [(n,)]


def test_json_and_csv_give_the_same_table(dagster_setup: DagsterSetup, tmp_path) -> None:
    setup = dagster_setup
    assert materialize(setup, {"format": "json"}).success
    cols = "* EXCLUDE (_export_id, _source_file, _loaded_at)"
    json_rows = query(setup, f"SELECT {cols} FROM locations.locations ORDER BY id")
    json_types = query(
        setup,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'locations' AND table_name = 'locations' ORDER BY ordinal_position",
    )
    assert materialize(setup, {"format": "csv", "full_refresh": True}).success
    csv_rows = query(setup, f"SELECT {cols} FROM locations.locations ORDER BY id")
    assert csv_rows == json_rows
    formats = query(setup, "SELECT request_params FROM pipeline.exports ORDER BY requested_at")
    assert ["json" in f[0] for f in formats] == [True, False]
    assert json_types == query(
        setup,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'locations' AND table_name = 'locations' ORDER BY ordinal_position",
    )


@both_backends
def test_sensor_launches_one_run_per_ready_export(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    setup.sandbox.locations.ready_after_seconds = 3600  # stays PENDING
    with dg.build_resources(setup.for_provider("locations")) as res:
        r = make_runner(res, LOCATIONS)
        record, adopted = r.start(KIND, ExportRequest(), source="test")
        assert not adopted
        sensor = setup.defs.resolve_sensor_def("locations_exports_sensor")

        ctx = dg.build_sensor_context(
            instance=setup.instance,
            resources=setup.for_provider("locations"),
            definitions=setup.defs,
        )
        result = sensor.evaluate_tick(ctx)
        assert result.run_requests == []  # pending: nothing to launch

        setup.sandbox.locations.ready_after_seconds = 0
        ctx = dg.build_sensor_context(
            instance=setup.instance,
            resources=setup.for_provider("locations"),
            definitions=setup.defs,
        )
        result = sensor.evaluate_tick(ctx)
        assert [rr.run_key for rr in result.run_requests] == [f"locations:{record.export_id}"]
        rr = result.run_requests[0]
        assert rr.asset_selection == [dg.AssetKey(["locations", "locations"])]
        config = rr.run_config["ops"]["locations__locations"]["config"]
        assert config["export_id"] == record.export_id

        # Run exactly what the sensor asked for; afterwards the export is no longer open.
        assert materialize(setup, config).success
        ctx = dg.build_sensor_context(
            instance=setup.instance,
            resources=setup.for_provider("locations"),
            definitions=setup.defs,
        )
        assert sensor.evaluate_tick(ctx).run_requests == []
        assert r.ledger.get("locations", record.export_id).state is ExportState.LOADED


def test_sensor_batches_and_stays_bounded(dagster_setup: DagsterSetup) -> None:
    """Many open exports: every one is polled once per tick, ready ones launched once each."""
    setup = dagster_setup
    setup.sandbox.locations.ready_after_seconds = 0
    with dg.build_resources(setup.for_provider("locations")) as res:
        r = make_runner(res, LOCATIONS)
        ids = [r.start(KIND, ExportRequest(), adopt=False)[0].export_id for _ in range(25)]
    sensor = setup.defs.resolve_sensor_def("locations_exports_sensor")
    result = sensor.evaluate_tick(
        dg.build_sensor_context(
            instance=setup.instance,
            resources=setup.for_provider("locations"),
            definitions=setup.defs,
        )
    )
    assert sorted(rr.run_key for rr in result.run_requests) == sorted(f"locations:{i}" for i in ids)
    assert "polled=25" in result.cursor


def test_schedule_carries_modified_since_from_the_cursor(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    schedule = setup.defs.resolve_schedule_def("locations_schedule")
    ctx = dg.build_schedule_context(
        instance=setup.instance,
        resources=setup.for_provider("locations"),
        scheduled_execution_time=datetime.now(UTC),
    )
    first = schedule.evaluate_tick(ctx).run_requests[0]
    config = first.run_config["ops"]["locations__locations"]["config"]
    assert config.get("modified_since") is None and config["full_refresh"] is True

    assert materialize(setup).success
    exported_at = query(setup, "SELECT provider_timestamp FROM pipeline.exports")[0][0]
    ctx = dg.build_schedule_context(
        instance=setup.instance,
        resources=setup.for_provider("locations"),
        scheduled_execution_time=datetime.now(UTC),
    )
    request = schedule.evaluate_tick(ctx).run_requests[0]
    config = request.run_config["ops"]["locations__locations"]["config"]

    assert datetime.fromisoformat(config["modified_since"]) == exported_at - timedelta(seconds=300)
    # And a run with that config asks the provider for exactly that modifiedSince.
    assert materialize(setup, config).success
    sent = list(setup.sandbox.locations.requests_by_id.values())[-1]
    assert sent == exported_at - timedelta(seconds=300)


def test_rate_limit_is_waited_out(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    setup.sandbox.locations.rate_limit_next = 2
    setup.sandbox.locations.retry_after_seconds = 1
    assert materialize(setup).success
    assert setup.sandbox.locations.rate_limit_next == 0


def test_expired_link_is_recovered(dagster_setup: DagsterSetup) -> None:
    """A link that is dead when the run gets it is replaced by a fresh one, not fatal."""
    setup = dagster_setup
    locations = setup.sandbox.locations
    locations.ready_after_seconds = 0
    with dg.build_resources(setup.for_provider("locations")) as res:
        r = make_runner(res, LOCATIONS)
        record, _ = r.start(KIND, ExportRequest())
        r.wait_until_ready(KIND, record.export_id, timeout=60)
    # The run's first status answer hands out a link that expired 5 s ago (no sleep racing a
    # short TTL); the next answer, the refresh, a fresh one.
    locations.expired_links_next = 1
    status_path = f"/locations/exports/{record.export_id}"
    calls_before = sum(1 for _, path in locations.calls if path == status_path)
    assert materialize(setup, {"export_id": record.export_id}).success
    assert locations.expired_links_next == 0, "the run never asked for the export's link"
    status_calls = sum(1 for _, path in locations.calls if path == status_path) - calls_before
    assert status_calls >= 2, "the expired link was not refreshed by a second status call"
    assert query(setup, "SELECT state FROM pipeline.exports")[0][0] == "loaded"


def test_failed_export_surfaces_and_commits_nothing(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    assert materialize(setup).success
    count = query(setup, "SELECT count(*) FROM locations.locations")[0][0]
    cursor = query(setup, "SELECT cursor_value FROM pipeline.cursors")
    setup.sandbox.locations.mutate(updated=5, added=5)
    setup.sandbox.locations.fail_next_export = ("EXPORT_GENERATION_FAILED", "disk full")
    result = materialize(setup, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = str(failure.step_failure_data.error.message)
    assert "EXPORT_GENERATION_FAILED" in message and "disk full" in message
    assert query(setup, "SELECT count(*) FROM locations.locations")[0][0] == count
    assert query(setup, "SELECT cursor_value FROM pipeline.cursors") == cursor
    states = query(setup, "SELECT state, error_code FROM pipeline.exports ORDER BY requested_at")
    assert states[-1] == ("failed", "EXPORT_GENERATION_FAILED")


@pytest.mark.parametrize("code", ["INVALID_FORMAT", "INVALID_DATE_RANGE", "EXPORT_SIZE_EXCEEDED"])
def test_provider_error_codes_are_clear_and_not_retried(
    dagster_setup: DagsterSetup, code: str
) -> None:
    setup = dagster_setup
    setup.sandbox.locations.reject_next_request = code
    result = materialize(setup, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert code in failure.step_failure_data.error.message
    # Not retried: exactly one create call reached the provider.
    creates = [c for c in setup.sandbox.locations.calls if c[0] == "POST"]
    assert len(creates) == 1
    assert query(setup, "SELECT count(*) FROM pipeline.exports")[0][0] == 0


def test_wrong_token_names_the_env_var(dagster_setup: DagsterSetup, monkeypatch) -> None:
    setup = dagster_setup
    monkeypatch.setenv("LOCATIONS_API_TOKEN", "wrong")
    result = materialize(setup, raise_on_error=False)
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "LOCATIONS_API_TOKEN" in failure.step_failure_data.error.message
    assert "wrong" not in failure.step_failure_data.error.message


def test_sensor_relaunches_a_failed_ingest_a_bounded_number_of_times(
    dagster_setup: DagsterSetup,
) -> None:
    """Dagster never relaunches a run key it has seen; the attempt number in the key lets the
    sensor retry a failed ingest of a ready export, up to MAX_INGEST_ATTEMPTS."""
    from export_pipeline.defs.sensors import MAX_INGEST_ATTEMPTS

    setup = dagster_setup
    setup.sandbox.locations.ready_after_seconds = 0
    sensor = setup.defs.resolve_sensor_def("locations_exports_sensor")

    def tick() -> list[str]:
        ctx = dg.build_sensor_context(
            instance=setup.instance,
            resources=setup.for_provider("locations"),
            definitions=setup.defs,
        )
        return [rr.run_key for rr in sensor.evaluate_tick(ctx).run_requests]

    with dg.build_resources(setup.for_provider("locations")) as res:
        r = make_runner(res, LOCATIONS)
        record, _ = r.start(KIND, ExportRequest())
        export_id = record.export_id
        assert tick() == [f"locations:{export_id}"]
        setup.sandbox.locations.link_ttl_seconds = -60  # every link it hands out is dead
        for attempt in range(1, MAX_INGEST_ATTEMPTS + 1):
            with pytest.raises(Exception, match=r"expired|403"):
                r.ingest(KIND, export_id)
            expected = (
                []
                if attempt >= MAX_INGEST_ATTEMPTS
                else [f"locations:{export_id}:attempt-{attempt + 1}"]
            )
            assert tick() == expected
        # The sensor's attempts and the poison budget end together: a link still dead after
        # fresh ones is a permanent failure, so the last attempt retired the export and the
        # next run requests a new one instead of adopting it.
        record = r.ledger.get("locations", export_id)
        assert record.state is ExportState.FAILED
        assert record.permanent_failures == MAX_INGEST_ATTEMPTS
        assert record.error_message.startswith(f"retired after {MAX_INGEST_ATTEMPTS}")
