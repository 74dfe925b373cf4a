"""MappingProvider against the mapping.travel simulator over real HTTP on loopback."""

from __future__ import annotations

import csv
import gzip
import io
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from export_pipeline.core.errors import ConfigurationError, LinkExpiredError, ProviderRejectedError
from export_pipeline.core.model import ExportRequest, ExportState, ExportStatus, RemoteFile
from export_pipeline.core.netpolicy import UrlPolicy
from export_pipeline.core.transfer import download_file
from export_pipeline.providers.mapping import RESULTS, MappingProvider
from export_pipeline.sandbox.mapping import State
from export_pipeline_tests.providers.mapping.conftest import (
    FAST_RETRY,
    MappingSandbox,
    start_sandbox,
)

GZIP_MAGIC = b"\x1f\x8b"

# The sandbox serves on loopback; the download policy refuses it unless allowed.
SANDBOX_POLICY = UrlPolicy.from_setting("loopback")


def decode_results(data: bytes) -> list[dict[str, Any]]:
    """Read a results file the way a careful client must: by content, not by name or type."""
    if data[:2] == GZIP_MAGIC:
        data = gzip.decompress(data)
    text = data.decode("utf-8")
    head = text.lstrip()[:1]
    if head == "[":
        return json.loads(text)
    if head == "{":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    return [{**row, "confidence": float(row["confidence"])} for row in rows]


def trigger(provider: MappingProvider, job_id: str) -> ExportStatus:
    return provider.request_export(RESULTS, ExportRequest(partition=job_id))


def ready_status(provider: MappingProvider, export_id: str) -> ExportStatus:
    status = provider.get_statuses([export_id])[export_id]
    assert status.state is ExportState.READY, status
    return status


def download(file: RemoteFile) -> httpx.Response:
    # No credentials: the link is presigned, exactly as the transfer layer will fetch it.
    return httpx.get(file.url, timeout=10)


@pytest.fixture
def short_links() -> Iterator[MappingSandbox]:
    yield from start_sandbox(State(link_ttl_seconds=1))


@pytest.mark.parametrize("use_gzip", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("file_format", ["csv", "json", "jsonl"])
def test_export_ready_and_downloadable_in_every_format(
    mapping_sandbox: MappingSandbox, file_format: str, use_gzip: bool
) -> None:
    state, provider = mapping_sandbox.state, mapping_sandbox.provider
    state.file_format = file_format  # type: ignore[assignment]
    state.gzip = use_gzip
    job_id = state.add_job(25)

    pending = trigger(provider, job_id)
    assert pending.state is ExportState.PENDING
    assert pending.export_id and pending.detail["mappingJobId"] == job_id
    assert state.export_calls == 1

    before = datetime.now(UTC)
    status = ready_status(provider, pending.export_id)
    (file,) = status.files
    assert file.name == "results" and not file.authenticated
    assert provider.file_headers(file) == {}  # the Bearer token never goes to the link
    assert status.expires_at is not None
    assert before + timedelta(seconds=55) < status.expires_at < before + timedelta(seconds=65)

    response = download(file)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.content.startswith(GZIP_MAGIC) is use_gzip
    assert decode_results(response.content) == state.rows(job_id)
    assert state.downloads == 1


def test_rows_cover_unicode_quotes_and_confidence_edges(mapping_sandbox: MappingSandbox) -> None:
    state = mapping_sandbox.state
    rows = state.rows(state.add_job(40))
    names = {r["referenceName"] for r in rows}
    assert any(not n.isascii() for n in names)
    assert {r["matchMethod"] for r in rows} == {"exact", "fuzzy", "geo", "manual"}
    assert all(0.0 <= r["confidence"] <= 1.0 for r in rows)
    assert {0.0, 1.0} <= {r["confidence"] for r in rows}
    assert len({r["supplierHotelId"] for r in rows}) == len(rows)
    # Deterministic: another organization with the same seed sees the same job and rows.
    other = State()
    try:
        assert other.rows(other.add_job(40)) == rows
    finally:
        other.close()


def test_job_id_from_params_and_conflicts(mapping_sandbox: MappingSandbox) -> None:
    state, provider = mapping_sandbox.state, mapping_sandbox.provider
    job_id = state.add_job(3)
    status = provider.request_export(RESULTS, ExportRequest(params={"mapping_job_id": job_id}))
    assert status.detail["mappingJobId"] == job_id
    with pytest.raises(ConfigurationError, match="two jobs"):
        provider.request_export(
            RESULTS, ExportRequest(partition=job_id, params={"mapping_job_id": "other"})
        )
    with pytest.raises(ConfigurationError, match="no mapping job id"):
        provider.request_export(RESULTS, ExportRequest())
    assert state.export_calls == 1


def test_success_false_for_job_without_results_is_raised(mapping_sandbox: MappingSandbox) -> None:
    state, provider = mapping_sandbox.state, mapping_sandbox.provider
    job_id = state.add_job(0)
    with pytest.raises(ProviderRejectedError) as info:
        trigger(provider, job_id)
    err = info.value
    assert err.code == "EXPORT_NOT_TRIGGERED"
    assert "No results" in str(err) and job_id in str(err)
    assert err.request_id and err.request_id.startswith("req-")
    assert state.export_calls == 1  # a success:false is not retried
    assert state.exports == {}


def test_success_false_message_is_surfaced_then_next_export_works(
    mapping_sandbox: MappingSandbox,
) -> None:
    state, provider = mapping_sandbox.state, mapping_sandbox.provider
    job_id = state.add_job(5)
    state.fail_next_export_message = "Export storage quota exceeded"
    with pytest.raises(ProviderRejectedError, match="Export storage quota exceeded") as info:
        trigger(provider, job_id)
    assert info.value.code == "EXPORT_NOT_TRIGGERED"
    assert job_id in str(info.value)
    status = trigger(provider, job_id)
    assert ready_status(provider, status.export_id).files


def test_unknown_job_is_a_clear_error(mapping_sandbox: MappingSandbox) -> None:
    job_id = "00000000-0000-4000-8000-000000000000"
    with pytest.raises(ProviderRejectedError) as info:
        trigger(mapping_sandbox.provider, job_id)
    assert info.value.code == "MAPPING_JOB_NOT_FOUND"
    assert job_id in str(info.value) and "for this organization" in str(info.value)


def test_bad_token_names_the_setting(mapping_sandbox: MappingSandbox) -> None:
    state = mapping_sandbox.state
    job_id = state.add_job(2)
    export_id = trigger(mapping_sandbox.provider, job_id).export_id
    bad = mapping_sandbox.provider_with(token="wrong-token")
    try:
        with pytest.raises(ConfigurationError, match="MAPPING_API_TOKEN"):
            trigger(bad, job_id)
        with pytest.raises(ConfigurationError, match="MAPPING_API_TOKEN"):
            bad.get_statuses([export_id])
    finally:
        bad.close()
    with pytest.raises(ConfigurationError, match="MAPPING_API_TOKEN"):
        MappingProvider.from_settings(base_url=mapping_sandbox.base_url, token="")


def test_expired_link_is_refused_and_a_fresh_one_works(short_links: MappingSandbox) -> None:
    state, provider = short_links.state, short_links.provider
    job_id = state.add_job(7)
    export_id = trigger(provider, job_id).export_id
    stale = ready_status(provider, export_id).files[0]
    time.sleep(2.2)  # ttl 1 s, links rounded up to the next whole second
    refused = download(stale)
    assert refused.status_code == 403
    assert "expired" in refused.text
    assert isinstance(provider.classify_download_error(refused), LinkExpiredError)

    fresh = ready_status(provider, export_id).files[0]
    assert fresh.url != stale.url
    response = download(fresh)
    assert response.status_code == 200
    assert decode_results(response.content) == state.rows(job_id)
    assert state.download_link_calls == 2


def test_transfer_layer_gets_link_expired_then_fresh_link_downloads(
    short_links: MappingSandbox, tmp_path: Path
) -> None:
    """The real fetch step with this provider's classifier: gzip jsonl, no file extension."""
    state, provider = short_links.state, short_links.provider
    state.file_format, state.gzip = "jsonl", True
    job_id = state.add_job(9)
    export_id = trigger(provider, job_id).export_id
    stale = ready_status(provider, export_id).files[0]
    time.sleep(2.2)

    def fetch(file: RemoteFile) -> Path:
        return download_file(
            file,
            tmp_path,
            provider=provider.name,
            export_id=export_id,
            headers=provider.file_headers(file),
            api_host=provider.api_host,
            policy=FAST_RETRY,
            classify=provider.classify_download_error,
            url_policy=SANDBOX_POLICY,
        ).path

    with pytest.raises(LinkExpiredError) as info:
        fetch(stale)
    assert info.value.code == "LINK_EXPIRED" and info.value.export_id == export_id
    path = fetch(ready_status(provider, export_id).files[0])
    assert path.name == "results"
    assert decode_results(path.read_bytes()) == state.rows(job_id)


def test_tampered_link_is_refused(mapping_sandbox: MappingSandbox) -> None:
    state, provider = mapping_sandbox.state, mapping_sandbox.provider
    export_id = trigger(provider, state.add_job(2)).export_id
    url = ready_status(provider, export_id).files[0].url
    tampered = httpx.URL(url).copy_merge_params({"expires": "9999999999"})
    assert httpx.get(tampered).status_code == 403
    assert state.downloads == 0


def test_processing_until_ready() -> None:
    for sandbox in start_sandbox(State(ready_after_seconds=1.0)):
        state, provider = sandbox.state, sandbox.provider
        export_id = trigger(provider, state.add_job(3)).export_id
        status = provider.get_statuses([export_id])[export_id]
        assert status.state is ExportState.PROCESSING and not status.files
        time.sleep(1.2)
        assert ready_status(provider, export_id).files


def test_failed_generation_and_unknown_export(mapping_sandbox: MappingSandbox) -> None:
    state, provider = mapping_sandbox.state, mapping_sandbox.provider
    job_id = state.add_job(3)
    state.fail_next_generation_message = "Export worker crashed"
    failed_id = trigger(provider, job_id).export_id
    ok_id = trigger(provider, job_id).export_id
    statuses = provider.get_statuses([failed_id, ok_id, "no-such-export"])
    assert statuses[failed_id].state is ExportState.FAILED
    assert statuses[failed_id].error_message == "Export worker crashed"
    assert statuses[ok_id].state is ExportState.READY
    assert statuses["no-such-export"].state is ExportState.LOST
    state.drop_export(ok_id)
    assert provider.get_statuses([ok_id])[ok_id].state is ExportState.LOST


def test_reexport_reflects_new_results(mapping_sandbox: MappingSandbox) -> None:
    state, provider = mapping_sandbox.state, mapping_sandbox.provider
    job_id = state.add_job(4)
    first = trigger(provider, job_id).export_id
    new_rows = [
        {
            "partnerInventoryId": "inv-1",
            "supplierHotelId": "SUP-X",
            "referenceHotelId": "REF-1",
            "referenceName": "Hôtel Neuf",
            "referenceCountryCode": "FR",
            "referenceCity": "Lyon",
            "confidence": 0.5,
            "matchMethod": "geo",
        }
    ]
    state.set_results(job_id, new_rows)
    second = trigger(provider, job_id).export_id
    assert second != first
    body = download(ready_status(provider, second).files[0]).content
    assert decode_results(body) == [{"mappingJobId": job_id, **new_rows[0]}]
    # The earlier export is a snapshot: it still holds the old rows.
    old = decode_results(download(ready_status(provider, first).files[0]).content)
    assert len(old) == 4


def test_custom_download_path() -> None:
    path = "/api/v2/export-files/{exportFileId}/link"
    for sandbox in start_sandbox(State(download_path=path)):
        state = sandbox.state
        export_id = trigger(sandbox.provider, state.add_job(2)).export_id
        # The default path does not exist on this server: a plain 404, not an API answer. It
        # names the setting instead of passing the export off as lost (which would re-trigger).
        with pytest.raises(ProviderRejectedError, match="download_path") as refused:
            sandbox.provider.get_statuses([export_id])
        assert refused.value.code == "DOWNLOAD_PATH_NOT_FOUND"
        custom = sandbox.provider_with(download_path=path)
        try:
            file = ready_status(custom, export_id).files[0]
            assert decode_results(download(file).content) == state.rows(
                state.exports[export_id].job_id
            )
        finally:
            custom.close()
    with pytest.raises(ConfigurationError, match="placeholder"):
        MappingProvider.from_settings(
            base_url="http://127.0.0.1:1", token="t", download_path="/api/v1/exports/download"
        )


def test_wrong_kind_is_refused(mapping_sandbox: MappingSandbox) -> None:
    from dataclasses import replace

    other = replace(RESULTS, name="something_else")
    with pytest.raises(ValueError, match="cannot export"):
        mapping_sandbox.provider.request_export(other, ExportRequest(partition="x"))
    assert mapping_sandbox.state.export_calls == 0


def test_kind_declaration() -> None:
    assert MappingProvider.name == "mapping"
    assert MappingProvider.kinds == (RESULTS,)
    assert RESULTS.primary_key == ("mappingJobId", "supplierHotelId")
    assert RESULTS.partition_column == "mappingJobId"
    assert RESULTS.value_ranges["confidence"] == (0.0, 1.0)
    assert RESULTS.columns is not None and RESULTS.columns["confidence"] == "DOUBLE"


def test_parse_event_completed_and_failed() -> None:
    job_id, status = MappingProvider.parse_event(
        json.dumps(
            {
                "event": "mapping.export.completed",
                "mappingJobId": "job-1",
                "exportFileId": "file-1",
                "occurredAt": "2025-03-01T10:00:00Z",
            }
        ).encode()
    )
    assert job_id == "job-1"
    assert status.export_id == "file-1" and status.state is ExportState.READY
    assert status.files == ()  # links are short-lived: fetched fresh via get_statuses
    assert status.provider_timestamp == datetime(2025, 3, 1, 10, tzinfo=UTC)

    job_id, status = MappingProvider.parse_event(
        {
            "event": "mapping.export.failed",
            "mappingJobId": "job-2",
            "exportFileId": "file-2",
            "message": "disk full",
        }
    )
    assert job_id == "job-2"
    assert status.state is ExportState.FAILED and status.error_message == "disk full"


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        ({"event": "mapping.job.created", "mappingJobId": "j", "exportFileId": "f"}, "event"),
        ({"event": "mapping.export.completed", "exportFileId": "f"}, "mappingJobId"),
        (
            {"event": "mapping.export.completed", "mappingJobId": "j", "exportFileId": ""},
            "exportFileId",
        ),
        (
            {
                "event": "mapping.export.completed",
                "mappingJobId": "j",
                "exportFileId": "f",
                "occurredAt": "yesterday",
            },
            "occurredAt",
        ),
    ],
)
def test_parse_event_rejects_invalid_bodies(body: Any, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        MappingProvider.parse_event(body)
