"""Streaming download of an export's files to local disk (the *fetch* step).

Why this is more than ``httpx.get``:

* Export files can be gigabytes: the body is streamed to ``<name>.part`` in chunks and the
  SHA-256 is computed on the way, so memory stays bounded whatever the file size.
* Redirects are followed by hand: the provider's auth headers go only to the API host, never to
  the presigned storage URL a ``302`` points at (leaking a bearer token to S3 logs is a real
  incident, and S3 rejects requests that carry two kinds of auth anyway).
* Links break in typed ways: a presigned link answering 401/403/404/410 has *expired* and the
  caller must ask the provider for a fresh one (``LinkExpiredError``), which is very different
  from an export that is gone or from a transient 5xx.
* A body cut short (a proxy closing the connection) is retried, resuming with ``Range`` when the
  server said ``Accept-Ranges: bytes``, so a 2 GB file does not restart at 1.9 GB.
* The size is checked against what the provider announced: a silently short file would
  otherwise load as a plausible but incomplete table.

No Dagster here; the retry timing is shared with the API client through :class:`RetryPolicy`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportExpiredError,
    ExportPipelineError,
    IntegrityError,
    LinkExpiredError,
    ProviderRejectedError,
    TransientProviderError,
)
from export_pipeline.core.http import RETRYABLE_STATUS, RetryPolicy, retry_after_seconds
from export_pipeline.core.model import RemoteFile
from export_pipeline.core.redact import get_logger

log = get_logger(__name__)  # redacts secrets from every message

REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# Headers that must never leave for a host other than the API host, whoever set them.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
# How much of an error body we read: enough to classify it, bounded against a huge error page.
_ERROR_BODY_LIMIT = 64 * 1024
_EXCERPT_CHARS = 300
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)

Classifier = Callable[[httpx.Response], ExportPipelineError | None]
# Told after every chunk: (file name, bytes on disk, total or None, finished). It must be cheap;
# it runs on the download threads (the runner throttles it to a log line every few seconds).
Progress = Callable[..., None]


@dataclass(frozen=True)
class DownloadedFile:
    """A file completely on disk, with the facts the ledger and the checks need."""

    name: str
    path: Path
    size_bytes: int
    sha256: str
    content_type: str | None


class _Cancelled(Exception):
    """Raised inside a worker when a sibling download failed; never escapes download_files."""


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, problem: str, delay: float | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.delay = delay  # server-requested delay (Retry-After), else None -> backoff


def download_file(
    file: RemoteFile,
    dest_dir: Path,
    *,
    provider: str,
    export_id: str,
    headers: Mapping[str, str] | None = None,
    api_host: str | None = None,
    policy: RetryPolicy | None = None,
    classify: Classifier | None = None,
    client: httpx.Client | None = None,
    chunk_size: int = 1 << 20,
    timeout: float = 60.0,
    max_redirects: int = 5,
) -> DownloadedFile:
    """Download ``file`` to ``dest_dir/<file.name>`` and return what arrived.

    ``headers`` (typically ``Authorization``) are sent only for ``file.authenticated`` files and
    only to URLs whose host (and port, when ``api_host`` names one) equals ``api_host``; when
    ``api_host`` is None it defaults to the origin (host and port) of ``file.url``.
    ``classify`` lets the provider turn an error answer into its own typed error before the
    generic mapping applies.

    Raises LinkExpiredError (ask for a fresh link), IntegrityError (size differs from the
    announcement), TransientProviderError (retries exhausted), ConfigurationError (credentials
    rejected) or ProviderRejectedError / ExportExpiredError for other error answers. Nothing is
    left in ``dest_dir`` for a failed download.
    """
    (downloaded,) = download_files(
        [file],
        dest_dir,
        max_concurrency=1,
        provider=provider,
        export_id=export_id,
        headers=headers,
        api_host=api_host,
        policy=policy,
        classify=classify,
        client=client,
        chunk_size=chunk_size,
        timeout=timeout,
        max_redirects=max_redirects,
    )
    return downloaded


def download_files(
    files: Sequence[RemoteFile],
    dest_dir: Path,
    *,
    max_concurrency: int = 4,
    provider: str,
    export_id: str,
    headers: Mapping[str, str] | None = None,
    api_host: str | None = None,
    policy: RetryPolicy | None = None,
    classify: Classifier | None = None,
    client: httpx.Client | None = None,
    chunk_size: int = 1 << 20,
    timeout: float = 60.0,
    max_redirects: int = 5,
    progress: Progress | None = None,
) -> list[DownloadedFile]:
    """Download several files with at most ``max_concurrency`` at a time, results in input order.

    An export is only useful complete, so the first failure stops the rest: queued downloads are
    cancelled, running ones abort at their next chunk (and delete their partial file), and that
    first error is raised. Already finished files stay on disk (the caller owns ``dest_dir``).
    """
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    names = [f.name for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ProviderRejectedError(
            f"export lists the same file name more than once: {duplicates}",
            provider=provider,
            export_id=export_id,
        )
    if not files:
        return []
    own_client = client is None
    workers = min(max_concurrency, len(files))
    shared = client or _new_client(timeout, max_connections=workers)
    cancel = threading.Event()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
            futures: list[Future[DownloadedFile]] = [
                pool.submit(
                    _Downloader(
                        f,
                        Path(dest_dir),
                        provider=provider,
                        export_id=export_id,
                        headers=headers,
                        api_host=api_host,
                        policy=policy or RetryPolicy(),
                        classify=classify,
                        client=shared,
                        chunk_size=chunk_size,
                        timeout=timeout,
                        max_redirects=max_redirects,
                        cancel=cancel,
                        progress=progress,
                    ).run
                )
                for f in files
            ]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            first_error = next(
                (fut.exception() for fut in futures if fut in done and fut.exception() is not None),
                None,
            )
            if first_error is not None:
                cancel.set()
                for fut in futures:
                    fut.cancel()
                # Wait for running workers so no partial file is written after we return.
                wait(futures)
                raise first_error
            return [fut.result() for fut in futures]
    finally:
        if own_client:
            shared.close()


def _new_client(timeout: float, max_connections: int = 4) -> httpx.Client:
    return httpx.Client(
        follow_redirects=False,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        limits=httpx.Limits(max_connections=max(max_connections, 1)),
    )


def _host_matches(url: httpx.URL, api_host: str) -> bool:
    """True when ``url`` points at ``api_host`` ("host", "host:port" or a full URL)."""
    target = httpx.URL(api_host if "://" in api_host else f"//{api_host}")
    if url.host.lower() != target.host.lower():
        return False
    if target.port is None and "://" not in api_host:
        return True  # "host" alone: any port of that host
    default = {"http": 80, "https": 443}
    want = target.port or default.get(target.scheme)
    have = url.port or default.get(url.scheme)
    return want == have


def _safe_name(name: str) -> bool:
    return bool(name) and name not in {".", ".."} and "/" not in name and "\\" not in name


class _Downloader:
    """State of one file's download across attempts (offset, hash, resume support)."""

    def __init__(
        self,
        file: RemoteFile,
        dest_dir: Path,
        *,
        provider: str,
        export_id: str,
        headers: Mapping[str, str] | None,
        api_host: str | None,
        policy: RetryPolicy,
        classify: Classifier | None,
        client: httpx.Client | None,
        chunk_size: int,
        timeout: float,
        max_redirects: int,
        cancel: threading.Event | None,
        progress: Progress | None = None,
    ) -> None:
        self.file = file
        self.progress = progress
        self.dest_dir = dest_dir
        self.provider = provider
        self.export_id = export_id
        self.headers = dict(headers or {})
        # Default: the exact origin (scheme, host, port) of the file's own URL.
        origin = httpx.URL(file.url)
        self.api_host = api_host or f"{origin.scheme}://{origin.netloc.decode()}"
        self.policy = policy
        self.classify = classify
        self.client = client
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.cancel = cancel
        self.final_path = dest_dir / file.name
        self.part_path = dest_dir / f"{file.name}.part"
        # Resume state: bytes on disk in .part, their running hash, and whether a Range is safe.
        self.offset = 0
        self.hasher = hashlib.sha256()
        self.can_resume = False
        self.validator: str | None = None  # ETag / Last-Modified for If-Range
        self.total: int | None = None  # full size according to the server
        self.content_type: str | None = None

    # -- helpers -------------------------------------------------------------------------

    def _ctx(self) -> dict[str, Any]:
        return {"provider": self.provider, "export_id": self.export_id, "file": self.file.name}

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled()

    def _restart(self) -> None:
        self.offset = 0
        self.hasher = hashlib.sha256()
        self.total = None
        with open(self.part_path, "wb"):
            pass

    def _cleanup(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.part_path.unlink()

    # -- main loop -----------------------------------------------------------------------

    def run(self) -> DownloadedFile:
        if not _safe_name(self.file.name):
            raise ProviderRejectedError(
                f"refusing unsafe file name {self.file.name!r}", **self._ctx()
            )
        self.dest_dir.mkdir(parents=True, exist_ok=True)
        own_client = self.client is None
        client = self.client or _new_client(self.timeout)
        try:
            self._restart()
            return self._attempts(client)
        except _Cancelled:
            self._cleanup()
            raise ExportPipelineError(
                "download cancelled after a sibling failed", **self._ctx()
            ) from None
        except BaseException:
            self._cleanup()
            raise
        finally:
            if own_client:
                client.close()

    def _attempts(self, client: httpx.Client) -> DownloadedFile:
        problem = ""
        for attempt in range(1, self.policy.max_attempts + 1):
            self._check_cancel()
            try:
                self._attempt(client)
            except _Retry as retry:
                problem = retry.problem
                if retry.delay is not None and retry.delay > self.policy.max_retry_after:
                    raise TransientProviderError(
                        f"download: server asked to wait {retry.delay:.0f}s (Retry-After), "
                        f"more than max_retry_after={self.policy.max_retry_after:.0f}s",
                        hint="try again later",
                        **self._ctx(),
                    ) from None
                delay = retry.delay if retry.delay is not None else self.policy.backoff(attempt)
            else:
                return self._finish()
            if attempt == self.policy.max_attempts:
                break
            log.warning(
                "download of %s failed (%s); retry %d/%d in %.2fs%s",
                self.file.name,
                problem,
                attempt,
                self.policy.max_attempts - 1,
                delay,
                f", resuming at byte {self.offset}" if self.offset else "",
            )
            self._sleep(delay)
        raise TransientProviderError(
            f"download still failing after {self.policy.max_attempts} attempts ({problem})",
            hint="the file host is unavailable or rate-limiting; the run can be retried",
            **self._ctx(),
        )

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake up early when a sibling download failed."""
        if self.cancel is None:
            time.sleep(seconds)
        elif self.cancel.wait(seconds):
            raise _Cancelled()

    def _attempt(self, client: httpx.Client) -> None:
        """One GET (plus redirects); appends to .part. Raises _Retry for retryable faults."""
        if self.offset and not self.can_resume:
            self._restart()
        extra: dict[str, str] = {"Accept-Encoding": "identity"}
        if self.offset:
            extra["Range"] = f"bytes={self.offset}-"
            if self.validator:
                extra["If-Range"] = self.validator
        try:
            with self._open(client, extra) as response:
                self._consume(response)
        except httpx.TransportError as exc:  # includes timeouts and a connection cut mid-body
            raise _Retry(f"{type(exc).__name__}: {exc}") from None

    @contextlib.contextmanager
    def _open(self, client: httpx.Client, extra: Mapping[str, str]) -> Iterator[httpx.Response]:
        """GET following redirects by hand; credentials only ever go to the API host."""
        url = httpx.URL(self.file.url)
        for _ in range(self.max_redirects + 1):
            request = client.build_request("GET", url, headers=extra, timeout=self.timeout)
            send_credentials = self.file.authenticated and _host_matches(url, self.api_host)
            if send_credentials:
                request.headers.update(self.headers)
            else:
                # Also drops credentials a caller's client may carry as default headers.
                for key in list(request.headers.keys()):
                    if key.lower() in _CREDENTIAL_HEADERS or key in self.headers:
                        del request.headers[key]
            response = client.send(request, stream=True)
            if response.status_code in REDIRECT_STATUS and "location" in response.headers:
                response.close()
                url = url.join(response.headers["location"])
                continue
            try:
                yield response
            finally:
                response.close()
            return
        raise ProviderRejectedError(
            f"download: more than {self.max_redirects} redirects", **self._ctx()
        )

    def _consume(self, response: httpx.Response) -> None:
        status = response.status_code
        if status in RETRYABLE_STATUS or status >= 500:
            raise _Retry(f"HTTP {status}", retry_after_seconds(response))
        if status >= 300:
            raise self._error_for(response)
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if not match or int(match.group(1)) != self.offset:
                # A range we did not ask for: do not splice it in, start over next attempt.
                self.can_resume = False
                raise _Retry(f"unexpected Content-Range {response.headers.get('content-range')}")
            self.total = int(match.group(3)) if match.group(3) != "*" else None
        else:  # 200: the whole body, whether or not we asked for a range
            if self.offset:
                self._restart()
            length = response.headers.get("content-length")
            self.total = int(length) if length and length.isdigit() else None
        self.can_resume = response.headers.get("accept-ranges", "").strip().lower() == "bytes"
        self.validator = response.headers.get("etag") or response.headers.get("last-modified")
        if self.validator and self.validator.startswith("W/"):
            self.validator = None  # weak ETags are not allowed in If-Range
        self.content_type = response.headers.get("content-type")
        with open(self.part_path, "ab") as out:
            for chunk in response.iter_raw(self.chunk_size):
                self._check_cancel()
                out.write(chunk)
                self.hasher.update(chunk)
                self.offset += len(chunk)
                if self.progress is not None:
                    self.progress(self.file.name, self.offset, self.total)
        if self.total is not None and self.offset < self.total:
            raise _Retry(f"body ended at byte {self.offset} of {self.total}")

    def _error_for(self, response: httpx.Response) -> ExportPipelineError:
        """Map an error answer to a typed error; the provider's classifier goes first."""
        body = bytearray()
        with contextlib.suppress(httpx.TransportError):
            for chunk in response.iter_raw():
                body.extend(chunk)
                if len(body) >= _ERROR_BODY_LIMIT:
                    break
        readable = httpx.Response(
            response.status_code,
            headers=[(k, v) for k, v in response.headers.items() if k.lower() != "content-length"],
            content=bytes(body[:_ERROR_BODY_LIMIT]),
            request=response.request,
        )
        if self.classify is not None:
            classified = self.classify(readable)
            if classified is not None:
                for name, value in self._ctx().items():
                    if getattr(classified, name, None) is None:
                        setattr(classified, name, value)
                return classified
        status = response.status_code
        excerpt = bytes(body[:2048]).decode("utf-8", errors="replace").strip()[:_EXCERPT_CHARS]
        detail = f"HTTP {status}" + (f": {excerpt}" if excerpt else "")
        if not self.file.authenticated and status in {401, 403, 404, 410}:
            return LinkExpiredError(
                f"download link no longer valid ({detail})",
                hint="ask the provider for a fresh link",
                **self._ctx(),
            )
        if status == 401:
            return ConfigurationError(
                f"file host rejected our credentials ({detail})",
                hint="check the provider token",
                **self._ctx(),
            )
        if status == 410:
            return ExportExpiredError(
                f"export file is gone ({detail})", hint="request the export again", **self._ctx()
            )
        return ProviderRejectedError(f"download refused ({detail})", **self._ctx())

    def _finish(self) -> DownloadedFile:
        expected = self.file.size_bytes if self.file.size_bytes is not None else self.total
        if expected is not None and self.offset != expected:
            source = "announced by the provider" if self.file.size_bytes is not None else "sent"
            raise IntegrityError(
                f"size mismatch: expected {expected} bytes ({source}), got {self.offset} bytes",
                hint="the file is incomplete or changed; request the export again",
                **self._ctx(),
            )
        os.replace(self.part_path, self.final_path)
        if self.progress is not None:
            self.progress(self.file.name, self.offset, self.total, finished=True)
        return DownloadedFile(
            name=self.file.name,
            path=self.final_path,
            size_bytes=self.offset,
            sha256=self.hasher.hexdigest(),
            content_type=self.content_type,
        )
