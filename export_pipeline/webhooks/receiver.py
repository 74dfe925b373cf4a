"""The push receiver: authenticated HTTP endpoints that durably record export events.

Senders (the locations network operator, mapping.travel) POST an event when an export completes
or fails. The answer codes follow the locations seed's contract, which drives the sender:

* 200/202 -> delivered (only once the event is committed to the ``EventStore``);
* 400 -> never retried, so the problem is logged with enough to investigate;
* 401 -> the sender checks its credentials and retries;
* 408 -> the body did not arrive within ``body_timeout_seconds`` (slow sender or slow-loris);
* 413 -> body larger than ``max_body_bytes`` (refused before it is read in full or parsed);
* 503 + ``Retry-After`` -> the store could not take the event now; the sender retries.

The receiver never touches the DuckDB warehouse; an event is only a hint, which the Dagster
sensor turns into an ingest that confirms the status with the provider before loading.

Order of checks per request: size, then authentication over the raw bytes, then nesting depth
(deeper than ``max_json_depth`` -> 400, never a 500 the sender would retry forever), then
parsing, then recording. What is stored and logged is redacted (``core.redact``): an event's
signed ``exportUrl`` keeps its path but not its signature. Server-level guards (a deadline for
the request head, a bound on concurrent connections) are uvicorn options, see
``serve.uvicorn_options``.

Authentication is the Standard Webhooks scheme (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``), or a bearer token for senders that cannot sign. A provider whose spec
declares its own scheme (``events.signing``; Stripe's ``Stripe-Signature``) is checked with that
scheme and its own secret (``events.signing.secret_env``) on its route instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from export_pipeline.core.errors import ConfigurationError
from export_pipeline.core.model import ExportStatus
from export_pipeline.core.redact import get_logger, redact_obj, redact_text
from export_pipeline.providers.base import ExportProvider
from export_pipeline.providers.registry import PROVIDERS
from export_pipeline.providers.spec import dig
from export_pipeline.webhooks.store import EventStore

logger = get_logger(__name__)  # redacts secrets from every message

SECRET_ENV = "EXPORT_PIPELINE_WEBHOOK_SECRET"
TOKEN_ENV = "EXPORT_PIPELINE_WEBHOOK_TOKEN"
_SECRET_PREFIX = "whsec_"
RETRY_AFTER_SECONDS = 30


def decode_secret(secret: str) -> bytes:
    """``whsec_<base64>`` (prefix optional, padding optional) -> HMAC key bytes.

    Same decoding as ``standardwebhooks.Webhook``, but strict: a typo in the environment must
    stop the receiver at start, not make every delivery fail with 401.
    """
    text = secret.strip()
    if text.startswith(_SECRET_PREFIX):
        text = text[len(_SECRET_PREFIX) :]
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError(
            "a webhook secret is not valid base64",
            hint=f"set {SECRET_ENV} to whsec_<base64>, comma-separated for rotation",
        ) from exc
    if not key:
        raise ConfigurationError("a webhook secret is empty", hint=f"check {SECRET_ENV}")
    return key


@dataclass(frozen=True)
class ReceiverSettings:
    """How the receiver authenticates and what it accepts.

    ``secrets``: Standard Webhooks secrets (``whsec_...``); several are accepted at once so a
    secret can be rotated without dropping deliveries. ``bearer_token``: the simpler mode for
    senders that cannot sign (no replay protection beyond event-id deduplication).
    At least one of the two is required: an unauthenticated receiver is refused at construction.
    """

    secrets: tuple[str, ...] = ()
    bearer_token: str | None = None
    # Provider name -> the secrets of its own signature scheme (``events.signing``), used as is.
    provider_secrets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    tolerance_seconds: int = 300
    max_body_bytes: int = 1_048_576
    base_path: str = ""
    # Slow-loris and resource guards (see docs/security.md).
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 10.0
    max_connections: int = 100
    max_json_depth: int = 32
    _keys: tuple[bytes, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        secrets = tuple(s.strip() for s in self.secrets if s and s.strip())
        object.__setattr__(self, "secrets", secrets)
        token = self.bearer_token.strip() if self.bearer_token else None
        object.__setattr__(self, "bearer_token", token or None)
        own = {
            name: kept
            for name, values in self.provider_secrets.items()
            if (kept := tuple(v.strip() for v in values if v and v.strip()))
        }
        object.__setattr__(self, "provider_secrets", own)
        if not secrets and not self.bearer_token and not own:
            raise ConfigurationError(
                "the webhook receiver has no credentials configured; refusing to start",
                hint=f"set {SECRET_ENV} (whsec_..., comma-separated) and/or {TOKEN_ENV}",
            )
        object.__setattr__(self, "_keys", tuple(decode_secret(s) for s in secrets))
        if self.tolerance_seconds <= 0:
            raise ConfigurationError("tolerance_seconds must be positive")
        for name in (
            "max_body_bytes",
            "header_timeout_seconds",
            "body_timeout_seconds",
            "max_connections",
            "max_json_depth",
        ):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive")
        base = self.base_path.strip().rstrip("/")
        if base and not base.startswith("/"):
            base = "/" + base
        object.__setattr__(self, "base_path", base)

    def __repr__(self) -> str:  # never show secrets in logs or tracebacks
        return (
            f"ReceiverSettings(secrets=<{len(self.secrets)}>,"
            f" bearer_token={'<set>' if self.bearer_token else None},"
            f" provider_secrets=<{', '.join(sorted(self.provider_secrets))}>,"
            f" tolerance_seconds={self.tolerance_seconds}, max_body_bytes={self.max_body_bytes},"
            f" header_timeout_seconds={self.header_timeout_seconds},"
            f" body_timeout_seconds={self.body_timeout_seconds},"
            f" max_connections={self.max_connections}, max_json_depth={self.max_json_depth},"
            f" base_path={self.base_path!r})"
        )

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Decoded HMAC keys, in the order of ``secrets``."""
        return self._keys

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        providers: Sequence[type[ExportProvider]] = PROVIDERS,
        **overrides: Any,
    ) -> ReceiverSettings:
        """Read ``EXPORT_PIPELINE_WEBHOOK_SECRET`` (comma-separated),
        ``EXPORT_PIPELINE_WEBHOOK_TOKEN`` and each provider's own signing secret
        (``events.signing.secret_env``) now (never at import), plus keyword overrides."""
        env = os.environ if environ is None else environ

        def listed(name: str) -> tuple[str, ...]:
            return tuple(s for s in env.get(name, "").split(",") if s.strip())

        own = {p.name: listed(signing.secret_env) for p in providers if (signing := _signing(p))}
        token = env.get(TOKEN_ENV) or None
        return cls(
            secrets=listed(SECRET_ENV), bearer_token=token, provider_secrets=own, **overrides
        )


def _signing(provider: type[ExportProvider]) -> Any:
    """The provider's own signature scheme (``events.signing``), or None: Standard Webhooks."""
    return provider.events.signing if provider.events else None


class AuthError(Exception):
    """Why a request is not authenticated; the message goes into the 401 body (no secrets)."""


def verify_signature(
    body: bytes,
    headers: Mapping[str, str],
    keys: tuple[bytes, ...],
    *,
    tolerance_seconds: int,
    now: float | None = None,
) -> str:
    """Check a Standard Webhooks signature over the raw body; return the ``webhook-id``.

    Hand-rolled rather than ``standardwebhooks.Webhook.verify`` (1.1) because that one has a
    fixed 5-minute window, takes one secret, and raises ValueError/binascii/Unicode errors
    (i.e. 500s) on a malformed signature header or a non-UTF-8 body. Signatures it makes are
    accepted here (the tests sign with it).
    """
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signature_header = headers.get("webhook-signature", "")
    if not (msg_id and timestamp and signature_header):
        raise AuthError("missing webhook-id, webhook-timestamp or webhook-signature header")
    if not timestamp.isascii() or not timestamp.isdigit():
        raise AuthError("webhook-timestamp must be integer Unix seconds")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance_seconds:
        raise AuthError("webhook-timestamp outside the accepted window")
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = [hmac.new(key, signed, hashlib.sha256).digest() for key in keys]
    matched = False
    for entry in signature_header.split():
        version, _, encoded = entry.partition(",")
        if version != "v1" or not encoded:
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        for digest in expected:
            # Compare against every key and do not stop early: the time taken does not reveal
            # which secret or entry matched.
            matched |= hmac.compare_digest(digest, candidate)
    if not matched:
        raise AuthError("no matching signature")
    return msg_id


def verify_stripe_signature(
    body: bytes,
    header: str,
    secrets: Sequence[str],
    *,
    tolerance_seconds: int,
    now: float | None = None,
) -> None:
    """Stripe's scheme: ``Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]``, each v1 an
    HMAC-SHA256 of ``<t>.<raw body>`` keyed with the endpoint secret's UTF-8 bytes (the whole
    ``whsec_...`` string, not base64-decoded as in Standard Webhooks). Other versions (v0, a test
    scheme) are ignored."""
    stamps, candidates = [], []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            stamps.append(value)
        elif key == "v1" and value:
            candidates.append(value.encode())
    if len(stamps) != 1 or not stamps[0].isascii() or not stamps[0].isdigit():
        raise AuthError("Stripe-Signature needs one t=<integer Unix seconds>")
    if not candidates:
        raise AuthError("Stripe-Signature has no v1 signature")
    current = time.time() if now is None else now
    if abs(current - int(stamps[0])) > tolerance_seconds:
        raise AuthError("Stripe-Signature timestamp outside the accepted window")
    signed = stamps[0].encode() + b"." + body
    matched = False
    for secret in secrets:
        digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest().encode()
        for candidate in candidates:  # every pair, no early exit (see verify_signature)
            matched |= hmac.compare_digest(digest, candidate)
    if not matched:
        raise AuthError("no matching signature")


def verify_bearer(headers: Mapping[str, str], token: str) -> None:
    """``Authorization: Bearer <token>``, compared in constant time."""
    scheme, _, credential = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise AuthError("missing bearer token")
    if not hmac.compare_digest(credential.strip().encode(), token.encode()):
        raise AuthError("invalid bearer token")


def authenticate(
    body: bytes,
    headers: Mapping[str, str],
    settings: ReceiverSettings,
    provider: type[ExportProvider] | None = None,
) -> None:
    """Signed requests are checked against the secrets; otherwise the bearer token applies.

    A request that carries a signature must pass the signature check when secrets are
    configured (a bad signature is not rescued by also sending a token). On the route of a
    provider with its own scheme (``events.signing``) only that scheme or the token counts.
    """
    if provider is not None and _signing(provider) is not None:
        header = headers.get("stripe-signature")
        if header is not None:
            secrets = settings.provider_secrets.get(provider.name, ())
            if not secrets:
                raise AuthError(f"no {provider.name} signing secret configured on the receiver")
            verify_stripe_signature(
                body, header, secrets, tolerance_seconds=settings.tolerance_seconds
            )
            return
        if settings.bearer_token is not None:
            verify_bearer(headers, settings.bearer_token)
            return
        raise AuthError("missing Stripe-Signature header")
    if settings.keys and "webhook-signature" in headers:
        verify_signature(body, headers, settings.keys, tolerance_seconds=settings.tolerance_seconds)
        return
    if settings.bearer_token is not None:
        verify_bearer(headers, settings.bearer_token)
        return
    raise AuthError("missing webhook-id, webhook-timestamp or webhook-signature header")


class BodyTooLarge(Exception):
    pass


async def read_limited(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """Read the body, giving up as soon as it exceeds ``limit`` (chunked bodies included) or,
    with ``timeout``, when the whole body has not arrived in that many seconds (TimeoutError)."""
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(timeout):
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
    return b"".join(chunks)


# Strings are skipped whole (a bracket inside a string is not nesting).
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_depth_exceeds(body: bytes, max_depth: int) -> bool:
    """True when ``body`` nests arrays/objects deeper than ``max_depth`` (checked before
    parsing: ``json.loads`` of a very deep body raises RecursionError, an internal error)."""
    depth = 0
    for match in _JSON_TOKENS.finditer(body):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def _excerpt(body: bytes, limit: int = 200) -> str:
    """The start of a rejected body for the log, with its secrets redacted."""
    return redact_text(body[:limit].decode("utf-8", errors="replace"))


def event_route(provider: type[ExportProvider]) -> str:
    """Where a provider's events are posted (under ``ReceiverSettings.base_path``)."""
    return f"/{provider.name}/exports/events"


def _problem(status_code: int, reason: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse(
        {"received": False, "error": reason}, status_code=status_code, headers=headers
    )


def event_id_for(headers: Mapping[str, str], body: bytes) -> str:
    """The ``webhook-id`` when sent (stable across the sender's retries), else a hash of the
    raw body, so an identical redelivery is recognised as a duplicate."""
    msg_id = headers.get("webhook-id", "").strip()
    return msg_id or "sha256:" + hashlib.sha256(body).hexdigest()


def _make_event_endpoint(
    provider: type[ExportProvider], store: EventStore, settings: ReceiverSettings
):
    source = provider.name
    id_path = provider.events.id_path if provider.events else None

    def parse(payload: Mapping[str, Any]) -> ExportStatus:
        _partition, status = provider.parse_event(payload)
        return status

    async def endpoint(request: Request) -> Response:
        headers = request.headers
        client = request.client.host if request.client else "?"
        # (1) size, before reading: a declared Content-Length over the limit is refused at once.
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return _problem(400, "invalid Content-Length")
            if int(declared) > settings.max_body_bytes:
                logger.warning(
                    "webhook %s from %s refused: Content-Length %s > %d",
                    source,
                    client,
                    declared,
                    settings.max_body_bytes,
                )
                return _problem(413, f"body larger than {settings.max_body_bytes} bytes")
        try:
            body = await read_limited(
                request, settings.max_body_bytes, timeout=settings.body_timeout_seconds
            )
        except TimeoutError:
            logger.warning(
                "webhook %s from %s refused: body not received within %.0fs",
                source,
                client,
                settings.body_timeout_seconds,
            )
            return _problem(408, "request body timeout", headers={"Connection": "close"})
        except BodyTooLarge:
            logger.warning(
                "webhook %s from %s refused: streamed body over %d bytes",
                source,
                client,
                settings.max_body_bytes,
            )
            return _problem(413, f"body larger than {settings.max_body_bytes} bytes")
        except ClientDisconnect:
            return _problem(400, "client disconnected")

        # (2) authentication over the raw bytes.
        try:
            authenticate(body, headers, settings, provider)
        except AuthError as exc:
            logger.warning(
                "webhook %s from %s unauthenticated: %s (webhook-id=%r)",
                source,
                client,
                exc,
                headers.get("webhook-id"),
            )
            return _problem(401, str(exc))
        event_id = event_id_for(headers, body)

        # (3) parse. The sender never retries a 400, so the log line must be enough to
        # investigate: which event, from whom, what it looked like and what was wrong.
        if json_depth_exceeds(body, settings.max_json_depth):
            logger.warning(
                "webhook %s event %s rejected (400): JSON nested deeper than %d levels (%d bytes)",
                source,
                event_id,
                settings.max_json_depth,
                len(body),
            )
            return _problem(400, f"JSON nested deeper than {settings.max_json_depth} levels")
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
            status = parse(payload)
            own_id = dig(payload, id_path) if id_path else None
            if isinstance(own_id, str) and own_id:
                event_id = own_id  # the sender's event id: the same across its retries
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            # JSONDecodeError is a ValueError. Message and excerpt are redacted: a rejected
            # event's signed link must not land in the log.
            logger.warning(
                "webhook %s event %s rejected (400): %s; body starts %r",
                source,
                event_id,
                redact_text(str(exc)),
                _excerpt(body),
            )
            return _problem(400, redact_text(f"not a valid {source} export event: {exc}"))

        # (4) record durably; only then acknowledge.
        try:
            new = await run_in_threadpool(
                store.record,
                source=source,
                event_id=event_id,
                export_id=status.export_id,
                status=str(status.state.value),
                # Stored without secrets (the sensor confirms with the provider, which hands
                # out a fresh signed link; the event's own link is never used).
                body=redact_obj(payload),
            )
        except sqlite3.Error as exc:
            # (5) the store cannot take it now: tell the sender to come back later.
            logger.error(
                "webhook %s event %s not recorded, answering 503: %s", source, event_id, exc
            )
            return _problem(
                503,
                "event store unavailable, retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        logger.info(
            "webhook %s event %s for export %s (%s) %s",
            source,
            event_id,
            status.export_id,
            status.state.value,
            "recorded" if new else "duplicate",
        )
        return JSONResponse(
            {"received": True, "duplicate": not new, "event_id": event_id},
            status_code=202 if new else 200,
        )

    endpoint.__name__ = f"{source}_events"
    return endpoint


def create_app(
    store: EventStore,
    settings: ReceiverSettings,
    providers: Sequence[type[ExportProvider]] = PROVIDERS,
) -> Starlette:
    """The receiver as an ASGI app; run it with uvicorn (see ``serve``) or ``RunningServer``.

    One route per provider that pushes events (``ExportProvider.pushes_events``)."""
    base = settings.base_path

    async def healthz(request: Request) -> Response:
        try:
            await run_in_threadpool(store.count)
        except sqlite3.Error as exc:
            logger.error("webhook store unavailable: %s", exc)
            return JSONResponse({"ok": False, "store": "unavailable"}, status_code=503)
        return JSONResponse({"ok": True})

    async def internal_error(request: Request, exc: Exception) -> Response:
        # Never a stack trace in the body; the log has it.
        logger.exception("webhook receiver error on %s", request.url.path, exc_info=exc)
        return _problem(500, "internal error")

    routes = [
        Route(
            base + event_route(provider),
            _make_event_endpoint(provider, store, settings),
            methods=["POST"],
        )
        for provider in providers
        if provider.pushes_events
    ]
    routes.append(Route(f"{base}/healthz", healthz, methods=["GET"]))
    app = Starlette(routes=routes, exception_handlers={Exception: internal_error})
    app.state.store = store
    app.state.settings = settings
    return app
