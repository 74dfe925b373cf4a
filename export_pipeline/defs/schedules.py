"""A sync job and a schedule per provider. The window each run asks for is computed here from
the ledger's cursor (the provider's own timestamp of the last *loaded* export) and put in the
run config, so a user can see in the run exactly what was requested."""

from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from export_pipeline.core.errors import WarehouseBusyError
from export_pipeline.core.model import ExportKind, Incremental
from export_pipeline.core.retention import RetentionSettings, clean
from export_pipeline.core.warehouse import DuckLakeWarehouse
from export_pipeline.core.windows import due_requests
from export_pipeline.defs.assets import (
    TRIGGER_TAG,
    ExportConfig,
    ProviderBinding,
    asset_key,
    op_name,
)
from export_pipeline.defs.freshness import is_scheduled
from export_pipeline.defs.sensors import SENSOR_LOCK_TIMEOUT

# Full snapshots (Mews) are heavy: daily. Incremental pulls are cheap: hourly.
DEFAULT_CRON = {Incremental.NONE: "0 3 * * *"}
INCREMENTAL_CRON = "15 * * * *"


def scheduled_kinds(binding: ProviderBinding) -> list[ExportKind]:
    return [k for k in binding.kinds if is_scheduled(k)]


def with_views(kind: ExportKind) -> list[dg.AssetKey]:
    """The kind's asset and its views' assets (refreshed in the same run, after the table)."""
    return [asset_key(kind), *(dg.AssetKey([kind.provider, v]) for v in kind.views)]


def build_sync_job(binding: ProviderBinding) -> Any:
    kinds = scheduled_kinds(binding)
    if not kinds:
        return None
    return dg.define_asset_job(
        name=f"{binding.name}_sync",
        # No checks: a check planned in a run that fails (one kind's load) shows "Execution
        # failed". data_checks_sensor runs each kind's checks after its materialization.
        selection=dg.AssetSelection.assets(
            *[k for kind in kinds for k in with_views(kind)]
        ).without_checks(),
        description=f"Request, wait for and load every {binding.name} export kind.",
        tags={"provider": binding.name},
        # One process for all steps: a step is seconds of work, a process per step (Dagster's
        # default) costs more to start than a small sync takes. Steps keep their own retries
        # and metadata; loads take turns on the DuckDB file anyway.
        executor_def=dg.in_process_executor,
    )


def build_schedule(binding: ProviderBinding, job: Any) -> dg.ScheduleDefinition:
    kinds = scheduled_kinds(binding)
    incremental = any(k.incremental is not Incremental.NONE for k in kinds)
    cron = INCREMENTAL_CRON if incremental else DEFAULT_CRON[Incremental.NONE]

    @dg.schedule(
        name=f"{binding.name}_schedule",
        cron_schedule=cron,
        job=job,
        execution_timezone="UTC",
        description=(
            f"Incremental {binding.name} pull from the cursor of the last loaded export."
            if incremental
            else f"Full {binding.name} snapshot of every export kind."
        ),
        required_resource_keys={"warehouse", "sync_settings"},
        default_status=dg.DefaultScheduleStatus.STOPPED,
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        ledger = context.resources.warehouse.ledger(lock_timeout=SENSOR_LOCK_TIMEOUT)
        settings = context.resources.sync_settings.incremental()
        now = context.scheduled_execution_time
        ops: dict[str, ExportConfig] = {}
        windows: list[str] = []
        try:
            due = due_requests(kinds, ledger, now=now, settings=settings)
        except WarehouseBusyError:
            return dg.SkipReason("warehouse is busy with a load; the next tick will catch up")
        for kind, request in due.items():
            # Pass the computed window explicitly: the run asks for exactly this.
            ops[op_name(kind)] = ExportConfig(
                modified_since=request.modified_since.isoformat()
                if request.modified_since
                else None,
                window_end=request.window_end.isoformat() if request.window_end else None,
                full_refresh=request.modified_since is None
                and kind.incremental is not Incremental.NONE,
            )
            since = request.modified_since
            windows.append(f"{kind.name}:{since.isoformat() if since else 'full'}")
        if not ops:
            return dg.SkipReason("no kind has a new window yet")
        return dg.RunRequest(
            run_key=f"{binding.name}:{now.isoformat()}",
            run_config=dg.RunConfig(ops=ops),
            asset_selection=[k for kind in kinds if op_name(kind) in ops for k in with_views(kind)],
            asset_check_keys=[],  # the checks run after the loads (data_checks_sensor)
            tags={TRIGGER_TAG: "schedule", "export_pipeline/windows": ",".join(windows)[:250]},
        )

    return _schedule


class RetentionResource(dg.ConfigurableResource):
    """How long the local file tiers are kept (``None``/null = forever). See docs/retention.md."""

    raw_days: float | None = Field(14.0, description="Raw files of loaded exports.")
    failed_days: float | None = Field(
        30.0, description="Raw files and Parquet of failed, expired or lost exports (evidence)."
    )
    cache_hours: float | None = Field(
        24.0, description="S3 read-back copies (and local copies when storage is s3://)."
    )
    lake_snapshot_days: float | None = Field(
        None,
        ge=0,
        description="DuckLake warehouse only: merge its small files, expire the snapshots older "
        "than this (time travel reaches back this far, no further) and delete the files only "
        "they named. Null: the lake is left alone and every export stays reachable.",
    )
    dry_run: bool = Field(False, description="Report what would go; remove nothing.")

    def settings(self) -> RetentionSettings:
        return RetentionSettings(
            raw_days=self.raw_days,
            failed_days=self.failed_days,
            cache_hours=self.cache_hours,
            lake_snapshot_days=self.lake_snapshot_days,
            dry_run=self.dry_run,
        )


@dg.op(
    name="retention_cleanup",
    description="Remove raw files, failed-export evidence and cached copies past their "
    "retention; never what an open export still needs. With lake_snapshot_days, also merge a "
    "DuckLake warehouse's small files and expire its snapshots past that window.",
    required_resource_keys={"warehouse", "retention"},
)
def retention_cleanup(context: dg.OpExecutionContext) -> dg.Output[None]:
    warehouse = context.resources.warehouse
    remote = warehouse.storage.startswith("s3://")
    root = Path(warehouse.data_dir) / "cache" if remote else Path(warehouse.data_dir)
    settings = context.resources.retention.settings()
    report = clean(root, warehouse.ledger(), settings, remote_storage=remote)
    for label in report.removed:
        context.log.info(f"removed {label}")
    context.log.info(
        f"retention: removed {len(report.removed)} export directories "
        f"({report.bytes_freed:,} bytes); kept {len(report.kept_open)} of open exports"
    )
    metadata: dict[str, Any] = {
        "removed": dg.MetadataValue.int(len(report.removed)),
        "bytes_freed": dg.MetadataValue.int(report.bytes_freed),
        "kept_open": dg.MetadataValue.int(len(report.kept_open)),
        "dry_run": settings.dry_run,
    }
    days = settings.lake_snapshot_days
    # The warehouse is built only when there is a lake to maintain.
    if days is not None and isinstance(lake := warehouse.warehouse(), DuckLakeWarehouse):
        done = lake.maintain(timedelta(days=days), dry_run=settings.dry_run)
        verb = "would be" if settings.dry_run else "were"
        context.log.info(
            f"lake: {done.data_files_before} data files before merging, "
            f"{done.data_files_after} after; {done.snapshots_expired} snapshots older than "
            f"{days:g} days {verb} expired and {done.files_deleted} files {verb} deleted"
        )
        metadata |= {
            "lake_data_files": dg.MetadataValue.int(done.data_files_after),
            "lake_snapshots_expired": dg.MetadataValue.int(done.snapshots_expired),
            "lake_files_deleted": dg.MetadataValue.int(done.files_deleted),
        }
    return dg.Output(None, metadata=metadata)


@dg.job(name="retention_job", description="Apply the retention settings to data/ (see docs).")
def retention_job() -> None:
    retention_cleanup()


retention_schedule = dg.ScheduleDefinition(
    name="retention_schedule",
    job=retention_job,
    cron_schedule="30 4 * * *",
    execution_timezone="UTC",
    description="Daily cleanup of raw files, failed-export evidence and the S3 read-back cache.",
    # Off until turned on: deleting files is a decision (defaults: docs/retention.md).
    default_status=dg.DefaultScheduleStatus.STOPPED,
)
