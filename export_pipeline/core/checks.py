"""Compare what landed with what the provider announced. Plain SQL, no Dagster."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb

from export_pipeline.core.ledger import LEDGER_SCHEMA, ExportRecord, Ledger
from export_pipeline.core.model import ExportKind, LoadMode
from export_pipeline.core.sql import quote_ident


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def table_exists(con: duckdb.DuckDBPyConnection, kind: ExportKind) -> bool:
    row = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
        [kind.schema, kind.name],
    ).fetchone()
    return bool(row and row[0])


def _table(kind: ExportKind) -> str:
    return f"{quote_ident(kind.schema)}.{quote_ident(kind.name)}"


def last_loaded_export(
    con: duckdb.DuckDBPyConnection, ledger: Ledger, kind: ExportKind
) -> ExportRecord | None:
    """The kind's latest loaded export, whatever its partition (None: nothing loaded yet)."""
    row = con.execute(
        f"SELECT partition_key FROM {LEDGER_SCHEMA}.exports WHERE provider = ? AND kind = ? "
        "AND state = 'loaded' ORDER BY loaded_at DESC LIMIT 1",
        [kind.provider, kind.name],
    ).fetchone()
    return ledger.last_loaded(kind.provider, kind.name, row[0]) if row else None


def rows_match_provider(
    con: duckdb.DuckDBPyConnection, kind: ExportKind, record: ExportRecord | None
) -> CheckOutcome:
    """The last loaded export: rows read == provider's count, bytes == provider's sizes,
    and every row of it is in the table (for snapshots: the table is exactly that export)."""
    if record is None:
        return CheckOutcome(True, "nothing loaded yet", {})
    landed = con.execute(
        f"SELECT count(*) FROM {_table(kind)} WHERE _export_id = ?", [record.export_id]
    ).fetchone()[0]
    total = con.execute(f"SELECT count(*) FROM {_table(kind)}").fetchone()[0]
    files = con.execute(
        f"SELECT name, announced_bytes, size_bytes FROM {LEDGER_SCHEMA}.export_files "
        "WHERE provider = ? AND export_id = ? ORDER BY name",
        [kind.provider, record.export_id],
    ).fetchall()
    size_mismatches = [
        n for n, announced, got in files if announced is not None and announced != got
    ]
    problems = []
    if record.expected_rows is not None and record.rows_loaded != record.expected_rows:
        problems.append(
            f"read {record.rows_loaded} rows, provider announced {record.expected_rows}"
        )
    if size_mismatches:
        problems.append(f"size differs from announcement: {', '.join(size_mismatches)}")
    if kind.load_mode is LoadMode.SNAPSHOT and landed != total:
        problems.append(f"table holds {total} rows but only {landed} come from the snapshot")
    if record.rows_loaded is not None and landed > record.rows_loaded:
        problems.append(
            f"{landed} rows carry the export id but only {record.rows_loaded} were read"
        )
    metadata = {
        "export_id": record.export_id,
        "provider_rows": record.expected_rows,
        "rows_read": record.rows_loaded,
        "rows_in_table_from_export": landed,
        "table_rows": total,
        "files_checked": len(files),
    }
    metadata = {k: v for k, v in metadata.items() if v is not None}
    if problems:
        return CheckOutcome(False, "; ".join(problems), metadata)
    return CheckOutcome(True, "landed rows match the provider's announcement", metadata)


def primary_key_unique(con: duckdb.DuckDBPyConnection, kind: ExportKind) -> CheckOutcome:
    pk = ", ".join(quote_ident(c) for c in kind.primary_key)
    dupes = con.execute(
        f"SELECT count(*) FROM (SELECT {pk} FROM {_table(kind)} GROUP BY {pk} HAVING count(*) > 1)"
    ).fetchone()[0]
    nulls = con.execute(
        f"SELECT count(*) FROM {_table(kind)} WHERE "
        + " OR ".join(f"{quote_ident(c)} IS NULL" for c in kind.primary_key)
    ).fetchone()[0]
    ok = dupes == 0 and nulls == 0
    return CheckOutcome(
        ok,
        f"primary key ({', '.join(kind.primary_key)}) is unique"
        if ok
        else f"{dupes} duplicated keys, {nulls} rows with a NULL key",
        {"duplicated_keys": dupes, "null_keys": nulls},
    )


def values_in_range(con: duckdb.DuckDBPyConnection, kind: ExportKind) -> CheckOutcome:
    """Values outside their declared range. A NULL is out of range only where the kind declares
    the column NOT NULL (``kind.not_null`` or the primary key): an optional field left empty is
    not a bad value. A column the table does not have (the provider's files lack it) is
    reported, not counted."""
    bad: dict[str, int] = {}
    absent: list[str] = []
    have = {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = ? AND table_name = ?",
            [kind.schema, kind.name],
        ).fetchall()
    }
    required = set(kind.not_null) | set(kind.primary_key)
    for column, (low, high) in kind.value_ranges.items():
        if column not in have:
            absent.append(column)
            if column in required:
                bad[column] = 1
            continue
        col = quote_ident(column)
        null_fails = f" OR {col} IS NULL" if column in required else ""
        bad[column] = con.execute(
            f"SELECT count(*) FROM {_table(kind)} WHERE {col} < ? OR {col} > ?{null_fails}",
            [low, high],
        ).fetchone()[0]
    ok = not any(bad.values())
    ranges = ", ".join(f"{c} in [{lo}, {hi}]" for c, (lo, hi) in kind.value_ranges.items())
    metadata: dict[str, Any] = {f"out_of_range_{c}": n for c, n in bad.items()}
    if absent:
        metadata["columns_absent"] = ", ".join(absent)
    return CheckOutcome(
        ok,
        ranges if ok else f"out of range: {bad} (expected {ranges})",
        metadata,
    )


def empty_partitions(con: duckdb.DuckDBPyConnection, kind: ExportKind) -> CheckOutcome:
    """Partitions whose latest load brought zero rows (e.g. a mapping job with no results)."""
    rows = con.execute(
        f"SELECT partition_key FROM {LEDGER_SCHEMA}.exports e WHERE provider = ? AND kind = ? "
        "AND state = 'loaded' AND partition_key <> '' AND loaded_at = (SELECT max(loaded_at) "
        f"FROM {LEDGER_SCHEMA}.exports x WHERE x.provider = e.provider AND x.kind = e.kind "
        "AND x.partition_key = e.partition_key AND x.state = 'loaded') "
        "AND coalesce(rows_loaded, 0) = 0",
        [kind.provider, kind.name],
    ).fetchall()
    empty = [r[0] for r in rows]
    return CheckOutcome(
        not empty,
        "every partition has rows"
        if not empty
        else f"partitions with zero rows: {', '.join(empty)}",
        {"empty_partitions": len(empty)},
    )
