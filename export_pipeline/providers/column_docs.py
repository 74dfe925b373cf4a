"""What each column means, per export kind and analyst view: the providers' declarations in
words. Assets show them as their column schema before the first run, the load writes them as
DuckDB ``COMMENT``s, and ``docs/tables.md`` is generated from them (``python -m
export_pipeline.providers.column_docs > docs/tables.md``; a test keeps it current).

Every column a kind declares (``ExportKind.columns``) is described in its provider's spec
(``columns: {name: {type, description}}``, views: ``views: {name: {sql, columns}}``); a test
checks.
Declared columns are type hints: the columns a kind does not declare (nested Mews objects, say)
arrive as the provider sends them, typed from the data.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Any

from export_pipeline.core.model import ExportKind
from export_pipeline.core.sql import sql_literal

LINEAGE: Mapping[str, tuple[str, str]] = {
    "_export_id": ("VARCHAR", "Provider's id of the export this row was last loaded from."),
    "_source_file": ("VARCHAR", "File of that export the row came from."),
    "_loaded_at": ("TIMESTAMPTZ", "When the row was loaded into the warehouse (UTC)."),
}


@functools.cache
def _spec_docs() -> dict[str, dict[str, str]]:
    """Descriptions declared in the specs of spec-run providers (``columns: {c: {...}}``)."""
    from export_pipeline.providers.registry import PROVIDERS

    out: dict[str, dict[str, str]] = {}
    for cls in PROVIDERS:
        spec = getattr(cls, "spec", None)
        for k in getattr(spec, "kinds", ()):
            out[f"{spec.name}/{k.name}"] = {c: col.description for c, col in k.columns.items()}
            for view, v in k.views.items():  # a view's name is unique in its provider's schema
                out[f"{spec.name}/{view}"] = dict(v.columns)
    return out


def column_docs(kind: ExportKind) -> list[tuple[str, str, str]]:
    """``(name, type, description)`` of the kind's table, lineage columns last."""
    docs = _spec_docs().get(kind.key, {})
    names = list(kind.columns or docs)
    cols = [
        (n, (kind.columns or {}).get(n, "detected from the data"), docs.get(n, "")) for n in names
    ]
    return cols + [(n, t, d) for n, (t, d) in LINEAGE.items()]


def view_docs(kind: ExportKind, view: str) -> list[tuple[str, str, str]]:
    """``(name, type, description)`` of one of the kind's analyst views (types follow the
    table's)."""
    docs = _spec_docs().get(f"{kind.provider}/{view}", {})
    return [(n, "", d) for n, d in docs.items()]


def apply_comments(con: Any, kind: ExportKind) -> int:
    """Write the descriptions as DuckDB ``COMMENT``s on the kind's table, its views and their
    columns (those that exist). Returns how many were written."""
    # Only what differs is written: on DuckLake every COMMENT is catalog change (a snapshot).
    database = con.execute("SELECT current_database()").fetchone()[0]
    existing = {
        (t, c): comment
        for t, c, comment in con.execute(
            "SELECT table_name, column_name, comment FROM duckdb_columns() "
            "WHERE schema_name = ? AND database_name = ?",
            [kind.schema, database],
        ).fetchall()
    }
    described = dict(
        con.execute(
            "SELECT table_name, comment FROM duckdb_tables() WHERE schema_name = ? "
            "AND database_name = ? UNION ALL SELECT view_name, comment FROM duckdb_views() "
            "WHERE schema_name = ? AND database_name = ?",
            [kind.schema, database, kind.schema, database],
        ).fetchall()
    )
    # DuckLake (1.4) keeps no comments on a view's columns ("it is not a table").
    lake = (
        con.execute(
            "SELECT type FROM duckdb_databases() WHERE database_name = ?", [database]
        ).fetchone()[0]
        == "ducklake"
    )
    done = 0
    targets = [(kind.name, "TABLE", kind.description, column_docs(kind))]
    targets += [
        (view, "VIEW", f"View over {kind.table}.", view_docs(kind, view)) for view in kind.views
    ]
    for name, what, description, columns in targets:
        if not any(t == name for t, _ in existing):
            continue
        qualified = f'"{kind.schema}"."{name}"'
        if (described.get(name) or "") != (description or ""):
            con.execute(f"COMMENT ON {what} {qualified} IS {sql_literal(description)}")
            done += 1
        if what == "VIEW" and lake:
            continue
        for column, _, text in columns:
            if text and (name, column) in existing and existing[(name, column)] != text:
                con.execute(f'COMMENT ON COLUMN {qualified}."{column}" IS {sql_literal(text)}')
                done += 1
    return done


def tables_markdown() -> str:
    """``docs/tables.md``: every table and view with its columns, from the declarations."""
    from export_pipeline.providers.registry import PROVIDERS

    out = [
        "# Tables",
        "",
        "Generated from the providers' specs (`export_pipeline/providers/<name>.yaml`) by",
        "`python -m export_pipeline.providers.column_docs > docs/tables.md` (a test keeps it",
        "current). The same descriptions are the assets' column schema in the Dagster UI and",
        "the tables' DuckDB `COMMENT`s (`SELECT * FROM duckdb_columns()`).",
    ]
    for provider in PROVIDERS:
        for kind in provider.kinds:
            out += ["", f"## `{kind.table}`", "", kind.description, ""]
            out += [
                f"Asset `{kind.key}`; primary key ({', '.join(kind.primary_key)}); "
                f"load mode `{kind.load_mode.value}`.",
                "",
                "| column | type | description |",
                "|---|---|---|",
            ]
            out += [f"| `{n}` | {t} | {d} |" for n, t, d in column_docs(kind)]
            for view in kind.views:
                out += ["", f"### view `{kind.schema}.{view}` (from `{kind.table}`)", ""]
                out += ["| column | description |", "|---|---|"]
                out += [f"| `{n}` | {d} |" for n, _, d in view_docs(kind, view)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(tables_markdown())
