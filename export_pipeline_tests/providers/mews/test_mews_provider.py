"""MewsProvider against the Mews simulator over real HTTP: lifecycle, batching, errors, files."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportExpiredError,
    ExportInFlightError,
    ProviderRejectedError,
)
from export_pipeline.core.model import (
    ExportKind,
    ExportRequest,
    ExportState,
    ExportStatus,
    LoadMode,
)
from export_pipeline.providers.mews import MewsProvider
from export_pipeline.sandbox.mews import ENTITY_TYPES, State

from .conftest import MewsSandbox

REQUEST = ExportRequest()


def download(status: ExportStatus) -> list[bytes]:
    """Fetch every part the way the pipeline must: presigned, so with no credentials at all."""
    bodies = []
    for file in status.files:
        assert file.authenticated is False
        response = httpx.get(file.url, timeout=10)
        assert response.status_code == 200, response.text
        assert int(response.headers["content-length"]) == len(response.content)
        bodies.append(response.content)
    return bodies


def records_of(bodies: list[bytes]) -> list[dict]:
    rows = []
    for body in bodies:
        for line in body.decode("utf-8").splitlines():
            rows.append(json.loads(line))
    return rows


def export_ready(sandbox: MewsSandbox, kind_name: str) -> ExportStatus:
    first = sandbox.provider.request_export(sandbox.provider.kind(kind_name), REQUEST)
    status = sandbox.wait(first.export_id)
    assert status.state is ExportState.READY, status
    return status


def test_kinds_cover_every_entity_type_as_snapshots() -> None:
    names = {kind.params["entity_type"]: kind.name for kind in MewsProvider.kinds}
    assert list(names) == list(ENTITY_TYPES)
    assert names["AvailabilityAdjustment"] == "availability_adjustment"
    assert names["OrderItem"] == "order_item"
    for kind in MewsProvider.kinds:
        assert kind.provider == "mews"
        assert kind.primary_key == ("Id",)
        assert kind.load_mode is LoadMode.SNAPSHOT
        # Declared columns are type hints with descriptions in the spec (every key still lands).
        assert kind.columns is not None and kind.columns["Id"] == "UUID"
        assert kind.columns["UpdatedUtc"] == "TIMESTAMPTZ"
        assert kind.table == f"mews.{kind.name}"
    assert MewsProvider.status_batch_size == 1000


def test_export_moves_pending_processing_success_with_true_part_sizes(
    mews_sandbox: MewsSandbox,
) -> None:
    state = mews_sandbox.state
    state.pending_seconds, state.processing_seconds = 0.3, 0.5
    provider = mews_sandbox.provider
    added = provider.request_export(provider.kind("reservation"), REQUEST)
    assert added.state is ExportState.PENDING
    assert added.files == ()

    seen = [added.state]
    deadline = time.monotonic() + 10
    while seen[-1] is not ExportState.READY and time.monotonic() < deadline:
        status = provider.get_statuses([added.export_id])[added.export_id]
        if status.state is not seen[-1]:
            seen.append(status.state)
        time.sleep(0.03)
    assert seen == [ExportState.PENDING, ExportState.PROCESSING, ExportState.READY]

    assert status.provider_status == "Success"
    assert status.detail["entity_type"] == "Reservation"
    assert status.detail["scope"] == {
        "EnterpriseIds": state.enterprise_ids,
        "ChainIds": state.chain_ids,
    }
    assert status.expires_at is not None and status.expires_at.timestamp() > time.time()
    assert len(status.files) >= 2
    assert [f.name for f in status.files] == [f"part-{i:04d}.jsonl" for i in range(3)]
    assert provider.file_headers(status.files[0]) == {}

    bodies = download(status)
    assert [len(b) for b in bodies] == [f.size_bytes for f in status.files]
    rows = records_of(bodies)
    assert all(isinstance(row["Id"], str) for row in rows)
    assert len(rows) == state.count("Reservation") == 50
    assert [r["Id"] for r in rows] == [r["Id"] for r in state.records("Reservation")]
    # Nested objects, arrays, nulls and non-ASCII text arrive intact.
    assert all(
        isinstance(r["Customer"], dict) and isinstance(r["CompanionIds"], list) for r in rows
    )
    assert any(r["Notes"] is None for r in rows)
    assert any(any(ord(ch) > 127 for ch in r["Customer"]["LastName"]) for r in rows)


def test_every_entity_type_can_be_exported(mews_sandbox: MewsSandbox) -> None:
    provider = mews_sandbox.provider
    started = {
        kind.name: provider.request_export(kind, REQUEST).export_id for kind in provider.kinds
    }
    for kind in provider.kinds:
        status = mews_sandbox.wait(started[kind.name])
        assert status.state is ExportState.READY, kind.name
        assert status.detail["entity_type"] == kind.params["entity_type"]
        rows = records_of(download(status))
        ids = [row["Id"] for row in rows]
        assert len(ids) == len(set(ids)) == 50, kind.name
        expected = {r["Id"] for r in mews_sandbox.state.records(kind.params["entity_type"])}
        assert set(ids) == expected


def test_second_add_while_pending_is_in_flight_error(mews_sandbox: MewsSandbox) -> None:
    state = mews_sandbox.state
    state.pending_seconds = 0.6
    provider = mews_sandbox.provider
    kind = provider.kind("order_item")
    first = provider.request_export(kind, REQUEST)
    with pytest.raises(ExportInFlightError) as caught:
        provider.request_export(kind, REQUEST)
    assert caught.value.kind == "order_item"
    assert caught.value.provider == "mews"
    assert caught.value.retryable
    # Another entity type is not blocked.
    provider.request_export(provider.kind("payment"), REQUEST)
    # Once the first one finished, a new export of the type is accepted.
    assert mews_sandbox.wait(first.export_id).state is ExportState.READY
    again = provider.request_export(kind, REQUEST)
    assert again.export_id != first.export_id


def test_unknown_entity_type_is_rejected_with_the_mews_message(
    mews_sandbox: MewsSandbox,
) -> None:
    provider = mews_sandbox.provider
    bogus = ExportKind(
        provider="mews", name="rooms", primary_key=("Id",), params={"entity_type": "Room"}
    )
    with pytest.raises(ProviderRejectedError, match="Invalid EntityType") as caught:
        provider.request_export(bogus, REQUEST)
    assert caught.value.code == "HTTP_400"  # Mews errors carry no code: the engine's form
    assert caught.value.request_id


def test_status_of_2500_ids_takes_exactly_three_getall_calls(mews_sandbox: MewsSandbox) -> None:
    state = mews_sandbox.state
    ids = state.seed_open_exports(2500)
    before = state.getall_calls
    statuses = mews_sandbox.provider.get_statuses(ids)
    assert state.getall_calls - before == 3
    assert set(statuses) == set(ids)
    assert {s.state for s in statuses.values()} == {ExportState.PENDING}
    # Duplicates do not cost extra calls.
    before = state.getall_calls
    mews_sandbox.provider.get_statuses(ids[:1000] + ids[:10])
    assert state.getall_calls - before == 1


def test_sandbox_refuses_more_than_1000_ids(mews_sandbox: MewsSandbox) -> None:
    state = mews_sandbox.state
    response = httpx.post(
        f"{mews_sandbox.base_url}/api/connector/v1/exports/getAll",
        json={
            "ClientToken": state.client_token,
            "AccessToken": state.access_token,
            "Client": "test",
            "ExportIds": [str(uuid.uuid4()) for _ in range(1001)],
        },
    )
    assert response.status_code == 400
    assert "1000" in response.json()["Message"]


@pytest.mark.parametrize("wrong", ["client", "access"])
def test_wrong_token_is_configuration_error_naming_the_settings(
    mews_sandbox: MewsSandbox, wrong: str
) -> None:
    state = mews_sandbox.state
    provider = mews_sandbox.provider_with(
        client_token="nope" if wrong == "client" else state.client_token,
        access_token="nope" if wrong == "access" else state.access_token,
    )
    try:
        with pytest.raises(ConfigurationError) as caught:
            provider.request_export(provider.kind("customer"), REQUEST)
        assert "MEWS_CLIENT_TOKEN" in str(caught.value)
        assert "MEWS_ACCESS_TOKEN" in str(caught.value)
        assert caught.value.kind == "customer"
        with pytest.raises(ConfigurationError, match="MEWS_ACCESS_TOKEN"):
            provider.get_statuses([str(uuid.uuid4())])
    finally:
        provider.close()
    # The simulator answers the way Mews does.
    raw = httpx.post(
        f"{mews_sandbox.base_url}/api/connector/v1/exports/add",
        json={"ClientToken": "nope", "AccessToken": "nope", "Client": "t", "EntityType": "Bill"},
    )
    assert raw.status_code == 401
    assert raw.json()["Message"] == "Invalid ClientToken."


def test_failed_export_maps_to_failed(mews_sandbox: MewsSandbox) -> None:
    mews_sandbox.state.fail_next = {"Payment"}
    provider = mews_sandbox.provider
    failed = provider.request_export(provider.kind("payment"), REQUEST)
    status = mews_sandbox.wait(failed.export_id)
    assert status.state is ExportState.FAILED
    assert status.error_code == "Failed"
    assert status.provider_status == "Failed"
    assert status.error_message
    assert status.files == ()
    # The switch is one-shot: the next Payment export succeeds.
    assert export_ready(mews_sandbox, "payment").state is ExportState.READY


def test_expired_export_maps_to_expired_and_its_files_are_gone(
    mews_sandbox: MewsSandbox,
) -> None:
    provider = mews_sandbox.provider
    ready = export_ready(mews_sandbox, "company")
    mews_sandbox.state.expire(ready.export_id)
    status = provider.get_statuses([ready.export_id])[ready.export_id]
    assert status.state is ExportState.EXPIRED
    assert status.provider_status == "Expired"
    assert status.files == ()
    response = httpx.get(ready.files[0].url)
    assert response.status_code == 410
    assert isinstance(provider.classify_download_error(response), ExportExpiredError)


def test_unknown_id_is_lost(mews_sandbox: MewsSandbox) -> None:
    ready = export_ready(mews_sandbox, "bill")
    unknown = str(uuid.uuid4())
    statuses = mews_sandbox.provider.get_statuses([ready.export_id, unknown])
    assert statuses[unknown].state is ExportState.LOST
    assert statuses[ready.export_id].state is ExportState.READY


def test_link_dies_at_expires_utc_with_403(mews_sandbox: MewsSandbox) -> None:
    state = mews_sandbox.state
    state.link_ttl_seconds = 1
    provider = mews_sandbox.provider
    ready = export_ready(mews_sandbox, "resource_block")
    assert ready.expires_at is not None
    assert httpx.get(ready.files[0].url).status_code == 200
    while time.time() <= ready.expires_at.timestamp() + 0.05:
        time.sleep(0.05)
    response = httpx.get(ready.files[0].url)
    assert response.status_code == 403
    assert isinstance(provider.classify_download_error(response), ExportExpiredError)
    status = provider.get_statuses([ready.export_id])[ready.export_id]
    assert status.state is ExportState.EXPIRED


def test_tampered_link_is_refused(mews_sandbox: MewsSandbox) -> None:
    ready = export_ready(mews_sandbox, "customer")
    url = ready.files[0].url.replace("/0.jsonl", "/1.jsonl")
    response = httpx.get(url)
    assert response.status_code == 403
    assert "signature" in response.json()["Message"]


def test_mutations_show_in_the_next_snapshot(mews_sandbox: MewsSandbox) -> None:
    state = mews_sandbox.state
    before = {r["Id"]: r for r in records_of(download(export_ready(mews_sandbox, "customer")))}
    change = state.mutate("Customer", updated=3, deleted=2, added=4)
    after = {r["Id"]: r for r in records_of(download(export_ready(mews_sandbox, "customer")))}

    assert set(after) == (set(before) - set(change.deleted)) | set(change.added)
    assert len(after) == 50 - 2 + 4 == state.count("Customer")
    for record_id in change.updated:
        assert after[record_id]["UpdatedUtc"] > before[record_id]["UpdatedUtc"]
        assert after[record_id].keys() == before[record_id].keys()
    untouched = set(before) - set(change.updated) - set(change.deleted)
    assert all(after[i] == before[i] for i in untouched)


def test_size_lie_switch_announces_a_wrong_size(mews_sandbox: MewsSandbox) -> None:
    mews_sandbox.state.size_lie_next = True
    ready = export_ready(mews_sandbox, "availability_block")
    real = [len(b) for b in download(ready)]
    announced = [f.size_bytes for f in ready.files]
    assert real != announced
    assert sum(abs(a - r) for a, r in zip(announced, real, strict=True)) < 10
    # One-shot.
    again = export_ready(mews_sandbox, "availability_block")
    assert [len(b) for b in download(again)] == [f.size_bytes for f in again.files]


def test_files_support_range_requests(mews_sandbox: MewsSandbox) -> None:
    ready = export_ready(mews_sandbox, "availability_adjustment")
    url = ready.files[1].url
    whole = httpx.get(url).content
    partial = httpx.get(url, headers={"Range": "bytes=10-29"})
    assert partial.status_code == 206
    assert partial.content == whole[10:30]
    assert partial.headers["content-length"] == "20"


def test_max_records_per_part_splits_files(tmp_path) -> None:
    from export_pipeline.sandbox.mews import create_app
    from export_pipeline.sandbox.server import RunningServer

    state = State(data_dir=tmp_path, counts={"Reservation": 10}, max_records_per_part=4)
    with RunningServer(create_app(state)) as server:
        provider = MewsProvider.from_settings(
            base_url=server.base_url,
            body_credentials={"ClientToken": state.client_token, "AccessToken": state.access_token},
        )
        sandbox = MewsSandbox(state=state, base_url=server.base_url, provider=provider)
        ready = export_ready(sandbox, "reservation")
        counts = [len(body.splitlines()) for body in download(ready)]
        provider.close()
    assert sum(counts) == 10
    assert len(counts) == 3 and max(counts) <= 4


def test_large_counts_are_generated_lazily() -> None:
    state = State(counts={"Reservation": 1_000_000})
    try:
        assert state.count("Reservation") == 1_000_000
        change = state.mutate("Reservation", updated=5, deleted=5, added=1)
        assert state.count("Reservation") == 1_000_000 - 5 + 1
        # The override state is proportional to the mutations, not to the record count.
        snapshot = state._snapshot("Reservation")
        assert len(snapshot.deleted) == 5 and len(snapshot.versions) == 5
        assert (
            state.record("Reservation", 999_999)["Id"] == state.record("Reservation", 999_999)["Id"]
        )
        first_live = next(i for i in range(10) if i not in snapshot.deleted)
        expected = state.record("Reservation", first_live, snapshot.versions.get(first_live, 0))
        assert next(state.records("Reservation")) == expected
        assert change.added[0] == state.record("Reservation", 1_000_000)["Id"]
    finally:
        state.close()
