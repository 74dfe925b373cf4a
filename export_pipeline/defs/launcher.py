"""Dagster's default run launcher, plus the health check run monitoring needs on one machine.

``DefaultRunLauncher`` starts each run in a local process but cannot tell whether that process
is still alive, so with it a run whose process was killed (OOM, ``kill -9``, a reboot) stays
STARTED forever. This launcher answers run monitoring's health check from the pid Dagster
records when the run process starts ("Started process for run (pid: N)"): once that process is
gone and the run is still STARTED, the daemon marks the run failed, and the
``release_claims_of_failed_runs`` sensor frees the export it held (the ledger's lease would
also lapse by itself). The shipped ``dagster.yaml`` uses it; ``deploy/dagster.yaml`` uses the
container launchers, which have their own health check.
"""

from __future__ import annotations

import psutil
from dagster import DagsterEventType, DagsterInstance, DagsterRun
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus


def _run_worker_pid(instance: DagsterInstance, run_id: str) -> int | None:
    pid = None
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        data = getattr(event, "engine_event_data", None) if event else None
        value = (data.metadata or {}).get("pid") if data is not None else None
        if value is not None and str(getattr(value, "value", value)).isdigit():
            pid = int(getattr(value, "value", value))  # the last one: a resumed run's worker
    return pid


class LocalRunLauncher(DefaultRunLauncher):
    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        pid = _run_worker_pid(self._instance, run.run_id)
        if pid is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "no run process recorded yet")
        try:
            alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            alive = False
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(pid))
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"the run's process (pid {pid}) is gone: killed or crashed",
            run_worker_id=str(pid),
        )
