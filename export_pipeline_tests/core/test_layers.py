"""The layers' import rules, checked in a fresh interpreter: the core imports neither Dagster
nor ``providers`` (no core<->providers cycle), providers import no Dagster, and the root test
conftest loads without Dagster (only the Dagster layer's tests pay for it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import export_pipeline

PACKAGE = Path(export_pipeline.__file__).parent

_PROBE = """
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0].startswith("dagster")
                        or m.startswith("export_pipeline.providers"))))
"""


def _loaded_by(*modules: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(modules=list(modules))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PACKAGE.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_core_imports_neither_dagster_nor_providers() -> None:
    core = sorted(f"export_pipeline.core.{p.stem}" for p in (PACKAGE / "core").glob("[a-z]*.py"))
    assert "export_pipeline.core.track" in core
    assert _loaded_by(*core) == []


def test_providers_and_the_root_test_conftest_import_no_dagster() -> None:
    loaded = _loaded_by("export_pipeline.providers.registry", "export_pipeline_tests.conftest")
    assert [m for m in loaded if m.startswith("dagster")] == []
