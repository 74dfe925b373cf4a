"""Mews end to end: Dagster's real job, sensor and schedule -> the Mews simulator over HTTP ->
multi-part JSON Lines -> Parquet -> DuckDB on disk.

Mews exports are whole snapshots of one entity type, one may be in flight per type, and their
files are several signed parts that die at ``ExpiresUtc``. Each test below drives one of those
facts through the project's real ``mews_sync`` job (or sensor / schedule) and checks what lands.
"""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import dagster as dg
import duckdb
import pytest

from export_pipeline.core.ingest import POISON_BUDGET, ExportRunner
from export_pipeline.core.model import ExportKind, ExportRequest
from export_pipeline.definitions import BINDINGS, build_defs
from export_pipeline.defs.assets import asset_key, make_runner
from export_pipeline.defs.resources import SyncSettingsResource
from export_pipeline.providers.mews import ENTITY_TYPES, snake_case
from export_pipeline.sandbox.bundle import Sandbox, start_sandbox
from export_pipeline.sandbox.mews import State
from export_pipeline.sandbox.s3 import S3Server
from export_pipeline_tests.dagster.conftest import DagsterSetup


@pytest.fixture
def simulators() -> tuple[str, ...]:
    return ("mews",)  # the sandbox starts only these


MEWS = next(b for b in BINDINGS if b.name == "mews")
KINDS: dict[str, ExportKind] = {k.params["entity_type"]: k for k in MEWS.kinds}
LINEAGE = ("_export_id", "_source_file", "_loaded_at")


# Dagster waits this long before retrying a step after a retryable error (in flight, 5xx).
STEP_RETRY_SECONDS = 0.5
STEP_MAX_RETRIES = 2


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, shared_s3: S3Server) -> Iterator[Sandbox]:
    """The shared fixture's simulators; a test may pass Mews ``State`` options indirectly."""
    options = getattr(request, "param", None) or {}
    with start_sandbox(n_locations=300, s3=shared_s3, mews_options=options) as sb:
        sb.locations.ready_after_seconds = 0.2
        yield sb


@pytest.fixture
def setup(dagster_setup: DagsterSetup) -> DagsterSetup:
    """The shared Dagster setup with a short (but real) wait between step retries."""
    resources = dict(dagster_setup.resources)
    settings = resources["sync_settings"]
    assert isinstance(settings, SyncSettingsResource)
    values = {name: getattr(settings, name) for name in SyncSettingsResource.model_fields}
    values.update(step_retry_seconds=STEP_RETRY_SECONDS, step_max_retries=STEP_MAX_RETRIES)
    resources["sync_settings"] = SyncSettingsResource(**values)
    return replace(dagster_setup, resources=resources, defs=build_defs(resources))


# -- helpers ------------------------------------------------------------------------------------


def run_sync(
    setup: DagsterSetup,
    entity_types: Iterable[str] | None = None,
    *,
    config: Mapping[str, Mapping[str, Any]] | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """Run the project's real ``mews_sync`` job (assets + their checks), optionally a subset."""
    selection = None
    if entity_types is not None:
        selection = [asset_key(KINDS[t]) for t in entity_types]
    ops = {f"mews__{snake_case(t)}": {"config": dict(c)} for t, c in (config or {}).items()}
    return setup.job("mews_sync").execute_in_process(
        run_config={"ops": ops} if ops else None,
        instance=setup.instance,
        asset_selection=selection,
        raise_on_error=raise_on_error,
    )


def query(setup: DagsterSetup, sql: str, params: list[Any] | None = None) -> list[tuple]:
    with duckdb.connect(str(setup.warehouse_path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def exports(setup: DagsterSetup, entity_type: str) -> list[tuple]:
    """(export_id, state, provider_status, replaced_by, rows_loaded) in request order."""
    return query(
        setup,
        "SELECT export_id, state, provider_status, replaced_by, rows_loaded "
        "FROM pipeline.exports WHERE provider = 'mews' AND kind = ? ORDER BY requested_at",
        [snake_case(entity_type)],
    )


def plain(value: Any) -> Any:
    """A DuckDB value back in the JSON shape Mews sent (UUIDs and timestamps as strings)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def table_records(setup: DagsterSetup, entity_type: str) -> dict[str, dict[str, Any]]:
    """The rows of mews.<name> without lineage columns, as JSON-shaped dicts keyed by Id."""
    with duckdb.connect(str(setup.warehouse_path), read_only=True) as con:
        cur = con.execute(
            f"SELECT * EXCLUDE ({', '.join(LINEAGE)}) FROM mews.{snake_case(entity_type)}"
        )
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, map(plain, row), strict=True)) for row in cur.fetchall()]
    return {r["Id"]: r for r in rows}


def sandbox_records(setup: DagsterSetup, entity_type: str) -> dict[str, dict[str, Any]]:
    return {r["Id"]: r for r in setup.sandbox.mews.records(entity_type)}


def assert_table_is_the_sandbox(setup: DagsterSetup, entity_type: str) -> None:
    """Exactly the simulator's current records: same Ids, every (nested) value equal."""
    got = table_records(setup, entity_type)
    want = sandbox_records(setup, entity_type)
    assert len(got) == len(want) == setup.sandbox.mews.count(entity_type)
    assert set(got) == set(want), entity_type
    for record_id, record in want.items():
        assert got[record_id] == record, (entity_type, record_id)


def step_failure_text(result: dg.ExecuteInProcessResult) -> str:
    """The failed step's error with its whole cause chain (what a user sees in the UI)."""
    failure = next(e for e in result.all_events if e.is_step_failure)
    return failure.step_failure_data.error.to_string()


def tick(setup: DagsterSetup, name: str = "mews_exports_sensor") -> dg.SensorResult:
    sensor = setup.defs.resolve_sensor_def(name)
    ctx = dg.build_sensor_context(
        instance=setup.instance, resources=setup.for_provider("mews"), definitions=setup.defs
    )
    return sensor.evaluate_tick(ctx)


class Runner:
    """The runner a run would build, for arranging ledger state before a run (context manager)."""

    def __init__(self, setup: DagsterSetup) -> None:
        self._cm = dg.build_resources(setup.for_provider("mews"))

    def __enter__(self) -> ExportRunner:
        resources = self._cm.__enter__()
        self._runner = make_runner(resources, MEWS)
        return self._runner

    def __exit__(self, *exc: object) -> None:
        self._runner.provider.close()
        self._cm.__exit__(*exc)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


# -- 1. every entity type -----------------------------------------------------------------------


def test_sync_loads_every_entity_type_exactly(setup: DagsterSetup) -> None:
    mews = setup.sandbox.mews
    assert mews.parts > 1  # the point: several files per export
    result = run_sync(setup)
    assert result.success

    for entity_type in ENTITY_TYPES:
        assert_table_is_the_sandbox(setup, entity_type)

    # Every part of every export landed, each the announced size, in one load.
    parts = query(
        setup,
        "SELECT e.kind, count(*), count(*) FILTER (WHERE f.size_bytes = f.announced_bytes), "
        "sum(f.size_bytes) FROM pipeline.exports e JOIN pipeline.export_files f "
        "USING (provider, export_id) WHERE e.provider = 'mews' GROUP BY e.kind",
    )
    assert {k: (n, same) for k, n, same, _ in parts} == {
        snake_case(t): (mews.parts, mews.parts) for t in ENTITY_TYPES
    }
    for entity_type in ENTITY_TYPES:
        name = snake_case(entity_type)
        files = query(setup, f"SELECT count(DISTINCT _source_file) FROM mews.{name}")[0][0]
        assert files == mews.parts, name
    states = query(setup, "SELECT state, count(*) FROM pipeline.exports GROUP BY ALL")
    assert states == [("loaded", len(ENTITY_TYPES))]

    # Nested objects stay STRUCT, arrays stay LIST: decided from the records themselves.
    nested: dict[str, int] = {}
    for entity_type in ENTITY_TYPES:
        name = snake_case(entity_type)
        types = dict(
            query(
                setup,
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = 'mews' AND table_name = ?",
                [name],
            )
        )
        nested[name] = 0
        for record in mews.records(entity_type):
            for column, value in record.items():
                if isinstance(value, dict):
                    assert types[column].startswith("STRUCT("), (name, column, types[column])
                    nested[name] += 1
                elif isinstance(value, list):
                    assert types[column].endswith("[]"), (name, column, types[column])
                    nested[name] += 1
    # Every type but ResourceBlock (flat in Mews too) has objects or arrays.
    assert {n for n, count in nested.items() if count == 0} == {"resource_block"}
    reservation = dict(
        query(
            setup,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'mews' AND table_name = 'reservation'",
        )
    )
    assert reservation["PersonCounts"].startswith("STRUCT(") and reservation[
        "PersonCounts"
    ].endswith("[]")
    # Nested values are queryable as such.
    assert query(
        setup,
        "SELECT count(*) FROM mews.reservation WHERE Customer.LastName IS NULL "
        "OR len(PersonCounts) <> 2",
    ) == [(0,)]

    checks = setup.run_checks(result).get_asset_check_evaluations()
    assert len(checks) == 2 * len(ENTITY_TYPES)
    assert {c.check_name for c in checks} == {"rows_match_provider", "primary_key_unique"}
    assert all(c.passed for c in checks), [c.description for c in checks if not c.passed]

    mat = result.asset_materializations_for_node("mews__reservation")[0]
    assert mat.metadata["rows"].value == mews.count("Reservation")
    assert mat.metadata["files"].value == ", ".join(
        f"part-{i:04d}.jsonl" for i in range(mews.parts)
    )
    assert mews.client_token not in str(mat.metadata)
    assert mews.access_token not in str(mat.metadata)


# -- 2. snapshots replace, history stays --------------------------------------------------------


def test_second_snapshot_replaces_the_first_and_history_stays(setup: DagsterSetup) -> None:
    mews = setup.sandbox.mews
    types = ["Reservation", "Customer"]
    assert run_sync(setup, types).success
    before = {t: table_records(setup, t) for t in types}

    change = {
        "Reservation": mews.mutate("Reservation", updated=6, deleted=5, added=4),
        "Customer": mews.mutate("Customer", updated=3, deleted=7),
    }
    assert run_sync(setup, types).success

    for entity_type in types:
        assert_table_is_the_sandbox(setup, entity_type)
        after = table_records(setup, entity_type)
        mutation = change[entity_type]
        assert not set(mutation.deleted) & set(after)
        assert set(mutation.added) <= set(after)
        for record_id in mutation.updated:
            assert after[record_id]["Notes"].startswith("Revision 1")
            assert after[record_id]["UpdatedUtc"] > before[entity_type][record_id]["UpdatedUtc"]

        # Both snapshots' Parquet stay on disk: the history is queryable.
        loaded = query(
            setup,
            "SELECT export_id, parquet_uri, rows_loaded FROM pipeline.exports "
            "WHERE kind = ? AND state = 'loaded' ORDER BY loaded_at",
            [snake_case(entity_type)],
        )
        assert len(loaded) == 2
        (first_id, first_uri, first_rows), (second_id, second_uri, second_rows) = loaded
        assert first_rows == len(before[entity_type])
        assert second_rows == mews.count(entity_type)
        with duckdb.connect() as con:
            history = dict(
                con.execute(
                    "SELECT _export_id, count(*) FROM read_parquet([?, ?]) GROUP BY ALL",
                    [f"{first_uri}/*.parquet", f"{second_uri}/*.parquet"],
                ).fetchall()
            )
            assert history == {first_id: first_rows, second_id: second_rows}
            deleted_then = con.execute(
                "SELECT count(*) FROM read_parquet(?) WHERE CAST(Id AS VARCHAR) IN "
                "(SELECT unnest(?::VARCHAR[]))",
                [f"{first_uri}/*.parquet", list(mutation.deleted)],
            ).fetchone()[0]
            assert deleted_then == len(mutation.deleted)
        assert len(glob.glob(f"{first_uri}/*.parquet")) == mews.parts

        rows = query(setup, f"SELECT DISTINCT _export_id FROM mews.{snake_case(entity_type)}")
        assert rows == [(second_id,)]


def _seed_with_empty_fields() -> int:
    """A simulator seed whose first ResourceBlock has no Notes and first OrderItem is a rebate
    (``Data.Value`` null): with one record each, those fields are null in the whole snapshot."""
    for seed in range(1000):
        state = State(seed=seed, counts={"ResourceBlock": 1, "OrderItem": 1})
        try:
            if (
                state.record("ResourceBlock", 0)["Notes"] is None
                and state.record("OrderItem", 0)["Data"]["Value"] is None
            ):
                return seed
        finally:
            state.close()
    raise AssertionError("no such seed")


@pytest.mark.parametrize(
    "sandbox",
    [{"seed": _seed_with_empty_fields(), "counts": {"ResourceBlock": 1, "OrderItem": 1}}],
    indirect=True,
)
def test_a_field_null_in_the_first_snapshot_gets_values_later(setup: DagsterSetup) -> None:
    """Types are guessed from the JSON: a field null in every record of a snapshot is never
    typed NULL but VARCHAR (top level, or inside a STRUCT). The next snapshot, where it has
    values, loads and gives it their type."""
    mews = setup.sandbox.mews
    types = ["ResourceBlock", "OrderItem"]
    assert run_sync(setup, types).success

    def column_type(table: str, column: str) -> str:
        return query(
            setup,
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_schema = 'mews' AND table_name = ? AND column_name = ?",
            [table, column],
        )[0][0]

    assert column_type("resource_block", "Notes") == "VARCHAR"
    assert column_type("order_item", "Data") == 'STRUCT(Discriminator VARCHAR, "Value" VARCHAR)'

    mews.mutate("ResourceBlock", updated=1)  # Notes becomes text
    mews.mutate("OrderItem", added=9)  # product items: Data.Value becomes an object
    assert any(r["Data"]["Value"] for r in mews.records("OrderItem"))
    assert run_sync(setup, types).success

    for entity_type in types:
        assert_table_is_the_sandbox(setup, entity_type)
    assert column_type("resource_block", "Notes") == "VARCHAR"
    assert column_type("order_item", "Data") == (
        'STRUCT(Discriminator VARCHAR, "Value" STRUCT(ProductId UUID))'
    )


# -- 3. one export in flight per entity type ----------------------------------------------------


def test_pending_export_of_this_pipeline_is_adopted(setup: DagsterSetup) -> None:
    mews = setup.sandbox.mews
    mews.pending_seconds = 1.5  # still Pending when the run starts
    with Runner(setup) as runner:
        record, adopted = runner.start(KINDS["Payment"], ExportRequest(), source="test")
    assert not adopted and mews.status_of(record.export_id) == "Pending"
    adds = mews.add_calls

    result = run_sync(setup, ["Payment"])
    assert result.success
    assert mews.add_calls == adds  # no second exports/add (Mews would answer 400)
    assert [(e[0], e[1]) for e in exports(setup, "Payment")] == [(record.export_id, "loaded")]
    mat = result.asset_materializations_for_node("mews__payment")[0]
    assert mat.metadata["adopted_open_export"].value is True
    assert_table_is_the_sandbox(setup, "Payment")


def test_export_started_by_another_client_fails_clearly_without_a_storm(
    setup: DagsterSetup,
) -> None:
    mews = setup.sandbox.mews
    (foreign,) = mews.seed_open_exports(1, "Payment")  # Mews has it; our ledger does not
    adds = mews.add_calls

    result = run_sync(setup, ["Payment"], raise_on_error=False)
    assert not result.success
    text = step_failure_text(result)
    assert "ExportInFlightError" in text
    assert "another client" in text and "Payment" in text
    assert "try again" in text or "retried later" in text  # the hint
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == STEP_MAX_RETRIES
    # One exports/add per attempt, no hammering, and Dagster waited between attempts.
    assert mews.add_calls - adds == STEP_MAX_RETRIES + 1
    logs = setup.instance.all_logs(result.run_id)
    asked = [
        e.timestamp for e in logs if e.dagster_event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    restarted = [
        e.timestamp for e in logs if e.dagster_event_type == dg.DagsterEventType.STEP_RESTARTED
    ]
    assert len(asked) == len(restarted) == STEP_MAX_RETRIES
    assert all(r - a >= STEP_RETRY_SECONDS * 0.95 for a, r in zip(asked, restarted, strict=True))
    assert query(setup, "SELECT count(*) FROM pipeline.exports") == [(0,)]
    assert mews.status_of(foreign) == "Pending"  # we did not touch the other client's export


# -- 4. expiry ----------------------------------------------------------------------------------


def test_expired_before_ingest_leads_to_a_new_export(setup: DagsterSetup) -> None:
    mews = setup.sandbox.mews
    with Runner(setup) as runner:
        record, _ = runner.start(KINDS["Bill"], ExportRequest(), source="test")
        runner.wait_until_ready(KINDS["Bill"], record.export_id, timeout=10)
    mews.expire(record.export_id)  # Mews expires it before any run ingested it
    adds = mews.add_calls

    result = run_sync(setup, ["Bill"])
    assert result.success
    assert mews.add_calls == adds + 1
    (old_id, old_state, old_status, replaced_by, _), (new_id, new_state, *_rest) = exports(
        setup, "Bill"
    )
    assert old_id == record.export_id
    assert (old_state, old_status, replaced_by) == ("expired", "Expired", new_id)
    assert new_state == "loaded"
    assert query(setup, "SELECT DISTINCT _export_id FROM mews.bill") == [(new_id,)]
    assert_table_is_the_sandbox(setup, "Bill")


def test_dead_link_after_expires_utc_is_refreshed_through_get_all(
    setup: DagsterSetup,
) -> None:
    mews = setup.sandbox.mews
    mews.link_ttl_seconds = 0.01  # links die at the next full second (ExpiresUtc)
    with Runner(setup) as runner:
        record, _ = runner.start(KINDS["Company"], ExportRequest(), source="test")
        ready = runner.wait_until_ready(KINDS["Company"], record.export_id, timeout=10)
    assert ready.files and ready.expires_at is not None
    wait_until(lambda: time.time() > ready.expires_at.timestamp() + 0.05)
    mews.link_ttl_seconds = 3600
    getall, downloads = mews.getall_calls, mews.downloads

    assert run_sync(setup, ["Company"]).success
    assert mews.getall_calls > getall  # the ledger's old links were not trusted
    (old_id, old_state, old_status, replaced_by, _), (new_id, new_state, *_rest) = exports(
        setup, "Company"
    )
    assert (old_id, old_state, old_status, replaced_by) == (
        record.export_id,
        "expired",
        "Expired",
        new_id,
    )
    assert new_state == "loaded"
    assert mews.downloads - downloads == mews.parts  # only the new export's parts
    assert_table_is_the_sandbox(setup, "Company")


# -- 5. size mismatch ---------------------------------------------------------------------------


def test_size_mismatch_fails_and_the_previous_snapshot_stays(setup: DagsterSetup) -> None:
    mews = setup.sandbox.mews
    assert run_sync(setup, ["Customer"]).success
    before = table_records(setup, "Customer")
    first_id = exports(setup, "Customer")[0][0]
    mews.mutate("Customer", updated=2, deleted=2, added=2)
    mews.size_lie_next = True

    result = run_sync(setup, ["Customer"], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    message = failure.step_failure_data.error.message
    bad_id = exports(setup, "Customer")[1][0]
    assert "IntegrityError" in step_failure_text(result)
    assert "size mismatch" in message
    assert "provider=mews" in message and f"export={bad_id}" in message
    assert "file=part-0000.jsonl" in message
    # Nothing committed: the table is still exactly the first snapshot.
    assert table_records(setup, "Customer") == before
    assert query(setup, "SELECT DISTINCT _export_id FROM mews.customer") == [(first_id,)]
    assert query(
        setup, "SELECT count(*) FROM pipeline.export_files WHERE export_id = ?", [bad_id]
    ) == [(0,)]
    # Each later run adopts it again (a repaired file could still load) until its poison
    # budget is spent; then it is given up, with the reason on the failed step.
    for _ in range(2, POISON_BUDGET + 1):
        again = run_sync(setup, ["Customer"], raise_on_error=False)
        assert not again.success
        assert exports(setup, "Customer")[1][0] == bad_id  # adopted, not requested anew
    failure = next(e for e in again.all_events if e.is_step_failure)
    facts = failure.step_failure_data.user_failure_data.metadata
    assert facts["export_state"].value == "failed"
    assert facts["permanent_failures"].value == POISON_BUDGET
    assert "size mismatch" in facts["failure_reason"].value
    # The next run asks for a fresh one and recovers.
    assert run_sync(setup, ["Customer"]).success
    assert_table_is_the_sandbox(setup, "Customer")
    states = [e[1] for e in exports(setup, "Customer")]
    assert states == ["loaded", "failed", "loaded"]


# -- 6. Failed ----------------------------------------------------------------------------------


def test_failed_export_surfaces_with_the_provider_status(setup: DagsterSetup) -> None:
    mews = setup.sandbox.mews
    mews.fail_next.add("Payment")
    result = run_sync(setup, ["Payment", "Company"], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == "mews__payment"
    message = failure.step_failure_data.error.message
    assert "Failed" in message and "provider=mews" in message and "kind=payment" in message
    (export_id, state, provider_status, _, rows) = exports(setup, "Payment")[0]
    assert f"export={export_id}" in message
    assert (state, provider_status, rows) == ("failed", "Failed", None)
    # No retry storm for a terminal failure, and the other entity type is unaffected.
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert query(
        setup, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'payment'"
    ) == [(0,)]
    assert_table_is_the_sandbox(setup, "Company")


# -- 7. the sensor polls in batches -------------------------------------------------------------


def test_sensor_polls_2500_open_exports_in_three_calls(setup: DagsterSetup) -> None:
    mews = setup.sandbox.mews
    mews.pending_seconds = 3600
    n = 2500
    seeded = mews.seed_open_exports(n, "Reservation")
    with Runner(setup) as runner:
        # Thousands of open exports (as after a restore), written in one statement.
        with runner.ledger.warehouse.transaction() as con:
            con.execute(
                "INSERT INTO pipeline.exports (provider, kind, export_id, state, source, "
                "requested_at, updated_at) SELECT 'mews', ?, unnest(?), 'pending', 'test', "
                "now(), now()",
                [KINDS["Reservation"].name, list(seeded)],
            )
        assert len(runner.ledger.open_exports("mews")) == n

        before = mews.getall_calls
        result = tick(setup)
        assert mews.getall_calls - before == math.ceil(n / 1000) == 3
        assert result.run_requests == []
        assert "polled=2500 calls=3" in result.cursor

        # Three exports of other types, started by this pipeline, finish.
        started = {
            t: runner.start(KINDS[t], ExportRequest(), source="test")[0].export_id
            for t in ("Payment", "Customer", "Bill")
        }
    mews.pending_seconds = 0.05
    mews.processing_seconds = 0.05
    wait_until(lambda: all(mews.status_of(i) == "Success" for i in started.values()))

    before = mews.getall_calls
    result = tick(setup)
    assert mews.getall_calls - before == math.ceil((n + 3) / 1000)
    assert sorted(rr.run_key for rr in result.run_requests) == sorted(
        f"mews:{i}" for i in started.values()
    )
    for rr in result.run_requests:
        export_id = rr.run_key.removeprefix("mews:")
        entity_type = next(t for t, i in started.items() if i == export_id)
        assert rr.asset_selection == [asset_key(KINDS[entity_type])]
        config = rr.run_config["ops"][f"mews__{snake_case(entity_type)}"]["config"]
        assert config["export_id"] == export_id


# -- 8. the schedule ----------------------------------------------------------------------------


def test_schedule_requests_a_full_snapshot_of_all_nine(setup: DagsterSetup) -> None:
    schedule = setup.defs.resolve_schedule_def("mews_schedule")
    assert schedule.cron_schedule == "0 3 * * *"
    when = datetime(2025, 6, 1, 3, 0, tzinfo=UTC)
    ctx = dg.build_schedule_context(
        instance=setup.instance, resources=setup.for_provider("mews"), scheduled_execution_time=when
    )
    (request,) = schedule.evaluate_tick(ctx).run_requests
    assert request.run_key == f"mews:{when.isoformat()}"
    assert sorted(request.asset_selection) == sorted(asset_key(k) for k in MEWS.kinds)
    assert len(request.asset_selection) == 9
    ops = request.run_config["ops"]
    assert set(ops) == {f"mews__{k.name}" for k in MEWS.kinds}
    for op_config in ops.values():
        config = op_config["config"]
        assert config.get("modified_since") is None and config.get("window_end") is None
        assert not config.get("full_refresh")
    assert request.tags["export_pipeline/trigger"] == "schedule"


def test_wrong_token_names_both_settings(
    setup: DagsterSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEWS_ACCESS_TOKEN", "not-the-token")
    result = run_sync(setup, ["Company"], raise_on_error=False)
    assert not result.success
    message = next(
        e for e in result.all_events if e.is_step_failure
    ).step_failure_data.error.message
    assert "MEWS_CLIENT_TOKEN" in message and "MEWS_ACCESS_TOKEN" in message
    assert "not-the-token" not in message
