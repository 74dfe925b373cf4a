"""The read path of the embedded DuckDB warehouse: a replica readers open, never the writer's file.

DuckDB allows one writing process, and a read-only open fails while a writer holds the file,
so analysts cannot query ``warehouse.duckdb`` during a load. Instead, after each committed
load the writer *publishes* a read tier::

    <read_dir>/warehouse.duckdb                 views only; what readers open (read-only)
    <read_dir>/manifest.json                    which Parquet files are each table's current state
    <read_dir>/tables/<schema>/<table>/<n>[-<i>].parquet   a table's current state, immutable

Publishing writes the tables the load changed as one Parquet file each (a new file, never an
existing one), builds a new replica file beside the old one and renames it over it (atomic on
POSIX). A reader holding the old replica keeps reading the old, consistent state; the next open
gets the new one. The writer never opens the published replica, so no lock is ever shared
between readers and the writer. Files a replica no longer names are deleted only after
``retain_seconds``, so a query on a replica opened just before a publish still finds them.

A table the load replaced whole from its export's Parquet (a snapshot, or the first load into an
empty table) is not written again: when those files hold exactly the table's columns, types and
row count, the replica hard-links them (a copy across file systems) as ``<n>-<i>.parquet``, so
such a table may be several files. The export's Parquet is never written after it is published,
so the link is as immutable as a file the replica wrote. A column that is JSON in those files
and VARCHAR in the table (one null in every row) is the same strings; the replica's view casts
it to the table's type (``casts`` in the manifest).

The current-state Parquet files are also what other tools read (the whole table, no deltas),
listed in ``manifest.json`` (format 2: ``tables`` maps ``schema.table`` to a list of files,
``casts`` to the columns its view casts; format 1 named one file per table and is still read).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb

from export_pipeline.core import schema as types
from export_pipeline.core.load import one_thread
from export_pipeline.core.sql import quote_ident, sql_literal

REPLICA_NAME = "warehouse.duckdb"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 2
# Schemas never published (DuckDB's own).
_SYSTEM_SCHEMAS = ("information_schema", "pg_catalog")
# Rows per Parquet row group: the writer holds one in memory (DuckDB's default is 122,880
# rows whatever their width).
_ROW_GROUP_ROWS = 20_000
_PUBLISH_LOCK = threading.Lock()  # one publisher per process; the DuckDB file lock does the rest


def read_manifest(read_dir: Path) -> dict[str, Any]:
    """The manifest, ``tables`` as ``{"schema.table": [parquet, ...]}`` whatever its format."""
    path = Path(read_dir) / MANIFEST_NAME
    if not path.exists():
        return {"format": MANIFEST_FORMAT, "version": 0, "tables": {}, "casts": {}, "retired": []}
    manifest = json.loads(path.read_text())
    # Format 1 named one file per table.
    manifest["tables"] = {
        name: [files] if isinstance(files, str) else list(files)
        for name, files in manifest.get("tables", {}).items()
    }
    return manifest


def _write_atomically(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _catalog_objects(con: duckdb.DuckDBPyConnection) -> tuple[list[tuple[str, str]], list[str]]:
    """The writer's tables (schema, name) and its views' CREATE statements, in the main file."""
    database = con.execute("SELECT current_database()").fetchone()[0]
    tables = [
        (r[0], r[1])
        for r in con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() "
            "WHERE database_name = ? AND NOT temporary AND NOT internal ORDER BY 1, 2",
            [database],
        ).fetchall()
    ]
    views = [
        r[0]
        for r in con.execute(
            "SELECT sql FROM duckdb_views() WHERE database_name = ? AND NOT temporary "
            "AND NOT internal AND schema_name NOT IN (SELECT unnest(?)) ORDER BY view_oid",
            [database, list(_SYSTEM_SCHEMAS)],
        ).fetchall()
    ]
    return tables, views


def publish(
    con: duckdb.DuckDBPyConnection,
    read_dir: Path,
    *,
    schemas: Iterable[str] | None = None,
    retain_seconds: float = 600.0,
    table_files: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Publish the tables of ``schemas`` (all tables when None; tables not yet published are
    always included) as the new read replica. Returns the new manifest.

    ``table_files`` names, for ``schema.table``, Parquet files said to hold exactly the
    committed table (a load that replaced it whole, ``LoadResult.table_files``): they are linked
    instead of writing the table again, after checking their columns, types and row count
    against the table; on any difference the table is written as usual.

    Runs on the writer's connection, after its COMMIT and while it still holds the file (so
    the tables read are exactly what was committed, and publishers of several processes take
    turns on the DuckDB file lock).
    """
    read_dir = Path(read_dir).resolve()
    reusable = dict(table_files or {})
    with _PUBLISH_LOCK:
        manifest = read_manifest(read_dir)
        tables, views = _catalog_objects(con)
        wanted = set(schemas) if schemas is not None else None
        current: dict[str, list[str]] = dict(manifest["tables"])
        now = time.time()
        version = int(manifest.get("version", 0)) + 1
        retired: list[dict[str, Any]] = list(manifest.get("retired", []))
        present = {f"{s}.{t}" for s, t in tables}

        casts: dict[str, dict[str, str]] = dict(manifest.get("casts", {}))

        def retire(name: str) -> None:
            retired.extend({"path": path, "at": now} for path in current.pop(name, []))
            casts.pop(name, None)

        for name in sorted(set(current) - present):  # dropped since the last publish
            retire(name)
        # One thread: an order-preserving COPY of wide nested rows with two buffers
        # out-of-order row groups (200,000 locations: 444 MB and 1.7-2.4 s with two threads,
        # 141 MB and 1.1-1.2 s with one).
        with one_thread(con):
            for schema, table in tables:
                name = f"{schema}.{table}"
                if wanted is not None and schema not in wanted and name in current:
                    continue
                folder = read_dir / "tables" / schema / table
                folder.mkdir(parents=True, exist_ok=True)
                sources = reusable.get(name)
                differing = _same_content(con, schema, table, sources) if sources else None
                if sources and differing is not None:
                    written = [
                        _link_or_copy(Path(src), folder / f"{version:08d}-{i}.parquet")
                        for i, src in enumerate(sources)
                    ]
                else:
                    target = folder / f"{version:08d}.parquet"
                    tmp = target.with_name(f".{target.name}.tmp")
                    con.execute(
                        f"COPY (SELECT * FROM {quote_ident(schema)}.{quote_ident(table)}) TO "
                        f"{sql_literal(str(tmp))} "
                        f"(FORMAT parquet, ROW_GROUP_SIZE {_ROW_GROUP_ROWS})"
                    )
                    os.replace(tmp, target)
                    written = [str(target)]
                retire(name)
                current[name] = written
                if sources and differing:
                    casts[name] = differing
        _write_atomically(
            read_dir / REPLICA_NAME, lambda tmp: _build_replica(tmp, current, views, casts)
        )
        kept = []
        for item in retired:
            if now - float(item["at"]) >= retain_seconds:
                with contextlib.suppress(FileNotFoundError):
                    Path(item["path"]).unlink()
            else:
                kept.append(item)
        new_manifest = {
            "format": MANIFEST_FORMAT,
            "version": version,
            "published_at": now,
            "tables": current,
            "casts": casts,
            "retired": kept,
        }
        _write_atomically(
            read_dir / MANIFEST_NAME,
            lambda tmp: tmp.write_text(json.dumps(new_manifest, indent=1, sort_keys=True)),
        )
        return new_manifest


def _same_content(
    con: duckdb.DuckDBPyConnection, schema: str, table: str, files: Sequence[str]
) -> dict[str, str] | None:
    """Whether ``files`` hold what the committed table holds, as far as their metadata can
    tell (the load that named them replaced the whole table from them, unchanged): each has
    the table's columns in order with its types, and together its row count. None if not;
    else the columns the replica's view must cast to the table's type: a column (or struct
    field, or list element) that is JSON in the files and VARCHAR in the table, e.g. one null
    in every row, which the table types VARCHAR. Both are the same strings in Parquet."""
    qualified = f"{quote_ident(schema)}.{quote_ident(table)}"
    want = [(r[0], r[1]) for r in con.execute(f"DESCRIBE SELECT * FROM {qualified}").fetchall()]
    rows = 0
    seen: list[tuple[str, str]] | None = None
    try:
        for path in files:
            got = [
                (r[0], r[1])
                for r in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()
            ]
            if seen is not None and got != seen:
                return None  # one view reads them all: they must agree with each other too
            seen = got
            meta = con.execute("SELECT num_rows FROM parquet_file_metadata(?)", [path]).fetchone()
            rows += int(meta[0]) if meta else 0
    except (duckdb.Error, OSError):
        return None  # a file gone or unreadable: write the table instead
    if seen is None or [n for n, _ in seen] != [n for n, _ in want]:
        return None
    differing: dict[str, str] = {}
    for (name, have), (_, table_type) in zip(seen, want, strict=True):
        if have == table_type:
            continue
        if _json_as_varchar(types.parse(have)) != types.parse(table_type):
            return None
        differing[name] = table_type
    count = con.execute(f"SELECT count(*) FROM {qualified}").fetchone()
    return differing if count and int(count[0]) == rows else None


def _json_as_varchar(t: types.Type) -> types.Type:
    if isinstance(t, types.Struct):
        return types.Struct(tuple((n, _json_as_varchar(f)) for n, f in t.fields))
    if isinstance(t, types.List):
        return types.List(_json_as_varchar(t.element))
    return types.Scalar("VARCHAR") if t.text == "JSON" else t


def _link_or_copy(source: Path, target: Path) -> str:
    """``target`` as a hard link to ``source`` (the export's immutable Parquet; no bytes
    written), or a copy where a link cannot be made (another file system)."""
    tmp = target.with_name(f".{target.name}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return str(target)


def _build_replica(
    path: Path,
    tables: dict[str, list[str]],
    views: list[str],
    casts: dict[str, dict[str, str]],
) -> None:
    """A fresh DuckDB file of views: each table over its current Parquet files (casting the
    columns ``casts`` names to the table's type), then the writer's own views (e.g.
    ``locations.evses``) as they are defined there."""
    with duckdb.connect(str(path)) as rep:
        for name, files in sorted(tables.items()):
            schema, table = name.split(".", 1)
            rep.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
            listed = ", ".join(sql_literal(f) for f in files)
            replace = ", ".join(
                f"CAST({quote_ident(col)} AS {type_}) AS {quote_ident(col)}"
                for col, type_ in casts.get(name, {}).items()
            )
            star = f"* REPLACE ({replace})" if replace else "*"
            rep.execute(
                f"CREATE VIEW {quote_ident(schema)}.{quote_ident(table)} AS "
                f"SELECT {star} FROM read_parquet([{listed}])"
            )
        for sql in views:
            with contextlib.suppress(duckdb.Error):
                # A view over a table that is gone fails to bind; it is left out.
                rep.execute(sql)


def open_replica(read_dir: Path) -> duckdb.DuckDBPyConnection:
    """The replica, read-only, able to read only its own Parquet files (no writes anywhere,
    no other files). Raises FileNotFoundError when nothing was published yet."""
    read_dir = Path(read_dir).resolve()
    path = read_dir / REPLICA_NAME
    if not path.exists():
        raise FileNotFoundError(path)
    con = duckdb.connect(str(path), read_only=True)
    con.execute(f"SET allowed_directories = [{sql_literal(str(read_dir / 'tables') + os.sep)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con
