"""Files in other text encodings than UTF-8 land as the same table, or fail naming file and line.

DuckDB's readers read UTF-8 only: UTF-16 and UTF-32 (told by their bytes) and a kind's declared
``encoding`` are transcoded first, through the real code path, files and DuckDB on disk."""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from export_pipeline.core.errors import ParseError
from export_pipeline.core.load import load_parquet
from export_pipeline.core.model import ExportKind, FileFormat
from export_pipeline.core.normalise import detect_format, to_parquet
from export_pipeline.providers.spec import ExportApiSpec
from export_pipeline_tests.conftest import open_warehouse

LOADED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
KIND = ExportKind(
    provider="crm",
    name="contacts",
    primary_key=("id",),
    columns={"id": "VARCHAR", "name": "VARCHAR", "tags": "VARCHAR[]"},
)
RECORDS: list[dict[str, Any]] = [
    {"id": "C1", "name": "Zoë Müller-Straße", "tags": ["café", "€"]},
    {"id": "C2", "name": "“quoted” — dash", "tags": []},
    {"id": "C3", "name": "plain", "tags": ["a"]},
]
# Characters cp1252 and latin-1 hold (the declared-encoding cases); UTF-16/32 hold any.
WIDE = [*RECORDS, {"id": "C4", "name": "日本語 😀", "tags": ["ключ"]}]


def _text(records: list[dict[str, Any]], fmt: FileFormat) -> str:
    if fmt is FileFormat.JSON_ARRAY:
        return json.dumps(records, ensure_ascii=False, indent=1)
    if fmt is FileFormat.JSONL:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "name", "tags"])
    for r in records:
        writer.writerow([r["id"], r["name"], json.dumps(r["tags"], ensure_ascii=False)])
    return out.getvalue()


def _rows(paths: list[Path]) -> list[tuple[Any, ...]]:
    with duckdb.connect() as con:
        return con.execute(
            "SELECT id, name, tags FROM read_parquet(?) ORDER BY id", [[str(p) for p in paths]]
        ).fetchall()


def _parquet(src: Path, out: Path, kind: ExportKind = KIND) -> list[Path]:
    return to_parquet([src], out, kind=kind, export_id="X", loaded_at=LOADED_AT).parquet_paths


FORMATS = [FileFormat.CSV, FileFormat.JSON_ARRAY, FileFormat.JSONL]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize(
    ("codec", "records", "declared", "gz"),
    [
        ("utf-16", WIDE, None, False),  # with its byte-order mark (little-endian here)
        ("utf-16-be", WIDE, None, False),  # no mark: told by the NUL bytes
        ("utf-16-le", WIDE, None, True),  # no mark, gzip
        ("utf-32", WIDE, None, False),
        ("cp1252", RECORDS, "cp1252", False),
        ("latin-1", RECORDS[2:], "latin-1", True),
        ("utf-8-sig", WIDE, "cp1252", False),  # a UTF-8 mark outranks the declaration
    ],
    ids=["utf16-bom", "utf16be", "utf16le-gz", "utf32", "cp1252", "latin1-gz", "utf8bom-declared"],
)
def test_a_file_in_another_encoding_gives_the_utf8_table(
    tmp_path: Path,
    fmt: FileFormat,
    codec: str,
    records: list[dict[str, Any]],
    declared: str | None,
    gz: bool,
) -> None:
    text = _text(records, fmt)
    utf8 = tmp_path / "export.data"
    utf8.write_text(text, encoding="utf-8")
    other = tmp_path / "other" / "export.data"
    other.parent.mkdir()
    data = text.encode(codec)
    other.write_bytes(gzip.compress(data) if gz else data)
    assert detect_format(other).format is fmt

    kind = replace(KIND, encoding=declared)
    expected = _rows(_parquet(utf8, tmp_path / "pq-utf8"))
    got = _parquet(other, tmp_path / "pq-other", kind)
    assert _rows(got) == expected
    assert len(expected) == len(records)
    assert {r[1] for r in expected} == {r["name"] for r in records}
    with duckdb.connect() as con:  # the provider's file name, not the transcoded copy's path
        (source,) = con.execute(
            "SELECT DISTINCT _source_file FROM read_parquet(?)", [[str(p) for p in got]]
        ).fetchone()
    assert source == "export.data"
    assert not (tmp_path / "pq-other" / ".utf8").exists()  # the copy is scratch


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_an_undeclared_legacy_encoding_fails_naming_line_and_the_setting(
    tmp_path: Path, fmt: FileFormat
) -> None:
    src = tmp_path / "export.data"
    text = _text(RECORDS[2:] + RECORDS[:1], fmt)
    src.write_bytes(text.encode("cp1252"))
    first_non_ascii = next(n for n, line in enumerate(text.splitlines(), 1) if not line.isascii())
    with pytest.raises(ParseError) as caught:
        _parquet(src, tmp_path / "pq")
    err = caught.value
    assert err.file == "export.data" and err.provider == "crm" and err.kind == "contacts"
    assert err.line == first_non_ascii > 1
    assert err.hint is not None and "encoding" in err.hint
    assert "Original Line" not in str(err)


def test_bytes_the_declared_encoding_does_not_have_fail_with_their_line(tmp_path: Path) -> None:
    src = tmp_path / "export.csv"
    good = _text(RECORDS, FileFormat.CSV).encode("cp1252")
    src.write_bytes(good + b"C9,bad \x81 byte,[]\n")  # 0x81: no character in cp1252
    with pytest.raises(ParseError) as caught:
        _parquet(src, tmp_path / "pq", replace(KIND, encoding="cp1252"))
    assert caught.value.line == len(RECORDS) + 2
    assert caught.value.file == "export.csv"
    assert "cp1252" in str(caught.value) and "the kind declares it" in str(caught.value)


def test_a_truncated_utf16_file_fails_clearly(tmp_path: Path) -> None:
    src = tmp_path / "export.jsonl"
    src.write_bytes(_text(WIDE, FileFormat.JSONL).encode("utf-16") + b"{")  # half a character
    with pytest.raises(ParseError) as caught:
        _parquet(src, tmp_path / "pq")
    assert caught.value.line == len(WIDE) + 1
    assert "utf-16-le" in str(caught.value) and "its bytes say so" in str(caught.value)


def test_a_utf16_export_loads_into_duckdb_like_its_utf8_twin(tmp_path: Path) -> None:
    """To the warehouse on disk: same table, whatever the encoding the provider wrote."""
    tables = []
    for codec in ("utf-8", "utf-16"):
        src = tmp_path / codec / "contacts.csv"
        src.parent.mkdir()
        src.write_bytes(_text(WIDE, FileFormat.CSV).encode(codec))
        warehouse = open_warehouse("duckdb", tmp_path / codec / "wh")
        paths = _parquet(src, tmp_path / codec / "pq")
        with warehouse.transaction() as con:
            load_parquet(con, KIND, paths)
        with warehouse.transaction() as con:
            tables.append(
                con.execute("SELECT id, name, tags FROM crm.contacts ORDER BY id").fetchall()
            )
    assert tables[0] == tables[1] and len(tables[0]) == len(WIDE)


def test_a_spec_kind_declares_its_encoding_and_an_unknown_one_is_refused() -> None:
    from export_pipeline_tests.providers.spec.test_spec import spec_dict

    kind = {"name": "things", "primary_key": ["id"]}
    spec = ExportApiSpec.model_validate(spec_dict(kinds=[{**kind, "encoding": "cp1252"}]))
    assert spec.export_kinds()[0].encoding == "cp1252"
    with pytest.raises(ValueError, match="unknown encoding 'klingon'"):
        ExportApiSpec.model_validate(spec_dict(kinds=[{**kind, "encoding": "klingon"}]))
    with pytest.raises(ValueError, match="unknown encoding"):
        replace(KIND, encoding="klingon")
