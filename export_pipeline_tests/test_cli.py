"""README's first command: `export-pipeline demo`, run as a user would, in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb


def test_demo_runs_a_full_then_an_incremental_sync(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "export_pipeline.cli", "demo", "--rows", "300", "--changes", "20"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    full, incremental = summary["syncs"]
    assert (full["sync"], full["rows"], full["modified_since"]) == ("full", 300, None)
    assert incremental["rows"] == 30 and incremental["modified_since"] is not None
    assert full["files"] and incremental["files"]
    assert summary["tables"]["locations"] == 310
    with duckdb.connect(str(tmp_path / "data" / "warehouse.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM locations.locations").fetchone()[0] == 310
        assert (
            con.execute("SELECT count(DISTINCT export_id) FROM pipeline.exports").fetchone()[0] == 2
        )
    # README's analyst command, on the read replica the demo's loads published.
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "export_pipeline.cli",
            "sql",
            "--format",
            "csv",
            "SELECT count(*) AS n FROM locations.locations",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["n", "310"]


def test_webhooks_serve_without_credentials_is_a_clean_error(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "export_pipeline.cli", "webhooks", "serve", "--store", "e.db"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 2
    assert "EXPORT_PIPELINE_WEBHOOK" in out.stderr and "Traceback" not in out.stderr


# What `webhooks serve` loads, in a fresh interpreter: the CLI, the command, the receiver app.
_WEBHOOKS_IMPORTS = """
import sys
from pathlib import Path
from export_pipeline import cli
assert cli.main(["webhooks", "serve", "--store", "e.db"]) == 2  # no credentials: stops early
from export_pipeline.webhooks.receiver import ReceiverSettings, create_app
from export_pipeline.webhooks.store import EventStore
create_app(EventStore(Path("e.db")), ReceiverSettings(bearer_token="t"))
print(sorted(m for m in sys.modules if m.split(".")[0].startswith("dagster")))
"""


def test_webhooks_serve_imports_no_dagster(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _WEBHOOKS_IMPORTS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


SERVE = [sys.executable, "-m", "export_pipeline.cli", "sandbox", "serve", "--random-ports"]


def test_sandbox_serve_options_add_mapping_jobs_and_faults(tmp_path: Path) -> None:
    """`sandbox serve` can add mapping jobs and switch faults on; its printed env points at it."""
    import httpx

    proc = subprocess.Popen(
        [*SERVE, "--rows", "10", "--mapping-job", "job-a=4", "--fault", "rate_limit=1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        env: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("export "):
                key, _, value = line[len("export ") :].strip().partition("=")
                env[key] = value
            if line.startswith("mapping jobs:"):
                assert line.strip() == "mapping jobs: job-a"
                break
        headers = {"Authorization": f"Bearer {env['MAPPING_API_TOKEN']}"}
        answer = httpx.post(
            f"{env['MAPPING_API_URL']}/api/v1/mapping/job-a/export", headers=headers
        )
        assert answer.status_code == 200 and answer.json().get("success") is True, answer.text
        # rate_limit=1: the locations API answers the next call with 429.
        auth = {"Authorization": f"Bearer {env['LOCATIONS_API_TOKEN']}"}
        first = httpx.get(f"{env['LOCATIONS_API_URL']}/locations/exports/x", headers=auth)
        assert first.status_code == 429
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_sandbox_serve_rejects_an_unknown_fault(tmp_path: Path) -> None:
    out = subprocess.run(
        [*SERVE, "--rows", "10", "--fault", "gremlins"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "unknown sandbox fault 'gremlins'" in out.stderr


# A stand-in for `dg dev`: a child that starts a grandchild in its own group (as the webserver,
# daemon and code servers are) and records its pid, then waits for a signal.
_SPAWNER = """
import signal, subprocess, sys
from pathlib import Path
grandchild = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
Path(sys.argv[1]).write_text(str(grandchild.pid))
signal.pause()
"""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_to_dev_stops_every_process_it_started(tmp_path: Path) -> None:
    """`export-pipeline dev` runs `dg dev` through run_in_own_group: SIGTERM to the command
    stops the whole group, grandchildren included, instead of leaving them orphaned."""
    import signal
    import time

    pid_file = tmp_path / "grandchild.pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from export_pipeline.cli import run_in_own_group; "
            f"sys.exit(run_in_own_group([sys.executable, '-c', {_SPAWNER!r}, {str(pid_file)!r}]))",
        ]
    )
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert parent.poll() is None, "the command ended before its child started"
        assert time.monotonic() < deadline, "the child never started its grandchild"
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert _alive(grandchild)

    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), f"process {grandchild} outlived `export-pipeline dev`"
