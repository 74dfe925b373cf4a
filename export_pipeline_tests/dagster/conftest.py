"""The Dagster layer's setup: the project's real Definitions on the sandbox providers, with a
real (temporary) Dagster instance."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from export_pipeline.core.warehouse import close_lakes
from export_pipeline.definitions import build_defs, default_resources
from export_pipeline.defs.resources import SyncSettingsResource, WarehouseResource
from export_pipeline.sandbox.bundle import Sandbox


@dataclass
class DagsterSetup:
    sandbox: Sandbox
    resources: dict[str, object]
    defs: dg.Definitions
    warehouse_path: Path
    data_dir: Path
    instance: dg.DagsterInstance

    def job(self, name: str) -> dg.JobDefinition:
        return self.defs.resolve_job_def(name)

    def asset(self, key: str) -> dg.AssetsDefinition:
        return self.defs.resolve_assets_def(dg.AssetKey(key.split("/")))

    def run_checks(self, after: dg.ExecuteInProcessResult) -> dg.ExecuteInProcessResult:
        """The data checks of the assets ``after`` materialized, in a run of their own, as
        ``data_checks_sensor`` launches them (sync runs plan no checks). test_health drives the
        sensor's automation condition itself."""
        materialized = {e.asset_key for e in after.all_events if e.is_step_materialization}
        graph = self.defs.get_repository_def().asset_graph
        keys = {
            k
            for k in graph.asset_check_keys
            if k.asset_key in materialized and graph.get(k).automation_condition is not None
        }
        job = self.defs.resolve_implicit_global_asset_job_def()
        return job.get_subset(asset_selection=set(), asset_check_selection=keys).execute_in_process(
            instance=self.instance
        )

    def for_provider(self, name: str) -> dict[str, object]:
        """The resources without the other providers' ``<name>_api``: what Dagster builds for
        a run, sensor or schedule of this provider (only what they require), so the other
        providers' variables (those of simulators the test did not start) need not be set."""
        return {
            key: value
            for key, value in self.resources.items()
            if not key.endswith("_api") or key == f"{name}_api"
        }


@pytest.fixture
def warehouse_backend() -> str:
    """The backend ``dagster_setup`` uses: the default file; a test that parametrizes
    ``warehouse_backend`` (or asks for ``backend``-driven setups) runs on the lake too."""
    return "duckdb"


@pytest.fixture
def dagster_setup(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warehouse_backend: str
) -> Iterator[DagsterSetup]:
    """The project's real Definitions, pointed at the sandbox through environment variables,
    with the warehouse on disk under tmp_path and a real (temporary) Dagster instance."""
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    data_dir = tmp_path / "data"
    warehouse_path = data_dir / "warehouse.duckdb"
    resources = default_resources()
    resources["warehouse"] = WarehouseResource(
        backend=warehouse_backend,
        path=str(warehouse_path),
        lake_catalog=str(data_dir / "lake" / "catalog.sqlite"),
        lake_data_path=str(data_dir / "lake" / "files"),
        data_dir=str(data_dir),
        lock_timeout_seconds=30,
    )
    resources["sync_settings"] = SyncSettingsResource(
        poll_initial_seconds=0.05,
        poll_max_seconds=0.5,
        wait_timeout_seconds=60,
        http_base_delay_seconds=0.01,
        allowed_download_hosts=sandbox.allowed_download_hosts(),
    )
    from export_pipeline.defs.resources import WebhookEventsResource

    resources["webhook_events"] = WebhookEventsResource(path=str(data_dir / "events.sqlite3"))
    with dg.instance_for_test() as instance:
        yield DagsterSetup(
            sandbox=sandbox,
            resources=resources,
            defs=build_defs(resources),
            warehouse_path=warehouse_path,
            data_dir=data_dir,
            instance=instance,
        )
    close_lakes()
