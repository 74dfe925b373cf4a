"""Load an export's Parquet files into the DuckDB warehouse while normalise writes the rest.

Normalise parses JSON on one thread per file (a JSON array is read sequentially anyway), so on
a two-core machine the other core is free while it writes the Parquet tier. A
:class:`StagedLoad` fills a staging table in the kind's schema with each Parquet file as soon as
normalise reports it complete (``to_parquet(on_file=...)``), inside the load's own transaction,
opened when the first file is ready. When normalise is done the load runs in that transaction
with the staging table as its stage; a load replacing the whole table renames it to the table
(``load_parquet(staged=...)``), so the rows are written once, beside the parse.

The transaction is the load's: nothing is visible to others before its COMMIT, a failure or a
kill rolls every staged row back, and the ledger and cursor commit with the rows as before. The
price is the DuckDB file's write lock, held from the first finished file instead of from the end
of normalise (other writers wait, as they wait for any load; readers use the read replica).

Only for the DuckDB file on local storage: DuckLake commits a snapshot per transaction and
loads from the remote tier's read-back, so there the load stays after normalise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shutil
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import duckdb

from export_pipeline.core.load import files_have_duplicate_keys, one_thread
from export_pipeline.core.model import ExportKind
from export_pipeline.core.slots import CpuSlots
from export_pipeline.core.sql import quote_ident, sql_literal
from export_pipeline.core.warehouse import Warehouse

log = logging.getLogger(__name__)


class StagedLoad:
    """Stages Parquet files told to :meth:`add` (from any thread) on a thread of its own.

    Use as a context manager: leaving it without :meth:`commit` rolls the transaction back.
    """

    def __init__(
        self, warehouse: Warehouse, kind: ExportKind, scratch: Path, *, memory_limit: str
    ) -> None:
        self.warehouse = warehouse
        self.kind = kind
        name = f"_stage_{kind.name}_{uuid.uuid4().hex[:12]}"
        self.table = f"{quote_ident(kind.schema)}.{quote_ident(name)}"
        self._scratch = scratch
        # For normalise to share (``to_parquet(slots=...)``, core/slots.py): an insert waits
        # for a free core, first in line, instead of adding a busy thread to busy cores.
        self.slots = CpuSlots()
        # Normalise's own DuckDB works at the same time within its cap: the staging gets a
        # quarter (an INSERT from Parquet on one thread needs little; the rest would only keep
        # written blocks cached), so the process stays near one cap, not two.
        self._memory_limit = _fraction(memory_limit, 0.25).replace("'", "''")
        self._files: queue.SimpleQueue[Path | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._told: list[tuple[int, int]] = []  # (device, inode) of each file told
        self._thread: threading.Thread | None = None
        self._transaction: contextlib.AbstractContextManager[duckdb.DuckDBPyConnection] | None
        self._transaction = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self.error: BaseException | None = None
        # Whether each primary key occurs once in the files :meth:`take` was given (None: not
        # known); ``load_parquet(keys_unique=...)`` then need not group the staged rows.
        self.keys_unique: bool | None = None
        self.wait_for_keys = False  # True: :meth:`take` lets the key check end (tests)

    def __enter__(self) -> StagedLoad:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()
        self.rollback(exc)

    def add(self, path: Path) -> None:
        """A complete Parquet file of the export. It is hard-linked first, so normalise may
        rename or remove its own name while the file is read here."""
        with self._lock:
            if self.error is not None:
                return
            self._scratch.mkdir(parents=True, exist_ok=True)
            link = self._scratch / f"{len(self._told):05d}.parquet"
            try:
                os.link(path, link)
            except OSError as exc:
                self.error = exc
                return
            info = link.stat()
            self._told.append((info.st_dev, info.st_ino))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stage", daemon=True)
                self._thread.start()
        self._files.put(link)

    def _run(self) -> None:
        first = True
        while (link := self._files.get()) is not None:
            if self.error is None:
                try:
                    self._insert(link, first=first)
                    first = False
                except BaseException as exc:  # reported by take(); the load goes on without
                    self.error = exc
            # The link stays until take(): while it exists its inode cannot be given to a file
            # normalise writes later, so comparing inodes there cannot match a different file.

    def _insert(self, link: Path, *, first: bool) -> None:
        if self._con is None:
            # The load's transaction, opened now (waiting for the write lock like any load).
            self._transaction = self.warehouse.transaction()
            self._con = self._transaction.__enter__()
            self._con.execute(f"SET memory_limit = '{self._memory_limit}'")
            self._con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.kind.schema)}")
        source = f"read_parquet({sql_literal(str(link))})"
        with self.slots.hold(urgent=True), one_thread(self._con):
            if first:
                self._con.execute(f"CREATE TABLE {self.table} AS SELECT * FROM {source}")
            else:
                self._con.execute(f"INSERT INTO {self.table} BY NAME SELECT * FROM {source}")

    def _join(self) -> None:
        if self._thread is not None:
            self._files.put(None)
            self._thread.join()
            self._thread = None

    def _stop(self) -> None:
        self._join()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def take(self, paths: Sequence[Path | str]) -> duckdb.DuckDBPyConnection | None:
        """When every file staged is one of ``paths`` and each of ``paths`` was staged once
        (normalise did not start again), the open transaction's connection, with the staging
        table holding exactly the rows of ``paths``; else None, the transaction rolled back.

        While the last inserts finish (on one core), the key columns of ``paths`` are checked
        for duplicates on the other (:attr:`keys_unique`), which the load would otherwise do
        after them; a check not done when they are is stopped, and the load does it."""
        keys = None
        if self.kind.primary_key and paths:
            keys = _KeyCheck(self.kind, paths, self._memory_limit)
        try:
            self._join()
        finally:
            self.keys_unique = keys.result(wait=self.wait_for_keys) if keys is not None else None
        wanted = []
        for path in paths:
            info = Path(path).stat()
            wanted.append((info.st_dev, info.st_ino))
        self._stop()  # only now: the links kept every told inode from being reused
        if self._con is not None and self.error is None and sorted(wanted) == sorted(self._told):
            return self._con
        if self.error is not None:
            log.info("%s: staging while parsing stopped (%s)", self.kind.key, self.error)
        self.rollback(None)
        return None

    def commit(self) -> None:
        """COMMIT the transaction (and publish the read replica, as any load's commit does)."""
        transaction, self._transaction, self._con = self._transaction, None, None
        if transaction is not None:
            transaction.__exit__(None, None, None)

    def rollback(self, exc: BaseException | None) -> None:
        transaction, self._transaction, self._con = self._transaction, None, None
        if transaction is not None:
            reason = exc or RuntimeError("staged load abandoned")
            with contextlib.suppress(BaseException):
                transaction.__exit__(type(reason), reason, reason.__traceback__)


def _fraction(limit: str, share: float) -> str:
    """``share`` of a DuckDB memory limit such as ``400MB`` (``100MB``); other forms as given."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])(i?)B\s*", limit, re.IGNORECASE)
    if found is None:
        return limit
    base = 1024 if found.group(3) else 1000
    power = "KMGT".index(found.group(2).upper()) + 1
    kilobytes = float(found.group(1)) * base**power / base * share
    return f"{max(1, int(kilobytes))}{'KiB' if found.group(3) else 'KB'}"


class _KeyCheck:
    """Whether each primary key occurs once in Parquet files, found on a thread and a DuckDB
    connection of their own (one thread, at most ``memory_limit``) while the caller waits for
    something else; :meth:`result` stops it if it is not done by then."""

    def __init__(self, kind: ExportKind, paths: Sequence[Path | str], memory_limit: str) -> None:
        self._con = duckdb.connect(config={"threads": 1, "memory_limit": memory_limit})
        self._unique: bool | None = None
        self._thread = threading.Thread(
            target=self._run, args=(kind, list(paths)), name="stage-keys", daemon=True
        )
        self._thread.start()

    def _run(self, kind: ExportKind, paths: list[Path | str]) -> None:
        with contextlib.suppress(duckdb.Error):  # stopped, or failed: not known
            self._unique = not files_have_duplicate_keys(self._con, kind, paths)

    def result(self, *, wait: bool = False) -> bool | None:
        """True or False when the check was done, else None (stopped now, unless ``wait``)."""
        if not wait:
            # Again until it ends: an interrupt that comes before the query starts is lost.
            while self._thread.is_alive():
                self._con.interrupt()
                self._thread.join(0.01)
        self._thread.join()
        self._con.close()
        return self._unique
