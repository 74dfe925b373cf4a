"""Fixtures shared by every test folder: the sandbox providers and a Dagster setup on them."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from export_pipeline.core.warehouse import (
    BACKENDS,
    DuckDBWarehouse,
    DuckLakeWarehouse,
    Warehouse,
    close_lakes,
)
from export_pipeline.definitions import build_defs, default_resources
from export_pipeline.defs.resources import SyncSettingsResource, WarehouseResource
from export_pipeline.sandbox.bundle import Sandbox, start_sandbox
from export_pipeline.sandbox.s3 import S3Server

# -- loopback-only guard ------------------------------------------------------------------
# Every test, and every Python process a test starts, may only connect to loopback (and resolve
# no name but localhost). See _netguard/sitecustomize.py; docs/security.md lists what it covers.
_GUARD_DIR = Path(__file__).parent / "_netguard"
_spec = importlib.util.spec_from_file_location(
    "export_pipeline_netguard", _GUARD_DIR / "sitecustomize.py"
)
assert _spec is not None and _spec.loader is not None
netguard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netguard)


def pytest_configure(config: pytest.Config) -> None:
    netguard.install()
    # Children: the guard folder first on PYTHONPATH (as sitecustomize), refusals to a log file.
    log = Path(tempfile.gettempdir()) / f"export-pipeline-netguard-{os.getpid()}.log"
    log.write_text("")
    os.environ[netguard.ENV_FLAG] = "1"
    os.environ[netguard.ENV_LOG] = str(log)
    os.environ[netguard.ENV_PARENT] = str(os.getpid())
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_GUARD_DIR), os.environ.get("PYTHONPATH", "")) if p
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    log = os.environ.get(netguard.ENV_LOG)
    if log and os.environ.get(netguard.ENV_PARENT) == str(os.getpid()):
        Path(log).unlink(missing_ok=True)


def guarded_pythonpath(*paths: str | Path) -> str:
    """A PYTHONPATH for a child process that keeps the network guard (put it in ``env``)."""
    return os.pathsep.join([str(_GUARD_DIR), *(str(p) for p in paths)])


@pytest.fixture(autouse=True)
def _loopback_only() -> Iterator[None]:
    """Fail the test that tried to reach anything but loopback, even if the error was caught."""
    log = Path(os.environ[netguard.ENV_LOG])
    before_in_process = len(netguard.ATTEMPTS)
    before_children = log.stat().st_size if log.exists() else 0
    yield
    attempts = netguard.ATTEMPTS[before_in_process:]
    if log.exists() and log.stat().st_size > before_children:
        with log.open(encoding="utf-8") as f:
            f.seek(before_children)
            attempts += [f"child process: {line}" for line in f.read().splitlines()]
    if attempts:
        pytest.fail(
            "this test tried to reach something other than loopback:\n" + "\n".join(attempts),
            pytrace=False,
        )


def open_warehouse(backend: str, root: Path, *, lock_timeout: float = 30.0) -> Warehouse:
    """A warehouse of that backend under ``root``: the DuckDB file, or a lake (SQLite catalog,
    local data files) as ``WarehouseResource(backend="ducklake")`` lays it out."""
    if backend == "duckdb":
        return DuckDBWarehouse(root / "warehouse.duckdb", lock_timeout=lock_timeout)
    return DuckLakeWarehouse(
        str(root / "lake" / "catalog.sqlite"),
        str(root / "lake" / "files"),
        lock_timeout=lock_timeout,
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each backend in turn: the embedded DuckDB file and a DuckLake lake. Tests that take
    this fixture (directly or through ``dagster_setup``) run against both."""
    yield request.param
    close_lakes()  # detach the test's lakes (each process otherwise keeps them attached)


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
        providers' variables (Stripe's, which the sandbox does not serve) need not be set."""
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
