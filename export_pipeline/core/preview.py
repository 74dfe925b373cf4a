"""A glance at loaded data: the first rows of a Parquet file as a markdown table (shown with
each materialization). DuckDB reads only those rows."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd


def preview_markdown(parquet_path: Path, rows: int = 5, width: int = 60) -> str:
    """First rows of the Parquet as a markdown table, long values cut to ``width``."""
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")  # timestamps as stored, not in the machine's zone
        cur = con.execute(
            f"SELECT * EXCLUDE (_export_id, _source_file, _loaded_at) "
            f"FROM read_parquet(?) LIMIT {int(rows)}",
            [str(parquet_path)],
        )
        df = pd.DataFrame(cur.fetchall(), columns=[d[0] for d in cur.description])
    df = df.map(lambda v: s if len(s := str(v)) <= width else s[: width - 1] + "…")
    return df.to_markdown(index=False)
