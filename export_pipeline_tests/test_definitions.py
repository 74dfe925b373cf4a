"""The whole Definitions object loads offline and lists what users expect to see in the UI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from export_pipeline.definitions import build_defs

MEWS_TYPES = [
    "order_item",
    "payment",
    "reservation",
    "customer",
    "company",
    "bill",
    "availability_adjustment",
    "availability_block",
    "resource_block",
]


@pytest.fixture
def live_instance() -> Iterator[dg.DagsterInstance]:
    """Dagster keeps the current instance's state storage in a context variable; an instance
    disposed by an earlier test can leave it dangling, so load Definitions under a live one."""
    with dg.instance_for_test() as instance:
        yield instance


def test_definitions_list_every_export_kind(live_instance: dg.DagsterInstance) -> None:
    defs = build_defs()
    repo = defs.get_repository_def()
    all_keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    # The analyst views are assets downstream of their table.
    assert {"locations/evses", "locations/connectors"} <= all_keys
    keys = all_keys - {"locations/evses", "locations/connectors"}
    assert keys == {
        "locations/locations",
        "deliveries/outbound_messages",
        "deliveries/inbound_messages",
        "mapping/results",
        "stripe/balance_change_from_activity",
        *(f"mews/{t}" for t in MEWS_TYPES),
    }
    assert {s.name for s in repo.sensor_defs} == {
        *(f"{p}_exports_sensor" for p in ("locations", "mews", "deliveries", "mapping", "stripe")),
        "freshness_checks_sensor",
        "data_checks_sensor",
        "run_failure_alerts",
        "release_claims_of_failed_runs",
    }
    assert {s.name for s in repo.schedule_defs} == {
        "locations_schedule",
        "mews_schedule",
        "deliveries_schedule",
        "stripe_schedule",
        "retention_schedule",
    }
    assert {"locations_sync", "mews_sync", "deliveries_sync", "stripe_sync"} <= {
        j.name for j in repo.get_all_jobs()
    }
    check_names = {
        (c.asset_key.to_user_string(), c.name) for c in repo.asset_graph.asset_check_keys
    }
    for key in keys:
        assert (key, "rows_match_provider") in check_names
        assert (key, "primary_key_unique") in check_names
    assert ("mapping/results", "values_in_range") in check_names
    # Assets are grouped by provider and keyed provider/kind.
    spec = next(s for s in defs.resolve_all_asset_specs() if s.key.path == ["mews", "reservation"])
    assert spec.group_name == "mews"
    dg.Definitions.validate_loadable(defs)


def test_definitions_load_offline_without_secrets(tmp_path: Path) -> None:
    """Importing needs no network, no secret and creates no file (a bare machine can load it)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith(("_TOKEN", "_KEY", "_URL", "_ADDRESS")) and not k.startswith("AWS_")
    }
    # An unroutable proxy: any HTTP attempt at import would fail loudly.
    env.update({"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"})
    code = (
        "import export_pipeline.definitions as d; "
        "print(len(list(d.defs.resolve_all_asset_specs())))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == 16  # 14 export kinds + 2 views
    assert list(tmp_path.iterdir()) == []  # nothing written where it was imported
