"""Retention of the local file tiers: raw downloads, failed-export evidence, the S3 read-back
cache. No Dagster here; ``defs/retention.py`` runs :func:`clean` on a schedule.

What is kept, whatever the settings: every file of an export the ledger still has open
(pending, processing, ready: a run or the sensor may still need it), files of exports the ledger
does not know (a run that is just starting records its export before writing), and the Parquet
of loaded exports on local storage (it is the warehouse's rebuild source).

Ages are the directory's last modification time, so an export written or retried recently is
young whatever its ledger row says.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from export_pipeline.core.ledger import LEDGER_SCHEMA, Ledger
from export_pipeline.core.model import OPEN_STATES, ExportState

log = logging.getLogger(__name__)

PUBLISHED_SUFFIX = ".published"  # S3 read-back of an export's Parquet (core/ingest.py)
_DAY = 86_400.0


@dataclass(frozen=True)
class RetentionSettings:
    """``None`` keeps that tier forever."""

    raw_days: float | None = 14.0  # raw files of LOADED exports
    failed_days: float | None = 30.0  # raw + Parquet of FAILED / EXPIRED / LOST exports
    cache_hours: float | None = 24.0  # S3 read-back copies, and local copies of S3-stored tiers
    # A DuckLake warehouse's snapshots (time travel) older than this are expired and the files
    # only they named deleted, after its small files are merged; None leaves the lake alone.
    lake_snapshot_days: float | None = None
    dry_run: bool = False


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    kept_open: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def _export_dirs(root: Path, tier: str) -> Iterator[tuple[str, str, str, Path]]:
    """``(provider, kind, export_id, dir)`` under ``root/tier/<provider>/<kind>/``."""
    base = root / tier
    if not base.is_dir():
        return
    for provider in sorted(p for p in base.iterdir() if p.is_dir()):
        for kind in sorted(k for k in provider.iterdir() if k.is_dir()):
            for export in sorted(e for e in kind.iterdir() if e.is_dir()):
                export_id = export.name.removesuffix(PUBLISHED_SUFFIX)
                yield provider.name, kind.name, export_id, export


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _age(path: Path, now: float) -> float:
    newest = max([path.stat().st_mtime, *(f.stat().st_mtime for f in path.rglob("*"))])
    return now - newest


def clean(
    root: Path,
    ledger: Ledger,
    settings: RetentionSettings,
    *,
    remote_storage: bool = False,
    now: float | None = None,
) -> CleanupReport:
    """Remove what the settings say may go under ``root`` (the local data or cache directory).

    ``remote_storage``: the durable tiers live in S3, so every local copy of a finished export is
    cache (``cache_hours``); on local storage the Parquet of loaded exports is always kept.
    """
    now = time.time() if now is None else now
    with ledger.warehouse.connect() as con:
        states = {
            (p, e): ExportState(s)
            for p, e, s in con.execute(
                f"SELECT provider, export_id, state FROM {LEDGER_SCHEMA}.exports"
            ).fetchall()
        }
    report = CleanupReport()
    for tier in ("raw", "parquet"):
        for provider, kind, export_id, path in _export_dirs(root, tier):
            state = states.get((provider, export_id))
            label = f"{tier}/{provider}/{kind}/{path.name}"
            if state is None or state in OPEN_STATES:
                report.kept_open.append(label)
                continue
            limit = _limit(tier, state, path, settings, remote_storage)
            if limit is None or _age(path, now) < limit:
                continue
            report.bytes_freed += _size(path)
            report.removed.append(label)
            if not settings.dry_run:
                shutil.rmtree(path, ignore_errors=True)
            log.info("retention: removed %s (%s export)", label, state)
    return report


def _limit(
    tier: str, state: ExportState, path: Path, settings: RetentionSettings, remote: bool
) -> float | None:
    """Seconds after which ``path`` may go, or None to keep it."""

    def days(value: float | None) -> float | None:
        return None if value is None else value * _DAY

    cache = None if settings.cache_hours is None else settings.cache_hours * 3600.0
    if path.name.endswith(PUBLISHED_SUFFIX):
        return cache
    if state is not ExportState.LOADED:
        return days(settings.failed_days)
    if remote:
        return cache
    return days(settings.raw_days) if tier == "raw" else None
