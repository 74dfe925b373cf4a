"""The replica's publish on its own: a table a load replaced whole is linked from the export's
Parquet (checked against the table first), anything else is written; old manifests still read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pytest

from export_pipeline.core import replica
from export_pipeline.core.replica import open_replica, publish, read_manifest


def export_file(path: Path, select: str) -> str:
    """A Parquet file as the normalise step writes one (DuckDB's COPY)."""
    with duckdb.connect() as con:
        con.execute(f"COPY ({select}) TO '{path}' (FORMAT parquet)")
    return str(path)


@pytest.fixture
def writer(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    con.execute("CREATE SCHEMA shop")
    yield con
    con.close()


def replica_rows(read_dir: Path, sql: str) -> list:
    con = open_replica(read_dir)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_table_replaced_whole_is_linked_not_written(
    writer: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    read_dir = tmp_path / "read"
    parts = [
        export_file(tmp_path / "p1.parquet", "SELECT i AS id, 'a' || i AS name FROM range(3) t(i)"),
        export_file(
            tmp_path / "p2.parquet", "SELECT i AS id, 'b' || i AS name FROM range(3, 5) t(i)"
        ),
    ]
    writer.execute(f"CREATE TABLE shop.orders AS SELECT * FROM read_parquet({parts})")
    manifest = publish(writer, read_dir, table_files={"shop.orders": parts})
    linked = manifest["tables"]["shop.orders"]
    assert len(linked) == 2
    # The same inodes as the export's files: nothing was written again.
    assert [os.stat(p).st_ino for p in linked] == [os.stat(p).st_ino for p in parts]
    assert all(Path(p).parent == read_dir / "tables" / "shop" / "orders" for p in linked)
    assert replica_rows(read_dir, "SELECT count(*), sum(id) FROM shop.orders") == [(5, 10)]
    assert read_manifest(read_dir)["tables"]["shop.orders"] == linked


@pytest.mark.parametrize(
    ("why", "table_sql"),
    [
        ("the table has a column more", "SELECT id, name, CAST(NULL AS VARCHAR) AS extra FROM src"),
        ("the columns' order differs", "SELECT name, id FROM src"),
        ("the row count differs", "SELECT * FROM src WHERE id > 0"),
        ("the types differ", "SELECT CAST(id AS INTEGER) AS id, name FROM src"),
    ],
)
def test_files_that_are_not_the_table_are_not_linked(
    writer: duckdb.DuckDBPyConnection, tmp_path: Path, why: str, table_sql: str
) -> None:
    read_dir = tmp_path / "read"
    part = export_file(
        tmp_path / "p.parquet", "SELECT i AS id, 'x' || i AS name FROM range(4) t(i)"
    )
    writer.execute(f"CREATE TEMP VIEW src AS SELECT * FROM read_parquet('{part}')")
    writer.execute(f"CREATE TABLE shop.orders AS {table_sql}")
    truth = writer.execute("SELECT count(*), sum(hash(s)) FROM shop.orders s").fetchall()
    manifest = publish(writer, read_dir, table_files={"shop.orders": [part]})
    (written,) = manifest["tables"]["shop.orders"]
    assert os.stat(written).st_ino != os.stat(part).st_ino, why
    assert replica_rows(read_dir, "SELECT count(*), sum(hash(s)) FROM shop.orders s") == truth


def test_a_gone_file_is_not_linked(writer: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    read_dir = tmp_path / "read"
    writer.execute("CREATE TABLE shop.orders AS SELECT 1 AS id")
    manifest = publish(writer, read_dir, table_files={"shop.orders": [str(tmp_path / "gone")]})
    assert replica_rows(read_dir, "SELECT id FROM shop.orders") == [(1,)]
    assert len(manifest["tables"]["shop.orders"]) == 1


def test_linked_files_are_retired_like_written_ones_and_old_manifests_read(
    writer: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    read_dir = tmp_path / "read"
    # A replica published by the previous format: one path per table.
    writer.execute("CREATE TABLE shop.orders AS SELECT 1 AS id")
    old = publish(writer, read_dir)
    (old_file,) = old["tables"]["shop.orders"]
    legacy = {**old, "tables": {"shop.orders": old_file}}
    legacy.pop("format")
    (read_dir / replica.MANIFEST_NAME).write_text(json.dumps(legacy))
    assert read_manifest(read_dir)["tables"]["shop.orders"] == [old_file]

    part = export_file(tmp_path / "p.parquet", "SELECT i AS id FROM range(3) t(i)")
    writer.execute(f"CREATE OR REPLACE TABLE shop.orders AS SELECT * FROM '{part}'")
    second = publish(writer, read_dir, table_files={"shop.orders": [part]}, retain_seconds=3600)
    assert second["retired"][-1]["path"] == old_file and Path(old_file).exists()
    (linked,) = second["tables"]["shop.orders"]

    writer.execute("INSERT INTO shop.orders VALUES (7)")
    third = publish(writer, read_dir, retain_seconds=0)  # retires at once what is unnamed
    assert not Path(old_file).exists() and not Path(linked).exists()
    assert Path(part).exists()  # the export's own file stays: only the replica's link went
    assert third["retired"] == []
    assert replica_rows(read_dir, "SELECT count(*) FROM shop.orders") == [(4,)]


def test_json_in_the_files_varchar_in_the_table_is_linked_and_read_as_varchar(
    writer: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    """A column null in every row is JSON in the export's Parquet (DuckDB's detection) and
    VARCHAR in the table: the same strings, so the files are linked and the replica's view
    casts to the table's types, in this publish and in later ones that keep the table."""
    read_dir = tmp_path / "read"
    part = export_file(
        tmp_path / "p.parquet",
        "SELECT i AS id, CAST(NULL AS JSON) AS j, {'a': CAST(NULL AS JSON), 'b': i} AS s "
        "FROM range(3) t(i)",
    )
    writer.execute("CREATE TABLE shop.orders (id BIGINT, j VARCHAR, s STRUCT(a VARCHAR, b BIGINT))")
    writer.execute(f"INSERT INTO shop.orders SELECT * FROM '{part}'")
    manifest = publish(writer, read_dir, table_files={"shop.orders": [part]})
    (linked,) = manifest["tables"]["shop.orders"]
    assert os.stat(linked).st_ino == os.stat(part).st_ino
    table_types = writer.execute("DESCRIBE shop.orders").fetchall()
    want = [(r[0], r[1]) for r in table_types]
    described = replica_rows(read_dir, "DESCRIBE shop.orders")
    assert [(r[0], r[1]) for r in described] == want
    writer.execute("CREATE SCHEMA other")
    writer.execute("CREATE TABLE other.t AS SELECT 1 AS x")
    later = publish(writer, read_dir, schemas=["other"])
    assert later["tables"]["shop.orders"] == [linked]
    assert [(r[0], r[1]) for r in replica_rows(read_dir, "DESCRIBE shop.orders")] == want
    assert replica_rows(read_dir, "SELECT sum(s.b), count(j) FROM shop.orders") == [(3, 0)]
