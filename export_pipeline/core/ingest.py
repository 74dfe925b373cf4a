"""request -> track -> fetch -> normalise -> load, for any provider. No Dagster here.

:class:`ExportRunner` is what the Dagster assets, sensors and the demo call. Every step writes
the ledger, so a crash at any point leaves a record that the next run or sensor tick adopts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import psutil

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportClaimedError,
    ExportExpiredError,
    ExportFailedError,
    ExportInFlightError,
    ExportLostError,
    ExportNotReadyError,
    ExportPipelineError,
    ExportTimeoutError,
    IntegrityError,
    LinkExpiredError,
    ParseError,
    ProviderRejectedError,
)
from export_pipeline.core.faults import fault_point
from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.ledger import ExportRecord, Ledger
from export_pipeline.core.load import PARTITION_MISMATCH, LoadResult, ensure_views, load_parquet
from export_pipeline.core.model import (
    ExportApi,
    ExportKind,
    ExportRequest,
    ExportState,
    ExportStatus,
)
from export_pipeline.core.netpolicy import UrlPolicy
from export_pipeline.core.normalise import (
    FileSink,
    NormaliseResult,
    detect_format,
    to_parquet,
)
from export_pipeline.core.redact import get_logger
from export_pipeline.core.stage import StagedLoad
from export_pipeline.core.storage import Flusher, LocalStorage, Storage
from export_pipeline.core.transfer import (
    BackgroundDigests,
    DownloadedFile,
    DownloadLimits,
    download_files,
)
from export_pipeline.core.warehouse import DuckDBWarehouse
from export_pipeline.core.windows import next_cursor

log = get_logger(__name__)  # redacts secrets from every message

POISON_BUDGET = 3
# Failures another attempt at the same export cannot fix by itself: they count against the
# export's poison budget. (LinkExpiredError reaches here only once fresh links were fetched and
# still failed.)
PERMANENT_FAILURES: tuple[type[ExportPipelineError], ...] = (
    ParseError,
    IntegrityError,
    LinkExpiredError,
    ProviderRejectedError,
)
# Attempts currently running in this process: their work dirs are not leftovers.
_ACTIVE_ATTEMPTS: set[str] = set()
_HOST = socket.gethostname()


def new_owner(run_id: str | None = None) -> str:
    """``<run id>@<host>:<pid>``: who holds a lease, and how to tell it died on this host."""
    return f"{run_id or 'local-' + uuid.uuid4().hex[:8]}@{_HOST}:{os.getpid()}"


def owner_is_dead(owner: str) -> bool:
    """True only when certain: the owner ran on this host and its process is gone."""
    _, _, where = owner.rpartition("@")
    host, _, pid = where.rpartition(":")
    if host != _HOST or not pid.isdigit():
        return False  # another machine: only the lease expiry can tell
    if int(pid) == os.getpid():
        return False
    try:
        return psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _attempt_owner_dead(attempt: str) -> bool:
    """Attempt ids are ``<stamp>-<pid>-<random>`` made on this host (work dirs are local)."""
    if attempt in _ACTIVE_ATTEMPTS:
        return False
    parts = attempt.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return True  # this process, but not a running attempt: a failed one's leftovers
    return owner_is_dead(f"x@{_HOST}:{pid}")


@dataclass(frozen=True)
class IngestSettings:
    poll_initial_seconds: float = 1.0
    poll_max_seconds: float = 30.0
    wait_timeout_seconds: float = 900.0
    # Parts of a multi-part export downloaded at once. Two, not one per part: parts then land
    # in pairs, and the first ones are parsed while the rest download (parse_while_downloading);
    # all at once, every part lands at the end (docs/benchmarks.md).
    download_concurrency: int = 2
    # How often a dead signed link is replaced by asking the provider again.
    link_refreshes: int = 2
    # How often a truly expired export is requested anew (same window) within one sync.
    re_requests_on_expiry: int = 1
    # Fail before committing when the rows read differ from the provider's announced count.
    verify_row_count: bool = True
    # DuckDB's memory cap for normalising and for the load transaction. Beyond it DuckDB spills
    # or evicts; without it the load keeps every block it wrote cached (up to 80% of RAM), so
    # the worker's memory would grow with the export.
    duckdb_memory_limit: str = "400MB"
    # DuckDB file on local storage: load each finished Parquet file into the warehouse while the
    # next is parsed, in the load's transaction (core/stage.py). The write lock is then held
    # from the first finished file, not only for the load.
    stage_while_parsing: bool = True
    # A multi-part export: parse each part as soon as it has landed, while the later parts
    # download (they then come in order, ``download_concurrency`` at a time).
    parse_while_downloading: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Which hosts provider-supplied URLs may reach (public only unless allowed) and how big a
    # file may be; see core.netpolicy and transfer.DownloadLimits.
    url_policy: UrlPolicy = field(default_factory=UrlPolicy)
    download_limits: DownloadLimits = field(default_factory=DownloadLimits)
    # Permanent failures (parse, integrity, a link still dead after fresh ones) an export may
    # cause before it is retired (FAILED) and the next run requests a new one. The sensor
    # relaunches a failed ingest at most this many times too (defs/sensors.py).
    poison_budget: int = POISON_BUDGET
    # One run at a time works on an export: the lease it takes in the ledger lasts this long
    # and is renewed at every step; a run that died loses it at expiry (at once on this host,
    # where a dead process id is seen).
    lease_seconds: float = 1200.0
    # A run meeting an export another live run holds waits this long for it (it is usually
    # loaded meanwhile, and then this run has nothing to do), then stops naming the holder.
    claim_wait_seconds: float = 300.0
    claim_poll_seconds: float = 2.0


@dataclass(frozen=True)
class IngestResult:
    provider: str
    kind: str
    export_id: str
    partition_key: str
    skipped: bool  # True when the export had already been loaded (idempotent re-run)
    rows: int = 0
    bytes_downloaded: int = 0
    files: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    parquet_paths: tuple[Path, ...] = ()
    columns: tuple[tuple[str, str], ...] = ()
    # Declared columns the export's files lack (reported, not invented), and declared columns
    # read as another type because a value did not fit (docs/schema.md).
    missing_columns: tuple[str, ...] = ()
    drifted_columns: tuple[tuple[str, str], ...] = ()
    seconds: float = 0.0
    expected_rows: int | None = None
    cursor: datetime | None = None
    load: LoadResult | None = None
    raw_uri: str | None = None
    parquet_uri: str | None = None
    adopted: bool = False
    requested: ExportRequest | None = None
    reused_files: tuple[str, ...] = ()  # verified raw files re-read instead of downloaded
    waited_for: str | None = None  # the run that held the export while this one waited
    snapshot_id: int | None = None  # the DuckLake snapshot of this load (time travel)


class ExportRunner:
    """Drives one provider's exports through the pipeline, recording each step in the ledger."""

    def __init__(
        self,
        provider: ExportApi,
        ledger: Ledger,
        storage: Storage,
        settings: IngestSettings | None = None,
        *,
        logger: logging.Logger | None = None,
        sleep: Callable[[float], None] = time.sleep,
        owner: str | None = None,
    ) -> None:
        self.provider = provider
        # Who this runner is in the ledger's leases: the Dagster run id, host and process.
        self.owner = owner if owner and "@" in owner else new_owner(owner)
        self.ledger = ledger
        self.storage = storage
        self.settings = settings or IngestSettings()
        self.log = logger or log
        self._sleep = sleep

    @property
    def name(self) -> str:
        return self.provider.name

    # -- request / track ---------------------------------------------------------------

    def start(
        self, kind: ExportKind, request: ExportRequest, *, source: str = "run", adopt: bool = True
    ) -> tuple[ExportRecord, bool]:
        """Request an export, or adopt one of the same kind that is still open in the ledger.

        Returns the ledger record and whether it was adopted. Adopting is what lets a restarted
        run or sensor carry on with an export instead of asking (and paying) again.
        """
        if adopt:
            wanted = _params(request.params)
            open_ = [
                r
                for r in self.ledger.open_exports(
                    self.name, kind=kind.name, partition_key=request.partition or ""
                )
                # Its rows were seen to belong to another partition (a wrong export id given
                # for this one): adopting it again could only fail the same way.
                if r.error_code != PARTITION_MISMATCH
                # Another format (say) was asked for: that export is not what this run wants.
                and _params(r.request_params) == wanted
            ]
            if open_:
                record = open_[-1]
                self.log.info(
                    "adopting open %s export %s (state %s) instead of requesting a new one",
                    kind.key,
                    record.export_id,
                    record.state,
                )
                return record, True
        try:
            status = self.provider.request_export(kind, request)
        except ExportInFlightError as exc:
            raise ExportInFlightError(
                f"{kind.key}: the provider is already producing an export of this kind that "
                "this pipeline did not start (another client?)",
                provider=self.name,
                kind=kind.name,
                hint="it will be retried later; nothing was changed",
            ) from exc
        record = self.ledger.record_request(kind, request, status, source=source)
        fault_point("request")
        self.log.info(
            "requested %s export %s (%s), window %s",
            kind.key,
            record.export_id,
            status.state,
            describe_window(request),
        )
        return record, False

    def refresh(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        """Ask the provider about many exports (batched by the provider) and record the answers."""
        if not export_ids:
            return {}
        statuses = self.provider.get_statuses(list(export_ids))
        self.ledger.apply_statuses(self.name, list(statuses.values()))
        return statuses

    def status(self, export_id: str) -> ExportStatus:
        status = self.refresh([export_id]).get(export_id)
        if status is None:
            status = ExportStatus(export_id=export_id, state=ExportState.LOST)
            self.ledger.apply_status(self.name, status)
        return status

    def wait_until_ready(
        self, kind: ExportKind, export_id: str, *, timeout: float | None = None
    ) -> ExportStatus:
        """Poll with growing pauses until the export is READY; raise on a terminal state."""
        timeout = self.settings.wait_timeout_seconds if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = self.settings.poll_initial_seconds
        started = time.monotonic()
        seen: tuple[ExportState, str | None] | None = None
        while True:
            status = self.status(export_id)
            if (status.state, status.provider_status) != seen:
                seen = (status.state, status.provider_status)
                self.log.info(
                    "%s export %s is %s%s after %.1fs",
                    kind.key,
                    export_id,
                    status.state,
                    f" ({status.provider_status})" if status.provider_status else "",
                    time.monotonic() - started,
                )
            fault_point("poll")
            if status.state is ExportState.READY:
                return status
            self._raise_for_terminal(kind, status)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ExportTimeoutError(
                    f"export still {status.state} after waiting {timeout:.0f}s",
                    provider=self.name,
                    kind=kind.name,
                    export_id=export_id,
                    hint="it stays in the ledger; the sensor ingests it once it is ready",
                )
            self._sleep(min(delay, remaining))
            delay = min(delay * 1.5, self.settings.poll_max_seconds)

    def _raise_for_terminal(self, kind: ExportKind, status: ExportStatus) -> None:
        # The provider's own code (e.g. NOT_FOUND) and request id travel with the error: the
        # ledger records them and users quote the request id to the provider's support.
        request_id = status.detail.get("request_id") if status.detail else None
        common = {
            "provider": self.name,
            "kind": kind.name,
            "export_id": status.export_id,
            "code": status.error_code,
            "request_id": str(request_id) if request_id else None,
        }
        if status.state is ExportState.FAILED:
            raise ExportFailedError(
                f"the provider failed the export: {status.error_message or 'no message'}",
                hint="see the provider's message; request a new export once it is fixed",
                **common,
            )
        if status.state is ExportState.EXPIRED:
            raise ExportExpiredError(
                "the export expired before it was loaded",
                hint="request the same export again",
                **common,
            )
        if status.state is ExportState.LOST:
            raise ExportLostError(
                "the provider does not know this export id",
                hint="request the same export again",
                **common,
            )

    # -- fetch / normalise / load ------------------------------------------------------

    def ingest(
        self,
        kind: ExportKind,
        export_id: str,
        *,
        partition_key: str = "",
        source: str = "run",
    ) -> IngestResult:
        """Load one export. Confirms the status with the provider first (a webhook or a sensor
        saw it READY, but only the provider's current answer counts) and is idempotent: an
        export already LOADED is skipped, also when a concurrent run loaded it meanwhile."""
        t0 = time.perf_counter()
        record = self.ledger.get(self.name, export_id)
        if record is None:
            # An id we did not request (config, webhook, another client): adopt it.
            status = self.status_unrecorded(export_id)
            record = self.ledger.record_request(
                kind, ExportRequest(partition=partition_key or None), status, source=source
            )
        if record.kind != kind.name:
            raise ExportPipelineError(
                f"export belongs to {record.provider}/{record.kind}, not {kind.key}",
                provider=self.name,
                kind=kind.name,
                export_id=export_id,
            )
        if partition_key and record.partition_key != partition_key:
            if record.state is ExportState.LOADED:
                raise ConfigurationError(
                    f"export was already loaded into partition {record.partition_key!r}; "
                    f"this run is for partition {partition_key!r}",
                    provider=self.name,
                    kind=kind.name,
                    export_id=export_id,
                    hint="materialize the partition the export belongs to, or leave export_id "
                    "empty to request a new export for this one",
                )
            # Not loaded yet: the run names the partition (a user's config, a sensor's request)
            # and the load checks every row against it, so a wrong one loads nothing. Keeping the
            # ledger's earlier guess instead would pin the export to a wrong partition for good.
            record = replace(record, partition_key=partition_key)
        if record.state is ExportState.LOADED:
            return self._skipped(kind, record)
        if record.state is ExportState.FAILED:
            # Terminal in the ledger (the provider failed it, or its files contradicted the
            # announcement): loading it now would accept data we already judged wrong.
            raise ExportFailedError(
                f"export was given up earlier ({record.error_code}: {record.error_message})",
                provider=self.name,
                kind=kind.name,
                export_id=record.export_id,
                code=record.error_code,
                hint="request a new export (run without export_id)",
            )
        waited = self._claim(kind, record)
        if isinstance(waited, IngestResult):
            return waited
        try:
            return replace(self._ingest(kind, record, t0), waited_for=waited)
        except ExportClaimedError:
            raise  # the holder's record is its own: nothing to note here
        except ExportPipelineError as exc:
            if exc.export_id is None:  # e.g. load errors, which do not know the export id
                exc.export_id = export_id
            self._note_failure(exc, export_id)
            raise
        except (duckdb.ConversionException, duckdb.InvalidInputException) as exc:
            # A value the table's types cannot take: the same files fail the same way.
            self.ledger.record_permanent_failure(
                self.name,
                export_id,
                code=type(exc).__name__,
                message=str(exc),
                budget=self.settings.poison_budget,
                owner=self.owner,
            )
            raise
        except Exception as exc:
            self.ledger.record_error(
                self.name, export_id, code=type(exc).__name__, message=str(exc)
            )
            raise
        finally:
            self.ledger.release(self.name, export_id, self.owner)

    def _claim(self, kind: ExportKind, record: ExportRecord) -> str | IngestResult | None:
        """Take the export's lease before touching its files.

        Another live run holding it is waited for (``claim_wait_seconds``): it usually loads
        the export meanwhile, and then there is nothing left to do here (a skipped result).
        Returns the holder waited for (None if none), or that skipped result. A holder whose
        lease expired, or whose process is gone, is taken over.
        """
        deadline = time.monotonic() + self.settings.claim_wait_seconds
        waited: str | None = None
        while True:
            lease = self.ledger.claim(
                self.name,
                record.export_id,
                self.owner,
                ttl_seconds=self.settings.lease_seconds,
                is_dead=owner_is_dead,
            )
            if lease.granted:
                if lease.taken_over_from:
                    self.log.warning(
                        "%s export %s: took over the claim of run %s (its lease expired or "
                        "its process is gone)",
                        kind.key,
                        record.export_id,
                        lease.taken_over_from,
                    )
                return waited
            current = self.ledger.get(self.name, record.export_id)
            if current is not None and current.state is ExportState.LOADED:
                self.log.info(
                    "%s export %s was loaded by run %s while this run waited",
                    kind.key,
                    record.export_id,
                    lease.owner,
                )
                return replace(self._skipped(kind, current), waited_for=lease.owner)
            if current is not None and current.state.is_terminal:
                raise ExportFailedError(
                    f"export was given up while this run waited ({current.error_code}: "
                    f"{current.error_message})",
                    provider=self.name,
                    kind=kind.name,
                    export_id=record.export_id,
                    code=current.error_code,
                    hint="request a new export (run without export_id)",
                )
            remaining = deadline - time.monotonic()
            holder = _describe_owner(lease.owner)
            if remaining <= 0:
                raise ExportClaimedError(
                    f"export is being ingested by {holder} (its claim lasts until "
                    f"{lease.expires_at:%Y-%m-%d %H:%M:%S} UTC); this run stopped after "
                    f"waiting {self.settings.claim_wait_seconds:.0f}s",
                    provider=self.name,
                    kind=kind.name,
                    export_id=record.export_id,
                    code="EXPORT_CLAIMED",
                    hint="nothing to do: that run loads it. If that run is dead, its claim "
                    "lapses at the time above (or run `export-pipeline exports abandon`)",
                )
            if waited is None:
                self.log.info(
                    "%s export %s is being ingested by %s; waiting up to %.0fs for it",
                    kind.key,
                    record.export_id,
                    holder,
                    remaining,
                )
            waited = lease.owner
            self._sleep(min(self.settings.claim_poll_seconds, remaining))

    def _renew(
        self, kind: ExportKind, export_id: str, con: duckdb.DuckDBPyConnection | None = None
    ) -> None:
        """Extend the lease at each step; losing it (expired and taken over) stops this run
        before it publishes anything over the new holder's work. With ``con``, inside that
        open transaction (the staged load's: a commit beside it costs its COMMIT ~1 s)."""
        lease = self.ledger.claim(
            self.name, export_id, self.owner, ttl_seconds=self.settings.lease_seconds, con=con
        )
        if not lease.granted:
            raise ExportClaimedError(
                f"this run's claim lapsed and {_describe_owner(lease.owner)} took the export "
                "over; stopping without publishing",
                provider=self.name,
                kind=kind.name,
                export_id=export_id,
                code="EXPORT_CLAIMED",
                hint=f"raise lease_seconds (now {self.settings.lease_seconds:.0f}s) if steps "
                "take longer than that",
            )

    def status_unrecorded(self, export_id: str) -> ExportStatus:
        statuses = self.provider.get_statuses([export_id])
        return statuses.get(export_id) or ExportStatus(export_id=export_id, state=ExportState.LOST)

    def _note_failure(self, exc: ExportPipelineError, export_id: str) -> None:
        # An export whose files cannot be read or contradict the provider's announcement
        # rarely gets better on another attempt; leaving it open for good would make every
        # later run adopt it and fail the same way. Past its poison budget it is given up
        # (FAILED) and the next run asks anew; before that a fixed cause (a new release of
        # this pipeline, a provider that repaired its file) still gets a chance.
        state = {
            ExportFailedError: ExportState.FAILED,
            ExportExpiredError: ExportState.EXPIRED,
            ExportLostError: ExportState.LOST,
        }.get(type(exc))
        if exc.code == PARTITION_MISMATCH:
            state = None  # the run named the wrong partition; the export itself is fine
        elif isinstance(exc, PERMANENT_FAILURES):
            record = self.ledger.record_permanent_failure(
                self.name,
                export_id,
                code=exc.code or type(exc).__name__,
                message=str(exc),
                budget=self.settings.poison_budget,
                owner=self.owner,
            )
            if record is not None and record.state is ExportState.FAILED:
                self.log.error(
                    "export %s retired after %d permanent failure(s); the next run requests "
                    "a new export (its files stay for inspection: retention.failed_days)",
                    export_id,
                    record.permanent_failures,
                )
            return
        self.ledger.record_error(
            self.name,
            export_id,
            code=exc.code or type(exc).__name__,
            message=str(exc),
            state=state,
            # "Not ready yet" is a refusal, not a failed ingest: it must not use up the
            # sensor's relaunch attempts.
            count_attempt=not isinstance(exc, ExportNotReadyError),
        )

    def _skipped(self, kind: ExportKind, record: ExportRecord) -> IngestResult:
        self.log.info("%s export %s is already loaded; nothing to do", kind.key, record.export_id)
        return IngestResult(
            provider=self.name,
            kind=kind.name,
            export_id=record.export_id,
            partition_key=record.partition_key,
            skipped=True,
            rows=record.rows_loaded or 0,
            expected_rows=record.expected_rows,
            raw_uri=record.raw_uri,
            parquet_uri=record.parquet_uri,
        )

    def _ingest(self, kind: ExportKind, record: ExportRecord, t0: float) -> IngestResult:
        export_id = record.export_id
        status = self.status(export_id)
        if status.state in (ExportState.PENDING, ExportState.PROCESSING):
            not_ready = ExportNotReadyError(
                f"export is {status.state}, not ready to download",
                provider=self.name,
                kind=kind.name,
                export_id=export_id,
                hint="wait for it (the sensor launches the ingest when it is ready)",
            )
            # Still being produced (an ingest by id, e.g. a user's config): say so now instead
            # of holding a worker through step retries that end in "Exceeded max_retries". The
            # export stays open in the ledger and the sensor launches its ingest once READY.
            # (EXPORT_NOT_READY met at download time, after the status said ready, stays
            # retryable: that one is the provider's file store lagging by moments.)
            not_ready.retryable = False
            raise not_ready
        self._raise_for_terminal(kind, status)

        attempt = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        _ACTIVE_ATTEMPTS.add(attempt)
        work = self.storage.work_dir(kind, export_id, attempt)
        try:
            with (
                self._staged_load(kind, work) as staged,
                self._flusher() as flusher,
                BackgroundDigests() as digests,
            ):
                return self._ingest_attempt(
                    kind, record, status, work, t0, staged, flusher, digests
                )
        finally:
            _ACTIVE_ATTEMPTS.discard(attempt)
            # Only this attempt's own directory; verified raw files were moved out of it, and
            # an unfinished .part of a resumable download stays for the next attempt.
            self._discard_work(work)

    def _discard_work(self, work: Path) -> None:
        keep = [p for p in (work / "raw").glob("*.part*")] if (work / "raw").is_dir() else []
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                work.parent.rmdir()  # the export's work dir, once no attempt is left in it
            return
        shutil.rmtree(work / "parquet", ignore_errors=True)

    def _staged_load(
        self, kind: ExportKind, work: Path
    ) -> contextlib.AbstractContextManager[StagedLoad | None]:
        warehouse = self.ledger.warehouse
        if (
            self.settings.stage_while_parsing
            and isinstance(warehouse, DuckDBWarehouse)
            and isinstance(self.storage, LocalStorage)
        ):
            return StagedLoad(
                warehouse, kind, work / "stage", memory_limit=self.settings.duckdb_memory_limit
            )
        return contextlib.nullcontext()

    def _flusher(self) -> contextlib.AbstractContextManager[Flusher | None]:
        # Local files are published by an fsync (so are their tiers' files on the local disk);
        # remote tiers are durable once uploaded.
        return Flusher() if isinstance(self.storage, LocalStorage) else contextlib.nullcontext()

    def _ingest_attempt(
        self,
        kind: ExportKind,
        record: ExportRecord,
        status: ExportStatus,
        work: Path,
        t0: float,
        staged: StagedLoad | None,
        flusher: Flusher | None,
        digests: BackgroundDigests,
    ) -> IngestResult:
        export_id = record.export_id
        raw_dir = self.storage.local_dir("raw", kind, export_id)  # verified files only
        work_raw = work / "raw"
        parquet_dir = work / "parquet"
        work_raw.mkdir(parents=True, exist_ok=True)
        parquet_dir.mkdir(parents=True, exist_ok=True)
        self._adopt_partials(work, work_raw)

        # A multi-part export is parsed part by part as the parts land (``arriving``), while
        # the later ones download on a thread of their own; a lone file is parsed once there.
        landing = (
            _Landing([raw_dir / f.name for f in status.files], digests)
            if self.settings.parse_while_downloading and len(status.files) > 1
            else None
        )
        loaded_at = datetime.now(UTC)
        fetching: Future[tuple[list[DownloadedFile], ExportStatus, list[str]]] | None = None
        refreshed: ExportStatus | None = None
        with ThreadPoolExecutor(1, thread_name_prefix="fetch") as pool:
            if landing is None:
                downloaded, status, reused = self._fetch(kind, status, raw_dir, work_raw, flusher)
                self._renew(kind, export_id)
                for f in downloaded:
                    digests.add(f.path)  # for the ledger, beside the parse (BackgroundDigests)
                sources = [f.path for f in downloaded]
            else:
                fetching = pool.submit(
                    self._fetch, kind, status, raw_dir, work_raw, flusher, landing
                )
                sources = landing.paths
                self.log.info(
                    "%s export %s: parsing each of %d parts as it lands (%d downloading at once)",
                    kind.key,
                    export_id,
                    len(sources),
                    min(self.settings.download_concurrency, len(sources)),
                )
            try:
                normalised = self._normalise(
                    kind, export_id, sources, parquet_dir, loaded_at, staged, flusher, landing
                )
            except _DownloadStopped as stopped:
                assert fetching is not None
                fetching.result()  # the download's own error, not the parse's
                raise _files_changed(kind, export_id) from stopped
            except BaseException:
                if landing is not None:
                    # Failed first, or interrupted (a run terminated): the download stops now,
                    # not when it ends; landed parts stay, unfinished ones keep their .part.
                    landing.halt.set()
                raise
            if fetching is not None:
                asked = status
                downloaded, status, reused = fetching.result()
                refreshed = status if status is not asked else None
                if [f.path for f in downloaded] != sources:
                    raise _files_changed(kind, export_id)
                # (The lease is renewed next, in the staged transaction: one open since the
                # first part landed would conflict with a renewal beside it.)
        self.log.info(
            "%s export %s: parsed %d rows from %d file(s) into Parquet",
            kind.key,
            export_id,
            normalised.rows,
            len(downloaded),
        )
        fault_point("parquet")
        if (
            self.settings.verify_row_count
            and status.expected_rows is not None
            and normalised.rows != status.expected_rows
        ):
            raise IntegrityError(
                f"read {normalised.rows} rows but the provider announced {status.expected_rows}",
                provider=self.name,
                kind=kind.name,
                export_id=export_id,
                hint="the export is incomplete or the provider miscounted; nothing was loaded",
            )
        readback_dir = work / "published"
        # The staged transaction, when it holds exactly the export's files (else rolled back).
        staged_con = staged.take(normalised.parquet_paths) if staged is not None else None
        if refreshed is not None:
            # The fresh links' status the download asked for (not recorded on its thread).
            self.ledger.apply_status(self.name, refreshed, con=staged_con)
        self._renew(kind, export_id, staged_con)
        raw_uri = self.storage.publish("raw", kind, export_id, raw_dir)
        parquet_uri = self.storage.publish("parquet", kind, export_id, parquet_dir)
        written = [Path(parquet_uri) / p.name for p in normalised.parquet_paths]
        if not isinstance(self.storage, LocalStorage):
            written = list(normalised.parquet_paths)
        load_paths = self._published_parquet(kind, export_id, parquet_uri, written, readback_dir)
        cursor = next_cursor(kind, record.request, status.provider_timestamp)
        sums = digests.result([f.path for f in downloaded])
        files = [
            {
                "name": f.name,
                "announced_bytes": remote.size_bytes,
                "size_bytes": f.size_bytes,
                "sha256": sums[f.path],
            }
            for f, remote in zip(downloaded, status.files, strict=True)
        ]
        warehouse = self.ledger.warehouse

        def load_in(con: duckdb.DuckDBPyConnection, staged_table: str | None) -> LoadResult | None:
            """The load transaction's work; None when the export is loaded already."""
            limit = self.settings.duckdb_memory_limit.replace("'", "''")
            con.execute(f"SET memory_limit = '{limit}'")
            if self.ledger.is_loaded(con, self.name, export_id):
                # Another run (a webhook-triggered one, say) committed it while we downloaded.
                return None
            load = load_parquet(
                con,
                kind,
                load_paths,
                partition_value=record.partition_key or None,
                staged=staged_table,
                keys_unique=staged.keys_unique if staged is not None and staged_table else None,
            )
            warehouse.note_table_files(con, kind.schema, kind.name, load.table_files)
            ensure_views(con, kind)
            fault_point("merge")
            self.ledger.mark_loaded(
                con,
                kind,
                export_id,
                rows=normalised.rows,
                bytes_downloaded=sum(f.size_bytes for f in downloaded),
                raw_uri=raw_uri,
                parquet_uri=parquet_uri,
                files=files,
                cursor_value=cursor,
                partition_key=record.partition_key,
            )
            warehouse.label_commit(
                con,
                f"load {kind.key} export {export_id}",
                schema=kind.schema,
                provider=self.name,
                kind=kind.name,
                export_id=export_id,
                partition_key=record.partition_key,
            )
            return load

        # One transaction: data, ledger and cursor (on DuckLake: one snapshot). Staged while
        # parsing, it is the transaction the staging opened; else a commit that collides with
        # another writer's runs again whole, re-checking is_loaded first.
        if staged is not None and staged_con is not None:
            try:
                loaded = load_in(staged_con, staged.table)
            except BaseException as exc:
                staged.rollback(exc)
                raise
            staged.commit()
        else:
            for attempt in warehouse.transactions():
                with attempt as con:
                    loaded = load_in(con, None)
        if loaded is None:
            return self._skipped(kind, record)
        load = loaded
        fault_point("commit")
        if not isinstance(self.storage, LocalStorage):
            # Remote tiers: keep this worker's copy of the loaded Parquet in the local cache
            # (previews, a rebuild on this machine); the work dir goes away.
            cache = self.storage.local_dir("parquet", kind, export_id)
            for path in written:
                os.replace(path, cache / path.name)
            written = [cache / path.name for path in written]
        self.log.info(
            "%s export %s: loaded %d rows into %s (%d inserted, %d updated, %d deleted; "
            "table has %d rows)%s",
            kind.key,
            export_id,
            normalised.rows,
            kind.table,
            load.rows_inserted,
            load.rows_updated,
            load.rows_deleted,
            load.table_rows,
            "; loaded while parsing" if staged_con is not None else "",
        )
        return IngestResult(
            provider=self.name,
            kind=kind.name,
            export_id=export_id,
            partition_key=record.partition_key,
            skipped=False,
            rows=normalised.rows,
            bytes_downloaded=sum(f.size_bytes for f in downloaded),
            files=tuple(f.name for f in downloaded),
            formats=tuple(
                sorted({_format_label(detect_format(f.path, f.content_type)) for f in downloaded})
            ),
            parquet_paths=tuple(written),
            columns=tuple(normalised.columns),
            missing_columns=tuple(normalised.missing_columns),
            drifted_columns=tuple(normalised.drifted_columns.items()),
            seconds=time.perf_counter() - t0,
            expected_rows=status.expected_rows,
            cursor=cursor,
            load=load,
            snapshot_id=warehouse.last_committed_snapshot(),
            raw_uri=raw_uri,
            parquet_uri=parquet_uri,
            requested=record.request,
            reused_files=tuple(reused),
        )

    def _normalise(
        self,
        kind: ExportKind,
        export_id: str,
        sources: list[Path],
        parquet_dir: Path,
        loaded_at: datetime,
        staged: StagedLoad | None,
        flusher: Flusher | None,
        landing: _Landing | None,
    ) -> NormaliseResult:
        try:
            return to_parquet(
                sources,
                parquet_dir,
                kind=kind,
                export_id=export_id,
                loaded_at=loaded_at,
                memory_limit=self.settings.duckdb_memory_limit,
                on_file=_told(staged, flusher),
                slots=staged.slots if staged is not None else None,
                arriving=landing.wait if landing is not None else None,
            )
        except (ExportPipelineError, OSError, MemoryError, _DownloadStopped):
            raise
        except Exception as exc:
            # A file shape the reader does not handle: reading the same verified files again
            # fails the same way, so it is a parse failure of this export (it counts against
            # the poison budget) rather than an anonymous crash that keeps the export open.
            raise ParseError(
                f"cannot read the export's files ({type(exc).__name__}: {exc})",
                provider=self.name,
                kind=kind.name,
                export_id=export_id,
                file=sources[0].name if len(sources) == 1 else None,
                hint="the files are kept in the raw tier for inspection; nothing was loaded",
            ) from exc

    def _adopt_partials(self, work: Path, work_raw: Path) -> None:
        """Move the unfinished downloads of dead attempts at this export into this attempt, so
        the download resumes from the bytes on disk instead of byte 0. Only attempts whose
        process is gone (or finished in this one) are touched: a live run's files are its own."""
        for sibling in sorted(work.parent.iterdir()):
            if sibling == work or not sibling.is_dir() or not _attempt_owner_dead(sibling.name):
                continue
            for part in (sibling / "raw").glob("*.part"):
                meta = part.with_name(part.name + ".json")
                target = work_raw / part.name
                if meta.exists() and (
                    not target.exists() or part.stat().st_size > target.stat().st_size
                ):
                    os.replace(part, target)
                    os.replace(meta, work_raw / meta.name)
            shutil.rmtree(sibling, ignore_errors=True)

    def _published_parquet(
        self,
        kind: ExportKind,
        export_id: str,
        parquet_uri: str,
        written: Sequence[Path],
        readback_dir: Path,
    ) -> list[Path]:
        """The Parquet files to load: what was *published*, not this worker's working copy.

        Local storage publishes in place, so the written files are the published ones. Remote
        storage (S3) is read back into a fresh directory: the table is then built from exactly
        the objects ``parquet_uri`` names (what a rebuild or another worker would read), and
        a missing or truncated upload fails here, before the ledger says LOADED. The cost is
        one download of the (compressed) Parquet per export.
        """
        if isinstance(self.storage, LocalStorage):
            return list(written)
        fetched = self.storage.fetch(parquet_uri, readback_dir)
        want = {p.name: p.stat().st_size for p in written}
        got = {p.name: p.stat().st_size for p in fetched}
        if got != want:
            differing = sorted(n for n in want.keys() | got.keys() if want.get(n) != got.get(n))
            # Our upload, not the provider's export, is at fault: a plain error that leaves the
            # export open (IntegrityError would give it up), so the next run adopts it.
            raise ExportPipelineError(
                f"published Parquet at {parquet_uri} differs from what was written "
                f"(files {', '.join(differing)})",
                provider=self.name,
                kind=kind.name,
                export_id=export_id,
                file=differing[0],
                hint="the upload was incomplete; run again (nothing was loaded)",
            )
        return fetched

    def _fetch(
        self,
        kind: ExportKind,
        status: ExportStatus,
        raw_dir: Path,
        work_raw: Path,
        flusher: Flusher | None,
        landing: _Landing | None = None,
    ) -> tuple[list[DownloadedFile], ExportStatus, list[str]]:
        """:meth:`_download`, telling ``landing`` each file as it lands and when no more will."""
        try:
            fetched = self._download(
                kind,
                status,
                raw_dir,
                work_raw,
                on_landed=landing and landing.landed,
                stop=landing and landing.halt,
                # The staged load's transaction may be open beside the download (it opens when
                # the first part is parsed): a ledger write here would conflict with it.
                record_refresh=landing is None,
            )
        except BaseException as exc:
            if landing is not None:
                landing.stop(exc)
            raise
        if landing is not None:
            landing.stop(None)  # a file the parse still waits for will not land
        if flusher is not None:
            for f in fetched[0]:
                # Only now: the lease's commit (an fsync of the warehouse) waited behind the
                # raw files' writeback when they were flushed as they landed (locations: 0.19 s).
                flusher.add(f.path)
        return fetched

    def _download(
        self,
        kind: ExportKind,
        status: ExportStatus,
        raw_dir: Path,
        work_raw: Path,
        *,
        on_landed: Callable[[Path], None] | None = None,
        stop: threading.Event | None = None,
        record_refresh: bool = True,
    ) -> tuple[list[DownloadedFile], ExportStatus, list[str]]:
        """Every file of the export in ``raw_dir``: files an earlier attempt verified are
        re-read, the rest downloaded into this attempt's ``work_raw`` (several at once) and
        each, as soon as it is verified, moved into ``raw_dir`` (one rename). A dead signed
        link is replaced by asking for the status again; only the files still missing are
        fetched then (a part stopped halfway resumes from its bytes), and a run killed
        mid-download leaves its finished files in ``raw_dir`` for the next one.
        ``on_landed`` is told each file's path in ``raw_dir`` as it is there (from the download
        threads). ``record_refresh=False``: a fresh status is not written to the ledger here
        (the caller records it in its load transaction, which may be open already)."""
        reused = self._verified(status, raw_dir)
        by_name = dict(reused)
        landing = threading.Lock()
        for f in reused.values():
            if on_landed is not None:
                on_landed(f.path)

        def land(f: DownloadedFile) -> DownloadedFile:
            # On the download thread, the moment the file is complete and checked.
            target = raw_dir / f.name
            os.replace(f.path, target)
            landed = replace(f, path=target)
            with landing:
                by_name[f.name] = landed
            if on_landed is not None:
                on_landed(target)
            return landed

        for attempt in range(self.settings.link_refreshes + 1):
            with landing:
                missing = [f for f in status.files if f.name not in by_name]
            headers = (
                self.provider.api.auth_headers if any(f.authenticated for f in missing) else {}
            )
            try:
                download_files(
                    missing,
                    work_raw,
                    provider=self.name,
                    export_id=status.export_id,
                    headers=headers,
                    api_host=self.provider.api_host,
                    policy=self.settings.retry,
                    classify=getattr(self.provider, "classify_download_error", None),
                    max_concurrency=self.settings.download_concurrency,
                    progress=DownloadProgress(self.log, f"{kind.key} export {status.export_id}"),
                    url_policy=self.settings.url_policy,
                    limits=self.settings.download_limits,
                    # Connect, read (stall) and write timeouts: the provider's own setting.
                    timeout=getattr(self.provider.api, "timeout", 60.0),
                    resume=True,
                    on_finished=land,
                    digest=False,  # hashed beside the parse instead (BackgroundDigests)
                    stop=stop,
                )
                break
            except LinkExpiredError:
                if attempt == self.settings.link_refreshes:
                    raise
                self.log.warning(
                    "%s export %s: download link expired; asking the provider for a fresh one",
                    kind.key,
                    status.export_id,
                )
                if record_refresh:
                    status = self.status(status.export_id)
                else:
                    # A terminal answer is recorded when the sync fails on it (_note_failure).
                    status = self.status_unrecorded(status.export_id)
                self._raise_for_terminal(kind, status)
        if reused:
            self.log.info(
                "%s export %s: re-reading %d verified file(s) instead of downloading them",
                kind.key,
                status.export_id,
                len(reused),
            )
        return [by_name[f.name] for f in status.files], status, sorted(reused)

    def _verified(self, status: ExportStatus, raw_dir: Path) -> dict[str, DownloadedFile]:
        """Files already in ``raw_dir`` (with the announced size, where one was announced).
        Only a download that passed its checks is ever moved there (one rename), so what is
        there is complete."""
        found: dict[str, DownloadedFile] = {}
        for f in status.files:
            path = raw_dir / f.name
            if not path.is_file():
                continue
            size = path.stat().st_size
            if f.size_bytes is not None and size != f.size_bytes:
                continue
            found[f.name] = DownloadedFile(
                name=f.name, path=path, size_bytes=size, sha256=None, content_type=None
            )
        return found

    # -- the whole dance ------------------------------------------------------------------

    def sync(
        self,
        kind: ExportKind,
        request: ExportRequest,
        *,
        source: str = "run",
        timeout: float | None = None,
        adopt: bool = True,
    ) -> IngestResult:
        """Request (or adopt), wait, ingest. An expired export is requested once more."""
        record, adopted = self.start(kind, request, source=source, adopt=adopt)
        for attempt in range(self.settings.re_requests_on_expiry + 1):
            try:
                self.wait_until_ready(kind, record.export_id, timeout=timeout)
                result = self.ingest(
                    kind, record.export_id, partition_key=record.partition_key, source=source
                )
                return replace(result, adopted=adopted)
            except (ExportExpiredError, ExportLostError) as exc:
                if attempt == self.settings.re_requests_on_expiry:
                    raise
                self.log.warning("%s; requesting the same export again", exc)
                old_id = record.export_id
                status = self.provider.request_export(kind, record.request)
                record = self.ledger.record_request(kind, record.request, status, source=source)
                self.ledger.record_error(
                    self.name,
                    old_id,
                    code=exc.code or type(exc).__name__,
                    message=str(exc),
                    replaced_by=record.export_id,
                )
                adopted = False
        raise AssertionError("unreachable")


def _files_changed(kind: ExportKind, export_id: str) -> ExportPipelineError:
    """A fresh link's status named other files than the ones the parse began to read."""
    changed = ExportPipelineError(
        "the export's files changed while they downloaded",
        provider=kind.provider,
        kind=kind.name,
        export_id=export_id,
        hint="it runs again: the files that landed are re-read, not downloaded",
    )
    changed.retryable = True
    return changed


class _DownloadStopped(Exception):
    """A file the parse waits for will not land: the download failed (its own error says why)
    or its status no longer names the file."""


class _Landing:
    """The files of an export as they land, for a parse that began before the last one did
    (``to_parquet``'s ``arriving``). Each landed file is also handed to ``digests``."""

    def __init__(self, paths: Sequence[Path], digests: BackgroundDigests) -> None:
        self.paths = list(paths)
        self._digests = digests
        self._landed: set[Path] = set()
        self._stopped = False
        self._failed: BaseException | None = None
        self._changed = threading.Condition()
        # Set when the parse has failed: the download stops (download_files's ``stop``).
        self.halt = threading.Event()

    def landed(self, path: Path) -> None:
        self._digests.add(path)
        with self._changed:
            self._landed.add(path)
            self._changed.notify_all()

    def stop(self, failure: BaseException | None) -> None:
        """No file lands after this; ``failure``: why the download ended early, if it did."""
        with self._changed:
            self._stopped = True
            self._failed = failure
            self._changed.notify_all()

    def wait(self, path: Path, timeout: float) -> bool:
        """Whether ``path`` has landed, waiting at most ``timeout`` seconds for it."""
        with self._changed:
            if path not in self._landed and not self._stopped:
                self._changed.wait(timeout)
            if path in self._landed:
                return True
            if self._stopped:
                raise _DownloadStopped(f"{path.name} did not land") from self._failed
            return False


def _told(staged: StagedLoad | None, flusher: Flusher | None) -> FileSink | None:
    """What normalise tells each finished Parquet file: the staged load, and the flusher."""
    sinks = [sink.add for sink in (staged, flusher) if sink is not None]
    if len(sinks) < 2:
        return sinks[0] if sinks else None

    def tell(path: Path) -> None:
        for sink in sinks:
            sink(path)

    return tell


def describe_window(request: ExportRequest) -> str:
    """``[since, until)`` of a request for humans; ``full`` when it has no start."""
    if request.modified_since is None and request.window_end is None:
        window = "full"
    else:
        since = request.modified_since.isoformat() if request.modified_since else "start"
        until = request.window_end.isoformat() if request.window_end else "now"
        window = f"[{since}, {until})"
    return f"{window} partition {request.partition}" if request.partition else window


class DownloadProgress:
    """Bytes and rate of a running download, logged every few seconds or megabytes per file.

    Called by the downloader's worker threads after each chunk; the lock keeps one line per
    step even when several parts of an export arrive at once.
    """

    def __init__(
        self,
        logger: logging.Logger,
        label: str,
        *,
        every_seconds: float = 5.0,
        every_bytes: int = 64 << 20,
    ) -> None:
        self.log = logger
        self.label = label
        self.every_seconds = every_seconds
        self.every_bytes = every_bytes
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, name: str, done: int, total: int | None, finished: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            started = self._started.setdefault(name, now)
            last_t, last_b = self._last.get(name, (started, 0))
            due = now - last_t >= self.every_seconds or done - last_b >= self.every_bytes
            if not (finished or due):
                return
            self._last[name] = (now, done)
        elapsed = max(now - started, 1e-6)
        of = f" of {total:,}" if total else ""
        self.log.info(
            "%s: %s %s %s bytes%s in %.1fs (%.1f MB/s)",
            self.label,
            "downloaded" if finished else "downloading",
            name,
            f"{done:,}",
            of,
            elapsed,
            done / elapsed / 1e6,
        )


def _format_label(detected: object) -> str:
    fmt = getattr(detected, "format", detected)
    gz = getattr(detected, "gzip", False)
    label = str(getattr(fmt, "value", fmt))
    return f"{label}+gzip" if gz else label


def _params(params: object) -> str:
    """Request parameters in a comparable form (the ledger stores them as JSON)."""
    return json.dumps(dict(params or {}), sort_keys=True, default=str)  # type: ignore[call-overload]


def _describe_owner(owner: str | None) -> str:
    """``run 1a2b… (pid 123 on host, a load)`` for messages."""
    if not owner:
        return "another run"
    run, _, where = owner.rpartition("@")
    host, _, pid = where.rpartition(":")
    return f"run {run} (pid {pid} on {host})" if run else f"run {owner}"
