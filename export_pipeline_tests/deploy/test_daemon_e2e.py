"""The production topology, minus containers, end to end on a real PostgreSQL.

deploy/dagster.yaml backs three real processes as in deploy/docker-compose.yaml: a code server
(gRPC) serving the production code location (deploy/definitions.py: DuckLake catalog in
PostgreSQL, data files on S3), `dagster-daemon run` and, launched by the daemon's run queue
through the production run launcher, the run worker. There is no Docker engine here, so the
launcher is ProcessDockerRunLauncher (process_run_launcher.py): deploy/dagster.yaml's
DockerRunLauncher and its configuration, with a local process where Docker would start a
container, given only the environment a container would get. The sensor finds an export in
the ledger, the daemon launches its ingest, the run loads it into the lake; Dagster's records
land in PostgreSQL and the step logs in S3.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import dagster as dg
import pytest
import yaml

from export_pipeline.core.model import ExportRequest
from export_pipeline.core.warehouse import close_lakes
from export_pipeline.definitions import BINDINGS
from export_pipeline.defs.assets import make_runner
from export_pipeline.sandbox.bundle import Sandbox
from export_pipeline.sandbox.s3 import S3Server
from export_pipeline.sandbox.server import free_port
from export_pipeline_tests.deploy.lake_worker import DEFINITIONS, load_module
from export_pipeline_tests.deploy.postgres import PostgresServer
from export_pipeline_tests.deploy.process_run_launcher import (
    DOCKER_CONTAINER_ID_TAG,
    PROCESS_PREFIX,
)
from export_pipeline_tests.deploy.test_lake_on_postgres import LAKE_BUCKET, lake_env
from export_pipeline_tests.deploy.test_production_instance import LOG_BUCKET, instance_env

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent
LOCATIONS = next(b for b in BINDINGS if b.name == "locations")
SENSOR = "locations_exports_sensor"
DEADLINE_SECONDS = 240  # generous: six helpers share two cores; the test waits on events


# The run worker kills itself inside the load transaction, once (core/faults.py).
KILL_AT, KILL_ONCE = "EXPORT_PIPELINE_KILL_AT", "EXPORT_PIPELINE_KILL_ONCE"
# Variables the stand-ins need in the run process on top of what the launcher forwards (see
# process_run_launcher.py): Python and the packages (in the image: its own PATH and
# site-packages), the loopback S3 and sandbox download hosts, the suite's network guard.
PROCESS_ENV = [
    "PATH",
    "PYTHONPATH",
    "AWS_ENDPOINT_URL_S3",
    "EXPORT_PIPELINE_ALLOWED_DOWNLOAD_HOSTS",
    "EXPORT_PIPELINE_NETGUARD",
    "EXPORT_PIPELINE_NETGUARD_LOG",
    "EXPORT_PIPELINE_NETGUARD_PARENT",
    KILL_AT,
    KILL_ONCE,
]


def write_home(home: Path) -> None:
    """deploy/dagster.yaml with three changes: DockerRunLauncher (its configuration unchanged)
    starts a process instead of a container; the queue and run monitoring look every second
    (instead of 5 s and 60 s)."""
    config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    config["run_launcher"] = {
        "module": "export_pipeline_tests.deploy.process_run_launcher",
        "class": "ProcessDockerRunLauncher",
        "config": {**launcher["config"], "process_env": PROCESS_ENV},
    }
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = 1
    config["run_monitoring"]["poll_interval_seconds"] = 1
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


@contextmanager
def process(argv: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> Iterator[None]:
    """A child process for the duration of the block; stopped (and reaped) afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def wait_for_code_server(port: int, env: dict[str, str], logs: Path) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        probe = subprocess.run(
            [
                str(BIN / "dagster"),
                "api",
                "grpc-health-check",
                "--host",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"code server never became healthy:\n{logs.read_text()[-4000:]}")


def test_sensor_triggered_sync_through_daemon_and_code_server_on_postgres(
    postgres: PostgresServer,
    shared_s3: S3Server,
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database, lake_db = "dagster_daemon_e2e", "ducklake_daemon_e2e"
    postgres.create_database(database)
    postgres.create_database(lake_db)
    shared_s3.ensure_bucket(LOG_BUCKET)
    shared_s3.ensure_bucket(LAKE_BUCKET)
    home = tmp_path / "dagster_home"
    write_home(home)
    app = tmp_path / "app"  # the processes' working directory (their scratch data/)
    app.mkdir()
    port = free_port()
    (tmp_path / "workspace.yaml").write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "grpc_server": {
                            "host": "127.0.0.1",
                            "port": port,
                            "location_name": "export_pipeline",
                        }
                    }
                ]
            }
        )
    )
    settings = {
        **instance_env(postgres, database, shared_s3),
        **sandbox.env(),
        **lake_env(postgres, lake_db, tmp_path.name),
        "DAGSTER_HOME": str(home),
        # DockerRunLauncher refuses to launch while any variable it forwards is unset on the
        # daemon (compose sets them all); this run does not call Stripe.
        "STRIPE_API_KEY": "sk_test_not_used_by_this_run",
        # The first run worker dies inside the load, as an OOM kill or a lost node would.
        KILL_AT: "merge",
        KILL_ONCE: str(tmp_path / "killed-once"),
        # `dagster` on PATH, as in the image (the launcher's command names it); the daemon
        # imports the stand-in launcher from the tests package.
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(REPO)]),
    }
    # This process's resources and instance read the same environment; the children inherit it.
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    env = dict(os.environ)

    # An export requested elsewhere (another tool, a webhook): only the ledger knows it.
    resources = load_module().production_resources()
    # Only what a locations run needs (Dagster builds no more): no other provider's variables.
    needed = {k: v for k, v in resources.items() if not k.endswith("_api") or k == "locations_api"}
    with dg.build_resources(needed) as res:
        record, _ = make_runner(res, LOCATIONS).start(
            LOCATIONS.kinds[0], ExportRequest(), source="elsewhere"
        )
        lake = res.warehouse.warehouse()
    close_lakes()
    export_id = record.export_id
    run_key = f"locations:{export_id}"

    workspace = str(tmp_path / "workspace.yaml")
    with ExitStack() as stack:
        code_log = tmp_path / "code_server.log"
        stack.enter_context(
            process(
                [
                    str(BIN / "dagster"),
                    "code-server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--python-file",
                    str(DEFINITIONS),
                    "--attribute",
                    "defs",
                    "--location-name",
                    "export_pipeline",
                ],
                cwd=app,
                env=env,
                log=code_log,
            )
        )
        wait_for_code_server(port, env, code_log)
        started = subprocess.run(
            [str(BIN / "dagster"), "sensor", "start", SENSOR, "-w", workspace],
            cwd=app,
            env=env,
            capture_output=True,
            text=True,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        daemon_log = tmp_path / "daemon.log"
        stack.enter_context(
            process(
                [str(BIN / "dagster-daemon"), "run", "-w", workspace],
                cwd=app,
                env=env,
                log=daemon_log,
            )
        )

        with dg.DagsterInstance.from_config(str(home)) as instance:
            deadline = time.monotonic() + DEADLINE_SECONDS
            run = None
            while time.monotonic() < deadline:
                runs = instance.get_runs(dg.RunsFilter(tags={"dagster/run_key": run_key}))
                if runs and runs[0].is_finished:
                    run = runs[0]
                    break
                time.sleep(1)
            run_logs = "".join(p.read_text()[-4000:] for p in app.glob("run-logs/*.log"))
            diagnostics = (
                f"daemon:\n{daemon_log.read_text()[-4000:]}\n"
                f"code server:\n{code_log.read_text()[-4000:]}\nrun processes:\n{run_logs}"
            )
            assert run is not None, f"no finished run for {run_key}\n{diagnostics}"
            if run.status is not dg.DagsterRunStatus.SUCCESS:
                events = [
                    e.message
                    for e in instance.all_logs(run.run_id)
                    if e.dagster_event and e.dagster_event.is_failure
                ]
                raise AssertionError(f"run {run.status}: {events}\n{diagnostics}")
            assert run.tags["dagster/sensor_name"] == SENSOR
            # Launched by the production DockerRunLauncher (its process stand-in).
            assert run.tags[DOCKER_CONTAINER_ID_TAG].startswith(PROCESS_PREFIX)
            # Its first worker was killed inside the load; run monitoring saw the process gone
            # and resumed the run through the launcher in a new one (max_resume_run_attempts).
            assert (tmp_path / "killed-once").exists()
            launches = [
                e.message
                for e in instance.all_logs(run.run_id)
                if "Launching run in a new process" in e.message
            ]
            assert len(launches) == 2, launches
            assert len(instance.get_runs(dg.RunsFilter(tags={"dagster/run_key": run_key}))) == 1
            mat = instance.get_latest_materialization_event(dg.AssetKey(["locations", "locations"]))
            assert mat is not None and mat.run_id == run.run_id

        # Dagster's own records are in PostgreSQL, the daemon heartbeats there too.
        assert postgres.query(
            database, f"SELECT status FROM runs WHERE run_id = '{run.run_id}'"
        ) == [("SUCCESS",)]
        daemons = {
            row[0] for row in postgres.query(database, "SELECT daemon_type FROM daemon_heartbeats")
        }
        assert {"SENSOR", "QUEUED_RUN_COORDINATOR", "MONITORING"} <= daemons

    # The run's step output was uploaded to the S3 bucket of deploy/dagster.yaml.
    keys = [
        o["Key"] for o in shared_s3.client().list_objects_v2(Bucket=LOG_BUCKET).get("Contents", [])
    ]
    assert any(run.run_id in key for key in keys), keys

    # And the data landed in the lake: every location, the export loaded, in one snapshot.
    with lake.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM locations.locations").fetchone()[0] == 300
        assert con.execute(
            "SELECT state FROM pipeline.exports WHERE export_id = ?", [export_id]
        ).fetchone() == ("loaded",)
    assert lake.snapshot_of_export("locations", export_id) is not None
    # The killed worker's transaction left nothing: the export was committed once.
    loads = [s for s in lake.snapshots() if s["extra"].get("export_id") == export_id]
    assert len(loads) == 1, loads
    close_lakes()
