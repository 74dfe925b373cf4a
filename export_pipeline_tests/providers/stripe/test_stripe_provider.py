"""The Stripe spec run by the generic engine against the simulator over HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportNotReadyError,
    ProviderRejectedError,
)
from export_pipeline.core.model import ExportRequest, ExportState
from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.sandbox.stripe import BASE_START, StripeSandbox
from export_pipeline_tests.providers.stripe.conftest import connect

KIND_NAME = "balance_change_from_activity"


def _at(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def test_request_poll_ready_with_a_file_on_the_file_host(
    stripe: SpecProvider, stripe_sandbox: StripeSandbox
) -> None:
    kind = stripe.kind(KIND_NAME)
    since = _at(BASE_START + 3600)
    status = stripe.request_export(kind, ExportRequest(modified_since=since))
    assert status.state is ExportState.PENDING and status.export_id.startswith("frr_")

    ready = stripe.get_statuses([status.export_id])[status.export_id]
    assert ready.state is ExportState.READY
    (file,) = ready.files
    assert file.url.startswith(stripe_sandbox.files_url + "/v1/files/file_")
    assert file.authenticated and file.size_bytes and file.size_bytes > 0
    # Credentials go to the file host (files.stripe.com), the one origin transfer allows.
    assert stripe.api_host == httpx.URL(stripe_sandbox.files_url).netloc.decode()
    # The window: from the cursor to data_available_end, in Unix seconds, form-encoded.
    assert ready.provider_timestamp == _at(stripe_sandbox.state.data_available_end)
    run = stripe_sandbox.state.runs[status.export_id]
    assert (run.interval_start, run.interval_end) == (
        BASE_START + 3600,
        stripe_sandbox.state.data_available_end,
    )


def test_a_window_past_data_available_end_is_clipped_and_an_empty_one_waits(
    stripe: SpecProvider, stripe_sandbox: StripeSandbox
) -> None:
    kind = stripe.kind(KIND_NAME)
    available = stripe_sandbox.state.data_available_end
    status = stripe.request_export(
        kind, ExportRequest(modified_since=_at(BASE_START), window_end=_at(available + 86400))
    )
    assert stripe_sandbox.state.runs[status.export_id].interval_end == available
    with pytest.raises(ExportNotReadyError) as caught:
        stripe.request_export(kind, ExportRequest(modified_since=_at(available + 60)))
    assert caught.value.code == "NO_DATA_AVAILABLE"


def test_failed_run_and_unknown_id(stripe: SpecProvider, stripe_sandbox: StripeSandbox) -> None:
    stripe_sandbox.state.fail_next_runs = 1
    status = stripe.request_export(stripe.kind(KIND_NAME), ExportRequest())
    statuses = stripe.get_statuses([status.export_id, "frr_nope"])
    failed = statuses[status.export_id]
    assert failed.state is ExportState.FAILED and failed.files == ()
    assert failed.error_code == "EXPORT_FAILED" and "could not be generated" in failed.error_message
    lost = statuses["frr_nope"]
    assert lost.state is ExportState.LOST and lost.error_code == "resource_missing"
    assert lost.detail["request_id"].startswith("req_")


def test_bad_key_names_the_env_var_and_keeps_the_request_id(
    stripe_sandbox: StripeSandbox,
) -> None:
    provider = connect(stripe_sandbox, token="sk_test_wrong")
    with pytest.raises(ConfigurationError) as caught:
        provider.request_export(provider.kind(KIND_NAME), ExportRequest())
    assert "STRIPE_API_KEY" in str(caught.value)
    assert caught.value.request_id and caught.value.request_id.startswith("req_")
    provider.close()


def test_rate_limits_are_retried(stripe: SpecProvider, stripe_sandbox: StripeSandbox) -> None:
    stripe_sandbox.state.rate_limit_next = 2
    status = stripe.request_export(stripe.kind(KIND_NAME), ExportRequest())
    assert status.state is ExportState.PENDING
    assert stripe_sandbox.state.rate_limit_next == 0


def test_interval_outside_the_available_data_is_refused(
    stripe: SpecProvider, stripe_sandbox: StripeSandbox
) -> None:
    # Bypass the engine's clipping to see how the API's own refusal is classified.
    response = stripe.api.request(
        "POST",
        "/v1/reporting/report_runs",
        data={
            "report_type": "balance_change_from_activity.itemized.1",
            "parameters[interval_start]": BASE_START,
            "parameters[interval_end]": stripe_sandbox.state.data_available_end + 10,
        },
    )
    error = stripe.error_for(response)
    assert isinstance(error, ProviderRejectedError)
    assert error.hint and "data_available_end" in error.hint


def test_webhook_event_names_the_run(stripe: SpecProvider, stripe_sandbox: StripeSandbox) -> None:
    status = stripe.request_export(stripe.kind(KIND_NAME), ExportRequest())
    partition, pushed = stripe.parse_event(stripe_sandbox.state.event_body(status.export_id))
    assert partition is None
    assert pushed.export_id == status.export_id and pushed.state is ExportState.READY
    with pytest.raises(ValueError, match=r"type 'charge\.succeeded'"):
        stripe.parse_event({"type": "charge.succeeded", "data": {"object": {"id": "ch_1"}}})


def test_expired_file_is_classified(stripe: SpecProvider, stripe_sandbox: StripeSandbox) -> None:
    response = httpx.get(
        f"{stripe_sandbox.files_url}/v1/files/file_gone/contents",
        headers=stripe.api.auth_headers,
    )
    assert response.status_code == 404
    error = stripe.classify_download_error(response)
    assert type(error).__name__ == "ExportExpiredError"


def test_window_values_are_whole_unix_seconds(
    stripe: SpecProvider, stripe_sandbox: StripeSandbox
) -> None:
    since = _at(BASE_START) + timedelta(seconds=1.7)
    status = stripe.request_export(stripe.kind(KIND_NAME), ExportRequest(modified_since=since))
    method, path, _ = stripe_sandbox.state.calls[-1]
    assert (method, path) == ("POST", "/v1/reporting/report_runs")
    assert stripe_sandbox.state.runs[status.export_id].interval_start == BASE_START + 1
