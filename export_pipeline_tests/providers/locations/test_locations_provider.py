"""The locations client against its simulator over real HTTP: states, files, cursors, errors."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import httpx
import pytest

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportExpiredError,
    LinkExpiredError,
    ProviderRejectedError,
    TransientProviderError,
)
from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.model import ExportRequest, ExportState, ExportStatus
from export_pipeline.providers.locations import (
    LOCATION_COLUMNS,
    LOCATIONS,
    LocationsProvider,
    parse_event,
)
from export_pipeline.sandbox.locations import State

from .conftest import N_LOCATIONS, LocationsSandbox

KEY = ("country_code", "party_id", "id")


def _export(sb: LocationsSandbox, **params: object) -> tuple[str, ExportStatus]:
    since = params.pop("modified_since", None)
    status = sb.provider.request_export(
        LOCATIONS,
        ExportRequest(modified_since=since, params=params),  # type: ignore[arg-type]
    )
    assert status.state is ExportState.PENDING
    final, _ = sb.wait(status.export_id)
    return status.export_id, final


def _keys(rows: list[dict]) -> set[tuple[str, ...]]:
    return {tuple(row[k] for k in KEY) for row in rows}


def _load(con: duckdb.DuckDBPyConnection, path: Path, fmt: str) -> str:
    """Read a file the way the normaliser does (declared columns; CSV nested cells are JSON)."""
    if fmt == "json":
        columns = "{" + ", ".join(f"'{c}': '{t}'" for c, t in LOCATION_COLUMNS.items()) + "}"
        return f"SELECT * FROM read_json('{path}', format='array', columns={columns})"
    casts = ", ".join(
        f"CAST({c}::JSON AS {t}) AS {c}" if "STRUCT" in t else f"CAST({c} AS {t}) AS {c}"
        for c, t in LOCATION_COLUMNS.items()
    )
    return f"SELECT {casts} FROM read_csv('{path}', header=true, all_varchar=true)"


# ------------------------------------------------------------------ lifecycle and files


def test_export_goes_pending_to_ready_and_its_file_holds_total_count_rows(
    locations_sandbox: LocationsSandbox,
) -> None:
    sb = locations_sandbox
    sb.state.ready_after_seconds = 1.0  # PENDING 0.5 s, then PROCESSING 0.5 s: visible to polls
    before = datetime.now(UTC).replace(microsecond=0)
    created = sb.provider.request_export(LOCATIONS, ExportRequest())
    assert created.state is ExportState.PENDING
    assert created.provider_status == "PENDING"
    ready, seen = sb.wait(created.export_id)
    assert seen[0] == "pending" and "processing" in seen and seen[-1] == "ready"
    assert ready.state is ExportState.READY
    assert ready.expected_rows == N_LOCATIONS
    assert ready.provider_timestamp is not None
    assert before <= ready.provider_timestamp <= datetime.now(UTC)
    assert ready.expires_at is not None
    assert ready.expires_at > datetime.now(UTC) + timedelta(minutes=50)
    (file,) = ready.files
    assert file.name == "locations-export.json"
    assert file.authenticated is False
    assert sb.provider.file_headers(file) == {}  # never send the Bearer token to the link
    assert sb.state.requests_by_id[created.export_id] is None

    response = sb.download(ready)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["content-length"]) == len(response.content)
    day = ready.provider_timestamp.strftime("%Y-%m-%d")
    assert response.headers["content-disposition"] == (
        f'attachment; filename="locations-export-{day}.json"'
    )
    rows = json.loads(response.content)
    assert len(rows) == ready.expected_rows
    assert len(_keys(rows)) == N_LOCATIONS
    assert set(rows[0]) == set(LOCATION_COLUMNS)
    assert all(1 <= len(r["evses"]) <= 4 for r in rows)
    assert all(1 <= len(e["connectors"]) <= 3 for r in rows for e in r["evses"])
    assert any(not r["name"].isascii() for r in rows), "unicode names are part of the data"
    assert sb.state.downloads == 1


def test_csv_and_json_exports_give_the_same_table_and_views(
    locations_sandbox: LocationsSandbox, tmp_path: Path
) -> None:
    sb = locations_sandbox
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    selects = {}
    for fmt in ("json", "csv"):
        _, ready = _export(sb, format=fmt)
        assert ready.files[0].name == f"locations-export.{fmt}"
        response = sb.download(ready)
        assert response.status_code == 200
        path = tmp_path / ready.files[0].name
        path.write_bytes(response.content)
        selects[fmt] = _load(con, path, fmt)
        (count,) = con.execute(f"SELECT count(*) FROM ({selects[fmt]})").fetchone()
        assert count == ready.expected_rows == N_LOCATIONS
    # The CSV really carries nested values as JSON text, one cell each.
    text = (tmp_path / "locations-export.csv").read_text(encoding="utf-8")
    header, first = list(csv.reader(io.StringIO(text)))[:2]
    assert header == list(LOCATION_COLUMNS)
    assert json.loads(first[header.index("evses")])[0]["connectors"]
    for a, b in (("json", "csv"), ("csv", "json")):
        (diff,) = con.execute(
            f"SELECT count(*) FROM (({selects[a]}) EXCEPT ({selects[b]}))"
        ).fetchone()
        assert diff == 0, f"rows in {a} but not in {b}"

    con.execute("CREATE SCHEMA locations")
    con.execute(f"CREATE TABLE locations.locations AS {selects['csv']}")
    for name, sql in LOCATIONS.views.items():
        con.execute(f"CREATE VIEW locations.{name} AS {sql}")
    rows = json.loads(sb.download(_export(sb, format="json")[1]).content)
    n_evses = sum(len(r["evses"]) for r in rows)
    n_connectors = sum(len(e["connectors"]) for r in rows for e in r["evses"])
    assert con.execute("SELECT count(*) FROM locations.evses").fetchone() == (n_evses,)
    assert con.execute("SELECT count(*) FROM locations.connectors").fetchone() == (n_connectors,)
    (bad,) = con.execute(
        "SELECT count(*) FROM locations.connectors WHERE max_electric_power IS NULL "
        "OR last_updated IS NULL OR location_id IS NULL"
    ).fetchone()
    assert bad == 0


def test_modified_since_returns_exactly_the_locations_changed_after_the_cursor(
    locations_sandbox: LocationsSandbox,
) -> None:
    sb = locations_sandbox
    full_id, full = _export(sb)
    full_rows = {r["id"]: r for r in json.loads(sb.download(full).content)}
    assert full.provider_timestamp is not None

    sb.state.mutate(updated=4, added=3)
    mutated_at = datetime.now(UTC)
    delta_id, delta = _export(sb, modified_since=full.provider_timestamp, format="csv")
    assert sb.state.requests_by_id[delta_id] == full.provider_timestamp
    assert sb.state.requests_by_id[full_id] is None
    assert delta.expected_rows == 7
    rows = list(csv.DictReader(io.StringIO(sb.download(delta).text)))
    assert len(rows) == 7
    added = {r["id"] for r in rows} - set(full_rows)
    assert len(added) == 3
    changed = [r for r in rows if r["id"] in full_rows]
    assert len(changed) == 4
    for row in changed:
        before = full_rows[row["id"]]
        assert json.loads(row["evses"]) != before["evses"], "an EVSE status changed"
        assert row["last_updated"] > before["last_updated"]

    # The next cursor: exportTimestamp has whole seconds, so only locations changed in the
    # second the previous export was made can come again (MERGE absorbs them); none if that
    # second is after the change.
    _, again = _export(sb, modified_since=delta.provider_timestamp)
    again_ids = {r["id"] for r in json.loads(sb.download(again).content)}
    assert again.expected_rows == len(again_ids)
    assert again_ids <= {r["id"] for r in rows}
    assert delta.provider_timestamp is not None
    if delta.provider_timestamp > mutated_at:
        assert again_ids == set()


# ------------------------------------------------------------------------- rate limits


def test_429_with_retry_after_is_waited_out(locations_sandbox: LocationsSandbox) -> None:
    sb = locations_sandbox
    sb.state.rate_limit_next = 1
    sb.state.retry_after_seconds = 1
    started = time.monotonic()
    status = sb.provider.request_export(LOCATIONS, ExportRequest())
    assert time.monotonic() - started >= 0.95, "Retry-After: 1 must be honoured"
    assert status.state is ExportState.PENDING
    assert sb.state.call_counts["request"] == 2
    assert len(sb.state.requests_by_id) == 1


def test_429_that_outlasts_the_retries_is_transient(locations_sandbox: LocationsSandbox) -> None:
    sb = locations_sandbox
    sb.state.rate_limit_next = 10
    sb.state.retry_after_seconds = 0
    provider = sb.provider_with(retry=RetryPolicy(max_attempts=3, base_delay=0.01))
    try:
        with pytest.raises(TransientProviderError) as err:
            provider.get_statuses(["anything"])
    finally:
        provider.close()
    assert err.value.retryable
    assert sb.state.call_counts["status"] == 3


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("code", ["INVALID_FORMAT", "INVALID_DATE_RANGE", "EXPORT_SIZE_EXCEEDED"])
def test_each_documented_error_code_is_a_provider_rejection(
    locations_sandbox: LocationsSandbox, code: str
) -> None:
    sb = locations_sandbox
    sb.state.reject_next_request = code
    with pytest.raises(ProviderRejectedError) as err:
        sb.provider.request_export(LOCATIONS, ExportRequest())
    assert err.value.code == code
    assert err.value.provider == "locations"
    assert err.value.hint
    assert err.value.request_id  # the API's X-Request-Id, for the operator's support desk
    assert not err.value.retryable
    assert sb.state.requests_by_id == {}


def test_real_validation_failures_carry_the_right_code(
    locations_sandbox: LocationsSandbox,
) -> None:
    sb = locations_sandbox
    with pytest.raises(ProviderRejectedError) as err:
        sb.provider.request_export(LOCATIONS, ExportRequest(params={"format": "xml"}))
    assert err.value.code == "INVALID_FORMAT"
    assert "json" in (err.value.hint or "")

    future = datetime.now(UTC) + timedelta(hours=1)
    with pytest.raises(ProviderRejectedError) as err:
        sb.provider.request_export(LOCATIONS, ExportRequest(modified_since=future))
    assert err.value.code == "INVALID_DATE_RANGE"

    sb.state.max_export_rows = N_LOCATIONS - 1
    with pytest.raises(ProviderRejectedError) as err:
        sb.provider.request_export(LOCATIONS, ExportRequest())
    assert err.value.code == "EXPORT_SIZE_EXCEEDED"
    # An incremental export is small enough: the hint's advice works.
    since = datetime(2024, 12, 1, tzinfo=UTC)
    assert sb.provider.request_export(LOCATIONS, ExportRequest(modified_since=since)).export_id
    assert sb.state.requests_by_id != {}


def test_wrong_token_names_the_setting(locations_sandbox: LocationsSandbox) -> None:
    provider = locations_sandbox.provider_with(token="not-the-token")
    try:
        with pytest.raises(ConfigurationError) as err:
            provider.request_export(LOCATIONS, ExportRequest())
        assert "LOCATIONS_API_TOKEN" in str(err.value)
        with pytest.raises(ConfigurationError):
            provider.get_statuses(["x"])
    finally:
        provider.close()
    assert locations_sandbox.state.requests_by_id == {}
    with pytest.raises(ConfigurationError, match="LOCATIONS_API_TOKEN"):
        LocationsProvider.from_settings(base_url=locations_sandbox.base_url, token="")


def test_failed_export_reports_the_operators_code_and_message(
    locations_sandbox: LocationsSandbox,
) -> None:
    sb = locations_sandbox
    sb.state.fail_next_export = ("EXPORT_GENERATION_FAILED", "Unable to generate export")
    _, failed = _export(sb)
    assert failed.state is ExportState.FAILED
    assert failed.error_code == "EXPORT_GENERATION_FAILED"
    assert failed.error_message == "Unable to generate export"
    assert failed.files == ()
    # Only the next export fails.
    assert _export(sb)[1].state is ExportState.READY


def test_unknown_export_id_is_lost(locations_sandbox: LocationsSandbox) -> None:
    sb = locations_sandbox
    real = sb.provider.request_export(LOCATIONS, ExportRequest()).export_id
    statuses = sb.provider.get_statuses(["7890abcd-0000-0000-0000-000000000000", real])
    assert statuses["7890abcd-0000-0000-0000-000000000000"].state is ExportState.LOST
    assert statuses[real].state is not ExportState.LOST
    assert sb.state.call_counts["status"] == 2  # status_batch_size = 1: one call per id


def test_status_words_in_progress_and_unknown(locations_sandbox: LocationsSandbox) -> None:
    sb = locations_sandbox
    sb.state.ready_after_seconds = 60
    sb.state.processing_after_seconds = 0
    export_id = sb.provider.request_export(LOCATIONS, ExportRequest()).export_id
    assert sb.provider.get_statuses([export_id])[export_id].state is ExportState.PROCESSING
    sb.state.processing_status = "IN_PROGRESS"
    status = sb.provider.get_statuses([export_id])[export_id]
    assert status.state is ExportState.PROCESSING
    assert status.provider_status == "IN_PROGRESS"
    # The engine's one policy for a word no list names: still open, never downloaded, and the
    # word is kept (a run waiting on it times out naming it; the export stays in the ledger).
    sb.state.processing_status = "ARCHIVING"
    status = sb.provider.get_statuses([export_id])[export_id]
    assert status.state is ExportState.PROCESSING and status.files == ()
    assert status.provider_status == "ARCHIVING"
    assert status.detail["unknown_status"] == "ARCHIVING"


# ------------------------------------------------------------------- links and expiry


def test_expired_signed_link_is_403_and_a_fresh_status_gives_a_working_link(
    locations_sandbox: LocationsSandbox,
) -> None:
    sb = locations_sandbox
    sb.state.link_ttl_seconds = -5
    export_id, ready = _export(sb)
    assert ready.expires_at is not None and ready.expires_at < datetime.now(UTC)
    response = sb.download(ready)
    assert response.status_code == 403
    assert "<Code>AccessDenied</Code>" in response.text
    assert "expired" in response.text
    assert isinstance(sb.provider.classify_download_error(response), LinkExpiredError)
    assert sb.state.downloads == 0

    tampered = ready.files[0].url.replace("signature=", "signature=0")
    assert httpx.get(tampered).status_code == 403

    sb.state.link_ttl_seconds = 600
    fresh = sb.provider.get_statuses([export_id])[export_id]
    assert fresh.files[0].url != ready.files[0].url
    assert sb.download(fresh).status_code == 200


def test_expired_export_reports_expired_and_its_file_is_gone(
    locations_sandbox: LocationsSandbox,
) -> None:
    sb = locations_sandbox
    sb.state.expire_exports_after_seconds = 0.5
    export_id, ready = _export(sb)
    assert ready.state is ExportState.READY
    assert ready.expires_at is not None
    assert ready.expires_at <= datetime.now(UTC) + timedelta(seconds=1)
    time.sleep(0.6)
    assert sb.provider.get_statuses([export_id])[export_id].state is ExportState.EXPIRED
    response = sb.download(ready)
    assert response.status_code in (403, 410)  # the link expired with the export
    sb.state.expire_exports_after_seconds = None
    sb.state.expire(export_id)
    link = sb.state.status_body(export_id, sb.base_url)
    assert link["status"] == "EXPIRED"


def test_gone_file_is_classified_as_expired_export(locations_sandbox: LocationsSandbox) -> None:
    sb = locations_sandbox
    export_id, ready = _export(sb)
    sb.state.expire(export_id)  # link still validly signed, export gone
    response = sb.download(ready)
    assert response.status_code == 410
    assert isinstance(sb.provider.classify_download_error(response), ExportExpiredError)
    assert sb.provider.classify_download_error(httpx.Response(500)) is None


def test_truncated_download_can_be_resumed_with_range(
    locations_sandbox: LocationsSandbox,
) -> None:
    sb = locations_sandbox
    _, ready = _export(sb, format="csv")
    whole = sb.download(ready).content
    sb.state.truncate_next_download = True
    received = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream("GET", ready.files[0].url) as response,
    ):
        assert int(response.headers["content-length"]) == len(whole)
        for chunk in response.iter_bytes():
            received.extend(chunk)
    assert 0 < len(received) < len(whole)
    rest = httpx.get(ready.files[0].url, headers={"Range": f"bytes={len(received)}-"})
    assert rest.status_code == 206
    assert rest.headers["accept-ranges"] == "bytes"
    assert bytes(received) + rest.content == whole


# ---------------------------------------------------------------------- webhook events

COMPLETED_EVENT = {
    "requestId": "7890abcd-ef12-3456-7890-abcdef123456",
    "status": "COMPLETED",
    "exportUrl": "https://downloads.operator.com/exports/7890abcd.json",
    "downloadExpiresAt": "2025-06-09T00:00:00Z",
    "exportTimestamp": "2025-06-08T15:30:00Z",
    "totalCount": 45678,
}
FAILED_EVENT = {
    "requestId": "7890abcd-ef12-3456-7890-abcdef123456",
    "status": "FAILED",
    "error": {
        "code": "EXPORT_GENERATION_FAILED",
        "message": "Unable to generate export due to system error",
    },
}


def test_parse_event_completed_and_failed_bodies_from_the_docs() -> None:
    done = parse_event(COMPLETED_EVENT)
    assert done.export_id == COMPLETED_EVENT["requestId"]
    assert done.state is ExportState.READY
    assert done.expected_rows == 45678
    assert done.provider_timestamp == datetime(2025, 6, 8, 15, 30, tzinfo=UTC)
    assert done.expires_at == datetime(2025, 6, 9, tzinfo=UTC)
    (file,) = done.files
    assert file.url == COMPLETED_EVENT["exportUrl"]
    assert file.name == "locations-export.json"
    assert not file.authenticated

    failed = parse_event(FAILED_EVENT)
    assert failed.state is ExportState.FAILED
    assert failed.error_code == "EXPORT_GENERATION_FAILED"
    assert failed.error_message == "Unable to generate export due to system error"


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({k: v for k, v in COMPLETED_EVENT.items() if k != "requestId"}, "requestId"),
        ({**COMPLETED_EVENT, "status": "DONE"}, "DONE"),
        ({**COMPLETED_EVENT, "status": "PENDING"}, "COMPLETED or FAILED"),
        ({k: v for k, v in COMPLETED_EVENT.items() if k != "exportUrl"}, "exportUrl"),
        ({**COMPLETED_EVENT, "exportUrl": "https://x.test/export.parquet"}, "extension"),
        ({**COMPLETED_EVENT, "totalCount": "many"}, "totalCount"),
        ({**COMPLETED_EVENT, "exportTimestamp": "yesterday"}, "exportTimestamp"),
        ({**FAILED_EVENT, "error": "boom"}, "error"),
        (["not", "an", "object"], "object"),
    ],
)
def test_parse_event_refuses_malformed_bodies(body: object, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_event(body)  # type: ignore[arg-type]


def test_simulator_event_body_round_trips_through_parse_event(
    locations_sandbox: LocationsSandbox,
) -> None:
    sb = locations_sandbox
    export_id = sb.provider.request_export(LOCATIONS, ExportRequest()).export_id
    event = parse_event(sb.state.event_body(export_id, sb.base_url))
    assert event.state is ExportState.READY
    assert event.expected_rows == N_LOCATIONS
    assert sb.download(event).status_code == 200


# ------------------------------------------------------------------------ simulator scale


def test_big_operator_is_lazy_and_incremental_exports_touch_only_changes(tmp_path: Path) -> None:
    a = State(n_locations=200_000, seed=3, directory=tmp_path / "a", ready_after_seconds=0)
    b = State(n_locations=200_000, seed=3, directory=tmp_path / "b")
    assert a.location(199_999) == b.location(199_999)
    assert a.location(5) != State(seed=4, directory=tmp_path / "c").location(5)
    assert a.location(5)["id"] != a.location(6)["id"]
    a.mutate(updated=10, added=5)
    assert a.n_locations == 200_005
    since = datetime.now(UTC) - timedelta(seconds=5)
    assert a.count_rows(since) == 15
    export = a.create_export("json", since)
    started = time.monotonic()
    a.complete(export.id)
    assert time.monotonic() - started < 2
    assert export.total_count == 15
    assert export.path is not None
    assert len(json.loads(export.path.read_text(encoding="utf-8"))) == 15
    assert len(a._overrides) == 15  # memory holds only what changed
    with pytest.raises(IndexError):
        a.location(200_005)
