"""Fixtures shared by every test folder: the loopback-only guard, warehouses of each backend,
the sandbox providers. No Dagster here: the Dagster setup is ``dagster/conftest.py``'s."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from export_pipeline.core.warehouse import (
    BACKENDS,
    DuckDBWarehouse,
    DuckLakeWarehouse,
    Warehouse,
    close_lakes,
)
from export_pipeline.sandbox.bundle import SIMULATORS, Sandbox, start_sandbox
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
def simulators() -> tuple[str, ...]:
    """The simulators ``sandbox`` starts. A test module about one API overrides this fixture
    with just what it talks to, so its tests start nothing else."""
    return SIMULATORS


@pytest.fixture
def sandbox(shared_s3: S3Server, simulators: tuple[str, ...]) -> Iterator[Sandbox]:
    """Fresh simulators on loopback (``simulators``; one shared S3 server)."""
    with start_sandbox(n_locations=300, s3=shared_s3, only=simulators) as sb:
        if "locations" in simulators:
            sb.locations.ready_after_seconds = 0.2
        yield sb
