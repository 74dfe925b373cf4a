"""A reader process for the read-path tests and benchmark: it polls the published replica."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from export_pipeline.core.replica import open_replica


def poll_replica(read_dir: str, interval: float, stop: Any, out: Any) -> None:
    """Open the replica read-only, count the locations, close; every ``interval`` seconds until
    ``stop``. Reports (queries, errors, distinct counts seen)."""
    queries = 0
    errors: list[str] = []
    counts: set[int] = set()
    out.put("started")
    while not stop.is_set():
        try:
            con = open_replica(Path(read_dir))
            try:
                counts.add(con.execute("SELECT count(*) FROM locations.locations").fetchone()[0])
                con.execute("SELECT count(*) FROM locations.connectors").fetchone()
                con.execute("SELECT count(*) FROM pipeline.exports").fetchone()
            finally:
                con.close()
            queries += 1
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
        time.sleep(interval)
    out.put((queries, errors[:5], sorted(counts)))
