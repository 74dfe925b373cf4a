"""Parquet into a DuckDB file: merge, snapshot, partition replace, all inside the caller's txn."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest

from export_pipeline.core.errors import IntegrityError
from export_pipeline.core.load import ensure_views, load_parquet
from export_pipeline.core.model import ExportKind, LoadMode
from export_pipeline.core.sql import quote_ident
from export_pipeline.core.warehouse import close_lakes
from export_pipeline_tests.conftest import open_warehouse

KIND = ExportKind(provider="shop", name="orders", primary_key=("id",))


def parquet(tmp_path: Path, name: str, select: str) -> Path:
    """Write a Parquet file from a SELECT (the shape normalise produces: data + _source_file)."""
    path = tmp_path / f"{name}.parquet"
    con = duckdb.connect()
    con.execute(f"COPY ({select}) TO '{path}' (FORMAT parquet)")
    con.close()
    return path


def rows(values: str, source: str = "part-1.jsonl") -> str:
    return f"SELECT *, '{source}' AS _source_file FROM (VALUES {values}) AS v(id, amount)"


@pytest.fixture
def con(backend: str, tmp_path: Path) -> duckdb.DuckDBPyConnection:
    """A connection to a warehouse on disk: the DuckDB file, then a DuckLake lake."""
    with open_warehouse(backend, tmp_path / "wh").connect() as connection:
        yield connection


@contextlib.contextmanager
def reopened(backend: str, tmp_path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """What another process sees: a new DuckDB instance on the same files."""
    close_lakes()
    with open_warehouse(backend, tmp_path / "wh").connect() as connection:
        yield connection


def load(con: duckdb.DuckDBPyConnection, kind: ExportKind, paths: list[Path], **kw: str):
    con.execute("BEGIN")
    result = load_parquet(con, kind, paths, **kw)
    con.execute("COMMIT")
    return result


def table(con: duckdb.DuckDBPyConnection, sql: str = "SELECT id, amount FROM shop.orders") -> list:
    return con.execute(sql + " ORDER BY 1").fetchall()


def test_quote_ident() -> None:
    assert quote_ident('we"ird') == '"we""ird"'


def test_merge_counts_inserts_and_updates(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    first = load(con, KIND, [parquet(tmp_path, "a", rows("(1, 10), (2, 20)"))])
    assert (first.rows_inserted, first.rows_updated, first.table_rows) == (2, 0, 2)
    second = load(con, KIND, [parquet(tmp_path, "b", rows("(2, 21), (3, 30)"))])
    assert (second.rows_in_export, second.rows_inserted, second.rows_updated) == (2, 1, 1)
    assert second.rows_deleted == 0 and second.table_rows == 3
    assert table(con) == [(1, 10), (2, 21), (3, 30)]


def test_duplicate_keys_keep_last_occurrence(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    p1 = parquet(tmp_path, "p1", rows("(1, 10), (2, 20), (1, 11)", "part-1.jsonl"))
    p2 = parquet(tmp_path, "p2", rows("(2, 22)", "part-2.jsonl"))
    result = load(con, KIND, [p2, p1])  # list order must not matter; _source_file decides
    assert result.rows_in_export == 2
    assert table(con) == [(1, 11), (2, 22)]


@pytest.mark.parametrize("mode", [LoadMode.SNAPSHOT, LoadMode.MERGE])
def test_keys_with_nulls_are_equal_when_duplicates_are_found(
    con: duckdb.DuckDBPyConnection, tmp_path: Path, mode: LoadMode
) -> None:
    """A composite key with a NULL part occurs twice: found as a duplicate (the merge matches
    keys with IS NOT DISTINCT FROM), so the last occurrence is the one row loaded."""
    kind = replace(KIND, primary_key=("id", "site"), load_mode=mode)
    select = (
        "SELECT *, 'part-1.jsonl' AS _source_file FROM "
        "(VALUES (1, NULL, 10), (2, 'b', 20), (1, NULL, 11)) AS v(id, site, amount)"
    )
    result = load(con, kind, [parquet(tmp_path, "p", select)])
    assert result.rows_in_export == 2
    assert table(con, "SELECT id, site, amount FROM shop.orders") == [(1, None, 11), (2, "b", 20)]


def test_new_column_is_added_and_missing_become_null(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    load(con, KIND, [parquet(tmp_path, "a", rows("(1, 10)"))])
    wider = "SELECT 2 AS id, 'note' AS \"odd \"\"name\", 'x.jsonl' AS _source_file"
    result = load(con, KIND, [parquet(tmp_path, "b", wider)])
    assert result.rows_inserted == 1
    got = table(con, 'SELECT id, amount, "odd ""name" FROM shop.orders')
    assert got == [(1, 10, None), (2, None, "note")]


def test_snapshot_removes_missing_rows(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    kind = replace(KIND, load_mode=LoadMode.SNAPSHOT)
    load(con, kind, [parquet(tmp_path, "a", rows("(1, 10), (2, 20), (3, 30)"))])
    result = load(con, kind, [parquet(tmp_path, "b", rows("(2, 21), (4, 40)"))])
    assert (result.rows_inserted, result.rows_updated, result.rows_deleted) == (1, 1, 2)
    assert table(con) == [(2, 21), (4, 40)]
    emptied = load(con, kind, [])
    assert (emptied.rows_deleted, emptied.table_rows) == (2, 0)


def test_table_files_name_the_export_only_when_it_is_the_whole_table(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    """``table_files`` (what the read replica may link instead of writing the table) is set
    only when the table holds exactly the export's rows, as the files hold them."""
    a = parquet(tmp_path, "a", rows("(1, 10), (2, 20)"))
    first = load(con, KIND, [a])  # the first merge into a new table: the table is the file
    assert first.table_files == (str(a),)
    second = load(con, KIND, [parquet(tmp_path, "b", rows("(2, 21), (3, 30)"))])
    assert second.table_files == () and second.table_rows == 3  # merged with older rows
    snap = replace(KIND, load_mode=LoadMode.SNAPSHOT)
    c1 = parquet(tmp_path, "c1", rows("(5, 50)", "part-1.jsonl"))
    c2 = parquet(tmp_path, "c2", rows("(6, 60)", "part-2.jsonl"))
    whole = load(con, snap, [c1, c2])
    assert whole.table_files == (str(c1), str(c2))
    assert (whole.rows_updated, whole.rows_deleted, whole.table_rows) == (0, 3, 2)
    # Duplicate keys: the table is the de-duplicated rows, not the files.
    dup = load(con, snap, [parquet(tmp_path, "d", rows("(7, 70), (7, 71)"))])
    assert dup.table_files == () and dup.table_rows == 1


def test_counts_follow_what_delete_and_insert_did(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    """table_rows comes from the DELETE and INSERT counts: check it against a real count in
    each mode, including keys that were there and keys that were not."""
    snap = replace(KIND, load_mode=LoadMode.SNAPSHOT)
    for i, (kind, values) in enumerate(
        [
            (KIND, "(1, 10), (2, 20), (3, 30)"),
            (KIND, "(3, 31), (4, 40)"),
            (KIND, "(9, 90)"),
            (snap, "(4, 41), (5, 50)"),
            (snap, "(6, 60)"),
            (KIND, "(6, 61), (7, 70)"),
        ]
    ):
        result = load(con, kind, [parquet(tmp_path, f"v{i}", rows(values))])
        counted = con.execute("SELECT count(*) FROM shop.orders").fetchone()[0]
        assert result.table_rows == counted, (i, result)
    assert table(con) == [(6, 61), (7, 70)]


def test_empty_merge_changes_nothing(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    load(con, KIND, [parquet(tmp_path, "a", rows("(1, 10)"))])
    result = load(con, KIND, [])
    assert result.table_rows == 1 and result.rows_deleted == 0
    assert table(con) == [(1, 10)]


def test_partition_replace_touches_only_its_partition(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    kind = replace(KIND, load_mode=LoadMode.REPLACE_PARTITION, partition_column="day")

    def day_rows(name: str, values: str) -> Path:
        return parquet(tmp_path, name, f"SELECT * FROM (VALUES {values}) AS v(id, amount, day)")

    load(
        con,
        kind,
        [day_rows("d1", "(1, 10, '2024-05-01'), (2, 20, '2024-05-01')")],
        partition_value="2024-05-01",
    )
    load(con, kind, [day_rows("d2", "(3, 30, '2024-05-02')")], partition_value="2024-05-02")
    result = load(
        con, kind, [day_rows("d1b", "(2, 21, '2024-05-01')")], partition_value="2024-05-01"
    )
    assert (result.rows_updated, result.rows_deleted, result.table_rows) == (1, 1, 2)
    assert table(con, "SELECT id, amount, day FROM shop.orders") == [
        (2, 21, "2024-05-01"),
        (3, 30, "2024-05-02"),
    ]
    stray = day_rows("bad", "(9, 90, '2024-05-03')")
    con.execute("BEGIN")
    with pytest.raises(IntegrityError):
        load_parquet(con, kind, [stray], partition_value="2024-05-01")
    con.execute("ROLLBACK")
    assert len(table(con)) == 2


def test_caller_rollback_undoes_everything(
    con: duckdb.DuckDBPyConnection, tmp_path: Path, backend: str
) -> None:
    load(con, KIND, [parquet(tmp_path, "a", rows("(1, 10)"))])
    con.execute("BEGIN")
    result = load_parquet(con, KIND, [parquet(tmp_path, "b", rows("(1, 99), (2, 20)"))])
    assert result.table_rows == 2
    # Still inside our transaction: if load_parquet had committed, this would raise.
    con.execute("ROLLBACK")
    assert table(con) == [(1, 10)]
    con.close()
    with reopened(backend, tmp_path) as fresh:
        assert fresh.execute("SELECT id, amount FROM shop.orders").fetchall() == [(1, 10)]


def test_rollback_also_undoes_table_creation(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    con.execute("BEGIN")
    load_parquet(con, KIND, [parquet(tmp_path, "a", rows("(1, 10)"))])
    con.execute("ROLLBACK")
    assert con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'orders'"
    ).fetchone() == (0,)


def test_views(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    kind = replace(KIND, views={"big_orders": "SELECT id FROM shop.orders WHERE amount > 15"})
    load(con, kind, [parquet(tmp_path, "a", rows("(1, 10), (2, 20)"))])
    ensure_views(con, kind)
    assert con.execute("SELECT * FROM shop.big_orders").fetchall() == [(2,)]
