"""Health and retention (issue 14): a freshness policy on every asset, the run-failure sensor,
checks that could not run are skipped, and a cleanup that never touches an open export."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from dagster._core.loader import LoadingContextForTest
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.storage.defs_state.base import set_defs_state_storage
from dagster._core.test_utils import freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.freshness import FreshnessDaemon
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from export_pipeline.core.model import ExportRequest, ExportState
from export_pipeline.definitions import BINDINGS, build_defs
from export_pipeline.defs.assets import asset_key, make_runner
from export_pipeline.defs.checks import CHECK_AUTOMATION, DATA_CHECKS_SENSOR, build_checks
from export_pipeline.defs.schedules import RetentionResource, retention_job
from export_pipeline.defs.sensors import FailureAlertsResource, run_failure_alerts
from export_pipeline.sandbox.server import RunningServer
from export_pipeline_tests.dagster.conftest import DagsterSetup

LOCATIONS = next(b for b in BINDINGS if b.name == "locations")
KIND = LOCATIONS.kinds[0]
MEWS = next(b for b in BINDINGS if b.name == "mews")


def freshness_states(instance: dg.DagsterInstance) -> dict[str, str]:
    """One iteration of Dagster's own FreshnessDaemon over the project's definitions (loaded as
    `dg dev` loads them), then the state it recorded for each asset."""
    target = InProcessWorkspaceLoadTarget(
        InProcessCodeLocationOrigin(
            LoadableTargetOrigin(module_name="export_pipeline.definitions", attribute="defs")
        )
    )
    # Loading definitions reads the *current* defs-state storage (a context variable), which an
    # earlier test's disposed instance can have left behind: this instance's, for the load.
    with (
        set_defs_state_storage(instance.defs_state_storage),
        WorkspaceProcessContext(instance, target) as workspace,
    ):
        request = workspace.create_request_context()
        # A definitions load error would leave an empty graph and nothing evaluated: say why.
        assert not request.code_location_errors(), request.code_location_errors()
        keys = request.asset_graph.get_all_asset_keys()
        assert keys
        list(FreshnessDaemon().run_iteration(workspace))
    records = instance.get_freshness_state_records(list(keys))
    states = {k.to_user_string(): records[k].freshness_state.value for k in records}
    assert len(states) == len(keys), f"not evaluated: {set(map(str, keys)) - set(states)}"
    return states


def test_every_asset_has_a_freshness_policy_the_daemon_evaluates(
    dagster_setup: DagsterSetup,
) -> None:
    setup = dagster_setup
    graph = build_defs().get_repository_def().asset_graph
    policies = {
        k.to_user_string(): graph.get(k).freshness_policy for k in graph.get_all_asset_keys()
    }
    assert all(policies.values()), [k for k, p in policies.items() if p is None]
    hourly = dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=2), warn_window=timedelta(minutes=90)
    )
    assert policies["locations/locations"] == policies["locations/evses"] == hourly
    assert policies["mews/reservation"].fail_window.to_timedelta() == timedelta(hours=26)
    assert policies["mapping/results"].fail_window.to_timedelta() == timedelta(days=30)

    assert setup.job("locations_sync").execute_in_process(instance=setup.instance).success
    states = freshness_states(setup.instance)
    loaded = {"locations/locations", "locations/evses", "locations/connectors"}
    assert {k: states[k] for k in loaded} == dict.fromkeys(loaded, "PASS")
    assert states["mews/reservation"] == "UNKNOWN"  # never materialized: nothing to judge
    now = time.time()
    with freeze_time(now + timedelta(minutes=95).total_seconds()):  # one hourly tick missed
        assert freshness_states(setup.instance)["locations/locations"] == "WARN"
    with freeze_time(now + timedelta(hours=2, minutes=5).total_seconds()):
        assert freshness_states(setup.instance)["locations/evses"] == "FAIL"


def test_failure_sensor_records_and_posts(dagster_setup: DagsterSetup, tmp_path: Path) -> None:
    setup = dagster_setup
    received: list[dict] = []

    async def collect(request: Request) -> JSONResponse:
        received.append(await request.json())
        return JSONResponse({"ok": True})

    os.environ["DELIVERIES_API_KEY"] = "sk_wrong"  # monkeypatched by the fixture; restored
    result = setup.job("deliveries_sync").execute_in_process(
        instance=setup.instance, raise_on_error=False
    )
    assert not result.success
    alerts = FailureAlertsResource(path=str(tmp_path / "failures.jsonl"), url_env="TEST_ALERT_URL")
    with RunningServer(Starlette(routes=[Route("/alert", collect, methods=["POST"])])) as server:
        os.environ["TEST_ALERT_URL"] = f"{server.base_url}/alert"
        try:
            context = dg.build_run_status_sensor_context(
                sensor_name="run_failure_alerts",
                dagster_instance=setup.instance,
                dagster_run=result.dagster_run,
                dagster_event=result.get_run_failure_event(),
                resources={"failure_alerts": alerts},
            ).for_run_failure()
            run_failure_alerts(context, failure_alerts=alerts)
        finally:
            del os.environ["TEST_ALERT_URL"]
    (line,) = (tmp_path / "failures.jsonl").read_text().splitlines()
    recorded = json.loads(line)
    assert recorded["run_id"] == result.run_id and recorded["job"] == "deliveries_sync"
    assert "deliveries__inbound_messages" in recorded["steps_failed"]
    assert received == [recorded]
    assert "sk_wrong" not in line


def test_a_check_that_cannot_look_is_skipped_not_failed(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    # The checks alone, before anything was loaded: they cannot look at a table.
    for check in build_checks(KIND):
        context = dg.build_asset_check_context(
            resources={"warehouse": setup.resources["warehouse"]}
        )
        result = check(context)
        assert result.passed, check.check_key
        assert result.metadata["skipped"].value.startswith("the table does not exist")


def test_retention_never_removes_what_an_open_export_needs(
    dagster_setup: DagsterSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = dagster_setup
    assert setup.job("locations_sync").execute_in_process(instance=setup.instance).success
    keys = ("warehouse", "sync_settings", "locations_api", "s3")
    with dg.build_resources({k: setup.resources[k] for k in keys}) as built:
        runner = make_runner(built, LOCATIONS)
        open_record, _ = runner.start(KIND, ExportRequest(), adopt=False)
        failed_record, _ = runner.start(KIND, ExportRequest(), adopt=False)
        runner.provider.close()
    runner.ledger.record_error(
        "locations", failed_record.export_id, code="X", message="bad", state=ExportState.FAILED
    )
    base = setup.data_dir
    tier = "parquet/locations/locations"
    loaded_id = runner.ledger.last_loaded("locations", "locations").export_id
    dirs = {
        "loaded_raw": base / "raw/locations/locations" / loaded_id,
        "loaded_parquet": base / "parquet/locations/locations" / loaded_id,
        "open_raw": base / "raw/locations/locations" / open_record.export_id,
        "open_readback": base / tier / f"{open_record.export_id}.published",
        "failed_raw": base / "raw/locations/locations" / failed_record.export_id,
        "loaded_readback": base / "parquet/locations/locations" / f"{loaded_id}.published",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
        (path / "f.bin").write_bytes(b"x" * 10)
    old = time.time() - 3600
    for path in dirs.values():
        for f in [path, *path.iterdir()]:
            os.utime(f, (old, old))
    result = retention_job.execute_in_process(
        instance=setup.instance,
        resources={
            "warehouse": setup.resources["warehouse"],
            "retention": RetentionResource(raw_days=0, failed_days=0, cache_hours=0),
        },
    )
    assert result.success
    kept = {name for name, path in dirs.items() if path.exists()}
    assert kept == {"loaded_parquet", "open_raw", "open_readback"}


# -- checks never red for a reason that is not theirs ------------------------------------------


def ui_status(instance: dg.DagsterInstance, key: dg.AssetCheckKey) -> tuple[str, str | None]:
    """(status, run id) of a check's latest execution, resolved as the UI resolves it (a check
    planned in a failed run without an evaluation is "EXECUTION_FAILED")."""
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key]).get(key)
    if record is None:
        return ("NEVER", None)
    status = asyncio.run(record.resolve_status(LoadingContextForTest(instance)))
    return (status.value, record.run_id)


def planned_checks(setup: DagsterSetup, run_id: str) -> set[dg.AssetCheckKey]:
    """The checks a run planned (logged by the instance when the run is created)."""
    return {
        record.dagster_event.event_specific_data.asset_check_key
        for record in setup.instance.all_logs(
            run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED
        )
    }


def run_requested_checks(
    setup: DagsterSetup, cursor: object
) -> tuple[set[dg.AssetCheckKey], dg.ExecuteInProcessResult | None, object]:
    """One tick of data_checks_sensor's automation condition on the instance, then the run it
    launches: exactly the requested checks, nothing else."""
    tick = dg.evaluate_automation_conditions(
        defs=setup.defs, instance=setup.instance, cursor=cursor
    )
    requested = {
        r.key for r in tick.results if isinstance(r.key, dg.AssetCheckKey) and r.true_subset.size
    }
    if not requested:
        return requested, None, tick.cursor
    job = setup.defs.resolve_implicit_global_asset_job_def()
    run = job.get_subset(asset_selection=set(), asset_check_selection=requested)
    result = run.execute_in_process(instance=setup.instance, raise_on_error=False)
    return requested, result, tick.cursor


def test_a_failed_kind_turns_no_check_red_and_the_others_judge_their_own_data(
    dagster_setup: DagsterSetup,
) -> None:
    setup = dagster_setup
    repo = setup.defs.get_repository_def()
    assert repo.get_sensor_def(DATA_CHECKS_SENSOR).default_status is dg.DefaultSensorStatus.RUNNING
    keys = {c.check_key for kind in MEWS.kinds for c in build_checks(kind)}
    payment = {k for k in keys if k.asset_key == dg.AssetKey(["mews", "payment"])}
    company = {k for k in keys if k.asset_key == dg.AssetKey(["mews", "company"])}
    assert payment and company
    # The sensor ticks from the daemon's start, before any load: nothing to check yet.
    requested, _, cursor = run_requested_checks(setup, None)
    assert requested == set()

    sync = setup.job("mews_sync")
    first = sync.execute_in_process(instance=setup.instance)
    assert first.success
    requested, checks_1, cursor = run_requested_checks(setup, cursor)
    assert requested == keys  # every kind loaded: all its data checks, in a run of their own
    assert all(e.passed for e in checks_1.get_asset_check_evaluations())
    # The next tick (every 30 s) sees the checks done: no second run of them.
    requested, _, cursor = run_requested_checks(setup, cursor)
    assert requested == set()

    # One kind's export fails at the provider; another kind's table gets a duplicated row.
    setup.sandbox.mews.fail_next.add("Payment")
    second = sync.execute_in_process(instance=setup.instance, raise_on_error=False)
    assert not second.success
    assert [e.step_key for e in second.all_events if e.is_step_failure] == ["mews__payment"]
    assert (
        planned_checks(setup, second.run_id) == set()
    )  # a sync run plans no check, so its failure cannot mark one
    with duckdb.connect(str(setup.warehouse_path)) as con:
        con.execute("INSERT INTO mews.company SELECT * FROM mews.company LIMIT 1")

    requested, checks_2, _ = run_requested_checks(setup, cursor)
    assert requested == keys - payment  # the failed kind did not materialize: not requested
    statuses = {k: ui_status(setup.instance, k) for k in keys}
    for key, (status, run_id) in statuses.items():
        if key in payment:  # still its last evaluation, of the data still in its table
            assert (status, run_id) == ("SUCCEEDED", checks_1.run_id), key
        elif key in company:  # red, for its own data only
            assert (status, run_id) == ("FAILED", checks_2.run_id), key
        else:
            assert (status, run_id) == ("SUCCEEDED", checks_2.run_id), key
    assert "EXECUTION_FAILED" not in {s for s, _ in statuses.values()}
    failed = {e.asset_check_key: e for e in checks_2.get_asset_check_evaluations() if not e.passed}
    pk = dg.AssetCheckKey(dg.AssetKey(["mews", "company"]), "primary_key_unique")
    assert failed[pk].metadata["duplicated_keys"].value == 1

    # A manual Materialize of the failing kind plans its checks (the UI does): the failed load
    # leaves them a verdict on the table as it stands, not "Execution failed".
    setup.sandbox.mews.fail_next.add("Payment")
    job = setup.defs.resolve_implicit_global_asset_job_def()
    manual = job.execute_in_process(
        instance=setup.instance,
        asset_selection=[dg.AssetKey(["mews", "payment"])],
        raise_on_error=False,
    )
    assert not manual.success
    assert planned_checks(setup, manual.run_id) & keys == payment
    for key in payment:
        assert ui_status(setup.instance, key) == ("SUCCEEDED", manual.run_id), key
        record = setup.instance.event_log_storage.get_latest_asset_check_execution_by_key([key])
        assert record[key].evaluation.metadata["evaluated_after"].value == "the load failed"


def test_a_blocking_check_still_blocks_downstream_assets_in_its_run(
    dagster_setup: DagsterSetup,
) -> None:
    setup = dagster_setup
    assert setup.job("locations_sync").execute_in_process(instance=setup.instance).success
    with duckdb.connect(str(setup.warehouse_path)) as con:
        con.execute("INSERT INTO locations.locations SELECT * FROM locations.locations LIMIT 1")
    pk = dg.AssetCheckKey(asset_key(KIND), "primary_key_unique")
    view = dg.AssetKey(["locations", "evses"])
    job = setup.defs.resolve_implicit_global_asset_job_def()
    run = job.get_subset(asset_selection={view}, asset_check_selection={pk}).execute_in_process(
        instance=setup.instance, raise_on_error=False
    )
    (evaluation,) = run.get_asset_check_evaluations()
    assert not evaluation.passed
    assert not run.success
    assert view not in {e.asset_key for e in run.all_events if e.is_step_materialization}


def test_a_check_on_a_partitioned_asset_runs_after_one_partition_loads() -> None:
    """Mapping jobs are partitions: a check must not wait for every registered partition."""
    jobs = dg.DynamicPartitionsDefinition(name="jobs")

    @dg.asset(partitions_def=jobs)
    def results() -> None: ...

    @dg.asset_check(asset=results, automation_condition=CHECK_AUTOMATION)
    def results_check() -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=True)

    defs = dg.Definitions(assets=[results], asset_checks=[results_check])
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("jobs", ["job-1", "job-2"])
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        job = defs.resolve_implicit_global_asset_job_def().get_subset(
            asset_selection={results.key}, asset_check_selection=set()
        )  # as a sync run: the asset alone
        assert job.execute_in_process(instance=instance, partition_key="job-1").success
        tick = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=tick.cursor)
        assert {r.key for r in tick.results if r.true_subset.size} == {results_check.check_key}
