"""The shipped dagster.yaml: run monitoring marks a run whose process was killed as failed,
and the release sensor frees the export that run held."""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
from dagster._core.events import EngineEventData
from dagster._daemon.monitoring.run_monitoring import monitor_started_run

from export_pipeline.core.ledger import Ledger, Warehouse
from export_pipeline.core.model import ExportRequest, ExportState, ExportStatus
from export_pipeline.defs.launcher import LocalRunLauncher
from export_pipeline.defs.resources import WarehouseResource
from export_pipeline.defs.sensors import build_release_claims_sensor
from export_pipeline.providers.locations import LOCATIONS

ROOT = Path(__file__).resolve().parents[2]


def test_a_killed_run_is_marked_failed_and_its_claim_released(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_launcher, LocalRunLauncher)
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_resume_run_attempts == 0

        # A run whose process started (Dagster records its pid) and then got SIGKILLed.
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        run = instance.add_run(
            dg.DagsterRun(job_name="locations_sync", status=dg.DagsterRunStatus.STARTED)
        )
        instance.report_engine_event(
            f"Started process for run (pid: {worker.pid}).",
            run,
            EngineEventData.in_process(worker.pid),
        )
        record = instance.get_run_record_by_id(run.run_id)
        assert record is not None and record.dagster_run.status == dg.DagsterRunStatus.STARTED
        assert instance.run_launcher.check_run_worker_health(run).status.value == "RUNNING"

        # The run holds an export's lease in the ledger, as an asset of that run does.
        ledger = Ledger(Warehouse(tmp_path / "w.duckdb"))
        ledger.record_request(
            LOCATIONS,
            ExportRequest(),
            ExportStatus(export_id="exp-1", state=ExportState.READY),
            source="run",
        )
        owner = f"{run.run_id}@{socket.gethostname()}:{worker.pid}"
        assert ledger.claim("locations", "exp-1", owner, ttl_seconds=3600).granted

        worker.send_signal(signal.SIGKILL)
        worker.wait()
        monitor_started_run(instance, None, record, logging.getLogger("monitor"))  # type: ignore[arg-type]
        failed = instance.get_run_by_id(run.run_id)
        assert failed is not None and failed.status == dg.DagsterRunStatus.FAILURE
        events = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert events and f"pid {worker.pid}" in (events[-1].message or "")

        sensor = build_release_claims_sensor()
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor.name,
            dagster_event=events[-1].dagster_event,
            dagster_instance=instance,
            dagster_run=failed,
            resources={"warehouse": WarehouseResource(path=str(tmp_path / "w.duckdb"))},
        )
        sensor(context.for_run_failure())
        held = ledger.get("locations", "exp-1")
        assert held is not None and held.lease_owner is None
