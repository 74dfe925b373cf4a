"""Packaging: a production install (``pip install .``) has no simulator or test tool in it.

The bundled simulators need ``moto[server]``, ``starlette`` and ``uvicorn`` (the ``sandbox``
extra; the webhook receiver needs the last two, the ``webhooks`` extra). The definitions, a
real sync run and the CLI's production commands must work without them: a child process that
cannot import them proves it (the packages are installed here, so they are blocked on the
import path rather than uninstalled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from export_pipeline.sandbox.bundle import Sandbox

ROOT = Path(__file__).resolve().parent.parent
SANDBOX_ONLY = ("moto", "starlette", "uvicorn", "werkzeug", "flask")

# Installed first in the child: any import of a sandbox-only package fails, as it would in a
# production install.
BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class _Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {SANDBOX_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

    sys.meta_path.insert(0, _Blocked())
    """
)


def requirement_names(requirements: list[str]) -> set[str]:
    return {r.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requirements}


def test_sandbox_packages_are_extras_not_runtime_dependencies() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = requirement_names(project["dependencies"])
    extras = {k: requirement_names(v) for k, v in project["optional-dependencies"].items()}
    assert not runtime & {"moto", "starlette", "uvicorn", "standardwebhooks"}
    assert {"moto", "starlette", "uvicorn"} <= extras["sandbox"]
    assert {"starlette", "uvicorn"} <= extras["webhooks"]
    assert extras["sandbox"] | extras["webhooks"] <= extras["dev"]  # .ci/run installs dev


def run_child(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_definitions_and_a_sync_run_without_the_sandbox_packages(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    env = {**os.environ, **sandbox.env(), "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    code = f"""
        import dagster as dg
        from export_pipeline.definitions import build_defs, default_resources
        from export_pipeline.defs.resources import SyncSettingsResource, WarehouseResource

        resources = default_resources()
        resources["warehouse"] = WarehouseResource(
            path={str(tmp_path / "warehouse.duckdb")!r}, data_dir={str(tmp_path / "data")!r}
        )
        resources["sync_settings"] = SyncSettingsResource(
            poll_initial_seconds=0.05, allowed_download_hosts={sandbox.allowed_download_hosts()!r}
        )
        with dg.instance_for_test() as instance:
            defs = build_defs(resources)
            result = defs.resolve_job_def("locations_sync").execute_in_process(instance=instance)
            assert result.success
            rows = result.asset_materializations_for_node("locations__locations")[0]
            print("rows", rows.metadata["rows"].value)
        for name in {SANDBOX_ONLY!r}:
            assert name not in sys.modules, name
        print("clean")
    """
    child = run_child(code, env, tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    assert f"rows {sandbox.locations.count_rows()}" in child.stdout
    assert child.stdout.rstrip().endswith("clean")


def test_sandbox_commands_name_the_extra_they_need(tmp_path: Path) -> None:
    code = """
        from export_pipeline.cli import main
        raise SystemExit(main(sys.argv[1:]))
    """
    for argv, extra in (
        (["sandbox", "serve", "--random-ports"], "sandbox"),
        (["demo", "--data-dir", str(tmp_path / "d")], "sandbox"),
        (["webhooks", "serve", "--port", "0"], "webhooks"),
    ):
        child = subprocess.run(
            [sys.executable, "-c", BLOCKER + textwrap.dedent(code), *argv],
            env={**os.environ, "EXPORT_PIPELINE_WEBHOOK_TOKEN": "t" * 32},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == 2, (argv, child.stderr[-2000:])
        assert f"pip install 'export_pipeline[{extra}]'" in child.stderr, argv


def test_dg_serves_the_project_from_its_pyproject() -> None:
    """[tool.dg] makes the repo a `dg` project: `dg check defs` and `dg list defs` load the
    project's definitions (the `dagster` CLI's "superseded" notice is gone with it)."""
    dg_cli = Path(sys.executable).with_name("dg")
    env = {**os.environ, "PATH": f"{dg_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def dg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(dg_cli), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
        )

    check = dg("check", "defs")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    listed = dg("list", "defs", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    defs = json.loads(listed.stdout)
    assets = {a["asset_key"] for a in defs["assets"]}
    assert {"locations/locations", "mews/reservation", "stripe/balance_change_from_activity"} <= (
        assets
    )
    assert "data_checks_sensor" in {s["name"] for s in defs["sensors"]}
    assert {"mews_sync", "locations_sync"} <= {j["name"] for j in defs["jobs"]}


def test_dev_runs_dg_dev_as_a_project_or_with_a_workspace_file(tmp_path: Path) -> None:
    from export_pipeline.cli import dg_dev_command, is_dg_project

    assert is_dg_project(ROOT)
    assert not is_dg_project(tmp_path)
    cwd = Path.cwd()
    try:
        os.chdir(ROOT)  # the repo: dg reads [tool.dg.project]
        cmd = dg_dev_command(tmp_path, "127.0.0.1", 4000)
        assert Path(cmd[0]).name == "dg" and cmd[1:] == ["dev", "-h", "127.0.0.1", "-p", "4000"]
        os.chdir(tmp_path)  # elsewhere (an installed package): the same code location by file
        cmd = dg_dev_command(tmp_path, "127.0.0.1", 4000)
        assert cmd[-2:] == ["-w", str(tmp_path / "workspace.yaml")]
        assert "location_name: export_pipeline" in (tmp_path / "workspace.yaml").read_text()
    finally:
        os.chdir(cwd)
