"""Where the tables and the ledger live: the embedded DuckDB file (default) or a DuckLake lake.

Both backends hand out plain DuckDB connections on which the same SQL runs unqualified
(``pipeline.exports``, ``locations.locations``): the DuckLake backend attaches the lake and
``USE``\\s it, so load, ledger and checks need not know which backend they write to.

- :class:`DuckDBWarehouse`: one DuckDB file. DuckDB allows one writing process, so connections
  are short and retried while another process holds the lock.
- :class:`DuckLakeWarehouse`: a DuckLake lakehouse. The catalog is a SQLite file (one machine)
  or a PostgreSQL database (many), the data files are Parquet on local disk or S3. The ledger
  tables live in the lake too, so one export load (data, ledger, cursor) is ONE lake snapshot.
  Several processes write at once; a commit that collides with another's is re-run whole
  (:meth:`Warehouse.transactions`).

The DuckLake, SQLite, PostgreSQL and httpfs extensions come from PyPI's ``duckdb-ext-*`` wheels
(the ``lake`` extra), which carry DuckDB 1.4.4's binaries: nothing is downloaded at run time
(``autoinstall_known_extensions`` is off). See docs/warehouse.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from export_pipeline.core import schema
from export_pipeline.core.errors import ConfigurationError, WarehouseBusyError
from export_pipeline.core.sql import quote_ident, sql_literal
from export_pipeline.core.storage import NewFiles, fsync_dir

log = logging.getLogger(__name__)

BACKENDS = ("duckdb", "ducklake")
# How much earlier than its BEGIN a lake transaction looks for the files it wrote (their times
# come from the kernel's coarse clock, a few milliseconds behind time.time_ns()).
_CHANGE_SLACK_NS = 1_000_000_000
LAKE_ALIAS = "lake"
_LAKE = sql_literal(LAKE_ALIAS)
# Files a lake let go stay this long before maintenance deletes them: a query that began
# before may still read them (DuckLake's advice: a few days; ours, queries of under a day).
CLEANUP_GRACE = timedelta(days=1)
# Extensions the lake may need, by the name of their file in the duckdb-ext-* wheels.
LAKE_EXTENSIONS = ("ducklake", "sqlite_scanner", "postgres_scanner", "httpfs")


def _ensure_ledger(
    con: duckdb.DuckDBPyConnection, *, constraints: bool, own_transaction: bool = True
) -> None:
    # Imported late: the ledger module imports this one.
    from export_pipeline.core.ledger import ensure_ledger

    ensure_ledger(con, constraints=constraints, own_transaction=own_transaction)


def is_lake(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether ``con`` works on a DuckLake lake (its current database is a DuckLake catalog)."""
    row = con.execute(
        "SELECT type FROM duckdb_databases() WHERE database_name = current_database()"
    ).fetchone()
    return bool(row) and row[0] == "ducklake"


def evolve_statements(
    con: duckdb.DuckDBPyConnection,
    schema_name: str,
    table: str,
    old: dict[str, schema.Type],
    new: dict[str, schema.Type],
) -> list[str]:
    """SQL evolving ``schema_name.table`` from columns ``old`` to ``new`` (the same columns,
    types only widened, then new columns), keeping every value, inside the caller's
    transaction (on DuckLake: in the load's one snapshot). docs/schema.md has the policy.

    - New columns and new struct fields: ``ADD COLUMN col`` / ``ADD COLUMN col.field``.
    - The DuckDB file retypes in place: ``ALTER COLUMN ... SET DATA TYPE ... USING``
      :func:`schema.convert_sql`; every column keeps its place.
    - DuckLake 1.4.4 refuses ``USING`` and retypes in place only the promotions of
      :func:`schema.promotes_in_place`. When any other retype is needed, or a new column or
      field is (or holds) JSON, the table is rewritten instead (:func:`_lake_rewrite`).
    """
    target = f"{quote_ident(schema_name)}.{quote_ident(table)}"
    lake = is_lake(con)
    alters: list[str] = []
    retypes: list[str] = []
    rewrite = False
    for name, t in new.items():
        col = quote_ident(name)
        was = old.get(name)
        if lake and schema.adds_json(was, t):
            # DuckLake 1.4.4 leaves a JSON type added by ALTER unresolved in the transaction:
            # writing the table then fails, and invalidates the whole DuckDB instance.
            rewrite = True
        if was is None:
            alters.append(f"ALTER TABLE {target} ADD COLUMN {col} {schema.render(t)}")
            continue
        if was == t:
            continue
        fields = schema.added_fields(was, t)
        if fields is not None:
            for path, field_type in fields:
                dotted = ".".join(quote_ident(p) for p in (name, *path))
                alters.append(
                    f"ALTER TABLE {target} ADD COLUMN {dotted} {schema.render(field_type)}"
                )
        elif schema.promotes_in_place(was, t, lake=lake):
            alters.append(
                f"ALTER TABLE {target} ALTER COLUMN {col} SET DATA TYPE {schema.render(t)}"
            )
        elif lake:
            rewrite = True
        else:
            retypes.append(
                f"ALTER TABLE {target} ALTER COLUMN {col} SET DATA TYPE {schema.render(t)} "
                f"USING {schema.convert_sql(col, was, t)}"
            )
    if rewrite:
        return _lake_rewrite(schema_name, table, old, new)
    return alters + retypes


def _lake_rewrite(
    schema_name: str, table: str, old: dict[str, schema.Type], new: dict[str, schema.Type]
) -> list[str]:
    """The table rewritten with its new columns: ``CREATE TABLE ... AS SELECT`` (each column
    converted, new ones NULL), the old table dropped, the new one renamed to its name.

    Checked on DuckLake 1.4.4, which rules out the alternatives: ``ALTER ... USING`` is
    refused; a column renamed in a transaction that also added or dropped one is committed
    garbled (both names, one holding the other's bits); a table altered earlier in the
    transaction cannot be dropped and replaced by a renamed one; a JSON type added by ALTER
    fails the writes after it. Columns keep their order; time travel to earlier snapshots reads
    the old table; comments are written again after the load (``apply_comments``).
    """
    target = f"{quote_ident(schema_name)}.{quote_ident(table)}"
    scratch = f"_evolve_{table}_{uuid.uuid4().hex[:8]}"
    exprs = []
    for name, t in new.items():
        col = quote_ident(name)
        was = old.get(name)
        if was is None:
            exprs.append(f"CAST(NULL AS {schema.render(t)}) AS {col}")
        elif was == t:
            exprs.append(col)
        else:
            exprs.append(f"{schema.convert_sql(col, was, t)} AS {col}")
    return [
        f"CREATE TABLE {quote_ident(schema_name)}.{quote_ident(scratch)} AS "
        f"SELECT {', '.join(exprs)} FROM {target}",
        f"DROP TABLE {target}",
        f"ALTER TABLE {quote_ident(schema_name)}.{quote_ident(scratch)} "
        f"RENAME TO {quote_ident(table)}",
    ]


class Warehouse:
    """The interface both backends offer (see the module docstring)."""

    backend: str = "duckdb"
    lock_timeout: float

    def connect(self, *, read_only: bool = False) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """BEGIN ... COMMIT, or ROLLBACK on any error: the old state or the new, never half."""
        with self.connect() as con, self._transaction_on(con):
            yield con

    @contextmanager
    def _transaction_on(self, con: duckdb.DuckDBPyConnection) -> Iterator[None]:
        con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self._discard(con)
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        self._commit(con)

    def _discard(self, con: duckdb.DuckDBPyConnection) -> None:
        """Forget what the rolled-back transaction on ``con`` asked for after its commit."""

    def _commit(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute("COMMIT")

    def transactions(self, *, attempts: int = 8) -> Iterator[_Attempt]:
        """Attempts at one transaction, each run whole; stop at the first that commits::

            for attempt in warehouse.transactions():
                with attempt as con:
                    ...  # everything the transaction does, reads included

        A commit that collides with another writer's (DuckLake: ``database is locked`` from a
        SQLite catalog, a snapshot conflict) is rolled back and the whole block runs again,
        after a growing pause with jitter, at most ``attempts`` times; then the error is raised
        as :class:`WarehouseBusyError` (retryable). Any other error is raised at once. The
        DuckDB file has one writer at a time, so there a block runs once.
        """
        delay = 0.1
        for number in range(1, attempts + 1):
            attempt = _Attempt(self, last=number == attempts)
            yield attempt
            if attempt.committed:
                return
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)

    def is_retryable(self, exc: BaseException) -> bool:
        return False

    def label_commit(self, con: duckdb.DuckDBPyConnection, message: str, **extra: Any) -> None:
        """Describe the commit being prepared (DuckLake: the snapshot's commit message)."""

    def last_committed_snapshot(self) -> int | None:
        """The snapshot this thread's last commit made (DuckLake), else None."""
        return None

    def note_table_files(
        self, con: duckdb.DuckDBPyConnection, schema: str, table: str, files: Sequence[str]
    ) -> None:
        """The transaction on ``con`` made ``schema.table`` exactly the rows of the Parquet
        ``files`` (``LoadResult.table_files``; empty: it did not). The DuckDB file's read
        replica then links them instead of writing the table again."""

    def describe(self) -> str:
        """Where the warehouse is, for messages (never a password)."""
        raise NotImplementedError


class _Attempt:
    """One try of :meth:`Warehouse.transactions`: a context manager yielding the connection."""

    def __init__(self, warehouse: Warehouse, *, last: bool) -> None:
        self.warehouse = warehouse
        self.last = last
        self.committed = False
        self._cm: contextlib.AbstractContextManager[duckdb.DuckDBPyConnection] | None = None

    def __enter__(self) -> duckdb.DuckDBPyConnection:
        self._cm = self.warehouse.transaction()
        return self._cm.__enter__()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        assert self._cm is not None
        failure = exc
        try:
            self._cm.__exit__(exc_type, exc, tb)  # COMMIT, or ROLLBACK (the body failed)
        except BaseException as error:
            failure = error  # the COMMIT failed
        if failure is None:
            self.committed = True
            return False
        if not self.warehouse.is_retryable(failure):
            if failure is exc:
                return False
            raise failure
        if self.last:
            raise WarehouseBusyError(
                f"warehouse {self.warehouse.describe()}: the commit collided with other "
                f"writers on every attempt ({failure})",
                hint="other loads are committing; the run can be retried",
            ) from failure
        return True  # swallowed: the loop runs the block again


class DuckDBWarehouse(Warehouse):
    """The DuckDB file: short-lived connections, retried while another process writes.

    After each committed load (a transaction that called :meth:`label_commit`) the tables of
    the loaded schema are published to the read replica in ``read_dir`` (default: ``read/``
    beside the file), which readers open instead of this file (see ``core/replica.py``).
    """

    backend = "duckdb"

    def __init__(
        self,
        path: Path | str,
        *,
        lock_timeout: float = 60.0,
        read_dir: Path | str | None = None,
        publish_reads: bool = True,
        read_retain_seconds: float = 600.0,
    ) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self.read_dir = Path(read_dir) if read_dir else self.path.parent / "read"
        self.publish_reads = publish_reads
        self.read_retain_seconds = read_retain_seconds
        self._initialised = False
        self._to_publish: dict[int, set[str]] = {}
        self._table_files: dict[int, dict[str, tuple[str, ...]]] = {}

    def describe(self) -> str:
        return str(self.path)

    def label_commit(self, con: duckdb.DuckDBPyConnection, message: str, **extra: Any) -> None:
        """A load: publish its schema's tables to the read replica once it has committed."""
        if self.publish_reads:
            schema = extra.get("schema") or extra.get("provider")
            self._to_publish.setdefault(id(con), set()).update([schema] if schema else [])

    def note_table_files(
        self, con: duckdb.DuckDBPyConnection, schema: str, table: str, files: Sequence[str]
    ) -> None:
        # The last load of the table in the transaction decides (empty: write it as usual).
        self._table_files.setdefault(id(con), {})[f"{schema}.{table}"] = tuple(files)

    def _discard(self, con: duckdb.DuckDBPyConnection) -> None:
        self._to_publish.pop(id(con), None)
        self._table_files.pop(id(con), None)

    def _commit(self, con: duckdb.DuckDBPyConnection) -> None:
        schemas = self._to_publish.pop(id(con), None)
        table_files = self._table_files.pop(id(con), None) or {}
        con.execute("COMMIT")
        if schemas is None:
            return
        from export_pipeline.core import replica

        try:
            # Still on the writer's connection: the tables read are exactly what was committed,
            # and publishers in other processes wait for the file lock.
            replica.publish(
                con,
                self.read_dir,
                schemas=schemas | {"pipeline"},
                retain_seconds=self.read_retain_seconds,
                table_files={name: files for name, files in table_files.items() if files},
            )
        except (OSError, duckdb.Error) as exc:
            # The load is committed; the replica stays at its previous (consistent) state.
            log.warning("read replica in %s not refreshed: %s", self.read_dir, exc)

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if read_only and not self.path.exists():
            # A read-only open of a missing file fails; an empty in-memory ledger answers the same.
            con = duckdb.connect()
            _ensure_ledger(con, constraints=True)
            try:
                yield con
            finally:
                con.close()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        next_note = 0.0  # when to say again that we are still waiting
        while True:
            try:
                con = self._open(read_only)
                break
            except duckdb.BinderException as exc:
                # Another thread of this process is closing the file's last connection just
                # now (DuckDB's per-process instance cache); a moment later it opens cleanly.
                if "file handle conflict" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise
                from export_pipeline.core.ledger import lock_holder

                holder, hint = lock_holder(str(exc))
                if time.monotonic() > deadline:
                    raise WarehouseBusyError(
                        f"warehouse {self.path} is locked by {holder}; gave up after "
                        f"{self.lock_timeout:.0f}s (warehouse.lock_timeout_seconds)",
                        hint=hint,
                    ) from exc
                if time.monotonic() >= next_note:
                    log.info(
                        "waiting for the warehouse write lock on %s, held by %s (up to %.0fs "
                        "more, warehouse.lock_timeout_seconds). %s",
                        self.path,
                        holder,
                        max(0.0, deadline - time.monotonic()),
                        hint,
                    )
                    next_note = time.monotonic() + 10.0
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            con.execute("SET TimeZone = 'UTC'")
            if not read_only and not self._initialised:
                _ensure_ledger(con, constraints=True)
                self._initialised = True
            yield con
        finally:
            self._close(con, read_only)

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A new connection to the file. Read-write ones are cursors of one anchor connection
        per file and process, opened by the first and closed after the last.

        Why: DuckDB's per-process instance cache races when threads connect at once (a load
        staging in the background while the run renews its lease, say). The loser's failed
        instance can stay in the cache while the winner's instance holds the file unlisted;
        every later ``duckdb.connect`` then fails with "Unique file handle conflict" until the
        winner's long-lived connection closes (seen under load: 60 s, then the run failed).
        Cursors of one connection share its instance without going through the cache."""
        if read_only:
            return duckdb.connect(str(self.path), read_only=True)
        key = str(self.path.resolve())
        with _ANCHORS_LOCK:
            entry = _ANCHORS.get(key)
            if entry is None:
                entry = _ANCHORS[key] = [*_attach(self.path), 0]
            entry[2] += 1
            cursor = entry[0].cursor()
            if entry[1] is not None:
                cursor.execute(f"USE {quote_ident(entry[1])}")  # a cursor starts in "memory"
            return cursor

    def _close(self, con: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        con.close()
        if read_only:
            return
        key = str(self.path.resolve())
        with _ANCHORS_LOCK:
            entry = _ANCHORS.get(key)
            if entry is None:
                return
            entry[2] -= 1
            if entry[2] == 0:
                del _ANCHORS[key]
                entry[0].close()  # the last user: the file is closed (and checkpointed) now


# One read-write anchor connection per DuckDB file and process: [connection, alias, users].
_ANCHORS: dict[str, list[Any]] = {}
_ANCHORS_LOCK = threading.Lock()

# Rows per row group of tables this process writes (DuckDB's default: 122,880). A load's
# inserts write a row group to disk only once a later one has filled, so the export's last one
# or two were compressed by its COMMIT, on the critical path after the parse: locations, 200,000
# rows, COMMIT 0.9-1.1 s. With half-size row groups the staging inserts write them beside the
# parse and the COMMIT takes 0.26 s (docs/benchmarks.md); the file grows ~3%, and scans get
# finer-grained parallelism. Files written with other sizes read as before.
ROW_GROUP_SIZE = 61_440
# Names DuckDB will not attach a database under (or "memory", the in-memory one's).
_RESERVED_ALIASES = {"memory", "system", "temp", "main"}


def _attach(path: Path) -> tuple[duckdb.DuckDBPyConnection, str | None]:
    """A read-write connection to ``path`` whose writes use :data:`ROW_GROUP_SIZE`: the file
    attached to an in-memory connection under its stem, the name ``duckdb.connect(path)`` gives
    it, and made the default (the alias, to ``USE`` on each cursor). A stem DuckDB reserves
    opens the plain way, with DuckDB's row groups (alias None)."""
    alias = path.stem
    if alias.lower() in _RESERVED_ALIASES:
        return duckdb.connect(str(path)), None
    con = duckdb.connect()
    try:
        con.execute(
            f"ATTACH {sql_literal(str(path))} AS {quote_ident(alias)} "
            f"(ROW_GROUP_SIZE {ROW_GROUP_SIZE})"
        )
        con.execute(f"USE {quote_ident(alias)}")
    except BaseException:
        con.close()  # a lock held elsewhere: the caller waits and tries again
        raise
    return con, alias


def extension_directory() -> Path:
    """The ``extensions`` folder of the installed duckdb-ext-* wheels (the ``lake`` extra).

    Their layout is DuckDB's own (``<dir>/v1.4.4/linux_amd64/<name>.duckdb_extension``), so
    ``SET extension_directory`` to it makes ``LOAD ducklake`` and autoloading find them.
    """
    spec = importlib.util.find_spec("duckdb_ext")
    locations = list(spec.submodule_search_locations or []) if spec else []
    version = duckdb.__version__
    for location in locations:
        folder = Path(location) / "extensions"
        if any(folder.glob(f"v{version}/*/ducklake.duckdb_extension")):
            return folder
    raise ConfigurationError(
        f"backend 'ducklake' needs the DuckLake extension for DuckDB {version}, "
        "which is not installed",
        hint="pip install 'export_pipeline[lake]' (it brings duckdb-ext-ducklake, -sqlite, "
        "-postgres and -httpfs, built for DuckDB 1.4.4; see docs/warehouse.md)",
    )


def parse_catalog(catalog: str) -> tuple[str, str]:
    """``"sqlite:<path>"``, a bare path (SQLite) or ``"postgres:<libpq DSN>"`` ->
    (kind, target). The DSN may hold a password: never put the result in a message."""
    value = catalog.strip()
    if value.startswith("ducklake:"):
        value = value.removeprefix("ducklake:")
    for prefix, kind in (
        ("sqlite:", "sqlite"),
        ("postgres:", "postgres"),
        ("postgresql:", "postgres"),
    ):
        if value.startswith(prefix):
            return kind, value.removeprefix(prefix)
    if value.startswith("postgres://") or value.startswith("postgresql://"):
        return "postgres", value
    if not value:
        raise ConfigurationError(
            "warehouse.lake_catalog is empty", hint="e.g. data/lake/catalog.sqlite"
        )
    return "sqlite", value


# One attached lake per (catalog, data path) and process: loading the extensions and attaching
# costs about half a second, and a sensor or a run opens many short connections.
_LAKES: dict[tuple[str, str], duckdb.DuckDBPyConnection] = {}
_LAKES_LOCK = threading.Lock()
# Held while attaching (which waits for the writer lock), so that _LAKES_LOCK never is: a thread
# inside a transaction (holding the writer lock) may need _LAKES_LOCK to evict its instance.
_OPEN_LOCK = threading.Lock()
# Connections of DuckDB instances that DuckDB invalidated (below), kept for the process's life.
_INVALIDATED: list[duckdb.DuckDBPyConnection] = []


def _invalidated(db: duckdb.DuckDBPyConnection) -> bool:
    """Whether DuckDB has invalidated ``db``'s whole instance. DuckDB 1.4.4 does so after an
    internal error at a commit (a DuckLake commit that fails that way, duckdb/ducklake#1198) or
    in some DuckLake writes; every later statement on any of its connections then fails with
    ``database has been invalidated``. Asked on a fresh cursor: the failed one may hold an
    aborted transaction, which answers anything with 'please ROLLBACK'."""
    try:
        probe = db.cursor()
    except duckdb.Error:
        return False  # closed (close_lakes): nothing left to invalidate
    try:
        probe.execute("SELECT 1")
        return False
    except duckdb.FatalException:
        return True
    except duckdb.Error:
        return False
    finally:
        probe.close()  # it holds no transaction: closing it is safe


def _keep_forever(con: duckdb.DuckDBPyConnection) -> None:
    """Never close or free ``con``, a connection of an invalidated instance. If it holds a
    transaction, DuckDB 1.4.4 rolls it back when it is closed or freed, that rollback throws
    ``database has been invalidated`` inside a destructor and the process aborts (SIGABRT,
    checked). The extra reference keeps it also through interpreter shutdown; the cost is the
    instance's memory, once per invalidation."""
    _INVALIDATED.append(con)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(con))


def _close_database(db: duckdb.DuckDBPyConnection) -> None:
    if _invalidated(db):
        _keep_forever(db)  # closing it closes its cursors: see _keep_forever
        return
    with contextlib.suppress(duckdb.Error):
        db.close()


class DuckLakeWarehouse(Warehouse):
    """A DuckLake lake: catalog in SQLite or PostgreSQL, Parquet data files local or on S3."""

    backend = "ducklake"

    def __init__(
        self,
        catalog: str,
        data_path: str,
        *,
        lock_timeout: float = 60.0,
        s3_endpoint: str | None = None,
        s3_region: str | None = None,
    ) -> None:
        self.catalog_kind, self.catalog_target = parse_catalog(catalog)
        if self.catalog_kind == "sqlite":
            self.catalog_target = str(Path(self.catalog_target).resolve())
        self.remote = data_path.startswith(("s3://", "gs://", "http://", "https://"))
        self.data_path = data_path if self.remote else str(Path(data_path).resolve())
        if not self.data_path.endswith("/"):
            self.data_path += "/"
        self.lock_timeout = lock_timeout
        self.s3_endpoint = s3_endpoint
        self.s3_region = s3_region
        self._local = threading.local()

    # Kept for code that names the warehouse by a path (logs, the CLI).
    @property
    def path(self) -> Path:
        return Path(self.catalog_target) if self.catalog_kind == "sqlite" else Path(self.data_path)

    def describe(self) -> str:
        where = self.catalog_target if self.catalog_kind == "sqlite" else "postgres catalog"
        return f"ducklake ({where}, data {self.data_path})"

    def attach_sql(self, *, alias: str = LAKE_ALIAS, read_only: bool = False) -> str:
        """The ATTACH statement an analyst (or this class) runs. Holds the DSN: never log it."""
        options = [f"DATA_PATH {sql_literal(self.data_path)}"]
        if read_only:
            options.append("READ_ONLY")
        target = f"ducklake:{self.catalog_kind}:{self.catalog_target}"
        return f"ATTACH {sql_literal(target)} AS {alias} ({', '.join(options)})"

    def _key(self) -> tuple[str, str]:
        return (f"{self.catalog_kind}:{self.catalog_target}", self.data_path)

    def _database(self) -> duckdb.DuckDBPyConnection:
        with _LAKES_LOCK:
            db = _LAKES.get(self._key())
        if db is not None:
            return db
        with _OPEN_LOCK:
            with _LAKES_LOCK:
                db = _LAKES.get(self._key())
            if db is None:
                db = self._open()
                with _LAKES_LOCK:
                    _LAKES[self._key()] = db
            return db

    def _evict_if_invalidated(self, db: duckdb.DuckDBPyConnection) -> bool:
        """After an error on a cursor of ``db``: if DuckDB invalidated the instance, forget it,
        so that the next :meth:`connect` (the retry of :meth:`transactions`) attaches the lake
        in a fresh one. It is not closed: other threads may be using cursors of it (they fail
        with ``database has been invalidated``, which is retryable) and closing it could abort
        the process (:func:`_keep_forever`)."""
        if not _invalidated(db):
            return False
        with _LAKES_LOCK:
            if _LAKES.get(self._key()) is db:
                del _LAKES[self._key()]
                _keep_forever(db)
                log.warning(
                    "warehouse %s: DuckDB invalidated this process's lake connection after an "
                    "internal error; the lake is attached again",
                    self.describe(),
                )
        return True

    def _open(self) -> duckdb.DuckDBPyConnection:
        db = duckdb.connect(
            config={
                "extension_directory": str(extension_directory()),
                # Loopback only: never fetch an extension from the internet.
                "autoinstall_known_extensions": False,
            }
        )
        try:
            db.execute("LOAD ducklake")
            if self.catalog_kind == "sqlite":
                self._prepare_sqlite_catalog()
                db.execute("LOAD sqlite_scanner")
            else:
                db.execute("LOAD postgres_scanner")
            if self.data_path.startswith("s3://"):
                db.execute("LOAD httpfs")
                db.execute(self._s3_secret_sql())
            else:
                Path(self.data_path).mkdir(parents=True, exist_ok=True)
                fsync_dir(Path(self.data_path).parent)  # the data path itself, once
            with self._writer_lock():
                db.execute(self.attach_sql())
                db.execute(f"USE {LAKE_ALIAS}")
                db.execute("SET TimeZone = 'UTC'")
                # Creating the ledger is a commit like any other (a PostgreSQL catalog may
                # see another process do the same at once: then it runs again).
                for number in range(1, 9):
                    try:
                        db.execute("BEGIN TRANSACTION")
                        _ensure_ledger(db, constraints=False, own_transaction=False)
                        db.execute("COMMIT")
                        break
                    except duckdb.Error as exc:
                        with contextlib.suppress(duckdb.Error):
                            db.execute("ROLLBACK")
                        if number == 8 or not self.is_retryable(exc):
                            raise
                        time.sleep(0.05 * number)
        except BaseException:
            _close_database(db)
            raise
        return db

    def _prepare_sqlite_catalog(self) -> None:
        """Create the SQLite catalog in WAL mode: readers (analysts, sensors) then never block
        a committing writer, nor it them. The mode is stored in the file, so it holds for every
        later connection, ours or an analyst's."""
        path = Path(self.catalog_target)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            return
        import sqlite3

        with contextlib.closing(sqlite3.connect(path)) as sq:
            sq.execute("PRAGMA journal_mode=WAL")

    def _s3_secret_sql(self) -> str:
        """An S3 secret from the usual AWS_* variables (read now, at run time; never logged)."""
        key = os.environ.get("AWS_ACCESS_KEY_ID")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise ConfigurationError(
                f"lake data path {self.data_path} needs S3 credentials",
                hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )
        parts = [
            "TYPE s3",
            f"KEY_ID {sql_literal(key)}",
            f"SECRET {sql_literal(secret)}",
        ]
        token = os.environ.get("AWS_SESSION_TOKEN")
        if token:
            parts.append(f"SESSION_TOKEN {sql_literal(token)}")
        region = (
            self.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        )
        if region:
            parts.append(f"REGION {sql_literal(region)}")
        endpoint = (
            self.s3_endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            parts += [
                f"ENDPOINT {sql_literal(host.rstrip('/') if host else endpoint)}",
                "URL_STYLE 'path'",
                f"USE_SSL {'true' if scheme == 'https' else 'false'}",
            ]
        return f"CREATE OR REPLACE SECRET export_pipeline_lake_s3 ({', '.join(parts)})"

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """One writer at a time per SQLite catalog, across processes (a sidecar ``.lock``).

        A DuckLake transaction keeps a SQLite read transaction open from its first catalog
        read; if another writer commits meanwhile, its own commit fails with ``database is
        locked`` (measured: two writers, about one commit in three). Taking turns makes that
        impossible among our own processes, so a long load is never starved by short ledger
        writes; the retry in :meth:`transactions` stays for anyone else. A PostgreSQL catalog
        (several machines) relies on DuckLake's conflict checks and that retry alone.
        """
        if self.catalog_kind != "sqlite":
            yield
            return
        lock_path = Path(self.catalog_target + ".lock")
        with open(lock_path, "a+") as handle:
            deadline = time.monotonic() + self.lock_timeout
            delay = 0.02
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WarehouseBusyError(
                            f"warehouse {self.describe()}: another process has been writing "
                            f"for more than {self.lock_timeout:.0f}s",
                            hint="a load is running; try again when it ends",
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._session(self._database()) as con:
            yield con

    @contextmanager
    def _session(self, db: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of the process's lake ``db``, on the lake; ``db`` is evicted if an error
        on it turns out to have invalidated it (:meth:`_evict_if_invalidated`)."""
        cursor = db.cursor()
        try:
            cursor.execute(f"USE {LAKE_ALIAS}")
            cursor.execute("SET TimeZone = 'UTC'")
            yield cursor
        except BaseException:
            if self._evict_if_invalidated(db):
                _keep_forever(cursor)  # its transaction cannot be rolled back any more
                cursor = None
            raise
        finally:
            if cursor is not None:
                cursor.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        # Attach first: attaching takes the writer lock itself. The transaction keeps this
        # instance even if another thread evicts it meanwhile (its statements then fail).
        db = self._database()
        with self._writer_lock(), self._session(db) as con:
            if not self.remote:
                _new_files(self.data_path).start()
            # Earlier by the slack: a file's time comes from the kernel's coarse clock.
            self._local.began_ns = time.time_ns() - _CHANGE_SLACK_NS
            with self._transaction_on(con):
                yield con

    def _commit(self, con: duckdb.DuckDBPyConnection) -> None:
        if not self.remote:
            # DuckDB writes Parquet without an fsync (a closed file is enough for a process
            # that dies), and DuckLake commits its catalog right after: after a power loss
            # the catalog could name a data file the kernel had kept only in memory. So the
            # files this transaction wrote reach the disk first. (S3: durable once written.)
            _new_files(self.data_path).sync(getattr(self._local, "began_ns", 0))
        try:
            con.execute("COMMIT")
        except duckdb.Error:
            # A failed DuckLake commit can leave the connection's transaction open.
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise
        row = con.execute(f"SELECT id FROM {LAKE_ALIAS}.last_committed_snapshot()").fetchone()
        self._local.snapshot = int(row[0]) if row and row[0] is not None else None

    def is_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, WarehouseBusyError):
            return False  # already waited for the writer lock as long as allowed
        if not isinstance(exc, duckdb.Error):
            return False
        text = str(exc).lower()
        return any(
            marker in text
            for marker in (
                "database is locked",
                "failed to commit ducklake transaction",
                "transaction conflict",
                "could not serialize",
                "deadlock detected",
                # Another thread's internal error invalidated the instance this attempt used;
                # it was evicted (connect), so the next attempt runs on a fresh one.
                "database has been invalidated",
            )
        )

    def label_commit(self, con: duckdb.DuckDBPyConnection, message: str, **extra: Any) -> None:
        con.execute(
            f"CALL {LAKE_ALIAS}.set_commit_message('export_pipeline', ?, extra_info => ?)",
            [message, json.dumps(extra, default=str, sort_keys=True)],
        )

    def last_committed_snapshot(self) -> int | None:
        return getattr(self._local, "snapshot", None)

    def snapshots(self) -> list[dict[str, Any]]:
        """Every snapshot of the lake with its commit message and extra info (newest last)."""
        with self.connect(read_only=True) as con:
            rows = con.execute(
                f"SELECT snapshot_id, snapshot_time, commit_message, commit_extra_info "
                f"FROM {LAKE_ALIAS}.snapshots() ORDER BY snapshot_id"
            ).fetchall()
        return [
            {
                "snapshot_id": r[0],
                "snapshot_time": r[1],
                "message": r[2],
                "extra": json.loads(r[3]) if r[3] else {},
            }
            for r in rows
        ]

    def snapshot_of_export(self, provider: str, export_id: str) -> int | None:
        """The snapshot that loaded ``export_id`` (time travel: ``AT (VERSION => id)``)."""
        with self.connect(read_only=True) as con:
            row = con.execute(
                f"SELECT max(snapshot_id) FROM {LAKE_ALIAS}.snapshots() "
                "WHERE json_extract_string(commit_extra_info, '$.provider') = ? "
                "AND json_extract_string(commit_extra_info, '$.export_id') = ?",
                [provider, export_id],
            ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def maintain(
        self,
        keep: timedelta,
        *,
        grace: timedelta = CLEANUP_GRACE,
        dry_run: bool = False,
    ) -> LakeMaintenance:
        """DuckLake's maintenance, in order: merge adjacent small data files (each load, ledger
        writes included, adds at least one), expire the snapshots older than ``keep`` (time
        travel then reaches back that far, no further), and delete the files no snapshot
        names any more once they were let go more than ``grace`` ago (a query that started
        before may still read them). Each step is a transaction of its own, so the merged files
        reach the disk before the catalog names them (:meth:`_commit`). ``dry_run``: nothing
        is merged, expired or deleted; the counts say what would be."""
        current = (
            f"SELECT count(*) FROM __ducklake_metadata_{LAKE_ALIAS}.ducklake_data_file "
            "WHERE end_snapshot IS NULL"
        )
        with self.connect(read_only=True) as con:
            before = int(con.execute(current).fetchone()[0])  # type: ignore[index]
        if not dry_run:
            for attempt in self.transactions():
                with attempt as con:
                    con.execute(f"CALL ducklake_merge_adjacent_files({_LAKE})").fetchall()

        def forget(function: str, age: timedelta) -> int:
            """Rows of DuckLake's ``function`` (expire, clean up) for what is older than ``age``
            when it runs: snapshots expired or files deleted (or that would be, ``dry_run``)."""
            rows: list[tuple[Any, ...]] = []
            for attempt in self.transactions():
                with attempt as con:
                    rows = con.execute(
                        f"CALL {function}({_LAKE}, older_than => ?::TIMESTAMPTZ, dry_run => ?)",
                        [datetime.now(UTC) - age, dry_run],
                    ).fetchall()
            return len(rows)

        expired = forget("ducklake_expire_snapshots", keep)
        deleted = forget("ducklake_cleanup_old_files", grace)
        with self.connect(read_only=True) as con:
            after = int(con.execute(current).fetchone()[0])  # type: ignore[index]
        return LakeMaintenance(
            data_files_before=before,
            data_files_after=after,
            snapshots_expired=expired,
            files_deleted=deleted,
        )

    def close(self) -> None:
        """Detach this lake from the process (tests; a process normally keeps it)."""
        with _LAKES_LOCK:
            db = _LAKES.pop(self._key(), None)
        if db is not None:
            _close_database(db)


@dataclass(frozen=True)
class LakeMaintenance:
    """What :meth:`DuckLakeWarehouse.maintain` did (or, in a dry run, would do)."""

    data_files_before: int  # data files the current snapshot names
    data_files_after: int
    snapshots_expired: int
    files_deleted: int  # from the disk (or S3)


_NEW_FILES: dict[str, NewFiles] = {}  # data path -> its files' listings, for the process


def _new_files(data_path: str) -> NewFiles:
    with _LAKES_LOCK:
        if data_path not in _NEW_FILES:
            _NEW_FILES[data_path] = NewFiles(Path(data_path))
        return _NEW_FILES[data_path]


def close_lakes() -> None:
    """Detach every lake this process attached (tests, and a clean shutdown)."""
    with _LAKES_LOCK:
        databases = list(_LAKES.values())
        _LAKES.clear()
        _NEW_FILES.clear()
    for db in databases:
        _close_database(db)


def warehouse_from_settings(
    *,
    backend: str = "duckdb",
    path: str | Path = "data/warehouse.duckdb",
    lake_catalog: str = "data/lake/catalog.sqlite",
    lake_data_path: str = "data/lake/files",
    lock_timeout: float = 60.0,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
    read_dir: str | Path | None = None,
    publish_reads: bool = True,
) -> Warehouse:
    """The warehouse the settings describe (``backend`` = ``duckdb`` | ``ducklake``)."""
    value = (backend or "duckdb").strip().lower()
    if value == "duckdb":
        return DuckDBWarehouse(
            path, lock_timeout=lock_timeout, read_dir=read_dir, publish_reads=publish_reads
        )
    if value == "ducklake":
        return DuckLakeWarehouse(
            lake_catalog,
            lake_data_path,
            lock_timeout=lock_timeout,
            s3_endpoint=s3_endpoint,
            s3_region=s3_region,
        )
    raise ConfigurationError(
        f"unknown warehouse backend {backend!r}", hint=f"one of {', '.join(BACKENDS)}"
    )
