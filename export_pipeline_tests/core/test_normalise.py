"""Files to Parquet: the same data in every format gives the same table; errors point at lines."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from export_pipeline.core.errors import ParseError
from export_pipeline.core.model import ExportKind, FileFormat
from export_pipeline.core.normalise import DetectedFormat, detect_format, to_parquet
from export_pipeline_tests.core.conftest import duckdb_threads

EVSES = "STRUCT(uid VARCHAR, connectors STRUCT(id VARCHAR, max_power DOUBLE)[])[]"
COLUMNS = {
    "id": "VARCHAR",
    "name": "VARCHAR",
    "capacity": "BIGINT",
    "evses": EVSES,
    "last_updated": "TIMESTAMPTZ",
}
KIND = ExportKind(provider="locations", name="locations", primary_key=("id",), columns=COLUMNS)
AUTO_KIND = ExportKind(provider="locations", name="locations", primary_key=("id",))
LOADED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
RECORDS: list[dict[str, Any]] = [
    {
        "id": "LOC1",
        "name": "Main St",
        "capacity": 4,
        "evses": [
            {"uid": "E1", "connectors": [{"id": "C1", "max_power": 22.0}]},
            {
                "uid": "E2",
                "connectors": [{"id": "C2", "max_power": 50.5}, {"id": "C3", "max_power": 11.0}],
            },
        ],
        "last_updated": "2024-04-30T10:00:00Z",
    },
    {
        "id": "LOC2",
        "name": None,
        "capacity": None,
        "evses": [],
        "last_updated": "2024-04-30T11:00:00Z",
    },
    {"id": "LOC'3", "name": 'quote "x"', "capacity": 0, "evses": None, "last_updated": None},
]


def write_json_array(path: Path) -> Path:
    path.write_text(json.dumps(RECORDS, indent=2))
    return path


def write_jsonl(path: Path, opener: Any = open) -> Path:
    with opener(path, "wt", encoding="utf-8") as out:
        for rec in RECORDS:
            out.write(json.dumps(rec) + "\n")
    return path


def write_csv(path: Path, opener: Any = open) -> Path:
    with opener(path, "wt", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(list(COLUMNS))
        for rec in RECORDS:
            writer.writerow(
                [
                    "" if rec[c] is None else json.dumps(rec[c]) if c == "evses" else rec[c]
                    for c in COLUMNS
                ]
            )
    return path


def table(path: Path | list[Path]) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
    """The schema and the rows (by id) of one Parquet file, or of several read as one."""
    con = duckdb.connect()
    files = [str(p) for p in path] if isinstance(path, list) else [str(path)]
    rel = f"(SELECT * EXCLUDE (_source_file) FROM read_parquet({files}))"
    schema = [(r[0], r[1]) for r in con.execute(f"DESCRIBE {rel}").fetchall()]
    rows = con.execute(f"SELECT * FROM {rel} ORDER BY id").fetchall()
    return schema, rows


def rows_with_source(paths: list[Path]) -> list[tuple[Any, ...]]:
    """Every row of ``paths`` by id, ``_source_file`` last."""
    with duckdb.connect() as con:
        return con.execute(
            "SELECT * EXCLUDE (_source_file), _source_file FROM read_parquet(?) ORDER BY id",
            [[str(p) for p in paths]],
        ).fetchall()


def test_detect_format_from_content(tmp_path: Path) -> None:
    arr = write_json_array(tmp_path / "data.csv")  # the name lies
    jl = write_jsonl(tmp_path / "data.json")
    cs = write_csv(tmp_path / "data.jsonl")
    gz = write_jsonl(tmp_path / "data.bin", opener=gzip.open)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf  \n[{}]")
    assert detect_format(arr) == DetectedFormat(FileFormat.JSON_ARRAY, False)
    assert detect_format(jl) == DetectedFormat(FileFormat.JSONL, False)
    assert detect_format(cs) == DetectedFormat(FileFormat.CSV, False)
    assert detect_format(gz) == DetectedFormat(FileFormat.JSONL, True)
    assert detect_format(bom).format is FileFormat.JSON_ARRAY


def test_every_format_gives_the_same_table(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sources = [
        write_json_array(src / "a.json"),
        write_jsonl(src / "b.jsonl"),
        write_csv(src / "c.csv"),
        write_jsonl(src / "d.jsonl.gz", opener=gzip.open),
        write_csv(src / "e.csv.gz", opener=gzip.open),
    ]
    result = to_parquet(sources, tmp_path / "out", kind=KIND, export_id="X1", loaded_at=LOADED_AT)
    assert [p.name for p in result.parquet_paths] == [
        "a.parquet",
        "b.parquet",
        "c.parquet",
        "d.parquet",
        "e.parquet",
    ]
    assert result.rows == 15
    tables = [table(p) for p in result.parquet_paths]
    for other in tables[1:]:
        assert other == tables[0]
    schema, rows = tables[0]
    assert dict(schema)["evses"] == EVSES
    assert dict(schema)["capacity"] == "BIGINT"
    assert [r[0] for r in rows] == ["LOC'3", "LOC1", "LOC2"]
    loc2 = rows[2]
    assert loc2[1] is None and loc2[2] is None  # empty CSV cells are NULL
    assert ("_loaded_at", "TIMESTAMP WITH TIME ZONE") in result.columns


def test_nested_structure_survives(tmp_path: Path) -> None:
    src = write_csv(tmp_path / "c.csv")
    result = to_parquet([src], tmp_path / "out", kind=KIND, export_id="X1", loaded_at=LOADED_AT)
    con = duckdb.connect()
    got = con.execute(
        "SELECT e.uid, c.id, c.max_power FROM read_parquet(?) AS t, "
        "unnest(t.evses) AS u(e), unnest(e.connectors) AS v(c) ORDER BY c.id",
        [str(result.parquet_paths[0])],
    ).fetchall()
    assert got == [("E1", "C1", 22.0), ("E2", "C2", 50.5), ("E2", "C3", 11.0)]


def test_lineage_columns_on_every_row(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "part-1.jsonl")
    result = to_parquet([src], tmp_path / "out", kind=KIND, export_id="X9", loaded_at=LOADED_AT)
    con = duckdb.connect()
    got = con.execute(
        "SELECT DISTINCT _export_id, _source_file, _loaded_at FROM read_parquet(?)",
        [str(result.parquet_paths[0])],
    ).fetchall()
    assert got == [("X9", "part-1.jsonl", LOADED_AT)]


def test_auto_detection_keeps_nesting(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "a.jsonl")
    result = to_parquet([src], tmp_path / "out", kind=AUTO_KIND, export_id="X", loaded_at=LOADED_AT)
    types = dict(result.columns)
    assert types["evses"].startswith("STRUCT(") and types["evses"].endswith("[]")
    assert result.rows == 3


def test_malformed_jsonl_line_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"id": "A"}\n{"id": "B"}\n{"id": "C", "name": }\n{"id": "D"}\n')
    out = tmp_path / "out"
    for kind in (KIND, AUTO_KIND):
        with pytest.raises(ParseError) as info:
            to_parquet([src], out, kind=kind, export_id="X1", loaded_at=LOADED_AT)
        err = info.value
        assert (err.file, err.line, err.export_id, err.provider) == (
            "bad.jsonl",
            3,
            "X1",
            "locations",
        )
    assert not any(p.suffix in {".parquet", ".part"} for p in out.iterdir())


def test_malformed_json_array_line_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "bad.json"
    src.write_text('[\n  {"id": "A"},\n  {"id": "B",\n   "name": }\n]\n')
    with pytest.raises(ParseError) as info:
        to_parquet([src], tmp_path / "out", kind=KIND, export_id="X1", loaded_at=LOADED_AT)
    assert (info.value.file, info.value.line) == ("bad.json", 4)


def test_bad_nested_json_in_csv_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text('id,name,capacity,evses,last_updated\nA,x,1,"[{""uid"": ",\n')
    with pytest.raises(ParseError) as info:
        to_parquet([bad], tmp_path / "out", kind=KIND, export_id="X1", loaded_at=LOADED_AT)
    assert info.value.file == "bad.csv" and info.value.kind == "locations"


def test_empty_files(tmp_path: Path) -> None:
    empty_array = tmp_path / "empty.json"
    empty_array.write_text("[]")
    zero = tmp_path / "zero.csv"
    zero.write_bytes(b"")
    typed = to_parquet(
        [empty_array, zero], tmp_path / "t", kind=KIND, export_id="X", loaded_at=LOADED_AT
    )
    assert typed.rows == 0 and len(typed.parquet_paths) == 2
    assert table(typed.parquet_paths[0])[0] == table(typed.parquet_paths[1])[0]
    untyped = to_parquet(
        [empty_array, zero], tmp_path / "u", kind=AUTO_KIND, export_id="X", loaded_at=LOADED_AT
    )
    assert untyped.rows == 0 and untyped.parquet_paths == []


def test_auto_detection_keeps_keys_and_values_seen_only_late_in_a_file(tmp_path: Path) -> None:
    """A key (and a wider type) that first appears after 120,000 records is not dropped."""
    kind = ExportKind(provider="p", name="late", primary_key=("Id",))
    src = tmp_path / "late.jsonl"
    with src.open("w") as fh:
        for i in range(120_000):
            fh.write(f'{{"Id": "r{i}", "n": 1}}\n')
        fh.write('{"Id": "last", "n": 3.5, "Extra": {"Note": "only here"}}\n')
    result = to_parquet(
        [src], tmp_path / "out", kind=kind, export_id="e", loaded_at=datetime.now(UTC)
    )
    assert result.rows == 120_001
    with duckdb.connect() as con:
        row = con.execute(
            "SELECT n, Extra.Note FROM read_parquet(?) WHERE Id = 'last'",
            [str(result.parquet_paths[0])],
        ).fetchone()
    assert row == (3.5, "only here")


def test_malformed_part_of_a_multi_part_export_is_named(tmp_path: Path) -> None:
    """Parts are type-detected together; the error still names the bad part and its line."""
    good = tmp_path / "part-0000.jsonl"
    good.write_text('{"id": "A"}\n{"id": "B"}\n')
    bad = tmp_path / "part-0001.jsonl"
    bad.write_text('{"id": "C"}\n{"id": "D", "x": }\n')
    with pytest.raises(ParseError) as info:
        to_parquet(
            [good, bad], tmp_path / "out", kind=AUTO_KIND, export_id="X", loaded_at=LOADED_AT
        )
    assert (info.value.file, info.value.line) == ("part-0001.jsonl", 2)


# DuckDB's type sample is the first 20,480 records; the late values below come after it.
_PAST_SAMPLE = 25_000


def _typed_over_every_record(
    monkeypatch: pytest.MonkeyPatch, src: Path | list[Path], out: Path, kind: ExportKind
) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
    """What the type scan over every record makes of ``src`` (the one-parse path disabled)."""
    from export_pipeline.core import normalise

    sources = src if isinstance(src, list) else [src]
    with monkeypatch.context() as patch:
        patch.setattr(normalise, "_sampled_json_to_parquet", lambda *a, **k: None)
        result = to_parquet(sources, out, kind=kind, export_id="e", loaded_at=LOADED_AT)
    return table(result.parquet_paths)


def _parts_with_a_late_record(
    tmp_path: Path, parts: int, early: str, late: str, name: str = "late"
) -> list[Path]:
    """``parts`` JSON Lines files of records ``{"id", "v", "n": {"list": [{"v"}]}}`` with
    ``early`` values; the last part ends, past its type sample, with ``late`` ones."""
    nested = '"n": {{"list": [{{"v": {}}}]}}}}\n'
    paths = []
    for part in range(parts):
        src = tmp_path / (f"{name}.jsonl" if parts == 1 else f"{name}-{part:04d}.jsonl")
        with src.open("w") as fh:
            for i in range(_PAST_SAMPLE):
                fh.write(f'{{"id": "{part}-{i:06d}", "v": {early}, ' + nested.format(early))
            if part == parts - 1:
                fh.write(f'{{"id": "late", "v": {late}, ' + nested.format(late))
        paths.append(src)
    return paths


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize(
    ("early", "late", "value"),
    [
        ("1", "1.5", 1.5),  # an integer column would store 2
        ("1", "true", "true"),  # ... or 1
        ("1", '"12"', "12"),  # ... or 12
        ("1", '{"a": 1}', {"a": 1}),  # DuckDB fails this one (parts: the guard must too)
        ("1.5", "true", "true"),  # a float column would store 1.0
        ("1.5", '"2.5"', "2.5"),  # ... or 2.5
        ("true", "5", "5"),  # a boolean column would store true
        ('"10:00:00"', '"2024-01-01T10:30:00Z"', "2024-01-01T10:30:00Z"),  # a TIME: 10:30:00
        ("null", '{"k": [1, 2]}', {"k": [1, 2]}),  # typed as the data, not left as JSON text
        ("null", "7", 7),
    ],
)
def test_a_value_of_another_kind_after_the_type_sample_keeps_its_value(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    parts: int,
    early: str,
    late: str,
    value: object,
) -> None:
    """Types come from a sample of the first records only when that loses nothing: a later
    value DuckDB would convert silently into the sampled type is found (top level and inside
    a list of structs), and the export is then typed over every record. A lone file is
    checked in a second pass; parts side by side inside their one parse (_guarded_reader)."""
    kind = ExportKind(provider="p", name="kinds", primary_key=("id",))
    sources = _parts_with_a_late_record(tmp_path, parts, early, late)
    out = tmp_path / "out"
    result = to_parquet(sources, out, kind=kind, export_id="e", loaded_at=LOADED_AT)
    assert result.rows == parts * _PAST_SAMPLE + 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in result.parquet_paths)
    got = table(result.parquet_paths)
    assert got == _typed_over_every_record(monkeypatch, sources, tmp_path / "full", kind)
    late_row = dict(zip([n for n, _ in got[0]], got[1][-1], strict=True))
    assert late_row["id"] == "late"
    for found in (late_row["v"], late_row["n"]["list"][0]["v"]):
        assert found == value or json.loads(str(found)) == value


def test_a_file_whose_sample_speaks_for_it_is_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common case takes the one-parse path (no type scan over every record) and gives
    exactly the table the scan over every record gives, declared types applied."""
    from export_pipeline.core import normalise

    src = tmp_path / "plain.jsonl"
    with src.open("w") as fh:
        for i in range(_PAST_SAMPLE):
            fh.write(json.dumps({**RECORDS[i % len(RECORDS)], "id": f"L{i:06d}"}) + "\n")
    full = _typed_over_every_record(monkeypatch, src, tmp_path / "full", KIND)

    def no_full_scan(*args: object, **kwargs: object) -> object:
        raise AssertionError("typed over every record although the sample was enough")

    monkeypatch.setattr(normalise, "_auto_schema", no_full_scan)
    result = to_parquet([src], tmp_path / "out", kind=KIND, export_id="e", loaded_at=LOADED_AT)
    assert result.rows == _PAST_SAMPLE
    assert table(result.parquet_paths[0]) == full
    assert dict(full[0])["capacity"] == "BIGINT"


def test_parts_typed_from_samples_agree_where_one_part_holds_only_nulls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One part has a key (top level and nested) null in every record, the other has values:
    every part gets the values' type, as the scan over every record of all parts gives."""
    kind = ExportKind(provider="p", name="parts", primary_key=("id",))
    nulls = tmp_path / "part-0000.jsonl"
    nulls.write_text('{"id": "a", "closed": null, "data": {"kind": "x", "value": null}}\n')
    values = tmp_path / "part-0001.jsonl"
    values.write_text(
        '{"id": "b", "closed": "2024-08-10T15:41:09Z", "data": {"kind": "p", "value": {"n": 1}}}\n'
    )
    result = to_parquet(
        [nulls, values], tmp_path / "out", kind=kind, export_id="e", loaded_at=LOADED_AT
    )
    from export_pipeline.core import normalise

    with monkeypatch.context() as patch:
        patch.setattr(normalise, "_sampled_json_to_parquet", lambda *a, **k: None)
        full = to_parquet(
            [nulls, values], tmp_path / "full", kind=kind, export_id="e", loaded_at=LOADED_AT
        )
    assert result.columns == full.columns
    assert dict(result.columns)["data"] == 'STRUCT(kind VARCHAR, "value" STRUCT(n BIGINT))'
    # One Parquet for both parts here, one per part there: the same rows, each from its part.
    assert rows_with_source(result.parquet_paths) == rows_with_source(full.parquet_paths)
    assert [r[-1] for r in rows_with_source(result.parquet_paths)] == [
        "part-0000.jsonl",
        "part-0001.jsonl",
    ]


def test_parts_converted_side_by_side_fall_back_when_a_later_part_would_lose_a_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parts of a JSON Lines export are converted at once, each checked on its own: a
    fraction past the type sample of the *second* part (whose sample saw integers) makes the
    export typed over every record, with no half-written Parquet, and no value rounded."""
    kind = ExportKind(provider="p", name="parts", primary_key=("id",))
    parts = []
    for n in range(3):
        part = tmp_path / f"part-{n:04d}.jsonl"
        with part.open("w") as fh:
            for i in range(_PAST_SAMPLE):
                fh.write(f'{{"id": "{n}-{i:06d}", "v": {i}}}\n')
            if n == 1:
                fh.write(f'{{"id": "{n}-late", "v": 2.5}}\n')
        parts.append(part)
    out = tmp_path / "out"
    result = to_parquet(parts, out, kind=kind, export_id="e", loaded_at=LOADED_AT)
    assert [p.name for p in result.parquet_paths] == [f"part-{n:04d}.parquet" for n in range(3)]
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(
        p.name for p in result.parquet_paths
    )
    assert result.rows == 3 * _PAST_SAMPLE + 1
    assert dict(result.columns)["v"] == "DOUBLE"
    from export_pipeline.core import normalise

    with monkeypatch.context() as patch:
        patch.setattr(normalise, "_sampled_json_to_parquet", lambda *a, **k: None)
        full = to_parquet(parts, tmp_path / "full", kind=kind, export_id="e", loaded_at=LOADED_AT)
    assert rows_with_source(result.parquet_paths) == rows_with_source(full.parquet_paths)
    with duckdb.connect() as con:
        late = con.execute(
            "SELECT v, _source_file FROM read_parquet(?) WHERE id = '1-late'",
            [[str(p) for p in result.parquet_paths]],
        ).fetchone()
    assert late == (2.5, "part-0001.jsonl")


_CHECKED = [
    {
        "id": f"r{i}",
        "count": i,
        "price": i + 0.5,
        "paid": i % 2 == 0,
        "closed": None,
        "at": "10:15:00",
        "lines": [{"code": "A", "qty": i, "tax": {"rate": 0.2, "due": None}}, None],
        "meta": None if i % 3 == 0 else {"flag": i % 2 == 1, "note": "x"},
    }
    for i in range(40)
]


def _write_parts(tmp_path: Path, fmt: str, chunks: list[list[dict[str, Any]]]) -> list[Path]:
    """Each chunk of records as one part: JSON Lines, gzipped JSON Lines or a JSON array."""
    paths = []
    for n, records in enumerate(chunks):
        if fmt == "json":
            path = tmp_path / f"part-{n}.json"
            path.write_text(json.dumps(records))
        else:
            path = tmp_path / (f"part-{n}.jsonl" + (".gz" if fmt == "jsonl.gz" else ""))
            with (gzip.open if fmt == "jsonl.gz" else open)(path, "wt") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in records)
        paths.append(path)
    return paths


def _no_full_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a test whose export is typed over every record."""
    from export_pipeline.core import normalise

    def full_scan(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("typed over every record although the samples were enough")

    monkeypatch.setattr(normalise, "_auto_schema", full_scan)


def _no_second_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a test whose export is read again to check its types or typed over every record."""
    from export_pipeline.core import normalise

    checked = normalise._silently_converted

    def second_pass(*args: Any, times: bool = False) -> bool:
        if not times:
            raise AssertionError("checked in a second parse")
        return checked(*args, times=times)

    monkeypatch.setattr(normalise, "_silently_converted", second_pass)
    _no_full_scan(monkeypatch)


def _recorded_copies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SELECT of every COPY normalise runs from now on, in order, failed ones included."""
    from export_pipeline.core import normalise

    selects: list[str] = []
    copy = normalise._copy_with_lineage

    def recording_copy(cur: duckdb.DuckDBPyConnection, select: str, *args: Any, **kw: Any) -> int:
        selects.append(select)
        return copy(cur, select, *args, **kw)

    monkeypatch.setattr(normalise, "_copy_with_lineage", recording_copy)
    return selects


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json"])
def test_parts_side_by_side_are_checked_inside_their_one_parse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Integers, fractions, booleans, times and all-null keys, top level and in lists of
    structs: each part is read once, its check inside that read, and gives exactly what the
    scan over every record gives. Nothing but the Parquet is left behind."""
    parts = _write_parts(tmp_path, fmt, [_CHECKED[:20], _CHECKED[20:]])
    full = _typed_over_every_record(monkeypatch, parts, tmp_path / "full", AUTO_KIND)
    with monkeypatch.context() as patch:
        _no_second_pass(patch)
        out = tmp_path / "out"
        result = to_parquet(parts, out, kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT)
    assert sorted(p.name for p in out.iterdir()) == ["part-0.parquet", "part-1.parquet"]
    assert table(result.parquet_paths) == full
    types = dict(full[0])
    assert (types["count"], types["price"], types["paid"], types["at"]) == (
        "BIGINT",
        "DOUBLE",
        "BOOLEAN",
        "TIME",
    )


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_key_past_the_sample_of_a_later_part_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A key the second part's sample never saw, at the top level or inside a list of structs,
    lands: its guarded read (_guarded_reader) still fails on a key it does not know."""
    late = dict(_CHECKED[1])
    late["id"] = "late"
    if where == "top":
        late["extra"] = {"note": "only here"}
    else:
        late["lines"] = [{"code": "B", "qty": 1, "tax": {"rate": 0.1, "due": None}, "extra": 5}]
    first = [dict(_CHECKED[i % 40], id=f"a{i}") for i in range(_PAST_SAMPLE)]
    second = [dict(_CHECKED[i % 40], id=f"b{i}") for i in range(_PAST_SAMPLE)] + [late]
    parts = _write_parts(tmp_path, "jsonl", [first, second])
    result = to_parquet(parts, tmp_path / "out", kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT)
    assert result.rows == 2 * _PAST_SAMPLE + 1
    column = "extra.note" if where == "top" else "lines[1].extra"
    with duckdb.connect() as con:
        got = con.execute(
            f"SELECT {column} FROM read_parquet(?) WHERE id = 'late'",
            [[str(p) for p in result.parquet_paths]],
        ).fetchone()
    assert got == (("only here",) if where == "top" else (5,))


@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_part_its_small_sample_types_otherwise_is_read_again_with_the_default_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A part's guarded read first detects types over fewer records than DuckDB's default
    sample. A key first seen past those records but inside the default sample binds other
    types, which fails that read before its first row; the part is read again with the
    default sample: the key lands, with no second parse and no scan over every record."""
    from export_pipeline.core import normalise

    selects = _recorded_copies(monkeypatch)
    at = normalise._SPECULATIVE_SAMPLE + 300
    records = [dict(_CHECKED[i % 40], id=f"b{i}", note="x" * 20) for i in range(at + 1000)]
    if where == "top":
        records[at]["extra"] = {"note": "only here"}
    else:
        records[at]["lines"] = [
            {"code": "B", "qty": 1, "tax": {"rate": 0.1, "due": None}, "extra": "five"}
        ]
    first = [dict(_CHECKED[i % 40], id=f"a{i}", note="x" * 20) for i in range(at + 1000)]
    parts = _write_parts(tmp_path, "jsonl", [first, records])
    with monkeypatch.context() as patch:
        _no_second_pass(patch)
        result = to_parquet(
            parts, tmp_path / "out", kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT
        )
    assert result.rows == 2 * (at + 1000)
    small = f"sample_size := {normalise._SPECULATIVE_SAMPLE + 2}"
    default = f"sample_size := {normalise._DEFAULT_SAMPLE + 2}"
    second = [q for q in selects if "part-1" in q]
    assert [small in q for q in second] == [True, False] and default in second[1]
    column = "extra.note" if where == "top" else "lines[1].extra"
    with duckdb.connect() as con:
        got = con.execute(
            f"SELECT {column} FROM read_parquet(?) WHERE id = ?",
            [[str(p) for p in result.parquet_paths], f"b{at}"],
        ).fetchone()
    assert got == (("only here",) if where == "top" else ("five",))


@pytest.mark.parametrize("late", [False, True], ids=["alike", "late-key"])
def test_a_lone_file_is_read_with_a_small_sample_only_where_it_types_as_the_default_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late: bool
) -> None:
    """A lone JSON Lines file is read with the types of its first 2,048 records when they are
    those of DuckDB's default sample (cheaper to detect), else with the default sample: a key
    first seen in between lands, with no scan over every record."""
    from export_pipeline.core import normalise

    selects = _recorded_copies(monkeypatch)
    _no_full_scan(monkeypatch)
    at = normalise._SPECULATIVE_SAMPLE + 300
    records = [dict(_CHECKED[i % 40], id=f"r{i}", note="x" * 20) for i in range(at + 1000)]
    if late:
        records[at]["extra"] = {"note": "only here"}
    (part,) = _write_parts(tmp_path, "jsonl", [records])
    result = to_parquet(
        [part], tmp_path / "out", kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT
    )
    assert result.rows == at + 1000
    assert len(selects) == 1
    small = f"sample_size := {normalise._SPECULATIVE_SAMPLE}"
    assert (small in selects[0]) is not late
    if late:
        with duckdb.connect() as con:
            got = con.execute(
                "SELECT extra.note FROM read_parquet(?) WHERE id = ?",
                [[str(p) for p in result.parquet_paths], f"r{at}"],
            ).fetchone()
        assert got == ("only here",)


def test_a_witness_that_does_not_take_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should DuckDB type a guarded position other than JSON despite the witness records, the
    guarded read fails before its first row (its bound types are checked) rather than letting
    the sampled type round 1.5 into 2."""
    from export_pipeline.core import normalise

    monkeypatch.setattr(normalise, "_WITNESS_VALUES", (0, 0))  # integers: no JSON
    parts = _parts_with_a_late_record(tmp_path, 2, "1", "1.5")
    result = to_parquet(parts, tmp_path / "out", kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT)
    assert dict(result.columns)["v"] == "DOUBLE"
    with duckdb.connect() as con:
        got = con.execute(
            "SELECT v, n.list[1].v FROM read_parquet(?) WHERE id = 'late'",
            [[str(p) for p in result.parquet_paths]],
        ).fetchone()
    assert got == (1.5, 1.5)


def test_a_key_only_the_guarded_reads_own_sample_saw_is_not_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should the guarded read's own type sample see a key the part's sample did not (here: it
    samples further), that column is not silently left out of the select: the read's whole row
    type is checked, it fails, and the export is typed over every record."""
    from export_pipeline.core import normalise

    monkeypatch.setattr(normalise, "_DEFAULT_SAMPLE", 22_000)
    records = [dict(_CHECKED[i % 40], id=f"b{i}") for i in range(_PAST_SAMPLE)]
    records[21_000]["seen_late"] = "kept"
    parts = _write_parts(tmp_path, "jsonl", [_CHECKED, records])
    result = to_parquet(parts, tmp_path / "out", kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT)
    with duckdb.connect() as con:
        got = con.execute(
            "SELECT seen_late FROM read_parquet(?, union_by_name = true) WHERE id = 'b21000'",
            [[str(p) for p in result.parquet_paths]],
        ).fetchone()
    assert got == ("kept",)


def _count_samples(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose types normalise samples (a DESCRIBE of the sampled read), in order."""
    from export_pipeline.core import normalise

    described = normalise._describe
    sampled: list[str] = []

    def describe(con: duckdb.DuckDBPyConnection, select_sql: str) -> list[tuple[str, str]]:
        if "read_json(" in select_sql:
            sampled.append(select_sql.split("read_json(", 1)[1].split(",", 1)[0].strip("'[]"))
        return described(con, select_sql)

    monkeypatch.setattr(normalise, "_describe", describe)
    return sampled


def _alike_parts(
    tmp_path: Path, count: int, last: list[dict[str, Any]] | None = None
) -> list[Path]:
    """``count`` parts of records shaped alike (the parts of one snapshot); ``last`` replaces
    the records of the last one."""
    chunks = [[dict(r, id=f"{n}-{r['id']}") for r in _CHECKED] for n in range(count)]
    if last is not None:
        chunks[-1] = last
    return _write_parts(tmp_path, "jsonl", chunks)


def test_parts_alike_are_sampled_one_round_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the first round of samples (a part per worker) agree, the other parts are read
    with those types, not sampled each (0.3-0.4 CPU-s per part of Mews reservations): their
    guarded reads verify the prediction. The table is the scan over every record's."""
    parts = _alike_parts(tmp_path, duckdb_threads() + 2)
    full = _typed_over_every_record(monkeypatch, parts, tmp_path / "full", AUTO_KIND)
    with monkeypatch.context() as patch:
        _no_second_pass(patch)
        sampled = _count_samples(patch)
        result = to_parquet(
            parts, tmp_path / "out", kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT
        )
    assert sampled == [str(p) for p in parts[: duckdb_threads()]]
    assert table(result.parquet_paths) == full


@pytest.mark.parametrize(
    ("change", "types_change"),
    [
        ("lacks a key", False),  # its own types differ, the export's do not
        ("only nulls", False),  # null throughout where the others have values
        ("new key", True),
        ("fractions", True),  # bound as predicted (JSON at a guarded position), then refused
        ("all null", True),  # a key null in every part sampled first has values here
    ],
)
def test_a_part_unlike_the_sampled_ones_is_read_with_its_own_types(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, types_change: bool
) -> None:
    """A part whose own sample differs from the types predicted for it is found before its
    data is trusted (its read binds other types, or meets a value they did not foresee),
    sampled, and read with its own types; if those change the export's types every part is
    read again with the new ones. Never typed over every record; the table is that scan's."""
    records = [dict(r, id=f"last-{r['id']}") for r in _CHECKED]
    for i, record in enumerate(records):
        if change == "lacks a key":
            del record["meta"]
        elif change == "only nulls":
            record["meta"] = None
        elif change == "new key":
            record["extra"] = {"note": f"n{i}", "rank": i}
        elif change == "fractions":
            record["count"] = i + 0.25
        else:
            record["closed"] = {"at": f"2024-01-{1 + i % 28:02d}", "by": i}
    parts = _alike_parts(tmp_path, duckdb_threads() + 2, last=records)
    full = _typed_over_every_record(monkeypatch, parts, tmp_path / "full", AUTO_KIND)
    with monkeypatch.context() as patch:
        _no_second_pass(patch)
        sampled = _count_samples(patch)
        out = tmp_path / "out"
        result = to_parquet(parts, out, kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT)
    assert table(result.parquet_paths) == full
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in result.parquet_paths)
    first_round = [str(p) for p in parts[: duckdb_threads()]]
    # Once per part sampled first, once for the odd part; with new types, the parts that
    # were only predicted are sampled too, and nothing twice.
    again = [str(p) for p in parts[duckdb_threads() : -1]] if types_change else []
    assert sorted(sampled) == sorted([*first_round, str(parts[-1]), *again])


_TZ_SCRIPT = """
import json, sys
from datetime import UTC, datetime
from pathlib import Path
import duckdb
from export_pipeline.core.model import ExportKind
from export_pipeline.core.normalise import to_parquet
kind = ExportKind(provider="p", name="k", primary_key=("id",), columns={
    "id": "VARCHAR", "seen": "TIMESTAMPTZ", "evses": "STRUCT(seen TIMESTAMPTZ)[]"})
out = {}
for name in sys.argv[2:]:
    src = Path(sys.argv[1]) / name
    result = to_parquet([src], src.parent / ("out-" + name), kind=kind, export_id="e",
                        loaded_at=datetime(2024, 5, 1, tzinfo=UTC))
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        out[name] = [str(v) for v in con.execute(
            "SELECT seen, evses[1].seen FROM read_parquet(?)", [str(result.parquet_paths[0])]
        ).fetchone()]
print(json.dumps(out))
"""


def test_declared_timestamptz_does_not_move_with_the_machines_time_zone(tmp_path: Path) -> None:
    """DuckDB reads "...Z" as a UTC TIMESTAMP; the cast to a declared TIMESTAMPTZ must not
    interpret it in the machine's zone (a run in New York moved every value by 5 hours)."""

    record = {
        "id": "A",
        "seen": "2024-01-15T10:00:00Z",
        "evses": [{"seen": "2024-01-15T11:30:00Z"}],
    }
    (tmp_path / "a.json").write_text(json.dumps([record]))
    (tmp_path / "a.jsonl").write_text(json.dumps(record) + "\n")
    with open(tmp_path / "a.csv", "w", newline="") as out:
        csv.writer(out).writerows(
            [["id", "seen", "evses"], ["A", record["seen"], json.dumps(record["evses"])]]
        )
    env = {**os.environ, "TZ": "America/New_York"}
    done = subprocess.run(
        [sys.executable, "-c", _TZ_SCRIPT, str(tmp_path), "a.json", "a.jsonl", "a.csv"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    expected = ["2024-01-15 10:00:00+00:00", "2024-01-15 11:30:00+00:00"]
    assert found == {"a.json": expected, "a.jsonl": expected, "a.csv": expected}


_TZ_KIND = ExportKind(
    provider="p",
    name="k",
    primary_key=("id",),
    columns={
        "id": "VARCHAR",
        "seen": "TIMESTAMPTZ",
        "evses": "STRUCT(seen TIMESTAMPTZ, kw INTEGER)[]",
    },
)


@pytest.mark.parametrize("layout", ["array", "lines", "parts"])
@pytest.mark.parametrize("zone", ["utc", "offsets"])
def test_declared_timestamptz_lands_as_the_same_instant_nested_or_not(
    tmp_path: Path, layout: str, zone: str
) -> None:
    """Declared TIMESTAMPTZ values sampled as TIMESTAMPs become instants without ICU, leaf by
    leaf inside lists and structs (NULL lists, elements and fields stay NULL). Offsets mixed
    with "Z" make DuckDB's sample say VARCHAR, and there only the real cast is right:
    10:00+02:00 is 08:00 UTC, not 10:00 (the shortcut reads the clock time)."""
    plus = "+02:00" if zone == "offsets" else "Z"
    records = [
        {
            "id": "a",
            "seen": f"2024-01-15T10:00:00{plus}",
            "evses": [{"seen": f"2024-01-15T11:30:00{plus}", "kw": 7}, None, {"kw": 3}],
        },
        {"id": "b", "seen": "2024-01-15T10:00:00Z", "evses": [{"seen": "2024-01-15T12:00:00Z"}]},
        {"id": "c", "seen": None, "evses": None},
    ]
    if layout == "array":
        sources = [tmp_path / "a.json"]
        sources[0].write_text(json.dumps(records))
    elif layout == "lines":
        sources = [tmp_path / "a.jsonl"]
        sources[0].write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        sources = [tmp_path / "p0.jsonl", tmp_path / "p1.jsonl"]
        sources[0].write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
        sources[1].write_text(json.dumps(records[2]) + "\n")
    result = to_parquet(
        sources, tmp_path / "out", kind=_TZ_KIND, export_id="e", loaded_at=LOADED_AT
    )
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        rows = con.execute(
            "SELECT id, CAST(seen AS VARCHAR), CAST(evses AS VARCHAR) FROM read_parquet(?) "
            "ORDER BY id",
            [[str(p) for p in result.parquet_paths]],
        ).fetchall()
        types = dict(
            con.execute(
                "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet(?))",
                [str(result.parquet_paths[0])],
            ).fetchall()
        )
    hour = "08" if zone == "offsets" else "10"
    early = "09:30" if zone == "offsets" else "11:30"
    assert rows == [
        (
            "a",
            f"2024-01-15 {hour}:00:00+00",
            f"[{{'seen': '2024-01-15 {early}:00+00', 'kw': 7}}, NULL, {{'seen': NULL, 'kw': 3}}]",
        ),
        ("b", "2024-01-15 10:00:00+00", "[{'seen': '2024-01-15 12:00:00+00', 'kw': NULL}]"),
        ("c", None, None),
    ]
    assert types["seen"] == "TIMESTAMP WITH TIME ZONE"
    assert types["evses"] == "STRUCT(seen TIMESTAMP WITH TIME ZONE, kw INTEGER)[]"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("at", [5, 22_000], ids=["in-sample", "past-sample"])
def test_special_timestamp_strings_land_as_their_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, at: int
) -> None:
    """DuckDB's sampled JSON reader stores "infinity", "-infinity" and "epoch" in a timestamp
    or date as 1900-01-01; they must land as infinity, -infinity and 1970-01-01, top level and
    nested, and an honest date before 1900 must not cost a second read."""
    import export_pipeline.core.normalise as normalise

    def record(i: int) -> dict[str, Any]:
        seen, day, nested = "2024-01-15T10:00:00Z", "2024-01-15", "2024-01-15T11:00:00Z"
        if i == at:
            seen, day, nested = "Infinity", "-infinity", "epoch"
        return {"id": i, "seen": seen, "day": day, "evses": [{"seen": nested}]}

    def write(records: list[dict[str, Any]]) -> None:
        lines = suffix == ".jsonl"
        source.write_text(
            "".join(json.dumps(r) + "\n" for r in records) if lines else json.dumps(records)
        )

    records = [record(i) for i in range(25_000)]
    source = tmp_path / f"a{suffix}"
    write(records)
    result = to_parquet(
        [source], tmp_path / "out", kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT
    )
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        got = con.execute(
            "SELECT CAST(seen AS VARCHAR), CAST(day AS VARCHAR), CAST(evses[1].seen AS VARCHAR) "
            "FROM read_parquet(?) WHERE id = ?",
            [[str(p) for p in result.parquet_paths], at],
        ).fetchone()
        early = con.execute(
            "SELECT count(*) FROM read_parquet(?) WHERE CAST(day AS VARCHAR) LIKE '1900%'",
            [[str(p) for p in result.parquet_paths]],
        ).fetchone()
    assert got is not None and got[0] == "infinity" and got[1] == "-infinity"
    assert got[2].startswith("1970-01-01 00:00:00")
    assert early == (0,)

    # A real date before 1900 is looked at (the statistics say so) but read once.
    full_scans: list[object] = []
    auto_schema = normalise._auto_schema
    monkeypatch.setattr(
        normalise, "_auto_schema", lambda *a: full_scans.append(a) or auto_schema(*a)
    )
    records[at] = {
        "id": at,
        "seen": "1850-03-01T00:00:00Z",
        "day": "1850-03-01",
        "evses": [{"seen": "1850-03-01T00:00:00Z"}],
    }
    write(records)
    result = to_parquet(
        [source], tmp_path / "out2", kind=AUTO_KIND, export_id="e", loaded_at=LOADED_AT
    )
    assert full_scans == []
    assert result.rows == 25_000


@pytest.mark.parametrize(
    "docs",
    [
        ['{"a":1}', '{"a":1.5}'],
        ['{"a":1}', '{"a":"x"}'],
        ['{"a":1}', '{"a":{"b":1}}'],
        ['{"a":[1]}', '{"a":{"b":1}}'],
        ['{"a":null}', '{"a":{"b":null}}'],
        ['{"a":[]}', '{"a":[{"b":1}]}', '{"a":[{"c":true}]}'],
        ['{"a":true}', '{"a":1}'],
        ["1", '{"a":1}'],
        ['{"a":{"b":1}}', '{"a":{"c":"x"}}', '{"a":null}'],
        ['{"a":-1}', '{"a":18446744073709551615}', '{"a":2}'],
        ['{"a":1}', '{"a":18446744073709551616}'],
        ['{"Name":1,"name":"x"}', '{"name":"y"}'],
    ],
)
def test_merged_shapes_agree_with_json_group_structure(docs: list[str]) -> None:
    """The CSV cells' and key-by-key records' types come from distinct json_structure shapes
    merged in Python (schema.merge_structure), in place of DuckDB's json_group_structure,
    which holds every row: both must say the same, in either order of the shapes."""
    from export_pipeline.core import schema

    with duckdb.connect() as con:
        values = ", ".join(f"('{d}')" for d in docs)
        (grouped,) = con.execute(
            f"SELECT json_group_structure(j::JSON) FROM (VALUES {values}) t(j)"
        ).fetchone()
        shapes = [
            json.loads(con.execute(f"SELECT json_structure('{d}'::JSON)").fetchone()[0])
            for d in docs
        ]
    for ordered in (shapes, shapes[::-1]):
        merged = ordered[0]
        for shape in ordered[1:]:
            merged = schema.merge_structure(merged, shape)
        assert json.dumps(merged, sort_keys=True) == json.dumps(json.loads(grouped), sort_keys=True)
