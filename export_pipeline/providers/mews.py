"""Mews Connector API: full JSON Lines exports of nine entity types (``mews``).

Endpoints (all ``POST`` with a JSON body, auth in the body, never in a header):

- ``{PlatformAddress}/api/connector/v1/exports/add``
  ``{ClientToken, AccessToken, Client, EntityType}`` -> ``{"Export": {...}}``
- ``{PlatformAddress}/api/connector/v1/exports/getAll``
  ``{ClientToken, AccessToken, Client, ExportIds: [...]}`` (at most 1000 ids) ->
  ``{"Exports": [...]}``

An export is ``{Id, Status, EntityType, Files: [{Url, SizeInBytes}], ExpiresUtc}``; ``getAll``
may add ``Scope {EnterpriseIds, ChainIds}``. ``Status`` is Pending, Processing, Success, Failed
or Expired.

Key and snapshot semantics: every record has an ``Id`` (the primary key). An export is always
the *whole* entity set of its type (there is no ``modifiedSince``), so every kind here is
``LoadMode.SNAPSHOT`` / ``Incremental.NONE``: the table becomes exactly the latest Success export
and records missing from it are gone. Records are nested JSON, so no column types are declared.

Quirks this module deals with:

- Only one export per entity type may be Pending or Processing; ``exports/add`` answers HTTP 400
  while one is. That becomes :class:`ExportInFlightError` (retryable) so the caller can adopt the
  running export from its ledger or try again later, instead of a generic rejection.
- A bad ``ClientToken``/``AccessToken`` is HTTP 401 with ``{"Message": ...}``. ``ApiClient`` turns
  any 401 into :class:`ConfigurationError`; we re-raise it naming both ``MEWS_CLIENT_TOKEN`` and
  ``MEWS_ACCESS_TOKEN`` because either may be the culprit.
- ``getAll`` takes at most 1000 ids, so status polling is batched: n ids cost ceil(n/1000) calls.
  Ids missing from the answer are unknown to Mews and map to ``ExportState.LOST``.
- A Success export usually has several ``Files`` parts; each is a presigned link (no credentials)
  that stops working at ``ExpiresUtc``. After that the export is Expired and must be requested
  again, so a 403/410 at download time is classified as :class:`ExportExpiredError`.
- The Export object carries no error text; a Failed export gets ``error_code="Failed"`` and
  whatever message field the API may add in the future.
- The API is marked beta; an unknown status word is logged and treated as still processing
  (the caller's wait timeout bounds it) rather than failing a whole status batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import urljoin

import httpx

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportExpiredError,
    ExportInFlightError,
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
from export_pipeline.providers.base import ExportProvider, batched, parse_utc
from export_pipeline.providers.spec import Sandbox

log = get_logger(__name__)  # redacts secrets from every message

ADD_PATH = "/api/connector/v1/exports/add"
GET_ALL_PATH = "/api/connector/v1/exports/getAll"
DEFAULT_CLIENT = "export_pipeline 0.1.0"
CREDENTIAL_ENV_VARS = ("MEWS_CLIENT_TOKEN", "MEWS_ACCESS_TOKEN")

# Mews entity type -> what analysts get in the table. The order is the order of the assets.
ENTITY_TYPES: Mapping[str, str] = {
    "OrderItem": "Order items (charges, products, rebates) posted to accounts.",
    "Payment": "Payments and refunds posted to accounts.",
    "Reservation": "Reservations with customer, companions, amounts and states.",
    "Customer": "Guest profiles (customers) of the chain.",
    "Company": "Companies (corporate accounts, travel agencies) of the chain.",
    "Bill": "Bills (receipts and invoices) with owner and enterprise data.",
    "AvailabilityAdjustment": "Adjustments of availability per resource category and interval.",
    "AvailabilityBlock": "Availability blocks (group allotments) with budget and release rules.",
    "ResourceBlock": "Resource blocks (out of order, internal use) of rooms and spaces.",
}

STATUS_MAP: Mapping[str, ExportState] = {
    "Pending": ExportState.PENDING,
    "Processing": ExportState.PROCESSING,
    "Success": ExportState.READY,
    "Failed": ExportState.FAILED,
    "Expired": ExportState.EXPIRED,
}

# The 400 Mews gives while an export of the same type is running. Matched loosely because the
# wording is not documented; anything else stays a ProviderRejectedError.
_IN_FLIGHT = re.compile(r"\b(pending|processing|in progress)\b", re.IGNORECASE)
_MESSAGE_FIELDS = ("Message", "ErrorMessage", "FailureReason", "Error", "Reason")


def snake_case(name: str) -> str:
    """``AvailabilityAdjustment`` -> ``availability_adjustment`` (table and asset names)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _error_body(response: httpx.Response) -> dict[str, Any]:
    """The JSON error object of a Mews answer, or ``{}`` when the body is not JSON."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _message(body: Mapping[str, Any]) -> str | None:
    for name in _MESSAGE_FIELDS:
        value = body.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


class MewsProvider(ExportProvider):
    """Mews Connector exports: one kind per entity type, statuses polled 1000 ids at a time."""

    name: ClassVar[str] = "mews"
    status_batch_size: ClassVar[int] = 1000
    sandbox: ClassVar[Sandbox | None] = Sandbox(module="export_pipeline.sandbox.mews", port=8702)
    kinds: ClassVar[tuple[ExportKind, ...]] = tuple(
        ExportKind(
            provider="mews",
            name=snake_case(entity_type),
            primary_key=("Id",),
            load_mode=LoadMode.SNAPSHOT,
            incremental=Incremental.NONE,
            params={"entity_type": entity_type},
            description=f"{description} Full Mews snapshot of entity type {entity_type}.",
        )
        for entity_type, description in ENTITY_TYPES.items()
    )

    def __init__(
        self,
        api: ApiClient,
        *,
        client_token: str,
        access_token: str,
        client: str = DEFAULT_CLIENT,
    ) -> None:
        super().__init__(api)
        self._auth = {"ClientToken": client_token, "AccessToken": access_token, "Client": client}

    @classmethod
    def from_settings(
        cls,
        *,
        platform_address: str,
        client_token: str,
        access_token: str,
        client: str = DEFAULT_CLIENT,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> MewsProvider:
        """Build from the ``MEWS_*`` settings; no auth header, the tokens go in every body."""
        api = ApiClient(
            provider="mews",
            base_url=platform_address,
            headers={},
            token_env_var="MEWS_ACCESS_TOKEN",
            retry=retry,
            timeout=timeout,
        )
        return cls(api, client_token=client_token, access_token=access_token, client=client)

    # -- calls -------------------------------------------------------------------------------

    def request_export(self, kind: ExportKind, request: ExportRequest) -> ExportStatus:
        """Start a full export of ``kind``'s entity type.

        ``request`` has nothing Mews can use (no window, no modifiedSince): exports are always
        complete snapshots. Raises ExportInFlightError while one of that type is running.
        """
        entity_type = kind.params["entity_type"]
        response = self._post(ADD_PATH, {"EntityType": entity_type}, kind=kind.name)
        if response.status_code == 400:
            body = _error_body(response)
            message = _message(body) or response.text[:500]
            if _IN_FLIGHT.search(message):
                raise ExportInFlightError(
                    f"Mews already has a {entity_type} export pending or processing: {message}",
                    provider=self.name,
                    kind=kind.name,
                    code="400",
                    request_id=body.get("RequestId"),
                    hint="adopt the running export from the ledger, or try again once it is done "
                    "(Mews allows one Pending/Processing export per entity type)",
                )
        self._raise_for_error(response, kind=kind.name)
        export = self._json(response, kind=kind.name).get("Export")
        if not isinstance(export, dict):
            raise ProviderRejectedError(
                "Mews exports/add answered without an Export object",
                provider=self.name,
                kind=kind.name,
            )
        return self._status(export)

    def get_statuses(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        """Statuses of ``export_ids`` in ceil(n/1000) ``getAll`` calls; unknown ids are LOST."""
        unique = list(dict.fromkeys(export_ids))
        result: dict[str, ExportStatus] = {}
        for chunk in batched(unique, self.status_batch_size):
            response = self._post(GET_ALL_PATH, {"ExportIds": chunk})
            self._raise_for_error(response)
            exports = self._json(response).get("Exports") or []
            wanted = set(chunk)
            for export in exports:
                if isinstance(export, dict) and export.get("Id") in wanted:
                    result[export["Id"]] = self._status(export)
            for export_id in chunk:
                if export_id not in result:
                    result[export_id] = ExportStatus(
                        export_id=export_id,
                        state=ExportState.LOST,
                        error_message="Mews does not know this export id",
                    )
        return result

    def classify_download_error(self, response: httpx.Response) -> ExportPipelineError | None:
        """A dead file link means the export expired (links live until ``ExpiresUtc``).

        410 is always gone; a 403 that mentions expiry is the same. Another 403 (bad signature)
        may be cured by fresh links from ``getAll``, hence LinkExpiredError (retryable).
        """
        if response.status_code not in (403, 410):
            return None
        try:
            text = response.text[:500]
        except httpx.ResponseNotRead:
            text = ""
        if response.status_code == 410 or "expire" in text.lower():
            return ExportExpiredError(
                f"Mews export file is no longer available (HTTP {response.status_code})",
                provider=self.name,
                code=str(response.status_code),
                hint="request a new export of this entity type",
            )
        return LinkExpiredError(
            f"Mews export file link was refused (HTTP {response.status_code})",
            provider=self.name,
            code=str(response.status_code),
            hint="poll exports/getAll for fresh links",
        )

    # -- helpers -----------------------------------------------------------------------------

    def _post(
        self, path: str, payload: Mapping[str, Any], *, kind: str | None = None
    ) -> httpx.Response:
        """POST with the credentials in the body; a 401 names both token settings."""
        try:
            return self.api.request("POST", path, json={**self._auth, **payload})
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"Mews rejected the ClientToken/AccessToken on {path} (HTTP 401)",
                provider=self.name,
                kind=kind,
                code="401",
                hint=f"check {' and '.join(CREDENTIAL_ENV_VARS)} "
                "(tokens are per environment, so also MEWS_PLATFORM_ADDRESS)",
            ) from exc

    def _raise_for_error(self, response: httpx.Response, *, kind: str | None = None) -> None:
        if response.is_success:
            return
        body = _error_body(response)
        message = _message(body) or response.text[:500] or response.reason_phrase
        error_cls: type[ExportPipelineError] = (
            TransientProviderError if response.status_code >= 500 else ProviderRejectedError
        )
        raise error_cls(
            f"Mews answered HTTP {response.status_code}: {message}",
            provider=self.name,
            kind=kind,
            code=str(response.status_code),
            request_id=body.get("RequestId"),
        )

    def _json(self, response: httpx.Response, *, kind: str | None = None) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as exc:
            raise ProviderRejectedError(
                f"Mews answered HTTP {response.status_code} with a body that is not JSON",
                provider=self.name,
                kind=kind,
            ) from exc
        if not isinstance(body, dict):
            raise ProviderRejectedError(
                "Mews answered with JSON that is not an object", provider=self.name, kind=kind
            )
        return body

    def _status(self, export: Mapping[str, Any]) -> ExportStatus:
        """One Mews Export object -> ExportStatus."""
        export_id = str(export.get("Id"))
        word = str(export.get("Status"))
        state = STATUS_MAP.get(word)
        if state is None:
            log.warning(
                "Mews export %s has unknown status %r; treating it as processing", export_id, word
            )
            state = ExportState.PROCESSING
        files = tuple(
            RemoteFile(
                url=urljoin(self.api.base_url + "/", str(part["Url"])),
                name=f"part-{i:04d}.jsonl",
                size_bytes=part.get("SizeInBytes"),
                authenticated=False,
            )
            for i, part in enumerate(export.get("Files") or [])
            if isinstance(part, dict) and part.get("Url")
        )
        detail: dict[str, Any] = {}
        if export.get("Scope") is not None:
            detail["scope"] = export["Scope"]
        if export.get("EntityType") is not None:
            detail["entity_type"] = export["EntityType"]
        error_code = error_message = None
        if state is ExportState.FAILED:
            error_code = "Failed"
            error_message = (
                _message(export) or "Mews reported the export as Failed (no reason given)"
            )
        timestamp = export.get("CreatedUtc") or export.get("CompletedUtc")
        return ExportStatus(
            export_id=export_id,
            state=state,
            # Only a Success export has downloadable files.
            files=files if state is ExportState.READY else (),
            expires_at=parse_utc(export.get("ExpiresUtc")),
            provider_timestamp=parse_utc(timestamp) if isinstance(timestamp, str) else None,
            error_code=error_code,
            error_message=error_message,
            provider_status=word,
            detail=detail,
        )
