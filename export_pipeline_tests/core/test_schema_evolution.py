"""Every key lands (declared columns are hints, not a filter), the table evolves, and errors
point at the right line. Files -> Parquet -> DuckDB on disk, through the real code."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from export_pipeline.core.checks import values_in_range
from export_pipeline.core.errors import IntegrityError, ParseError
from export_pipeline.core.load import SCHEMA_FROZEN, LoadResult, load_parquet
from export_pipeline.core.model import ExportKind, LoadMode, SchemaContract
from export_pipeline.core.normalise import to_parquet
from export_pipeline.core.warehouse import DuckLakeWarehouse, Warehouse
from export_pipeline_tests.conftest import open_warehouse
from export_pipeline_tests.core.test_normalise import EVSES, KIND

LOADED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def embedded(tmp_path: Path) -> Warehouse:
    """The DuckDB file on disk (cases that say nothing backend-specific run on it alone)."""
    return open_warehouse("duckdb", tmp_path / "wh")


@pytest.fixture
def warehouse(backend: str, tmp_path: Path) -> Warehouse:
    """Each backend on disk in turn: the DuckDB file, then a DuckLake lake (SQLite catalog)."""
    return open_warehouse(backend, tmp_path / "wh")


def _ingest(
    tmp_path: Path, kind: ExportKind, files: list[Path], export_id: str, warehouse: Warehouse
) -> tuple[LoadResult, Any]:
    """Normalise the files and load them in one warehouse transaction (one lake snapshot)."""
    normalised = to_parquet(
        files, tmp_path / f"pq-{export_id}", kind=kind, export_id=export_id, loaded_at=LOADED_AT
    )
    before = _snapshot_count(warehouse)
    with warehouse.transaction() as con:
        result = load_parquet(con, kind, normalised.parquet_paths)
    if isinstance(warehouse, DuckLakeWarehouse):
        assert _snapshot_count(warehouse) == before + 1  # schema change and rows: one snapshot
    return result, normalised


def _snapshot_count(warehouse: Warehouse) -> int:
    return len(warehouse.snapshots()) if isinstance(warehouse, DuckLakeWarehouse) else 0


def _query(warehouse: Warehouse, sql: str) -> list[tuple]:
    with warehouse.connect() as con:
        return con.execute(sql).fetchall()


def _types(warehouse: Warehouse, table: str = "locations.locations") -> dict[str, str]:
    return {r[0]: r[1] for r in _query(warehouse, f"DESCRIBE {table}")}


def test_keys_first_seen_after_200000_records_land_top_level_and_nested(
    tmp_path: Path, embedded: Warehouse
) -> None:
    src = tmp_path / "big.jsonl"
    line = (
        '{"id": "L%d", "name": "n", "capacity": 1, "last_updated": "2024-04-30T10:00:00Z", '
        '"evses": [{"uid": "E", "connectors": [{"id": "C", "max_power": 22.0}]}]}\n'
    )
    with src.open("w") as fh:
        fh.writelines(line % i for i in range(200_000))
        late = {
            "id": "LATE",
            "capacity": 2,
            "parking_type": "ON_STREET",
            "evses": [
                {
                    "uid": "E9",
                    "floor_level": "-1",
                    "connectors": [{"id": "C9", "max_power": 11, "tariff_ids": ["T1"]}],
                }
            ],
        }
        fh.write(json.dumps(late) + "\n")
    _, normalised = _ingest(tmp_path, KIND, [src], "E1", embedded)
    assert normalised.rows == 200_001
    assert normalised.missing_columns == []
    row = _query(
        embedded,
        "SELECT parking_type, evses[1].floor_level, evses[1].connectors[1].tariff_ids, "
        "capacity, evses[1].connectors[1].max_power FROM locations.locations WHERE id = 'LATE'",
    )
    assert row == [("ON_STREET", "-1", ["T1"], 2, 11.0)]
    types = _types(embedded)
    assert types["capacity"] == "BIGINT"  # the declared hint still types the declared columns
    assert types["last_updated"] == "TIMESTAMP WITH TIME ZONE"


def _write_records(path: Path, records: list[dict[str, Any]]) -> Path:
    """``records`` as a JSON array (``.json``) or JSON Lines (``.jsonl``)."""
    if path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _location(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"L{i}",
        "name": f"n{i}",
        "capacity": i,
        "evses": [{"uid": f"E{i}", "connectors": [{"id": f"C{i}", "max_power": 7.5}]}],
        "last_updated": "2024-04-30T10:00:00+00:00",
        **extra,
    }


def test_csv_with_missing_and_extra_nested_keys_gives_the_json_table(tmp_path: Path) -> None:
    records = [
        _location(1),
        # an extra nested key and a missing one (no connectors), and an operator object
        {**_location(2), "evses": [{"uid": "E2", "floor_level": "2"}]},
        {**_location(3), "operator": {"name": "Op"}},
        {**_location(4), "operator": {"name": "Op2", "website": "https://x"}},
    ]
    as_json = tmp_path / "json" / "export.json"
    as_json.parent.mkdir()
    as_json.write_text(json.dumps(records))
    as_csv = tmp_path / "csv" / "export.csv"
    as_csv.parent.mkdir()
    header = ["id", "name", "capacity", "evses", "last_updated", "operator"]
    with as_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in records:
            writer.writerow(
                [
                    json.dumps(r[c]) if isinstance(r.get(c), (dict, list)) else r.get(c, "")
                    for c in header
                ]
            )
    kind = replace(KIND, columns={**(KIND.columns or {}), "operator": "STRUCT(name VARCHAR)"})
    tables = []
    for name, src in (("j", as_json), ("c", as_csv)):
        out = to_parquet([src], tmp_path / name, kind=kind, export_id="X", loaded_at=LOADED_AT)
        with duckdb.connect() as con:
            path = str(out.parquet_paths[0])
            tables.append(
                (
                    con.execute(
                        f"DESCRIBE SELECT * EXCLUDE (_source_file) FROM read_parquet('{path}')"
                    ).fetchall(),
                    con.execute(
                        f"SELECT * EXCLUDE (_source_file) FROM read_parquet('{path}') ORDER BY id"
                    ).fetchall(),
                )
            )
    assert tables[0] == tables[1]
    types = {r[0]: r[1] for r in tables[0][0]}
    assert "floor_level" in types["evses"] and "website" in types["operator"]


def test_deliveries_header_decides_the_columns(tmp_path: Path, embedded: Warehouse) -> None:
    """A declared column the file lacks is reported, not invented; an extra one lands; the range
    check does not count NULLs of an optional column as out of range."""
    kind = ExportKind(
        provider="deliveries",
        name="outbound_messages",
        primary_key=("id",),
        columns={"id": "VARCHAR", "attempt_count": "INTEGER", "endpoint_url": "VARCHAR"},
        value_ranges={"attempt_count": (0, 1000)},
    )
    src = tmp_path / "export.csv"
    src.write_text("id,attempt_count,region\nm1,3,eu\nm2,,us\n")
    _, normalised = _ingest(tmp_path, kind, [src], "D1", embedded)
    assert normalised.missing_columns == ["endpoint_url"]
    types = _types(embedded, "deliveries.outbound_messages")
    assert "endpoint_url" not in types and types["region"] == "VARCHAR"
    assert types["attempt_count"] == "INTEGER"
    with embedded.connect() as con:
        outcome = values_in_range(con, kind)
        assert outcome.passed, outcome.description
        strict = values_in_range(con, replace(kind, not_null=("attempt_count",)))
        assert not strict.passed and strict.metadata["out_of_range_attempt_count"] == 1


def test_all_null_column_is_typed_then_widened_by_the_next_export(
    tmp_path: Path, warehouse: Warehouse
) -> None:
    kind = ExportKind(provider="mews", name="bill", primary_key=("Id",), load_mode=LoadMode.MERGE)
    first = tmp_path / "a.jsonl"
    first.write_text('{"Id": "1", "PaidUtc": null, "Note": null}\n{"Id": "2", "Note": null}\n')
    _ingest(tmp_path, kind, [first], "A", warehouse)
    types = _types(warehouse, "mews.bill")
    assert types["PaidUtc"] == "VARCHAR" and types["Note"] == "VARCHAR"  # never NULL
    assert all(t != "NULL" and '"NULL"' not in t for t in types.values())
    second = tmp_path / "b.jsonl"
    second.write_text('{"Id": "3", "PaidUtc": "2024-01-02T03:04:05Z", "Note": {"x": 1}}\n')
    result, _ = _ingest(tmp_path, kind, [second], "B", warehouse)
    types = _types(warehouse, "mews.bill")
    assert types["PaidUtc"].startswith("TIMESTAMP")
    assert types["Note"] == "STRUCT(x BIGINT)"
    assert any(c.startswith("PaidUtc widened VARCHAR -> TIMESTAMP") for c in result.columns_changed)
    assert _query(warehouse, "SELECT Id, Note.x, year(PaidUtc) FROM mews.bill ORDER BY Id") == [
        ("1", None, None),
        ("2", None, None),
        ("3", 1, 2024),
    ]


_BILL = ExportKind(
    provider="mews",
    name="bill",
    primary_key=("Id",),
    load_mode=LoadMode.MERGE,
    columns={
        "Id": "VARCHAR",
        "PaidUtc": "TIMESTAMPTZ",
        "CompanyId": "UUID",
        "Owner": "STRUCT(Id UUID, Since TIMESTAMPTZ)",
    },
)


@pytest.mark.parametrize("scan", ["sampled", "full"])
def test_an_all_null_declared_column_takes_its_declared_type(
    tmp_path: Path, warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch, scan: str
) -> None:
    """A declared column (or struct field) null in every record of an export is created with
    its declared type, in the Parquet and in the table, not as the VARCHAR of a guess: Mews
    sends CompanyId and ReleasedUtc as null until a reservation has them."""
    if scan == "full":
        import export_pipeline.core.normalise as normalise

        monkeypatch.setattr(normalise, "_sampled_json_to_parquet", lambda *a, **k: None)
    first = tmp_path / "a.jsonl"
    first.write_text(
        '{"Id": "1", "PaidUtc": null, "CompanyId": null, "Owner": {"Id": null, "Since": null}}\n'
        '{"Id": "2", "PaidUtc": null, "CompanyId": null, "Owner": null, "Note": null}\n'
    )
    _, normalised = _ingest(tmp_path, _BILL, [first], "A", warehouse)
    parquet = dict(normalised.columns)
    if scan == "sampled":
        assert parquet["PaidUtc"] == "TIMESTAMP WITH TIME ZONE"
        assert parquet["CompanyId"] == "UUID"
    types = _types(warehouse, "mews.bill")
    assert types["PaidUtc"] == "TIMESTAMP WITH TIME ZONE"
    assert types["CompanyId"] == "UUID"
    assert types["Owner"] == "STRUCT(Id UUID, Since TIMESTAMP WITH TIME ZONE)"
    assert types["Note"] == "VARCHAR"  # undeclared: VARCHAR, never NULL
    second = tmp_path / "b.jsonl"
    second.write_text(
        '{"Id": "3", "PaidUtc": "2024-01-02T03:04:05Z", '
        '"CompanyId": "6f1c3b2a-1d2e-4f5a-8b9c-0d1e2f3a4b5c", "Owner": null}\n'
    )
    _ingest(tmp_path, _BILL, [second], "B", warehouse)
    assert _types(warehouse, "mews.bill")["CompanyId"] == "UUID"
    assert _query(
        warehouse, "SELECT Id, CAST(CompanyId AS VARCHAR), year(PaidUtc) FROM mews.bill ORDER BY Id"
    ) == [("1", None, None), ("2", None, None), ("3", "6f1c3b2a-1d2e-4f5a-8b9c-0d1e2f3a4b5c", 2024)]


def _guess_then_declared(tmp_path: Path, warehouse: Warehouse, declared: ExportKind) -> LoadResult:
    """An export of ``CompanyId`` null in every record loaded undeclared (the table gets the
    VARCHAR of a guess), then one more loaded as ``declared``; the second load's result."""
    first = tmp_path / "a.jsonl"
    first.write_text('{"Id": "1", "CompanyId": null}\n')
    undeclared = replace(declared, columns={"Id": "VARCHAR"}, schema_contract=SchemaContract.EVOLVE)
    _ingest(tmp_path, undeclared, [first], "A", warehouse)
    assert _types(warehouse, "mews.bill")["CompanyId"] == "VARCHAR"
    second = tmp_path / "b.jsonl"
    second.write_text('{"Id": "2", "CompanyId": null}\n')
    return _ingest(tmp_path, declared, [second], "B", warehouse)[0]


@pytest.mark.parametrize("scan", ["sampled", "full"])
def test_a_column_created_as_a_guess_takes_its_declared_type_at_the_next_load(
    tmp_path: Path, warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch, scan: str
) -> None:
    """A table made before the column was declared (or by an earlier version) holds an all-null
    column as VARCHAR; the next load, with the declaration, gives it the declared type."""
    if scan == "full":
        import export_pipeline.core.normalise as normalise

        monkeypatch.setattr(normalise, "_sampled_json_to_parquet", lambda *a, **k: None)
    result = _guess_then_declared(tmp_path, warehouse, _BILL)
    assert _types(warehouse, "mews.bill")["CompanyId"] == "UUID"
    assert any(c.startswith("CompanyId") for c in result.columns_changed)
    assert _query(warehouse, "SELECT count(*) FROM mews.bill WHERE CompanyId IS NULL") == [(2,)]


def test_type_change_across_two_exports_widens_and_keeps_every_value(
    tmp_path: Path, warehouse: Warehouse
) -> None:
    kind = ExportKind(
        provider="p", name="t", primary_key=("id",), columns={"n": "BIGINT", "small": "INTEGER"}
    )
    lake = isinstance(warehouse, DuckLakeWarehouse)

    def load(export_id: str, line: str) -> LoadResult:
        src = tmp_path / f"{export_id}.jsonl"
        src.write_text(line + "\n")
        return _ingest(tmp_path, kind, [src], export_id, warehouse)[0]

    load("A", '{"id": 1, "n": 5, "small": 7, "s": {"k": 1}, "z": "z1"}')
    after_a = warehouse.last_committed_snapshot()
    files_a = _data_files(warehouse)
    assert (_types(warehouse, "p.t")["n"], _types(warehouse, "p.t")["small"]) == (
        "BIGINT",
        "INTEGER",
    )
    # Changes every backend makes in place: a wider integer, a new struct field, a new column.
    result = load(
        "B", '{"id": 2, "n": 6, "small": 5000000000, "s": {"k": 2, "new": true}, "extra": "e"}'
    )
    assert result.columns_added == ("extra",)
    assert set(result.columns_changed) == {
        "small widened INTEGER -> BIGINT",
        "s.new added (BOOLEAN)",
    }
    assert files_a <= _data_files(warehouse)  # the lake kept the first load's data files
    # A fraction, then text: DuckLake cannot retype these in place, so it rewrites the table.
    result = load("C", '{"id": 3, "n": 2.5}')
    after_c = warehouse.last_committed_snapshot()
    assert result.columns_changed == ("n widened BIGINT -> DOUBLE",)
    load("D", '{"id": 4, "n": "lots"}')
    types = _types(warehouse, "p.t")
    assert (types["n"], types["small"]) == ("VARCHAR", "BIGINT")
    assert list(types) == [
        "id",
        "n",
        "small",
        "s",
        "z",
        "_export_id",
        "_source_file",
        "_loaded_at",
        "extra",
    ]
    assert _query(warehouse, "SELECT id, n, small, s.k, s.new, z FROM p.t ORDER BY id") == [
        (1, "5.0", 7, 1, None, "z1"),
        (2, "6.0", 5_000_000_000, 2, True, None),
        (3, "2.5", None, None, None, None),
        (4, "lots", None, None, None, None),
    ]
    if lake:
        assert not files_a & _data_files(warehouse)  # rewritten
        # Time travel still reads each earlier snapshot with its own types and values.
        assert _query(warehouse, f"SELECT n, small FROM p.t AT (VERSION => {after_a})") == [(5, 7)]
        assert _query(
            warehouse, f"SELECT id, n FROM p.t AT (VERSION => {after_c}) ORDER BY id"
        ) == [(1, 5.0), (2, 6.0), (3, 2.5)]


def _data_files(warehouse: Warehouse) -> set[str]:
    """The lake's data files of ``p.t`` (empty for the DuckDB file)."""
    if not isinstance(warehouse, DuckLakeWarehouse):
        return set()
    rows = _query(
        warehouse, "SELECT data_file FROM ducklake_list_files('lake', 't', schema => 'p')"
    )
    return {r[0] for r in rows}


def test_nested_struct_fields_widen_and_keep_every_value(
    tmp_path: Path, warehouse: Warehouse
) -> None:
    """A struct field (also inside a list) changes type: the whole column is retyped (the
    lake rewrites it), every earlier value is kept in the wider type."""
    kind = ExportKind(provider="p", name="nested", primary_key=("id",))
    a = tmp_path / "a.jsonl"
    a.write_text('{"id": 1, "s": {"k": 1, "tags": [{"w": 1}]}, "c": {"m": 1, "i": 3}}\n')
    _ingest(tmp_path, kind, [a], "A", warehouse)
    b = tmp_path / "b.jsonl"
    b.write_text(
        '{"id": 2, "s": {"k": 2.5, "tags": [{"w": "heavy"}]}, "c": {"m": {"deep": true}}}\n'
    )
    result, _ = _ingest(tmp_path, kind, [b], "B", warehouse)
    assert set(result.columns_changed) >= {
        "s.k widened BIGINT -> DOUBLE",
        "s.tags[].w widened BIGINT -> VARCHAR",
        "c.m widened BIGINT -> JSON",
    }
    types = _types(warehouse, "p.nested")
    assert types["s"] == "STRUCT(k DOUBLE, tags STRUCT(w VARCHAR)[])"
    assert types["c"] == "STRUCT(m JSON, i BIGINT)"
    assert _query(
        warehouse, "SELECT id, s.k, s.tags[1].w, c.m::VARCHAR, c.i FROM p.nested ORDER BY id"
    ) == [(1, 1.0, "1", "1", 3), (2, 2.5, "heavy", '{"deep":true}', None)]


def test_csv_value_that_does_not_fit_its_declared_type_is_kept_as_text(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name,capacity,evses,last_updated\nA,x,1,[],\nB,y,lots,[],\n")
    out = to_parquet([bad], tmp_path / "o", kind=KIND, export_id="X", loaded_at=LOADED_AT)
    assert out.drifted_columns == {"capacity": "VARCHAR"}
    with duckdb.connect() as con:
        got = con.execute(
            f"SELECT capacity FROM read_parquet('{out.parquet_paths[0]}') ORDER BY id"
        ).fetchall()
    assert got == [("1",), ("lots",)]


def test_frozen_schema_fails_clearly_and_changes_nothing(
    tmp_path: Path, embedded: Warehouse
) -> None:
    kind = ExportKind(
        provider="p",
        name="f",
        primary_key=("id",),
        columns={"id": "BIGINT", "v": "VARCHAR"},
        schema_contract=SchemaContract.FREEZE,
    )
    a = tmp_path / "a.jsonl"
    a.write_text('{"id": 1, "v": "x"}\n')
    _ingest(tmp_path, kind, [a], "A", embedded)
    b = tmp_path / "b.jsonl"
    b.write_text('{"id": 2, "v": "y", "surprise": 1}\n')
    with pytest.raises(IntegrityError) as info:
        _ingest(tmp_path, kind, [b], "B", embedded)
    assert info.value.code == SCHEMA_FROZEN and "surprise" in str(info.value)
    assert _query(embedded, "SELECT id FROM p.f") == [(1,)]
    assert "surprise" not in _types(embedded, "p.f")


def test_a_frozen_schema_lets_a_guess_take_the_declared_type_but_fails_a_drift(
    tmp_path: Path, embedded: Warehouse
) -> None:
    """Freezing holds the table to the declaration: an all-null column created as VARCHAR
    before it was declared takes its declared type; a declared column widening fails."""
    frozen = replace(_BILL, schema_contract=SchemaContract.FREEZE)
    _guess_then_declared(tmp_path, embedded, frozen)
    assert _types(embedded, "mews.bill")["CompanyId"] == "UUID"
    c = tmp_path / "c.jsonl"
    c.write_text('{"Id": "3", "CompanyId": "not a uuid"}\n')
    with pytest.raises(IntegrityError) as info:
        _ingest(tmp_path, frozen, [c], "C", embedded)
    assert info.value.code == SCHEMA_FROZEN and "CompanyId" in str(info.value)
    assert _types(embedded, "mews.bill")["CompanyId"] == "UUID"


def test_line_numbers_one_per_message(tmp_path: Path) -> None:
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"id": "A"}\n\n{"id": "B"}\n{"id": "C", "name": }\n{"id": "D"}\n')
    array = tmp_path / "bad.json"
    array.write_text('[\n  {"id": "A"},\n  {"id": "B"},\n  {"id": "C",\n   "name": }\n]\n')
    ragged = tmp_path / "ragged.csv"
    ragged.write_text('id,name\nA,x\nB,"multi\nline"\nC,y,z\nD,w\n')
    for src, line in ((jsonl, 4), (array, 5), (ragged, 5)):
        with pytest.raises(ParseError) as info:
            to_parquet([src], tmp_path / "o", kind=KIND, export_id="X1", loaded_at=LOADED_AT)
        err = info.value
        assert (err.file, err.line, err.provider, err.export_id) == (
            src.name,
            line,
            "locations",
            "X1",
        )
        numbers = {int(n) for n in __import__("re").findall(r"line\D{0,3}(\d+)", str(err))}
        assert numbers == {line}, str(err)


def test_new_json_column_and_field_land_in_place(tmp_path: Path, warehouse: Warehouse) -> None:
    """A new column (and a new struct field) whose values mix objects and numbers is JSON.
    DuckLake 1.4.4 cannot write a JSON column added by ALTER in the same transaction, so the
    lake rewrites the table for it; the DuckDB file adds it in place."""
    kind = ExportKind(provider="p", name="mixed", primary_key=("id",))
    a = tmp_path / "a.jsonl"
    a.write_text('{"id": 1, "s": {"k": 1}}\n')
    _ingest(tmp_path, kind, [a], "A", warehouse)
    b = tmp_path / "b.jsonl"
    b.write_text(
        '{"id": 2, "mix": 1, "s": {"k": 2, "any": [1]}}\n'
        '{"id": 3, "mix": {"a": 1}, "s": {"k": 3, "any": {"b": 2}}}\n'
    )
    result, _ = _ingest(tmp_path, kind, [b], "B", warehouse)
    assert result.columns_added == ("mix",)
    assert result.columns_changed == ("s.any added (JSON)",)
    types = _types(warehouse, "p.mixed")
    assert (types["mix"], types["s"]) == ("JSON", 'STRUCT(k BIGINT, "any" JSON)')
    assert _query(
        warehouse, "SELECT id, mix::VARCHAR, s.k, s.any::VARCHAR FROM p.mixed ORDER BY id"
    ) == [(1, None, 1, None), (2, "1", 2, "[1]"), (3, '{"a":1}', 3, '{"b":2}')]


def test_text_inside_structs_and_lists_widened_to_json_keeps_its_values(
    tmp_path: Path, warehouse: Warehouse
) -> None:
    """A struct field and a list element that held text become JSON when objects arrive: the
    text already loaded is kept as JSON strings (a cast would parse it as JSON and fail), and a
    later export bringing text again loads into the JSON field."""
    kind = ExportKind(provider="p", name="notes", primary_key=("id",))
    lines = {
        "A": '{"id": 1, "s": {"note": "hello"}, "tags": ["a"]}',
        "B": '{"id": 2, "s": {"note": {"rich": true}}, "tags": [{"t": 1}]}',
        "C": '{"id": 3, "s": {"note": "again"}, "tags": ["c"]}',
    }
    for export_id, line in lines.items():
        src = tmp_path / f"{export_id}.jsonl"
        src.write_text(line + "\n")
        _ingest(tmp_path, kind, [src], export_id, warehouse)
    types = _types(warehouse, "p.notes")
    assert (types["s"], types["tags"]) == ("STRUCT(note JSON)", "JSON[]")
    assert _query(
        warehouse, "SELECT id, s.note::VARCHAR, tags::VARCHAR[] FROM p.notes ORDER BY id"
    ) == [
        (1, '"hello"', ['"a"']),
        (2, '{"rich":true}', ['{"t":1}']),
        (3, '"again"', ['"c"']),
    ]


@pytest.mark.parametrize(("fmt", "nested"), [("jsonl", True), ("json", True), ("jsonl", False)])
def test_keys_that_differ_only_in_case_all_land(
    tmp_path: Path, warehouse: Warehouse, fmt: str, nested: bool
) -> None:
    """``Name`` beside ``name`` (top level, after DuckDB's type sample) and ``UID`` beside
    ``uid`` inside a list of structs: DuckDB's JSON reader refuses the nested pair and, told
    the columns, drops the renamed top-level one (alone, silently). Every value lands, the
    second key of each pair named as DuckDB names it (``Name_1``, ``UID_1``), the declared
    types kept."""
    evses = [{"uid": "e-low", "UID": "E-UPPER", "connectors": []}]
    operator = {"name": "op-low", "Name": "OP-UPPER"}
    if not nested:
        evses = [{"uid": "e-low", "connectors": []}]
        operator = {"name": "op-low"}
    late = _location(30_000, Name="UPPER_TOP", evses=evses, operator=operator)
    records = [_location(i) for i in range(25_000)] + [late]
    src = _write_records(tmp_path / f"export.{fmt}", records)
    result, normalised = _ingest(tmp_path, KIND, [src], "A", warehouse)
    assert normalised.rows == result.rows_in_export == result.table_rows == 25_001
    types = _types(warehouse)
    assert types["capacity"] == "BIGINT"
    assert types["last_updated"] == "TIMESTAMP WITH TIME ZONE"
    assert types["Name_1"] == "VARCHAR"
    assert _query(
        warehouse,
        'SELECT name, "Name_1", evses[1].uid, operator.name, capacity, last_updated '
        "FROM locations.locations WHERE id = 'L30000'",
    ) == [
        (
            "n30000",
            "UPPER_TOP",
            "e-low",
            "op-low",
            30_000,
            datetime(2024, 4, 30, 10, 0, tzinfo=UTC),
        )
    ]
    if nested:
        assert "UID_1 VARCHAR" in types["evses"] and "Name_1 VARCHAR" in types["operator"]
        assert _query(
            warehouse,
            'SELECT evses[1]."UID_1", operator."Name_1" FROM locations.locations '
            "WHERE id = 'L30000'",
        ) == [("E-UPPER", "OP-UPPER")]
    # The other records kept their values too.
    assert _query(
        warehouse,
        'SELECT count(*), count("Name_1"), sum(capacity), count(evses[1].connectors[1].id) '
        "FROM locations.locations",
    ) == [(25_001, 1, sum(range(25_000)) + 30_000, 25_000)]


def test_csv_and_json_with_nested_keys_that_differ_only_in_case_give_one_table(
    tmp_path: Path,
) -> None:
    records = [
        _location(1, evses=[{"uid": "e1", "UID": "E1", "connectors": []}]),
        _location(2),
    ]
    (tmp_path / "json").mkdir()
    as_json = _write_records(tmp_path / "json" / "export.jsonl", records)
    as_csv = tmp_path / "csv" / "export.csv"
    as_csv.parent.mkdir()
    header = ["id", "name", "capacity", "evses", "last_updated"]
    with as_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in records:
            writer.writerow([json.dumps(r[c]) if c == "evses" else r[c] for c in header])
    tables = []
    for name, src in (("j", as_json), ("c", as_csv)):
        out = to_parquet([src], tmp_path / name, kind=KIND, export_id="X", loaded_at=LOADED_AT)
        rel = f"(SELECT * EXCLUDE (_source_file) FROM read_parquet('{out.parquet_paths[0]}'))"
        with duckdb.connect() as con:
            tables.append(
                (
                    con.execute(f"DESCRIBE {rel}").fetchall(),
                    con.execute(f"SELECT * FROM {rel} ORDER BY id").fetchall(),
                )
            )
    assert tables[0] == tables[1]
    assert tables[0][1][0][3][0]["UID_1"] == "E1"


def test_a_real_key_named_like_a_renamed_one_keeps_the_usual_read(tmp_path: Path) -> None:
    """``address_1`` beside ``address`` is what DuckDB would call a renamed ``Address``; here
    both are real keys, so the export keeps the usual read (types detected, dates included)."""
    kind = ExportKind(provider="p", name="places", primary_key=("id",))
    row = '{"id": %d, "address": "a", "address_1": "b", "seen": "2024-04-30T10:00:00Z"}\n'
    src = tmp_path / "places.jsonl"
    with src.open("w") as fh:
        fh.writelines(row % i for i in range(25_000))
        fh.write('{"id": 25000, "address": "a", "address_1": "b", "late": 1}\n')
    out = to_parquet([src], tmp_path / "out", kind=kind, export_id="X", loaded_at=LOADED_AT)
    types = dict(out.columns)
    assert types["seen"].startswith("TIMESTAMP")  # the exact-key read would say VARCHAR
    assert (types["address"], types["address_1"], types["late"]) == ("VARCHAR",) * 2 + ("BIGINT",)
    with duckdb.connect() as con:
        assert con.execute(
            "SELECT count(*), count(address_1), sum(late) FROM read_parquet(?)",
            [str(out.parquet_paths[0])],
        ).fetchone() == (25_001, 25_001, 1)


def test_a_key_whose_case_changed_lands_in_its_column(tmp_path: Path, warehouse: Warehouse) -> None:
    """A provider that starts sending ``Name`` for ``name`` (and ``Count`` with fractions for
    ``count``): DuckDB's names are case-insensitive, so the values land in the table's columns,
    widened where needed, instead of failing on ``ADD COLUMN "Name"``. An export with both keys
    adds ``Name_1``."""
    kind = ExportKind(provider="p", name="renamed", primary_key=("id",))
    exports = {
        "A": '{"id": 1, "name": "low", "count": 1}\n',
        "B": '{"id": 2, "Name": "UP", "Count": 2.5}\n',
        "C": '{"id": 3, "name": "x", "Name": "UP3", "count": 3}\n',
    }
    results = {}
    for export_id, text in exports.items():
        src = tmp_path / f"{export_id}.jsonl"
        src.write_text(text)
        results[export_id], _ = _ingest(tmp_path, kind, [src], export_id, warehouse)
    assert results["B"].columns_added == ()
    assert "count widened BIGINT -> DOUBLE" in results["B"].columns_changed
    assert results["C"].columns_added == ("Name_1",)
    assert [c for c in _types(warehouse, "p.renamed") if not c.startswith("_")] == [
        "id",
        "name",
        "count",
        "Name_1",
    ]
    assert _query(warehouse, 'SELECT id, name, count, "Name_1" FROM p.renamed ORDER BY id') == [
        (1, "low", 1.0, None),
        (2, "UP", 2.5, None),
        (3, "x", 3.0, "UP3"),
    ]


def test_a_key_that_is_empty_lands(tmp_path: Path, warehouse: Warehouse) -> None:
    """A key "" at the top level (after DuckDB's type sample) and inside objects: DuckDB names
    the column ``C<n>`` and cannot declare a struct field named "" (its detection used to end in
    an IndexError). The column lands, an object with such a key as a ``MAP(VARCHAR, JSON)``
    (every key kept), and as JSON text where a struct is declared (evses)."""
    late = _location(30_000, evses=[{"uid": "u", "": "E"}], attrs={"": 6, "k": 1})
    late[""] = "top"
    records = [_location(i) for i in range(25_000)] + [late]
    src = _write_records(tmp_path / "export.jsonl", records)
    result, _ = _ingest(tmp_path, KIND, [src], "A", warehouse)
    assert result.table_rows == 25_001
    types = _types(warehouse)
    empty = [c for c in types if re.fullmatch(r"C\d+", c)]
    assert len(empty) == 1 and types[empty[0]] == "VARCHAR"
    assert types["attrs"] == "MAP(VARCHAR, JSON)"
    assert types["evses"] == "JSON[]"
    assert _query(
        warehouse,
        f"SELECT \"{empty[0]}\", attrs[''], attrs['k'], evses[1]->>'$.uid', "
        "json_keys(evses[1]), capacity FROM locations.locations WHERE id = 'L30000'",
    ) == [("top", "6", "1", "u", ["uid", ""], 30_000)]
    # An earlier record's evses, a declared struct before, kept its values as JSON text.
    assert _query(
        warehouse, "SELECT evses[1]->>'$.uid' FROM locations.locations WHERE id = 'L7'"
    ) == [("E7",)]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_an_integer_past_bigint_keeps_every_digit(
    tmp_path: Path, warehouse: Warehouse, fmt: str
) -> None:
    """2**63 .. 2**64-1 (a uint64 id, say): DuckDB's JSON detection types it BIGINT and then
    fails the read. The column is read as the numbers' text instead (every digit; DOUBLE would
    round them), reported as drifted, and the table widens BIGINT -> VARCHAR."""
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps(_location(1)) + "\n")
    _ingest(tmp_path, KIND, [first], "A", warehouse)
    assert _types(warehouse)["capacity"] == "BIGINT"
    records = [_location(i) for i in range(2, 25_000)]
    records.append(_location(30_000, capacity=18446744073709551615))
    records.append(_location(30_001, capacity=9223372036854775808))
    src = _write_records(tmp_path / f"second.{fmt}", records)
    result, normalised = _ingest(tmp_path, KIND, [src], "B", warehouse)
    assert normalised.drifted_columns == {"capacity": "VARCHAR"}
    assert "capacity widened BIGINT -> VARCHAR" in result.columns_changed
    assert _query(
        warehouse,
        "SELECT id, capacity FROM locations.locations "
        "WHERE id IN ('L1', 'L7', 'L30000', 'L30001') ORDER BY id",
    ) == [
        ("L1", "1"),
        ("L30000", "18446744073709551615"),
        ("L30001", "9223372036854775808"),
        ("L7", "7"),
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_numbers_no_type_holds_land_as_their_text_at_any_depth(
    tmp_path: Path, warehouse: Warehouse, fmt: str
) -> None:
    """Integers past BIGINT inside structs and lists (2**64-1 fails DuckDB's read), and integers
    past 2**64, which its detection calls DOUBLE and rounds silently (10**23 -> 1e+23), top
    level too, all after the type sample: each such leaf lands as the number's text, every
    digit; the other leaves of the same struct keep their types; reported as drifted."""
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({**_location(1), "meter": {"reading": 5, "ratio": 0.5}}) + "\n")
    _ingest(tmp_path, KIND, [first], "A", warehouse)
    records = [
        {**_location(i), "meter": {"reading": i, "ratio": 0.5}, "total": 1.5}
        for i in range(2, 25_000)
    ]
    records.append(
        {
            **_location(30_000, capacity=3),
            "evses": [{"uid": "E", "connectors": [{"id": "C", "max_power": 10**23}]}],
            "meter": {"reading": 18446744073709551615, "ratio": 0.25},
            "total": 123456789012345678901234567890,
        }
    )
    src = _write_records(tmp_path / f"second.{fmt}", records)
    result, normalised = _ingest(tmp_path, KIND, [src], "B", warehouse)
    assert set(normalised.drifted_columns) == {"evses", "meter", "total"}
    types = _types(warehouse)
    assert types["meter"] == "STRUCT(reading VARCHAR, ratio DOUBLE)"
    assert types["total"] == "VARCHAR"
    assert "max_power VARCHAR" in types["evses"] and "uid VARCHAR" in types["evses"]
    assert types["capacity"] == "BIGINT"  # untouched
    assert _query(
        warehouse,
        "SELECT meter.reading, meter.ratio, total, evses[1].connectors[1].max_power "
        "FROM locations.locations WHERE id = 'L30000'",
    ) == [("18446744073709551615", 0.25, "123456789012345678901234567890", "1" + "0" * 23)]
    assert _query(
        warehouse,
        "SELECT meter.reading, total, evses[1].connectors[1].max_power "
        "FROM locations.locations WHERE id = 'L7'",
    ) == [("7", "1.5", "7.5")]
    assert any("meter.reading widened" in c for c in result.columns_changed)


def test_a_csv_nested_number_no_type_holds_gives_the_json_table(tmp_path: Path) -> None:
    """The same numbers in a CSV's nested cells: json_transform would null 2**64-1 at a
    BIGINT leaf and round 10**23 at a DOUBLE one; they land as text, as the JSON's do."""
    records = [
        {"id": "A", "meter": {"reading": 1, "ratio": 1.5}},
        {"id": "B", "meter": {"reading": 18446744073709551615, "ratio": 10**23}},
        {"id": "C", "meter": {"reading": 2, "ratio": 0.5}, "ref": "12345678901234567890"},
    ]
    kind = replace(KIND, columns={"id": "VARCHAR", "meter": "STRUCT(reading BIGINT)"})
    as_json = tmp_path / "export.jsonl"
    as_json.write_text("".join(json.dumps(r) + "\n" for r in records))
    as_csv = tmp_path / "export.csv"
    with as_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "meter", "ref"])
        for r in records:
            writer.writerow([r["id"], json.dumps(r["meter"]), r.get("ref", "")])
    tables = []
    for name, src in (("j", as_json), ("c", as_csv)):
        out = to_parquet([src], tmp_path / name, kind=kind, export_id="X", loaded_at=LOADED_AT)
        with duckdb.connect() as con:
            rel = f"read_parquet('{out.parquet_paths[0]}')"
            tables.append(
                (
                    con.execute(f"SELECT typeof(meter) FROM {rel} LIMIT 1").fetchone(),
                    con.execute(f"SELECT id, meter FROM {rel} ORDER BY id").fetchall(),
                    out.drifted_columns["meter"],
                )
            )
    assert tables[0] == tables[1]
    assert tables[0][1][1] == ("B", {"reading": "18446744073709551615", "ratio": "1" + "0" * 23})


def test_a_csv_integer_longer_than_a_double_holds_keeps_every_digit(tmp_path: Path) -> None:
    """DuckDB's sniffer calls 18446744073709551615 (or a 43-digit reference) DOUBLE, which would
    round it: such a column lands as its text instead, reported as drifted; a column of plain
    decimals stays DOUBLE."""
    kind = ExportKind(provider="p", name="refs", primary_key=("id",))
    src = tmp_path / "refs.csv"
    src.write_text(
        "id,ref,big,price\n"
        "A,18446744073709551615,1234567890123456789012345678901234567890123,1.5\n"
        "B,5,7,22\n"
    )
    out = to_parquet([src], tmp_path / "out", kind=kind, export_id="X", loaded_at=LOADED_AT)
    assert out.drifted_columns == {"ref": "VARCHAR", "big": "VARCHAR"}
    assert dict(out.columns)["price"] == "DOUBLE"
    with duckdb.connect() as con:
        assert con.execute(
            "SELECT id, ref, big, price FROM read_parquet(?) ORDER BY id",
            [str(out.parquet_paths[0])],
        ).fetchall() == [
            ("A", "18446744073709551615", "1234567890123456789012345678901234567890123", 1.5),
            ("B", "5", "7", 22.0),
        ]


@pytest.mark.parametrize(
    ("fmt", "text", "line", "message"),
    [
        ("jsonl", '{"id": "A"}\n\n7\n{"id": "B"}\n', 3, "a record is a number"),
        ("jsonl", '{"id": "A"}\n["B"]\n', 2, "a record is an array"),
        ("json", '[{"id": "A"},\n {"id": "B"},\n "C"]', None, "record 3 of the array is a string"),
    ],
)
def test_a_record_that_is_not_an_object_is_named(
    tmp_path: Path, fmt: str, text: str, line: int | None, message: str
) -> None:
    """DuckDB reads records of which some are not objects as one column ``json`` (the load then
    said the primary key column was missing): the error names the record instead."""
    src = tmp_path / f"mixed.{fmt}"
    src.write_text(text)
    with pytest.raises(ParseError) as caught:
        to_parquet([src], tmp_path / "out", kind=KIND, export_id="X", loaded_at=LOADED_AT)
    assert (caught.value.file, caught.value.line) == ("mixed." + fmt, line)
    assert message in str(caught.value) and "not a JSON object" in str(caught.value)


def test_a_nested_value_that_does_not_fit_its_declared_struct_keeps_its_value(
    tmp_path: Path, warehouse: Warehouse
) -> None:
    """``connectors`` is declared a list of structs; one record after the type sample sends the
    string "none" (and a number for ``uid``). DuckDB's full scan types both JSON, which reads as
    "null throughout" and so took the declared type, and the read failed on the string: the
    export failed. Now the column drifts to the data's own type and every value lands."""
    _ingest(tmp_path, KIND, [_write_records(tmp_path / "a.jsonl", [_location(1)])], "A", warehouse)
    late = _location(30_000, evses=[{"uid": 5, "connectors": "none"}])
    records = [_location(i) for i in range(2, 25_000)] + [late]
    result, normalised = _ingest(
        tmp_path, KIND, [_write_records(tmp_path / "b.jsonl", records)], "B", warehouse
    )
    assert set(normalised.drifted_columns) == {"evses"}
    assert result.table_rows == 25_000
    assert _query(
        warehouse,
        "SELECT id, evses[1].uid::VARCHAR, evses[1].connectors::VARCHAR FROM locations.locations "
        "WHERE id IN ('L1', 'L30000') ORDER BY id",
    ) == [
        ("L1", '"E1"', '[{"id":"C1","max_power":7.5}]'),  # VARCHAR widened to JSON
        ("L30000", "5", '"none"'),
    ]


def test_a_csv_timestamp_with_nanoseconds_keeps_them_as_the_json_reader_does(
    tmp_path: Path,
) -> None:
    """DuckDB keeps microseconds: a CSV column the sniffer calls a timestamp, with nanosecond
    digits, lands as its text (the JSON reader keeps such strings as VARCHAR, so the formats
    agree); microseconds stay a timestamp, and a declared TIMESTAMPTZ takes its microseconds."""
    kind = ExportKind(
        provider="p", name="events", primary_key=("id",), columns={"at": "TIMESTAMPTZ"}
    )
    src = tmp_path / "events.csv"
    src.write_text(
        "id,ns,us,at\n"
        "A,2024-01-01T00:00:00.123456789Z,2024-01-01T00:00:00.123456Z,2024-01-01T00:00:00.5Z\n"
    )
    as_json = _write_records(
        tmp_path / "events.jsonl",
        [{"id": "A", "ns": "2024-01-01T00:00:00.123456789Z", "us": "x", "at": None}],
    )
    out = to_parquet([src], tmp_path / "csv", kind=kind, export_id="X", loaded_at=LOADED_AT)
    types = dict(out.columns)
    assert out.drifted_columns == {"ns": "VARCHAR"}
    assert (types["ns"], types["at"]) == ("VARCHAR", "TIMESTAMP WITH TIME ZONE")
    assert types["us"].startswith("TIMESTAMP")
    json_out = to_parquet([as_json], tmp_path / "j", kind=kind, export_id="X", loaded_at=LOADED_AT)
    assert dict(json_out.columns)["ns"] == "VARCHAR"
    with duckdb.connect() as con:
        assert con.execute(
            "SELECT ns FROM read_parquet(?)", [str(out.parquet_paths[0])]
        ).fetchall() == [("2024-01-01T00:00:00.123456789Z",)]


def test_a_csv_with_many_nested_cells_types_them_in_bounded_memory(tmp_path: Path) -> None:
    """The cells' structure is found from their distinct shapes: DuckDB's json_group_structure
    over 300,000 cells ran out of a 250 MB memory limit (the benchmark's 50,000 locations, out
    of 400 MB); every shape still lands, the rare one (a key in 3 cells) included."""
    src = tmp_path / "export.csv"
    with src.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "evses"])
        for i in range(300_000):
            evse: dict[str, Any] = {"uid": f"E{i}", "connectors": [{"id": "1", "max_power": 22}]}
            if i in (7, 150_000, 299_999):
                evse["floor_level"] = str(i)
            writer.writerow([f"L{i}", json.dumps([evse])])
    kind = replace(KIND, columns={"id": "VARCHAR", "evses": EVSES})
    out = to_parquet(
        [src], tmp_path / "pq", kind=kind, export_id="X", loaded_at=LOADED_AT, memory_limit="200MB"
    )
    with duckdb.connect() as con:
        pq = f"read_parquet({[str(p) for p in out.parquet_paths]})"
        assert con.execute(
            f"SELECT count(*), count(*) FILTER (evses[1].floor_level IS NOT NULL), "
            f"sum(evses[1].connectors[1].max_power) FROM {pq}"
        ).fetchone() == (300_000, 3, 22.0 * 300_000)


@pytest.mark.parametrize("parts", [1, 3], ids=["lone-file", "parts"])
def test_an_integer_a_float_would_round_is_caught_by_the_one_parse_check(
    tmp_path: Path, parts: int
) -> None:
    """Only a float position holds the long integer (nothing fails DuckDB's read): the check
    beside a lone file's COPY, and the test inside each part's guarded read, must see it."""
    files = []
    for n in range(parts):
        rows = [{"id": f"{n}-{i}", "ratio": 0.5, "m": {"r": 1.5}} for i in range(3000)]
        if n == parts - 1:
            rows[-1] = {"id": f"{n}-big", "ratio": 10**23, "m": {"r": 12345678901234567}}
        path = tmp_path / f"part-{n}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    kind = ExportKind(provider="p", name="k", primary_key=("id",))
    out = to_parquet(files, tmp_path / "pq", kind=kind, export_id="X", loaded_at=LOADED_AT)
    assert out.drifted_columns == {"ratio": "VARCHAR", "m": 'STRUCT("r" VARCHAR)'}
    with duckdb.connect() as con:
        got = con.execute(
            "SELECT ratio, m.r FROM read_parquet(?, union_by_name := true) WHERE id LIKE '%big'",
            [[str(p) for p in out.parquet_paths]],
        ).fetchall()
    assert got == [("1" + "0" * 23, "12345678901234567")]


def test_numbers_no_type_holds_land_as_text_in_records_read_key_by_key(tmp_path: Path) -> None:
    """Records with keys that differ only in case are read key by key (json_transform, which
    would null 2**64-1 at a BIGINT leaf and round 10**23): the same numbers as text there too."""
    records = [
        {"id": f"A{i}", "Name": "x", "name": "y", "m": {"r": i, "q": 0.5}, "t": 1.5}
        for i in range(50)
    ]
    records.append(
        {
            "id": "B",
            "Name": "x",
            "name": "y",
            "m": {"r": 18446744073709551615, "q": 0.25},
            "t": 10**23,
        }
    )
    src = tmp_path / "export.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    kind = ExportKind(provider="p", name="k", primary_key=("id",))
    out = to_parquet([src], tmp_path / "pq", kind=kind, export_id="X", loaded_at=LOADED_AT)
    with duckdb.connect() as con:
        rel = f"read_parquet('{out.parquet_paths[0]}')"
        row = con.execute(f"SELECT Name, name_1, m, t FROM {rel} WHERE id = 'B'").fetchone()
        types = dict([r[:2] for r in con.execute(f"DESCRIBE SELECT * FROM {rel}").fetchall()])
    assert row == ("x", "y", {"r": "18446744073709551615", "q": 0.25}, "1" + "0" * 23)
    assert types["m"] == "STRUCT(r VARCHAR, q DOUBLE)" and types["t"] == "VARCHAR"
    assert set(out.drifted_columns) == {"m", "t"}
