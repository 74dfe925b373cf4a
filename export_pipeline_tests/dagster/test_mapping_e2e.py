"""mapping.travel end to end: dynamic job partitions through Dagster's real APIs -> the
simulator over HTTP -> Parquet -> DuckDB on disk.

Mapping jobs are user data, so ``mapping/results`` has no schedule: a user (or the sensor, for a
pushed event) adds a ``mapping_jobs`` dynamic partition per job id and materializes it. Runs go
through the project's own implicit asset job (what the UI's "Materialize" button launches), with
the asset's checks selected along with it.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from export_pipeline.definitions import build_defs
from export_pipeline.defs.spec_resources import SpecApiResource
from export_pipeline.providers.mapping import (
    EVENT_COMPLETED,
    EVENT_FAILED,
    RESULTS,
    MappingProvider,
)
from export_pipeline.sandbox.mapping import COLUMNS, SandboxExport
from export_pipeline.sandbox.mapping import State as MappingState
from export_pipeline.webhooks.store import EventStore
from export_pipeline_tests.dagster.conftest import DagsterSetup


@pytest.fixture
def simulators() -> tuple[str, ...]:
    return ("mapping",)  # the sandbox starts only these


KEY = dg.AssetKey(["mapping", "results"])
OP = "mapping__results"
PARTITIONS_NAME = RESULTS.partitions  # "mapping_jobs"
ALL_CHECKS = {
    "rows_match_provider",
    "primary_key_unique",
    "values_in_range",
    "partitions_have_rows",
}
DATA_COLUMNS = ", ".join(f'"{c}"' for c in COLUMNS)


# -- helpers -----------------------------------------------------------------------------------


def add_partition(setup: DagsterSetup, *job_ids: str) -> None:
    """What a user does in the UI ("Add partition") before materializing a mapping job."""
    setup.instance.add_dynamic_partitions(PARTITIONS_NAME, list(job_ids))


def materialize(
    setup: DagsterSetup,
    job_id: str,
    config: dict[str, Any] | None = None,
    *,
    raise_on_error: bool = True,
    tags: dict[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialize one job partition of mapping/results (and its checks) with the project's
    own definitions, exactly as the UI's materialize button does (the implicit asset job)."""
    job = setup.defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        run_config={"ops": {OP: {"config": config or {}}}},
        instance=setup.instance,
        partition_key=job_id,
        asset_selection=[KEY],
        raise_on_error=raise_on_error,
        tags=tags,
    )


def query(setup: DagsterSetup, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
    with duckdb.connect(str(setup.warehouse_path), read_only=True) as con:
        return con.execute(sql, list(params or [])).fetchall()


def table_rows(setup: DagsterSetup, job_id: str | None = None) -> list[tuple]:
    """The data columns of mapping.results (one job, or all), in a stable order."""
    where, params = ("WHERE mappingJobId = ?", [job_id]) if job_id else ("", [])
    return query(
        setup,
        f"SELECT {DATA_COLUMNS} FROM mapping.results {where} "
        "ORDER BY mappingJobId, supplierHotelId",
        params,
    )


def expected_rows(state: MappingState, job_id: str) -> list[tuple]:
    """The simulator's rows of a job, as the table should hold them."""
    rows = sorted(state.rows(job_id), key=lambda r: r["supplierHotelId"])
    return [tuple(r[c] for c in COLUMNS) for r in rows]


def ledger(setup: DagsterSetup) -> list[tuple]:
    return query(
        setup,
        "SELECT export_id, partition_key, state, source, rows_loaded, error_code "
        "FROM pipeline.exports ORDER BY requested_at",
    )


def table_exists(setup: DagsterSetup) -> bool:
    if not setup.warehouse_path.exists():
        return False
    return bool(
        query(
            setup,
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'mapping' AND table_name = 'results'",
        )[0][0]
    )


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    failure = next(e for e in result.all_events if e.is_step_failure)
    return str(failure.step_failure_data.error.message)


def checks_of(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def materialization(result: dg.ExecuteInProcessResult) -> dg.AssetMaterialization:
    (mat,) = result.asset_materializations_for_node(OP)
    return mat


def external_export(state: MappingState, job_id: str) -> str:
    """An export made on the provider's side without this pipeline (mapping.travel exports
    automatically when a job completes); returns its exportFileId."""
    status, body = state.trigger(job_id)
    assert status == 200 and body["success"], body
    return body["exportFileId"]


def row(job_id: str, n: int, confidence: float = 0.5, **extra: Any) -> dict[str, Any]:
    base = {
        "mappingJobId": job_id,
        "partnerInventoryId": "inv-1",
        "supplierHotelId": f"S-{n:03d}",
        "referenceHotelId": f"R-{n:03d}",
        "referenceName": f"Hotel {n}",
        "referenceCountryCode": "FR",
        "referenceCity": "Paris",
        "confidence": confidence,
        "matchMethod": "fuzzy",
    }
    base.update(extra)
    return base


# -- 1. a user adds a job and materializes it --------------------------------------------------


def test_user_adds_a_job_and_materializes_its_partition(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_a, job_b = state.add_job(12), state.add_job(5)
    add_partition(setup, job_a)
    assert setup.instance.get_dynamic_partitions(PARTITIONS_NAME) == [job_a]

    result = materialize(setup, job_a)
    assert result.success
    # Exactly that job's rows, value for value (unicode names, quotes, 0.0/1.0 confidences).
    assert table_rows(setup) == expected_rows(state, job_a)
    assert not table_rows(setup, job_b)
    checks = checks_of(result)
    assert set(checks) == ALL_CHECKS
    assert all(c.passed for c in checks.values()), checks

    mat = materialization(result)
    assert mat.partition == job_a
    assert mat.metadata["rows"].value == 12
    (export_id, partition, state_word, source, rows, error) = ledger(setup)[0]
    assert (partition, state_word, source, rows, error) == (job_a, "loaded", "run", 12, None)
    assert mat.metadata["export_id"].value == export_id
    assert state.export_calls == 1
    assert setup.instance.get_materialized_partitions(KEY) == {job_a}


def test_a_job_must_be_added_before_it_can_be_materialized(dagster_setup: DagsterSetup) -> None:
    """Dagster refuses an unknown dynamic partition before anything reaches the provider."""
    setup = dagster_setup
    job_id = setup.sandbox.mapping.add_job(3)
    with pytest.raises(dg.DagsterUnknownPartitionError, match=job_id):
        materialize(setup, job_id)
    assert setup.sandbox.mapping.export_calls == 0
    assert not table_exists(setup)


# -- 2. partitioned materialization from config -------------------------------------------------


def test_partitioned_run_from_config_and_export_id(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_a, job_b = state.add_job(8), state.add_job(6)
    add_partition(setup, job_a, job_b)

    # Explicit run config with the partition key: request, wait (bounded), load.
    result = materialize(setup, job_a, {"wait_timeout_seconds": 30})
    assert result.success
    run = result.dagster_run
    assert run.run_config["ops"][OP]["config"] == {"wait_timeout_seconds": 30}
    assert run.tags["dagster/partition"] == job_a
    assert table_rows(setup, job_a) == expected_rows(state, job_a)

    # An exportFileId made elsewhere, handed in through config: no new export is requested and
    # it lands in the partition the run names.
    export_id = external_export(state, job_b)
    calls = state.export_calls
    result = materialize(setup, job_b, {"export_id": export_id})
    assert result.success
    assert state.export_calls == calls
    assert materialization(result).metadata["export_id"].value == export_id
    assert table_rows(setup, job_b) == expected_rows(state, job_b)
    assert table_rows(setup, job_a) == expected_rows(state, job_a)
    record = next(r for r in ledger(setup) if r[0] == export_id)
    assert record[1:4] == (job_b, "loaded", "config")

    # Running the same config again is idempotent: already loaded, nothing changes.
    before = query(setup, "SELECT * FROM mapping.results ORDER BY ALL")
    result = materialize(setup, job_b, {"export_id": export_id})
    assert result.success
    assert materialization(result).metadata["skipped_already_loaded"].value is True
    assert query(setup, "SELECT * FROM mapping.results ORDER BY ALL") == before


def test_export_id_of_another_job_is_refused_and_does_not_stick(
    dagster_setup: DagsterSetup,
) -> None:
    """A user pastes job A's exportFileId into partition B's config: a clear error naming the
    export and the partition, nothing loaded. The mistake must not stick to the ledger: a plain
    run of B then requests B's own export, and A's export still loads into A."""
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_a, job_b = state.add_job(4), state.add_job(3)
    add_partition(setup, job_a, job_b)
    export_a = external_export(state, job_a)

    result = materialize(setup, job_b, {"export_id": export_a}, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "outside partition" in message and job_b in message, message
    assert export_a in message and "PARTITION_MISMATCH" in message, message
    assert not table_exists(setup) or not table_rows(setup)

    # A plain run of B does not adopt the export that was proven to be A's.
    calls = state.export_calls
    assert materialize(setup, job_b).success
    assert state.export_calls == calls + 1
    assert table_rows(setup) == expected_rows(state, job_b)

    # The run names the partition: A's export loads into A, and the ledger says so.
    assert materialize(setup, job_a, {"export_id": export_a}).success
    assert table_rows(setup, job_a) == expected_rows(state, job_a)
    assert table_rows(setup, job_b) == expected_rows(state, job_b)
    record = next(r for r in ledger(setup) if r[0] == export_a)
    assert record[1:3] == (job_a, "loaded") and record[5] is None

    # Once loaded into A it cannot be passed off as B's.
    result = materialize(setup, job_b, {"export_id": export_a}, raise_on_error=False)
    assert not result.success
    assert "already loaded into partition" in failure_message(result)
    assert table_rows(setup, job_b) == expected_rows(state, job_b)


# -- 3. re-export replaces that job only -------------------------------------------------------


def test_reexport_replaces_that_jobs_rows_only(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_a, job_b = state.add_job(10), state.add_job(7)
    add_partition(setup, job_a, job_b)
    assert materialize(setup, job_a).success
    assert materialize(setup, job_b).success
    b_before = query(
        setup, "SELECT * FROM mapping.results WHERE mappingJobId = ? ORDER BY ALL", [job_b]
    )

    # The job is re-run on mapping.travel: fewer matches, one changed, one new.
    new = [row(job_a, 1, 0.9), row(job_a, 2, 1.0, matchMethod="manual"), row(job_a, 99, 0.42)]
    state.set_results(job_a, new)
    result = materialize(setup, job_a)
    assert result.success
    assert table_rows(setup, job_a) == expected_rows(state, job_a)
    md = materialization(result).metadata
    assert md["rows_deleted"].value == 10  # none of the old keys survive (S-001 != SUP-000001)
    assert md["rows_inserted"].value == 3
    assert md["table_rows"].value == 3 + 7
    # Job B's rows are byte-for-byte what they were, lineage included.
    assert (
        query(setup, "SELECT * FROM mapping.results WHERE mappingJobId = ? ORDER BY ALL", [job_b])
        == b_before
    )
    assert [r[2] for r in ledger(setup)] == ["loaded"] * 3
    assert all(c.passed for c in checks_of(result).values())


# -- 4. every file format gives the same table ---------------------------------------------------


@pytest.mark.parametrize("use_gzip", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("file_format", ["csv", "json", "jsonl"])
def test_every_format_gives_the_same_table(
    dagster_setup: DagsterSetup, file_format: str, use_gzip: bool
) -> None:
    """The sandbox names every file "...csv" with application/octet-stream and serves gzip
    without Content-Encoding, so the format can only come from the content."""
    setup = dagster_setup
    state = setup.sandbox.mapping
    state.file_format = file_format  # type: ignore[assignment]
    state.gzip = use_gzip
    job_id = state.add_job(30, job_id="job-formats")  # same id -> same seeded rows each time
    add_partition(setup, job_id)
    result = materialize(setup, job_id)
    assert result.success
    assert table_rows(setup) == expected_rows(state, job_id)
    label = file_format + ("+gzip" if use_gzip else "")
    assert materialization(result).metadata["format"].value == label
    types = query(
        setup,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'mapping' AND table_name = 'results' ORDER BY ordinal_position",
    )
    assert dict(types) == {
        **dict(RESULTS.columns or {}),
        "_export_id": "VARCHAR",
        "_source_file": "VARCHAR",
        "_loaded_at": "TIMESTAMP WITH TIME ZONE",
    }
    raw = Path(materialization(result).metadata["raw_path"].value) / "results"
    assert (raw.read_bytes()[:2] == b"\x1f\x8b") is use_gzip


# -- 5. failures ---------------------------------------------------------------------------


def _assert_nothing_changed(setup: DagsterSetup, before: list[tuple], n_exports: int) -> None:
    assert query(setup, "SELECT * FROM mapping.results ORDER BY ALL") == before
    assert len(ledger(setup)) == n_exports


def test_success_false_for_a_job_without_results_fails_the_run(
    dagster_setup: DagsterSetup,
) -> None:
    setup = dagster_setup
    state = setup.sandbox.mapping
    loaded, empty = state.add_job(5), state.add_job(0)
    add_partition(setup, loaded, empty)
    assert materialize(setup, loaded).success
    before = query(setup, "SELECT * FROM mapping.results ORDER BY ALL")

    result = materialize(setup, empty, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "No results to export for this job" in message  # the provider's own message
    assert empty in message and "EXPORT_NOT_TRIGGERED" in message
    assert state.export_calls == 2  # not retried: retrying cannot give the job results
    _assert_nothing_changed(setup, before, 1)
    assert not result.get_asset_check_evaluations()  # the checks did not run on a failed load


def test_success_false_message_is_surfaced_then_the_job_loads(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_id = state.add_job(6)
    add_partition(setup, job_id)
    state.fail_next_export_message = "Export failed: storage quota exceeded"

    result = materialize(setup, job_id, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "Export failed: storage quota exceeded" in message and job_id in message
    assert not table_exists(setup)
    assert not setup.warehouse_path.exists() or not ledger(setup)

    assert materialize(setup, job_id).success  # the switch fired once: fixed, materialize again
    assert table_rows(setup) == expected_rows(state, job_id)


def test_unknown_job_is_a_clear_404(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    typo = "00000000-0000-4000-8000-000000000000"
    add_partition(setup, typo)
    result = materialize(setup, typo, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "404" in message and "MAPPING_JOB_NOT_FOUND" in message and typo in message
    assert setup.sandbox.mapping.export_calls == 1
    assert not table_exists(setup)


def test_bad_token_names_the_env_var_never_the_token(
    dagster_setup: DagsterSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = dagster_setup
    job_id = setup.sandbox.mapping.add_job(3)
    add_partition(setup, job_id)
    wrong = "wrong-secret-Zx81"
    monkeypatch.setenv("MAPPING_API_TOKEN", wrong)
    result = materialize(setup, job_id, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "MAPPING_API_TOKEN" in message and "401" in message
    # Neither the wrong token nor the real one appears anywhere in the run's events.
    logs = "\n".join(str(e) for e in setup.instance.all_logs(result.run_id))
    for secret in (wrong, setup.sandbox.mapping.token):
        assert secret not in logs
    assert not table_exists(setup)


# -- 6. short-lived links --------------------------------------------------------------------


def test_expired_link_is_asked_for_again(
    dagster_setup: DagsterSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Links live ~60 s and the sandbox enforces it (403 once expired). Here the first links
    handed out are already dead, as if the run had stalled past their lifetime; the runner must
    ask for a fresh link and still load."""
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_id = state.add_job(9)
    add_partition(setup, job_id)

    dead_links = 2
    real_link: Callable[[str, str], tuple[int, dict[str, Any]]] = state.link

    def link(export_id: str, base_url: str) -> tuple[int, dict[str, Any]]:
        # The real simulator call, with a TTL that has run out for the first `dead_links` links
        # (link calls come one at a time from the run, so the switch needs no lock).
        state.link_ttl_seconds = -120 if state.download_link_calls < dead_links else 60
        return real_link(export_id, base_url)

    monkeypatch.setattr(state, "link", link)
    result = materialize(setup, job_id)
    assert result.success
    assert table_rows(setup) == expected_rows(state, job_id)
    # Link 1: the wait saw READY. Link 2: dead at download (403). Link 3: fresh, downloaded.
    assert state.download_link_calls == dead_links + 1
    assert state.downloads == 1


# -- 7. checks -------------------------------------------------------------------------------


def test_confidence_out_of_range_fails_the_blocking_check(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_id = "job-bad-confidence"
    state.set_results(job_id, [row(job_id, 1, 0.3), row(job_id, 2, 1.5), row(job_id, 3, 1.0)])
    add_partition(setup, job_id)
    result = materialize(setup, job_id, raise_on_error=False)
    assert not result.success  # a blocking ERROR check fails its step, so the run fails
    checks = checks_of(result)
    assert not checks["values_in_range"].passed
    assert checks["values_in_range"].metadata["out_of_range_confidence"].value == 1
    assert checks["values_in_range"].severity is dg.AssetCheckSeverity.ERROR
    failed_steps = {e.step_key for e in result.all_events if e.is_step_failure}
    assert failed_steps == {"mapping__results_values_in_range"}
    # The other checks still ran and passed; the row itself landed (checks judge loaded data).
    assert all(c.passed for n, c in checks.items() if n != "values_in_range")
    assert len(table_rows(setup)) == 3


def test_null_key_fails_primary_key_unique(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_id = "job-null-key"
    state.set_results(job_id, [row(job_id, 1), row(job_id, 2, supplierHotelId=None)])
    add_partition(setup, job_id)
    result = materialize(setup, job_id, raise_on_error=False)
    check = checks_of(result)["primary_key_unique"]
    assert not check.passed and check.metadata["null_keys"].value == 1
    assert not result.success


def test_duplicate_keys_in_a_file_keep_the_table_unique(dagster_setup: DagsterSetup) -> None:
    """A file that repeats a supplier hotel: the load keeps the last occurrence."""
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_id = "job-dupes"
    state.set_results(
        job_id, [row(job_id, 1, 0.2), row(job_id, 2, 0.4), row(job_id, 1, 0.8, matchMethod="geo")]
    )
    add_partition(setup, job_id)
    result = materialize(setup, job_id)
    assert checks_of(result)["primary_key_unique"].passed
    got = query(
        setup, "SELECT supplierHotelId, confidence, matchMethod FROM mapping.results ORDER BY 1"
    )
    assert got == [("S-001", 0.8, "geo"), ("S-002", 0.4, "fuzzy")]


def _header_only_export(state: MappingState, job_id: str, use_gzip: bool) -> str:
    """An export file with a header and no rows, as an automatic export of a job that ended
    with no matches could produce. The trigger call never makes one (success:false instead),
    so it is placed in the simulator directly; everything after that is the real path."""
    export_id = f"auto-empty-{job_id}"
    path = state.files_dir / f"{export_id}.bin"
    header = (",".join(COLUMNS) + "\r\n").encode()
    path.write_bytes(gzip.compress(header, mtime=0) if use_gzip else header)
    state.exports[export_id] = SandboxExport(
        export_id=export_id,
        job_id=job_id,
        created_at=time.time(),
        path=path,
        rows=(),
        file_format="csv",
        gzip=use_gzip,
    )
    return export_id


def test_zero_row_export_is_flagged_but_does_not_block(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_a, job_b = state.add_job(5), state.add_job(4)
    add_partition(setup, job_a, job_b)
    assert materialize(setup, job_a).success
    assert materialize(setup, job_b).success

    # The job's results were withdrawn; its next (automatic) export holds only a header.
    export_id = _header_only_export(state, job_a, use_gzip=True)
    result = materialize(setup, job_a, {"export_id": export_id})
    assert result.success  # WARN and non-blocking: the run succeeds
    check = checks_of(result)["partitions_have_rows"]
    assert not check.passed and check.severity is dg.AssetCheckSeverity.WARN
    assert job_a in (check.description or "")
    assert check.metadata["empty_partitions"].value == 1
    # The partition now mirrors the provider (empty); the other job is untouched.
    assert table_rows(setup, job_a) == []
    assert table_rows(setup, job_b) == expected_rows(state, job_b)
    assert materialization(result).metadata["rows_deleted"].value == 5

    # Once the job has results again, a fresh export clears the warning.
    state.set_results(job_a, [row(job_a, 1)])
    result = materialize(setup, job_a)
    assert checks_of(result)["partitions_have_rows"].passed


# -- 8. the sensor: a pushed export for a job the instance does not know yet --------------------


def _sensor_tick(setup: DagsterSetup) -> dg.SensorResult:
    """One tick as the daemon runs it. The daemon's context carries an instance *ref*, which
    Dagster needs to validate a run request's partition against the dynamic partitions (plus the
    ones the same tick adds); ``build_sensor_context`` only sets it when given explicitly."""
    sensor = setup.defs.resolve_sensor_def("mapping_exports_sensor")
    ctx = dg.build_sensor_context(
        instance=setup.instance,
        instance_ref=setup.instance.get_ref(),
        resources=setup.for_provider("mapping"),
        definitions=setup.defs,
    )
    return sensor.evaluate_tick(ctx)


def _push(setup: DagsterSetup, event_id: str, body: dict[str, Any], status: str) -> bool:
    store = EventStore(Path(setup.resources["webhook_events"].path))  # type: ignore[attr-defined]
    return store.record(
        source="mapping",
        event_id=event_id,
        export_id=body["exportFileId"],
        status=status,
        body=body,
    )


def test_sensor_adds_the_partition_and_launches_one_run(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_id = state.add_job(11)
    export_id = external_export(state, job_id)  # mapping.travel exported on job completion
    body = {
        "event": EVENT_COMPLETED,
        "mappingJobId": job_id,
        "exportFileId": export_id,
        "occurredAt": "2026-01-01T00:00:00Z",
    }
    assert _push(setup, "evt-1", body, "ready")
    assert not _push(setup, "evt-1", body, "ready")  # a re-delivery is stored once
    assert setup.instance.get_dynamic_partitions(PARTITIONS_NAME) == []

    tick = _sensor_tick(setup)
    (add,) = tick.dynamic_partitions_requests
    assert isinstance(add, dg.AddDynamicPartitionsRequest)
    assert (add.partitions_def_name, list(add.partition_keys)) == (PARTITIONS_NAME, [job_id])
    (rr,) = tick.run_requests
    assert rr.run_key == f"mapping:{export_id}" and rr.partition_key == job_id
    assert rr.asset_selection == [KEY]
    assert rr.run_config["ops"][OP]["config"]["export_id"] == export_id
    assert rr.tags["export_pipeline/trigger"] == "webhook"

    # What the daemon does with that tick: add the partition, then launch the run as requested.
    setup.instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    result = materialize(
        setup, rr.partition_key, rr.run_config["ops"][OP]["config"], tags=dict(rr.tags)
    )
    assert result.success
    assert table_rows(setup) == expected_rows(state, job_id)
    assert ledger(setup)[0][1:4] == (job_id, "loaded", "webhook")
    assert state.export_calls == 1  # the pipeline never triggered an export itself

    # Next tick: the event is consumed and the export loaded; nothing more to launch.
    tick = _sensor_tick(setup)
    assert tick.run_requests == [] and not tick.dynamic_partitions_requests


def test_sensor_records_a_pushed_failure_without_launching(dagster_setup: DagsterSetup) -> None:
    """A failed generation pushed by the provider: recorded as failed with the provider's
    message, confirmed with the provider, no run launched and no partition added for it."""
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_id = state.add_job(2)
    state.fail_next_generation_message = "Export generation failed: disk full"
    export_id = external_export(state, job_id)
    body = {
        "event": EVENT_FAILED,
        "mappingJobId": job_id,
        "exportFileId": export_id,
        "message": "Export generation failed: disk full",
    }
    assert _push(setup, "evt-f", body, "failed")
    tick = _sensor_tick(setup)
    assert tick.run_requests == [] and not tick.dynamic_partitions_requests
    (record,) = ledger(setup)
    assert record[:3] == (export_id, job_id, "failed")
    assert record[5] == "EXPORT_FAILED"
    message = query(setup, "SELECT error_message FROM pipeline.exports")[0][0]
    assert "disk full" in message


# -- the configurable download call --------------------------------------------------------------


def test_wrong_download_path_names_the_setting(dagster_setup: DagsterSetup) -> None:
    """The download call is our guess and configurable. Set wrong, it must say so, and must not
    be taken for a lost export (which would trigger the job's export again and again)."""
    setup = dagster_setup
    state = setup.sandbox.mapping
    job_id = state.add_job(3)
    add_partition(setup, job_id)
    resources = {
        **setup.resources,
        "mapping_api": SpecApiResource.from_env(
            MappingProvider, options={"download_path": "/api/v2/files/{exportFileId}/link"}
        ),
    }
    wrong = replace(setup, resources=resources, defs=build_defs(resources))
    result = materialize(wrong, job_id, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "DOWNLOAD_PATH_NOT_FOUND" in message and "download_path" in message, message
    assert "/api/v2/files/{exportFileId}/link" in message
    assert state.export_calls == 1  # not re-triggered as if the export were lost
    assert [r[2] for r in ledger(setup)] == ["pending"]  # kept open: loads once the path is fixed

    result = materialize(setup, job_id)  # the default path: the open export is adopted
    assert result.success and state.export_calls == 1
    assert table_rows(setup) == expected_rows(state, job_id)
