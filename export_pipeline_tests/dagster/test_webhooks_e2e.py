"""The push path end to end: a sender POSTs to the real receiver over loopback, the event lands in
the SQLite store, the provider's sensor turns it into a ledger update and a run, and the run loads
DuckDB on disk from the real sandbox. Nothing in between is mocked.

Runs are executed the way the daemon would launch them: with the sensor's ``run_key`` and name as
tags, and a run request whose key already has a run is dropped (``daemon_would_launch``), because
a run key that was spent on a failed run can never be launched again by that sensor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import httpx
import pytest
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG

import export_pipeline
from export_pipeline.core.errors import ExportNotReadyError
from export_pipeline.core.model import ExportRequest
from export_pipeline.definitions import BINDINGS
from export_pipeline.defs.assets import make_runner
from export_pipeline.sandbox.server import RunningServer, free_port
from export_pipeline.webhooks.receiver import SECRET_ENV, TOKEN_ENV, ReceiverSettings, create_app
from export_pipeline.webhooks.store import EventStore
from export_pipeline_tests.conftest import guarded_pythonpath
from export_pipeline_tests.dagster.conftest import DagsterSetup
from export_pipeline_tests.webhooks.conftest import (
    LOCATIONS_PATH,
    MAPPING_PATH,
    SECRET,
    encode,
    minutes_ago,
    sign,
)


@pytest.fixture
def simulators() -> tuple[str, ...]:
    return ("locations", "mapping")  # the sandbox starts only these


LOCATIONS = next(b for b in BINDINGS if b.name == "locations")
KIND = LOCATIONS.kinds[0]
LOCATIONS_SENSOR = "locations_exports_sensor"
MAPPING_SENSOR = "mapping_exports_sensor"
MAX_BODY = 8192
N = 300  # locations in the shared sandbox fixture


# -- helpers -----------------------------------------------------------------------------------


@dataclass
class Receiver:
    """The real receiver on loopback, recording into the store the sensors read."""

    server: RunningServer
    store: EventStore

    def post(
        self, body: bytes, headers: Mapping[str, str] | None = None, *, path: str = LOCATIONS_PATH
    ) -> httpx.Response:
        """POST ``body`` signed with the shared secret (or with the given headers)."""
        return httpx.post(
            self.server.base_url + path,
            content=body,
            headers=dict(headers) if headers is not None else sign(body),
            timeout=10,
        )

    def stop(self) -> None:
        self.server.stop()


def start_receiver(setup: DagsterSetup) -> Receiver:
    """A receiver on the very store path the sensors are configured with."""
    store = EventStore(Path(setup.resources["webhook_events"].path))  # type: ignore[attr-defined]
    settings = ReceiverSettings(secrets=(SECRET,), max_body_bytes=MAX_BODY)
    return Receiver(RunningServer(create_app(store, settings)).start(), store)


@pytest.fixture
def receiver(dagster_setup: DagsterSetup) -> Iterator[Receiver]:
    rec = start_receiver(dagster_setup)
    yield rec
    rec.stop()


def tick(setup: DagsterSetup, sensor: str = LOCATIONS_SENSOR) -> dg.SensorResult:
    """One evaluation of the project's real sensor, as the daemon would run it."""
    ctx = dg.build_sensor_context(
        instance=setup.instance,
        # With the ref, the tick can check a run's partition against the dynamic partitions the
        # same tick adds (mapping jobs), as in the daemon.
        instance_ref=setup.instance.get_ref(),
        resources=setup.for_provider(sensor.removesuffix("_exports_sensor")),
        definitions=setup.defs,
    )
    return setup.defs.resolve_sensor_def(sensor).evaluate_tick(ctx)


def daemon_would_launch(
    setup: DagsterSetup, result: Any, sensor: str = LOCATIONS_SENSOR
) -> list[dg.RunRequest]:
    """The run requests the sensor daemon launches: it skips a key that already has a run of
    this sensor, whatever that run's outcome (dagster/_daemon/sensor.py fetch_existing_runs)."""
    fresh = []
    for rr in result.run_requests or []:
        runs = setup.instance.get_runs(
            filters=dg.RunsFilter(tags={RUN_KEY_TAG: rr.run_key, SENSOR_NAME_TAG: sensor})
        )
        if not runs:
            fresh.append(rr)
    return fresh


def launch(
    setup: DagsterSetup,
    rr: dg.RunRequest,
    *,
    sensor: str = LOCATIONS_SENSOR,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """Execute exactly what the sensor asked for, tagged as the daemon tags a sensor run."""
    tags = {**(rr.tags or {}), RUN_KEY_TAG: rr.run_key, SENSOR_NAME_TAG: sensor}
    if sensor == LOCATIONS_SENSOR:
        return setup.job("locations_sync").execute_in_process(
            run_config=rr.run_config,
            instance=setup.instance,
            tags=tags,
            raise_on_error=raise_on_error,
        )
    assets = [setup.asset("/".join(key.path)) for key in rr.asset_selection or []]
    return dg.materialize(
        assets,
        run_config=rr.run_config,
        instance=setup.instance,  # the assets come with the Definitions' resources bound
        partition_key=rr.partition_key,
        tags=tags,
        raise_on_error=raise_on_error,
    )


def run_with_config(
    setup: DagsterSetup, config: dict[str, Any], *, raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    """A run a user starts by hand (no sensor run key), e.g. from the launchpad."""
    return setup.job("locations_sync").execute_in_process(
        run_config={"ops": {"locations__locations": {"config": config}}},
        instance=setup.instance,
        raise_on_error=raise_on_error,
    )


def query(setup: DagsterSetup, sql: str, params: list | None = None) -> list[tuple]:
    if not setup.warehouse_path.exists():
        return []
    with duckdb.connect(str(setup.warehouse_path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


def table_exists(setup: DagsterSetup, table: str) -> bool:
    schema, name = table.split(".")
    return bool(
        query(
            setup,
            "SELECT 1 FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            [schema, name],
        )
    )


def ledger(setup: DagsterSetup, export_id: str, provider: str = "locations") -> tuple | None:
    rows = query(
        setup,
        "SELECT state, source, rows_loaded, loaded_at, error_code, error_message, attempts "
        "FROM pipeline.exports WHERE provider = ? AND export_id = ?",
        [provider, export_id],
    )
    return rows[0] if rows else None


def request_export(setup: DagsterSetup) -> str:
    """An export the pipeline itself requested (it is in the ledger, source 'test')."""
    with dg.build_resources(setup.for_provider("locations")) as res:
        runner = make_runner(res, LOCATIONS)
        try:
            record, _ = runner.start(KIND, ExportRequest(), source="test", adopt=False)
        finally:
            runner.provider.close()
    return record.export_id


def event_for(setup: DagsterSetup, export_id: str) -> bytes:
    """The seed-shaped COMPLETED/FAILED body the operator would POST (finishes the export)."""
    return encode(setup.sandbox.locations.event_body(export_id, setup.sandbox.urls["locations"]))


def location_rows(setup: DagsterSetup) -> int:
    return query(setup, "SELECT count(*) FROM locations.locations")[0][0]


def duplicate_keys(setup: DagsterSetup) -> int:
    return query(
        setup,
        "SELECT count(*) FROM (SELECT country_code, party_id, id FROM locations.locations "
        "GROUP BY ALL HAVING count(*) > 1)",
    )[0][0]


def materialization(result: dg.ExecuteInProcessResult, node: str = "locations__locations"):
    return result.asset_materializations_for_node(node)[0]


# -- 1. signed event -> one tick -> one run -> table loaded ------------------------------------


def test_signed_event_is_ingested_through_the_sensor_within_one_tick(
    dagster_setup: DagsterSetup, receiver: Receiver
) -> None:
    """An export the pipeline never asked for (made directly at the provider) is adopted from
    the event alone: one tick gives exactly one run, the run loads the table."""
    setup = dagster_setup
    export_id = setup.sandbox.locations.create_export("json", None).id
    body = event_for(setup, export_id)

    response = receiver.post(body)

    assert response.status_code == 202, response.text
    assert ledger(setup, export_id) is None  # the receiver never touches the warehouse
    result = tick(setup)
    assert [rr.run_key for rr in result.run_requests] == [f"locations:{export_id}"]
    rr = result.run_requests[0]
    assert rr.tags["export_pipeline/trigger"] == "webhook"
    assert rr.run_config["ops"]["locations__locations"]["config"]["export_id"] == export_id
    assert receiver.store.pending() == []  # consumed by the tick
    state, source, *_ = ledger(setup, export_id)
    assert (state, source) == ("ready", "webhook")

    run = launch(setup, rr)

    assert run.success
    assert materialization(run).metadata["skipped_already_loaded"].value is False
    assert location_rows(setup) == N
    assert query(setup, "SELECT DISTINCT _export_id FROM locations.locations") == [(export_id,)]
    state, source, rows_loaded, *_ = ledger(setup, export_id)
    assert (state, source, rows_loaded) == ("loaded", "webhook", N)
    assert tick(setup).run_requests == []  # nothing left to do


# -- 2. refused deliveries never reach the ledger ----------------------------------------------


def test_refused_deliveries_record_nothing_and_reach_no_ledger(
    dagster_setup: DagsterSetup, receiver: Receiver
) -> None:
    """The receiver's own tests cover each refusal in depth; here: none of them gets as far as
    the store, the ledger or a run (the export exists only at the provider, so only an accepted
    event could make the pipeline learn about it)."""
    setup = dagster_setup
    export_id = setup.sandbox.locations.create_export("json", None).id
    body = event_for(setup, export_id)
    i = body.index(b'"totalCount": ') + len(b'"totalCount": ')
    tampered = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]  # one byte, same length
    assert len(tampered) == len(body) and tampered != body
    oversized = body[:-1] + b" " * MAX_BODY + b"}"  # valid JSON, properly signed, too big

    answers = {
        "one byte changed": receiver.post(tampered, sign(body)).status_code,
        "stale timestamp": receiver.post(body, sign(body, timestamp=minutes_ago(6))).status_code,
        "future timestamp": receiver.post(body, sign(body, timestamp=minutes_ago(-6))).status_code,
        "malformed": receiver.post(b'{"requestId": ').status_code,
        "not an event": receiver.post(encode({"requestId": export_id})).status_code,
        "oversized": receiver.post(oversized).status_code,
    }

    assert answers == {
        "one byte changed": 401,
        "stale timestamp": 401,
        "future timestamp": 401,
        "malformed": 400,
        "not an event": 400,
        "oversized": 413,
    }
    assert receiver.store.count() == 0
    assert tick(setup).run_requests == []
    assert query(setup, "SELECT count(*) FROM pipeline.exports") in ([], [(0,)])
    assert not table_exists(setup, "locations.locations")
    # Control: the untouched body with a valid signature is accepted and does reach the ledger.
    assert receiver.post(body).status_code == 202
    assert [rr.run_key for rr in tick(setup).run_requests] == [f"locations:{export_id}"]


# -- 3. idempotence: replays and events for exports already loaded -----------------------------


def test_replayed_event_is_2xx_and_loads_once(
    dagster_setup: DagsterSetup, receiver: Receiver
) -> None:
    setup = dagster_setup
    export_id = request_export(setup)
    body = event_for(setup, export_id)
    headers = sign(body, msg_id=f"msg_{uuid.uuid4().hex}")  # the sender's retries reuse the id

    first, again = receiver.post(body, headers), receiver.post(body, headers)

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["duplicate"] is True
    result = tick(setup)
    assert [rr.run_key for rr in result.run_requests] == [f"locations:{export_id}"]
    assert launch(setup, result.run_requests[0]).success
    loaded = ledger(setup, export_id)
    assert loaded[0] == "loaded" and loaded[2] == N

    # After the load: the same delivery once more, and the same body as a brand-new message
    # (a sender that does not keep its webhook-id): both answered 2xx, neither loads again.
    assert receiver.post(body, headers).status_code == 200
    assert receiver.post(body).status_code == 202
    result = tick(setup)
    assert daemon_would_launch(setup, result) == []
    assert result.run_requests == []
    assert receiver.store.pending() == []
    assert ledger(setup, export_id) == loaded  # rows_loaded, loaded_at, attempts unchanged
    assert location_rows(setup) == N and duplicate_keys(setup) == 0
    launched = setup.instance.get_runs(
        filters=dg.RunsFilter(tags={RUN_KEY_TAG: f"locations:{export_id}"})
    )
    assert len(launched) == 1


def test_event_for_an_export_polling_already_loaded_never_loads_it_again(
    dagster_setup: DagsterSetup, receiver: Receiver
) -> None:
    setup = dagster_setup
    polled = run_with_config(setup, {})  # request, poll until ready, load: no webhook involved
    assert polled.success
    export_id = materialization(polled).metadata["export_id"].value
    loaded = ledger(setup, export_id)
    assert loaded[0] == "loaded"
    loaded_at = query(setup, "SELECT max(_loaded_at) FROM locations.locations")

    assert receiver.post(event_for(setup, export_id)).status_code == 202
    result = tick(setup)

    assert result.run_requests == []  # the ledger already says loaded: nothing to launch
    assert receiver.store.pending() == []
    # Even a run for it (launched by hand, or one that was already queued) is a no-op.
    again = run_with_config(setup, {"export_id": export_id})
    assert again.success
    assert materialization(again).metadata["skipped_already_loaded"].value is True
    assert ledger(setup, export_id) == loaded
    assert location_rows(setup) == N and duplicate_keys(setup) == 0
    assert query(setup, "SELECT max(_loaded_at) FROM locations.locations") == loaded_at


# -- 4. FAILED event ---------------------------------------------------------------------------


def test_failed_event_records_the_providers_error_and_launches_nothing(
    dagster_setup: DagsterSetup, receiver: Receiver
) -> None:
    setup = dagster_setup
    setup.sandbox.locations.fail_next_export = ("EXPORT_GENERATION_FAILED", "Disk quota exceeded")
    export_id = request_export(setup)
    body = event_for(setup, export_id)
    assert b'"FAILED"' in body

    assert receiver.post(body).status_code == 202
    result = tick(setup)

    assert result.run_requests == []
    state, _, rows_loaded, _, error_code, error_message, _ = ledger(setup, export_id)
    assert (state, error_code, rows_loaded) == ("failed", "EXPORT_GENERATION_FAILED", None)
    assert "Disk quota exceeded" in error_message
    assert not table_exists(setup, "locations.locations")
    assert tick(setup).run_requests == []  # terminal: never polled or launched again


# -- 5. receiver restart -----------------------------------------------------------------------


def test_receiver_restart_loses_no_recorded_event(dagster_setup: DagsterSetup) -> None:
    setup = dagster_setup
    before, after = request_export(setup), request_export(setup)
    first = start_receiver(setup)
    try:
        assert first.post(event_for(setup, before)).status_code == 202
    finally:
        first.stop()
    with pytest.raises(httpx.TransportError):  # really gone
        first.post(event_for(setup, after))

    second = start_receiver(setup)  # a new process would open the same file the same way
    try:
        assert second.post(event_for(setup, after)).status_code == 202
        result = tick(setup)
    finally:
        second.stop()

    assert sorted(rr.run_key for rr in result.run_requests) == sorted(
        [f"locations:{before}", f"locations:{after}"]
    )
    # Launched because of the stored events (polling would have tagged them "sensor").
    assert {rr.tags["export_pipeline/trigger"] for rr in result.run_requests} == {"webhook"}


# -- 6. an event is a hint, not proof ----------------------------------------------------------


def test_completed_event_for_an_export_still_pending_loads_nothing_until_it_is_ready(
    dagster_setup: DagsterSetup, receiver: Receiver
) -> None:
    """The sender says COMPLETED, the provider's status API still says PENDING (a premature or
    out-of-order event). Nothing is loaded on the event's word, and the export is not lost
    either: once the provider completes it, the ordinary path launches it and loads it."""
    setup = dagster_setup
    setup.sandbox.locations.ready_after_seconds = 3600
    export_id = request_export(setup)
    base = setup.sandbox.urls["locations"]
    now = datetime.now(UTC)
    premature = {
        "requestId": export_id,
        "status": "COMPLETED",
        "exportUrl": f"{base}/downloads/{export_id}.json",
        "downloadExpiresAt": (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "exportTimestamp": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "totalCount": N,
    }
    assert setup.sandbox.locations.status_word(export_id) == "PENDING"

    assert receiver.post(encode(premature)).status_code == 202
    result = tick(setup)

    # The provider was asked and said PENDING: nothing to launch, and no run key spent on a run
    # that could only fail (the daemon would never launch that key again).
    assert daemon_would_launch(setup, result) == []
    assert ledger(setup, export_id)[0] == "pending"
    assert setup.sandbox.locations.downloads == 0

    # An ingest forced on the event's word (a run started by hand with the export id) asks the
    # provider first, refuses clearly and commits nothing. Called on the runner the asset uses:
    # in a Dagster run this error asks for step retries 30 s apart, too slow for a test.
    with dg.build_resources(setup.for_provider("locations")) as res:
        runner = make_runner(res, LOCATIONS)
        try:
            with pytest.raises(ExportNotReadyError) as refused:
                runner.ingest(KIND, export_id, source="config")
        finally:
            runner.provider.close()
    message = str(refused.value)
    assert "not ready" in message and "pending" in message
    assert (refused.value.provider, refused.value.export_id) == ("locations", export_id)
    assert ledger(setup, export_id)[0] == "pending"
    assert not table_exists(setup, "locations.locations")
    assert query(setup, "SELECT count(*) FROM pipeline.cursors") == [(0,)]
    assert setup.sandbox.locations.downloads == 0

    # The provider finishes it: the normal path (poll -> ready -> one run) loads it.
    setup.sandbox.locations.complete(export_id)
    result = tick(setup)
    launchable = daemon_would_launch(setup, result)
    assert [rr.run_key for rr in launchable] == [f"locations:{export_id}"]
    assert launch(setup, launchable[0]).success
    assert ledger(setup, export_id)[0] == "loaded"
    assert location_rows(setup) == N


# -- 7. mapping.travel events ------------------------------------------------------------------


def test_mapping_event_adds_the_partition_and_launches_its_run(
    dagster_setup: DagsterSetup, receiver: Receiver
) -> None:
    """mapping.travel makes an export by itself when a job completes and only tells us by
    webhook: the event names the job (the partition) and the exportFileId."""
    setup = dagster_setup
    job_id = setup.sandbox.mapping.add_job(25)
    status, answer = setup.sandbox.mapping.trigger(job_id)
    assert status == 200
    file_id = answer["exportFileId"]
    body = encode(
        {
            "event": "mapping.export.completed",
            "mappingJobId": job_id,
            "exportFileId": file_id,
            "message": "Export ready",
        }
    )

    assert receiver.post(body, path=MAPPING_PATH).status_code == 202
    result = tick(setup, MAPPING_SENSOR)

    [partitions] = result.dynamic_partitions_requests
    assert (partitions.partitions_def_name, list(partitions.partition_keys)) == (
        "mapping_jobs",
        [job_id],
    )
    [rr] = result.run_requests
    assert (rr.run_key, rr.partition_key) == (f"mapping:{file_id}", job_id)
    setup.instance.add_dynamic_partitions("mapping_jobs", [job_id])  # what the daemon does
    assert launch(setup, rr, sensor=MAPPING_SENSOR).success
    assert query(
        setup, "SELECT count(*) FROM mapping.results WHERE mappingJobId = ?", [job_id]
    ) == [(25,)]
    assert ledger(setup, file_id, provider="mapping")[:3] == ("loaded", "webhook", 25)


# -- 8. the documented command -----------------------------------------------------------------


def test_cli_webhooks_serve_answers_bearer_events(tmp_path: Path) -> None:
    port = free_port()
    store_path = tmp_path / "events" / "webhook_events.sqlite3"
    token = f"tok-{uuid.uuid4().hex}"
    repo_root = Path(export_pipeline.__file__).resolve().parent.parent
    env = {**os.environ, TOKEN_ENV: token, "PYTHONPATH": guarded_pythonpath(repo_root)}
    env.pop(SECRET_ENV, None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "export_pipeline.cli",
            "webhooks",
            "serve",
            "--port",
            str(port),
            "--store",
            str(store_path),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    body = encode(
        {
            "requestId": "7890abcd-ef12-3456-7890-abcdef123457",
            "status": "FAILED",
            "error": {"code": "EXPORT_GENERATION_FAILED", "message": "Unable to generate"},
        }
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "receiver did not come up"
            time.sleep(0.1)

        good = httpx.post(
            base + LOCATIONS_PATH, content=body, headers={"Authorization": f"Bearer {token}"}
        )
        wrong = httpx.post(
            base + LOCATIONS_PATH, content=body, headers={"Authorization": "Bearer nope"}
        )

        assert good.status_code == 202, good.text
        assert wrong.status_code == 401
        assert [e.export_id for e in EventStore(store_path).pending()] == [
            "7890abcd-ef12-3456-7890-abcdef123457"
        ]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0].decode()
    assert token not in output
