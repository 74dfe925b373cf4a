"""Message-log exports end to end: Dagster's real APIs -> the deliveries API over HTTP -> 302 to
a presigned URL on the loopback S3 server -> CSV -> Parquet -> DuckDB on disk.

Each run is the project's real ``deliveries_sync`` job (both directions, their asset checks),
its schedule and its sensor, against the sandbox simulator. A few tests make a race of the real
API happen on cue (an export that expires or is forgotten between the status call and the
download, a file store lagging the status): :func:`intercept` runs a step inside the simulator
just before it answers a call, which is the only way to place such a race deterministically.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from dagster_aws.s3 import S3Resource

from export_pipeline.core.load import load_parquet
from export_pipeline.core.model import ExportKind
from export_pipeline.core.storage import S3Storage
from export_pipeline.core.windows import next_request
from export_pipeline.definitions import BINDINGS, build_defs
from export_pipeline.defs.assets import asset_key, make_runner, op_name
from export_pipeline.defs.resources import SyncSettingsResource, WarehouseResource
from export_pipeline.sandbox import deliveries as sim
from export_pipeline_tests.dagster.conftest import DagsterSetup


@pytest.fixture
def simulators() -> tuple[str, ...]:
    return ("deliveries",)  # the sandbox starts only these


DELIVERIES = next(b for b in BINDINGS if b.name == "deliveries")
KINDS = {k.params["direction"]: k for k in DELIVERIES.kinds}
OUT, IN = KINDS["outbound"], KINDS["inbound"]
OVERLAP = timedelta(seconds=300)  # SyncSettingsResource defaults, as the fixture configures
SETTLE = timedelta(seconds=120)
LOOKBACK = timedelta(hours=168)
REQUEST_ID = re.compile(r"request_id=(req_[0-9a-f]{16})")
# The fixture's fast polling, repeated where a test needs other sync settings on top.
FAST = {
    "poll_initial_seconds": 0.05,
    "poll_max_seconds": 0.5,
    "wait_timeout_seconds": 60,
    "http_base_delay_seconds": 0.01,
}


# -- helpers -----------------------------------------------------------------------------------


def run_sync(
    setup: DagsterSetup,
    configs: dict[str, dict[str, Any]] | None = None,
    *,
    kinds: Iterable[ExportKind] = (OUT, IN),
    run_config: dict[str, Any] | None = None,
) -> dg.ExecuteInProcessResult:
    """Execute the real ``deliveries_sync`` job (assets + checks), optionally a subset of it."""
    kinds = list(kinds)
    configs = configs or {}
    selection = None if len(kinds) == len(KINDS) else [asset_key(k) for k in kinds]
    return setup.job("deliveries_sync").execute_in_process(
        run_config=run_config
        or {"ops": {op_name(k): {"config": configs.get(k.name, {})} for k in kinds}},
        instance=setup.instance,
        asset_selection=selection,
        raise_on_error=False,
    )


def reconfigure(setup: DagsterSetup, **resources: Any) -> None:
    """Swap resources and rebuild the project's Definitions around them."""
    setup.resources.update(resources)
    setup.defs = build_defs(setup.resources)


def query(setup: DagsterSetup, sql: str, params: list[Any] | None = None) -> list[tuple]:
    with duckdb.connect(str(setup.warehouse_path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def exports(setup: DagsterSetup, kind: ExportKind | None = None) -> list[dict[str, Any]]:
    """Ledger rows (oldest first) as dicts."""
    sql = "SELECT * FROM pipeline.exports"
    params: list[Any] = []
    if kind is not None:
        sql += " WHERE kind = ?"
        params.append(kind.name)
    with duckdb.connect(str(setup.warehouse_path), read_only=True) as con:
        cur = con.execute(sql + " ORDER BY requested_at", params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def cursor_of(setup: DagsterSetup, kind: ExportKind) -> datetime | None:
    rows = query(
        setup,
        "SELECT cursor_value FROM pipeline.cursors WHERE provider = 'deliveries' AND kind = ?",
        [kind.name],
    )
    return rows[0][0] if rows else None


def table_rows(setup: DagsterSetup, kind: ExportKind) -> dict[str, tuple]:
    """id -> the kind's typed columns, as loaded."""
    assert kind.columns is not None
    cols = ", ".join(f'"{c}"' for c in kind.columns)
    return {r[0]: r for r in query(setup, f"SELECT {cols} FROM {kind.table}")}


def sandbox_rows(
    state: sim.State, kind: ExportKind, start: datetime, end: datetime
) -> dict[str, tuple]:
    """What the platform holds for ``start <= created_at < end``, in the table's column order."""
    assert kind.columns is not None
    return {
        m["id"]: tuple(m.get(c) for c in kind.columns)
        for m in state.rows_for(kind.params["direction"], start, end)
    }


def step_failures(result: dg.ExecuteInProcessResult) -> list[dg.DagsterEvent]:
    return [e for e in result.all_events if e.is_step_failure]


def failure_metadata(event: dg.DagsterEvent) -> dict[str, Any]:
    data = event.step_failure_data.user_failure_data
    return {k: v.value for k, v in data.metadata.items()} if data else {}


def run_log_text(setup: DagsterSetup, run_id: str) -> str:
    """Everything Dagster stored about a run (events, messages, errors, metadata)."""
    return "\n".join(dg.serialize_value(e) for e in setup.instance.all_logs(run_id))


def intercept(state: sim.State, action: Callable[[str, str], None]) -> None:
    """Run ``action(method, path)`` inside the simulator before it answers each API call."""
    original = state.gate

    def gate(request: Any) -> None:
        action(request.method, request.url.path)
        original(request)

    state.gate = gate  # type: ignore[method-assign]


def download_id(path: str) -> str | None:
    """The export id of a ``/v1/exports/{id}/download`` path, else None."""
    parts = path.strip("/").split("/")
    return parts[2] if len(parts) == 4 and parts[3] == "download" else None


def start_export(setup: DagsterSetup, kind: ExportKind) -> str:
    """Request an export through the project's runner (recorded in the ledger), not loaded."""
    with dg.build_resources(setup.for_provider("deliveries")) as res:
        runner = make_runner(res, DELIVERIES)
        try:
            request = next_request(
                kind, None, now=datetime.now(UTC), settings=res.sync_settings.incremental()
            )
            assert request is not None
            record, adopted = runner.start(kind, request, source="test")
        finally:
            runner.provider.close()
    assert not adopted
    return record.export_id


def posts(state: sim.State) -> list[sim.ApiCall]:
    return [c for c in state.calls if c.method == "POST" and c.path == "/v1/exports"]


# -- 1. both directions, twice: windows, cursor, overlap ---------------------------------------


def test_both_directions_load_their_window_then_continue_from_the_cursor(
    dagster_setup: DagsterSetup,
) -> None:
    setup = dagster_setup
    state = setup.sandbox.deliveries
    t0 = datetime.now(UTC)
    # Messages just before the first window's end: inside the next window's overlap as well.
    in_overlap = {
        d: {m["id"] for m in state.add_messages(3, at=t0 - timedelta(seconds=200), direction=d)}
        for d in KINDS
    }

    result = run_sync(setup)
    t1 = datetime.now(UTC)
    assert result.success

    first: dict[str, dict[str, Any]] = {}
    for direction, kind in KINDS.items():
        (rec,) = exports(setup, kind)
        first[direction] = rec
        start, end = rec["modified_since"], rec["window_end"]
        # The first window: [now - initial_lookback, now - settle), whole seconds.
        assert end - start == LOOKBACK - SETTLE
        assert t0 - SETTLE - timedelta(seconds=1) <= end <= t1 - SETTLE
        # The provider was asked for exactly the window the ledger records.
        asked = state.exports[rec["export_id"]]
        assert (asked.direction, asked.start_time, asked.end_time) == (direction, start, end)
        # Rows: exactly the platform's messages of that direction in that window.
        expected = sandbox_rows(state, kind, start, end)
        assert expected and in_overlap[direction] <= expected.keys()
        assert table_rows(setup, kind) == expected
        assert rec["state"] == "loaded"
        assert rec["rows_loaded"] == rec["expected_rows"] == len(expected)
        # The cursor is the window's end.
        assert cursor_of(setup, kind) == end

    checks = setup.run_checks(result).get_asset_check_evaluations()
    assert {(c.asset_key, c.check_name) for c in checks} == {
        (asset_key(k), name)
        for k in KINDS.values()
        for name in ("rows_match_provider", "primary_key_unique", "values_in_range")
    }
    assert all(c.passed for c in checks)
    for check in (c for c in checks if c.check_name == "rows_match_provider"):
        md = {k: v.value for k, v in check.metadata.items()}
        assert md["provider_rows"] == md["rows_read"] == md["rows_in_table_from_export"] > 0

    # New messages right after each window's end; wait until they are settled (the next
    # window's end, now - settle in whole seconds, must pass them).
    latest_cursor = max(cursor_of(setup, k) for k in KINDS.values())
    while datetime.now(UTC) - SETTLE < latest_cursor + timedelta(seconds=1.05):
        time.sleep(0.05)
    fresh = {
        d: {
            m["id"]
            for m in state.add_messages(
                4, at=cursor_of(setup, k) + timedelta(milliseconds=1), direction=d
            )
        }
        for d, k in KINDS.items()
    }

    t2 = datetime.now(UTC)
    result = run_sync(setup)
    t3 = datetime.now(UTC)
    assert result.success
    assert all(c.passed for c in setup.run_checks(result).get_asset_check_evaluations())

    for direction, kind in KINDS.items():
        old, rec = exports(setup, kind)
        assert old["export_id"] == first[direction]["export_id"]
        start, end = rec["modified_since"], rec["window_end"]
        # [previous end - overlap, now - settle): in the ledger and at the provider.
        assert start == first[direction]["window_end"] - OVERLAP
        assert t2 - SETTLE - timedelta(seconds=1) <= end <= t3 - SETTLE
        asked = state.exports[rec["export_id"]]
        assert (asked.start_time, asked.end_time) == (start, end)

        window = sandbox_rows(state, kind, start, end)
        assert fresh[direction] | in_overlap[direction] <= window.keys()
        assert rec["rows_loaded"] == rec["expected_rows"] == len(window)
        # The table: every message of [first start, last end) once, nothing else.
        everything = sandbox_rows(state, kind, first[direction]["modified_since"], end)
        assert table_rows(setup, kind) == everything
        assert query(setup, f"SELECT count(*) - count(DISTINCT id) FROM {kind.table}") == [(0,)]
        # The overlap's duplicates were absorbed by the merge on id, not inserted twice.
        before = sandbox_rows(
            state, kind, first[direction]["modified_since"], first[direction]["window_end"]
        )
        mat = result.asset_materializations_for_node(op_name(kind))[0]
        assert mat.metadata["rows_updated"].value == len(window.keys() & before.keys()) >= 3
        assert mat.metadata["rows_inserted"].value == len(window.keys() - before.keys()) >= 4
        assert cursor_of(setup, kind) == end

    assert len(posts(state)) == 4  # one export per direction per run


# -- 2. the presigned GET carries no API key ---------------------------------------------------


def test_the_api_key_goes_to_the_api_and_never_to_s3(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state, s3 = setup.sandbox.deliveries, setup.sandbox.s3
    result = run_sync(setup)
    assert result.success

    for kind in KINDS.values():
        (rec,) = exports(setup, kind)
        export_id = rec["export_id"]
        # The API saw the key on the call that answers with the 302 ...
        downloads = [c for c in state.calls if c.path == f"/v1/exports/{export_id}/download"]
        assert downloads and all(c.authorization == f"Bearer {state.token}" for c in downloads)
        # ... and the S3 host got the object GET presigned, without any Authorization header.
        gets = [
            r
            for r in s3.requests
            if r.method == "GET" and r.path == f"/{state.bucket}/{state.object_key(export_id)}"
        ]
        assert gets, "the download never reached the S3 server"
        for request in gets:
            assert request.is_presigned and "X-Amz-Credential=" in request.query
            assert "authorization" not in request.headers
    # Nor did the key reach S3 in any other header, on any request.
    assert not [r for r in s3.requests if state.token in repr(r.headers)]


# -- 3. every error code, through Dagster ------------------------------------------------------


def test_export_not_ready_by_id_fails_clearly_then_the_sensor_loads_it(
    dagster_setup: DagsterSetup,
) -> None:
    setup = dagster_setup
    state = setup.sandbox.deliveries
    state.ready_after_seconds = 3600  # stays pending
    export_id = start_export(setup, OUT)

    started = time.monotonic()
    result = run_sync(setup, {OUT.name: {"export_id": export_id}}, kinds=[OUT])
    assert not result.success
    # A clear failure now, not step retries that end in "Exceeded max_retries".
    assert time.monotonic() - started < 25  # a step retry alone would wait 30 s
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    (failure,) = step_failures(result)
    message = failure.step_failure_data.error.message
    assert "not ready" in message and "pending" in message and export_id in message
    assert failure_metadata(failure)["export_id"] == export_id
    # Nothing committed: no table, no cursor; the export stays open in the ledger.
    assert query(setup, "SELECT count(*) FROM pipeline.cursors") == [(0,)]
    assert not query(
        setup, "SELECT 1 FROM information_schema.tables WHERE table_schema = 'deliveries'"
    )
    assert [r["state"] for r in exports(setup)] == ["pending"]

    # Once it is ready the sensor launches exactly that ingest, which loads it.
    state.ready_after_seconds = 0
    sensor = setup.defs.resolve_sensor_def("deliveries_exports_sensor")
    tick = sensor.evaluate_tick(
        dg.build_sensor_context(
            instance=setup.instance,
            resources=setup.for_provider("deliveries"),
            definitions=setup.defs,
        )
    )
    (request,) = tick.run_requests
    assert request.run_key == f"deliveries:{export_id}"
    assert run_sync(setup, kinds=[OUT], run_config=request.run_config).success
    (rec,) = exports(setup)
    assert rec["state"] == "loaded"
    assert table_rows(setup, OUT) == sandbox_rows(
        state, OUT, rec["modified_since"], rec["window_end"]
    )


def test_export_not_ready_at_download_is_waited_out(dagster_setup: DagsterSetup) -> None:
    """The status says completed but /download answers 409 EXPORT_NOT_READY (the platform's
    file store lagging its status): the step is retried, adopts the same export and loads it."""
    setup = dagster_setup
    reconfigure(
        setup,
        sync_settings=SyncSettingsResource(**FAST, step_retry_seconds=0.2, step_max_retries=2),
    )
    state = setup.sandbox.deliveries
    lagging: list[str] = []

    def lag_once(method: str, path: str) -> None:
        export_id = download_id(path)
        if export_id and not lagging:
            lagging.append(export_id)
            state.ready_after_seconds = 3600
            state.exports[export_id].status = "processing"
        elif lagging and export_id is None:
            state.ready_after_seconds = 0  # the next status call finds it completed again

    intercept(state, lag_once)
    result = run_sync(setup, kinds=[OUT])
    assert result.success
    assert [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    logs = run_log_text(setup, result.run_id)
    assert "EXPORT_NOT_READY" in logs and REQUEST_ID.search(logs)
    # The same export, adopted on the retry: one request, two downloads, loaded once.
    (rec,) = exports(setup)
    assert rec["export_id"] == lagging[0] and rec["state"] == "loaded"
    assert len(posts(state)) == 1
    assert table_rows(setup, OUT) == sandbox_rows(
        state, OUT, rec["modified_since"], rec["window_end"]
    )


@pytest.mark.parametrize("when", ["before the run", "between status and download"])
def test_expired_export_is_requested_again_for_the_same_window(
    dagster_setup: DagsterSetup, when: str
) -> None:
    setup = dagster_setup
    state = setup.sandbox.deliveries
    if when == "before the run":
        state.ready_after_seconds = 3600
        old_id = start_export(setup, OUT)
        state.expire_export(old_id)
        state.ready_after_seconds = 0
    else:
        expired: list[str] = []

        def expire_once(method: str, path: str) -> None:
            export_id = download_id(path)
            if export_id and not expired:
                expired.append(export_id)
                state.expire_export(export_id)  # /download now answers 410 EXPORT_EXPIRED

        intercept(state, expire_once)

    result = run_sync(setup, kinds=[OUT])
    assert result.success
    old, new = exports(setup, OUT)
    assert old["state"] == "expired" and old["replaced_by"] == new["export_id"]
    assert new["state"] == "loaded"
    if when == "between status and download":
        assert old["export_id"] == expired[0]
        assert old["error_code"] == "EXPORT_EXPIRED"
        assert REQUEST_ID.search(old["error_message"])
    # The same window asked again (ledger and provider), and its rows loaded.
    assert (new["modified_since"], new["window_end"]) == (old["modified_since"], old["window_end"])
    asked = [
        (e.start_time, e.end_time) for e in (state.exports[x["export_id"]] for x in (old, new))
    ]
    assert asked[0] == asked[1] == (new["modified_since"], new["window_end"])
    assert table_rows(setup, OUT) == sandbox_rows(
        state, OUT, new["modified_since"], new["window_end"]
    )
    assert cursor_of(setup, OUT) == new["window_end"]
    mat = result.asset_materializations_for_node(op_name(OUT))[0]
    assert mat.metadata["export_id"].value == new["export_id"]


@pytest.mark.parametrize("when", ["before the run", "between status and download"])
def test_lost_export_is_marked_lost_and_its_window_requested_again(
    dagster_setup: DagsterSetup, when: str
) -> None:
    setup = dagster_setup
    state = setup.sandbox.deliveries
    if when == "before the run":
        state.ready_after_seconds = 3600
        old_id = start_export(setup, OUT)
        state.forget_export(old_id)  # the status call now answers 404 NOT_FOUND
        state.ready_after_seconds = 0
    else:

        def forget_once(method: str, path: str) -> None:
            export_id = download_id(path)
            if export_id and export_id in state.exports and len(posts(state)) == 1:
                state.forget_export(export_id)  # /download now answers 404 NOT_FOUND

        intercept(state, forget_once)

    result = run_sync(setup, kinds=[OUT])
    assert result.success
    old, new = exports(setup, OUT)
    assert old["state"] == "lost" and old["replaced_by"] == new["export_id"]
    assert old["error_code"] == "NOT_FOUND"
    assert REQUEST_ID.search(old["error_message"])  # what support will ask for
    assert new["state"] == "loaded"
    assert (new["modified_since"], new["window_end"]) == (old["modified_since"], old["window_end"])
    assert old["export_id"] not in state.exports  # the platform really forgot it
    asked = state.exports[new["export_id"]]
    assert (asked.start_time, asked.end_time) == (old["modified_since"], old["window_end"])
    assert table_rows(setup, OUT) == sandbox_rows(
        state, OUT, new["modified_since"], new["window_end"]
    )


def test_lost_export_by_id_fails_with_the_request_id(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    state = setup.sandbox.deliveries
    export_id = start_export(setup, OUT)
    state.forget_export(export_id)
    result = run_sync(setup, {OUT.name: {"export_id": export_id}}, kinds=[OUT])
    assert not result.success
    (failure,) = step_failures(result)
    message = failure.step_failure_data.error.message
    found = REQUEST_ID.search(message)
    assert found and "NOT_FOUND" in message and export_id in message
    metadata = failure_metadata(failure)
    assert metadata["request_id"] == found.group(1)
    assert metadata["code"] == "NOT_FOUND"
    (rec,) = exports(setup)
    assert (rec["state"], rec["error_code"]) == ("lost", "NOT_FOUND")
    assert query(setup, "SELECT count(*) FROM pipeline.cursors") == [(0,)]


def test_wrong_api_key_names_the_env_var_and_request_id_never_the_key(
    dagster_setup: DagsterSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    setup = dagster_setup
    state = setup.sandbox.deliveries
    wrong = f"sk_wrong_{uuid.uuid4().hex}"
    monkeypatch.setenv("DELIVERIES_API_KEY", wrong)
    result = run_sync(setup)
    assert not result.success
    failures = step_failures(result)
    assert len(failures) == 2  # both directions
    for failure in failures:
        message = failure.step_failure_data.error.message
        found = REQUEST_ID.search(message)
        assert found and "DELIVERIES_API_KEY" in message and "UNAUTHORIZED" in message
        metadata = failure_metadata(failure)
        assert metadata["request_id"] == found.group(1)
        assert metadata["code"] == "UNAUTHORIZED"
    # The key is nowhere in what Dagster stored about the run (nor is the right one).
    stored = run_log_text(setup, result.run_id)
    assert wrong not in stored and state.token not in stored
    # Not retried (one refused request per direction) and nothing recorded.
    assert [c.authorization for c in posts(state)] == [f"Bearer {wrong}"] * 2
    assert exports(setup) == []


# -- 4. an expired presigned URL ---------------------------------------------------------------


def test_expired_presigned_url_is_replaced_by_asking_download_again(
    dagster_setup: DagsterSetup,
) -> None:
    setup = dagster_setup
    state, s3 = setup.sandbox.deliveries, setup.sandbox.s3
    state.presign_ttl_seconds = 0  # the first redirect target is dead on arrival
    calls: list[str] = []

    def fresh_links_after_the_first(method: str, path: str) -> None:
        if download_id(path):
            calls.append(path)
            if len(calls) > 1:
                state.presign_ttl_seconds = 300

    intercept(state, fresh_links_after_the_first)
    result = run_sync(setup, kinds=[OUT])
    assert result.success
    (rec,) = exports(setup)
    assert rec["state"] == "loaded"
    assert calls == [f"/v1/exports/{rec['export_id']}/download"] * 2
    gets = [
        r
        for r in s3.requests
        if r.method == "GET" and r.path == f"/{state.bucket}/{state.object_key(rec['export_id'])}"
    ]
    assert ["X-Amz-Expires=0" in g.query for g in gets] == [True, False]
    assert all("authorization" not in g.headers for g in gets)
    assert len(posts(state)) == 1  # the link was renewed, the export was not re-requested
    assert table_rows(setup, OUT) == sandbox_rows(
        state, OUT, rec["modified_since"], rec["window_end"]
    )


# -- 6. S3 as the storage tier -----------------------------------------------------------------


def test_s3_storage_lands_raw_and_parquet_and_duckdb_loads_from_them(
    dagster_setup: DagsterSetup, tmp_path: Path
) -> None:
    setup = dagster_setup
    state, s3 = setup.sandbox.deliveries, setup.sandbox.s3
    bucket = f"lake-{uuid.uuid4().hex[:12]}"  # moto's buckets are process-global
    s3.ensure_bucket(bucket)
    s3_resource = S3Resource(
        endpoint_url=s3.endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    reconfigure(
        setup,
        warehouse=WarehouseResource(
            path=str(setup.warehouse_path),
            data_dir=str(setup.data_dir),
            storage=f"s3://{bucket}/warehouse",
            lock_timeout_seconds=30,
        ),
        s3=s3_resource,
    )
    result = run_sync(setup)
    assert result.success
    assert all(c.passed for c in setup.run_checks(result).get_asset_check_evaluations())

    client = s3_resource.get_client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    for kind in KINDS.values():
        (rec,) = exports(setup, kind)
        export_id = rec["export_id"]
        base = f"warehouse/{{}}/deliveries/{kind.name}/{export_id}/"
        raw_prefix, parquet_prefix = base.format("raw"), base.format("parquet")
        assert rec["raw_uri"] == f"s3://{bucket}/{raw_prefix}"
        assert rec["parquet_uri"] == f"s3://{bucket}/{parquet_prefix}"
        assert raw_prefix + "export.csv" in keys
        parquet_keys = sorted(k for k in keys if k.startswith(parquet_prefix))
        assert parquet_keys and all(k.endswith(".parquet") for k in parquet_keys)
        # The raw tier holds exactly the file the platform exported.
        raw = client.get_object(Bucket=bucket, Key=raw_prefix + "export.csv")["Body"].read()
        original = s3.client().get_object(Bucket=state.bucket, Key=state.object_key(export_id))
        assert raw == original["Body"].read()
        # The load read the published objects back from S3 (after uploading them).
        traffic = [(r.method, r.path) for r in s3.requests if parquet_prefix in r.path]
        for key in parquet_keys:
            put = traffic.index(("PUT", f"/{bucket}/{key}"))
            assert ("GET", f"/{bucket}/{key}") in traffic[put:]
        expected = sandbox_rows(state, kind, rec["modified_since"], rec["window_end"])
        assert table_rows(setup, kind) == expected

        # A second worker with an empty disk rebuilds the same table from S3 alone.
        other = S3Storage(s3_resource.get_client(), bucket, "warehouse", tmp_path / "w2-cache")
        files = other.fetch(rec["parquet_uri"], tmp_path / "w2" / kind.name)
        rebuilt = tmp_path / f"rebuilt-{kind.name}.duckdb"
        with duckdb.connect(str(rebuilt)) as con:
            con.execute("BEGIN")
            load_parquet(con, kind, files)
            con.execute("COMMIT")
            again = con.execute(f"SELECT * FROM {kind.table} ORDER BY id").fetchall()
        assert again == query(setup, f"SELECT * FROM {kind.table} ORDER BY id")

    # Nothing landed in the local tiers; the local cache holds no read-back leftovers.
    assert not (setup.data_dir / "raw").exists() and not (setup.data_dir / "parquet").exists()
    assert not list((setup.data_dir / "cache").rglob("*.published"))


# -- 7. the schedule ---------------------------------------------------------------------------


def test_schedule_windows_come_from_the_cursor_and_empty_ones_are_skipped(
    dagster_setup: DagsterSetup,
) -> None:
    setup = dagster_setup
    state = setup.sandbox.deliveries
    schedule = setup.defs.resolve_schedule_def("deliveries_schedule")

    def tick(at: datetime) -> Any:
        return schedule.evaluate_tick(
            dg.build_schedule_context(
                instance=setup.instance,
                resources=setup.for_provider("deliveries"),
                scheduled_execution_time=at,
            )
        )

    now = datetime.now(UTC)
    (request,) = tick(now).run_requests
    assert set(request.asset_selection) == {asset_key(k) for k in KINDS.values()}
    for kind in KINDS.values():
        config = request.run_config["ops"][op_name(kind)]["config"]
        assert datetime.fromisoformat(config["modified_since"]) == (now - LOOKBACK).replace(
            microsecond=0
        )
        assert datetime.fromisoformat(config["window_end"]) == (now - SETTLE).replace(microsecond=0)
        assert not config.get("full_refresh")

    # The run asks the provider for exactly the windows in the run config.
    assert run_sync(setup, run_config=request.run_config).success
    for kind in KINDS.values():
        config = request.run_config["ops"][op_name(kind)]["config"]
        (rec,) = exports(setup, kind)
        window = (rec["modified_since"], rec["window_end"])
        assert window == tuple(
            datetime.fromisoformat(config[k]) for k in ("modified_since", "window_end")
        )
        asked = state.exports[rec["export_id"]]
        assert (asked.start_time, asked.end_time) == window
        assert cursor_of(setup, kind) == rec["window_end"]

    # An hour later: each kind continues from its cursor, minus the overlap.
    later = now + timedelta(hours=1)
    (request,) = tick(later).run_requests
    for kind in KINDS.values():
        config = request.run_config["ops"][op_name(kind)]["config"]
        assert datetime.fromisoformat(config["modified_since"]) == cursor_of(setup, kind) - OVERLAP
        assert datetime.fromisoformat(config["window_end"]) == (later - SETTLE).replace(
            microsecond=0
        )

    # While now - settle has not passed the cursors, there is nothing new: skip.
    earliest = min(cursor_of(setup, k) for k in KINDS.values())
    for at in (earliest + SETTLE, earliest + SETTLE - timedelta(seconds=30)):
        skipped = tick(at)
        assert not skipped.run_requests
        assert "no kind has a new window yet" in skipped.skip_message
