"""Downloaded export files (CSV, JSON array, JSON Lines, optionally gzip) to Parquet.

Why DuckDB's native readers: export files can be larger than memory, and a Python loop over
rows is both slow and a memory trap. ``COPY (SELECT ... FROM read_json/read_csv) TO parquet``
streams with bounded memory (spilling to ``out_dir/.tmp``), keeps nested objects as STRUCT/LIST,
and gives one Parquet per source file (a big one in row-ordered chunks) that the load step
reads back with ``read_parquet``.

Every key of every record is read (JSON in one parse with the types of DuckDB's sample when
checks show the sample lost nothing, else type-detected over all records; see
``_sampled_json_to_parquet``); the kind's declared ``columns`` are type hints for the keys they
name, never a filter (docs/schema.md). A CSV's
header decides its columns and nested JSON text in cells is read leniently, so a provider that
offers CSV and JSON yields the same table either way. Errors become :class:`ParseError` naming
the file and the 1-based line.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import gzip
import io
import json
import os
import queue
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import duckdb

from export_pipeline.core import schema
from export_pipeline.core.errors import ParseError
from export_pipeline.core.model import ExportKind, FileFormat
from export_pipeline.core.slots import CpuSlots
from export_pipeline.core.sql import quote_ident, sql_literal

GZIP_MAGIC = b"\x1f\x8b"
_PEEK_BYTES = 8192
_BOM = b"\xef\xbb\xbf"
# Rows DuckDB looks at to guess JSON types: all of them, declared columns or not. The file is
# then read with the guessed columns, and DuckDB drops keys it never saw and rounds values into
# a narrower guessed type, so a partial sample loses data silently. The price is one more pass.
_AUTO_SAMPLE_SIZE = -1
_MAX_RECORD_BYTES = 1 << 20  # how much of a bad JSON record is kept to find its line
# The Parquet writer holds one row group in memory before flushing it. DuckDB's default is
# 122,880 rows whatever their width (~180 MB more peak memory for nested locations, growing
# with the export up to that many rows). DuckDB 1.4 refuses ROW_GROUP_SIZE_BYTES together with
# preserve_insertion_order, so the bound is a row count small enough for wide nested rows.
_ROW_GROUP_ROWS = 20_000
# zstd level 1 instead of DuckDB's default 3: the same file size on exports measured (33 MB per
# 250,000 Mews reservations either way) for 5-8% less time in the COPY.
_PARQUET = (
    f"FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1, ROW_GROUP_SIZE {_ROW_GROUP_ROWS}"
)
# A source at least this big is written as several Parquet files of _CHUNK_ROW_GROUPS row groups
# each (``<stem>-0000.parquet``, ...), handed to ``on_file`` one by one while the rest is still
# being parsed, so the warehouse loads one while DuckDB writes the next (core/stage.py).
CHUNK_BYTES = 32 << 20
_CHUNK_ROW_GROUPS = 1
# Records a COPY's reader detects its types over. DuckDB's type detection costs about 7x per
# record what reading does, so its default 20,480 records are a seventh of the locations COPY
# (200,000 records, one thread: 3.6 s against 3.0-3.1 s). What is trusted is still decided by
# the default sample: a read of these records is kept only where it gives the same types
# (_sampled_steps: the speculative COPY, partial_copy, guarded_reads).
_SPECULATIVE_SAMPLE = 2_048
LINEAGE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("_export_id", "VARCHAR"),
    ("_source_file", "VARCHAR"),
    ("_loaded_at", "TIMESTAMP WITH TIME ZONE"),
)


_T = TypeVar("_T")
# Builds the ParseError for a source from a DuckDB error (optionally with a clearer message).
_Fail = Callable[..., ParseError]
# Told each finished Parquet file of the export, from normalise's threads (see ``to_parquet``).
FileSink = Callable[[Path], None]
# Whether the given source is on disk, complete and verified, waiting for it at most the given
# seconds (it may still be downloading when normalise begins); raises when it never will be
# (see ``to_parquet``).
Arriving = Callable[[Path, float], bool]
# How often a step waiting for its source looks whether the others have stopped.
_LANDING_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class DetectedFormat:
    format: FileFormat
    gzip: bool


@dataclass(frozen=True)
class NormaliseResult:
    parquet_paths: list[Path]
    rows: int
    columns: list[tuple[str, str]]  # (name, DuckDB type) of the output, lineage included
    # Declared columns no file of the export has (reported, never invented as all-NULL).
    missing_columns: list[str] = field(default_factory=list)
    # Declared column -> type it was read as because some value did not fit the declaration.
    drifted_columns: dict[str, str] = field(default_factory=dict)


def _peek(path: Path) -> tuple[bytes, bool]:
    """First few KB of the (decompressed) content and whether the file is gzip."""
    with open(path, "rb") as raw:
        head = raw.read(_PEEK_BYTES)
    if not head.startswith(GZIP_MAGIC):
        return head, False
    with gzip.open(path, "rb") as inner:
        try:
            return inner.read(_PEEK_BYTES), True
        except (OSError, EOFError):  # truncated or corrupt gzip: let the reader report it
            return b"", True


def detect_format(path: Path, content_type: str | None = None) -> DetectedFormat:
    """Guess the format from the content, because providers' file names and types lie.

    ``[`` first -> JSON array; ``{`` first -> JSON Lines; anything else -> CSV. A UTF-8 BOM and
    leading whitespace are skipped; gzip is recognised by its magic bytes and peeked into.
    ``content_type`` only breaks the tie for an empty file.
    """
    return _format_of(*_peek(Path(path)), content_type)


def _format_of(head: bytes, is_gzip: bool, content_type: str | None = None) -> DetectedFormat:
    """:func:`detect_format` of a file whose first bytes (decompressed) are ``head``."""
    if (codec := _text_encoding(head, None)) is not None:
        head = head.decode(codec, errors="ignore").encode()  # UTF-16/32: its characters
    text = head.removeprefix(_BOM).lstrip()
    if text.startswith(b"["):
        return DetectedFormat(FileFormat.JSON_ARRAY, is_gzip)
    if text.startswith(b"{"):
        return DetectedFormat(FileFormat.JSONL, is_gzip)
    if not text and content_type:
        lowered = content_type.lower()
        if "ndjson" in lowered or "jsonl" in lowered or "json-seq" in lowered:
            return DetectedFormat(FileFormat.JSONL, is_gzip)
        if "json" in lowered:
            return DetectedFormat(FileFormat.JSON_ARRAY, is_gzip)
    return DetectedFormat(FileFormat.CSV, is_gzip)


_ORIGINAL_LINE = re.compile(r"Original Line: [^\n]*\n")
_NOT_UTF8 = re.compile(r"not utf-8 encoded|invalid utf-8", re.I)  # DuckDB's CSV / JSON readers

# Byte-order marks of encodings DuckDB's readers cannot read (they read UTF-8): such a file is
# transcoded first (:func:`_as_utf8`). UTF-32's before UTF-16's, which they begin with.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def _text_encoding(head: bytes, declared: str | None) -> str | None:
    """The codec a file whose first bytes are ``head`` is transcoded from, None for UTF-8.

    What the bytes say outranks ``declared`` (the kind's ``encoding``): a byte-order mark
    (UTF-8's included), or, without one, the NUL byte beside every ASCII character that UTF-16
    and UTF-32 have and UTF-8 text never has."""
    if head.startswith(_BOM):
        return None
    for bom, codec in _WIDE_BOMS:
        if head.startswith(bom):
            return codec
    if len(head) >= 4 and head.count(0) * 4 >= len(head):
        if head[0] and not any(head[1:4]):
            return "utf-32-le"
        if head[3] and not any(head[:3]):
            return "utf-32-be"
        if head[0] and head[2] and not head[1] and not head[3]:
            return "utf-16-le"
        if head[1] and head[3] and not head[0] and not head[2]:
            return "utf-16-be"
    if declared is None or codecs.lookup(declared).name in ("utf-8", "utf-8-sig"):
        return None
    return declared


def _is_nested(duck_type: str) -> bool:
    t = duck_type.strip().upper()
    return t.endswith("]") or t.startswith(("STRUCT", "MAP", "LIST", "JSON", "UNION"))


def _struct_literal(columns: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{sql_literal(n)}: {sql_literal(t)}" for n, t in columns.items()) + "}"


def _json_reader(
    path: Path,
    fmt: FileFormat,
    gz: bool,
    columns: Mapping[str, str] | None,
    *,
    sampled: bool = False,
    sample_size: int | None = None,
) -> str:
    """``read_json`` of one file: with the given ``columns``, else auto-detecting over every
    record, or (``sampled``) over DuckDB's default sample of the first records (or over the
    first ``sample_size``)."""
    options = [
        sql_literal(str(path)),
        "format := " + ("'array'" if fmt is FileFormat.JSON_ARRAY else "'newline_delimited'"),
        "compression := " + ("'gzip'" if gz else "'uncompressed'"),
    ]
    if columns is not None:
        options.append(f"columns := {_struct_literal(columns)}")
    elif sample_size is not None:
        options.append(f"sample_size := {sample_size}")
    elif not sampled:
        options.append(f"sample_size := {_AUTO_SAMPLE_SIZE}")
    return f"read_json({', '.join(options)})"


def _json_files(paths: Sequence[Path], fmt: FileFormat, gz: bool) -> str:
    """The files, format and compression arguments of a JSON reader over ``paths``."""
    files = "[" + ", ".join(sql_literal(str(p)) for p in paths) + "]"
    layout = "'array'" if fmt is FileFormat.JSON_ARRAY else "'newline_delimited'"
    return f"{files}, format := {layout}, compression := {'gzip' if gz else 'uncompressed'!r}"


def _json_reader_many(paths: Sequence[Path], fmt: FileFormat, gz: bool) -> str:
    """Auto-detecting reader over several files, unifying their columns by name."""
    return (
        f"read_json({_json_files(paths, fmt, gz)}, union_by_name := true, "
        f"sample_size := {_AUTO_SAMPLE_SIZE})"
    )


def _failing_source(
    con: duckdb.DuckDBPyConnection,
    exc: duckdb.Error,
    group: Sequence[Path],
    fmt: FileFormat,
    detected: Mapping[Path, DetectedFormat],
) -> Path:
    """The file a multi-file DESCRIBE failed on: named in DuckDB's message, else found by
    describing each file alone (only on the error path)."""
    for src in group:
        if str(src) in str(exc):
            return src
    for src in group:
        try:
            _describe(con, f"SELECT * FROM {_json_reader(src, fmt, detected[src].gzip, None)}")
        except duckdb.Error:
            return src
    return group[0]


def _csv_reader(path: Path, gz: bool, *, all_varchar: bool) -> str:
    options = [
        sql_literal(str(path)),
        "header := true",
        # RFC 4180, not sniffed: a sniffer that cannot make a ragged file fit picks another
        # dialect (one column holding whole lines) instead of failing.
        "delim := ','",
        "quote := '\"'",
        "escape := '\"'",
        "compression := " + ("'gzip'" if gz else "'uncompressed'"),
    ]
    if all_varchar:
        options.append("all_varchar := true")
    return f"read_csv({', '.join(options)})"


def _open_text(path: Path, gz: bool) -> io.BufferedReader | gzip.GzipFile:
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _lines(path: Path, gz: bool) -> Iterator[bytes]:
    with _open_text(path, gz) as stream:
        yield from stream


_JSON_LINE = re.compile(r"Malformed JSON in file .*?, at byte (\d+) in line (\d+)", re.S)
_JSON_RECORD = re.compile(r"Malformed JSON in file .*?, at byte (\d+) in record/value (\d+)", re.S)
_ANY_LINE = re.compile(r"(?:in line|on line:?|CSV Error on Line:)\s*(\d+)", re.I)


def _locate_line(message: str, path: Path, fmt: FileFormat, gz: bool) -> int | None:
    """The 1-based line of the fault, from DuckDB's message and, where it is vague, the file.

    DuckDB's "Malformed JSON ... in line N" has been seen to count one past the bad line, so the
    neighbouring lines are checked (one line parsed at a time, never the whole file). For JSON
    arrays DuckDB names a record and a byte within it; the file is scanned to that record.
    """
    if (m := _JSON_LINE.search(message)) and fmt is FileFormat.JSONL:
        reported = int(m.group(2))
        for number, raw in enumerate(_lines(path, gz), start=1):
            if number < reported - 1:
                continue
            if number > reported:
                break
            text = raw.strip().removeprefix(_BOM)
            if not text:
                continue
            try:
                json.loads(text)
            except ValueError:
                return number
        return reported
    if (m := _JSON_RECORD.search(message)) and fmt is FileFormat.JSON_ARRAY:
        return _array_record_line(path, gz, int(m.group(2)), int(m.group(1)))
    if m := _ANY_LINE.search(message):
        return int(m.group(1))
    return None


def _array_record_line(path: Path, gz: bool, record: int, byte: int) -> int | None:
    """Line of ``byte`` inside the top-level array element DuckDB calls ``record``.

    Streams the file with a tiny JSON tokenizer (strings, escapes, depth) and tries both the
    named element and the one before it (DuckDB's count runs one ahead), keeping whichever does
    not parse. Only runs on the error path.
    """
    starts: list[tuple[int, int]] = []  # (offset, line) of element starts
    depth, in_str, esc, line, offset = 0, False, False, 1, 0
    expecting = False
    wanted = {record - 1, record}
    texts: dict[int, bytearray] = {}
    with _open_text(path, gz) as stream:
        while chunk := stream.read(1 << 16):
            for ch in chunk:
                current = texts.get(len(starts))
                if current is not None and depth >= 2 and len(current) < _MAX_RECORD_BYTES:
                    current.append(ch)
                if in_str:
                    if esc:
                        esc = False
                    elif ch == 0x5C:
                        esc = True
                    elif ch == 0x22:
                        in_str = False
                else:
                    if depth == 1 and expecting and ch not in b" \t\r\n,]":
                        starts.append((offset, line))
                        expecting = False
                        if len(starts) in wanted:
                            texts[len(starts)] = bytearray([ch])
                    if ch == 0x22:
                        in_str = True
                    elif ch in b"[{":
                        depth += 1
                        if depth == 1:
                            expecting = True
                    elif ch in b"]}":
                        depth -= 1
                    elif ch == 0x2C and depth == 1:
                        expecting = True
                if ch == 0x0A:
                    line += 1
                offset += 1
                if len(starts) > record and depth <= 1:
                    break
            if len(starts) > record and depth <= 1:
                break
    for candidate in (record - 1, record):
        if candidate < 1 or candidate > len(starts):
            continue
        text = bytes(texts.get(candidate, b""))
        try:
            json.loads(text)
        except ValueError:
            start_line = starts[candidate - 1][1]
            return start_line + text[: max(byte - 1, 0)].count(b"\n")
    return None


def _output_stem(source: Path, taken: set[str]) -> str:
    name = source.name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    stem = Path(name).stem or name
    if stem in taken:
        stem = source.name
    taken.add(stem)
    return stem


def _describe(con: duckdb.DuckDBPyConnection, select_sql: str) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in con.execute(f"DESCRIBE {select_sql}").fetchall()]


def _described(con: duckdb.DuckDBPyConnection, reader: str) -> list[tuple[str, schema.Type]]:
    """The columns and types ``reader`` (a ``read_json``) binds, in order."""
    return [(n, schema.parse(t)) for n, t in _describe(con, f"SELECT * FROM {reader}")]


def _reads_as(
    con: duckdb.DuckDBPyConnection, reader: str, sampled: Mapping[str, schema.Type]
) -> bool:
    """Whether ``reader`` binds exactly the ``sampled`` columns and types, in their order."""
    return _described(con, reader) == list(sampled.items())


def to_parquet(
    sources: Sequence[Path],
    out_dir: Path,
    *,
    kind: ExportKind,
    export_id: str,
    loaded_at: datetime,
    fmt: FileFormat | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    memory_limit: str = "512MB",
    threads: int | None = None,
    on_file: FileSink | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    slots: CpuSlots | None = None,
    arriving: Arriving | None = None,
) -> NormaliseResult:
    """Write one zstd Parquet per source (``out_dir/<stem>.parquet``) with lineage columns.

    A JSON source of at least ``chunk_bytes``, converted on one thread, is written as several
    files instead (``<stem>-0000.parquet``, ... in row order). ``on_file`` is told each Parquet
    file as soon as it is complete, from normalise's threads and before the others are done,
    when the types come from DuckDB's sample (the usual case); a caller loading them early must
    compare what it was told with ``parquet_paths`` at the end (a later check may still send the
    export down the full scan, which rewrites every file).

    ``fmt`` overrides the content sniffing (gzip is always detected from the bytes). Without
    ``kind.columns`` the types are auto-detected once over all sources of the same format, so
    every Parquet of one export has the same schema. A source with no rows yields a 0-row Parquet
    only when ``kind.columns`` gives its schema; otherwise it contributes no path.

    A given ``con`` is used as is (its memory settings are the caller's; its time zone is set
    to UTC, as the conversions need); by default a private
    in-memory connection is opened with ``memory_limit`` and a spill directory in out_dir/.tmp.
    On that private connection, unless ``threads`` is given, JSON array sources are converted
    with one thread: DuckDB reads a JSON array sequentially anyway, and a second thread only
    buffers out-of-order batches for the order-preserving COPY, so peak memory grows with the
    file (200k / 800k locations: 571 / 1045 MB with two threads, 221 / 255 MB with one, at the
    same speed). For the same reason, when the types come from DuckDB's sample (the usual
    case), the parts of a multi-part JSON export are converted side by side, one thread each,
    as many at once as the connection has threads (``_sampled_json_to_parquet``).

    With ``arriving``, the sources are the files of an export still being downloaded, in the
    order they land: each part is parsed as soon as ``arriving`` says it is there, while the
    later ones download (:func:`_while_landing`). Only the first source need be there at the
    call; every source has landed when the result is returned.
    """
    if loaded_at.tzinfo is None:
        raise ValueError("loaded_at must be timezone-aware")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    own = con is None
    tmp_dir = out_dir / ".tmp"
    if con is None:
        tmp_dir.mkdir(exist_ok=True)
        config: dict[str, str | int | bool] = {
            "memory_limit": memory_limit,
            "temp_directory": str(tmp_dir),
            # Off would let DuckDB reorder rows, and the load keeps the *last* duplicate of a key
            # by row position; order-preserving COPY still streams in bounded batches.
            "preserve_insertion_order": True,
        }
        if threads is not None:
            config["threads"] = threads
        con = duckdb.connect(":memory:", config=config)
    # DuckDB reads "...Z" and "+02:00" timestamps as UTC TIMESTAMPs; casting one to a declared
    # TIMESTAMPTZ interprets it in the session's time zone, which defaults to the machine's:
    # on a machine in New York every such value would move by five hours.
    con.execute("SET TimeZone = 'UTC'")
    utf8_dir = out_dir / ".utf8"
    sources = [Path(s) for s in sources]
    tried = False
    try:
        if arriving is not None:
            tried, landed = _while_landing(
                con,
                sources,
                arriving,
                out_dir,
                kind,
                export_id,
                loaded_at,
                fmt,
                own_threads=own and threads is None,
                on_file=on_file,
                chunk_bytes=chunk_bytes,
                slots=slots,
            )
            if landed is not None:
                return _records_are_objects(landed, sources, fmt, kind, export_id)
            for src in sources:  # the usual way, once every part is there
                _wait_for(arriving, src)
        readable = [_as_utf8(s, utf8_dir, fmt, kind, export_id) for s in sources]
        result = _to_parquet(
            con,
            readable,
            out_dir,
            kind,
            export_id,
            loaded_at,
            fmt,
            own_threads=own and threads is None,
            on_file=on_file,
            chunk_bytes=chunk_bytes,
            slots=slots,
            sampled=not tried,
        )
        return _records_are_objects(result, readable, fmt, kind, export_id)
    finally:
        shutil.rmtree(utf8_dir, ignore_errors=True)
        if own:
            con.close()
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _records_are_objects(
    result: NormaliseResult,
    sources: Sequence[Path],
    fmt: FileFormat | None,
    kind: ExportKind,
    export_id: str,
) -> NormaliseResult:
    """``result``, unless DuckDB read JSON records of which some are not objects: it then reads
    every record as one column ``json`` (no key lands as a column, and the load would say the
    primary key is missing). Fails naming the first such record instead. Costs nothing unless
    the result is that one column."""
    own = [(n, t) for n, t in result.columns if (n, t) not in LINEAGE_COLUMNS]
    if own != [("json", "JSON")]:
        return result
    for src in sources:
        info = detect_format(src)
        src_fmt = fmt or info.format
        if src_fmt is FileFormat.CSV:
            continue
        found = _first_non_object(src, src_fmt, info.gzip)
        if found is not None:
            line, where, json_type = found
            raise ParseError(
                # One number per message: a line goes in ``line``.
                f"{where} is {_JSON_KINDS.get(json_type, 'a number')}, not a JSON object like "
                "the other records",
                provider=kind.provider,
                kind=kind.name,
                export_id=export_id,
                file=src.name,
                line=line,
            )
    return result


# What a record is, by DuckDB's json_type (the numeric types: "a number").
_JSON_KINDS = {"ARRAY": "an array", "NULL": "null", "BOOLEAN": "a boolean", "VARCHAR": "a string"}


def _first_non_object(path: Path, fmt: FileFormat, gz: bool) -> tuple[int | None, str, str] | None:
    """(its line, how to name it, its json_type) for the first record that is not an object
    where some are, else None. Error path only; JSON Lines one line at a time (for the line)."""
    if fmt is FileFormat.JSONL:
        first: tuple[int | None, str, str] | None = None
        objects = False
        for number, raw in enumerate(_lines(path, gz), start=1):
            text = raw.strip().removeprefix(_BOM)
            if not text:
                continue
            try:
                value = json.loads(text)
            except ValueError:
                return None  # a malformed line is another error, reported as such
            objects = objects or isinstance(value, dict)
            if first is None and not isinstance(value, dict):
                json_type = {type(None): "NULL", bool: "BOOLEAN", list: "ARRAY", str: "VARCHAR"}
                first = (number, "a record", json_type.get(type(value), "DOUBLE"))
            if objects and first is not None:
                return first
        return None
    with duckdb.connect() as con:
        row = con.execute(
            "SELECT bool_or(t = 'OBJECT'), min(n) FILTER (WHERE t <> 'OBJECT'), "
            "arg_min(t, n) FILTER (WHERE t <> 'OBJECT') FROM (SELECT row_number() OVER () AS n, "
            f"json_type(json) AS t FROM {_objects_reader([path], fmt, gz)})"
        ).fetchone()
    if row and row[0] and row[1] is not None:
        return None, f"record {row[1]} of the array", str(row[2])
    return None


def _wait_for(arriving: Arriving, src: Path, give_up: threading.Event | None = None) -> None:
    """Until ``src`` has landed; :class:`_Refused` once ``give_up`` is set (the other steps
    stopped: a step must not hold its thread for a download that may take minutes)."""
    while not arriving(src, _LANDING_POLL_SECONDS):
        if give_up is not None and give_up.is_set():
            raise _Refused


class _NotAlike(ValueError):
    """A part landed unlike the first (another format or compression, empty, a byte-order
    mark): the export is read the usual way once every part is there."""


def _while_landing(
    con: duckdb.DuckDBPyConnection,
    sources: list[Path],
    arriving: Arriving,
    out_dir: Path,
    kind: ExportKind,
    export_id: str,
    loaded_at: datetime,
    fmt: FileFormat | None,
    *,
    own_threads: bool,
    on_file: FileSink | None,
    chunk_bytes: int,
    slots: CpuSlots | None,
) -> tuple[bool, NormaliseResult | None]:
    """The parts of a multi-part JSON export parsed while the later ones download, as
    :func:`_sampled_json_to_parquet` would parse them once landed: (whether that was tried,
    its result). Not tried, or no result, the caller waits for every part and reads them as
    usual (not tried: the sampled path first).

    The parts of one export are files of one format: the later parts are taken to have the
    first one's until each lands and is checked (:class:`_NotAlike` otherwise). The first
    part's types are predicted for the rest (their guarded reads verify that before a row is
    written), and the parts are copied in the order they land."""
    if len(sources) < 2 or not own_threads:
        return False, None
    first = sources[0]
    _wait_for(arriving, first)
    verdicts: dict[Path, bool] = {}  # each part's head is read once

    def verdict(src: Path, head: bytes, gz: bool) -> bool:
        here = _format_of(head, gz)
        verdicts[src] = (
            DetectedFormat(fmt or here.format, here.gzip) == assumed
            and src.stat().st_size > 0
            and not (assumed.format is FileFormat.JSONL and head.startswith(_BOM))
            and _text_encoding(head, kind.encoding) is None
        )
        return verdicts[src]

    def alike(src: Path, give_up: threading.Event | None = None) -> bool:
        if src not in verdicts:
            _wait_for(arriving, src, give_up)
            verdict(src, *_peek(src))
        return verdicts[src]

    head, gz = _peek(first)
    found = _format_of(head, gz)
    assumed = DetectedFormat(fmt or found.format, found.gzip)
    if not verdict(first, head, gz):
        return False, None
    return True, _sampled_json_to_parquet(
        con,
        sources,
        dict.fromkeys(sources, assumed),
        out_dir,
        kind,
        export_id,
        loaded_at,
        own_threads,
        on_file=on_file,
        chunk_bytes=chunk_bytes,
        slots=slots,
        landing=alike,
    )


def _as_utf8(
    src: Path, scratch: Path, fmt: FileFormat | None, kind: ExportKind, export_id: str
) -> Path:
    """``src``, or a UTF-8 copy of it that DuckDB's readers can read: a file in another
    encoding (UTF-16 or UTF-32, told by its bytes, or the kind's declared ``encoding``)
    transcoded, and JSON Lines without a UTF-8 byte-order mark (DuckDB 1.4's JSON Lines reader
    refuses one; its CSV and JSON array readers skip it).

    The raw file stays as downloaded (its size is verified and resumed against); the copy keeps
    the name, so errors and ``_source_file`` still name the provider's file, and the lines, so
    line numbers stay right. Either is rare, and then costs one streamed copy of that file.
    """
    head, is_gzip = _peek(src)
    codec = _text_encoding(head, kind.encoding)
    if codec is None:
        if not head.startswith(_BOM) or (fmt or detect_format(src).format) is not FileFormat.JSONL:
            return src
        scratch.mkdir(parents=True, exist_ok=True)
        copy = scratch / src.name
        with _open_text(src, is_gzip) as stream, open(copy, "wb") as out:
            stream.read(len(_BOM))
            shutil.copyfileobj(stream, out, 1 << 20)
        return copy
    scratch.mkdir(parents=True, exist_ok=True)
    copy = scratch / src.name
    decoder = codecs.getincrementaldecoder(codec)(errors="strict")
    lines = 0  # newlines written: where a bad byte is
    with _open_text(src, is_gzip) as stream, open(copy, "wb") as out:
        first = True
        while True:
            chunk = stream.read(1 << 20)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                before = exc.object[: exc.start].decode(codec, errors="replace")
                declared = codec == kind.encoding
                raise ParseError(
                    f"cannot read the file as {codec} "
                    f"({'the kind declares it' if declared else 'its bytes say so'}): "
                    f"{exc.reason} (byte {exc.object[exc.start : exc.start + 1]!r})",
                    provider=kind.provider,
                    kind=kind.name,
                    export_id=export_id,
                    file=src.name,
                    line=lines + before.count("\n") + 1,
                    hint="check the kind's `encoding` against the provider's files"
                    if declared
                    else None,
                ) from exc
            if first:
                text = text.removeprefix("\ufeff")  # the byte-order mark is no character
                first = False
            lines += text.count("\n")
            out.write(text.encode())
            if not chunk:
                return copy


def _to_parquet(
    con: duckdb.DuckDBPyConnection,
    sources: list[Path],
    out_dir: Path,
    kind: ExportKind,
    export_id: str,
    loaded_at: datetime,
    fmt: FileFormat | None,
    *,
    own_threads: bool = False,
    on_file: FileSink | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    slots: CpuSlots | None = None,
    sampled: bool = True,
) -> NormaliseResult:
    detected: dict[Path, DetectedFormat] = {}
    for src in sources:
        found = detect_format(src)
        detected[src] = DetectedFormat(fmt or found.format, found.gzip)

    def fail(exc: BaseException, src: Path, message: str | None = None) -> ParseError:
        info = detected[src]
        try:
            line = _locate_line(str(exc), src, info.format, info.gzip)
            if line is None and info.format is FileFormat.CSV and message is None:
                line = _ragged_csv_line(src, info.gzip)
        except (OSError, EOFError):
            line = None
        text = message or str(exc).split("\n\n")[0].strip()
        if _NOT_UTF8.search(text):
            # DuckDB quotes the first line of its buffer as the "Original Line", not the bad one.
            text = _ORIGINAL_LINE.sub("", text)
        # DuckDB's advice names its reader's options (ignore_errors would drop the record).
        text = _DUCKDB_ADVICE.sub("", text)
        # One line number per message: ours (1-based, checked against the file), not DuckDB's.
        text = _DUCKDB_LINE.sub("", text).strip()
        return ParseError(
            f"cannot read {info.format.value} file: {text[:500]}",
            provider=kind.provider,
            kind=kind.name,
            export_id=export_id,
            file=src.name,
            line=line,
            hint="set the kind's `encoding` to the one the provider writes (e.g. 'cp1252')"
            if _NOT_UTF8.search(text)
            else None,
        )

    # (``sampled`` False: that path was tried already, while the parts landed.)
    fast = (
        _sampled_json_to_parquet(
            con,
            sources,
            detected,
            out_dir,
            kind,
            export_id,
            loaded_at,
            own_threads,
            on_file=on_file,
            chunk_bytes=chunk_bytes,
            slots=slots,
        )
        if sampled
        else None
    )
    if fast is not None:
        return fast

    # Every key of every record, whatever the kind declares: the declared columns are type
    # hints, never a filter (docs/schema.md). One schema per format, so the Parquets agree.
    auto_schema: dict[FileFormat, list[tuple[str, str]]] = {}
    # Formats whose records have keys DuckDB cannot read by name: read key by key (_ExactKeys).
    exact: dict[FileFormat, _ExactKeys] = {}
    for group_fmt in {d.format for d in detected.values()}:
        group = [s for s in sources if detected[s].format is group_fmt and s.stat().st_size]
        try:
            auto_schema[group_fmt] = _auto_schema(con, group, group_fmt, detected, fail)
        except _NotByName:
            exact[group_fmt] = _ExactKeys.of(con, group, group_fmt, detected, fail)
            auto_schema[group_fmt] = exact[group_fmt].described()
    hints = {n: schema.parse(t) for n, t in (kind.columns or {}).items()}

    paths: list[Path] = []
    total = 0
    taken: set[str] = set()
    missing: set[str] = set()
    drifted: dict[str, str] = {}
    for src in sources:
        info = detected[src]
        target = out_dir / f"{_output_stem(src, taken)}.parquet"
        partial = target.with_name(target.name + ".part")
        empty = src.stat().st_size == 0 or not auto_schema[info.format]
        if empty:
            if kind.columns is None:
                continue
            plans = (_empty_select(kind.columns)[0], None, {})
        elif info.format is FileFormat.CSV:
            plans = _csv_selects(
                con, src, info.gzip, kind, hints, dict(auto_schema[info.format]), fail, missing
            )
        elif info.format in exact:
            plans = exact[info.format].selects(con, src, info, hints, missing)
        else:
            plans = _json_selects(con, src, info, hints, auto_schema[info.format], missing)
        one_thread = own_threads and info.format is FileFormat.JSON_ARRAY
        rows = 0
        select, on_drift, fallback = plans
        for attempt in range(2):
            try:
                if one_thread:
                    con.execute("SET threads = 1")
                rows = _copy_with_lineage(con, select, partial, export_id, src.name, loaded_at)
                drifted.update(fallback)
                break
            except duckdb.Error as exc:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
                # A value that does not fit its declared type: find the columns that hold such
                # values (one more pass, only now) and read them as the data's own type instead,
                # rather than fail the export over one drifting column.
                if attempt == 0 and on_drift is not None and _is_conversion_error(exc):
                    try:
                        found = on_drift()
                    except duckdb.Error:
                        found = None
                    if found is not None:
                        select, fallback = found
                        continue
                if info.format is FileFormat.CSV and kind.columns is not None:
                    exc = _csv_conversion_error(con, src, info.gzip, kind.columns, exc)
                raise fail(exc, src) from exc
            finally:
                if one_thread:
                    con.execute("RESET threads")
        if rows == 0 and kind.columns is None:
            partial.unlink()
            continue
        if rows == 0 and not empty:
            # No records (an empty array, only a header): the declared schema, not whatever
            # DuckDB makes of nothing (``[]`` reads as one column named "json").
            select, _ = _empty_select(kind.columns)
            con.execute(
                f"COPY (SELECT src.*, CAST($1 AS VARCHAR) AS _export_id, "
                f"CAST($2 AS VARCHAR) AS _source_file, CAST($3 AS TIMESTAMPTZ) AS _loaded_at "
                f"FROM ({select}) AS src) TO {sql_literal(str(partial))} (FORMAT parquet)",
                [export_id, src.name, loaded_at],
            )
        os.replace(partial, target)
        paths.append(target)
        total += rows

    if paths:
        columns = _describe(con, f"SELECT * FROM read_parquet({sql_literal(str(paths[0]))})")
    elif kind.columns is not None:
        columns = [*kind.columns.items(), *LINEAGE_COLUMNS]
    else:
        columns = []
    present = {n for n, _ in columns}
    return NormaliseResult(
        parquet_paths=paths,
        rows=total,
        columns=columns,
        missing_columns=sorted(n for n in missing if n not in present),
        drifted_columns=drifted,
    )


def _copy_with_lineage(
    con: duckdb.DuckDBPyConnection,
    select: str,
    target: Path,
    export_id: str,
    source_name: str,
    loaded_at: datetime,
    *,
    chunks: bool = False,
) -> int:
    """``COPY`` the rows of ``select`` plus the lineage columns to a zstd Parquet; row count.

    With ``chunks``, ``target`` is a directory DuckDB fills with ``chunk-<i>.parquet`` files of
    :data:`_CHUNK_ROW_GROUPS` row groups each (in row order when the COPY has one thread)."""
    options = _PARQUET
    if chunks:
        options += f", ROW_GROUPS_PER_FILE {_CHUNK_ROW_GROUPS}, FILENAME_PATTERN 'chunk-{{i}}'"
    row = con.execute(
        f"COPY (SELECT src.*, CAST($1 AS VARCHAR) AS _export_id, "
        f"CAST($2 AS VARCHAR) AS _source_file, CAST($3 AS TIMESTAMPTZ) AS _loaded_at "
        f"FROM ({select}) AS src) TO {sql_literal(str(target))} ({options})",
        [export_id, source_name, loaded_at],
    ).fetchone()
    return int(row[0]) if row else 0


def _chunk_files(chunk_dir: Path) -> list[Path]:
    """The ``chunk-<i>.parquet`` files DuckDB wrote so far, in row order (by ``i``)."""
    try:
        names = os.listdir(chunk_dir)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := _CHUNK_NAME.fullmatch(n))]
    return [chunk_dir / n for _, n in sorted(found)]


_CHUNK_NAME = re.compile(r"chunk-(\d+)\.parquet")


def _has_footer(path: Path) -> bool:
    """Whether ``path`` ends like a complete Parquet file: its footer length, then ``PAR1``."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < 12:
                return False
            f.seek(size - 8)
            tail = f.read(8)
    except OSError:
        return False
    return tail[4:] == b"PAR1" and int.from_bytes(tail[:4], "little") + 12 <= size


def _copy_announcing_chunks(
    con: duckdb.DuckDBPyConnection,
    select: str,
    chunk_dir: Path,
    export_id: str,
    source_name: str,
    loaded_at: datetime,
    on_file: FileSink | None,
) -> int:
    """:func:`_copy_with_lineage` into chunks, telling ``on_file`` each chunk once DuckDB has
    moved on to the next one (and the chunk's footer is written), the last ones when the COPY
    has ended; none after a failed COPY."""
    ended = threading.Event()
    failed = False
    told = 0

    def tell() -> None:
        nonlocal told
        while True:
            last_round = ended.is_set()
            files = _chunk_files(chunk_dir)
            complete = len(files) if last_round else len(files) - 1
            while told < complete and (last_round or _has_footer(files[told])):
                if failed:
                    return
                if on_file is not None:
                    on_file(files[told])
                told += 1
            if last_round:
                return
            ended.wait(0.02)

    watcher = threading.Thread(target=tell, name="normalise-chunks", daemon=True)
    watcher.start()
    try:
        return _copy_with_lineage(
            con, select, chunk_dir, export_id, source_name, loaded_at, chunks=True
        )
    except BaseException:
        failed = True
        raise
    finally:
        ended.set()
        watcher.join()


def _sampled_json_to_parquet(
    con: duckdb.DuckDBPyConnection,
    sources: list[Path],
    detected: Mapping[Path, DetectedFormat],
    out_dir: Path,
    kind: ExportKind,
    export_id: str,
    loaded_at: datetime,
    own_threads: bool,
    *,
    on_file: FileSink | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    slots: CpuSlots | None = None,
    landing: Callable[[Path, threading.Event], bool] | None = None,
) -> NormaliseResult | None:
    """JSON read in one parse, with types detected from DuckDB's default sample; ``None`` when
    the sample may not speak for the whole file (then the caller detects over every record).

    Detecting types over every record costs more than reading the file (locations, 200,000
    records: 2.3-3.0 s against 1.6-1.8 s), so the file is read with the types of its first
    records, and the read is trusted only when nothing can have been lost:

    - a key the sample did not have, at any depth, fails the read: DuckDB's auto-detecting
      reader refuses unknown keys when it reads every column (and a value that does not fit
      its sampled type as a struct, list, timestamp, date or UUID fails it too);
    - what it converts silently is checked in a cheap pass that reads only those positions as
      JSON text: a fraction, boolean or string where the sample saw integers (1.5 would be
      stored as 2), a boolean or string where it saw floats, a number where it saw booleans,
      anything but a time of day where it saw times (a timestamp would keep only its time),
      and any value where the sample saw only nulls (typed JSON, where the full scan would
      type it).

    Where the time goes (docs/benchmarks.md). With ``own_threads`` (a private connection)
    each step runs on one DuckDB thread, as many steps at once as DuckDB has threads: the
    type samples of the parts, then every part's COPY and every part's check. DuckDB samples
    a file on one thread, ends an order-preserving COPY on one thread and reads a JSON array
    on one thread, so steps with every thread each left a core idle that parallel parts fill;
    a one-thread COPY also keeps its rows in order without buffering batches. Only a lone
    JSON Lines file is read by all threads (its check beside it). One order-preserving
    ``read_json`` over the list of parts instead reads them in parallel and buffers the later
    parts' rows (DuckDB 1.4: 1,000,000 reservations, 781 MB peak and 1.5x the CPU), so each
    part keeps its own read and Parquet.

    A value at a position the sample typed VARCHAR is kept as its JSON text whatever it is
    (the full scan would type a column mixing strings and objects JSON; no value is lost).
    Anything unexpected (a DuckDB error, an empty file, no rows) also falls back, and the full
    path then reports a bad file with its line.

    With ``landing`` (:func:`_while_landing`) only the first source need be on disk: each step
    on a source first waits for it with ``landing``, which says whether it is like the first
    (``detected`` holds the first one's format for all of them until then).
    """
    present = sources if landing is None else sources[:1]
    if any(detected[s].format is FileFormat.CSV or s.stat().st_size == 0 for s in present):
        return None
    hints = {n: schema.parse(t) for n, t in (kind.columns or {}).items()}
    threads = int(con.execute("SELECT current_setting('threads')").fetchone()[0])  # type: ignore[index]
    # One thread per step, steps side by side (see above); a lone JSON Lines file is read by
    # every thread instead.
    per_step = own_threads and (
        len(sources) > 1 or detected[sources[0]].format is FileFormat.JSON_ARRAY
    )
    workers = max(threads, 1) if per_step else (2 if own_threads else 1)
    # Parts side by side fill every core, so the staged load takes turns with their steps
    # (core/slots.py). A lone source leaves a core to share (its COPY is one thread): there
    # the staging runs beside the sample and the check, as an insert waiting behind the
    # check would only move to the end.
    shared = slots if per_step and len(sources) > 1 else None
    if per_step:
        con.execute("SET threads = 1")
    if shared is not None:
        shared.limit(workers)
    steps = functools.partial(
        _sampled_steps,
        con,
        sources,
        detected,
        out_dir,
        hints,
        export_id,
        loaded_at,
        workers,
        # Chunks only where one thread writes the file, so they come in row order.
        chunk_bytes=chunk_bytes if per_step else None,
        on_file=on_file,
        # A lone JSON array: its COPY starts before its sample, on the idle core (below).
        speculate=per_step and len(sources) == 1 and workers >= 2,
        slots=shared,
        # Parts side by side: each part's check is a test inside its COPY's one parse
        # (_guarded_reader). A lone file keeps its check beside its COPY, on the core the
        # COPY leaves (a witness file would also stop DuckDB from reading it in parallel).
        guard=per_step and len(sources) > 1,
        landing=landing,
    )
    try:
        try:
            return steps(predict=True)
        except _Replan as replan:
            # A part's own types changed the export's: every part sampled (none again).
            return steps(known=replan.samples)
    finally:
        if per_step:
            con.execute("RESET threads")
        if shared is not None:
            shared.limit(None)


def _sampled_steps(
    con: duckdb.DuckDBPyConnection,
    sources: list[Path],
    detected: Mapping[Path, DetectedFormat],
    out_dir: Path,
    hints: Mapping[str, schema.Type],
    export_id: str,
    loaded_at: datetime,
    workers: int,
    *,
    chunk_bytes: int | None,
    on_file: FileSink | None,
    speculate: bool = False,
    slots: CpuSlots | None = None,
    guard: bool = False,
    predict: bool = False,
    known: Mapping[Path, Mapping[str, schema.Type]] | None = None,
    landing: Callable[[Path, threading.Event], bool] | None = None,
) -> NormaliseResult | None:
    """The steps of :func:`_sampled_json_to_parquet`, ``workers`` at a time, each on its own
    cursor; the first failure or lossy check stops the others. Each source's Parquet is
    written as ``<target>.part`` (a source of at least ``chunk_bytes``: ``.<stem>.chunks/``),
    told to ``on_file`` when written, and renamed to its final name(s) when every check passed.

    With ``landing`` a source's steps first wait for it (:func:`_while_landing`): the first
    source alone is sampled, its types are predicted for the others, and the parts are copied
    in their order, the order they land in.

    With ``speculate`` (one source, two workers) the COPY does not wait for the type sample:
    it starts at once with the declared types cast over whatever its reader detects in the
    first :data:`_SPECULATIVE_SAMPLE` records (:func:`_speculative_select`) while the sample
    runs beside it, and its files are told to ``on_file`` only once the sample shows that it
    reads the types and writes the columns the sampled select would (and so the same values).
    Otherwise the COPY is interrupted, its files removed, and it starts again with the sampled
    select (which then knows whether the small sample will do), and the sample cost what it
    costs without speculation. The COPY's reader and the sample run at once: the peak memory
    holds both (locations: ~575 MB, docs/architecture.md).

    With ``slots`` (shared with the staged load, core/slots.py) each step holds a slot while it
    runs, so the staging INSERTs take turns with the steps instead of adding a busy thread.

    With ``guard`` a source's COPY reads it through :func:`_guarded_reader` (a witness written
    as ``.<stem>.witness`` beside its Parquet), which fails where the check would find a value
    converted silently; that source then has no check step.

    With ``predict`` (and ``guard``) only the first ``workers`` sources are sampled; when they
    agree, the others are read with those types (:func:`_sampled_parts`), which their guarded
    reads verify before their first row. ``known``: samples taken already (by a run of the
    steps that raised :class:`_Replan`)."""
    known = known or {}
    # Cursors made here: a connection object is not to be shared by threads.
    idle: queue.SimpleQueue[duckdb.DuckDBPyConnection] = queue.SimpleQueue()
    cursors = [con.cursor() for _ in range(workers)]
    for cur in cursors:
        cur.execute("SET TimeZone = 'UTC'")  # a cursor starts with the default settings
        idle.put(cur)

    stopping = threading.Event()

    def on_cursor(step: Callable[[duckdb.DuckDBPyConnection], _T]) -> _T:
        cur = idle.get()
        try:
            with slots.hold() if slots is not None else contextlib.nullcontext():
                if stopping.is_set():  # stopped while it waited for a slot: not begun at all
                    raise _Refused
                return step(cur)
        finally:
            idle.put(cur)

    def own_sample(cur: duckdb.DuckDBPyConnection, src: Path) -> dict[str, schema.Type]:
        if src in known:
            return dict(known[src])
        info = detected[src]
        reader = _json_reader(src, info.format, info.gzip, None, sampled=True)
        return dict(_described(cur, reader))

    def sample(src: Path) -> dict[str, schema.Type]:
        land(src)
        return on_cursor(lambda cur: own_sample(cur, src))

    def on_source(
        src: Path, step: Callable[[Path], Callable[[duckdb.DuckDBPyConnection], _T]]
    ) -> _T:
        """``step(partial)`` run on a cursor once ``src`` has landed (``partial``: where its
        Parquet goes, which depends on the file's size)."""
        return on_cursor(step(land(src)))

    def copy_job(
        src: Path, select: str, partial: Path, sink: FileSink | None
    ) -> Callable[[duckdb.DuckDBPyConnection], int]:
        if src in chunked:
            return lambda cur: _copy_announcing_chunks(
                cur, select, partial, export_id, src.name, loaded_at, sink
            )

        def copy(cur: duckdb.DuckDBPyConnection) -> int:
            rows = _copy_with_lineage(cur, select, partial, export_id, src.name, loaded_at)
            if sink is not None:
                sink(partial)
            return rows

        return copy

    def partial_copy(
        src: Path,
        own: Mapping[str, schema.Type],
        typed: Mapping[str, str],
        partial: Path,
    ) -> Callable[[duckdb.DuckDBPyConnection], int]:
        exprs = []
        tz: dict[str, schema.Type] = {}
        for name, t in typed.items():
            col = quote_ident(name)
            wanted = schema.parse(t)
            if name not in own:
                exprs.append(f"CAST(NULL AS {t}) AS {col}")
            elif schema.render(own[name]) == t:
                exprs.append(col)
            elif _has_tz(wanted) and _tz_read_as_timestamp(own[name], wanted):
                # Timestamps to instants without ICU, one level up (_converting_tz).
                exprs.append(f"CAST({col} AS {schema.render(_without_tz(wanted))}) AS {col}")
                tz[name] = wanted
            else:
                # By name, so a struct gains the fields it lacks (as NULL).
                exprs.append(f"CAST({col} AS {t}) AS {col}")
        info = detected[src]
        small = _json_reader(src, info.format, info.gzip, None, sample_size=_SPECULATIVE_SAMPLE)
        default = _json_reader(src, info.format, info.gzip, None, sampled=True)
        first, second = [
            copy_job(
                src, _converting_tz(f"SELECT {', '.join(exprs)} FROM {r}", tz), partial, on_file
            )
            for r in guarded.get(src) or (small, default)
        ]

        def run(cur: duckdb.DuckDBPyConnection) -> int:
            if src not in guarded:
                # The smaller sample's read only where it reads the sampled types.
                fits = small_fits[src] if src in small_fits else _reads_as(cur, small, own)
                return (first if fits else second)(cur)
            try:
                return first(cur)
            except duckdb.Error as exc:
                if _OTHER_ROW_TYPE not in str(exc):
                    raise
            # Its smaller sample typed it otherwise (found before the first row): the default.
            _remove(partial)
            return second(cur)

        return run

    def predicted_copy(
        src: Path, typed: Mapping[str, str], partial: Path
    ) -> Callable[[duckdb.DuckDBPyConnection], int]:
        """The COPY of a part read with the types predicted for it: should its read bind other
        types (its own sample differs), the part is sampled and copied with its own types, or,
        when that changes the export's types, the steps start again (:class:`_Replan`)."""

        def run(cur: duckdb.DuckDBPyConnection) -> int:
            predicted_types = per_file[src]
            try:
                return partial_copy(src, predicted_types, typed, partial)(cur)
            except duckdb.Error as exc:
                # Bound other types, or met a value the predicted types did not foresee (a
                # fraction where the first parts had only integers): its own sample tells
                # whether the prediction or the sample is wrong.
                if not any(m in str(exc) for m in (_OTHER_ROW_TYPE, _UNFORESEEN_MESSAGE)):
                    raise
                _remove(partial)
                own = own_sample(cur, src)
                if own == predicted_types:
                    raise  # the part's own sample would not have foreseen it either
            per_file[src] = own
            reads = guarded_reads(src, own)
            if reads is None or _typed_union(list(per_file.values()), hints) != typed:
                raise _Replan({s: per_file[s] for s in sources if s not in predicted or s == src})
            guarded[src] = reads
            return partial_copy(src, per_file[src], typed, partial)(cur)

        return run

    def speculative(src: Path, partial: Path, reader: str) -> tuple[Future[int], _Gate]:
        """The COPY started before the sample, its files held by the returned gate."""
        gate = _Gate(on_file)
        job = copy_job(src, _speculative_select(reader, hints), partial, gate)

        def run(cur: duckdb.DuckDBPyConnection) -> int:
            gate.cursor = cur
            if gate.refused:  # refused before it began: nothing to interrupt
                raise _Refused
            return job(cur)

        return pool.submit(on_cursor, run), gate

    def retract(spec: Future[int], gate: _Gate, partial: Path) -> None:
        """Stop a refused speculative COPY and remove what it wrote."""
        gate.refuse()
        while not spec.done():
            if gate.cursor is not None:
                with contextlib.suppress(duckdb.Error):
                    gate.cursor.interrupt()
            with contextlib.suppress(BaseException):
                spec.result(timeout=0.05)
        _remove(partial)

    def partial_check(
        src: Path, own: Mapping[str, schema.Type]
    ) -> Callable[[duckdb.DuckDBPyConnection], bool]:
        info = detected[src]
        return lambda cur: _silently_converted(cur, [src], info.format, info.gzip, own)

    def check_job(
        src: Path, own: Mapping[str, schema.Type], partial: Path
    ) -> Callable[[duckdb.DuckDBPyConnection], bool]:
        return partial_check(src, own)  # reads the source, not its Parquet

    def guarded_reads(src: Path, own: Mapping[str, schema.Type]) -> tuple[str, str] | None:
        """The guarded read of ``src`` detecting its types over :data:`_SPECULATIVE_SAMPLE`
        records, then over DuckDB's default sample (for when the first binds other types)."""
        samples = (_SPECULATIVE_SAMPLE, _DEFAULT_SAMPLE)
        reads = _guarded_reader(src, detected[src], own, witness_of[src], samples)
        return None if reads is None else (f"({reads[0]})", f"({reads[1]})")

    def mangled(src: Path, partial: Path) -> Callable[[duckdb.DuckDBPyConnection], bool]:
        written = _chunk_files(partial) if src in chunked else [partial]
        return lambda cur: _mangled_times(cur, written, src, detected[src], per_file[src])

    def land(src: Path) -> Path:
        """Where ``src``'s Parquet is written, once ``src`` is on disk (waited for with
        ``landing``, :class:`_NotAlike` when it is unlike the first)."""
        with lock:
            if src in partial_of:
                return partial_of[src]
        if landing is not None and not landing(src, stopping):
            raise _NotAlike(f"{src.name} is not like the export's first file")
        with lock:
            if chunk_bytes is not None and src.stat().st_size >= chunk_bytes:
                chunked.add(src)
            stem = stem_of[src]
            partial_of[src] = out_dir / (
                f".{stem}.chunks" if src in chunked else f"{stem}.parquet.part"
            )
            return partial_of[src]

    taken: set[str] = set()
    stems = [_output_stem(src, taken) for src in sources]
    stem_of = dict(zip(sources, stems, strict=True))
    lock = threading.Lock()
    chunked: set[Path] = set()
    partial_of: dict[Path, Path] = {}
    if landing is None:
        for src in sources:  # all on disk already
            land(src)
    witness_of = {
        s: out_dir / f".{stem}.witness" for s, stem in zip(sources, stems, strict=True) if guard
    }
    # The guarded reads of each source that has them (subqueries: :func:`guarded_reads`), built
    # once its sample is known.
    guarded: dict[Path, tuple[str, str]] = {}
    # Whether a source's first _SPECULATIVE_SAMPLE records give its sampled types, where known.
    small_fits: dict[Path, bool] = {}
    # Sources read with the types of the first round of samples, not their own (none unless
    # ``predict``); their guarded reads fail at once where their own samples differ.
    predicted: set[Path] = set()
    steps: list[Future[int] | Future[bool]] = []
    rows: list[int] | None = None
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="normalise") as pool:
            try:
                copies: list[Future[int]] = []
                if speculate:
                    info = detected[sources[0]]
                    reader = _json_reader(
                        sources[0], info.format, info.gzip, None, sample_size=_SPECULATIVE_SAMPLE
                    )
                    spec, gate = speculative(sources[0], partial_of[sources[0]], reader)
                    steps = [spec]
                    # The types the speculative COPY reads with: those of its smaller sample.
                    read_as = on_cursor(lambda cur: _described(cur, reader))
                    per_file = {sources[0]: sample(sources[0])}
                    typed = _typed_union(per_file.values(), hints)
                    small_fits[sources[0]] = read_as == list(per_file[sources[0]].items())
                    if (
                        typed is not None
                        and small_fits[sources[0]]
                        and _as_speculated(per_file[sources[0]], hints) == typed
                    ):
                        gate.admit()
                        copies = [spec]
                    else:
                        retract(spec, gate, partial_of[sources[0]])
                        steps = []
                else:
                    ahead = (1 if landing is not None else workers) if predict and guard else None
                    per_file, predicted = _sampled_parts(sources, sample, pool, ahead)
                    typed = _typed_union(per_file.values(), hints)
                if typed is not None:
                    for src in witness_of:  # none: no guard
                        if reads := guarded_reads(src, per_file[src]):
                            guarded[src] = reads
                    if any(src not in guarded for src in predicted):
                        # A prediction only a guarded read can verify: sample every part.
                        raise _Replan({s: per_file[s] for s in sources if s not in predicted})
                    if not copies:
                        # Predicted parts first, one whose own types differ shows it at once;
                        # while they land, in their order.
                        submitted = {
                            src: pool.submit(
                                on_source,
                                src,
                                functools.partial(predicted_copy, src, typed)
                                if src in predicted
                                else functools.partial(partial_copy, src, per_file[src], typed),
                            )
                            for src in (
                                sources
                                if landing is not None
                                else sorted(sources, key=lambda src: src not in predicted)
                            )
                        }
                        copies = [submitted[src] for src in sources]
                    checks = [
                        pool.submit(
                            on_source, src, functools.partial(check_job, src, per_file[src])
                        )
                        for src in sources
                        if src not in guarded
                    ]
                    steps = [*copies, *checks]
                    # A failed step or a value the sample would have converted stops the rest.
                    if not any(done.result() and done in checks for done in as_completed(steps)):
                        rows = [copy.result() for copy in copies]
                        if any(on_cursor(mangled(src, partial_of[src])) for src in sources):
                            rows = None
            except (duckdb.Error, ValueError):
                rows = None
            finally:
                if rows is None:
                    stopping.set()
                    for step in steps:
                        step.cancel()
                    for cur in cursors:
                        with contextlib.suppress(duckdb.Error):
                            cur.interrupt()
    finally:
        for cur in cursors:
            cur.close()
        for witness in witness_of.values():
            with contextlib.suppress(FileNotFoundError):
                witness.unlink()
        if rows is None or not all(rows):
            for partial in partial_of.values():  # only sources that landed have one
                _remove(partial)
    if rows is None or not all(rows):
        return None
    targets: list[Path] = []
    for src, stem in zip(sources, stems, strict=True):
        partial = partial_of[src]
        if src not in chunked:
            targets.append(out_dir / f"{stem}.parquet")
            os.replace(partial, targets[-1])
            continue
        for number, chunk in enumerate(_chunk_files(partial)):
            targets.append(out_dir / f"{stem}-{number:04d}.parquet")
            os.replace(chunk, targets[-1])
        shutil.rmtree(partial, ignore_errors=True)  # the chunks moved out: an empty folder
    columns = _describe(con, f"SELECT * FROM read_parquet({sql_literal(str(targets[0]))})")
    present = {n for n, _ in columns}
    return NormaliseResult(
        parquet_paths=targets,
        rows=sum(rows),
        columns=columns,
        missing_columns=sorted(n for n in hints if n not in present),
    )


def _utc_instant(col: str) -> str:
    """A TIMESTAMP column (DuckDB reads "...Z" and "+02:00" as UTC) as the TIMESTAMPTZ of the
    same instant, whatever the session's time zone: exact, and 5-10 times cheaper than the
    ICU cast (Mews: 0.2 s of a 1.9 s part for its four timestamps). ``make_timestamptz`` gives
    NULL for an infinity; DuckDB 1.4's sampled reader never yields one (see _SPECIAL_TIMES), and
    the cast keeps it should a later reader do so."""
    return f"coalesce(make_timestamptz(epoch_us({col})), CAST({col} AS {_TIMESTAMPTZ}))"


def _has_tz(t: schema.Type) -> bool:
    if isinstance(t, schema.Struct):
        return any(_has_tz(f) for _, f in t.fields)
    if isinstance(t, schema.List):
        return _has_tz(t.element)
    return t.text == _TIMESTAMPTZ


def _without_tz(t: schema.Type) -> schema.Type:
    """``t`` with every TIMESTAMPTZ leaf a TIMESTAMP: what the reader's values are cast to
    first, without ICU (:func:`_tz_from_utc` then makes the leaves instants)."""
    return schema.map_scalars(
        t, lambda s: schema.Scalar("TIMESTAMP") if s.text == _TIMESTAMPTZ else s
    )


def _tz_from_utc(expr: str, t: schema.Type) -> str:
    """``expr``, of type ``_without_tz(t)``, as type ``t``: each TIMESTAMP leaf declared
    TIMESTAMPTZ becomes the same UTC instant with :func:`_utc_instant`, through structs and
    lists (:func:`_rebuilt`). The ICU cast of a struct or list does the same leaf by leaf at
    several times the cost (locations: the COPY took 2.56-3.11 s with it, 2.30 s without any
    conversion)."""
    rebuilt = _rebuilt(
        expr, t, lambda leaf, s: _utc_instant(leaf) if s.text == _TIMESTAMPTZ else None
    )
    return expr if rebuilt is None else rebuilt


def _tz_read_as_timestamp(own: schema.Type | None, declared: schema.Type) -> bool:
    """Whether every TIMESTAMPTZ leaf of ``declared`` was sampled as a TIMESTAMP (or is not
    there, or only null, so the cast gives NULL): then casting to ``_without_tz(declared)`` and
    :func:`_tz_from_utc` give what ``CAST(col AS declared)`` gives."""
    if own is None or not _has_tz(declared):
        return True
    if isinstance(declared, schema.Struct):
        return isinstance(own, schema.Struct) and all(
            _tz_read_as_timestamp(own.get(name), f) for name, f in declared.fields
        )
    if isinstance(declared, schema.List):
        return isinstance(own, schema.List) and _tz_read_as_timestamp(own.element, declared.element)
    # JSON: null throughout the sample (and the file, or the check sends it down the full scan).
    return isinstance(own, schema.Scalar) and own.text in ("TIMESTAMP", "JSON")


def _converting_tz(select: str, tz: Mapping[str, schema.Type]) -> str:
    """``select`` with each column of ``tz`` (there of its ``_without_tz`` type) turned into
    its declared type by :func:`_tz_from_utc`, one level up so the inner cast runs once."""
    if not tz:
        return select
    outer = ", ".join(
        f"{_tz_from_utc(quote_ident(n), t)} AS {quote_ident(n)}" for n, t in tz.items()
    )
    return f"SELECT * REPLACE ({outer}) FROM ({select})"


class _Replan(Exception):
    """The types predicted for some parts were not theirs and change the export's: the steps
    start again with every part sampled (``samples``: the ones taken already)."""

    def __init__(self, samples: Mapping[Path, Mapping[str, schema.Type]]) -> None:
        super().__init__("the parts' types differ from the prediction")
        self.samples = samples


def _sampled_parts(
    sources: Sequence[Path],
    sample: Callable[[Path], dict[str, schema.Type]],
    pool: ThreadPoolExecutor,
    ahead: int | None,
) -> tuple[dict[Path, dict[str, schema.Type]], set[Path]]:
    """Each source's sampled types, and the sources whose types are predicted, not sampled.

    With ``ahead``, that many sources (a round: one per worker) are sampled first; when those
    agree, the export's parts look alike (the parts of one snapshot), and the other sources
    are given the same types instead of a sample of their own each (0.3-0.4 CPU-s per part of
    Mews reservations, as much as the whole parse of those records)."""
    first_round = list(sources[:ahead] if ahead else sources)
    per_file = dict(zip(first_round, pool.map(sample, first_round), strict=True))
    rest = [s for s in sources if s not in per_file]
    first = per_file[first_round[0]]
    if all(types == first for types in per_file.values()):
        return {**per_file, **{s: dict(first) for s in rest}}, set(rest)
    per_file.update(zip(rest, pool.map(sample, rest), strict=True))
    return per_file, set()


def _remove(partial: Path) -> None:
    """A Parquet a step wrote (a file, or a directory of chunks), if there."""
    if partial.is_dir():
        shutil.rmtree(partial, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()


class _Refused(Exception):
    """A step not to begin: a speculative COPY refused, or any step once the others stop."""


class _Gate:
    """Holds the files a speculative COPY reports until :meth:`admit` passes them (and the
    later ones) on, in order, to ``sink``; after :meth:`refuse` they are dropped."""

    def __init__(self, sink: FileSink | None) -> None:
        self._sink = sink
        self._lock = threading.Lock()
        self._held: list[Path] = []
        self._admitted = False
        self.refused = False
        self.cursor: duckdb.DuckDBPyConnection | None = None

    def __call__(self, path: Path) -> None:
        with self._lock:
            if self.refused:
                return
            if not self._admitted:
                self._held.append(path)
            elif self._sink is not None:
                self._sink(path)

    def admit(self) -> None:
        with self._lock:
            self._admitted = True
            held, self._held = self._held, []
            for path in held:
                if self._sink is not None:
                    self._sink(path)

    def refuse(self) -> None:
        with self._lock:
            self.refused = True
            self._held = []


def _speculative_select(reader: str, hints: Mapping[str, schema.Type]) -> str:
    """Every column the reader detects, the declared ones cast to their declared types: what
    the sampled select is whenever the data fits its declaration (:func:`_as_speculated`)."""
    if not hints:
        return f"SELECT * FROM {reader}"
    casts = ", ".join(
        f"CAST({quote_ident(n)} AS {schema.render(_without_tz(t))}) AS {quote_ident(n)}"
        for n, t in hints.items()
    )
    tz = {n: t for n, t in hints.items() if _has_tz(t)}
    return _converting_tz(f"SELECT * REPLACE ({casts}) FROM {reader}", tz)


def _as_speculated(
    sampled: Mapping[str, schema.Type], hints: Mapping[str, schema.Type]
) -> dict[str, str] | None:
    """The columns :func:`_speculative_select` gives over a file with these sampled types;
    None when it cannot bind (a declared column the file lacks) or when a declared
    TIMESTAMPTZ was not sampled as a TIMESTAMP (its conversion assumes one)."""
    if any(n not in sampled or not _tz_read_as_timestamp(sampled[n], t) for n, t in hints.items()):
        return None
    return {n: schema.render(hints.get(n, t)) for n, t in sampled.items()}


def _typed_union(
    sampled: Iterable[Mapping[str, schema.Type]], hints: Mapping[str, schema.Type]
) -> dict[str, str] | None:
    """The parts' sampled types together, declared types applied: what every Parquet of the
    export is written as. None when a MAP or UNION makes the sample untrustworthy."""
    union: dict[str, schema.Type] = {}
    for types in sampled:
        for name, t in types.items():
            if _has_opaque(t):
                return None
            t = _json_as_null(t)
            union[name] = t if name not in union else _union_sampled(union[name], t)
    typed: dict[str, str] = {}
    for name, t in union.items():
        hint = hints.get(name)
        # A position null in every file takes its declared type (the check makes sure the
        # files hold no value there), else DuckDB's own JSON.
        found = _null_as_json(t if hint is None else schema.apply_hint(hint, t))
        typed[name] = schema.render(schema.no_null(found))
    return typed


def _json_as_null(t: schema.Type) -> schema.Type:
    """A sampled type with its JSON positions as NULL: DuckDB types a key JSON when the sample
    holds only nulls there (the check makes sure the whole file does), so across the files of
    one export such a position takes the type another file found, as the scan over every
    record would."""
    return schema.map_scalars(t, lambda s: schema.Scalar("NULL") if s.text == "JSON" else s)


def _null_as_json(t: schema.Type) -> schema.Type:
    """Positions null in every file back to JSON, DuckDB's own type for them."""
    return schema.map_scalars(
        t, lambda s: schema.Scalar("JSON") if s.text in ("NULL", '"NULL"') else s
    )


def _union_sampled(a: schema.Type, b: schema.Type) -> schema.Type:
    """Two files' sampled types together: a NULL position yields to the other file's type,
    struct fields are merged by name, anything else widens (``schema.widen``)."""
    if isinstance(a, schema.Scalar) and a.text in ("NULL", '"NULL"'):
        return b
    if isinstance(b, schema.Scalar) and b.text in ("NULL", '"NULL"'):
        return a
    if isinstance(a, schema.Struct) and isinstance(b, schema.Struct):
        fields = [
            (n, fa if (fb := b.get(n)) is None else _union_sampled(fa, fb)) for n, fa in a.fields
        ]
        fields += [(n, fb) for n, fb in b.fields if a.get(n) is None]
        return schema.Struct(tuple(fields))
    if isinstance(a, schema.List) and isinstance(b, schema.List):
        return schema.List(_union_sampled(a.element, b.element))
    return schema.widen(a, b)


def _has_opaque(t: schema.Type) -> bool:
    """A MAP or UNION somewhere in ``t``: types whose silent conversions are not checked."""
    if isinstance(t, schema.Struct):
        return any(_has_opaque(f) for _, f in t.fields)
    if isinstance(t, schema.List):
        return _has_opaque(t.element)
    return t.text.startswith(("MAP", "UNION"))


_TIMESTAMPTZ = "TIMESTAMP WITH TIME ZONE"
_DUCKDB_ADVICE = re.compile(r"\n\s*Try (?:setting|increasing) .*", re.S)
_INTEGER_TYPES = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT"}
    | {"UINTEGER", "UBIGINT", "UHUGEINT"}
)
_FLOAT_TYPES = frozenset({"FLOAT", "DOUBLE"})
# A timestamp string read into a sampled TIME keeps only its time of day.
_TIME_TYPES = frozenset({"TIME", "TIME WITH TIME ZONE"})
# DuckDB 1.4's sampled JSON reader turns these strings, in any case, into 1900-01-01 at a
# TIMESTAMP or DATE position (its detection accepts them, its format parser does not); read
# with declared types (the full scan) they are infinity, -infinity and 1970-01-01.
_DATE_TYPES = frozenset({"TIMESTAMP", _TIMESTAMPTZ, "DATE"})
_SPECIAL_TIMES = ("infinity", "-infinity", "epoch")


def _time_leaves(t: schema.Type, path: str) -> Iterator[str]:
    """The Parquet ``path_in_schema`` of each TIMESTAMP or DATE value inside a column."""
    if isinstance(t, schema.Struct):
        for name, field_type in t.fields:
            yield from _time_leaves(field_type, f"{path}, {name}")
    elif isinstance(t, schema.List):
        yield from _time_leaves(t.element, f"{path}, list, element")
    elif t.text in _DATE_TYPES:
        yield path


def _mangled_times(
    con: duckdb.DuckDBPyConnection,
    written: Sequence[Path],
    src: Path,
    info: DetectedFormat,
    sampled: Mapping[str, schema.Type],
) -> bool:
    """Whether the sampled read of ``src`` turned a special timestamp string into 1900-01-01
    (see _SPECIAL_TIMES). Only when the Parquet statistics of ``written`` show a TIMESTAMP or
    DATE on or before that day are the positions read again as JSON text to tell; otherwise
    it costs one look at the files' footers."""
    leaves = [leaf for name, t in sampled.items() for leaf in _time_leaves(t, name)]
    if not leaves:
        return False
    row = con.execute(
        "SELECT count(*) FROM parquet_metadata(?) WHERE list_contains(?, path_in_schema) "
        "AND coalesce(left(stats_min, 10) <= '1900-01-01', "
        "stats_null_count IS DISTINCT FROM num_values)",
        [[str(p) for p in written], leaves],
    ).fetchone()
    if not row or not row[0]:
        return False
    return _silently_converted(con, [src], info.format, info.gzip, sampled, times=True)


def _risky(t: schema.Type, *, times: bool = False) -> schema.Type | None:
    """The part of a sampled type whose values DuckDB converts without an error (every
    scalar there read as JSON text to check it), or None when there is none; with ``times``,
    its TIMESTAMP and DATE positions instead (:func:`_mangled_times`)."""
    if isinstance(t, schema.Struct):
        fields = tuple((n, r) for n, f in t.fields if (r := _risky(f, times=times)) is not None)
        return schema.Struct(fields) if fields else None
    if isinstance(t, schema.List):
        element = _risky(t.element, times=times)
        return None if element is None else schema.List(element)
    if times:
        checked = _DATE_TYPES
    else:
        checked = (
            _INTEGER_TYPES | _FLOAT_TYPES | _TIME_TYPES | {"BOOLEAN", "JSON", "NULL", '"NULL"'}
        )
    if t.text in checked:
        return schema.Scalar("JSON")
    return None


def _bad_values(
    expr: str, sampled: schema.Type, depth: int = 0, *, times: bool = False
) -> str | None:
    """A boolean SQL expression: does ``expr`` (read with :func:`_risky`'s type) hold a value
    its sampled type would have converted silently? None when nothing there is at risk."""
    if isinstance(sampled, schema.Struct):
        parts = [
            bad
            for name, field_type in sampled.fields
            if (
                bad := _bad_values(
                    f"struct_extract({expr}, {sql_literal(name)})", field_type, depth, times=times
                )
            )
        ]
        return " OR ".join(f"coalesce({p}, false)" for p in parts) if parts else None
    if isinstance(sampled, schema.List):
        var = f"x{depth}"
        inner = _bad_values(var, sampled.element, depth + 1, times=times)
        if inner is None:
            return None
        return f"coalesce(len(list_filter({expr}, lambda {var}: {inner})) > 0, false)"
    text = sampled.text
    if times:
        if text not in _DATE_TYPES:
            return None
        specials = ", ".join(sql_literal(f'"{word}"') for word in _SPECIAL_TIMES)
        return f"lower(CAST({expr} AS VARCHAR)) IN ({specials})"
    if text in _INTEGER_TYPES:
        return f"NOT regexp_full_match(CAST({expr} AS VARCHAR), '-?[0-9]+')"
    if text in _FLOAT_TYPES:
        # a string or boolean, or an integer the float would round (_exact_numbers)
        value = f"CAST({expr} AS VARCHAR)"
        return f"(left({value}, 1) IN ('\"', 't', 'f') OR {_long_integer(value)})"
    if text in _TIME_TYPES:
        return (
            f"NOT regexp_full_match(CAST({expr} AS VARCHAR), "
            "'\"[0-9]{1,2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]+)?)?\"')"
        )
    if text == "BOOLEAN":
        return f"CAST({expr} AS VARCHAR) NOT IN ('true', 'false')"
    if text in ("JSON", "NULL", '"NULL"'):
        return f"{expr} IS NOT NULL"
    return None


def _silently_converted(
    con: duckdb.DuckDBPyConnection,
    files: Sequence[Path],
    fmt: FileFormat,
    gz: bool,
    sampled: Mapping[str, schema.Type],
    *,
    times: bool = False,
) -> bool:
    """Whether some value of ``files`` does not have the kind its sampled type expects (with
    ``times``: is a special timestamp string); one pass reading only those positions."""
    columns: dict[str, str] = {}
    checks: list[str] = []
    for name, t in sampled.items():
        risky = _risky(t, times=times)
        bad = _bad_values(quote_ident(name), t, times=times) if risky is not None else None
        if risky is None or bad is None:
            continue
        columns[name] = schema.render(risky)
        checks.append(f"coalesce({bad}, false)")
    if not checks:
        return False
    paths = "[" + ", ".join(sql_literal(str(p)) for p in files) + "]"
    reader = (
        f"read_json({paths}, "
        + "format := "
        + ("'array'" if fmt is FileFormat.JSON_ARRAY else "'newline_delimited'")
        + f", compression := {'gzip' if gz else 'uncompressed'!r}, "
        f"columns := {_struct_literal(columns)})"
    )
    row = con.execute(
        f"SELECT count(*) FILTER (WHERE {' OR '.join(checks)}) FROM {reader}"
    ).fetchone()
    return bool(row and row[0])


# The two witness records put before a part (see _guarded_reader): an object, then a number, at
# a position make DuckDB's type detection give it JSON, whatever the sample holds there.
_WITNESS_VALUES = ({"_": 0}, 0)
# The column of ``read_json(..., filename := ...)`` that tells the witness records apart.
_WITNESS_COLUMN = "_export_pipeline_witness_file"
# The guarded read's table alias: its row, whose type is checked when the query is planned.
_WITNESS_ROW = "_witnessed_row"
_VARCHAR = schema.Scalar("VARCHAR")
_JSON = schema.Scalar("JSON")
# DuckDB's default type sample, in records (read_json's ``sample_size``).
_DEFAULT_SAMPLE = 20_480


def _witness(t: schema.Type) -> tuple[object, object] | None:
    """The value of each witness record for a sampled type: at every position :func:`_risky`
    names, one record holds an object and the other a number; None when nothing is at risk.
    A struct lists every field, in order (null where nothing is at risk): DuckDB orders a
    struct's fields as its sample first shows them."""
    if isinstance(t, schema.Struct):
        fields = [(name, _witness(f)) for name, f in t.fields]
        if all(w is None for _, w in fields):
            return None
        first, second = ({n: None if w is None else w[i] for n, w in fields} for i in range(2))
        return first, second
    if isinstance(t, schema.List):
        element = _witness(t.element)
        return None if element is None else ([*element], [*element])
    return _WITNESS_VALUES if _risky(t) is not None else None


def _witnessed(t: schema.Type) -> schema.Type:
    """``t`` as the witnessed read types it: each position :func:`_risky` names is JSON."""
    return schema.map_scalars(t, lambda s: _JSON if _risky(s) is not None else s)


def _rebuilt(
    expr: str, t: schema.Type, leaf: Callable[[str, schema.Scalar], str | None], depth: int = 0
) -> str | None:
    """``expr`` with each scalar that ``leaf`` gives SQL for replaced by that SQL, through
    structs (``struct_pack`` in ``t``'s field order) and lists; None when ``leaf`` changes
    nothing."""
    if isinstance(t, schema.Struct):
        parts = [
            (name, _rebuilt(f"struct_extract({expr}, {sql_literal(name)})", f, leaf, depth))
            for name, f in t.fields
        ]
        if all(p is None for _, p in parts):
            return None
        fields = ", ".join(
            f"{quote_ident(name)} := "
            + (p if p is not None else f"struct_extract({expr}, {sql_literal(name)})")
            for name, p in parts
        )
        # struct_pack of a NULL struct would be a struct of NULLs.
        return f"CASE WHEN {expr} IS NULL THEN NULL ELSE struct_pack({fields}) END"
    if isinstance(t, schema.List):
        var = f"g{depth}"
        inner = _rebuilt(var, t.element, leaf, depth + 1)
        return None if inner is None else f"list_transform({expr}, lambda {var}: {inner})"
    return leaf(expr, t)


_UNFORESEEN_MESSAGE = "a value the type sample did not foresee"
_UNFORESEEN = f"error({sql_literal(_UNFORESEEN_MESSAGE)})"
_OTHER_ROW_TYPE = "the witnessed read bound other columns or types"


def _checked_leaf(expr: str, sampled: schema.Scalar) -> str | None:
    """``expr`` (the JSON text the witnessed read gives at a :func:`_risky` position) as its
    sampled type when the value is of the kind that type expects, else an error: what the
    sampled read would have converted silently (1.5 into an integer) fails instead. A
    number's text starts with ``-`` or a digit (strings, booleans, objects and arrays do not),
    and DuckDB writes a fraction or exponent with ``.`` or ``e``."""
    if _risky(sampled) is None:
        return None
    text = f"CAST({expr} AS VARCHAR)"
    number = f"{text} >= '-' AND {text} < ':'"
    kind = sampled.text
    if kind in _INTEGER_TYPES:
        fraction = " OR ".join(f"contains({text}, {c!r})" for c in ".eE")
        good = f"{number} AND NOT ({fraction})"
        value = f"CAST({text} AS {kind})"
    elif kind in _FLOAT_TYPES:
        good, value = f"{number} AND NOT ({_long_integer(text)})", f"CAST({text} AS {kind})"
    elif kind == "BOOLEAN":
        good, value = f"{text} IN ('true', 'false')", f"{text} = 'true'"
    elif kind in _TIME_TYPES:
        good = f"NOT ({_bad_values(expr, sampled)})"
        value = f"CAST({expr} AS {kind})"
    else:  # null throughout the sample: any value would be kept as JSON text
        good, value = "false", f"CAST(NULL AS {schema.render(_witnessed(sampled))})"
    return f"CASE WHEN {expr} IS NULL THEN NULL WHEN {good} THEN {value} ELSE {_UNFORESEEN} END"


def _plain_names(t: schema.Type) -> bool:
    """Whether no two keys of a struct (or the columns) differ only in case, at any depth:
    DuckDB renames such keys, and a witness record would then hold a key of its own."""
    if isinstance(t, schema.Struct):
        names = [n.lower() for n, _ in t.fields]
        return len(set(names)) == len(names) and all(_plain_names(f) for _, f in t.fields)
    if isinstance(t, schema.List):
        return _plain_names(t.element)
    return True


def _guarded_reader(
    src: Path,
    info: DetectedFormat,
    sampled: Mapping[str, schema.Type],
    witness: Path,
    samples: Sequence[int] = (_DEFAULT_SAMPLE,),
) -> tuple[str, ...] | None:
    """SELECTs giving what the sampled read of ``src`` gives (``sampled``: its columns and
    types), that fail where that read would convert a value silently: one for each size in
    ``samples``, the records its detection looks at. It replaces the check
    (:func:`_silently_converted`), a second parse of the file, by a test in the one parse.

    Two witness records (written once to ``witness``) are read first: their values make
    DuckDB's detection type every position at risk JSON (:func:`_witness`), the rest of its
    sample (DuckDB's default: the records the sampled read looks at) types
    everything else, and keys it never saw still fail the read. :func:`_checked_leaf` turns
    each JSON text into the sampled type or fails. Bound columns or types other than the
    expected ones fail the read before its first row (``typeof`` of the row is known when the
    query is planned).

    None when nothing is at risk (no check needed) or the witness cannot be told apart."""
    columns = dict(sampled)
    row = schema.Struct(tuple(columns.items()))
    # Every column, in order (null where nothing is at risk), like a struct's fields.
    records = _witness(row)
    if records is None or _WITNESS_COLUMN in columns or not _plain_names(row):
        return None
    if info.format is FileFormat.JSON_ARRAY:
        text = json.dumps(records)
    else:
        text = "".join(json.dumps(r) + "\n" for r in records)
    with gzip.open(witness, "wt") if info.gzip else open(witness, "w") as fh:
        fh.write(text)
    readers = [
        f"read_json([{sql_literal(str(witness))}, {sql_literal(str(src))}], format := "
        + ("'array'" if info.format is FileFormat.JSON_ARRAY else "'newline_delimited'")
        + f", compression := {'gzip' if info.gzip else 'uncompressed'!r}, "
        f"sample_size := {sample + len(records)}, "
        f"filename := {sql_literal(_WITNESS_COLUMN)})"
        for sample in samples
    ]
    exprs = []
    for name, t in columns.items():
        col = quote_ident(name)
        checked = _rebuilt(col, t, _checked_leaf)
        exprs.append(f"{checked} AS {col}" if checked is not None else col)
    # The whole row: a column the select does not name (a key only the read's own sample
    # saw) would be dropped unseen, as DuckDB then stops failing on unknown keys.
    bound = schema.Struct(
        (*((n, _witnessed(t)) for n, t in columns.items()), (_WITNESS_COLUMN, _VARCHAR))
    )
    return tuple(
        f"SELECT {', '.join(exprs)} FROM {reader} AS {_WITNESS_ROW} WHERE CASE "
        f"WHEN typeof({_WITNESS_ROW}) <> typeof(CAST(NULL AS {schema.render(bound)})) "
        f"THEN error({sql_literal(_OTHER_ROW_TYPE)}) "
        f"WHEN {quote_ident(_WITNESS_COLUMN)} = {sql_literal(str(witness))} THEN false "
        "ELSE true END"
        for reader in readers
    )


_DUCKDB_LINE = re.compile(
    r"(?:,?\s*at byte \d+ in (?:line|record/value) \d+|,?\s*in line \d+|"
    r"CSV Error on Line:\s*\d+\s*)",
    re.I,
)
_CONVERSION = re.compile(
    r"Conversion Error|Failed to cast|Could not convert|Could not parse|"
    r"JSON transform error|out of range",
    re.I,
)


def _is_conversion_error(exc: BaseException) -> bool:
    text = str(exc)
    return bool(_CONVERSION.search(text)) and "Malformed JSON" not in text


# (SELECT, {column: type it was read as instead of the declared one})
_Plan = tuple[str, dict[str, str]]
# The SELECT, and what to read instead when a value does not fit its declared type.
# (And the columns the SELECT reads as another type than detected, as the drift report has it.)
_Plans = tuple[str, Callable[[], _Plan | None] | None, dict[str, str]]


def _json_selects(
    con: duckdb.DuckDBPyConnection,
    src: Path,
    info: DetectedFormat,
    hints: Mapping[str, schema.Type],
    detected: list[tuple[str, str]],
    missing: set[str],
) -> _Plans:
    """Read every detected key, typed by its hint where declared. If a value does not fit a
    declared type, the columns holding such values are read as the data's own type."""
    typed: dict[str, str] = {}
    plain: dict[str, str] = {}
    for name, duck_type in detected:
        found = schema.no_null(schema.parse(duck_type))
        hint = hints.get(name)
        chosen = found if hint is None else schema.apply_hint(hint, schema.parse(duck_type))
        typed[name] = schema.render(chosen)
        plain[name] = schema.render(found)
    missing.update(n for n in hints if n not in typed)
    differ = [n for n in typed if typed[n] != plain[n]]

    # Integers DOUBLE would round (past 2**64 DuckDB's detection calls them DOUBLE and the
    # read succeeds): those positions are read as their text. One pass, only where the
    # detected types have a float.
    def as_json(columns: list[str]) -> str:
        return _json_reader(src, info.format, info.gzip, dict.fromkeys(columns, "JSON"))

    inexact = _exact_numbers(con, as_json, plain, floats_only=True)
    plain.update(_as_text(plain, inexact))
    typed.update(_as_text(typed, inexact))
    exact = {n: plain[n] for n in inexact}

    def on_drift() -> _Plan | None:
        # Integers past their type first: DuckDB's detection types them BIGINT and then fails
        # the read (2**63 .. 2**64-1, at any depth), whatever was declared.
        too_big = _exact_numbers(con, as_json, plain)
        wide = _as_text(plain, too_big)
        own = {**plain, **wide}
        wanted = {**typed, **_as_text(typed, too_big)}
        candidates = {n: wanted[n] for n in differ if n not in wide}
        reader = _json_reader(src, info.format, info.gzip, own)
        bad = _drifting(con, reader, candidates) if candidates else []
        if not bad and not wide:
            # TRY_CAST nulls a field inside a struct or list that does not fit (a string where
            # a list of structs is declared) instead of the value: find the nested columns the
            # declared type cannot read, one read each (error path only).
            bad = [
                n
                for n, t in candidates.items()
                if _is_nested(t) and not _reads(con, src, info, {**own, n: t}, n)
            ]
        if not bad and not wide:
            return None
        columns = {n: (own[n] if n in bad else t) for n, t in wanted.items()}
        return (
            f"SELECT * FROM {_json_reader(src, info.format, info.gzip, columns)}",
            {**exact, **{n: columns[n] for n in [*wide, *bad]}},
        )

    return f"SELECT * FROM {_json_reader(src, info.format, info.gzip, typed)}", on_drift, exact


def _reads(
    con: duckdb.DuckDBPyConnection,
    src: Path,
    info: DetectedFormat,
    columns: Mapping[str, str],
    name: str,
) -> bool:
    """Whether ``src`` reads with ``columns``, converting column ``name`` in every record."""
    reader = _json_reader(src, info.format, info.gzip, columns)
    try:
        con.execute(f"SELECT count({quote_ident(name)}) FROM {reader}").fetchone()
    except duckdb.Error as exc:
        if _is_conversion_error(exc):
            return False
        raise
    return True


def _exact_numbers(
    con: duckdb.DuckDBPyConnection,
    as_json: Callable[[list[str]], str],
    plain: Mapping[str, str],
    *,
    floats_only: bool = False,
) -> dict[str, list[tuple[str, ...]]]:
    """Where numbers are that their detected type cannot hold exactly (column -> paths, for
    :func:`_as_text` to retype so that the number's text lands, every digit kept): an integer
    past an integer position's type (DuckDB types integers BIGINT and fails on 2**63 and
    more), or an integer of 16 or more digits at a float position (past 2**64 DuckDB's
    detection calls integers DOUBLE and rounds them silently). Top level, the column becomes
    VARCHAR; inside structs and lists only that leaf (``evses[].id``), the rest keeps its
    types. ``floats_only``: float positions alone.
    One pass over ``as_json(columns)`` (a relation with those columns as JSON), only where they
    have such a leaf."""
    tests: list[tuple[str, tuple[str, ...], str]] = []  # (column, path, SQL: a bad value)
    for name, text in plain.items():
        for path, leaf in _number_leaves(schema.parse(text)):
            if floats_only and leaf not in _FLOAT_TYPES:
                continue
            values = _json_values(quote_ident(name), path)
            if values is None:
                continue  # a key a JSON path cannot name: left as it is
            x = "CAST(x AS VARCHAR)"
            if leaf in _FLOAT_TYPES:
                bad = _long_integer(x)
            else:
                bad = f"regexp_full_match({x}, '-?[0-9]+') AND TRY_CAST({x} AS {leaf}) IS NULL"
            tests.append((name, path, f"len(list_filter({values}, lambda x: {bad})) > 0"))
    if not tests:
        return {}
    reader = as_json(list(dict.fromkeys(name for name, _, _ in tests)))
    counts = ", ".join(f"count(*) FILTER (WHERE coalesce({bad}, false))" for _, _, bad in tests)
    row = con.execute(f"SELECT {counts} FROM {reader}").fetchone() or ()
    found: dict[str, list[tuple[str, ...]]] = {}
    for (name, path, _), n in zip(tests, row, strict=True):
        if n:
            found.setdefault(name, []).append(path)
    return found


def _as_text(
    types: Mapping[str, str], leaves: Mapping[str, list[tuple[str, ...]]]
) -> dict[str, str]:
    """The columns of ``leaves`` (from :func:`_exact_numbers`) with those positions VARCHAR."""
    out: dict[str, str] = {}
    for name, paths in leaves.items():
        t = schema.parse(types[name])
        for path in paths:
            t = _with_leaf(t, path, schema.Scalar("VARCHAR"))
        out[name] = schema.render(t)
    return out


def _long_integer(text: str) -> str:
    """SQL: the JSON text ``text`` is an integer of 16 or more digits, which a float would
    round (2**53 has 16; CSV cells follow the same rule, :func:`_inexact`). A CASE, so that
    the regex runs only on texts of 16 bytes or more: DuckDB evaluates both sides of an AND
    in a projection (10,000,000 float texts, one thread: 2.5x the unchecked test's CPU with
    ``length(t) > 15 AND regexp...``, +2% with this CASE)."""
    digits = f"regexp_full_match({text}, '-?[0-9]{{16,}}')"
    return f"(CASE WHEN strlen({text}) < 16 THEN false ELSE {digits} END)"


def _number_leaves(
    t: schema.Type, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str]]:
    """(path, type) of each integer or float scalar in ``t``; a path holds struct field names
    and ``"[]"`` for a list's elements."""
    if isinstance(t, schema.Struct):
        for name, field_type in t.fields:
            yield from _number_leaves(field_type, (*path, name))
    elif isinstance(t, schema.List):
        yield from _number_leaves(t.element, (*path, "[]"))
    elif t.text in _INTEGER_TYPES or t.text in _FLOAT_TYPES:
        yield path, t.text


def _json_values(expr: str, path: tuple[str, ...]) -> str | None:
    """SQL: the list of JSON values at ``path`` inside the JSON ``expr`` (every element of
    every list on the way), or None when a key cannot be spelled in a JSON path."""
    if not path:
        return f"[{expr}]"
    steps = ["$"]
    for step in path:
        if step == "[]":
            steps.append("[*]")
        elif '"' in step or "\\" in step:
            return None
        else:
            steps.append(f'."{step}"')
    json_path = sql_literal("".join(steps))
    if "[]" in path:
        return f"json_extract({expr}, {json_path})"
    return f"[json_extract({expr}, {json_path})]"


def _with_leaf(t: schema.Type, path: tuple[str, ...], leaf: schema.Type) -> schema.Type:
    """``t`` with the scalar at ``path`` (as :func:`_number_leaves` spells it) replaced."""
    if not path:
        return leaf
    head, rest = path[0], path[1:]
    if isinstance(t, schema.List) and head == "[]":
        return schema.List(_with_leaf(t.element, rest, leaf))
    if isinstance(t, schema.Struct):
        return schema.Struct(
            tuple((n, _with_leaf(f, rest, leaf) if n == head else f) for n, f in t.fields)
        )
    return t


def _drifting(
    con: duckdb.DuckDBPyConnection,
    reader: str,
    wanted: Mapping[str, str],
    inexact: Mapping[str, str] | None = None,
) -> list[str]:
    """Columns of ``reader`` holding a non-NULL value that does not cast to its wanted type
    (or, ``inexact``: column -> SQL, would be rounded by it)."""

    def bad(n: str, t: str) -> str:
        col = quote_ident(n)
        test = f"TRY_CAST({col} AS {t}) IS NULL"
        if inexact and n in inexact:
            test = f"({test} OR {inexact[n]})"
        return f"count(*) FILTER (WHERE {col} IS NOT NULL AND {test})"

    counts = ", ".join(bad(n, t) for n, t in wanted.items())
    row = con.execute(f"SELECT {counts} FROM {reader}").fetchone() or ()
    return [n for n, bad in zip(wanted, row, strict=False) if bad]


def _inexact(col: str, duck_type: str, *, declared: bool) -> str | None:
    """SQL: the text ``col`` would lose digits as ``duck_type`` (None: it cannot). An integer
    of 16 or more digits as a float (2**53 has 16: a long id the sniffer called DOUBLE);
    sub-microsecond digits as a timestamp or time the sniffer detected (DuckDB keeps
    microseconds; the JSON reader keeps such text as VARCHAR, so CSV and JSON agree). A
    declared timestamp takes microseconds, as declared."""
    if duck_type in _FLOAT_TYPES:
        return f"(length({col}) > 15 AND regexp_full_match({col}, '[-+]?[0-9]{{16,}}'))"
    if not declared and duck_type in (*_TIME_TYPES, "TIMESTAMP", _TIMESTAMPTZ):
        return f"regexp_matches({col}, '[.,][0-9]{{7,}}')"
    return None


def _ragged_csv_line(path: Path, gz: bool) -> int | None:
    """1-based line of the first CSV record whose field count differs from the header's (only
    on the error path; DuckDB's sniffer reports a ragged file without a line)."""
    with (
        _open_text(path, gz) as raw,
        io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text,
    ):
        reader = csv.reader(text)
        width = None
        start = 1
        for record in reader:
            if width is None:
                width = len(record)
            elif record and len(record) != width:
                return start
            start = reader.line_num + 1
    return None


# Keys DuckDB's JSON reader cannot read by name. It refuses a struct with two keys that differ
# only in case and renames the second of two such top-level keys (``Name`` beside ``name``
# becomes ``Name_1``); it names a top-level key "" ``C<n>``, and writes a struct field whose key
# is "" without a name (no type can be declared with it). A read with such columns given then
# matches keys without regard to case, or looks for ``C1``, and leaves the column empty.
_CASE_CLASH = re.compile(r"Duplicate name .* in struct auto-detected in JSON", re.I)
_RENAMED = re.compile(r"^(.+)_(\d+)$", re.S)
_UNNAMED = re.compile(r"^C\d+$")


class _NotByName(Exception):
    """Records of the group have keys that DuckDB's JSON reader cannot read by name."""


def _renamed_by_duckdb(names: Iterable[str]) -> bool:
    """Whether a column may be a key DuckDB renamed (see _CASE_CLASH)."""
    names = list(names)
    lower = {n.lower() for n in names}
    return any(
        _UNNAMED.match(n) or ((m := _RENAMED.match(n)) and m.group(1).lower() in lower)
        for n in names
    )


def _top_keys_not_by_name(
    con: duckdb.DuckDBPyConnection, files: Sequence[Path], fmt: FileFormat, gz: bool
) -> bool:
    """Whether two top-level keys of the records differ only in case, or one is "" (a real
    ``name_1`` key beside ``name`` looks the same to a DESCRIBE; one more pass, only then)."""
    row = con.execute(
        "SELECT count(DISTINCT k) <> count(DISTINCT lower(k)) OR bool_or(k = '') FROM "
        f"(SELECT unnest(json_keys(json)) AS k FROM {_objects_reader(files, fmt, gz)})"
    ).fetchone()
    return bool(row and row[0])


def _pointer(key: str) -> str:
    """The JSON pointer of a top-level key (exact, case included)."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


@dataclass(frozen=True)
class _ExactKeys:
    """The columns of records read key by key, for keys DuckDB's reader cannot read by name
    (_CASE_CLASH; rare; a slower read, two passes).

    Every top-level key is a column; one that differs only in case from a key seen before is
    named as DuckDB names it (``Name_1``), a key "" ``C<position>``; keys inside structs are
    read with ``json_transform``, which keeps such keys apart the same way (``UID_1``), and an
    object with a key "" is a ``MAP(VARCHAR, JSON)``. Types come from
    the structure of every record (``_structures``; strings stay VARCHAR: no date detection), the
    declared columns apply as hints, as for a CSV's nested columns."""

    keys: tuple[tuple[str, str, schema.Type], ...]  # (key, column, type)

    @classmethod
    def of(
        cls,
        con: duckdb.DuckDBPyConnection,
        group: list[Path],
        fmt: FileFormat,
        detected: Mapping[Path, DetectedFormat],
        fail: _Fail,
    ) -> _ExactKeys:
        found: dict[str, schema.Type] = {}
        for gz in (False, True):
            same = [src for src in group if detected[src].gzip is gz]
            if not same:
                continue
            reader = _objects_reader(same, fmt, gz)
            try:
                ((structure, _),) = _structures(con, reader, ["json"], digits=False)
            except duckdb.Error as exc:
                raise fail(exc, _failing_source(con, exc, same, fmt, detected)) from exc
            if not isinstance(structure, dict):
                structure = {}
            for key, value in structure.items():
                t = schema.from_structure(value)
                found[key] = t if key not in found else schema.widen(found[key], t)
        keys: list[tuple[str, str, schema.Type]] = []
        taken: set[str] = set()
        for i, (key, t) in enumerate(found.items()):
            column, n = key or f"C{i}", 0  # DuckDB's name for a key ""
            while column.lower() in taken:
                n += 1
                column = f"{key or f'C{i}'}_{n}"
            taken.add(column.lower())
            keys.append((key, column, t))
        return cls(tuple(keys))

    def described(self) -> list[tuple[str, str]]:
        return [(column, schema.render(t)) for _, column, t in self.keys]

    def selects(
        self,
        con: duckdb.DuckDBPyConnection,
        src: Path,
        info: DetectedFormat,
        hints: Mapping[str, schema.Type],
        missing: set[str],
    ) -> _Plans:
        """SELECT over ``src``'s records: scalars cast from their text (a value that does not
        fit its declared type sends the column to its own type, as for JSON and CSV), nested
        values through ``json_transform`` with the structure merged with the declared type."""
        values = ", ".join(
            f"json -> {sql_literal(_pointer(key))} AS {quote_ident(column)}"
            for key, column, _ in self.keys
        )
        reader = f"(SELECT {values} FROM {_objects_reader([src], info.format, info.gzip)})"
        missing.update(n for n in hints if n not in {c for _, c, _ in self.keys})
        chosen: dict[str, schema.Type] = {}  # each column's type, as read below
        for _, column, found in self.keys:
            hint = hints.get(column)
            own = schema.no_null(found)
            if schema.is_nested(own) or (hint is not None and schema.is_nested(hint)):
                chosen[column] = own if hint is None else schema.apply_hint(hint, found)
            else:
                chosen[column] = hint if hint is not None else own
        # Numbers their type cannot hold (json_transform would null or round them): that
        # leaf, or the column, as the number's text, as for the usual read (_exact_numbers).
        rendered = {n: schema.render(t) for n, t in chosen.items()}
        exact = _as_text(rendered, _exact_numbers(con, lambda _: reader, rendered))
        chosen.update({n: schema.parse(t) for n, t in exact.items()})
        exprs: dict[str, str] = {}
        scalars: dict[str, str] = {}
        plain: dict[str, str] = {}
        for _, column, found in self.keys:
            col = quote_ident(column)
            hint = hints.get(column)
            own = schema.no_null(found)
            if column in exact and not schema.is_nested(chosen[column]):
                exprs[column] = f"{col} ->> '$' AS {col}"  # its text, every digit
                continue
            if schema.is_nested(own) or (hint is not None and schema.is_nested(hint)):
                merged = chosen[column]
                if isinstance(merged, schema.Scalar) and merged.text == "JSON":
                    exprs[column] = f"{col} AS {col}"
                elif not schema.is_nested(merged):
                    exprs[column] = f"CAST({col} ->> '$' AS {schema.render(merged)}) AS {col}"
                else:
                    structure = sql_literal(schema.structure(merged))
                    exprs[column] = f"json_transform({col}, {structure}) AS {col}"
                continue
            duck_type = schema.render(hint if hint is not None else own)
            exprs[column] = f"CAST({col} ->> '$' AS {duck_type}) AS {col}"
            plain[column] = f"CAST({col} ->> '$' AS {schema.render(own)}) AS {col}"
            if duck_type != "VARCHAR":
                scalars[column] = duck_type
        texts = ", ".join(f"{quote_ident(c)} ->> '$' AS {quote_ident(c)}" for c in scalars)

        def on_drift() -> _Plan | None:
            bad = _drifting(con, f"(SELECT {texts} FROM {reader})", scalars) if scalars else []
            if not bad:
                return None
            kept = {**exprs, **{n: plain[n] for n in bad}}
            own = {n: schema.render(schema.no_null(t)) for _, n, t in self.keys if n in bad}
            return f"SELECT {', '.join(kept.values())} FROM {reader}", {**exact, **own}

        return f"SELECT {', '.join(exprs.values())} FROM {reader}", on_drift, exact


def _objects_reader(paths: Sequence[Path], fmt: FileFormat, gz: bool) -> str:
    """Each record as one JSON value (its keys exactly as written)."""
    return f"read_json_objects({_json_files(paths, fmt, gz)})"


def _auto_schema(
    con: duckdb.DuckDBPyConnection,
    group: list[Path],
    group_fmt: FileFormat,
    detected: Mapping[Path, DetectedFormat],
    fail: _Fail,
) -> list[tuple[str, str]]:
    """Types guessed per file and widened across the files of one format (union by name)."""
    found: dict[str, schema.Type] = {}
    readers: list[tuple[list[Path], str]] = []
    if group_fmt is FileFormat.CSV:
        readers = [
            ([src], _csv_reader(src, gz=detected[src].gzip, all_varchar=False)) for src in group
        ]
    else:
        # One DESCRIBE over all parts of the same compression: DuckDB scans them in parallel
        # (a full scan, see _AUTO_SAMPLE_SIZE), which costs the time of one part, not of all.
        for gz in (False, True):
            same = [src for src in group if detected[src].gzip is gz]
            if same:
                readers.append((same, _json_reader_many(same, group_fmt, gz)))
    for files, reader in readers:
        src = files[0]
        try:
            described = _describe(con, f"SELECT * FROM {reader}")
        except duckdb.Error as exc:
            if group_fmt is not FileFormat.CSV and _CASE_CLASH.search(str(exc)):
                raise _NotByName from exc
            bad = (
                src
                if group_fmt is FileFormat.CSV
                else _failing_source(con, exc, group, group_fmt, detected)
            )
            raise fail(exc, bad) from exc
        if (
            group_fmt is not FileFormat.CSV
            and _renamed_by_duckdb(n for n, _ in described)
            and _top_keys_not_by_name(con, files, group_fmt, detected[src].gzip)
        ):
            raise _NotByName
        for name, duck_type in described:
            try:
                t = schema.parse(duck_type)
            except ValueError as exc:  # a key "" inside a struct
                if group_fmt is FileFormat.CSV:
                    raise fail(exc, src) from exc
                raise _NotByName from exc
            found[name] = t if name not in found else schema.widen(found[name], t)
    if len({n.lower() for n in found}) < len(found):  # ``Name`` in gzipped parts only
        raise _NotByName
    return [(n, schema.render(t)) for n, t in found.items()]


def _empty_select(columns: Mapping[str, str]) -> _Plan:
    cols = ", ".join(f"CAST(NULL AS {t}) AS {quote_ident(n)}" for n, t in columns.items())
    return f"SELECT {cols} LIMIT 0", {}


def _csv_selects(
    con: duckdb.DuckDBPyConnection,
    src: Path,
    gz: bool,
    kind: ExportKind,
    hints: Mapping[str, schema.Type],
    auto: Mapping[str, str],
    fail: _Fail,
    missing: set[str],
) -> _Plans:
    """SELECT over a CSV read as text: the header decides the columns, declared types apply to
    those present, others get the type DuckDB's sniffer guessed.

    Reading as VARCHAR first means an empty cell is NULL whatever the type. A nested column
    (JSON text in the cell) is read leniently, like the JSON reader reads it: its structure is
    taken from every cell (``_structures``), merged with the declared type, and applied
    with ``json_transform`` (a missing key is NULL, an extra key is a new struct field). A
    second plan reads scalar columns whose values do not fit the declared type as VARCHAR.
    """
    reader = _csv_reader(src, gz, all_varchar=True)
    try:
        header = [name for name, _ in _describe(con, f"SELECT * FROM {reader}")]
    except duckdb.Error as exc:
        raise fail(exc, src) from exc
    missing_keys = [k for k in kind.primary_key if k not in header]
    if kind.columns is not None and missing_keys:
        raise fail(
            ValueError(""),
            src,
            f"CSV header {header[:20]} lacks primary key column(s) {missing_keys}",
        )
    missing.update(n for n in hints if n not in header)
    nested = [n for n in header if n in hints and schema.is_nested(hints[n])]
    structures: dict[str, schema.Type] = {}
    long_digits: list[str] = []  # nested columns where a number may not fit its leaf's type
    if nested:
        cells = [f"CAST(NULLIF({quote_ident(n)}, '') AS JSON)" for n in nested]
        try:
            found = _structures(con, reader, cells)
        except duckdb.Error as exc:
            raise fail(exc, src, _first_bad_json_cell(con, reader, nested)) from exc
        for name, (structure, digits) in zip(nested, found, strict=True):
            if structure is not None:
                structures[name] = schema.from_structure(structure)
            if digits:
                long_digits.append(name)
    merged_types = {
        name: schema.render(
            hints[name]
            if name not in structures
            else schema.apply_hint(hints[name], structures[name])
        )
        for name in nested
    }
    # A number its leaf cannot hold (json_transform would null an integer past BIGINT and round
    # one past 2**64 into its DOUBLE): that leaf is read as the number's text, as for JSON.
    # One more pass, only over columns where a cell has a run of 16 digits.
    at_risk = {n: merged_types[n] for n in long_digits if _is_nested(merged_types[n])}
    exact: dict[str, str] = {}
    if at_risk:

        def as_json(columns: list[str]) -> str:
            cells = ", ".join(
                f"CAST(NULLIF({quote_ident(c)}, '') AS JSON) AS {quote_ident(c)}" for c in columns
            )
            return f"(SELECT {cells} FROM {reader})"

        exact = _as_text(at_risk, _exact_numbers(con, as_json, at_risk))
        merged_types.update(exact)
    exprs: dict[str, str] = {}
    scalars: dict[str, str] = {}
    inexact: dict[str, str] = {}  # column -> SQL: its text would be rounded by its type
    for name in header:
        col = quote_ident(name)
        hint = hints.get(name)
        if hint is not None and name in nested:
            merged = schema.parse(merged_types[name])
            if isinstance(merged, schema.Scalar):
                expr = f"CAST(NULLIF({col}, '') AS {schema.render(merged)})"
            else:
                expr = f"json_transform(NULLIF({col}, ''), {sql_literal(schema.structure(merged))})"
            exprs[name] = f"{expr} AS {col}"
            continue
        duck_type = schema.render(
            hint if hint is not None else schema.no_null(schema.parse(auto.get(name, "VARCHAR")))
        )
        # A plain CAST is pushed into the CSV scan. Empty cells are already NULL there.
        exprs[name] = f"CAST({col} AS {duck_type}) AS {col}"
        if (lossy := _inexact(col, duck_type, declared=hint is not None)) is not None:
            # A text the type would round (below): the column drifts to its text instead.
            inexact[name] = lossy
            exprs[name] = (
                f"CASE WHEN {lossy} THEN error('Could not convert ' || {col} || "
                f"' to {duck_type} exactly') ELSE CAST({col} AS {duck_type}) END AS {col}"
            )
        if duck_type != "VARCHAR":
            scalars[name] = duck_type

    def on_drift() -> _Plan | None:
        bad = _drifting(con, reader, scalars, inexact) if scalars else []
        if not bad:
            return None
        kept = {**exprs, **{n: quote_ident(n) for n in bad}}
        select = f"SELECT {', '.join(kept.values())} FROM {reader}"
        return select, {**exact, **dict.fromkeys(bad, "VARCHAR")}

    return f"SELECT {', '.join(exprs.values())} FROM {reader}", on_drift, exact


def _structures(
    con: duckdb.DuckDBPyConnection, reader: str, values: list[str], *, digits: bool = True
) -> list[tuple[object | None, bool]]:
    """What ``json_group_structure`` of each JSON expression over every row would say (None:
    null throughout), in one scan that holds only the distinct shapes: ``histogram`` of each
    value's ``json_structure``, merged in Python, the commonest shape first (its key order
    leads; ties by text, so the result does not depend on the scan's order). Beside each,
    whether a value has a run of 16 or more digits: a number its structure may not hold
    exactly (it says UBIGINT for 1 and for 2**64-1, DOUBLE for 1.5 and for 10**23); not
    scanned for (False) without ``digits``."""
    shapes = ", ".join(
        f"json_structure({v}) AS s{i}, CAST({v} AS VARCHAR) AS t{i}" for i, v in enumerate(values)
    )
    counts = ", ".join(
        f"histogram(s{i}), "
        + (f"bool_or(regexp_matches(t{i}, '[0-9]{{16}}'))" if digits else "false")
        for i in range(len(values))
    )
    row = con.execute(f"SELECT {counts} FROM (SELECT {shapes} FROM {reader})").fetchone()
    merged: list[tuple[object | None, bool]] = []
    for i in range(len(values)):
        histogram, digits = (row[2 * i], row[2 * i + 1]) if row else (None, None)
        out: object | None = None
        for text, _ in sorted((histogram or {}).items(), key=lambda kv: (-kv[1], kv[0])):
            shape = json.loads(text)
            out = shape if out is None else schema.merge_structure(out, shape)
        merged.append((out, bool(digits)))
    return merged


def _first_bad_json_cell(
    con: duckdb.DuckDBPyConnection, reader: str, nested: list[str]
) -> str | None:
    """Which nested column holds text that is not JSON (error path only)."""
    for name in nested:
        try:
            con.execute(
                f"SELECT count(CAST(NULLIF({quote_ident(name)}, '') AS JSON)) FROM {reader}"
            ).fetchone()
        except duckdb.Error as exc:
            return f"column {name!r} is not valid JSON: {str(exc).splitlines()[0][:300]}"
    return None


def _csv_conversion_error(
    con: duckdb.DuckDBPyConnection,
    src: Path,
    gz: bool,
    columns: Mapping[str, str],
    exc: duckdb.Error,
) -> duckdb.Error:
    """The CSV reader's own error for a value that does not fit its declared type.

    DuckDB 1.4 reports a failed CAST of a text column without a line; its CSV reader, told the
    scalar types, reports "CSV Error on Line: N" for the same value. Only on the error path.
    """
    if _ANY_LINE.search(str(exc)):
        return exc
    try:
        header = {
            n for n, _ in _describe(con, f"SELECT * FROM {_csv_reader(src, gz, all_varchar=True)}")
        }
    except duckdb.Error:
        return exc
    types = {n: t for n, t in columns.items() if n in header and not _is_nested(t)}
    if not types:
        return exc
    reader = (
        f"read_csv({sql_literal(str(src))}, header := true, "
        f"compression := {'gzip' if gz else 'uncompressed'!r}, "
        f"types := {_struct_literal(types)})"
    )
    try:
        # An aggregate over every typed column: a bare count(*) would skip converting them.
        cols = ", ".join(quote_ident(n) for n in types)
        con.execute(f"SELECT max(hash({cols})) FROM {reader}").fetchone()
    except duckdb.Error as typed:
        if _ANY_LINE.search(str(typed)):
            return typed
    return exc
