"""Webhook-delivery platform: message-log exports (provider ``deliveries``).

Endpoints (API key as ``Authorization: Bearer <DELIVERIES_API_KEY>``, base URL from
``DELIVERIES_API_URL``):

* ``POST /v1/exports`` ``{"start_time", "end_time", "direction": "outbound"|"inbound",
  "status"?, "endpoint_id"?, "inbound_endpoint_id"?}`` -> ``{"data": {id, status, ...}}``.
* ``GET /v1/exports/{id}`` -> ``{"data": {id, status, row_count, file_size_bytes,
  error_message, filter_start_time, filter_end_time, started_at, completed_at, expires_at}}``
  with status ``pending | processing | completed | failed | expired``.
* ``GET /v1/exports/{id}/download`` -> **302** to a presigned S3 URL of one CSV.

The cursor: this API has no "modified since"; an export is the messages with
``start_time <= created_at < end_time``. The kinds are ``Incremental.WINDOW``: each run asks for
``[end of the last loaded window - overlap, now - settle)`` (``core/windows.py``), windows are
contiguous so nothing falls between two, and the overlap's duplicates are absorbed by the MERGE
on the message ``id``. One kind per ``direction`` (outbound / inbound), which the API exports
separately.

Quirks worth knowing:

* The download file is ``authenticated=True``: the Bearer key must reach the API host to get the
  302, and must *not* follow the redirect to S3 (S3 refuses two auth mechanisms with 400, and
  the key would leak into another host's logs). ``core/transfer.py`` follows redirects by hand
  and sends credentials only to the API host.
* Errors come as ``{"error": {"code", "message"}, "meta": {"request_id"}}``; the typed errors
  carry ``request_id`` because support asks for it. ``EXPORT_NOT_READY`` -> keep waiting,
  ``EXPORT_EXPIRED`` -> request the same window again, ``UNAUTHORIZED`` -> configuration error
  naming ``DELIVERIES_API_KEY``, ``NOT_FOUND`` -> the export is lost (status calls map it to
  ``ExportState.LOST`` instead of raising).
* ``ApiClient`` would turn a 401 into a ConfigurationError before the body is read, dropping
  the ``request_id``; this provider builds it with ``raise_on_401=False`` and maps the 401
  envelope itself (still a ConfigurationError naming ``DELIVERIES_API_KEY``).
* The presigned URL itself expires (minutes); S3 then answers 403 ``AccessDenied`` "Request has
  expired", which :meth:`DeliveriesProvider.classify_download_error` turns into a retryable
  ``LinkExpiredError`` (a new ``/download`` call yields a fresh URL).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportExpiredError,
    ExportLostError,
    ExportNotReadyError,
    ExportPipelineError,
    LinkExpiredError,
    ProviderRejectedError,
    TransientProviderError,
)
from export_pipeline.core.http import ApiClient, RetryPolicy
from export_pipeline.core.model import (
    ExportKind,
    ExportRequest,
    ExportState,
    ExportStatus,
    Incremental,
    LoadMode,
    RemoteFile,
)
from export_pipeline.providers.base import ExportProvider, format_utc, parse_utc
from export_pipeline.providers.spec import Sandbox

TOKEN_ENV_VAR = "DELIVERIES_API_KEY"
URL_ENV_VAR = "DELIVERIES_API_URL"
DIRECTIONS = ("outbound", "inbound")
# Optional request filters the API accepts next to the window (taken from ExportRequest.params).
FILTER_PARAMS = ("status", "endpoint_id", "inbound_endpoint_id")

_STATES = {
    "pending": ExportState.PENDING,
    "processing": ExportState.PROCESSING,
    "completed": ExportState.READY,
    "failed": ExportState.FAILED,
    "expired": ExportState.EXPIRED,
}

# Columns shared by both directions; "direction-specific" ones are inserted after event_type.
_COMMON_HEAD = {"id": "VARCHAR", "created_at": "TIMESTAMPTZ", "event_type": "VARCHAR"}
_COMMON_TAIL = {
    "status": "VARCHAR",  # delivered | failed | pending (retries scheduled)
    "attempt_count": "INTEGER",
    "last_attempt_at": "TIMESTAMPTZ",
    "next_attempt_at": "TIMESTAMPTZ",  # only while status = pending
    "response_status_code": "INTEGER",  # empty when no attempt got an HTTP answer
    "response_time_ms": "INTEGER",
    "payload_size_bytes": "BIGINT",
    "idempotency_key": "VARCHAR",
}
_DIRECTION_COLUMNS = {
    "outbound": {"endpoint_id": "VARCHAR", "endpoint_url": "VARCHAR"},
    "inbound": {
        "inbound_endpoint_id": "VARCHAR",
        "source": "VARCHAR",
        "signature_verified": "BOOLEAN",
    },
}

_S3_EXPIRED = re.compile(rb"<Code>AccessDenied</Code>.*expired", re.IGNORECASE | re.DOTALL)


def _columns(direction: str) -> dict[str, str]:
    """Type hints for the columns the API documents; the CSV header decides which columns land
    (an extra one lands with a guessed type, a missing one is reported, never invented)."""
    return {**_COMMON_HEAD, **_DIRECTION_COLUMNS[direction], **_COMMON_TAIL}


def parse_envelope(response: httpx.Response) -> tuple[str | None, str | None, str | None]:
    """``(code, message, request_id)`` of an error answer; Nones when it is not the envelope.

    The request id falls back to the ``X-Request-Id`` header so it survives a non-JSON body.
    """
    code = message = request_id = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            message = error.get("message")
        meta = body.get("meta")
        if isinstance(meta, dict):
            request_id = meta.get("request_id")
    return code, message, request_id or response.headers.get("x-request-id")


class DeliveriesProvider(ExportProvider):
    """Message-log exports, one kind per direction, time-window increments, CSV via S3."""

    name = "deliveries"
    sandbox = Sandbox(module="export_pipeline.sandbox.deliveries", port=8703)
    kinds = tuple(
        ExportKind(
            provider="deliveries",
            name=f"{direction}_messages",
            primary_key=("id",),
            load_mode=LoadMode.MERGE,
            incremental=Incremental.WINDOW,
            description=f"Webhook {direction} message log (one row per message, latest state).",
            params={"direction": direction},
            columns=_columns(direction),
            value_ranges={"attempt_count": (0, 1000), "payload_size_bytes": (0, 1 << 30)},
        )
        for direction in DIRECTIONS
    )
    status_batch_size = 1

    def __init__(self, api: ApiClient) -> None:
        super().__init__(api)

    @classmethod
    def from_settings(
        cls,
        *,
        base_url: str,
        api_key: str,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> DeliveriesProvider:
        """Build from the values of ``DELIVERIES_API_URL`` / ``DELIVERIES_API_KEY``."""
        if not api_key:
            raise ConfigurationError(
                "no API key for the deliveries API",
                provider=cls.name,
                hint=f"set {TOKEN_ENV_VAR}",
            )
        return cls(
            ApiClient(
                provider=cls.name,
                base_url=base_url,
                headers={"Authorization": f"Bearer {api_key}"},
                token_env_var=TOKEN_ENV_VAR,
                retry=retry,
                timeout=timeout,
                raise_on_401=False,
            )
        )

    # -- calls ------------------------------------------------------------------------------

    def request_export(self, kind: ExportKind, request: ExportRequest) -> ExportStatus:
        """POST the window (and optional filters); the answer is the new export's status."""
        if request.modified_since is None or request.window_end is None:
            raise ValueError(
                f"{kind.key} exports are time windows: pass modified_since and window_end"
            )
        body: dict[str, Any] = {
            "start_time": format_utc(request.modified_since),
            "end_time": format_utc(request.window_end),
            "direction": kind.params["direction"],
        }
        for name in FILTER_PARAMS:
            if request.params.get(name) is not None:
                body[name] = request.params[name]
        response = self.api.request("POST", "/v1/exports", json=body)
        if response.status_code >= 300:
            raise self.error_for(response, kind=kind.name)
        return self._status(response.json()["data"])

    def get_statuses(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        """One GET per id (the API has no batch status call); 404 -> LOST, not an error."""
        statuses: dict[str, ExportStatus] = {}
        for export_id in export_ids:
            response = self.api.request("GET", f"/v1/exports/{export_id}")
            if response.status_code == 404:
                code, message, request_id = parse_envelope(response)
                statuses[export_id] = ExportStatus(
                    export_id=export_id,
                    state=ExportState.LOST,
                    error_code=code or "NOT_FOUND",
                    error_message=message or "export not found",
                    detail={"request_id": request_id} if request_id else {},
                )
                continue
            if response.status_code >= 300:
                raise self.error_for(response, export_id=export_id)
            statuses[export_id] = self._status(response.json()["data"])
        return statuses

    def classify_download_error(self, response: httpx.Response) -> ExportPipelineError | None:
        """Typed error for an error answer met while downloading (called by core/transfer).

        The API host answers in the envelope (EXPORT_NOT_READY, EXPORT_EXPIRED, ...). S3 answers
        an expired presigned URL with 403 XML ``AccessDenied`` "Request has expired": that is a
        link problem, fixed by asking ``/download`` again, so LinkExpiredError. Anything else
        returns None and the downloader's generic mapping applies.
        """
        code, _, _ = parse_envelope(response)
        if code is not None:
            return self.error_for(response)
        if response.status_code == 403 and _S3_EXPIRED.search(response.content or b""):
            return LinkExpiredError(
                "the presigned S3 URL has expired",
                provider=self.name,
                code="AccessDenied",
                hint="request /download again for a fresh URL",
            )
        return None

    # -- mapping ----------------------------------------------------------------------------

    def error_for(
        self, response: httpx.Response, *, export_id: str | None = None, kind: str | None = None
    ) -> ExportPipelineError:
        """Map an error answer (envelope or bare status) to a typed error with request_id."""
        code, message, request_id = parse_envelope(response)
        status = response.status_code
        ctx: dict[str, Any] = {
            "provider": self.name,
            "kind": kind,
            "export_id": export_id,
            "code": code or f"HTTP_{status}",
            "request_id": request_id,
        }
        text = message or f"HTTP {status}"
        if code == "UNAUTHORIZED" or status == 401:
            return ConfigurationError(
                f"the deliveries API rejected the API key: {text} (check {TOKEN_ENV_VAR})",
                hint=f"set a valid key in {TOKEN_ENV_VAR}",
                **ctx,
            )
        if code == "EXPORT_NOT_READY":
            return ExportNotReadyError(
                f"export not ready: {text}", hint="keep polling the status", **ctx
            )
        if code == "EXPORT_EXPIRED" or status == 410:
            return ExportExpiredError(
                f"export expired: {text}", hint="request the same window again", **ctx
            )
        if code == "NOT_FOUND" or status == 404:
            return ExportLostError(
                f"export not found: {text}", hint="request the same window again", **ctx
            )
        if status == 429 or status >= 500:
            return TransientProviderError(text, hint="try again later", **ctx)
        return ProviderRejectedError(f"request refused: {text}", **ctx)

    def _status(self, data: Mapping[str, Any]) -> ExportStatus:
        export_id = str(data["id"])
        word = str(data.get("status", ""))
        state = _STATES.get(word)
        if state is None:
            raise ProviderRejectedError(
                f"unknown export status {word!r}", provider=self.name, export_id=export_id
            )
        files: tuple[RemoteFile, ...] = ()
        if state is ExportState.READY:
            files = (
                RemoteFile(
                    url=f"{self.api.base_url}/v1/exports/{export_id}/download",
                    name="export.csv",
                    size_bytes=data.get("file_size_bytes"),
                    authenticated=True,
                ),
            )
        detail = {
            key: data[key]
            for key in (
                "direction",
                "filter_start_time",
                "filter_end_time",
                "started_at",
                "row_count",
                "file_size_bytes",
            )
            if data.get(key) is not None
        }
        return ExportStatus(
            export_id=export_id,
            state=state,
            files=files,
            expires_at=parse_utc(data.get("expires_at")),
            provider_timestamp=parse_utc(data.get("completed_at")),
            expected_rows=data.get("row_count"),
            error_code="EXPORT_FAILED" if state is ExportState.FAILED else None,
            error_message=data.get("error_message"),
            provider_status=word,
            detail=detail,
        )
