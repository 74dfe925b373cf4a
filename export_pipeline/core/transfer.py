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
* Every URL is untrusted (``core.netpolicy``): each hop, redirects included, is checked
  (http/https only, no loopback/private/link-local/... address unless allowed) and the
  connection goes to the address that was checked (Host header and TLS SNI keep the name), so
  DNS rebinding cannot move it. Proxies from the environment are not used for the same reason.
* Inputs are bounded (``DownloadLimits``): an announced or sent size over the cap is refused
  before the body is read; a gzip body is inflated as it arrives (output counted and thrown
  away, so memory stays flat) and refused mid-download past the decompressed-size or
  expansion-ratio cap. The read timeout is the stall timeout: no byte for that long fails the
  attempt.

No Dagster here; the retry timing is shared with the API client through :class:`RetryPolicy`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import time
import zlib
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
    LimitExceededError,
    LinkExpiredError,
    ProviderRejectedError,
    TransientProviderError,
    UnsafeUrlError,
)
from export_pipeline.core.faults import fault_point
from export_pipeline.core.http import RETRYABLE_STATUS, RetryPolicy, retry_after_seconds
from export_pipeline.core.model import RemoteFile
from export_pipeline.core.netpolicy import UrlPolicy, UrlRefused, UrlUnresolvable
from export_pipeline.core.redact import get_logger, protect_library_loggers

log = get_logger(__name__)  # redacts secrets from every message
protect_library_loggers()  # httpx/httpcore log full (signed) URLs at INFO/DEBUG

REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
# Headers that must never leave for a host other than the API host, whoever set them.
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
# How much of an error body we read: enough to classify it, bounded against a huge error page.
_ERROR_BODY_LIMIT = 64 * 1024
_EXCERPT_CHARS = 300
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)

Classifier = Callable[[httpx.Response], ExportPipelineError | None]
# Told after every chunk: (file name, bytes on disk, total or None, finished). It must be cheap;
# it runs on the download threads (the runner throttles it to a log line every few seconds).
Progress = Callable[..., None]
# Told once per file, on its download thread, as soon as the file is complete and checked; what
# it returns (the file moved elsewhere, say) is what download_files returns for it.
Finished = Callable[["DownloadedFile"], "DownloadedFile"]

_GZIP_MAGIC = b"\x1f\x8b"
# Largest piece of inflated output held at once while metering a gzip body.
_INFLATE_STEP = 1 << 20


@dataclass(frozen=True)
class DownloadLimits:
    """Caps on what one file may be. None disables a cap.

    ``max_file_bytes``: the file as sent (checked against the provider's announcement before
    the download, against ``Content-Length`` before the body, and while streaming).
    ``max_decompressed_bytes`` / ``max_expansion_ratio``: for a gzip body, what it inflates to,
    checked while it streams; the ratio only counts once ``ratio_grace_bytes`` are inflated
    (a tiny file legitimately compresses very well).
    """

    max_file_bytes: int | None = 20 * 1024**3
    max_decompressed_bytes: int | None = 50 * 1024**3
    max_expansion_ratio: float | None = 200.0
    ratio_grace_bytes: int = 16 * 1024**2


class _GzipMeter:
    """Inflates a gzip stream chunk by chunk, counting and discarding the output."""

    def __init__(self, limits: DownloadLimits) -> None:
        self.limits = limits
        self.compressed = 0
        self.inflated = 0
        self.broken = False  # not valid gzip: leave the diagnosis (file, line) to normalise
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(self, data: bytes) -> str | None:
        """Account for ``data``; returns why the stream is over a cap, else None."""
        self.compressed += len(data)
        pending = data
        try:
            while pending and not self.broken:
                out = self._inflater.decompress(pending, _INFLATE_STEP)
                self.inflated += len(out)
                problem = self._over()
                if problem:
                    return problem
                if self._inflater.eof:  # a member ended; another may follow (multi-member)
                    pending = self._inflater.unused_data
                    self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    if not pending.strip(b"\x00"):
                        break
                else:
                    pending = self._inflater.unconsumed_tail
        except zlib.error:
            self.broken = True
        return None

    def _over(self) -> str | None:
        cap = self.limits.max_decompressed_bytes
        if cap is not None and self.inflated > cap:
            return f"inflates to more than {cap} bytes (max_decompressed_bytes)"
        ratio = self.limits.max_expansion_ratio
        if (
            ratio is not None
            and self.inflated > self.limits.ratio_grace_bytes
            and self.inflated > ratio * max(self.compressed, 1)
        ):
            return (
                f"inflates more than {ratio:g}x ({self.inflated} bytes from the first "
                f"{self.compressed}; max_expansion_ratio)"
            )
        return None


@dataclass(frozen=True)
class DownloadedFile:
    """A file completely on disk, with the facts the ledger and the checks need."""

    name: str
    path: Path
    size_bytes: int
    sha256: str | None  # None: not computed (``download_files(digest=False)``)
    content_type: str | None


_Hasher = Any  # hashlib's hash object (its type is private)


class BackgroundDigests:
    """The SHA-256 of finished files, computed on a thread of its own at the lowest CPU
    priority while the caller goes on (parsing them), instead of on the download's threads.

    A download from a fast host is CPU-bound (1.4 GB of Mews parts: ~88% of two cores, the
    host's share included), and the hash is 0.85 CPU-s of it; at nice 19 it takes what the
    parse leaves idle, and :meth:`result` waits only for what is left. Where a thread's
    priority cannot be set (not Linux), it runs at the usual one. Use as a context manager;
    leaving it stops the thread at its next read.
    """

    _READ = 1 << 20

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="digest", initializer=_lowest_priority
        )
        self._futures: dict[Path, Future[str]] = {}
        self._stop = threading.Event()

    def __enter__(self) -> BackgroundDigests:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def add(self, path: Path) -> None:
        if path not in self._futures:
            self._futures[path] = self._pool.submit(self._digest, path)

    def result(self, paths: Sequence[Path]) -> dict[Path, str]:
        """The hex SHA-256 of each of ``paths`` (those not added yet are added now); waits."""
        for path in paths:
            self.add(path)
        return {path: self._futures[path].result() for path in paths}

    def _digest(self, path: Path) -> str:
        hasher = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(self._READ):
                if self._stop.is_set():
                    raise _Cancelled()
                hasher.update(chunk)
        return hasher.hexdigest()


def _lowest_priority() -> None:
    """Make the calling thread the last to get a core (Linux: a thread id is a process id for
    setpriority); elsewhere leave it as it is."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


_NOT_GZIP = object()  # meter marker: the body is not gzip, nothing to inflate


class DownloadStoppedError(ExportPipelineError):
    """The caller stopped the downloads (``download_files``'s ``stop``): finished files stay,
    unfinished ones keep their ``.part`` for the next attempt."""


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
    url_policy: UrlPolicy | None = None,
    limits: DownloadLimits | None = None,
) -> DownloadedFile:
    """Download ``file`` to ``dest_dir/<file.name>`` and return what arrived.

    ``headers`` (typically ``Authorization``) are sent only for ``file.authenticated`` files and
    only to URLs whose host (and port, when ``api_host`` names one) equals ``api_host``; when
    ``api_host`` is None it defaults to the origin (host and port) of ``file.url``.
    ``classify`` lets the provider turn an error answer into its own typed error before the
    generic mapping applies. ``url_policy`` decides which hosts may be reached (default: public
    addresses only; ``api_host``, the configured API origin, is always accepted); ``limits``
    bounds the size; ``timeout`` is the connect, read (stall) and write timeout in seconds.

    Raises UnsafeUrlError (a URL the policy refuses, not retried), LimitExceededError (over a
    cap), LinkExpiredError (ask for a fresh link), IntegrityError (size differs from the
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
        url_policy=url_policy,
        limits=limits,
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
    url_policy: UrlPolicy | None = None,
    limits: DownloadLimits | None = None,
    resume: bool = False,
    on_finished: Finished | None = None,
    digest: bool = True,
    stop: threading.Event | None = None,
) -> list[DownloadedFile]:
    """Download several files with at most ``max_concurrency`` at a time, results in input order.

    An export is only useful complete, so the first failure stops the rest: queued downloads are
    cancelled, running ones abort at their next chunk (and delete their partial file), a read
    blocked on a stalled host, before its answer or mid-body, is cut (``_Downloader.abort``),
    and that first error is raised.
    Already finished files stay on disk (the caller owns ``dest_dir``).

    ``resume=True``: a ``<name>.part`` already in ``dest_dir`` (left by a killed or failed
    attempt) is continued with ``Range`` from its last byte when the server honours it, and
    started over when it does not; a download that fails with retries exhausted, or is stopped
    because a sibling failed, keeps its ``.part`` for the next attempt.

    ``on_finished`` is called with each file as soon as it is complete (on its download
    thread), so a caller can keep the finished files of an export whose other files fail
    (a dead link, a kill) instead of fetching them again.

    ``digest=False`` leaves ``sha256`` None: a caller that hashes the files later
    (:class:`BackgroundDigests`) keeps the hash off the download's cores.

    ``stop``: set by a caller whose own thread cannot interrupt this one (a download on a
    thread of its own, beside the parse): the downloads then stop as on a first failure, and
    :class:`DownloadStoppedError` is raised.
    """
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")

    def stopped() -> DownloadStoppedError:
        return DownloadStoppedError(
            "download stopped: the sync failed meanwhile", provider=provider, export_id=export_id
        )

    if stop is not None and stop.is_set():
        raise stopped()
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
    limits = limits or DownloadLimits()
    for f in files:  # announced sizes: refuse before a single byte is fetched
        cap = limits.max_file_bytes
        if f.size_bytes is not None and cap is not None and f.size_bytes > cap:
            raise LimitExceededError(
                f"announced size {f.size_bytes} bytes is over max_file_bytes="
                f"{limits.max_file_bytes}; not downloaded",
                provider=provider,
                export_id=export_id,
                file=f.name,
                hint="raise sync_settings.max_download_bytes if the file is expected",
            )
    url_policy = (url_policy or UrlPolicy()).trusting(api_host)
    own_client = client is None
    workers = min(max_concurrency, len(files))
    shared = client or _new_client(timeout, max_connections=workers)
    cancel = threading.Event()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
            downloaders = [
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
                    url_policy=url_policy,
                    limits=limits,
                    resume=resume,
                    on_finished=on_finished,
                    digest=digest,
                )
                for f in files
            ]
            futures: list[Future[DownloadedFile]] = [pool.submit(d.run) for d in downloaders]

            def stop_all() -> None:
                cancel.set()
                for fut in futures:
                    fut.cancel()
                for downloader in downloaders:
                    downloader.abort()  # a stalled read would wait for its timeout
                # Wait for running workers so no partial file is written after we return.
                wait(futures)

            try:
                while True:
                    done, pending = wait(
                        futures,
                        timeout=None if stop is None else 0.05,
                        return_when=FIRST_EXCEPTION,
                    )
                    if not pending or any(fut.exception() is not None for fut in done):
                        break
                    if stop is not None and stop.is_set():
                        stop_all()
                        raise stopped()
            except DownloadStoppedError:
                raise
            except BaseException:
                # Interrupted here (a run terminated, Ctrl-C): every download stops now, not
                # when it ends or times out.
                stop_all()
                raise
            first_error = next(
                (fut.exception() for fut in futures if fut in done and fut.exception() is not None),
                None,
            )
            if first_error is not None:
                stop_all()
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
        # Environment proxies would resolve the host themselves, defeating the pinned address.
        trust_env=False,
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
        url_policy: UrlPolicy | None = None,
        limits: DownloadLimits | None = None,
        resume: bool = False,
        on_finished: Finished | None = None,
        digest: bool = True,
    ) -> None:
        self.file = file
        self.digest = digest
        self.on_finished = on_finished
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
        self.url_policy = url_policy or UrlPolicy().trusting(api_host)
        self.limits = limits or DownloadLimits()
        self.meter: _GzipMeter | object | None = None
        self.head = b""  # first bytes of the body, to recognise gzip
        self.final_path = dest_dir / file.name
        self.part_path = dest_dir / f"{file.name}.part"
        # What a later attempt needs to resume this .part safely: the validator for If-Range.
        self.meta_path = dest_dir / f"{file.name}.part.json"
        self.resume = resume
        # Resume state: bytes on disk in .part, their running hash, and whether a Range is safe.
        self.offset = 0
        self.hasher = self._new_hasher()
        self.can_resume = False
        self.validator: str | None = None  # ETag / Last-Modified for If-Range
        self.total: int | None = None  # full size according to the server
        self.content_type: str | None = None
        # The response whose body is being read, so a sibling's failure can cut it (abort()).
        # The socket of the request in flight, from its connect on (httpcore's trace hook) or
        # from its answer (a pooled connection): what abort() shuts down.
        self._socket: socket.socket | None = None
        self._socket_lock = threading.Lock()

    # -- helpers -------------------------------------------------------------------------

    def _ctx(self) -> dict[str, Any]:
        return {"provider": self.provider, "export_id": self.export_id, "file": self.file.name}

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise _Cancelled()

    def abort(self) -> None:
        """Stop a read that may be blocked (a host that stalls before it answers or mid-file),
        from another thread, once ``cancel`` is set: the socket is shut down, which wakes the
        blocked read (closing it would not, on Linux). The reader then sees the cancel and
        stops."""
        with self._socket_lock:
            sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace hook (``extensions={"trace": ...}``): a new connection's socket
        is known from its connect on, before any answer."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self._hold_socket(info.get("return_value"))

    def _hold_socket(self, stream: Any) -> None:
        sock = stream.get_extra_info("socket") if stream is not None else None
        if not isinstance(sock, socket.socket):
            return
        with self._socket_lock:
            self._socket = sock
        if self.cancel is not None and self.cancel.is_set():
            self.abort()  # cancelled before the socket was known

    def _new_hasher(self) -> _Hasher | None:
        return hashlib.sha256() if self.digest else None

    def _restart(self) -> None:
        self.offset = 0
        self.hasher = self._new_hasher()
        self.total = None
        self.meter = None
        self.head = b""
        with open(self.part_path, "wb"):
            pass

    def _cleanup(self) -> None:
        for path in (self.part_path, self.meta_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _continue_partial(self) -> bool:
        """Take up the bytes an earlier attempt left in .part, if it said the host resumes."""
        try:
            meta = json.loads(self.meta_path.read_text())
            size = self.part_path.stat().st_size
        except (OSError, ValueError):
            return False
        if not meta.get("accept_ranges") or size == 0:
            return False
        self.offset, self.hasher, self.meter, self.head = 0, self._new_hasher(), None, b""
        with open(self.part_path, "rb") as f:
            # The bytes on disk go through the same hash and the same size and gzip caps as
            # bytes off the wire: the resumed body continues their stream.
            while chunk := f.read(self.chunk_size):
                if self.hasher is not None:
                    self.hasher.update(chunk)
                self.offset += len(chunk)
                self._meter(chunk)
        self.can_resume = True
        self.validator = meta.get("validator")
        log.info("resuming %s at byte %d left by an earlier attempt", self.file.name, size)
        return True

    def _save_meta(self) -> None:
        if not self.resume:
            return
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"accept_ranges": self.can_resume, "validator": self.validator}))
        os.replace(tmp, self.meta_path)

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
            if not (self.resume and self._continue_partial()):
                self._restart()
            return self._attempts(client)
        except _Cancelled:
            # A sibling failed (a dead link, say): the bytes so far serve the next attempt.
            if not (self.resume and self.can_resume):
                self._cleanup()
            raise ExportPipelineError(
                "download cancelled after a sibling failed", **self._ctx()
            ) from None
        except TransientProviderError:
            if not (self.resume and self.can_resume):
                self._cleanup()
            raise
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
                self._hold_socket(response.extensions.get("network_stream"))
                # abort() may have run just before: then the cancel is already set.
                self._check_cancel()
                self._consume(response)
        except httpx.TransportError as exc:  # includes timeouts and a connection cut mid-body
            self._check_cancel()  # cut by abort(): a sibling failed
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        finally:
            # The connection may go back to the pool for another download: not ours to cut.
            with self._socket_lock:
                self._socket = None

    @contextlib.contextmanager
    def _open(self, client: httpx.Client, extra: Mapping[str, str]) -> Iterator[httpx.Response]:
        """GET following redirects by hand; credentials only ever go to the API host."""
        url = httpx.URL(self.file.url)
        for _ in range(self.max_redirects + 1):
            try:
                target = self.url_policy.check(url)
            except UrlRefused as exc:
                raise UnsafeUrlError(
                    str(exc),
                    hint="the provider sent a link we will not follow; if the host is "
                    "legitimate, add it to sync_settings.allowed_download_hosts",
                    **self._ctx(),
                ) from None
            except UrlUnresolvable as exc:
                raise httpx.ConnectError(str(exc)) from None
            # Connect to the checked address; the name stays in Host and in TLS SNI. The
            # connection pool is keyed by address, so an https connection is not kept for
            # reuse: another name on the same address must get its own TLS handshake (SNI and
            # certificate check for *that* name).
            pinned_headers = {**extra, "Host": url.netloc.decode("ascii")}
            if url.scheme == "https":
                pinned_headers["Connection"] = "close"
            extensions: dict[str, Any] = {"trace": self._trace}
            if url.scheme == "https":
                extensions["sni_hostname"] = url.host
            request = client.build_request(
                "GET",
                target.pinned_url(),
                headers=pinned_headers,
                timeout=self.timeout,
                extensions=extensions,
            )
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
                with self._socket_lock:
                    self._socket = None  # back in the pool: the next hop's socket is noted
                try:
                    url = url.join(response.headers["location"])
                except (httpx.InvalidURL, ValueError):
                    raise UnsafeUrlError(
                        "download: redirect to an invalid URL", **self._ctx()
                    ) from None
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
        if status == 416 and self.offset:
            # Asked to resume at or past the end: the .part may hold the whole file already.
            match = _UNSATISFIED_RANGE.match(response.headers.get("content-range", ""))
            if match and int(match.group(1)) == self.offset:
                self.total = self.offset
                return
            self.can_resume = False
            raise _Retry(f"range from byte {self.offset} not satisfiable; starting over")
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
        cap = self.limits.max_file_bytes
        if cap is not None and self.total is not None and self.total > cap:
            raise LimitExceededError(
                f"file host announces {self.total} bytes, over max_file_bytes={cap}; "
                "not downloaded",
                hint="raise sync_settings.max_download_bytes if the file is expected",
                **self._ctx(),
            )
        self.can_resume = response.headers.get("accept-ranges", "").strip().lower() == "bytes"
        self.validator = response.headers.get("etag") or response.headers.get("last-modified")
        if self.validator and self.validator.startswith("W/"):
            self.validator = None  # weak ETags are not allowed in If-Range
        self.content_type = response.headers.get("content-type")
        self._save_meta()
        with open(self.part_path, "ab") as out:
            # As the bytes arrive, not re-chunked: httpx would hold back up to chunk_size bytes
            # that a cut connection then loses, and the resume would start before them.
            for chunk in response.iter_raw():
                self._check_cancel()
                out.write(chunk)
                if self.hasher is not None:
                    self.hasher.update(chunk)
                self.offset += len(chunk)
                if self.progress is not None:
                    self.progress(self.file.name, self.offset, self.total)
                self._meter(chunk)
                out.flush()
                fault_point("download")
        if self.total is not None and self.offset < self.total:
            raise _Retry(f"body ended at byte {self.offset} of {self.total}")

    def _meter(self, chunk: bytes) -> None:
        """Enforce the size caps on bytes as they arrive (raw, and inflated when gzip)."""
        cap = self.limits.max_file_bytes
        if cap is not None and self.offset > cap:
            raise LimitExceededError(
                f"download passed max_file_bytes={cap}; stopped",
                hint="raise sync_settings.max_download_bytes if the file is expected",
                **self._ctx(),
            )
        if self.meter is _NOT_GZIP:
            return
        if self.meter is None:
            # Bytes arrive in order (a resumed body continues the same stream), so the first
            # bytes of the file decide whether it is gzip; until then they are kept (a few).
            self.head += chunk
            if len(self.head) < len(_GZIP_MAGIC):
                return
            if not self.head.startswith(_GZIP_MAGIC):
                self.meter, self.head = _NOT_GZIP, b""
                return
            self.meter = _GzipMeter(self.limits)
            chunk, self.head = self.head, b""
        self._feed(chunk)

    def _feed(self, data: bytes) -> None:
        assert isinstance(self.meter, _GzipMeter)
        problem = self.meter.feed(data)
        if problem:
            raise LimitExceededError(
                f"gzip body refused: it {problem}",
                hint="a decompression bomb, or a file larger than the caps allow (raise "
                "sync_settings.max_decompressed_bytes / max_expansion_ratio if expected)",
                **self._ctx(),
            )

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
        with contextlib.suppress(FileNotFoundError):
            self.meta_path.unlink()
        done = DownloadedFile(
            name=self.file.name,
            path=self.final_path,
            size_bytes=self.offset,
            sha256=self.hasher.hexdigest() if self.hasher is not None else None,
            content_type=self.content_type,
        )
        return self.on_finished(done) if self.on_finished is not None else done
