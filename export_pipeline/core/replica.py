"""The read path of the embedded DuckDB warehouse: a replica readers open, never the writer's file.

DuckDB allows one writing process, and a read-only open fails while a writer holds the file,
so analysts cannot query ``warehouse.duckdb`` during a load. Instead, after each committed
load the writer *publishes* a read tier::

    <read_dir>/warehouse.duckdb                 views only; what readers open (read-only)
    <read_dir>/manifest.json                    which Parquet file is each table's current state
    <read_dir>/tables/<schema>/<table>/<n>.parquet   a table's current state, compacted, immutable

Publishing writes the tables the load changed as one Parquet file each (a new file, never an
existing one), builds a new replica file beside the old one and renames it over it (atomic on
POSIX). A reader holding the old replica keeps reading the old, consistent state; the next open
gets the new one. The writer never opens the published replica, so no lock is ever shared
between readers and the writer. Files a replica no longer names are deleted only after
``retain_seconds``, so a query on a replica opened just before a publish still finds them.

The current-state Parquet files are also what other tools read (one file per table, the whole
table, no deltas), listed in ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import duckdb

from export_pipeline.core.load import one_thread

REPLICA_NAME = "warehouse.duckdb"
MANIFEST_NAME = "manifest.json"
# Schemas never published (DuckDB's own).
_SYSTEM_SCHEMAS = ("information_schema", "pg_catalog")
# Rows per Parquet row group: the writer holds one in memory (DuckDB's default is 122,880
# rows whatever their width).
_ROW_GROUP_ROWS = 20_000
_PUBLISH_LOCK = threading.Lock()  # one publisher per process; the DuckDB file lock does the rest


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def read_manifest(read_dir: Path) -> dict[str, Any]:
    path = Path(read_dir) / MANIFEST_NAME
    if not path.exists():
        return {"version": 0, "tables": {}, "retired": []}
    return json.loads(path.read_text())


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
) -> dict[str, Any]:
    """Publish the tables of ``schemas`` (all tables when None; tables not yet published are
    always included) as the new read replica. Returns the new manifest.

    Runs on the writer's connection, after its COMMIT and while it still holds the file (so
    the tables read are exactly what was committed, and publishers of several processes take
    turns on the DuckDB file lock).
    """
    read_dir = Path(read_dir).resolve()
    with _PUBLISH_LOCK:
        manifest = read_manifest(read_dir)
        tables, views = _catalog_objects(con)
        wanted = set(schemas) if schemas is not None else None
        current: dict[str, str] = dict(manifest.get("tables", {}))
        now = time.time()
        version = int(manifest.get("version", 0)) + 1
        retired: list[dict[str, Any]] = list(manifest.get("retired", []))
        present = {f"{s}.{t}" for s, t in tables}
        for name in sorted(set(current) - present):  # dropped since the last publish
            retired.append({"path": current.pop(name), "at": now})
        # One thread: an order-preserving COPY of wide nested rows with two buffers
        # out-of-order row groups (200,000 locations: 444 MB and 1.7-2.4 s with two threads,
        # 141 MB and 1.1-1.2 s with one).
        with one_thread(con):
            for schema, table in tables:
                name = f"{schema}.{table}"
                if wanted is not None and schema not in wanted and name in current:
                    continue
                target = read_dir / "tables" / schema / table / f"{version:08d}.parquet"
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.tmp")
                con.execute(
                    f"COPY (SELECT * FROM {_quote(schema)}.{_quote(table)}) "
                    f"TO {_literal(str(tmp))} (FORMAT parquet, ROW_GROUP_SIZE {_ROW_GROUP_ROWS})"
                )
                os.replace(tmp, target)
                if name in current:
                    retired.append({"path": current[name], "at": now})
                current[name] = str(target)
        _write_atomically(read_dir / REPLICA_NAME, lambda tmp: _build_replica(tmp, current, views))
        kept = []
        for item in retired:
            if now - float(item["at"]) >= retain_seconds:
                with contextlib.suppress(FileNotFoundError):
                    Path(item["path"]).unlink()
            else:
                kept.append(item)
        new_manifest = {
            "version": version,
            "published_at": now,
            "tables": current,
            "retired": kept,
        }
        _write_atomically(
            read_dir / MANIFEST_NAME,
            lambda tmp: tmp.write_text(json.dumps(new_manifest, indent=1, sort_keys=True)),
        )
        return new_manifest


def _build_replica(path: Path, tables: dict[str, str], views: list[str]) -> None:
    """A fresh DuckDB file of views: each table over its current Parquet, then the writer's own
    views (e.g. ``locations.evses``) as they are defined there."""
    with duckdb.connect(str(path)) as rep:
        for name, parquet in sorted(tables.items()):
            schema, table = name.split(".", 1)
            rep.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(schema)}")
            rep.execute(
                f"CREATE VIEW {_quote(schema)}.{_quote(table)} AS "
                f"SELECT * FROM read_parquet({_literal(parquet)})"
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
    con.execute(f"SET allowed_directories = [{_literal(str(read_dir / 'tables') + os.sep)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con
