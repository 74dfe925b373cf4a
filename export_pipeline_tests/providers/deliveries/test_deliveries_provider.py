"""DeliveriesProvider against the simulator over real HTTP, with the CSV in a real S3 server."""

from __future__ import annotations

import csv
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportExpiredError,
    ExportLostError,
    ExportNotReadyError,
    LinkExpiredError,
    ProviderRejectedError,
    TransientProviderError,
)
from export_pipeline.core.model import (
    ExportKind,
    ExportRequest,
    ExportState,
    ExportStatus,
    RemoteFile,
)
from export_pipeline.core.netpolicy import UrlPolicy
from export_pipeline.core.transfer import DownloadedFile, download_file
from export_pipeline.providers.deliveries import DeliveriesProvider
from export_pipeline_tests.providers.deliveries.conftest import FAST_RETRY, DeliveriesSandbox

DAY = datetime(2026, 1, 2, tzinfo=UTC)

# The sandbox serves on loopback; the download policy refuses it unless allowed.
SANDBOX_POLICY = UrlPolicy.from_setting("loopback")


def window(start: datetime, end: datetime, **params: str) -> ExportRequest:
    return ExportRequest(modified_since=start, window_end=end, params=params)


def expected_ids(
    sandbox: DeliveriesSandbox, direction: str, start: datetime, end: datetime, **filters: str
) -> set[str]:
    """Computed here from the raw message log, not with the simulator's own filter."""
    return {
        m["id"]
        for m in sandbox.state.messages
        if m["direction"] == direction
        and start <= m["created_at"] < end
        and all(m.get(k) == v for k, v in filters.items())
    }


def ready(provider: DeliveriesProvider, export_id: str, timeout: float = 10.0) -> ExportStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = provider.get_statuses([export_id])[export_id]
        if status.state is not ExportState.PENDING and status.state is not ExportState.PROCESSING:
            return status
        assert time.monotonic() < deadline, f"export {export_id} still {status.state}"
        time.sleep(0.05)


def download(provider: DeliveriesProvider, status: ExportStatus, dest: Path) -> DownloadedFile:
    (file,) = status.files
    return download_file(
        file,
        dest,
        provider=provider.name,
        export_id=status.export_id,
        headers=provider.file_headers(file),
        api_host=provider.api_host,
        policy=FAST_RETRY,
        classify=provider.classify_download_error,
        url_policy=SANDBOX_POLICY,
    )


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def export_ready(
    sandbox: DeliveriesSandbox, kind: ExportKind, request: ExportRequest
) -> ExportStatus:
    created = sandbox.provider.request_export(kind, request)
    return ready(sandbox.provider, created.export_id)


@pytest.mark.parametrize("direction", ["outbound", "inbound"])
def test_each_direction_exports_exactly_the_window(
    deliveries_sandbox: DeliveriesSandbox, direction: str, tmp_path: Path
) -> None:
    sandbox = deliveries_sandbox
    start, end = DAY, DAY + timedelta(days=1)
    # Rows on both edges: the start is inclusive, the end exclusive.
    (on_start,) = sandbox.state.add_messages(1, at=start, direction=direction)
    (on_end,) = sandbox.state.add_messages(1, at=end, direction=direction)
    kind = sandbox.provider.kind(f"{direction}_messages")

    created = sandbox.provider.request_export(kind, window(start, end))
    assert created.state in {ExportState.PENDING, ExportState.PROCESSING}
    status = ready(sandbox.provider, created.export_id)
    assert status.state is ExportState.READY, status
    assert status.detail["filter_start_time"].startswith("2026-01-02T00:00:00")
    assert status.detail["filter_end_time"].startswith("2026-01-03T00:00:00")
    assert status.provider_timestamp is not None and status.expires_at is not None

    got = download(sandbox.provider, status, tmp_path)
    header, rows = read_csv(got.path)
    ids = [row["id"] for row in rows]
    want = expected_ids(sandbox, direction, start, end)
    assert len(want) > 10
    assert set(ids) == want and len(ids) == len(want)
    assert on_start["id"] in ids and on_end["id"] not in ids
    assert status.expected_rows == len(rows)
    assert status.files[0].size_bytes == got.size_bytes == got.path.stat().st_size
    # The provider's declared columns are exactly the file's header, in order.
    assert header == list(kind.columns or {})


def test_filters_travel_with_the_window(
    deliveries_sandbox: DeliveriesSandbox, tmp_path: Path
) -> None:
    sandbox = deliveries_sandbox
    start, end = DAY - timedelta(days=1), DAY + timedelta(days=3)
    kind = sandbox.provider.kind("outbound_messages")
    status = export_ready(sandbox, kind, window(start, end, status="failed", endpoint_id="ep_0002"))
    _, rows = read_csv(download(sandbox.provider, status, tmp_path).path)
    want = expected_ids(sandbox, "outbound", start, end, status="failed", endpoint_id="ep_0002")
    assert want and {row["id"] for row in rows} == want
    assert {(row["status"], row["endpoint_id"]) for row in rows} == {("failed", "ep_0002")}


def test_consecutive_windows_cover_every_row_once(
    deliveries_sandbox: DeliveriesSandbox, tmp_path: Path
) -> None:
    """Contiguous [a, b) + [b, c) windows: no row lost at the seam, none counted twice."""
    sandbox = deliveries_sandbox
    a, b, c = DAY, DAY + timedelta(hours=13, milliseconds=7), DAY + timedelta(days=1)
    sandbox.state.add_messages(3, at=b - timedelta(milliseconds=1), direction="inbound")
    kind = sandbox.provider.kind("inbound_messages")
    seen: list[str] = []
    for i, (lo, hi) in enumerate([(a, b), (b, c)]):
        # the spec sends whole seconds (time_format iso): the window edges below are exact seconds.
        lo, hi = lo.replace(microsecond=0), hi.replace(microsecond=0)
        status = export_ready(sandbox, kind, window(lo, hi))
        _, rows = read_csv(download(sandbox.provider, status, tmp_path / str(i)).path)
        seen += [row["id"] for row in rows]
    assert len(seen) == len(set(seen))
    assert set(seen) == expected_ids(sandbox, "inbound", a, c)


def test_lifecycle_pending_processing_completed(deliveries_sandbox: DeliveriesSandbox) -> None:
    sandbox = deliveries_sandbox
    sandbox.state.ready_after_seconds = 0.6
    kind = sandbox.provider.kind("outbound_messages")
    created = sandbox.provider.request_export(kind, window(DAY, DAY + timedelta(hours=1)))
    seen = [created.state]
    while seen[-1] is not ExportState.READY:
        seen.append(sandbox.provider.get_statuses([created.export_id])[created.export_id].state)
        time.sleep(0.05)
    assert seen[0] is ExportState.PENDING
    assert ExportState.PROCESSING in seen
    assert seen.index(ExportState.PROCESSING) < seen.index(ExportState.READY)


def test_redirect_goes_to_s3_and_only_the_api_sees_the_key(
    deliveries_sandbox: DeliveriesSandbox, tmp_path: Path
) -> None:
    sandbox = deliveries_sandbox
    kind = sandbox.provider.kind("outbound_messages")
    status = export_ready(sandbox, kind, window(DAY, DAY + timedelta(days=1)))
    object_path = f"/{sandbox.state.bucket}/{sandbox.state.object_key(status.export_id)}"

    # The API answers the download with a 302 whose Location is the S3 server.
    with httpx.Client(follow_redirects=False) as client:
        answer = client.get(
            status.files[0].url, headers={"Authorization": f"Bearer {sandbox.state.token}"}
        )
    assert answer.status_code == 302
    location = httpx.URL(answer.headers["location"])
    assert f"{location.scheme}://{location.host}:{location.port}" == sandbox.s3.endpoint_url
    assert location.path == object_path
    assert "X-Amz-Signature" in location.params

    sandbox.s3.clear_requests()
    api_calls_before = len(sandbox.state.calls)
    got = download(sandbox.provider, status, tmp_path)
    assert got.size_bytes == status.files[0].size_bytes

    at_s3 = [r for r in sandbox.s3.requests if r.path == object_path]
    assert len(at_s3) == 1 and at_s3[0].is_presigned
    assert "authorization" not in at_s3[0].headers, at_s3[0].headers
    at_api = [c for c in sandbox.state.calls[api_calls_before:] if c.path.endswith("/download")]
    assert [c.authorization for c in at_api] == [f"Bearer {sandbox.state.token}"]


def test_s3_refuses_a_presigned_url_that_also_carries_the_key(
    deliveries_sandbox: DeliveriesSandbox,
) -> None:
    """Why the header must be dropped: real S3 rejects two auth mechanisms (and we see it)."""
    sandbox = deliveries_sandbox
    kind = sandbox.provider.kind("inbound_messages")
    status = export_ready(sandbox, kind, window(DAY, DAY + timedelta(days=1)))
    key = {"Authorization": f"Bearer {sandbox.state.token}"}
    location = httpx.get(status.files[0].url, headers=key).headers["location"]
    sandbox.s3.clear_requests()
    answer = httpx.get(location, headers=key)
    assert answer.status_code == 400 and "InvalidArgument" in answer.text
    assert sandbox.s3.requests[-1].headers["authorization"] == key["Authorization"]


def test_expired_presigned_url_is_refused_by_s3(deliveries_sandbox: DeliveriesSandbox) -> None:
    sandbox = deliveries_sandbox
    # X-Amz-Date has whole seconds, so a URL lives between ttl-1 and ttl seconds: 3 s leaves
    # room for the "still fresh" control below on a slow machine.
    sandbox.state.presign_ttl_seconds = 3
    kind = sandbox.provider.kind("outbound_messages")
    status = export_ready(sandbox, kind, window(DAY, DAY + timedelta(days=1)))
    key = {"Authorization": f"Bearer {sandbox.state.token}"}
    location = httpx.get(status.files[0].url, headers=key).headers["location"]
    assert httpx.get(location).status_code == 200  # fresh: works
    time.sleep(3.2)
    expired = httpx.get(location)
    assert expired.status_code == 403
    assert "AccessDenied" in expired.text and "expired" in expired.text
    error = sandbox.provider.classify_download_error(expired)
    assert isinstance(error, LinkExpiredError) and error.retryable
    # A new /download call hands out a fresh, working URL.
    assert httpx.get(httpx.get(status.files[0].url, headers=key).headers["location"]).is_success


def test_download_before_completion_is_not_ready(
    deliveries_sandbox: DeliveriesSandbox, tmp_path: Path
) -> None:
    sandbox = deliveries_sandbox
    sandbox.state.ready_after_seconds = 60
    kind = sandbox.provider.kind("outbound_messages")
    created = sandbox.provider.request_export(kind, window(DAY, DAY + timedelta(days=1)))
    # Someone downloads too early: the same file a READY status would have announced.
    early = ExportStatus(
        export_id=created.export_id,
        state=ExportState.READY,
        files=(
            RemoteFile(
                url=f"{sandbox.base_url}/v1/exports/{created.export_id}/download",
                name="export.csv",
                authenticated=True,
            ),
        ),
    )
    with pytest.raises(ExportNotReadyError) as caught:
        download(sandbox.provider, early, tmp_path)
    assert caught.value.code == "EXPORT_NOT_READY"
    assert caught.value.request_id and caught.value.request_id.startswith("req_")
    assert caught.value.retryable
    assert not list(tmp_path.iterdir())


def test_expired_export(deliveries_sandbox: DeliveriesSandbox, tmp_path: Path) -> None:
    sandbox = deliveries_sandbox
    kind = sandbox.provider.kind("inbound_messages")
    status = export_ready(sandbox, kind, window(DAY, DAY + timedelta(days=1)))
    sandbox.state.expire_export(status.export_id)
    assert ready(sandbox.provider, status.export_id).state is ExportState.EXPIRED
    with pytest.raises(ExportExpiredError) as caught:
        download(sandbox.provider, status, tmp_path)
    assert caught.value.code == "EXPORT_EXPIRED"
    assert caught.value.request_id and caught.value.request_id.startswith("req_")
    assert caught.value.export_id == status.export_id


def test_unauthorized_names_the_env_var_and_keeps_request_id(
    deliveries_sandbox: DeliveriesSandbox, tmp_path: Path
) -> None:
    sandbox = deliveries_sandbox
    kind = sandbox.provider.kind("outbound_messages")
    status = export_ready(sandbox, kind, window(DAY, DAY + timedelta(days=1)))
    wrong = DeliveriesProvider.from_settings(
        base_url=sandbox.base_url, token="not-the-key", retry=FAST_RETRY
    )
    try:
        calls = [
            lambda: wrong.request_export(kind, window(DAY, DAY + timedelta(days=1))),
            lambda: wrong.get_statuses([status.export_id]),
            lambda: download(wrong, status, tmp_path),
        ]
        for call in calls:
            with pytest.raises(ConfigurationError) as caught:
                call()
            assert "DELIVERIES_API_KEY" in str(caught.value)
            assert caught.value.code == "UNAUTHORIZED"
            assert caught.value.request_id and caught.value.request_id.startswith("req_")
    finally:
        wrong.close()


def test_unknown_export_is_lost(deliveries_sandbox: DeliveriesSandbox, tmp_path: Path) -> None:
    sandbox = deliveries_sandbox
    kind = sandbox.provider.kind("outbound_messages")
    status = export_ready(sandbox, kind, window(DAY, DAY + timedelta(days=1)))
    sandbox.state.forget_export(status.export_id)
    lost = sandbox.provider.get_statuses([status.export_id])[status.export_id]
    assert lost.state is ExportState.LOST and lost.error_code == "NOT_FOUND"
    assert str(lost.detail["request_id"]).startswith("req_")
    with pytest.raises(ExportLostError) as caught:
        download(sandbox.provider, status, tmp_path)
    assert caught.value.code == "NOT_FOUND"
    assert caught.value.request_id and caught.value.request_id.startswith("req_")


def test_failed_export_maps_to_failed(deliveries_sandbox: DeliveriesSandbox) -> None:
    sandbox = deliveries_sandbox
    sandbox.state.fail_next = "query exceeded the time limit"
    kind = sandbox.provider.kind("inbound_messages")
    status = export_ready(sandbox, kind, window(DAY, DAY + timedelta(days=1)))
    assert status.state is ExportState.FAILED
    assert status.error_message == "query exceeded the time limit"
    assert status.files == () and status.provider_status == "failed"
    # The switch is one-shot: the next export succeeds.
    assert export_ready(sandbox, kind, window(DAY, DAY + timedelta(days=1))).state is (
        ExportState.READY
    )


def test_invalid_window_is_rejected_with_request_id(
    deliveries_sandbox: DeliveriesSandbox,
) -> None:
    sandbox = deliveries_sandbox
    kind = sandbox.provider.kind("outbound_messages")
    with pytest.raises(ProviderRejectedError) as caught:
        sandbox.provider.request_export(kind, window(DAY, DAY))
    assert caught.value.code == "INVALID_REQUEST"
    assert caught.value.request_id and caught.value.request_id.startswith("req_")
    with pytest.raises(ProviderRejectedError, match="inbound_endpoint_id"):
        sandbox.provider.request_export(
            kind, window(DAY, DAY + timedelta(hours=1), inbound_endpoint_id="ie_0001")
        )


def test_rate_limits_are_retried_then_surface(deliveries_sandbox: DeliveriesSandbox) -> None:
    sandbox = deliveries_sandbox
    sandbox.state.rate_limit_retry_after = 0
    kind = sandbox.provider.kind("outbound_messages")
    sandbox.state.rate_limit_next = 2
    before = len(sandbox.state.calls)
    created = sandbox.provider.request_export(kind, window(DAY, DAY + timedelta(hours=1)))
    assert created.state is ExportState.PENDING
    assert len(sandbox.state.calls) - before == 3
    sandbox.state.rate_limit_next = FAST_RETRY.max_attempts
    with pytest.raises(TransientProviderError):
        sandbox.provider.get_statuses([created.export_id])


def test_kinds_are_windowed_merges_per_direction() -> None:
    kinds = {kind.name: kind for kind in DeliveriesProvider.kinds}
    assert set(kinds) == {"outbound_messages", "inbound_messages"}
    for name, kind in kinds.items():
        assert kind.params["direction"] == name.removesuffix("_messages")
        assert kind.primary_key == ("id",) and kind.primary_key[0] in (kind.columns or {})
        assert kind.incremental.value == "window" and kind.load_mode.value == "merge"
    assert "inbound_endpoint_id" in (kinds["inbound_messages"].columns or {})
    assert "endpoint_id" in (kinds["outbound_messages"].columns or {})


def test_presigned_url_is_bound_to_its_object(deliveries_sandbox: DeliveriesSandbox) -> None:
    """The S3 leg is really signed: pointing one export's URL at another object is refused."""
    sandbox = deliveries_sandbox
    kind = sandbox.provider.kind("outbound_messages")
    first = export_ready(sandbox, kind, window(DAY, DAY + timedelta(hours=6)))
    second = export_ready(sandbox, kind, window(DAY, DAY + timedelta(hours=12)))
    key = {"Authorization": f"Bearer {sandbox.state.token}"}
    location = httpx.get(first.files[0].url, headers=key).headers["location"]
    forged = location.replace(first.export_id, second.export_id)
    assert forged != location
    answer = httpx.get(forged)
    assert answer.status_code == 403 and "SignatureDoesNotMatch" in answer.text
    assert httpx.get(location).status_code == 200
