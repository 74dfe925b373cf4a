"""One worker process of test_lake_on_postgres: runs one sync job of the production code location
(deploy/definitions.py) on the Dagster instance of $DAGSTER_HOME, once the test says go.

    python export_pipeline_tests/deploy/lake_worker.py <job name> <go file>
"""

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import dagster as dg

DEFINITIONS = Path(__file__).resolve().parents[2] / "deploy" / "definitions.py"


def load_module() -> ModuleType:
    """deploy/definitions.py (a file, as the code server loads it, not a package module)."""
    spec = importlib.util.spec_from_file_location("deploy_definitions", DEFINITIONS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(job_name: str, go_file: str) -> int:
    job = load_module().defs.resolve_job_def(job_name)  # imports done before the start line
    deadline = time.monotonic() + 300
    while not Path(go_file).exists():
        if time.monotonic() > deadline:
            print("never told to go", file=sys.stderr)
            return 2
        time.sleep(0.05)
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        if not result.success:
            for event in result.all_events:
                if event.is_failure:
                    print(event.message, file=sys.stderr)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
