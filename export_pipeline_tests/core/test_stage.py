"""Loading while parsing: chunked Parquet told one by one, staged in the load's transaction,
renamed into the table when the load replaces it whole; any doubt falls back to the files."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from export_pipeline.core.errors import ParseError
from export_pipeline.core.load import load_parquet
from export_pipeline.core.model import ExportKind, LoadMode
from export_pipeline.core.normalise import NormaliseResult, to_parquet
from export_pipeline.core.slots import CpuSlots
from export_pipeline.core.stage import StagedLoad
from export_pipeline.core.warehouse import ROW_GROUP_SIZE, DuckDBWarehouse
from export_pipeline_tests.core.conftest import duckdb_threads

LOADED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SNAPSHOT = ExportKind(
    provider="shop", name="orders", primary_key=("id",), load_mode=LoadMode.SNAPSHOT
)
# More than DuckDB's 20,480-record type sample, so a value after it is "late".
PAST_SAMPLE = 25_000


def write_parts(folder: Path, parts: int, rows: int, *, late: str | None = None) -> list[Path]:
    """JSON Lines parts of ``rows`` orders each; ``late`` is appended to the last part."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(parts):
        path = folder / f"part-{n}.jsonl"
        with path.open("w") as fh:
            for i in range(rows):
                fh.write(f'{{"id": "{n}-{i:06d}", "amount": {i}, "note": null}}\n')
            if late and n == parts - 1:
                fh.write(late + "\n")
        paths.append(path)
    return paths


def staged_ingest(
    warehouse: DuckDBWarehouse,
    kind: ExportKind,
    sources: list[Path],
    work: Path,
    *,
    slots: CpuSlots | None = None,
    keys_beside: bool = False,
    **kw: int,
) -> tuple[object, list[Path], bool]:
    """What the runner does: normalise telling the stager each file, then the load in the
    staged transaction when it can be used, else in a transaction of its own. Returns the load
    result, the Parquet files, and whether the staged transaction was used. ``slots`` replaces
    the stager's own (to watch them). ``keys_beside``: the key check beside the last inserts
    is let finish however soon they do."""
    with StagedLoad(warehouse, kind, work / "stage", memory_limit="200MB") as staged:
        if slots is not None:
            staged.slots = slots
        staged.wait_for_keys = keys_beside
        result = to_parquet(
            sources,
            work / "parquet",
            kind=kind,
            export_id="e1",
            loaded_at=LOADED_AT,
            on_file=staged.add,
            slots=staged.slots,
            **kw,
        )
        con = staged.take(result.parquet_paths)
        if con is not None:
            # As the runner does: the keys checked beside the last inserts, if they were.
            assert staged.keys_unique is not None or not keys_beside or not kind.primary_key
            load = load_parquet(
                con,
                kind,
                result.parquet_paths,
                staged=staged.table,
                keys_unique=staged.keys_unique,
            )
            staged.commit()
            return load, result.parquet_paths, True
    with warehouse.transaction() as con:
        load = load_parquet(con, kind, result.parquet_paths)
    return load, result.parquet_paths, False


def stage_tables(warehouse: DuckDBWarehouse) -> list[str]:
    with warehouse.connect() as con:
        rows = con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE starts_with(table_name, '_stage_')"
        ).fetchall()
    return [r[0] for r in rows]


def test_a_big_json_array_is_written_in_chunks_each_told_once_complete(tmp_path: Path) -> None:
    """Above ``chunk_bytes`` a JSON array becomes ``<stem>-0000.parquet``, ... in row order;
    each chunk is told once, and when told it is already a whole Parquet file."""
    source = tmp_path / "locations.json"
    source.write_text(json.dumps([{"id": i, "name": f"n{i}"} for i in range(90_000)]))
    told: list[tuple[Path, int, int]] = []

    def on_file(path: Path) -> None:
        with duckdb.connect() as con:  # raises if the footer is not written yet
            count = con.execute("SELECT count(*) FROM read_parquet(?)", [str(path)]).fetchone()
        told.append((path, path.stat().st_ino, count[0] if count else -1))

    kind = ExportKind(provider="p", name="locations", primary_key=("id",))
    out = tmp_path / "out"
    result = to_parquet(
        [source], out, kind=kind, export_id="e", loaded_at=LOADED_AT, on_file=on_file, chunk_bytes=1
    )
    names = [p.name for p in result.parquet_paths]
    assert len(names) >= 2, names
    assert names == [f"locations-{n:04d}.parquet" for n in range(len(names))]
    assert sorted(p.name for p in out.iterdir()) == names  # no chunk folder left
    assert [ino for _, ino, _ in told] == [p.stat().st_ino for p in result.parquet_paths]
    assert sum(n for _, _, n in told) == result.rows == 90_000
    with duckdb.connect() as con:
        ids = [
            r[0]
            for r in con.execute(
                "SELECT id FROM read_parquet(?)", [[str(p) for p in result.parquet_paths]]
            ).fetchall()
        ]
    assert ids == list(range(90_000))  # the files, in name order, hold the rows in file order


@pytest.mark.parametrize("keys_beside", [False, True])
def test_a_snapshot_staged_while_parsing_becomes_the_table_by_a_rename(
    tmp_path: Path, keys_beside: bool
) -> None:
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb", publish_reads=False)
    sources = write_parts(tmp_path / "raw", parts=3, rows=1_000)
    load, paths, staged = staged_ingest(
        warehouse, SNAPSHOT, sources, tmp_path / "w1", keys_beside=keys_beside
    )
    assert staged and load.renamed
    assert (load.rows_inserted, load.table_rows) == (3_000, 3_000)
    assert load.table_files == tuple(str(p) for p in paths)
    with warehouse.connect() as con:
        types = dict(
            con.execute(
                "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'orders'"
            ).fetchall()
        )
        assert types["note"] == "VARCHAR"  # all-null: VARCHAR as a created table has it
        assert con.execute("SELECT count(*), count(DISTINCT id) FROM shop.orders").fetchone() == (
            3_000,
            3_000,
        )
    assert stage_tables(warehouse) == []

    # The next snapshot drops a row and changes another: renamed in again, counted right.
    again = write_parts(tmp_path / "raw2", parts=3, rows=999)
    load, _, staged = staged_ingest(warehouse, SNAPSHOT, again, tmp_path / "w2")
    assert staged and load.renamed
    assert (load.rows_updated, load.rows_deleted, load.table_rows) == (2_997, 3, 2_997)
    assert stage_tables(warehouse) == []


def test_a_snapshot_keeps_a_column_the_table_has_and_the_export_lacks(tmp_path: Path) -> None:
    """The table's columns differ from the export's: the rows are copied, the column stays."""
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb", publish_reads=False)
    with warehouse.transaction() as con:
        con.execute("CREATE SCHEMA shop")
        con.execute(
            "CREATE TABLE shop.orders (id VARCHAR, amount BIGINT, note VARCHAR, legacy VARCHAR, "
            "_export_id VARCHAR, _source_file VARCHAR, _loaded_at TIMESTAMPTZ)"
        )
        con.execute("INSERT INTO shop.orders (id, legacy) VALUES ('0-000001', 'old')")
    load, _, staged = staged_ingest(
        warehouse, SNAPSHOT, write_parts(tmp_path / "raw", 2, 100), tmp_path / "w"
    )
    assert staged and not load.renamed
    assert (load.rows_updated, load.table_rows) == (1, 200)
    with warehouse.connect() as con:
        cols = [r[0] for r in con.execute("DESCRIBE shop.orders").fetchall()]
        assert "legacy" in cols
        assert con.execute("SELECT count(*) FROM shop.orders").fetchone() == (200,)
    assert stage_tables(warehouse) == []


@pytest.mark.parametrize("keys_beside", [False, True])
def test_duplicate_keys_are_loaded_from_the_files_last_occurrence_winning(
    tmp_path: Path, keys_beside: bool
) -> None:
    """Found by the load's own check, or by the one beside the last staging inserts."""
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb", publish_reads=False)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "part-0.jsonl").write_text('{"id": "a", "amount": 1}\n{"id": "b", "amount": 2}\n')
    (raw / "part-1.jsonl").write_text('{"id": "a", "amount": 3}\n')
    load, _, staged = staged_ingest(
        warehouse, SNAPSHOT, sorted(raw.iterdir()), tmp_path / "w", keys_beside=keys_beside
    )
    assert staged and not load.renamed
    with warehouse.connect() as con:
        rows = con.execute("SELECT id, amount FROM shop.orders ORDER BY id").fetchall()
    assert rows == [("a", 3), ("b", 2)]
    assert stage_tables(warehouse) == []


def test_a_value_past_the_sample_discards_what_was_staged_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """The last part's check finds a fraction where the sample saw integers: normalise reads
    every record again, so the files staged before are not the export's files; the staged
    rows are rolled back and the load reads the new files (2.5 kept, not rounded)."""
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb", publish_reads=False)
    sources = write_parts(
        tmp_path / "raw", parts=2, rows=PAST_SAMPLE, late='{"id": "late", "amount": 2.5}'
    )
    load, _, staged = staged_ingest(warehouse, SNAPSHOT, sources, tmp_path / "w")
    assert not staged and not load.renamed
    with warehouse.connect() as con:
        assert con.execute("SELECT amount FROM shop.orders WHERE id = 'late'").fetchone() == (2.5,)
        assert con.execute("SELECT count(*) FROM shop.orders").fetchone() == (2 * PAST_SAMPLE + 1,)
    assert stage_tables(warehouse) == []


class _WatchedSlots(CpuSlots):
    """Slots noting each hold (insert or not, under which limit) and the most held at once."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.held: list[tuple[bool, int | None]] = []

    @contextlib.contextmanager
    def hold(self, *, urgent: bool = False) -> Iterator[None]:
        with super().hold(urgent=urgent):
            with self._lock:
                self.running += 1
                self.most = max(self.most, self.running)
                self.held.append((urgent, self.capacity))
            try:
                yield
            finally:
                with self._lock:
                    self.running -= 1


def test_a_part_whose_types_change_the_exports_loads_every_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts beyond the first round are read with its types; the last one's own (fractions
    where the first parts had integers) change the export's, so every part is read again
    while the staging was told the first files: the staged rows are not used unless they are
    exactly the final files', and every value lands as written."""
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb", publish_reads=False)
    cores = duckdb_threads()
    sources = write_parts(tmp_path / "raw", parts=cores + 2, rows=3_000)
    with sources[-1].open("w") as fh:
        fh.writelines(
            f'{{"id": "last-{i}", "amount": {i}.25, "note": null}}\n' for i in range(3_000)
        )
    from export_pipeline.core import normalise

    runs = []
    steps = normalise._sampled_steps
    monkeypatch.setattr(
        normalise, "_sampled_steps", lambda *a, **k: runs.append(k) or steps(*a, **k)
    )
    load, _, _ = staged_ingest(warehouse, SNAPSHOT, sources, tmp_path, chunk_bytes=1)
    assert [bool(k.get("known")) for k in runs] == [False, True]  # read again, known samples kept
    assert load.table_rows == (cores + 2) * 3_000  # type: ignore[attr-defined]
    with warehouse.connect() as con:
        got = con.execute(
            "SELECT any_value(typeof(amount)), sum(amount), count(DISTINCT _source_file) "
            "FROM shop.orders"
        ).fetchone()
    assert got == (
        "DOUBLE",
        (cores + 1) * sum(range(3_000)) + sum(i + 0.25 for i in range(3_000)),
        cores + 2,
    )
    assert stage_tables(warehouse) == []


def test_parts_and_their_staging_take_turns_on_the_cores(tmp_path: Path) -> None:
    """Parts converted side by side keep every core busy, so each step and each insert of the
    staged load holds one of as many slots as normalise runs steps: never a busy DuckDB
    thread more than cores, and all rows staged and loaded."""
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb", publish_reads=False)
    sources = write_parts(tmp_path / "raw", parts=3, rows=PAST_SAMPLE)
    cores = duckdb_threads()
    watched = _WatchedSlots()
    # chunk_bytes=1: several files per part, told while the others are parsed.
    load, paths, staged = staged_ingest(
        warehouse, SNAPSHOT, sources, tmp_path, slots=watched, chunk_bytes=1
    )
    assert staged
    steps = [limit for urgent, limit in watched.held if not urgent]
    inserts = [limit for urgent, limit in watched.held if urgent]
    assert len(inserts) == len(paths) > len(sources)
    # Each part's COPY (its check inside) and time check, and the first round's samples
    # (a part per core; the other parts are read with their types).
    assert len(steps) >= 2 * len(sources) + min(cores, len(sources))
    assert set(steps) == {cores}
    assert watched.most <= cores
    assert watched.capacity is None  # lifted when normalise ends: later inserts never wait
    assert load.table_rows == 3 * PAST_SAMPLE  # type: ignore[attr-defined]


def test_a_key_check_not_done_when_the_inserts_are_is_stopped(tmp_path: Path) -> None:
    """The check beside the staging tail never makes the load wait: not done when asked, it is
    interrupted and its answer unknown (the load then checks the staged rows itself)."""
    from export_pipeline.core.stage import _KeyCheck

    big = tmp_path / "big.parquet"
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT uuid() AS id FROM range(3000000)) TO '{big}' (FORMAT parquet)")
    dup = tmp_path / "dup.parquet"
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT 'a' AS id FROM range(2)) TO '{dup}' (FORMAT parquet)")
    assert _KeyCheck(SNAPSHOT, [big], "200MB").result() is None
    assert _KeyCheck(SNAPSHOT, [big], "200MB").result(wait=True) is True
    assert _KeyCheck(SNAPSHOT, [dup, dup], "200MB").result(wait=True) is False


def test_staged_rows_stay_invisible_and_are_gone_when_the_load_fails(tmp_path: Path) -> None:
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb", publish_reads=False)
    sources = write_parts(tmp_path / "raw", parts=2, rows=500)
    stager = StagedLoad(warehouse, SNAPSHOT, tmp_path / "stage", memory_limit="200MB")
    with pytest.raises(RuntimeError, match="kill"), stager as staged:
        result = to_parquet(
            sources,
            tmp_path / "parquet",
            kind=SNAPSHOT,
            export_id="e1",
            loaded_at=LOADED_AT,
            on_file=staged.add,
        )
        con = staged.take(result.parquet_paths)
        assert con is not None
        assert con.execute(f"SELECT count(*) FROM {staged.table}").fetchone() == (1_000,)
        # Another connection of the process sees none of it before the COMMIT.
        other = con.cursor()
        assert other.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'shop'"
        ).fetchone() == (0,)
        other.close()
        raise RuntimeError("kill before the load")
    # Rolled back and closed: the write lock is free for the next load.
    with pytest.raises(duckdb.ConnectionException):
        con.execute("SELECT 1")
    assert stage_tables(warehouse) == []
    with warehouse.connect() as con:
        assert con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'shop'"
        ).fetchone() == (0,)


def test_an_empty_export_is_loaded_from_the_declared_schema_not_the_staged_guess(
    tmp_path: Path,
) -> None:
    """``[]`` reads as one column named "json": the file told to the stager is replaced by one
    with the declared columns. The staged guess must not be taken for it (the inode of the
    file told is held until the comparison, so a new file cannot reuse it)."""
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb", publish_reads=False)
    kind = ExportKind(
        provider="shop",
        name="orders",
        primary_key=("id",),
        columns={"id": "VARCHAR", "amount": "BIGINT"},
    )
    for n in range(6):  # an inode freed by one attempt is the likeliest for the next file
        empty = tmp_path / f"raw{n}" / "orders.json"
        empty.parent.mkdir()
        empty.write_text("[]")
        load, _, staged = staged_ingest(warehouse, kind, [empty], tmp_path / f"w{n}")
        assert not staged and not load.renamed
        assert (load.rows_in_export, load.table_rows) == (0, 0)
    with warehouse.connect() as con:
        cols = [r[0] for r in con.execute("DESCRIBE shop.orders").fetchall()]
    assert cols[:2] == ["id", "amount"] and "json" not in cols
    assert stage_tables(warehouse) == []


def test_a_bad_record_after_chunks_were_staged_fails_clearly_and_stages_nothing(
    tmp_path: Path,
) -> None:
    """Chunks told before the parse fails are rolled back with the transaction; the error
    names the file and the line, as without staging."""
    warehouse = DuckDBWarehouse(tmp_path / "wh.duckdb", publish_reads=False)
    source = tmp_path / "raw" / "orders.json"
    source.parent.mkdir()
    rows = [json.dumps({"id": f"o{i}", "amount": i}) for i in range(90_000)]
    source.write_text("[\n" + ",\n".join(rows) + ',\n{"id": "broken", "amount": }\n]\n')
    with pytest.raises(ParseError) as failed:
        staged_ingest(warehouse, SNAPSHOT, [source], tmp_path / "w", chunk_bytes=1)
    assert failed.value.file == "orders.json" and failed.value.line == 90_002
    assert stage_tables(warehouse) == []
    with warehouse.connect() as con:
        assert con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'shop'"
        ).fetchone() == (0,)


def test_staging_takes_a_quarter_of_the_memory_cap() -> None:
    from export_pipeline.core.stage import _fraction

    assert _fraction("400MB", 0.25) == "100000KB"
    assert _fraction("1GB", 0.25) == "250000KB"
    assert _fraction("2GiB", 0.25) == "524288KiB"
    assert _fraction("80%", 0.25) == "80%"  # a form DuckDB reads but we do not: as given


def _slow_sample_and_copies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Delay the type sample (the speculative COPY writes its chunks meanwhile) and record the
    select of every chunked COPY."""
    from export_pipeline.core import normalise

    selects: list[str] = []
    copy, describe = normalise._copy_announcing_chunks, normalise._describe

    def recording_copy(cur: duckdb.DuckDBPyConnection, select: str, *args: object) -> int:
        selects.append(select)
        return copy(cur, select, *args)  # type: ignore[arg-type]

    def slow_describe(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple[str, str]]:
        if "read_json" in sql:
            time.sleep(1.0)
        return describe(con, sql)

    monkeypatch.setattr(normalise, "_copy_announcing_chunks", recording_copy)
    monkeypatch.setattr(normalise, "_describe", slow_describe)
    return selects


def _normalise_telling(
    source: Path, kind: ExportKind, folder: Path
) -> tuple[NormaliseResult, list[int]]:
    """``to_parquet`` in chunks, telling a sink that hard-links each file told (so no inode is
    reused while the test runs) and keeps its inode."""
    (folder / "told").mkdir()
    told: list[int] = []

    def on_file(path: Path) -> None:
        link = folder / "told" / f"{len(told)}.parquet"
        os.link(path, link)
        told.append(link.stat().st_ino)

    result = to_parquet(
        [source],
        folder / "out",
        kind=kind,
        export_id="e",
        loaded_at=LOADED_AT,
        on_file=on_file,
        chunk_bytes=1,
    )
    return result, told


@pytest.mark.parametrize("extra_field", [False, True], ids=["fits", "undeclared-field"])
def test_a_lone_json_array_is_copied_before_its_sample_and_only_a_confirmed_copy_is_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra_field: bool
) -> None:
    """The COPY of a lone JSON array starts before the type sample, with the declared types.
    When the sample agrees, that COPY is the result and its files are told (held until then);
    when the data has a field the declaration lacks, it is thrown away unseen and the sampled
    COPY keeps the field."""
    selects = _slow_sample_and_copies(monkeypatch)
    meta = {"a": 1, "b": "kept"} if extra_field else {"a": 1}
    source = tmp_path / "orders.json"
    source.write_text(
        json.dumps([{"id": i, "at": "2024-01-01T00:00:00Z", "meta": meta} for i in range(60_000)])
    )
    kind = ExportKind(
        provider="shop",
        name="orders",
        primary_key=("id",),
        columns={"id": "BIGINT", "at": "TIMESTAMPTZ", "meta": "STRUCT(a INTEGER)"},
    )
    result, told = _normalise_telling(source, kind, tmp_path)
    assert "REPLACE" in selects[0]  # the speculative select went first
    assert len(selects) == (2 if extra_field else 1)
    assert len(result.parquet_paths) >= 2
    assert told == [p.stat().st_ino for p in result.parquet_paths]  # only the kept COPY's files
    types = dict(result.columns)
    assert types["at"] == "TIMESTAMP WITH TIME ZONE"
    with duckdb.connect() as con:
        rows = con.execute(
            "SELECT count(*), count(DISTINCT id), min(meta.a), max(meta.a) FROM read_parquet(?)",
            [[str(p) for p in result.parquet_paths]],
        ).fetchone()
        assert rows == (60_000, 60_000, 1, 1)
        if extra_field:
            assert types["meta"] == "STRUCT(a INTEGER, b VARCHAR)"
            kept = con.execute(
                "SELECT count(*) FROM read_parquet(?) WHERE meta.b = 'kept'",
                [[str(p) for p in result.parquet_paths]],
            ).fetchone()
            assert kept == (60_000,)
        else:
            assert types["meta"] == "STRUCT(a INTEGER)"


@pytest.mark.parametrize("late", ["fraction", "nested-key"])
def test_a_speculative_copy_is_kept_only_where_its_small_sample_types_as_the_default_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late: str
) -> None:
    """The speculative COPY detects types over fewer records than DuckDB's default sample. A
    value past its sample but inside the default one that types differently (a fraction
    where integers came first; a struct key first seen there) refuses it, and the value
    lands as the default sample types it."""
    from export_pipeline.core import normalise

    selects = _slow_sample_and_copies(monkeypatch)
    first_late = normalise._SPECULATIVE_SAMPLE + 500
    assert first_late < normalise._DEFAULT_SAMPLE

    def record(i: int) -> dict[str, object]:
        meta: dict[str, object] = {"a": 1}
        if late == "nested-key" and i == first_late:
            meta["late"] = "kept"
        return {
            "id": i,
            "amount": 1.5 if late == "fraction" and i == first_late else i,
            "note": "x" * 20,
            "meta": meta,
        }

    source = tmp_path / "orders.json"
    source.write_text(json.dumps([record(i) for i in range(60_000)]))
    kind = ExportKind(provider="shop", name="orders", primary_key=("id",), columns={"id": "BIGINT"})
    result, told = _normalise_telling(source, kind, tmp_path)
    assert "REPLACE" in selects[0]  # the speculative select went first ...
    assert len(selects) == 2  # ... and was refused; the COPY after it reads with the default
    assert "sample_size" not in selects[1]
    assert told == [p.stat().st_ino for p in result.parquet_paths]
    paths = [str(p) for p in result.parquet_paths]
    with duckdb.connect() as con:
        if late == "fraction":
            assert dict(result.columns)["amount"] == "DOUBLE"
            got = con.execute(
                "SELECT amount FROM read_parquet(?) WHERE id = ?", [paths, first_late]
            ).fetchone()
            assert got == (1.5,)
        else:
            assert dict(result.columns)["meta"] == "STRUCT(a BIGINT, late VARCHAR)"
            got = con.execute(
                "SELECT id FROM read_parquet(?) WHERE meta.late = 'kept'", [paths]
            ).fetchall()
            assert got == [(first_late,)]
        assert con.execute("SELECT count(*) FROM read_parquet(?)", [paths]).fetchone() == (60_000,)


def test_a_refused_speculative_copy_is_interrupted_not_run_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refusing the speculative COPY stops it where it is (its reader is interrupted) and its
    files are gone before the sampled COPY writes the same names."""
    from export_pipeline.core import normalise

    outcomes: list[str] = []
    copy = normalise._copy_announcing_chunks

    def recording_copy(cur: duckdb.DuckDBPyConnection, select: str, *args: object) -> int:
        try:
            rows = copy(cur, select, *args)  # type: ignore[arg-type]
        except BaseException as exc:
            outcomes.append(type(exc).__name__)
            raise
        outcomes.append("done")
        return rows

    monkeypatch.setattr(normalise, "_copy_announcing_chunks", recording_copy)
    source = tmp_path / "orders.json"
    rows = 1_500_000  # ~70 MB: the COPY runs well past the sample
    record = '{"id": %d, "meta": {"a": %d, "b": "x"}}'
    source.write_text("[" + ",".join(record % (i, i) for i in range(rows)) + "]")
    kind = ExportKind(
        provider="shop",
        name="orders",
        primary_key=("id",),
        columns={"id": "BIGINT", "meta": "STRUCT(a BIGINT)"},
    )
    result, told = _normalise_telling(source, kind, tmp_path)
    assert outcomes == ["InterruptException", "done"]
    assert told == [p.stat().st_ino for p in result.parquet_paths]
    assert result.rows == rows
    assert dict(result.columns)["meta"] == "STRUCT(a BIGINT, b VARCHAR)"


@pytest.mark.parametrize("stem", ["wh", "main"])
def test_loads_write_row_groups_of_the_warehouse_size(tmp_path: Path, stem: str) -> None:
    """The warehouse writes row groups of ROW_GROUP_SIZE rows (half DuckDB's): staged inserts
    write the full ones to disk beside the parse, leaving less for the COMMIT to compress. A
    file whose stem DuckDB reserves ("main") opens the plain way, with DuckDB's size."""
    warehouse = DuckDBWarehouse(tmp_path / f"{stem}.duckdb", publish_reads=False)
    sources = write_parts(tmp_path / "raw", parts=3, rows=45_000)
    load, _, staged = staged_ingest(warehouse, SNAPSHOT, sources, tmp_path / "w")
    assert staged and load.renamed and load.table_rows == 135_000
    with warehouse.connect() as con:
        groups = con.execute(
            "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('shop.orders')"
        ).fetchone()[0]
        database = con.execute("SELECT current_database()").fetchone()[0]
    # 135,000 rows: 61,440 + 61,440 + 12,120, or DuckDB's 122,880 + 12,120.
    assert groups == -(-135_000 // (ROW_GROUP_SIZE if stem == "wh" else 122_880)), groups
    assert database == {"wh": "wh", "main": "main_db"}[stem]  # as duckdb.connect(path) names it
