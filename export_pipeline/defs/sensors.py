"""One sensor per provider: the core's track step (``core/track.py``: absorb pushed events,
poll open exports in batches within a time budget), then one run per ready export with
``run_key = provider:export_id`` so an export is never launched twice.
"""

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
from pydantic import Field

from export_pipeline.core.errors import ExportPipelineError, WarehouseBusyError
from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.ingest import POISON_BUDGET
from export_pipeline.core.model import ExportKind
from export_pipeline.core.track import MAX_EXPORTS_PER_PASS, track
from export_pipeline.defs.assets import (
    EXPORT_TAG,
    TRIGGER_TAG,
    ExportConfig,
    ProviderBinding,
    asset_key,
    make_runner,
    op_name,
)

# Dagster stops a sensor evaluation after 60 s by default; keep well inside it.
TICK_BUDGET_SECONDS = 30.0
MAX_EXPORTS_PER_TICK = MAX_EXPORTS_PER_PASS
# Failed ingests of a ready export are relaunched by the sensor up to this many attempts.
# The same number as the poison budget: an export that used it up is retired (FAILED) and
# never relaunched, so the sensor's last attempt is the one that retires it.
MAX_INGEST_ATTEMPTS = POISON_BUDGET
# A run may hold the warehouse while it loads; a sensor tick waits only briefly, then skips.
SENSOR_LOCK_TIMEOUT = 5.0
# A tick must not spend its budget backing off: one quick retry, then the next tick.
SENSOR_RETRY = RetryPolicy(max_attempts=2, base_delay=0.5, max_delay=2.0, max_retry_after=5.0)


def run_key_for(provider: str, export_id: str, attempts: int = 0) -> str:
    """``provider:export_id``; after a failed ingest the key gains the attempt number, so the
    sensor relaunches it (Dagster never relaunches a run key it has seen) a bounded number
    of times."""
    base = f"{provider}:{export_id}"
    return base if attempts == 0 else f"{base}:attempt-{attempts + 1}"


def run_request_for(
    kind: ExportKind, export_id: str, partition_key: str, trigger: str, attempts: int = 0
):
    return dg.RunRequest(
        run_key=run_key_for(kind.provider, export_id, attempts),
        asset_selection=[asset_key(kind)],
        partition_key=partition_key or None,
        run_config=dg.RunConfig(ops={op_name(kind): ExportConfig(export_id=export_id)}),
        tags={EXPORT_TAG: export_id, TRIGGER_TAG: trigger},
    )


def build_export_sensor(binding: ProviderBinding) -> dg.SensorDefinition:
    kinds = {k.name: k for k in binding.kinds}

    @dg.sensor(
        name=f"{binding.name}_exports_sensor",
        description=(
            f"Polls open {binding.name} exports (and pushed webhook events) and launches one "
            "ingest run per ready export."
        ),
        minimum_interval_seconds=30,
        asset_selection=[asset_key(k) for k in binding.kinds],
        required_resource_keys={
            "warehouse",
            "sync_settings",
            "s3",
            "webhook_events",
            binding.resource_key,
        },
        default_status=dg.DefaultSensorStatus.STOPPED,
    )
    def _sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        runner = make_runner(
            context.resources, binding, lock_timeout=SENSOR_LOCK_TIMEOUT, retry=SENSOR_RETRY
        )
        store = _event_store(context.resources.webhook_events.path)
        try:
            seen = track(
                runner,
                store,
                budget_seconds=TICK_BUDGET_SECONDS,
                max_exports=MAX_EXPORTS_PER_TICK,
                logger=context.log,
            )
        except WarehouseBusyError:
            return dg.SkipReason("warehouse is busy with a load; trying again next tick")
        except ExportPipelineError as exc:
            return dg.SkipReason(f"could not poll {binding.name}: {exc}")
        finally:
            runner.provider.close()
        ready, pushed = seen.ready, seen.pushed
        requests = [
            run_request_for(
                kinds[r.kind],
                r.export_id,
                r.partition_key,
                "webhook" if r.export_id in pushed else "sensor",
                r.attempts,
            )
            for r in ready
            if r.attempts < MAX_INGEST_ATTEMPTS
        ]
        for r in ready:
            if r.attempts >= MAX_INGEST_ATTEMPTS:
                context.log.warning(
                    f"{binding.name} export {r.export_id} failed {r.attempts} ingests "
                    f"(last: {r.error_code}: {r.error_message}); not relaunched — run it "
                    "by hand with config export_id once the cause is fixed"
                )
        dynamic = []
        partitioned = [k.partitions for k in binding.kinds if k.partitions]
        if seen.new_partitions and partitioned:
            dynamic.append(
                dg.AddDynamicPartitionsRequest(
                    partitions_def_name=partitioned[0],
                    partition_keys=sorted(set(seen.new_partitions)),
                )
            )
        context.log.info(
            f"{seen.open} open, {seen.polled} polled in {seen.calls} calls, "
            f"{len(requests)} ready to ingest"
        )
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=dynamic or None,
            cursor=f"open={seen.open} polled={seen.polled} calls={seen.calls} "
            f"launched={len(requests)}",
        )

    return _sensor


def _event_store(path: str):
    if not Path(path).exists():
        return None
    from export_pipeline.webhooks.store import EventStore

    return EventStore(Path(path))


class FailureAlertsResource(dg.ConfigurableResource):
    """Where the run-failure sensor records failures, and where it may post them."""

    path: str = Field("data/run_failures.jsonl", description="One JSON line per failed run.")
    url_env: str = Field(
        "EXPORT_PIPELINE_ALERT_URL",
        description="Environment variable holding the URL to POST each failure to (JSON); "
        "unset = record only. Read when the sensor runs (URLs with tokens are secrets).",
    )
    timeout_seconds: float = 10.0

    def record(self, failure: Mapping[str, Any]) -> bool:
        """Append the failure; post it when a URL is configured. True when it was posted."""
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(failure, default=str) + "\n")
        url = os.environ.get(self.url_env, "").strip()
        if not url:
            return False
        response = httpx.post(url, json=failure, timeout=self.timeout_seconds)
        response.raise_for_status()
        return True


@dg.run_failure_sensor(
    name="run_failure_alerts",
    description="Records every failed run (data/run_failures.jsonl) and posts it to "
    "$EXPORT_PIPELINE_ALERT_URL when set. On by default: it only reads the run.",
    default_status=dg.DefaultSensorStatus.RUNNING,
    monitor_all_code_locations=False,
)
def run_failure_alerts(
    context: dg.RunFailureSensorContext, failure_alerts: FailureAlertsResource
) -> None:
    run = context.dagster_run
    failure = {
        "run_id": run.run_id,
        "job": run.job_name,
        "status": str(run.status.value),
        "message": context.failure_event.message,
        "steps_failed": sorted(
            {e.step_key for e in context.get_step_failure_events() if e.step_key}
        ),
        "tags": {k: v for k, v in run.tags.items() if not k.startswith("dagster/")},
        "at": datetime.now(UTC).isoformat(),
    }
    posted = failure_alerts.record(failure)
    context.log.info(f"recorded failure of run {run.run_id}{' and posted it' if posted else ''}")


RELEASE_CLAIMS_SENSOR = "release_claims_of_failed_runs"


def build_release_claims_sensor() -> dg.SensorDefinition:
    """Free the exports a failed run held (its ledger leases), as soon as Dagster marks it
    failed: also a run whose process was killed, which run monitoring fails (dagster.yaml).
    The lease would lapse by itself; this only makes the export available at once."""

    from export_pipeline.defs.resources import WarehouseResource

    @dg.run_failure_sensor(
        name=RELEASE_CLAIMS_SENSOR,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
    )
    def _release(context: dg.RunFailureSensorContext, warehouse: WarehouseResource) -> None:
        ledger = warehouse.ledger(lock_timeout=SENSOR_LOCK_TIMEOUT)
        for provider, export_id in ledger.release_run(context.dagster_run.run_id):
            context.log.info(
                f"released {provider} export {export_id} held by failed run "
                f"{context.dagster_run.run_id}"
            )

    return _release
