"""The one ``dagster.Definitions`` of the project. Loads offline: no network, no secret read,
no file created at import (secrets are ``dg.EnvVar``s, resolved when a run starts)."""

from __future__ import annotations

import dagster as dg

from export_pipeline.defs.assets import ProviderBinding, build_export_asset, build_view_asset
from export_pipeline.defs.checks import build_checks, build_checks_sensor
from export_pipeline.defs.resources import (
    LazyS3Resource,
    SyncSettingsResource,
    WarehouseResource,
    WebhookEventsResource,
)
from export_pipeline.defs.schedules import (
    RetentionResource,
    build_schedule,
    build_sync_job,
    retention_job,
    retention_schedule,
)
from export_pipeline.defs.sensors import (
    FailureAlertsResource,
    build_export_sensor,
    build_release_claims_sensor,
    run_failure_alerts,
)
from export_pipeline.defs.spec_resources import spec_resources
from export_pipeline.providers.registry import PROVIDERS

BINDINGS = tuple(ProviderBinding.of(cls) for cls in PROVIDERS)


def build_defs(resources: dict[str, object] | None = None) -> dg.Definitions:
    assets, checks, sensors, schedules, jobs = [], [], [], [], []
    for binding in BINDINGS:
        for kind in binding.kinds:
            assets.append(build_export_asset(kind, binding))
            assets.extend(build_view_asset(kind, view) for view in kind.views)
            checks.extend(build_checks(kind))
        sensors.append(build_export_sensor(binding))
        job = build_sync_job(binding)
        if job is not None:
            jobs.append(job)
            schedules.append(build_schedule(binding, job))
    sensors.append(build_checks_sensor(checks))  # the data checks, after each materialization
    sensors.append(run_failure_alerts)
    jobs.append(retention_job)
    schedules.append(retention_schedule)
    sensors.append(build_release_claims_sensor())
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        sensors=sensors,
        schedules=schedules,
        jobs=jobs,
        # Also for runs launched from an asset's Materialize button (see build_sync_job).
        executor=dg.in_process_executor,
        resources=resources if resources is not None else default_resources(),
    )


def default_resources() -> dict[str, object]:
    """Provider URLs and secrets come from the environment (``dg.EnvVar``, read when a run
    starts). Without them the definitions still load; a run fails naming the missing variable.
    ``export-pipeline dev`` and ``demo`` set them for the bundled sandbox."""
    return {
        # Every provider: one generic resource class, its variables named by its spec.
        **spec_resources(PROVIDERS),
        "warehouse": WarehouseResource(),
        "sync_settings": SyncSettingsResource(),
        "webhook_events": WebhookEventsResource(),
        "failure_alerts": FailureAlertsResource(),
        "retention": RetentionResource(),
        "s3": LazyS3Resource(),
    }


defs = build_defs()
