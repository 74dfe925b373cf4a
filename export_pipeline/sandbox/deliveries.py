"""Simulator of the webhook-delivery platform's message-log exports (provider ``deliveries``).

Same HTTP shape as the real API (see ``providers/deliveries.yaml``): ``POST /v1/exports``,
``GET /v1/exports/{id}``, ``GET /v1/exports/{id}/download`` answering **302 to a presigned S3
URL**. The CSV really lives in an S3-compatible server (``sandbox/s3.py``: moto on loopback) and
the presigned URL is made by boto3, so it really expires and really refuses a second auth
mechanism; nothing about the S3 leg is faked in this module.

Every error answer uses the API's envelope ``{"error": {"code", "message"}, "meta":
{"request_id": "req_<hex>"}}`` and the same request id is sent as ``X-Request-Id``.

Switches on :class:`State` (tests set them directly; the server runs in another thread):

* ``ready_after_seconds``: an export is ``pending`` for the first half, ``processing`` for the
  second half, then ``completed`` (0: completed at the first look after creation).
* ``fail_next``: message of the next export's failure (``failed`` with ``error_message``).
* ``presign_ttl_seconds``: ``ExpiresIn`` of the presigned URL (default 300).
* ``export_ttl_seconds``: an export turns ``expired`` that long after completion.
* ``rate_limit_next``: the next N API calls answer 429 ``RATE_LIMITED`` with ``Retry-After``.
* ``expire_export(id)``, ``forget_export(id)``, ``add_messages(n, at=..., direction=...)``.
"""

from __future__ import annotations

import csv
import os
import random
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

DEFAULT_TOKEN = "sandbox-deliveries-key"
DEFAULT_BUCKET = "deliveries-exports"
DIRECTIONS = ("outbound", "inbound")
MESSAGE_STATUSES = ("delivered", "failed", "pending")

# The CSV header of each direction, in file order. This is the API's truth; the provider's
# ExportKind.columns are checked against it in the tests rather than imported from here.
CSV_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "outbound": (
        "id",
        "created_at",
        "event_type",
        "endpoint_id",
        "endpoint_url",
        "status",
        "attempt_count",
        "last_attempt_at",
        "next_attempt_at",
        "response_status_code",
        "response_time_ms",
        "payload_size_bytes",
        "idempotency_key",
    ),
    "inbound": (
        "id",
        "created_at",
        "event_type",
        "inbound_endpoint_id",
        "source",
        "signature_verified",
        "status",
        "attempt_count",
        "last_attempt_at",
        "next_attempt_at",
        "response_status_code",
        "response_time_ms",
        "payload_size_bytes",
        "idempotency_key",
    ),
}

_EVENT_TYPES = (
    "invoice.paid",
    "invoice.payment_failed",
    "customer.created",
    "customer.updated",
    "order.shipped",
    "order.refunded",
    "subscription.canceled",
)
_SOURCES = ("stripe", "github", "shopify", "twilio")


def iso_ms(value: datetime | None) -> str | None:
    """``2026-01-01T00:00:00.123Z``: the API's timestamp format (UTC, milliseconds)."""
    if value is None:
        return None
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )


def parse_api_time(value: Any) -> datetime:
    """Parse an ISO 8601 UTC timestamp from a request; anything else raises ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError("must be an ISO 8601 UTC timestamp")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None or parsed.utcoffset() != timedelta(0):
        raise ValueError("must be in UTC (end with Z or +00:00)")
    return parsed.astimezone(UTC)


class ApiError(Exception):
    """An error answer in the API's envelope."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Export:
    """One export job as the platform keeps it."""

    id: str
    direction: str
    start_time: datetime
    end_time: datetime
    filters: dict[str, str]
    created_at: float  # epoch seconds, on the State's clock
    status: str = "pending"
    row_count: int | None = None
    file_size_bytes: int | None = None
    error_message: str | None = None
    fail_with: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None
    object_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "direction": self.direction,
            "row_count": self.row_count,
            "file_size_bytes": self.file_size_bytes,
            "error_message": self.error_message,
            "filter_start_time": iso_ms(self.start_time),
            "filter_end_time": iso_ms(self.end_time),
            "filter_status": self.filters.get("status"),
            "filter_endpoint_id": self.filters.get("endpoint_id"),
            "filter_inbound_endpoint_id": self.filters.get("inbound_endpoint_id"),
            "created_at": iso_ms(datetime.fromtimestamp(self.created_at, UTC)),
            "started_at": iso_ms(self.started_at),
            "completed_at": iso_ms(self.completed_at),
            "expires_at": iso_ms(self.expires_at),
        }


@dataclass(frozen=True)
class ApiCall:
    """One request as the API saw it (tests assert the Bearer key did reach the API)."""

    method: str
    path: str
    authorization: str | None


@dataclass
class State:
    """Seeded message log + export jobs + switches. Methods are thread-safe.

    ``s3`` is an :class:`~export_pipeline.sandbox.s3.S3Server` (anything with ``.client()``) or
    a boto3 S3 client; the bucket is created when missing.
    """

    s3: Any
    bucket: str = DEFAULT_BUCKET
    token: str = DEFAULT_TOKEN
    seed: int = 5303437
    message_count: int = 400
    log_start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    log_span: timedelta = timedelta(days=7)
    ready_after_seconds: float = 0.0
    fail_next: str | None = None
    presign_ttl_seconds: int = 300
    export_ttl_seconds: float = 7 * 24 * 3600
    rate_limit_next: int = 0
    rate_limit_retry_after: int = 1
    clock: Callable[[], float] = time.time
    messages: list[dict[str, Any]] = field(default_factory=list)
    exports: dict[str, Export] = field(default_factory=dict)
    calls: list[ApiCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._rng = random.Random(self.seed)
        self._client = self.s3.client() if hasattr(self.s3, "client") else self.s3
        existing = {b["Name"] for b in self._client.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            self._client.create_bucket(Bucket=self.bucket)
        if not self.messages:
            span_ms = int(self.log_span.total_seconds() * 1000)
            stamps = sorted(self._rng.randrange(span_ms) for _ in range(self.message_count))
            self.messages = [
                self._make_message(
                    self.log_start + timedelta(milliseconds=ms), self._rng.choice(DIRECTIONS)
                )
                for ms in stamps
            ]

    # -- data -------------------------------------------------------------------------------

    def _make_message(self, created_at: datetime, direction: str) -> dict[str, Any]:
        rng = self._rng
        # The API stamps milliseconds: keep exactly what the CSV will say, so the window
        # filter and the file never disagree by a sub-millisecond.
        created_at = created_at.replace(microsecond=created_at.microsecond // 1000 * 1000)
        status = rng.choices(MESSAGE_STATUSES, weights=(85, 10, 5))[0]
        attempts = 1 if status == "delivered" and rng.random() < 0.8 else rng.randint(1, 8)
        last_attempt = created_at + timedelta(seconds=rng.randint(0, 600) * (attempts - 1))
        code: int | None
        if status == "delivered":
            code = rng.choice((200, 200, 200, 201, 202, 204))
        elif status == "failed":
            code = rng.choice((400, 404, 410, 500, 502, 503))
        else:
            code = rng.choice((None, 500, 503, 429))
        message: dict[str, Any] = {
            "id": f"msg_{rng.getrandbits(96):024x}",
            "direction": direction,
            "created_at": created_at,
            "event_type": rng.choice(_EVENT_TYPES),
            "status": status,
            "attempt_count": attempts,
            "last_attempt_at": last_attempt,
            "next_attempt_at": last_attempt + timedelta(minutes=2**attempts)
            if status == "pending"
            else None,
            "response_status_code": code,
            "response_time_ms": rng.randint(15, 4000) if code is not None else None,
            "payload_size_bytes": rng.randint(200, 64_000),
            "idempotency_key": f"idem_{rng.getrandbits(64):016x}",
        }
        if direction == "outbound":
            endpoint = rng.randint(1, 6)
            message["endpoint_id"] = f"ep_{endpoint:04d}"
            message["endpoint_url"] = f"https://hooks.customer-{endpoint}.example.com/webhooks"
        else:
            message["inbound_endpoint_id"] = f"ie_{rng.randint(1, 4):04d}"
            message["source"] = rng.choice(_SOURCES)
            message["signature_verified"] = rng.random() < 0.95
        return message

    def add_messages(
        self, n: int, at: datetime | None = None, direction: str | None = None
    ) -> list[dict[str, Any]]:
        """Append ``n`` new messages created at ``at`` (default: now), 1 ms apart."""
        with self._lock:
            base = at or datetime.fromtimestamp(self.clock(), UTC)
            added = [
                self._make_message(
                    base + timedelta(milliseconds=i), direction or self._rng.choice(DIRECTIONS)
                )
                for i in range(n)
            ]
            self.messages.extend(added)
            return added

    def rows_for(
        self,
        direction: str,
        start: datetime,
        end: datetime,
        filters: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """What an export of this window must contain: ``start <= created_at < end``."""
        filters = filters or {}
        with self._lock:
            return [
                m
                for m in self.messages
                if m["direction"] == direction
                and start <= m["created_at"] < end
                and all(m.get(k) == v for k, v in filters.items())
            ]

    # -- switches ---------------------------------------------------------------------------

    def expire_export(self, export_id: str) -> None:
        """The export becomes ``expired`` and its S3 object is deleted (links then 404 too)."""
        with self._lock:
            export = self.exports[export_id]
            self._advance(export)
            export.status = "expired"
            export.expires_at = datetime.fromtimestamp(self.clock(), UTC)
            if export.object_key:
                self._client.delete_object(Bucket=self.bucket, Key=export.object_key)

    def forget_export(self, export_id: str) -> None:
        """The platform no longer knows the id: status and download answer 404 NOT_FOUND."""
        with self._lock:
            self.exports.pop(export_id, None)

    def object_key(self, export_id: str) -> str:
        return f"exports/{export_id}/export.csv"

    # -- export lifecycle -------------------------------------------------------------------

    def _new_id(self) -> str:
        """UUIDv7 layout: 48-bit millisecond time, version 7, variant 10, random rest."""
        ms = int(self.clock() * 1000) & ((1 << 48) - 1)
        rand_a = secrets.randbits(12)
        rand_b = secrets.randbits(62)
        value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
        text = f"{value:032x}"
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    def create_export(self, body: Any) -> Export:
        if not isinstance(body, dict):
            raise ApiError(400, "INVALID_REQUEST", "request body must be a JSON object")
        try:
            start = parse_api_time(body.get("start_time"))
        except ValueError as exc:
            raise ApiError(400, "INVALID_REQUEST", f"start_time {exc}") from None
        try:
            end = parse_api_time(body.get("end_time"))
        except ValueError as exc:
            raise ApiError(400, "INVALID_REQUEST", f"end_time {exc}") from None
        if not start < end:
            raise ApiError(400, "INVALID_REQUEST", "start_time must be before end_time")
        direction = body.get("direction", "outbound")
        if direction not in DIRECTIONS:
            raise ApiError(400, "INVALID_REQUEST", "direction must be 'outbound' or 'inbound'")
        filters: dict[str, str] = {}
        for name in ("status", "endpoint_id", "inbound_endpoint_id"):
            value = body.get(name)
            if value is None:
                continue
            if name != "status" and name not in CSV_COLUMNS[direction]:
                raise ApiError(
                    400, "INVALID_REQUEST", f"{name} does not apply to {direction} messages"
                )
            if name == "status" and value not in MESSAGE_STATUSES:
                raise ApiError(400, "INVALID_REQUEST", f"status must be one of {MESSAGE_STATUSES}")
            filters[name] = str(value)
        with self._lock:
            export = Export(
                id=self._new_id(),
                direction=direction,
                start_time=start,
                end_time=end,
                filters=filters,
                created_at=self.clock(),
                fail_with=self.fail_next,
            )
            self.fail_next = None
            self.exports[export.id] = export
            return export

    def get_export(self, export_id: str) -> Export:
        with self._lock:
            export = self.exports.get(export_id)
            if export is None:
                raise ApiError(404, "NOT_FOUND", "Export not found")
            self._advance(export)
            return export

    def _advance(self, export: Export) -> None:
        """Move the job along the clock: pending -> processing -> completed/failed -> expired."""
        now = self.clock()
        age = now - export.created_at
        if export.status == "pending" and age >= self.ready_after_seconds / 2:
            export.status = "processing"
            export.started_at = datetime.fromtimestamp(now, UTC)
        if export.status == "processing" and age >= self.ready_after_seconds:
            completed = datetime.fromtimestamp(now, UTC)
            if export.fail_with is not None:
                export.status = "failed"
                export.error_message = export.fail_with
            else:
                self._write_file(export)
                export.status = "completed"
                export.expires_at = completed + timedelta(seconds=self.export_ttl_seconds)
            export.completed_at = completed
        if (
            export.status == "completed"
            and export.expires_at is not None
            and now >= export.expires_at.timestamp()
        ):
            export.status = "expired"

    def _write_file(self, export: Export) -> None:
        """Stream the window's rows to a temp CSV, upload it to S3, record the true sizes."""
        columns = CSV_COLUMNS[export.direction]
        rows = self.rows_for(export.direction, export.start_time, export.end_time, export.filters)
        fd, name = tempfile.mkstemp(prefix="deliveries-", suffix=".csv")
        path = Path(name)
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                writer.writerow(columns)
                for row in rows:
                    writer.writerow(_csv_value(row.get(col)) for col in columns)
            key = self.object_key(export.id)
            self._client.upload_file(
                str(path), self.bucket, key, ExtraArgs={"ContentType": "text/csv"}
            )
            export.object_key = key
            export.row_count = len(rows)
            export.file_size_bytes = path.stat().st_size
        finally:
            path.unlink(missing_ok=True)

    def download_url(self, export_id: str) -> str:
        with self._lock:
            export = self.get_export(export_id)
            if export.status == "expired":
                raise ApiError(410, "EXPORT_EXPIRED", "Export download link has expired")
            if export.status != "completed":
                raise ApiError(
                    409,
                    "EXPORT_NOT_READY",
                    f"Export is not yet completed (status: {export.status})",
                )
            return self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": export.object_key},
                ExpiresIn=self.presign_ttl_seconds,
            )

    def gate(self, request: Request) -> None:
        """Record the call, then apply the rate-limit switch and the API key check."""
        authorization = request.headers.get("authorization")
        with self._lock:
            self.calls.append(ApiCall(request.method, request.url.path, authorization))
            if self.rate_limit_next > 0:
                self.rate_limit_next -= 1
                raise ApiError(
                    429,
                    "RATE_LIMITED",
                    "Too many requests",
                    {"Retry-After": str(self.rate_limit_retry_after)},
                )
        if authorization != f"Bearer {self.token}":
            raise ApiError(401, "UNAUTHORIZED", "Invalid or missing API key")


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return iso_ms(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _error_response(error: ApiError) -> JSONResponse:
    request_id = f"req_{secrets.token_hex(8)}"
    return JSONResponse(
        {
            "error": {"code": error.code, "message": error.message},
            "meta": {"request_id": request_id},
        },
        status_code=error.status,
        headers={**error.headers, "X-Request-Id": request_id},
    )


def create_app(state: State) -> Starlette:
    """The API on Starlette; blocking work (S3 upload, presigning) runs in the thread pool."""

    async def create(request: Request) -> Response:
        try:
            state.gate(request)
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "INVALID_REQUEST", "request body must be JSON") from None
            export = await run_in_threadpool(state.create_export, body)
            return JSONResponse({"data": export.to_json()}, status_code=201)
        except ApiError as error:
            return _error_response(error)

    async def show(request: Request) -> Response:
        try:
            state.gate(request)
            export = await run_in_threadpool(state.get_export, request.path_params["export_id"])
            return JSONResponse({"data": export.to_json()})
        except ApiError as error:
            return _error_response(error)

    async def download(request: Request) -> Response:
        try:
            state.gate(request)
            url = await run_in_threadpool(state.download_url, request.path_params["export_id"])
            return RedirectResponse(url, status_code=302)
        except ApiError as error:
            return _error_response(error)

    routes: Iterable[Route] = (
        Route("/v1/exports", create, methods=["POST"]),
        Route("/v1/exports/{export_id}", show, methods=["GET"]),
        Route("/v1/exports/{export_id}/download", download, methods=["GET"]),
    )
    return Starlette(routes=list(routes))
