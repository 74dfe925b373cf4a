"""A real S3-compatible server on loopback (moto's S3 app) for the simulators and the tests.

Why not ``moto.server.ThreadedMotoServer`` as is: it builds its WSGI app inside its thread and
offers no hook to see the requests. We serve the very same app
(``DomainDispatcherApplication(create_backend_app)`` with ``MotoRequestHandler``, exactly what
``ThreadedMotoServer`` runs) from our own werkzeug server, wrapped in a small WSGI middleware that

* records every request's method, path, query and headers, so a test can prove that no
  ``Authorization`` header reached S3 during a presigned download (observed at the server, not
  inferred from the client);
* enforces the rules of real S3 about presigned URLs that moto leaves out and that our download
  path depends on: the SigV4 query signature must match (403 ``SignatureDoesNotMatch`` for a
  tampered URL), the URL stops working after ``X-Amz-Expires`` (403 ``AccessDenied``,
  "Request has expired"), and a request may carry only one auth mechanism (400
  ``InvalidArgument`` when a presigned URL also gets an ``Authorization`` header).

moto keeps its S3 data in process-global backends: two ``S3Server`` in one process see the same
buckets. Use distinct bucket names per test when that matters.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote

from export_pipeline.sandbox.server import free_port

DUMMY_ACCESS_KEY = "testing"
DUMMY_SECRET_KEY = "testing"
DEFAULT_REGION = "us-east-1"

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class RecordedRequest:
    """One request as it arrived at the S3 host (header names lower-cased)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]

    @property
    def is_presigned(self) -> bool:
        return "x-amz-signature=" in self.query.lower() or "signature=" in self.query.lower()


def _s3_error(
    start_response: Callable[..., Any], status: str, code: str, message: str
) -> list[bytes]:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>sandbox</RequestId></Error>"
    ).encode()
    start_response(
        status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
    )
    return [body]


def presigned_expiry_problem(query: dict[str, list[str]], now: float) -> str | None:
    """Why a presigned query is no longer valid (None when still valid or not presigned).

    SigV4: ``X-Amz-Date`` (``YYYYMMDDTHHMMSSZ``) + ``X-Amz-Expires`` seconds; SigV2: ``Expires``
    epoch seconds next to ``Signature``.
    """
    if "X-Amz-Signature" in query:
        try:
            signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(
                tzinfo=UTC
            )
            lifetime = int(query["X-Amz-Expires"][0])
        except (KeyError, ValueError):
            return "malformed presigned query"
        if now > signed_at.timestamp() + lifetime:
            return "Request has expired"
        return None
    if "Signature" in query and "Expires" in query:
        try:
            expires = int(query["Expires"][0])
        except ValueError:
            return "malformed presigned query"
        if now > expires:
            return "Request has expired"
    return None


def _sigv4_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def presigned_signature_problem(
    method: str,
    raw_path: str,
    query: dict[str, list[str]],
    headers: dict[str, str],
    secrets: dict[str, str],
) -> tuple[str, str] | None:
    """``(code, message)`` when a SigV4 presigned request is not signed by a known key.

    The canonical request of SigV4 query auth (AWS docs, "Authenticating Requests: Using
    Query Parameters"): method, URI as sent, sorted encoded query without the signature, the
    signed headers, ``UNSIGNED-PAYLOAD``. moto serves presigned URLs without checking them; we
    check so a tampered or foreign URL fails as it would on S3.
    """
    try:
        credential = query["X-Amz-Credential"][0]
        access_key, date, region, service, _ = credential.split("/")
        amz_date = query["X-Amz-Date"][0]
        signed_headers = query["X-Amz-SignedHeaders"][0]
        signature = query["X-Amz-Signature"][0]
    except (KeyError, ValueError):
        return "AuthorizationQueryParametersError", "malformed presigned query"
    secret = secrets.get(access_key)
    if secret is None:
        return "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist"
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
        for k, values in sorted(query.items())
        if k != "X-Amz-Signature"
        for v in sorted(values)
    )
    names = signed_headers.split(";")
    canonical_headers = "".join(f"{name}:{headers.get(name, '').strip()}\n" for name in names)
    canonical_request = "\n".join(
        (method, raw_path, canonical_query, canonical_headers, signed_headers, "UNSIGNED-PAYLOAD")
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        (
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        )
    )
    expected = hmac.new(
        _sigv4_key(secret, date, region, service), string_to_sign.encode(), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return (
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided",
        )
    return None


class RecordingS3Middleware:
    """WSGI wrapper: record each request, then apply real S3's presign rules, then moto."""

    def __init__(
        self,
        app: WsgiApp,
        clock: Callable[[], float] = time.time,
        secrets: dict[str, str] | None = None,
    ) -> None:
        self.app = app
        self.clock = clock
        # access key -> secret, to check SigV4 presigned signatures like S3 does.
        self.secrets = dict(secrets or {DUMMY_ACCESS_KEY: DUMMY_SECRET_KEY})
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        headers = {
            key[5:].replace("_", "-").lower(): str(value)
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = str(environ[key])
        query_string = environ.get("QUERY_STRING", "")
        with self._lock:
            self._requests.append(
                RecordedRequest(
                    method=environ.get("REQUEST_METHOD", ""),
                    path=environ.get("PATH_INFO", ""),
                    query=query_string,
                    headers=headers,
                )
            )
        query = parse_qs(query_string)
        presigned = "X-Amz-Signature" in query or "Signature" in query
        if presigned and "authorization" in headers:
            return _s3_error(
                start_response,
                "400 Bad Request",
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
            )
        if "X-Amz-Signature" in query:
            raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
            raw_path = raw_uri.split("?", 1)[0] or quote(environ.get("PATH_INFO", ""))
            wrong = presigned_signature_problem(
                environ.get("REQUEST_METHOD", ""), raw_path, query, headers, self.secrets
            )
            if wrong is not None:
                return _s3_error(start_response, "403 Forbidden", *wrong)
        problem = presigned_expiry_problem(query, self.clock())
        if problem is not None:
            return _s3_error(start_response, "403 Forbidden", "AccessDenied", problem)
        return self.app(environ, start_response)


class S3Server:
    """moto's S3 on ``127.0.0.1:<free port>`` in a daemon thread; a context manager.

    ``client()`` gives a boto3 client with dummy credentials and path-style addressing (the
    loopback host has no bucket sub-domains); ``requests`` lists what reached the server.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, region: str = DEFAULT_REGION
    ) -> None:
        self.host = host
        self.port = port
        self.region = region
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._middleware: RecordingS3Middleware | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> S3Server:
        # Imported here so that importing the sandbox package does not load all of moto.
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            """moto's handler without the per-request access log on stderr."""

            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        if self._server is not None:
            return self
        if not self.port:
            self.port = free_port(self.host)
        self._middleware = RecordingS3Middleware(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            self.host, self.port, self._middleware, threaded=True, request_handler=QuietHandler
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="sandbox-s3"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self) -> Any:
        """A boto3 S3 client for this server (SigV4, path-style, dummy credentials)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=DUMMY_ACCESS_KEY,
            aws_secret_access_key=DUMMY_SECRET_KEY,
            region_name=self.region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def ensure_bucket(self, name: str) -> None:
        """Create ``name`` unless it exists (idempotent: tests and the sandbox both call it)."""
        client = self.client()
        existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request that reached this server so far, oldest first (a copy)."""
        return self._middleware.requests if self._middleware is not None else []

    def clear_requests(self) -> None:
        if self._middleware is not None:
            self._middleware.clear()
