"""Which type changes each backend makes in place (pure rules of core/schema.py), and that the
lake's rules match what DuckLake 1.4.4 itself accepts."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from export_pipeline.core.schema import adds_json, parse, promotes_in_place
from export_pipeline.core.warehouse import DuckLakeWarehouse, close_lakes

CASES = [
    # (old, new, DuckDB file in place, DuckLake in place)
    ("INTEGER", "BIGINT", True, True),
    ("TINYINT", "INTEGER", True, True),
    ("BIGINT", "HUGEINT", True, False),
    ("FLOAT", "DOUBLE", False, True),
    ("BIGINT", "DOUBLE", False, False),
    ("BIGINT", "VARCHAR", False, False),
    ("VARCHAR", "JSON", False, False),
    ("STRUCT(a INTEGER)", "STRUCT(a BIGINT, b VARCHAR)", False, True),
    ("STRUCT(a BIGINT)", "STRUCT(a DOUBLE)", False, False),
    ("INTEGER[]", "BIGINT[]", False, True),
    ("STRUCT(w INTEGER)[]", "STRUCT(w BIGINT)[]", False, True),
    ("STRUCT(w BIGINT)[]", "STRUCT(w VARCHAR)[]", False, False),
]


@pytest.mark.parametrize(("old", "new", "file", "lake"), CASES)
def test_in_place_rules(old: str, new: str, file: bool, lake: bool) -> None:
    assert promotes_in_place(parse(old), parse(new), lake=False) is file
    assert promotes_in_place(parse(old), parse(new), lake=True) is lake


def test_a_struct_that_would_lose_a_field_is_not_in_place() -> None:
    # DuckLake accepts it (and drops the field's values): never a widening here.
    old, new = parse("STRUCT(a INTEGER, b VARCHAR)"), parse("STRUCT(a BIGINT)")
    assert not promotes_in_place(old, new, lake=True)


def test_the_lake_rules_are_what_ducklake_accepts(tmp_path: Path) -> None:
    """Each case's ALTER ... SET DATA TYPE on a real lake: accepted exactly when the rule says
    in place (the values read back unchanged), refused otherwise."""
    lake = DuckLakeWarehouse(str(tmp_path / "catalog.sqlite"), str(tmp_path / "files"))
    try:
        for number, (old, new, _, in_place) in enumerate(CASES):
            table = f"t{number}"
            with lake.transaction() as con:
                con.execute(f"CREATE TABLE {table} (v {old})")
                con.execute(f"INSERT INTO {table} SELECT NULL::{old}")
            try:
                with lake.transaction() as con:
                    con.execute(f"ALTER TABLE {table} ALTER COLUMN v SET DATA TYPE {new}")
                accepted = True
            except duckdb.Error:
                accepted = False
            assert accepted is in_place, (old, new)
    finally:
        close_lakes()


def test_adds_json() -> None:
    assert adds_json(None, parse("JSON"))
    assert adds_json(None, parse("STRUCT(a JSON)[]"))
    assert not adds_json(None, parse("STRUCT(a BIGINT)"))
    assert adds_json(parse("STRUCT(a BIGINT)"), parse("STRUCT(a BIGINT, b JSON)"))
    assert adds_json(parse("BIGINT"), parse("JSON"))
    assert not adds_json(parse("STRUCT(a JSON)"), parse("STRUCT(a JSON, b BIGINT)"))
