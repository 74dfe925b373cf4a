"""Parquet of one export into its DuckDB table: merge, snapshot or partition replace.

Everything here runs *inside the caller's transaction*: the caller opens ``BEGIN``, loads, moves
the ledger's cursor and commits once, so a crash leaves the old state or the new one, never
half. These functions therefore never COMMIT or ROLLBACK. All work is SQL over
``read_parquet``; no row passes through Python, and identifiers are always quoted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb

from export_pipeline.core import schema
from export_pipeline.core.errors import ConfigurationError, IntegrityError
from export_pipeline.core.model import ExportKind, LoadMode, SchemaContract
from export_pipeline.core.sql import quote_ident, sql_literal
from export_pipeline.core.warehouse import evolve_statements

# Error code of an export whose rows belong to another partition than the one it was loaded
# for (the ledger keeps it, so the runner never adopts that export for that partition again).
PARTITION_MISMATCH = "PARTITION_MISMATCH"
# Error code of an export that would change a frozen schema (kind.schema_contract = FREEZE).
SCHEMA_FROZEN = "SCHEMA_FROZEN"


@dataclass(frozen=True)
class LoadResult:
    rows_in_export: int  # rows after de-duplication on the primary key
    rows_inserted: int  # keys new to the table
    rows_updated: int  # keys that were there and were replaced
    rows_deleted: int  # keys that disappeared (snapshot / partition replace)
    table_rows: int  # rows in the table afterwards
    columns_added: tuple[str, ...] = ()  # new top-level columns this export brought
    # Other schema changes, e.g. "evses[].floor_level added (VARCHAR)", "n widened BIGINT -> DOUBLE"
    columns_changed: tuple[str, ...] = ()
    # The export's Parquet files whose rows are now exactly the table's (the load replaced the
    # whole table from them, unconverted: a snapshot, or the first load into an empty table);
    # empty otherwise. The read replica may reuse them instead of writing the table again.
    table_files: tuple[str, ...] = ()
    # The rows were not copied: the table staged while parsing became the kind's table by a
    # rename (``load_parquet(staged=...)``, core/stage.py).
    renamed: bool = False


def _qualified(kind: ExportKind, name: str | None = None) -> str:
    return f"{quote_ident(kind.schema)}.{quote_ident(name or kind.name)}"


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None) -> int:
    row = con.execute(sql, params or []).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> dict[str, str]:
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        [schema, table],
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def _table_exists(con: duckdb.DuckDBPyConnection, kind: ExportKind) -> bool:
    return (
        _scalar(
            con,
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = ? AND table_name = ?",
            [kind.schema, kind.name],
        )
        > 0
    )


def ensure_views(con: duckdb.DuckDBPyConnection, kind: ExportKind) -> None:
    """(Re)create the kind's analyst views, so they follow the table's current columns."""
    if not kind.views:
        return
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(kind.schema)}")
    for view, select in kind.views.items():
        con.execute(f"CREATE OR REPLACE VIEW {_qualified(kind, view)} AS {select}")


def load_parquet(
    con: duckdb.DuckDBPyConnection,
    kind: ExportKind,
    parquet_paths: Sequence[Path | str],
    *,
    partition_value: str | None = None,
    staged: str | None = None,
    keys_unique: bool | None = None,
) -> LoadResult:
    """Apply one export's Parquet files to ``kind.table`` according to ``kind.load_mode``.

    The export is staged in a temp table de-duplicated on the primary key (the last occurrence
    wins: highest ``_source_file``, then highest row position), the table is created or widened
    with new columns, then rows are replaced. Must run inside the caller's transaction.

    ``staged`` names a table of ``kind.schema`` that the transaction already filled with the
    rows of ``parquet_paths`` (core/stage.py). When the load replaces the whole table with the
    export, that table becomes the kind's table by a rename (no INSERT); otherwise it is the
    stage; either way it is gone afterwards. With duplicate keys the files are staged as usual.
    ``keys_unique`` says whether each key occurs once in the files, when the caller checked
    already (:func:`files_have_duplicate_keys`); None: the staged table is checked here.
    """
    mode = kind.load_mode
    pk = list(kind.primary_key)
    if mode is LoadMode.MERGE and not pk:
        raise ConfigurationError(
            "MERGE needs a primary key", provider=kind.provider, kind=kind.name
        )
    if mode is LoadMode.REPLACE_PARTITION and (
        not kind.partition_column or partition_value is None
    ):
        raise ConfigurationError(
            "REPLACE_PARTITION needs kind.partition_column and a partition_value",
            provider=kind.provider,
            kind=kind.name,
        )
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(kind.schema)}")
    target = _qualified(kind)
    paths = [str(p) for p in parquet_paths]

    if not paths:
        return _load_empty(con, kind, target, partition_value)

    stage = quote_ident(f"_stage_{kind.provider}_{kind.name}_{uuid.uuid4().hex[:12]}")
    staged_as = "TABLE"
    try:
        if staged is not None and _usable_stage(con, kind, staged, keys_unique):
            stage, staged_as = staged, "STAGED"
        else:
            if staged is not None:
                con.execute(f"DROP TABLE IF EXISTS {staged}")
            staged_as = _stage(con, kind, stage, paths)
        result, whole = _apply(
            con, kind, target, stage, partition_value, swap=staged_as == "STAGED"
        )
        if whole and staged_as in ("VIEW", "STAGED"):
            # The stage holds the files' rows as they are (no de-duplication): the table is them.
            return dataclasses.replace(result, table_files=tuple(paths))
        return result
    finally:
        # In an aborted transaction this fails too; the rollback removes the temp object anyway.
        # A staged table renamed to the kind's table is no longer there to drop.
        with contextlib.suppress(duckdb.Error):
            con.execute(f"DROP {'TABLE' if staged_as == 'STAGED' else staged_as} IF EXISTS {stage}")


def _stage(con: duckdb.DuckDBPyConnection, kind: ExportKind, stage: str, paths: list[str]) -> str:
    """Make ``stage`` (a temp VIEW or TABLE, which is returned) hold the export, one row per key.

    Most exports hold each key once. Then the stage is a view over the Parquet files: no copy of
    the rows into a temp table (a full extra pass, and memory that grows with the export), and
    each later step reads only the columns it needs. Only when some key occurs more than once
    are the rows copied and de-duplicated (the last occurrence wins).
    """
    reader = "read_parquet(?, union_by_name = true, filename = true, file_row_number = true)"
    described = con.execute(f"DESCRIBE SELECT * FROM {reader}", [paths]).fetchall()
    names = {r[0] for r in described}
    _require_keys(kind, names)
    files = "[" + ", ".join(sql_literal(p) for p in paths) + "]"
    if not files_have_duplicate_keys(con, kind, paths):
        con.execute(
            f"CREATE TEMP VIEW {stage} AS SELECT * FROM read_parquet({files}, union_by_name = true)"
        )
        return "VIEW"
    helpers = "filename, file_row_number"
    order = ["filename DESC", "file_row_number DESC"]
    if "_source_file" in names:
        order.insert(0, f"{quote_ident('_source_file')} DESC")
    partition = ", ".join(quote_ident(k) for k in kind.primary_key)
    dedup = f" QUALIFY row_number() OVER (PARTITION BY {partition} ORDER BY {', '.join(order)}) = 1"
    con.execute(
        f"CREATE TEMP TABLE {stage} AS SELECT * EXCLUDE ({helpers}) FROM {reader}{dedup}",
        [paths],
    )
    return "TABLE"


def _require_keys(kind: ExportKind, names: set[str]) -> None:
    missing = [k for k in kind.primary_key if k not in names]
    if missing:
        raise IntegrityError(
            f"export has no primary key column(s) {missing}",
            provider=kind.provider,
            kind=kind.name,
        )


def _usable_stage(
    con: duckdb.DuckDBPyConnection, kind: ExportKind, staged: str, keys_unique: bool | None
) -> bool:
    """Whether the staged table can be the stage as it is: each key once."""
    _require_keys(kind, {r[0] for r in con.execute(f"DESCRIBE {staged}").fetchall()})
    if keys_unique is not None:
        return keys_unique
    return not _has_duplicate_keys(con, kind, staged)


def files_have_duplicate_keys(
    con: duckdb.DuckDBPyConnection, kind: ExportKind, parquet_paths: Sequence[Path | str]
) -> bool:
    """:func:`_has_duplicate_keys` over Parquet files (on any connection: a private one can
    run it beside a load)."""
    files = "[" + ", ".join(sql_literal(str(p)) for p in parquet_paths) + "]"
    return _has_duplicate_keys(con, kind, f"read_parquet({files}, union_by_name = true)")


def _has_duplicate_keys(con: duckdb.DuckDBPyConnection, kind: ExportKind, source: str) -> bool:
    """Whether any primary key occurs twice in ``source``; reads only the key columns (NULLs
    count as equal, like the merge's IS NOT DISTINCT FROM). No key: no duplicates."""
    if not kind.primary_key:
        return False
    # One struct of the key columns: a struct is never NULL, so keys with NULLs count too, as
    # equal; and DISTINCT keeps no counts, half the cost of GROUP BY ... HAVING count(*) > 1
    # (1,000,000 Mews reservations: 0.14-0.18 s against 0.25-0.30 s).
    key = ", ".join(
        f"{sql_literal(f'k{i}')}: {quote_ident(k)}" for i, k in enumerate(kind.primary_key)
    )
    return _scalar(con, f"SELECT count(*) - count(DISTINCT {{{key}}}) FROM {source}") > 0


def _ensure_table(
    con: duckdb.DuckDBPyConnection, kind: ExportKind, target: str, stage: str
) -> tuple[list[str], list[str]]:
    """Create the table, or evolve it to hold this export: new columns, new struct fields,
    widened types (docs/schema.md). Returns (columns added, other changes). Runs inside the
    load's transaction, so a failed load leaves the old schema.

    With ``kind.schema_contract == FREEZE`` any change fails instead, naming the columns.
    """
    staged = [
        (r[0], schema.parse(r[1]))
        for r in con.execute(f"DESCRIBE SELECT * FROM {stage}").fetchall()
    ]
    frozen = kind.schema_contract is SchemaContract.FREEZE
    declared = {n: schema.parse(t) for n, t in (kind.columns or {}).items()}
    if not _table_exists(con, kind):
        if frozen and kind.columns is not None:
            allowed = set(kind.columns) | set(LINEAGE)
            unknown = [n for n, _ in staged if n not in allowed]
            if unknown:
                raise _frozen(kind, f"the export has undeclared column(s) {unknown}")
        first = _first_types(con, stage, staged, declared)
        cols = ", ".join(f"{quote_ident(n)} {schema.render(first[n])}" for n, _ in staged)
        con.execute(f"CREATE TABLE {target} ({cols})")
        return [], []
    have = {n: schema.parse(t) for n, t in _columns(con, kind.schema, kind.name).items()}
    # Column names are case-insensitive to DuckDB: a key whose case changed since the table was
    # created (``Name`` for ``name``) is that column, not a new one (ADD COLUMN would fail).
    table_name = {n.lower(): n for n in have}
    added: list[str] = []
    changed: list[str] = []
    drifted: list[str] = []  # changes away from the declaration (a guess taking it is not)
    final = dict(have)  # the table's columns after this load, in order (new ones at the end)
    first = _first_types(
        con, stage, [(n, t) for n, t in staged if n.lower() not in table_name], declared
    )
    for staged_name, new in staged:
        name = table_name.get(staged_name.lower(), staged_name)
        old = have.get(name)
        if old is None:
            added.append(name)
            final[name] = first[name]
            continue
        if schema.no_null(new) == old:
            continue
        # A value (or struct field) null in every row says nothing about its type: on either
        # side it yields to the other's type, so a column typed by a guess takes the real one.
        merged = schema.widen(_settle(con, target, name, old), _settle(con, stage, name, new))
        # Null on both sides: the declared type, as a new column gets.
        merged = schema.no_null(schema.fill_nulls(merged, declared.get(name)))
        if merged == old:
            continue
        changed += schema.changes(old, merged, name)
        if merged != declared.get(name):
            drifted += schema.changes(old, merged, name)
        final[name] = merged
    if frozen and (added or drifted):
        problems = [f"unknown column(s) {added}"] if added else []
        if drifted:
            problems.append(f"type change(s): {', '.join(drifted)}")
        raise _frozen(kind, "; ".join(problems))
    # ALTERs where the backend can (DuckLake refuses most retypes in place): see evolve_statements.
    for statement in evolve_statements(con, kind.schema, kind.name, have, final):
        con.execute(statement)
    return added, changed


LINEAGE = ("_export_id", "_source_file", "_loaded_at")
# Types that may be a guess for a column null in every row: DuckDB's detection says JSON (or
# NULL); a table column created from such a guess is VARCHAR.
_CREATE_GUESSES = frozenset({"NULL", '"NULL"', "JSON"})
_GUESSES = _CREATE_GUESSES | {"VARCHAR"}


def _frozen(kind: ExportKind, what: str) -> IntegrityError:
    return IntegrityError(
        f"schema is frozen: {what}",
        provider=kind.provider,
        kind=kind.name,
        code=SCHEMA_FROZEN,
        hint="the kind's schema_contract is 'freeze': declare the column(s) in the kind (or "
        "set it to 'evolve') and re-run; nothing was loaded",
    )


def _first_types(
    con: duckdb.DuckDBPyConnection,
    stage: str,
    columns: list[tuple[str, schema.Type]],
    declared: Mapping[str, schema.Type],
) -> dict[str, schema.Type]:
    """The types columns are created with: never NULL; a value or struct field null in every
    row takes its declared type, else VARCHAR (DuckDB's full-scan detection calls such a key
    JSON). One query."""
    settled = _settle_all(con, stage, columns, _CREATE_GUESSES)
    return {n: schema.no_null(schema.fill_nulls(t, declared.get(n))) for n, t in settled.items()}


def _settle(con: duckdb.DuckDBPyConnection, source: str, name: str, t: schema.Type) -> schema.Type:
    return _settle_all(con, source, [(name, t)], _GUESSES)[name]


def _settle_all(
    con: duckdb.DuckDBPyConnection,
    source: str,
    columns: list[tuple[str, schema.Type]],
    guesses: frozenset[str],
) -> dict[str, schema.Type]:
    """Each type with NULL for the column / struct fields (not inside lists) that hold only
    NULLs in ``source``. Only a type that can be a guess (``guesses``) is counted, so big
    nested columns are not read; all counts in one aggregate query."""
    paths: list[tuple[str, tuple[str, ...]]] = []

    def walk(name: str, node: schema.Type, path: tuple[str, ...]) -> None:
        if isinstance(node, schema.Scalar) and node.text in guesses:
            paths.append((name, path))
        if isinstance(node, schema.Struct):
            for field_name, field_type in node.fields:
                walk(name, field_type, (*path, field_name))

    for name, t in columns:
        walk(name, t, ())
    if not paths:
        return dict(columns)
    exprs = []
    for name, path in paths:
        expr = quote_ident(name)
        for step in path:
            expr = f"struct_extract({expr}, {sql_literal(step)})"
        exprs.append(f"count({expr})")
    row = con.execute(f"SELECT {', '.join(exprs)} FROM {source}").fetchone() or ()
    empty = {p for p, n in zip(paths, row, strict=False) if not n}

    def rebuild(name: str, node: schema.Type, path: tuple[str, ...]) -> schema.Type:
        if (name, path) in empty:
            return schema.Scalar("NULL")
        if isinstance(node, schema.Struct):
            return schema.Struct(tuple((n, rebuild(name, f, (*path, n))) for n, f in node.fields))
        return node

    return {name: rebuild(name, t, ()) for name, t in columns}


def _key_match(left: str, right: str, keys: Sequence[str]) -> str:
    return " AND ".join(
        f"{left}.{quote_ident(k)} IS NOT DISTINCT FROM {right}.{quote_ident(k)}" for k in keys
    )


def _apply(
    con: duckdb.DuckDBPyConnection,
    kind: ExportKind,
    target: str,
    stage: str,
    partition_value: str | None,
    *,
    swap: bool = False,
) -> tuple[LoadResult, bool]:
    """Replace the rows of the export's scope with the staged ones; also whether the table now
    holds exactly the staged rows, unconverted (``load_parquet`` then names the files).

    With ``swap`` (``stage`` is a table of the kind's schema), a load that leaves nothing of the
    table's old rows renames the stage to the table instead of copying its rows."""
    added, changed = _ensure_table(con, kind, target, stage)
    pk = list(kind.primary_key)
    rows_in_export = _scalar(con, f"SELECT count(*) FROM {stage}")
    mode = kind.load_mode

    if mode is LoadMode.REPLACE_PARTITION:
        assert kind.partition_column is not None
        col = quote_ident(kind.partition_column)
        staged_cols = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {stage}").fetchall()}
        if kind.partition_column not in staged_cols:
            raise IntegrityError(
                f"export has no partition column {kind.partition_column!r}",
                provider=kind.provider,
                kind=kind.name,
            )
        strays = _scalar(
            con,
            f"SELECT count(*) FROM {stage} WHERE CAST({col} AS VARCHAR) IS DISTINCT FROM ?",
            [partition_value],
        )
        if strays:
            raise IntegrityError(
                f"{strays} row(s) of the export are outside partition "
                f"{kind.partition_column}={partition_value!r}",
                provider=kind.provider,
                kind=kind.name,
                code=PARTITION_MISMATCH,
                hint="the export belongs to another partition (a wrong export id for this "
                "partition, or the provider mixed jobs up); nothing was loaded",
            )
        scope = f"CAST({col} AS VARCHAR) = ?"
        scope_params: list[object] = [partition_value]
    elif mode is LoadMode.SNAPSHOT:
        scope, scope_params = "TRUE", []
    else:
        scope, scope_params = "", []

    # The table's rows afterwards are derived from what DELETE and INSERT report (their row
    # counts), not counted again; a step with nothing to do (an empty table) is skipped.
    before = _scalar(con, f"SELECT count(*) FROM {target}")
    whole_table = not before or mode is LoadMode.SNAPSHOT
    plan = _swap_plan(con, kind, stage) if swap and whole_table else None
    if plan is not None:
        # Nothing of the old table stays: the stage becomes the table (no copy of its rows).
        updated = 0
        if pk and before:
            updated = _scalar(
                con,
                f"SELECT count(*) FROM {stage} _stg WHERE EXISTS "
                f"(SELECT 1 FROM {target} _tgt WHERE {_key_match('_tgt', '_stg', pk)})",
            )
        statements, converted = plan
        for statement in statements:
            con.execute(statement)
        con.execute(f"DROP TABLE {target}")
        con.execute(f"ALTER TABLE {stage} RENAME TO {quote_ident(kind.name)}")
        result = LoadResult(
            rows_in_export=rows_in_export,
            rows_inserted=rows_in_export - updated,
            rows_updated=updated,
            rows_deleted=before - updated,
            table_rows=rows_in_export,
            columns_added=tuple(added),
            columns_changed=tuple(changed),
            renamed=True,
        )
        return result, not converted
    if mode is LoadMode.MERGE:
        updated = 0
        if before:
            updated = _scalar(
                con,
                f"SELECT count(*) FROM {stage} _stg WHERE EXISTS "
                f"(SELECT 1 FROM {target} _tgt WHERE {_key_match('_tgt', '_stg', pk)})",
            )
        removed = 0
        if updated:
            removed = _scalar(
                con,
                f"DELETE FROM {target} _tgt WHERE EXISTS "
                f"(SELECT 1 FROM {stage} _stg WHERE {_key_match('_tgt', '_stg', pk)})",
            )
        deleted = 0
    else:
        in_scope = before
        if before and mode is not LoadMode.SNAPSHOT:
            in_scope = _scalar(con, f"SELECT count(*) FROM {target} WHERE {scope}", scope_params)
        updated = 0
        if pk and in_scope:
            # Keys of the export that were in the scope before: "updated" (the others are
            # inserted, and the scope's rows whose keys the export lacks are deleted).
            updated = _scalar(
                con,
                f"SELECT count(*) FROM {stage} _stg WHERE EXISTS (SELECT 1 FROM "
                f"(SELECT * FROM {target} WHERE {scope}) _tgt "
                f"WHERE {_key_match('_tgt', '_stg', pk)})",
                scope_params,
            )
        deleted = in_scope - updated
        removed = 0
        if in_scope:
            removed = _scalar(con, f"DELETE FROM {target} WHERE {scope}", scope_params)

    insert, converted = _insert_sql(con, kind, target, stage)
    with one_thread(con):
        inserted = _scalar(con, insert)
    table_rows = before - removed + inserted
    result = LoadResult(
        rows_in_export=rows_in_export,
        rows_inserted=rows_in_export - updated,
        rows_updated=updated,
        rows_deleted=deleted,
        table_rows=table_rows,
        columns_added=tuple(added),
        columns_changed=tuple(changed),
    )
    return result, table_rows == inserted and not converted


def _swap_plan(
    con: duckdb.DuckDBPyConnection, kind: ExportKind, stage: str
) -> tuple[list[str], bool] | None:
    """How the staged table becomes the kind's table: the ALTERs converting its columns to the
    table's types where they differ (as the INSERT would convert them), and whether any value
    becomes JSON text. None when the columns differ in name or order (the table keeps a column
    this export lacks, say): then the rows are copied as usual."""
    have = _columns(con, kind.schema, kind.name)
    staged = [(r[0], r[1]) for r in con.execute(f"DESCRIBE {stage}").fetchall()]
    if list(have) != [name for name, _ in staged]:
        return None
    statements: list[str] = []
    converted = False
    for name, duck_type in staged:
        table_type = have[name]
        if table_type == duck_type:
            continue
        col = quote_ident(name)
        if "JSON" in table_type:
            using = schema.convert_sql(col, schema.parse(duck_type), schema.parse(table_type))
            converted = True
        else:
            using = f"CAST({col} AS {table_type})"
        statements.append(
            f"ALTER TABLE {stage} ALTER COLUMN {col} SET DATA TYPE {table_type} USING {using}"
        )
    return statements, converted


@contextlib.contextmanager
def one_thread(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Run the block with one DuckDB thread, then restore the connection's setting.

    For order-preserving writes of wide nested rows (the load's INSERT, the replica's COPY):
    with two threads DuckDB buffers out-of-order batches. Re-measured 2026-12-01 on the shared
    2-core machine (load average 4-10), INSERT + COMMIT into a new table, 400 MB cap, each
    alternated in fresh processes: 200,000 locations 1.5-1.6 s and 301 MB with one thread,
    1.45-2.2 s and 475-500 MB with two (2.0-2.3 s and 530 MB with two threads and
    ``preserve_insertion_order = false``); 1,000,000 Mews reservations 3.1-3.5 s and 510-560
    MB with one, 4.0-4.8 s and 625 MB with two (3.75 s and 580 MB unordered).
    """
    row = con.execute("SELECT current_setting('threads')").fetchone()
    con.execute("SET threads = 1")
    try:
        yield
    finally:
        with contextlib.suppress(duckdb.Error):
            con.execute(f"SET threads = {int(row[0]) if row else 1}")


def _insert_sql(
    con: duckdb.DuckDBPyConnection, kind: ExportKind, target: str, stage: str
) -> tuple[str, bool]:
    """INSERT of the staged columns by name; a value going into a column (or struct field, or
    list element) widened to JSON is converted with to_json (a plain cast would parse a VARCHAR
    as JSON text and fail): schema.convert_sql. Also whether any column is converted."""
    have = {n.lower(): t for n, t in _columns(con, kind.schema, kind.name).items()}
    names, exprs = [], []
    for name, duck_type, *_ in con.execute(f"DESCRIBE SELECT * FROM {stage}").fetchall():
        col = quote_ident(name)
        names.append(col)
        table_type = have.get(name.lower())  # DuckDB's names are case-insensitive
        if table_type and table_type != duck_type and "JSON" in table_type:
            exprs.append(schema.convert_sql(col, schema.parse(duck_type), schema.parse(table_type)))
        else:
            exprs.append(col)
    sql = f"INSERT INTO {target} ({', '.join(names)}) SELECT {', '.join(exprs)} FROM {stage}"
    return sql, exprs != names


def _load_empty(
    con: duckdb.DuckDBPyConnection,
    kind: ExportKind,
    target: str,
    partition_value: str | None,
) -> LoadResult:
    """A zero-row export: MERGE changes nothing; SNAPSHOT / partition replace empty their scope."""
    if not _table_exists(con, kind):
        return LoadResult(0, 0, 0, 0, 0)
    deleted = 0
    if kind.load_mode is LoadMode.SNAPSHOT:
        deleted = _scalar(con, f"SELECT count(*) FROM {target}")
        con.execute(f"DELETE FROM {target}")
    elif kind.load_mode is LoadMode.REPLACE_PARTITION:
        assert kind.partition_column is not None
        scope = f"CAST({quote_ident(kind.partition_column)} AS VARCHAR) = ?"
        deleted = _scalar(con, f"SELECT count(*) FROM {target} WHERE {scope}", [partition_value])
        con.execute(f"DELETE FROM {target} WHERE {scope}", [partition_value])
    return LoadResult(0, 0, 0, deleted, _scalar(con, f"SELECT count(*) FROM {target}"))
