"""Fixtures shared by every test folder: the sandbox providers and a Dagster setup on them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from export_pipeline.definitions import build_defs, default_resources
from export_pipeline.defs.resources import SyncSettingsResource, WarehouseResource
from export_pipeline.sandbox.bundle import Sandbox, start_sandbox
from export_pipeline.sandbox.s3 import S3Server


@pytest.fixture(scope="session")
def shared_s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def sandbox(shared_s3: S3Server) -> Iterator[Sandbox]:
    """Fresh simulators of all four APIs on loopback (one shared S3 server)."""
    with start_sandbox(n_locations=300, s3=shared_s3) as sb:
        sb.locations.ready_after_seconds = 0.2
        yield sb


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


@pytest.fixture
def dagster_setup(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DagsterSetup]:
    """The project's real Definitions, pointed at the sandbox through environment variables,
    with the warehouse on disk under tmp_path and a real (temporary) Dagster instance."""
    for key, value in sandbox.env().items():
        monkeypatch.setenv(key, value)
    data_dir = tmp_path / "data"
    warehouse_path = data_dir / "warehouse.duckdb"
    resources = default_resources()
    resources["warehouse"] = WarehouseResource(
        path=str(warehouse_path), data_dir=str(data_dir), lock_timeout_seconds=30
    )
    resources["sync_settings"] = SyncSettingsResource(
        poll_initial_seconds=0.05,
        poll_max_seconds=0.5,
        wait_timeout_seconds=60,
        http_base_delay_seconds=0.01,
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
