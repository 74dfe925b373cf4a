"""Freshness policies: every asset (a kind's table and its views) is expected to materialize
within a window derived from its schedule. Dagster's daemon (``FreshnessDaemon``, on by default
under ``dagster dev`` / ``export-pipeline dev``) evaluates them from the event log and shows each
asset's freshness (pass / warn / fail) in the UI; nothing here reads a provider or the warehouse.
"""

from datetime import timedelta

import dagster as dg

from export_pipeline.core.model import ExportKind, Incremental

# (warn, fail) per schedule: one missed tick warns, two fail.
FRESHNESS_BY_CRON = {
    "hourly": (timedelta(minutes=90), timedelta(hours=2)),
    "daily": (timedelta(hours=25), timedelta(hours=26)),
}
# Kinds without a schedule (mapping jobs, run on demand): fail after a month without a load.
UNSCHEDULED_FRESHNESS = timedelta(days=30)


def is_scheduled(kind: ExportKind) -> bool:
    """Partitioned kinds (mapping jobs) are materialized on demand, per partition."""
    return not kind.partitions


def freshness_windows(kind: ExportKind) -> tuple[timedelta | None, timedelta]:
    """(warn, fail) windows of the kind's assets."""
    if not is_scheduled(kind):
        return None, UNSCHEDULED_FRESHNESS
    return FRESHNESS_BY_CRON["daily" if kind.incremental is Incremental.NONE else "hourly"]


def freshness_policy(kind: ExportKind) -> dg.FreshnessPolicy:
    warn, fail = freshness_windows(kind)
    return dg.FreshnessPolicy.time_window(fail_window=fail, warn_window=warn)
