"""The whole definitions graph, compared with a reviewed snapshot (``definitions.json`` here):
asset keys with their group, kinds, partitions, upstream and freshness policy, the asset checks,
jobs with what they select, schedules, sensors with the resources they need, and each resource's
class and the environment variables it reads.

A change to the graph fails this test with a diff. When the change is intended, rewrite the file
and review it like code:

    UPDATE_SNAPSHOTS=1 .venv/bin/pytest export_pipeline_tests/definitions/test_snapshot.py
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from export_pipeline.definitions import build_defs
from export_pipeline.defs.spec_resources import environment_variables

SNAPSHOT = Path(__file__).with_name("definitions.json")


@pytest.fixture
def live_instance() -> Iterator[dg.DagsterInstance]:
    # The definitions load under a live instance, as under `dg dev`.
    with dg.instance_for_test() as instance:
        yield instance


def freshness(policy: dg.FreshnessPolicy | None) -> dict[str, str | None] | None:
    if policy is None:
        return None
    windows = {"fail": policy.fail_window, "warn": policy.warn_window}
    return {k: str(w.to_timedelta()) if w else None for k, w in windows.items()}


def describe(defs: dg.Definitions) -> dict[str, Any]:
    """The graph as plain, sorted data (the same input gives the same text)."""
    repo = defs.get_repository_def()
    graph = repo.asset_graph
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "partitions": getattr(partitions, "name", None) or (partitions and str(partitions)),
            "upstream": sorted(k.to_user_string() for k in node.parent_keys),
            "checks": sorted(c.name for c in graph.asset_check_keys if c.asset_key == key),
            "freshness": freshness(node.freshness_policy),
        }
    jobs = {}
    for job in sorted(repo.get_all_jobs(), key=lambda j: j.name):
        if job.name.startswith("__"):
            continue  # Dagster's implicit asset job
        layer = job.asset_layer
        jobs[job.name] = sorted(k.to_user_string() for k in layer.selected_asset_keys)
    return {
        "assets": assets,
        "jobs": jobs,
        "schedules": {
            s.name: {
                "cron": s.cron_schedule,
                "job": s.job_name,
                "default": s.default_status.value,
                "resources": sorted(s.required_resource_keys),
            }
            for s in sorted(repo.schedule_defs, key=lambda s: s.name)
        },
        "sensors": {
            s.name: {
                "default": s.default_status.value,
                "resources": sorted(s.required_resource_keys),
            }
            for s in sorted(repo.sensor_defs, key=lambda s: s.name)
        },
        "resources": {
            key: {
                "class": type(resource).__name__,
                "env": sorted(environment_variables(resource)),
            }
            # The resources as given (Dagster's repository holds wrapped definitions).
            for key, resource in sorted((defs.resources or {}).items())
        },
    }


def test_the_definitions_graph_matches_the_reviewed_snapshot(
    live_instance: dg.DagsterInstance,
) -> None:
    text = json.dumps(describe(build_defs()), indent=1, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(text, encoding="utf-8")
    expected = SNAPSHOT.read_text(encoding="utf-8") if SNAPSHOT.exists() else ""
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(keepends=True),
            text.splitlines(keepends=True),
            str(SNAPSHOT.name),
            "now",
        )
    )
    assert not diff, (
        "the definitions graph changed; if intended, run UPDATE_SNAPSHOTS=1 .venv/bin/pytest "
        f"export_pipeline_tests/definitions/test_snapshot.py and review the file\n{diff}"
    )
