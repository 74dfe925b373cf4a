"""A user adds Stripe with a defs.yaml: Dagster's own component loading builds the assets,
checks, sensor, job and schedule from the spec, and the job loads the simulator's report."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

import export_pipeline.providers.stripe as stripe_module
from export_pipeline.sandbox.stripe import StripeSandbox

SPEC_PATH = Path(stripe_module.__file__).with_name("stripe.yaml")


def make_project(root: Path, attributes: dict) -> str:
    """A minimal dg project: dg.toml, src/<module>/defs/stripe/defs.yaml."""
    module = f"acme_{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "dg.toml").write_text(
        textwrap.dedent(f"""
            directory_type = "project"

            [project]
            root_module = "{module}"
            registry_modules = ["export_pipeline.components"]
        """)
    )
    defs = root / "src" / module / "defs" / "stripe"
    defs.mkdir(parents=True)
    (root / "src" / module / "__init__.py").write_text("")
    (root / "src" / module / "definitions.py").write_text(
        textwrap.dedent("""
            from pathlib import Path

            import dagster as dg


            @dg.definitions
            def defs() -> dg.Definitions:
                return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
        """)
    )
    (root / "src" / module / "defs" / "__init__.py").write_text("")
    body = {"type": "export_pipeline.components.ExportApiComponent", "attributes": attributes}
    (defs / "defs.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    return module


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A throwaway instance, live while the defs load and the run executes (as under `dg dev`)."""
    with dg.instance_for_test() as live:
        yield live


def test_defs_yaml_builds_and_materializes_stripe(
    stripe_sandbox: StripeSandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    instance: dg.DagsterInstance,
) -> None:
    project = tmp_path / "project"
    spec = yaml.safe_load(SPEC_PATH.read_text())
    make_project(
        project,
        {
            "spec": spec,
            "base_url": stripe_sandbox.api_url,
            "files_base_url": stripe_sandbox.files_url,
            "warehouse_path": str(tmp_path / "data" / "warehouse.duckdb"),
            "data_dir": str(tmp_path / "data"),
            "sync_settings": {"poll_initial_seconds": 0.05, "http_base_delay_seconds": 0.01},
        },
    )
    monkeypatch.syspath_prepend(str(project / "src"))
    monkeypatch.setenv("STRIPE_API_KEY", stripe_sandbox.state.token)

    defs = dg.load_from_defs_folder(path_within_project=project)
    key = dg.AssetKey(["stripe", "balance_change_from_activity"])
    repo = defs.get_repository_def()
    assert key in repo.asset_graph.get_all_asset_keys()
    assert {s.name for s in repo.sensor_defs} == {
        "stripe_exports_sensor",
        "stripe_data_checks_sensor",  # its checks, after each materialization
    }
    assert {s.name for s in repo.schedule_defs} == {"stripe_schedule"}
    assert set(defs.resources) >= {"stripe_api", "warehouse", "sync_settings", "s3"}
    column_schema = defs.get_assets_def(key).specs_by_key[key].metadata["dagster/column_schema"]
    assert column_schema.columns[0].description == "txn_… id of the balance change"
    # The secret is an EnvVar: read when the run starts, not when the defs load.
    assert "sk_test" not in repr(defs.resources["stripe_api"])

    result = defs.resolve_job_def("stripe_sync").execute_in_process(instance=instance)
    assert result.success
    node = "stripe__balance_change_from_activity"
    (materialization,) = result.asset_materializations_for_node(node)
    assert materialization.metadata["rows"].value == 300
    with duckdb.connect(str(tmp_path / "data" / "warehouse.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT count(*) FROM stripe.balance_change_from_activity").fetchone()
    assert rows == (300,)


def test_a_wrong_spec_in_defs_yaml_fails_to_load_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance: dg.DagsterInstance
) -> None:
    spec = yaml.safe_load(SPEC_PATH.read_text())
    spec["states"]["failed"] = ["succeeded"]  # also "ready": ambiguous
    make_project(tmp_path, {"spec": spec})
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    with pytest.raises(Exception, match=r"stripe[\s\S]*defs\.yaml") as caught:
        dg.load_from_defs_folder(path_within_project=tmp_path)
    causes, error = [], caught.value
    while error is not None:  # Dagster names the file; the cause names the field
        causes.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("both ready and failed" in text for text in causes)


def test_dg_check_defs_validates_the_yaml(tmp_path: Path) -> None:
    """`dg check defs` (dagster-dg-cli) in a fresh process: a valid spec passes; a misspelt
    field fails naming the defs.yaml line, before anything runs."""
    dg_cli = Path(sys.executable).with_name("dg")
    env = {**os.environ, "PATH": f"{dg_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    spec = yaml.safe_load(SPEC_PATH.read_text())
    make_project(tmp_path / "good", {"spec": spec})
    make_project(tmp_path / "bad", {"spec": {**spec, "statuz": {"path": "/x"}}})

    def check(project: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(dg_cli), "check", "defs"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )

    good = check(tmp_path / "good")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = check(tmp_path / "bad")
    assert bad.returncode != 0
    assert "defs.yaml:3" in bad.stdout + bad.stderr and "statuz" in bad.stdout + bad.stderr
