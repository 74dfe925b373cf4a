"""One asset per export kind, built by a factory from the provider registry."""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import duckdb
from pydantic import Field

from export_pipeline.core.errors import ExportPipelineError, ExportTimeoutError
from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.ingest import ExportRunner, IngestResult
from export_pipeline.core.ledger import Ledger
from export_pipeline.core.load import ensure_views
from export_pipeline.core.model import ExportKind, ExportRequest, ExportState
from export_pipeline.core.preview import preview_markdown
from export_pipeline.core.windows import IncrementalSettings, parse_iso, request_for
from export_pipeline.defs.freshness import freshness_policy
from export_pipeline.providers.base import ExportProvider
from export_pipeline.providers.column_docs import apply_comments, column_docs, view_docs

EXPORT_TAG = "export_pipeline/export_id"
TRIGGER_TAG = "export_pipeline/trigger"


class ExportConfig(dg.Config):
    """Run config of every export asset. Empty config = request the next export and load it."""

    export_id: str | None = Field(
        None, description="Ingest this existing export instead of requesting a new one."
    )
    format: str | None = Field(
        None, description="File format to request where the API lets you choose (e.g. json, csv)."
    )
    full_refresh: bool = Field(False, description="Ignore the cursor and request everything.")
    modified_since: str | None = Field(
        None, description="ISO 8601 UTC start of the request (default: cursor minus overlap)."
    )
    window_end: str | None = Field(None, description="ISO 8601 UTC end, for time-window APIs.")
    wait_timeout_seconds: float | None = Field(
        None, description="How long to wait for the export (default: sync_settings)."
    )


@dataclass(frozen=True)
class ProviderBinding:
    """Dagster-side facts about one provider: its class (what it declares) and resource key."""

    provider: type[ExportProvider]
    resource_key: str

    @classmethod
    def of(cls, provider: type[ExportProvider]) -> "ProviderBinding":
        return cls(provider=provider, resource_key=f"{provider.name}_api")

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def kinds(self) -> tuple[ExportKind, ...]:
        return self.provider.kinds


def partitions_def(kind: ExportKind) -> dg.DynamicPartitionsDefinition | None:
    """Kinds whose rows belong to user-named units (mapping jobs) get dynamic partitions."""
    return dg.DynamicPartitionsDefinition(name=kind.partitions) if kind.partitions else None


def asset_key(kind: ExportKind) -> dg.AssetKey:
    return dg.AssetKey([kind.provider, kind.name])


def op_name(kind: ExportKind) -> str:
    return f"{kind.provider}__{kind.name}"


def make_runner(
    resources: Any,
    binding: ProviderBinding,
    *,
    lock_timeout: float | None = None,
    retry: RetryPolicy | None = None,
    logger: logging.Logger | None = None,
    owner: str | None = None,
) -> ExportRunner:
    """Provider client + ledger + storage from the resources of a run, sensor or schedule."""
    settings = resources.sync_settings
    provider: ExportProvider = getattr(resources, binding.resource_key).build(
        retry=retry or settings.retry()
    )
    warehouse = resources.warehouse
    runner = ExportRunner(
        provider,
        warehouse.ledger(lock_timeout=lock_timeout),
        warehouse.storage_backend(getattr(resources, "s3", None)),
        settings.ingest(),
        logger=logger,
        owner=owner,
    )
    return runner


class _RunLogHandler(logging.Handler):
    """Forwards a record of the project's Python loggers to the run's own logger."""

    def __init__(self, run_log: logging.Logger) -> None:
        super().__init__(logging.INFO)
        self.run_log = run_log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run_log.log(record.levelno, f"[{record.name}] {record.getMessage()}")
        except Exception:  # a log line must never fail the step
            self.handleError(record)


@contextmanager
def run_log_bridge(run_log: logging.Logger) -> Iterator[None]:
    """While a step runs, what the library logs to Python ``logging`` (HTTP and download
    retries with their reason, waits for the warehouse lock naming the holder) also appears in
    the run's event log, where an operator watches the run. The runner itself logs straight to
    the run's logger."""
    root = logging.getLogger("export_pipeline")
    handler = _RunLogHandler(run_log)
    level = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def request_from_config(
    kind: ExportKind,
    config: ExportConfig,
    runner: ExportRunner,
    incremental: IncrementalSettings,
    partition_key: str | None,
) -> ExportRequest | None:
    """The run config in the core's terms (``core.windows.request_for``)."""
    return request_for(
        kind,
        runner.ledger,
        now=datetime.now(UTC),
        settings=incremental,
        modified_since=parse_iso(config.modified_since),
        window_end=parse_iso(config.window_end),
        params={"format": config.format} if config.format else None,
        partition=partition_key,
        full_refresh=config.full_refresh,
    )


def to_dagster_error(
    exc: ExportPipelineError,
    *,
    retry_seconds: float = 30.0,
    max_retries: int = 3,
    ledger: Ledger | None = None,
) -> Exception:
    """Typed errors become a clear Failure; transient ones ask Dagster to retry the step.

    A retry waits ``retry_seconds`` and there are at most ``max_retries`` of them, so an
    export held by another client (Mews' one-in-flight rule) costs a handful of requests, not a
    storm; once they are used up the step fails with the typed error as its cause.
    """
    metadata = {
        k: v
        for k, v in {
            "provider": exc.provider,
            "kind": exc.kind,
            "export_id": exc.export_id,
            "file": exc.file,
            "line": exc.line,
            "code": exc.code,
            "request_id": exc.request_id,
            "hint": exc.hint,
        }.items()
        if v is not None
    }
    if ledger is not None and exc.provider and exc.export_id:
        metadata.update(_ledger_facts(ledger, exc.provider, exc.export_id))
    if exc.retryable and not isinstance(exc, ExportTimeoutError):
        return dg.RetryRequested(max_retries=max_retries, seconds_to_wait=retry_seconds)
    return dg.Failure(description=str(exc), metadata=metadata, allow_retries=False)


def _ledger_facts(ledger: Ledger, provider: str, export_id: str) -> dict[str, Any]:
    """What the ledger now says of a failed export: shown on the failed step in the UI."""
    try:
        record = ledger.get(provider, export_id)
    except ExportPipelineError:
        return {}  # the warehouse is busy: the error itself still says what happened
    if record is None:
        return {}
    facts: dict[str, Any] = {
        "export_state": record.state.value,
        "permanent_failures": record.permanent_failures,
    }
    if record.state is ExportState.FAILED:
        facts["failure_reason"] = f"{record.error_code}: {record.error_message}"
        facts["next_run"] = "requests a new export"
    return facts


def build_export_asset(kind: ExportKind, binding: ProviderBinding) -> dg.AssetsDefinition:

    @dg.asset(
        key=asset_key(kind),
        name=None,
        group_name=kind.provider,
        description=kind.description or f"{kind.key} export loaded into {kind.table}",
        kinds={"duckdb", "parquet"},
        partitions_def=partitions_def(kind),
        freshness_policy=freshness_policy(kind),
        required_resource_keys={"warehouse", "sync_settings", "s3", binding.resource_key},
        metadata={
            "dagster/table_name": f"warehouse.{kind.table}",
            "primary_key": ", ".join(kind.primary_key),
            "load_mode": kind.load_mode.value,
            "incremental": kind.incremental.value,
            "dagster/column_schema": declared_schema(column_docs(kind)),
        },
        tags={"provider": kind.provider},
        op_tags={"export_pipeline/kind": kind.key},
    )
    def _export_asset(
        context: dg.AssetExecutionContext, config: ExportConfig
    ) -> dg.MaterializeResult:
        partition_key = context.partition_key if context.has_partition_key else None
        runner = make_runner(
            context.resources, binding, logger=context.log, owner=context.run.run_id
        )
        settings = context.resources.sync_settings
        with run_log_bridge(context.log):
            try:
                if config.export_id:
                    result = runner.ingest(
                        kind, config.export_id, partition_key=partition_key or "", source="config"
                    )
                else:
                    request = request_from_config(
                        kind, config, runner, settings.incremental(), partition_key
                    )
                    if request is None:
                        context.log.info("no new time window yet; nothing to request")
                        return dg.MaterializeResult(metadata={"skipped": "no new window"})
                    source = context.run.tags.get(TRIGGER_TAG, "run")
                    # Ask for (or adopt) this kind's export first: an error is reported by this
                    # step, before the run's other exports are asked for.
                    # A full refresh never adopts an open export (it may be the bad one).
                    _, adopted = runner.start(
                        kind, request, source=source, adopt=not config.full_refresh
                    )
                    request_run_siblings(context, binding, kind, runner)
                    result = runner.sync(
                        kind, request, source=source, timeout=config.wait_timeout_seconds
                    )
                    result = replace(result, adopted=adopted)
            except ExportPipelineError as exc:
                context.log.error(str(exc))
                error = to_dagster_error(
                    exc,
                    retry_seconds=settings.step_retry_seconds,
                    max_retries=settings.step_max_retries,
                    ledger=runner.ledger,
                )
                if not isinstance(error, dg.RetryRequested) or (
                    context.retry_number >= settings.step_max_retries
                ):  # the step fails for good: its planned checks judge the unchanged table
                    from export_pipeline.defs.checks import judge_planned_checks  # (cycle)

                    judge_planned_checks(context, kind)
                raise error from exc
            finally:
                runner.provider.close()
        if result.skipped:
            context.log.info(f"export {result.export_id} was already loaded; nothing changed")
        if result.missing_columns:
            context.log.warning(
                f"declared column(s) not in the export's files, not loaded: "
                f"{', '.join(result.missing_columns)}"
            )
        if result.drifted_columns:
            context.log.warning(
                "value(s) did not fit the declared type, kept as: "
                + ", ".join(f"{n} {t}" for n, t in result.drifted_columns)
            )
        if result.load is not None:
            write_comments(runner, kind, context.log)
        table_rows = result.load.table_rows if result.load is not None else None
        if table_rows is None:
            table_rows = count_table_rows(runner, kind)
        return dg.MaterializeResult(metadata=result_metadata(result, kind, table_rows=table_rows))

    return _export_asset


def request_run_siblings(
    context: dg.AssetExecutionContext,
    binding: ProviderBinding,
    kind: ExportKind,
    runner: ExportRunner,
) -> None:
    """Ask for the exports of the run's other kinds of this provider now, so the provider
    produces them while this step waits for its own.

    Steps run one after another in one process (the in-process executor: a process per step
    costs more than a small sync), so without this a 9-kind Mews run would wait for 9 exports
    in turn. Each later step adopts its open export from the ledger, as a restarted run does.
    Only the run's first export step does this; an export that cannot be asked for now is left
    to its own step (which reports the error).
    """
    selected = set(context.run.asset_selection or context.job_def.asset_layer.selected_asset_keys)
    siblings = [
        k
        for k in binding.kinds
        if asset_key(k) in selected and not k.partitions and asset_key(kind) != asset_key(k)
    ]
    if not siblings:
        return
    started = {
        record.step_key
        for record in context.instance.all_logs(
            context.run.run_id, of_type=dg.DagsterEventType.STEP_START
        )
    }
    if started & {op_name(k) for k in siblings}:
        return  # not the run's first export step: the others were asked for (or run alongside)
    ops = (context.run.run_config or {}).get("ops", {})
    settings = context.resources.sync_settings
    for other in siblings:
        raw = (ops.get(op_name(other)) or {}).get("config") or {}
        try:
            config = ExportConfig(**raw)
            if config.export_id:
                continue
            request = request_from_config(other, config, runner, settings.incremental(), None)
            if request is not None:
                runner.start(other, request, source=context.run.tags.get(TRIGGER_TAG, "run"))
        except ExportPipelineError as exc:
            context.log.warning(f"{other.key}: not requested ahead ({exc}); its own step will")
            return


def declared_schema(columns: list[tuple[str, str, str]]) -> dg.TableSchema:
    """The column schema shown before the first run: the providers' declarations in words."""
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name=n, type=(t or "view column")[:200], description=d or None)
            for n, t, d in columns
        ]
    )


def write_comments(runner: ExportRunner, kind: ExportKind, log: logging.Logger) -> None:
    """Descriptions as DuckDB COMMENTs after a load (kept out of the load transaction: they are
    documentation, and a busy warehouse must not fail a load that already committed)."""
    try:
        # One transaction: on DuckLake one snapshot, taken in turn with other writers.
        with runner.ledger.warehouse.transaction() as con:
            apply_comments(con, kind)
    except (duckdb.Error, ExportPipelineError) as exc:
        log.warning(f"column comments on {kind.table} not written ({exc}); the next load will")


def build_view_asset(kind: ExportKind, view: str) -> dg.AssetsDefinition:
    """An analyst view (e.g. ``locations.evses``) as an asset downstream of its table: the
    graph shows the lineage, and materializing it (re)creates the view and reports its rows."""

    @dg.asset(
        key=dg.AssetKey([kind.provider, view]),
        group_name=kind.provider,
        description=f"View {kind.schema}.{view} over {kind.table}:\n\n```sql\n"
        f"{kind.views[view]}\n```",
        kinds={"duckdb"},
        deps=[asset_key(kind)],
        freshness_policy=freshness_policy(kind),
        required_resource_keys={"warehouse"},
        metadata={
            "dagster/table_name": f"warehouse.{kind.schema}.{view}",
            "dagster/column_schema": declared_schema(view_docs(kind, view)),
        },
        tags={"provider": kind.provider},
    )
    def _view_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        # One transaction: on DuckLake one snapshot, taken in turn with other writers.
        with context.resources.warehouse.warehouse().transaction() as con:
            ensure_views(con, kind)
            apply_comments(con, kind)
            rows = con.execute(f"SELECT count(*) FROM {kind.schema}.{view}").fetchone()[0]
        return dg.MaterializeResult(metadata={"dagster/row_count": dg.MetadataValue.int(rows)})

    return _view_asset


def count_table_rows(runner: ExportRunner, kind: ExportKind) -> int | None:
    """Rows in the kind's table now, or None when it cannot be read (no table, lock held)."""
    try:
        with runner.ledger.warehouse.connect() as con:
            return int(con.execute(f"SELECT count(*) FROM {kind.table}").fetchone()[0])
    except (duckdb.Error, ExportPipelineError):
        return None


def result_metadata(
    result: IngestResult, kind: ExportKind, *, table_rows: int | None = None
) -> dict[str, Any]:
    """``dagster/row_count`` (the asset header's "Row count") is the table's rows; ``rows`` is
    what this export brought."""
    md: dict[str, Any] = {
        "export_id": result.export_id,
        "rows": dg.MetadataValue.int(result.rows),
        "skipped_already_loaded": result.skipped,
        "adopted_open_export": result.adopted,
        "table": kind.table,
    }
    if table_rows is not None:
        md["dagster/row_count"] = dg.MetadataValue.int(table_rows)
    if result.waited_for:
        md["waited_for_run"] = result.waited_for
    if result.skipped:
        return md
    md.update(
        {
            "bytes": dg.MetadataValue.int(result.bytes_downloaded),
            "duration_seconds": dg.MetadataValue.float(round(result.seconds, 3)),
            "files": ", ".join(result.files),
            "format": ", ".join(result.formats),
            "expected_rows": result.expected_rows,
            "parquet_path": dg.MetadataValue.path(result.parquet_uri or ""),
            "raw_path": dg.MetadataValue.path(result.raw_uri or ""),
            "cursor": result.cursor.isoformat() if result.cursor else None,
            "reused_raw_files": ", ".join(result.reused_files) or None,
            # DuckLake: the snapshot of this load; `AT (VERSION => n)` reads the table as of it.
            "lake_snapshot_id": result.snapshot_id,
        }
    )
    if result.requested is not None and result.requested.modified_since is not None:
        md["requested_since"] = result.requested.modified_since.isoformat()
    if result.requested is not None and result.requested.window_end is not None:
        md["requested_until"] = result.requested.window_end.isoformat()
    if result.load is not None:
        md.update(
            {
                "rows_inserted": dg.MetadataValue.int(result.load.rows_inserted),
                "rows_updated": dg.MetadataValue.int(result.load.rows_updated),
                "rows_deleted": dg.MetadataValue.int(result.load.rows_deleted),
                "table_rows": dg.MetadataValue.int(result.load.table_rows),
                # Schema evolution of this load (docs/schema.md): always present, maybe empty.
                "columns_added": ", ".join(result.load.columns_added),
                "columns_changed": "; ".join(result.load.columns_changed),
            }
        )
    if result.missing_columns:
        md["columns_missing"] = ", ".join(result.missing_columns)
    if result.drifted_columns:
        md["columns_drifted"] = ", ".join(f"{n} as {t}" for n, t in result.drifted_columns)
    if result.columns:
        md["dagster/column_schema"] = dg.TableSchema(
            columns=[dg.TableColumn(name=n, type=t[:200]) for n, t in result.columns]
        )
    if result.parquet_paths:
        md["preview"] = dg.MetadataValue.md(preview_markdown(result.parquet_paths[0]))
    return {k: v for k, v in md.items() if v is not None}
