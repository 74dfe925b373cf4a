"""EV-charging network operator: bulk export of OCPI-shaped charging locations.

Endpoints (Bearer token in ``Authorization``, env ``LOCATIONS_API_URL`` / ``LOCATIONS_API_TOKEN``):

- ``POST /locations/exports`` ``{"format": "json"|"csv", "modifiedSince": "...Z"}``
  -> 202 ``{requestId, status: "PENDING", message}``.
- ``GET /locations/exports/{id}`` -> ``{requestId, status, exportUrl, downloadExpiresAt,
  exportTimestamp, totalCount}`` (the last four only when COMPLETED); 404 for unknown ids.
- ``GET {exportUrl}``: a signed link that needs no credentials and expires
  (``RemoteFile.authenticated=False``; never send the Bearer token there).
- Push: the operator POSTs the same COMPLETED body, or a FAILED body with
  ``error: {code, message}``, to ``{rsp_webhook_url}/locations/exports/events``;
  :func:`parse_event` turns it into an :class:`ExportStatus`.

Key: ``(country_code, party_id, id)`` -- OCPI location ids are only unique per party.
Incremental field: ``modifiedSince`` filters on the location's ``last_updated``; the cursor is
the ``exportTimestamp`` of the last loaded export, so the next export overlaps at most by the
time the export took to generate, and MERGE makes the overlap harmless.

Quirks:

- Errors are ``{"error": {"code", "message"}}``: INVALID_FORMAT, INVALID_DATE_RANGE,
  EXPORT_SIZE_EXCEEDED (HTTP 400) become :class:`ProviderRejectedError`; 401 and 429/5xx are
  handled by :class:`ApiClient` (clear ConfigurationError / retries honouring Retry-After).
- ``modifiedSince`` has second resolution and must be UTC with a ``Z``; the API has no upper
  bound, so ``ExportRequest.window_end`` is not sent.
- The export format is not echoed by the status call; it is taken from the ``exportUrl`` path
  extension (``.json`` = one JSON array, ``.csv`` = nested values as JSON text in the cell).
- Status words seen: PENDING, PROCESSING (or IN_PROGRESS), COMPLETED, FAILED, EXPIRED.
  Anything else is an error rather than a guess.
- A 403 at download time is an expired/invalid signature (poll again for a fresh link);
  a 410 means the export itself is gone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportExpiredError,
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
from export_pipeline.core.redact import get_logger
from export_pipeline.providers.base import ExportProvider, format_utc, parse_utc
from export_pipeline.providers.spec import Sandbox

log = get_logger(__name__)  # redacts secrets from every message

PROVIDER = "locations"
TOKEN_ENV_VAR = "LOCATIONS_API_TOKEN"

_CONNECTOR = (
    "STRUCT(id VARCHAR, standard VARCHAR, format VARCHAR, power_type VARCHAR, "
    "max_voltage INTEGER, max_amperage INTEGER, max_electric_power INTEGER, "
    "last_updated TIMESTAMPTZ)"
)
_EVSE = (
    "STRUCT(uid VARCHAR, evse_id VARCHAR, status VARCHAR, "
    f"connectors {_CONNECTOR}[], last_updated TIMESTAMPTZ)"
)

# One OCPI location per row; evses -> connectors stay nested (see the views for flat tables).
LOCATION_COLUMNS: Mapping[str, str] = {
    "id": "VARCHAR",
    "country_code": "VARCHAR",
    "party_id": "VARCHAR",
    "publish": "BOOLEAN",
    "name": "VARCHAR",
    "address": "VARCHAR",
    "city": "VARCHAR",
    "postal_code": "VARCHAR",
    "country": "VARCHAR",
    "coordinates": "STRUCT(latitude VARCHAR, longitude VARCHAR)",
    "operator": "STRUCT(name VARCHAR, website VARCHAR)",
    "time_zone": "VARCHAR",
    "evses": f"{_EVSE}[]",
    "last_updated": "TIMESTAMPTZ",
}

# Unnest in the select list (not a lateral join) so the views work on every DuckDB >= 1.1.
EVSES_VIEW = """
SELECT country_code, party_id, location_id,
       evse.uid AS evse_uid, evse.evse_id, evse.status,
       len(evse.connectors) AS connector_count, evse.last_updated
FROM (
    SELECT country_code, party_id, id AS location_id, unnest(evses) AS evse
    FROM locations.locations
)
""".strip()

CONNECTORS_VIEW = """
SELECT country_code, party_id, location_id, evse_uid,
       connector.id AS connector_id, connector.standard, connector.format,
       connector.power_type, connector.max_voltage, connector.max_amperage,
       connector.max_electric_power, connector.last_updated
FROM (
    SELECT country_code, party_id, location_id, evse.uid AS evse_uid,
           unnest(evse.connectors) AS connector
    FROM (
        SELECT country_code, party_id, id AS location_id, unnest(evses) AS evse
        FROM locations.locations
    )
)
""".strip()

LOCATIONS = ExportKind(
    provider=PROVIDER,
    name="locations",
    primary_key=("country_code", "party_id", "id"),
    load_mode=LoadMode.MERGE,
    incremental=Incremental.MODIFIED_SINCE,
    description=(
        "Charging locations of the network operator (OCPI Location objects with nested EVSEs "
        "and connectors), merged by (country_code, party_id, id) from modifiedSince exports."
    ),
    columns=LOCATION_COLUMNS,
    views={"evses": EVSES_VIEW, "connectors": CONNECTORS_VIEW},
)

_STATES: Mapping[str, ExportState] = {
    "PENDING": ExportState.PENDING,
    "PROCESSING": ExportState.PROCESSING,
    "IN_PROGRESS": ExportState.PROCESSING,
    "COMPLETED": ExportState.READY,
    "FAILED": ExportState.FAILED,
    "EXPIRED": ExportState.EXPIRED,
}

_HINTS: Mapping[str, str] = {
    "INVALID_FORMAT": "set the request param 'format' to 'json' or 'csv'",
    "INVALID_DATE_RANGE": (
        "modifiedSince must be a past UTC time like 2025-06-01T00:00:00Z; "
        "check the stored cursor (clock skew or a cursor in the future)"
    ),
    "EXPORT_SIZE_EXCEEDED": (
        "ask for less: pass a more recent modifiedSince (load incrementally), "
        "or ask the operator to raise the export size limit"
    ),
}


class _BadBody(ValueError):
    """A status/event body we cannot interpret; callers re-raise it as their own error type."""

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status


def _text(body: Mapping[str, Any], field: str, *, required: bool) -> str | None:
    value = body.get(field)
    if value is None or value == "":
        if required:
            raise _BadBody(f"missing {field!r}")
        return None
    if not isinstance(value, str):
        raise _BadBody(f"{field!r} must be a string, got {type(value).__name__}")
    return value


def _timestamp(body: Mapping[str, Any], field: str) -> datetime | None:
    value = _text(body, field, required=False)
    try:
        parsed = parse_utc(value)
    except ValueError:
        raise _BadBody(f"{field!r} is not an ISO 8601 timestamp: {value!r}") from None
    if parsed is not None and parsed.tzinfo is None:
        raise _BadBody(f"{field!r} has no time zone (the API sends UTC with Z): {value!r}")
    return parsed


def file_name_for(url: str) -> str:
    """Local name for an export file, from its link's path extension (the only format clue)."""
    suffixes = [s.lower() for s in PurePosixPath(httpx.URL(url).path).suffixes]
    gzipped = suffixes[-1:] == [".gz"]
    if gzipped:
        suffixes = suffixes[:-1]
    extension = suffixes[-1] if suffixes else ""
    if extension not in (".json", ".csv"):
        raise _BadBody(f"exportUrl has no .json or .csv extension, cannot tell the format: {url}")
    return f"locations-export{extension}{'.gz' if gzipped else ''}"


def status_from_body(body: Mapping[str, Any], *, export_id: str | None = None) -> ExportStatus:
    """Map a status-call or webhook body to an ExportStatus; raises ValueError when malformed.

    ``export_id`` (the id we asked about) wins over the body's ``requestId``, which must match.
    """
    if not isinstance(body, Mapping):
        raise _BadBody(f"body must be a JSON object, got {type(body).__name__}")
    request_id = _text(body, "requestId", required=export_id is None)
    if export_id is not None and request_id is not None and request_id != export_id:
        raise _BadBody(f"asked for export {export_id} but the answer is about {request_id}")
    export_id = export_id or request_id
    assert export_id is not None
    word = _text(body, "status", required=True)
    assert word is not None
    state = _STATES.get(word.upper())
    if state is None:
        raise _BadBody(f"unknown export status {word!r} (known: {', '.join(_STATES)})", status=word)
    if state is ExportState.READY:
        url = _text(body, "exportUrl", required=True)
        assert url is not None
        total = body.get("totalCount")
        if total is not None and (isinstance(total, bool) or not isinstance(total, int)):
            raise _BadBody(f"'totalCount' must be an integer, got {total!r}")
        if total is not None and total < 0:
            raise _BadBody(f"'totalCount' must not be negative, got {total}")
        return ExportStatus(
            export_id=export_id,
            state=state,
            files=(RemoteFile(url=url, name=file_name_for(url), authenticated=False),),
            expires_at=_timestamp(body, "downloadExpiresAt"),
            provider_timestamp=_timestamp(body, "exportTimestamp"),
            expected_rows=total,
            provider_status=word,
        )
    if state is ExportState.FAILED:
        error = body.get("error")
        if error is not None and not isinstance(error, Mapping):
            raise _BadBody(f"'error' must be an object with code and message, got {error!r}")
        error = error or {}
        return ExportStatus(
            export_id=export_id,
            state=state,
            error_code=str(error.get("code") or "UNKNOWN"),
            error_message=str(error.get("message") or "the operator gave no reason"),
            provider_status=word,
        )
    message = body.get("message")
    return ExportStatus(
        export_id=export_id,
        state=state,
        provider_status=word,
        detail={"message": message} if isinstance(message, str) else {},
    )


def parse_event(body: Mapping[str, Any]) -> ExportStatus:
    """Turn a webhook "Export Events" body (COMPLETED or FAILED) into an ExportStatus.

    Raises ValueError with a message fit for a 400 answer: the operator does not retry a 400,
    so only truly malformed bodies (no requestId, unknown status, COMPLETED without exportUrl)
    are refused.
    """
    try:
        status = status_from_body(body)
    except _BadBody as exc:
        raise ValueError(f"invalid locations export event: {exc}") from None
    if status.state not in (ExportState.READY, ExportState.FAILED):
        raise ValueError(
            f"invalid locations export event: status {status.provider_status!r} "
            "(events are COMPLETED or FAILED)"
        )
    return status


def _error_of(response: httpx.Response) -> tuple[str | None, str]:
    """(code, message) from ``{"error": {"code", "message"}}``, tolerating other bodies."""
    try:
        body = response.json()
    except ValueError:
        return None, response.text[:300] or f"HTTP {response.status_code}"
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):
        code = error.get("code")
        return (str(code) if code else None), str(error.get("message") or "")
    return None, str(body)[:300]


class LocationsProvider(ExportProvider):
    """Client of the operator's locations bulk export API (one kind: ``locations``)."""

    name = PROVIDER
    kinds = (LOCATIONS,)
    status_batch_size = 1
    pushes_events = True
    sandbox = Sandbox(module="export_pipeline.sandbox.locations", port=8701)

    @classmethod
    def parse_event(cls, body: Mapping[str, Any]) -> tuple[str | None, ExportStatus]:
        return None, parse_event(body)

    def __init__(self, api: ApiClient, **settings: Any) -> None:
        super().__init__(api)
        self.settings = dict(settings)

    @classmethod
    def from_settings(
        cls,
        *,
        base_url: str,
        token: str,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> LocationsProvider:
        if not token:
            # An empty token would only show up later as a 401; say which setting is missing.
            raise ConfigurationError(
                "no API token for the locations provider",
                provider=PROVIDER,
                hint=f"set {TOKEN_ENV_VAR}",
            )
        api = ApiClient(
            provider=PROVIDER,
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}"},
            token_env_var=TOKEN_ENV_VAR,
            retry=retry,
            timeout=timeout,
        )
        return cls(api)

    def request_export(self, kind: ExportKind, request: ExportRequest) -> ExportStatus:
        if kind.provider != PROVIDER or kind.name != LOCATIONS.name:
            raise ExportPipelineError(
                f"the locations API cannot export kind {kind.key}", provider=PROVIDER
            )
        payload: dict[str, Any] = {"format": request.params.get("format", "json")}
        if request.modified_since is not None:
            payload["modifiedSince"] = format_utc(request.modified_since)
        if request.window_end is not None:
            log.debug(
                "locations: window_end %s ignored (the API has no upper bound)", request.window_end
            )
        response = self.api.request("POST", "/locations/exports", json=payload)
        request_id = response.headers.get("x-request-id")
        if response.status_code in (200, 201, 202):
            try:
                body = response.json()
                status = status_from_body(body)
            except ValueError as exc:
                raise ExportPipelineError(
                    f"unexpected answer to POST /locations/exports: {exc}",
                    provider=PROVIDER,
                    kind=kind.key,
                    request_id=request_id,
                ) from None
            return status
        code, message = _error_of(response)
        if response.status_code >= 500:
            raise TransientProviderError(
                f"POST /locations/exports failed with HTTP {response.status_code}: {message}",
                provider=PROVIDER,
                kind=kind.key,
                code=code,
                request_id=request_id,
                hint="the run can be retried later",
            )
        code = code or f"HTTP_{response.status_code}"
        raise ProviderRejectedError(
            f"the operator refused the export request: {message or code}",
            provider=PROVIDER,
            kind=kind.key,
            code=code,
            request_id=request_id,
            hint=_HINTS.get(
                code, "read the operator's message; retrying the same request will not help"
            ),
        )

    def get_statuses(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        return {export_id: self._status(export_id) for export_id in export_ids}

    def _status(self, export_id: str) -> ExportStatus:
        path = f"/locations/exports/{quote(export_id, safe='')}"
        response = self.api.request("GET", path)
        request_id = response.headers.get("x-request-id")
        if response.status_code == 404:
            _code, message = _error_of(response)
            return ExportStatus(
                export_id=export_id,
                state=ExportState.LOST,
                error_code="NOT_FOUND",
                error_message=message or "the operator does not know this export id",
                provider_status="404",
            )
        if response.status_code != 200:
            code, message = _error_of(response)
            error_type = (
                TransientProviderError if response.status_code >= 500 else ExportPipelineError
            )
            raise error_type(
                f"GET {path} answered HTTP {response.status_code}: {message}",
                provider=PROVIDER,
                export_id=export_id,
                code=code,
                request_id=request_id,
            )
        try:
            return status_from_body(response.json(), export_id=export_id)
        except ValueError as exc:
            raise ExportPipelineError(
                f"cannot read the status of export {export_id}: {exc}",
                provider=PROVIDER,
                export_id=export_id,
                code=getattr(exc, "status", None),
                request_id=request_id,
                hint="the operator's API changed or misbehaves; report it with this message",
            ) from None

    def classify_download_error(self, response: httpx.Response) -> ExportPipelineError | None:
        """403: signature expired/invalid (a status call gives a fresh link); 404/410: gone."""
        status = response.status_code
        try:
            name: str | None = PurePosixPath(response.request.url.path).name
        except RuntimeError:  # a Response built without a request
            name = None
        if status == 403:
            return LinkExpiredError(
                "the signed download link was refused (expired or invalid signature)",
                provider=PROVIDER,
                file=name,
                code="LINK_EXPIRED",
                hint="poll GET /locations/exports/{id} for a fresh exportUrl",
            )
        if status in (404, 410):
            return ExportExpiredError(
                f"the export file is gone (HTTP {status})",
                provider=PROVIDER,
                file=name,
                code="EXPORT_EXPIRED",
                hint="request a new export with the same modifiedSince",
            )
        return None
