"""``ExportApiComponent``: an asynchronous-export API added with a ``defs.yaml``.

Its attributes are the provider spec (``providers/spec.py``) plus where things land. It builds
what the registry builds for a shipped provider, with the same factories (``defs/``): one asset
and its checks per kind, the exports sensor, the sync job and schedule, and the API resource
whose secrets are ``dg.EnvVar``s of the variables the spec names (read when a run starts, never
at load; see ``defs/spec_resources.py``).

.. code-block:: yaml

    type: export_pipeline.components.ExportApiComponent
    attributes:
      spec: {name: stripe, ...}        # the mapping of providers/stripe.yaml
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

from export_pipeline.defs.assets import ProviderBinding, build_export_asset
from export_pipeline.defs.checks import build_checks, build_checks_sensor
from export_pipeline.defs.resources import (
    LazyS3Resource,
    SyncSettingsResource,
    WarehouseResource,
    WebhookEventsResource,
)
from export_pipeline.defs.schedules import build_schedule, build_sync_job
from export_pipeline.defs.sensors import build_export_sensor
from export_pipeline.defs.spec_resources import SpecApiResource
from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.spec import ExportApiSpec


class ExportApiComponent(dg.Component, dg.Model, dg.Resolvable):
    """An asynchronous bulk-export API described by a spec: request, poll, download, load."""

    spec: ExportApiSpec = Field(description="The API: calls, answers, states, errors, kinds.")
    base_url: str | None = Field(None, description="API origin instead of spec.base_url.")
    files_base_url: str | None = Field(
        None, description="File host instead of spec.download.files_base_url."
    )
    shared_resources: bool = Field(
        True,
        description="Also define warehouse, sync_settings, webhook_events and s3 (turn off when "
        "another part of the project defines them).",
    )
    warehouse_path: str = Field("data/warehouse.duckdb", description="The DuckDB file.")
    data_dir: str = Field("data", description="Root of data/raw and data/parquet.")
    sync_settings: dict[str, Any] = Field(
        default_factory=dict, description="SyncSettingsResource fields, e.g. wait_timeout_seconds."
    )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        provider_class = SpecProvider.for_spec(self.spec)
        binding = ProviderBinding.of(provider_class)
        assets, checks = [], []
        for kind, kind_spec in zip(binding.kinds, self.spec.kinds, strict=True):
            schema = dg.TableSchema(
                columns=[
                    dg.TableColumn(name, column.type, description=column.description or None)
                    for name, column in kind_spec.columns.items()
                ]
            )
            asset = build_export_asset(kind, binding)
            if kind_spec.columns:
                asset = asset.map_asset_specs(
                    lambda spec, s=schema: spec.merge_attributes(
                        metadata={"dagster/column_schema": s}
                    )
                )
            assets.append(asset)
            checks.extend(build_checks(kind))
        job = build_sync_job(binding)
        resources: dict[str, Any] = {
            # The secrets: the variables the spec names, as dg.EnvVars (read when a run starts).
            binding.resource_key: SpecApiResource.from_env(
                provider_class, base_url=self.base_url, files_base_url=self.files_base_url
            )
        }
        if self.shared_resources:
            resources |= {
                "warehouse": WarehouseResource(path=self.warehouse_path, data_dir=self.data_dir),
                "sync_settings": SyncSettingsResource(**self.sync_settings),
                "webhook_events": WebhookEventsResource(
                    path=f"{self.data_dir}/webhook_events.sqlite3"
                ),
                "s3": LazyS3Resource(),  # no boto3 client unless storage is s3://
            }
        return dg.Definitions(
            assets=assets,
            asset_checks=checks,
            sensors=[
                build_export_sensor(binding),
                build_checks_sensor(checks, name=f"{binding.name}_data_checks_sensor"),
            ],
            jobs=[job] if job is not None else [],
            schedules=[build_schedule(binding, job)] if job is not None else [],
            resources=resources,
        )
