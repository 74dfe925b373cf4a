"""The whole Definitions object loads offline and lists what users expect to see in the UI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from export_pipeline.definitions import build_defs


@pytest.fixture
def live_instance() -> Iterator[dg.DagsterInstance]:
    """Dagster keeps the current instance's state storage in a context variable; an instance
    disposed by an earlier test can leave it dangling, so load Definitions under a live one."""
    with dg.instance_for_test() as instance:
        yield instance


def test_definitions_load_and_validate(live_instance: dg.DagsterInstance) -> None:
    """What the graph holds is the snapshot's business (definitions/test_snapshot.py); here: it
    loads as a code location would, and assets are grouped by provider and keyed provider/kind."""
    defs = build_defs()
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
    snapshot = json.loads((Path(__file__).with_name("definitions.json")).read_text())
    assert int(out.stdout.strip()) == len(snapshot["assets"])
    assert list(tmp_path.iterdir()) == []  # nothing written where it was imported
