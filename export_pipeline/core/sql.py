"""Quoting for SQL text that cannot take parameters (identifiers, and literals inside view
definitions and table-function options)."""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """Quote a DuckDB identifier (doubling inner quotes), so any column name is safe in SQL."""
    return '"' + name.replace('"', '""') + '"'


def sql_literal(value: str) -> str:
    """A SQL string literal (doubling inner quotes)."""
    return "'" + value.replace("'", "''") + "'"
