"""mapping.travel: hotel-mapping results, exported one mapping job at a time.

Endpoints (Bearer token, ``MAPPING_API_URL`` / ``MAPPING_API_TOKEN``):

- ``POST /api/v1/mapping/{mappingJobId}/export`` (no body) triggers an asynchronous export of
  one job's results and answers ``{success, exportFileId, message}``.
- ``GET /api/v1/exports/{exportFileId}/download`` -> ``{downloadUrl, expiresInSeconds}``.
  The public documents do not name this call; the path is the shape the same API uses for its
  other presigned downloads, and it is configurable (``download_path``) because it is our guess.
  While the file is still being generated we expect ``202 {"status": "processing"}``; a failed
  generation ``{"status": "failed", "message"}``; an unknown id 404 (-> LOST); a purged one 410.
  A 404 that is not a JSON answer means the call itself is missing (a wrong ``download_path``)
  and is raised as such instead of being taken for a lost export.
- Push: an "export ready" webhook, parsed by :func:`parse_event` (body shape is our design too).

Key: one export kind, ``mapping.results``, primary key (``mappingJobId``, ``supplierHotelId``),
loaded with REPLACE_PARTITION on ``mappingJobId``: mapping jobs are user data (one partition
per job) and a re-export of a job replaces exactly that job's rows.

Quirks this module exists to absorb:

- The trigger call **always answers HTTP 200**. ``success: false`` (job without results, export
  failure, ...) is raised as :class:`ProviderRejectedError` carrying the provider's ``message``
  and the job id, never turned into an empty export. Only 401 (bad token) and 404 (no such job
  for this organization) are real HTTP errors.
- Download links are presigned and live about 60 s, so :meth:`MappingProvider.get_statuses` asks
  for a fresh link on every call and the file must be fetched at once; an expired link (403 at
  download time) becomes a retryable :class:`LinkExpiredError`, i.e. "ask for a new link".
- The file is csv, a json array or jsonl, optionally gzip, per the organization's settings, and
  neither the URL, the file name nor the Content-Type can be trusted to say which. The remote
  file is therefore named ``results`` without an extension and the core normaliser detects the
  format from the content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportPipelineError,
    LinkExpiredError,
    ProviderRejectedError,
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
from export_pipeline.providers.base import ExportProvider, parse_utc
from export_pipeline.providers.spec import Sandbox

PROVIDER = "mapping"
TOKEN_ENV_VAR = "MAPPING_API_TOKEN"
DEFAULT_DOWNLOAD_PATH = "/api/v1/exports/{exportFileId}/download"
# The name the downloaded file gets locally. No extension on purpose: the format is detected
# from the bytes, so a name ending in ".csv" would only be one more thing that can lie.
RESULTS_FILE_NAME = "results"

EVENT_COMPLETED = "mapping.export.completed"
EVENT_FAILED = "mapping.export.failed"

# Words the download-link call may use while the file is not ready yet.
_PROCESSING_WORDS = frozenset({"processing", "pending", "queued", "generating", "in_progress"})

RESULTS = ExportKind(
    provider=PROVIDER,
    name="results",
    primary_key=("mappingJobId", "supplierHotelId"),
    load_mode=LoadMode.REPLACE_PARTITION,
    partition_column="mappingJobId",
    partitions="mapping_jobs",  # one partition per mapping job
    incremental=Incremental.NONE,
    description=(
        "Hotel-mapping results of one mapping.travel mapping job: each supplier hotel of the "
        "partner inventory matched to a reference hotel, with confidence and match method. "
        "One partition per mappingJobId; a re-export replaces that job's rows."
    ),
    columns={
        "mappingJobId": "VARCHAR",
        "partnerInventoryId": "VARCHAR",
        "supplierHotelId": "VARCHAR",
        "referenceHotelId": "VARCHAR",
        "referenceName": "VARCHAR",
        "referenceCountryCode": "VARCHAR",
        "referenceCity": "VARCHAR",
        "confidence": "DOUBLE",
        "matchMethod": "VARCHAR",
    },
    value_ranges={"confidence": (0.0, 1.0)},
)


def _request_id(response: httpx.Response) -> str | None:
    return response.headers.get("X-Request-Id") or response.headers.get("X-Amz-Request-Id")


def _json_body(response: httpx.Response) -> Any:
    """The decoded JSON body, or None when the answer is not JSON (proxies, HTML error pages)."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _body_text(response: httpx.Response, limit: int = 300) -> str:
    text = response.text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


class MappingProvider(ExportProvider):
    """mapping.travel results exports: one trigger call per mapping job, one file per export."""

    name: ClassVar[str] = PROVIDER
    kinds: ClassVar[tuple[ExportKind, ...]] = (RESULTS,)
    # The download-link call takes one exportFileId.
    status_batch_size: ClassVar[int] = 1
    pushes_events: ClassVar[bool] = True
    sandbox: ClassVar[Sandbox | None] = Sandbox(module="export_pipeline.sandbox.mapping", port=8704)

    def __init__(self, api: ApiClient, *, download_path: str = DEFAULT_DOWNLOAD_PATH) -> None:
        if "{exportFileId}" not in download_path:
            raise ConfigurationError(
                f"mapping download_path {download_path!r} has no {{exportFileId}} placeholder",
                provider=PROVIDER,
                hint="use e.g. /api/v1/exports/{exportFileId}/download",
            )
        super().__init__(api)
        self.download_path = download_path

    @classmethod
    def from_settings(
        cls,
        *,
        base_url: str,
        token: str,
        download_path: str = DEFAULT_DOWNLOAD_PATH,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> MappingProvider:
        """Build from plain settings (the Dagster resource reads MAPPING_API_URL/TOKEN)."""
        if not token:
            raise ConfigurationError(
                "no mapping.travel API token configured",
                provider=PROVIDER,
                hint=f"set {TOKEN_ENV_VAR}",
            )
        api = ApiClient(
            provider=PROVIDER,
            base_url=base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            token_env_var=TOKEN_ENV_VAR,
            retry=retry,
            timeout=timeout,
            transport=transport,
        )
        return cls(api, download_path=download_path)

    # -- trigger -----------------------------------------------------------------------------

    @staticmethod
    def job_id_of(request: ExportRequest) -> str:
        """The mapping job of a request: its partition key, or params["mapping_job_id"].

        Both are accepted because Dagster runs pass the dynamic partition key while ad-hoc calls
        (CLI, config) are more natural with a param; if both are given they must agree.
        """
        partition = request.partition
        param = request.params.get("mapping_job_id")
        if partition and param and str(param) != partition:
            raise ConfigurationError(
                f"mapping export request names two jobs: partition {partition!r} "
                f"and params['mapping_job_id'] {param!r}",
                provider=PROVIDER,
                kind=RESULTS.name,
                hint="give the mapping job id once",
            )
        job_id = partition or (str(param) if param else "")
        if not job_id.strip():
            raise ConfigurationError(
                "mapping export request has no mapping job id",
                provider=PROVIDER,
                kind=RESULTS.name,
                hint="materialize a mappingJobId partition or pass params['mapping_job_id']",
            )
        return job_id.strip()

    def request_export(self, kind: ExportKind, request: ExportRequest) -> ExportStatus:
        """Trigger an export of one job's results; returns PENDING with the exportFileId.

        The API generates the file asynchronously, so the id is not a ready file yet:
        :meth:`get_statuses` turns it into READY once a download link is handed out.
        """
        if kind.provider != self.name or kind.name != RESULTS.name:
            raise ValueError(f"{self.name} cannot export kind {kind.key!r}")
        job_id = self.job_id_of(request)
        path = f"/api/v1/mapping/{quote(job_id, safe='')}/export"
        describe = f"mapping export of job {job_id}"
        response = self.api.request("POST", path, describe=describe)
        request_id = _request_id(response)
        body = _json_body(response)

        if response.status_code == 404:
            raise ProviderRejectedError(
                f"{describe}: mapping.travel has no mapping job {job_id!r} for this organization "
                "(HTTP 404)",
                provider=PROVIDER,
                kind=kind.name,
                code="MAPPING_JOB_NOT_FOUND",
                request_id=request_id,
                hint="check the mappingJobId partition key and that the token belongs to the "
                "organization owning the job",
            )
        if response.status_code == 403:
            raise ConfigurationError(
                f"{describe}: the token may not export this job (HTTP 403)",
                provider=PROVIDER,
                kind=kind.name,
                request_id=request_id,
                hint=f"check the permissions of the token in {TOKEN_ENV_VAR}",
            )
        if response.status_code != 200 or not isinstance(body, Mapping):
            raise ProviderRejectedError(
                f"{describe}: unexpected answer HTTP {response.status_code}: "
                f"{_body_text(response)!r}",
                provider=PROVIDER,
                kind=kind.name,
                code=f"HTTP_{response.status_code}",
                request_id=request_id,
            )

        message = str(body.get("message") or "").strip() or "(no message)"
        if body.get("success") is not True:
            # The documented trap: HTTP 200 that did nothing. Surface it loudly.
            raise ProviderRejectedError(
                f"{describe} was not triggered: {message}",
                provider=PROVIDER,
                kind=kind.name,
                code="EXPORT_NOT_TRIGGERED",
                request_id=request_id,
                hint="mapping.travel answered success:false (HTTP 200); e.g. the job has no "
                "results yet or is not completed. Fix the job, then materialize it again",
            )
        export_id = body.get("exportFileId")
        if not isinstance(export_id, str) or not export_id.strip():
            raise ProviderRejectedError(
                f"{describe}: success:true but no exportFileId in the answer ({message})",
                provider=PROVIDER,
                kind=kind.name,
                code="NO_EXPORT_FILE_ID",
                request_id=request_id,
            )
        return ExportStatus(
            export_id=export_id,
            state=ExportState.PENDING,
            provider_status="triggered",
            detail={"mappingJobId": job_id, "message": message},
        )

    # -- status / download link ---------------------------------------------------------------

    def get_statuses(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        """Ask for a (fresh) download link per exportFileId; a link means READY.

        Links live ~60 s, so callers should download right after this call and call it again
        when a link has expired instead of caching links.
        """
        return {export_id: self._status(export_id) for export_id in export_ids}

    def _status(self, export_id: str) -> ExportStatus:
        path = self.download_path.replace("{exportFileId}", quote(export_id, safe=""))
        describe = f"mapping download link for export {export_id}"
        response = self.api.request("GET", path, describe=describe)
        request_id = _request_id(response)
        body = _json_body(response)
        word = str(body.get("status") or "").lower() if isinstance(body, Mapping) else ""
        message = str(body.get("message") or "") if isinstance(body, Mapping) else ""

        if response.status_code == 404 and not isinstance(body, Mapping):
            # No API answer at all (a web server's plain "Not Found"): the call is not there,
            # which for our guessed path means download_path is wrong, not that the export is
            # gone. Mapped to LOST it would make the runner trigger the job's export again and
            # fail with "unknown export id", never naming the setting.
            raise ProviderRejectedError(
                f"{describe}: HTTP 404 without an API answer ({_body_text(response)!r}); "
                f"the download call {self.download_path} does not seem to exist",
                provider=PROVIDER,
                export_id=export_id,
                code="DOWNLOAD_PATH_NOT_FOUND",
                request_id=request_id,
                hint="set download_path on the mapping_api resource to the API's call that "
                "turns an exportFileId into a download link",
            )
        if response.status_code == 404:
            return ExportStatus(
                export_id=export_id,
                state=ExportState.LOST,
                provider_status="not_found",
                error_code="NOT_FOUND",
                error_message=message or "mapping.travel does not know this exportFileId",
            )
        if response.status_code == 410:
            return ExportStatus(
                export_id=export_id,
                state=ExportState.EXPIRED,
                provider_status=word or "gone",
                error_code="EXPORT_EXPIRED",
                error_message=message or "the export file is no longer available",
            )
        if response.status_code == 200 and isinstance(body, Mapping) and body.get("downloadUrl"):
            return self._ready(export_id, body, request_id)
        if word in _PROCESSING_WORDS or (response.status_code == 202 and not word):
            return ExportStatus(
                export_id=export_id,
                state=ExportState.PROCESSING,
                provider_status=word or "processing",
            )
        if word == "failed":
            return ExportStatus(
                export_id=export_id,
                state=ExportState.FAILED,
                provider_status=word,
                error_code="EXPORT_FAILED",
                error_message=message or "mapping.travel failed to generate the export",
            )
        raise ProviderRejectedError(
            f"{describe}: unexpected answer HTTP {response.status_code}: {_body_text(response)!r}",
            provider=PROVIDER,
            export_id=export_id,
            code=f"HTTP_{response.status_code}",
            request_id=request_id,
            hint="if the download call lives elsewhere, set download_path "
            f"(now {self.download_path})",
        )

    def _ready(
        self, export_id: str, body: Mapping[str, Any], request_id: str | None
    ) -> ExportStatus:
        # A relative link is resolved against the API; a presigned link never gets our token.
        url = str(httpx.URL(self.api.base_url + "/").join(str(body["downloadUrl"])))
        expires_at = None
        ttl = body.get("expiresInSeconds")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool):
            expires_at = datetime.now(UTC) + timedelta(seconds=float(ttl))
        elif ttl is not None:
            raise ProviderRejectedError(
                f"mapping download link for export {export_id}: expiresInSeconds {ttl!r} "
                "is not a number",
                provider=PROVIDER,
                export_id=export_id,
                code="BAD_LINK_ANSWER",
                request_id=request_id,
            )
        return ExportStatus(
            export_id=export_id,
            state=ExportState.READY,
            files=(RemoteFile(url=url, name=RESULTS_FILE_NAME, authenticated=False),),
            expires_at=expires_at,
            provider_status="ready",
            detail={"expiresInSeconds": ttl},
        )

    def classify_download_error(self, response: httpx.Response) -> ExportPipelineError | None:
        """A presigned link refused with 401/403 has expired (they live ~60 s): ask again.

        Other answers (404, 410, 5xx) are left to the transfer layer's generic mapping; a fresh
        :meth:`get_statuses` call then tells authoritatively whether the export is LOST/EXPIRED.
        """
        if response.status_code not in (401, 403):
            return None
        return LinkExpiredError(
            f"mapping download link refused (HTTP {response.status_code}); links live about 60 s",
            provider=PROVIDER,
            code="LINK_EXPIRED",
            request_id=_request_id(response),
            hint="call get_statuses again for a fresh link and download at once",
        )

    @classmethod
    def parse_event(cls, body: Mapping[str, Any]) -> tuple[str | None, ExportStatus]:
        """The webhook parser (:func:`parse_event`): the partition is the mapping job."""
        return parse_event(body)


def parse_event(body: bytes | str | Mapping[str, Any]) -> tuple[str, ExportStatus]:
    """Read a mapping.travel export webhook into (mappingJobId, status of the exportFileId).

    Expected body (our design; the public documents only say exports may be produced
    automatically when a job completes)::

        {"event": "mapping.export.completed" | "mapping.export.failed",
         "mappingJobId": "...", "exportFileId": "...", "message": "...", "occurredAt": "..."}

    A completed event gives READY **without files**: links live ~60 s, so a link in a webhook
    would be stale by the time a run starts; the caller asks :meth:`MappingProvider.get_statuses`
    for a fresh one. Signature checking is the receiver's job, not this function's.

    Raises ValueError naming what is wrong, so the receiver can answer 400 with that text.
    """
    if isinstance(body, bytes | str):
        try:
            data: Any = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"mapping webhook body is not JSON: {exc}") from exc
    else:
        data = body
    if not isinstance(data, Mapping):
        raise ValueError(f"mapping webhook body must be a JSON object, got {type(data).__name__}")
    event = data.get("event")
    if event not in (EVENT_COMPLETED, EVENT_FAILED):
        raise ValueError(
            f"mapping webhook event {event!r} is not one of {EVENT_COMPLETED!r}, {EVENT_FAILED!r}"
        )
    fields: dict[str, str] = {}
    for field_name in ("mappingJobId", "exportFileId"):
        value = data.get(field_name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"mapping webhook {event!r} lacks a non-empty string {field_name!r}")
        fields[field_name] = value.strip()
    message = data.get("message")
    if message is not None and not isinstance(message, str):
        raise ValueError("mapping webhook 'message' must be a string when present")
    occurred = data.get("occurredAt")
    try:
        occurred_at = parse_utc(occurred) if isinstance(occurred, str) else None
    except ValueError as exc:
        raise ValueError(f"mapping webhook 'occurredAt' {occurred!r} is not ISO 8601") from exc
    detail = {"mappingJobId": fields["mappingJobId"], "event": event}
    if event == EVENT_COMPLETED:
        status = ExportStatus(
            export_id=fields["exportFileId"],
            state=ExportState.READY,
            provider_timestamp=occurred_at,
            provider_status=event,
            detail=detail,
        )
    else:
        status = ExportStatus(
            export_id=fields["exportFileId"],
            state=ExportState.FAILED,
            provider_timestamp=occurred_at,
            error_code="EXPORT_FAILED",
            error_message=message or "mapping.travel reported the export as failed",
            provider_status=event,
            detail=detail,
        )
    return fields["mappingJobId"], status
