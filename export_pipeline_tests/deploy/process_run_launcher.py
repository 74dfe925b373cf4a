"""deploy/dagster.yaml's ``DockerRunLauncher``, with a local process where Docker would start
a container (there is no Docker engine where the tests run).

Everything but the container runs as production configures it: dagster_docker validates and
parses the launcher's configuration; the run's command is DockerRunLauncher's own (``dagster
api execute_run`` / ``resume_run`` with the instance reference); the run process gets exactly
the environment a run container would: the variables ``env_vars`` forwards from the daemon,
``DAGSTER_RUN_JOB_NAME``, and what deploy/Dockerfile's ``ENV`` sets (``DAGSTER_HOME``), and
nothing else of the daemon's environment, so a variable the list misses fails the run here as
it would in production. Run monitoring's health check and termination look at that process as
DockerRunLauncher looks at the container, so resuming a dead run worker works as configured.

``process_env`` (test only) names the few variables the stand-ins need on top: where Python
and the installed packages are (the image has them in its own places), the loopback S3
endpoint, the sandbox's allowed download hosts, and the test suite's network guard.

Not exercised here: pulling or creating the image, the ``network``, ``container_kwargs``
(``auto_remove``) and Docker's own view of the container's state.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
from dagster import Array, Field, String
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import DOCKER_IMAGE_TAG
from dagster._core.utils import parse_env_var
from dagster_docker import DockerRunLauncher
from dagster_docker.docker_run_launcher import DOCKER_CONTAINER_ID_TAG
from dagster_docker.utils import DOCKER_CONFIG_SCHEMA

# What deploy/Dockerfile's ENV gives every container of the image (a test puts its home here).
IMAGE_ENV = ("DAGSTER_HOME",)
PROCESS_PREFIX = "process-"


class ProcessDockerRunLauncher(DockerRunLauncher):
    def __init__(self, *args: Any, process_env: list[str] | None = None, **kwargs: Any) -> None:
        self.process_env = list(process_env or [])
        super().__init__(*args, **kwargs)

    @classmethod
    def config_type(cls) -> dict[str, Field]:
        return {
            **DOCKER_CONFIG_SCHEMA,
            "process_env": Field(Array(String), is_required=False),
        }

    @classmethod
    def from_config_value(cls, inst_data: Any, config_value: Mapping[str, Any]) -> Any:
        return cls(inst_data=inst_data, **config_value)

    def _get_docker_image(self, job_code_origin: Any) -> str:
        # The code server sets no image here (it is not in a container): any name will do.
        return job_code_origin.repository_origin.container_image or "export_pipeline:test"

    def _launch_container_with_command(
        self, run: DagsterRun, docker_image: str, command: Any
    ) -> None:
        container_context = self.get_container_context(run)
        # As DockerRunLauncher builds the container's environment (an unset name fails here too).
        env = dict(parse_env_var(name) for name in container_context.env_vars)
        env["DAGSTER_RUN_JOB_NAME"] = run.job_name
        for name in [*IMAGE_ENV, *self.process_env]:
            if name in os.environ:
                env[name] = os.environ[name]
        # Docker keeps a container's output: here a file per run under the working directory.
        logs = Path.cwd() / "run-logs"
        logs.mkdir(exist_ok=True)
        with (logs / f"{run.run_id}.log").open("ab") as out:
            proc = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        threading.Thread(target=proc.wait, daemon=True).start()  # reaped when it exits
        container_id = f"{PROCESS_PREFIX}{proc.pid}"
        self._instance.report_engine_event(
            message=f"Launching run in a new process {container_id} (image {docker_image})",
            dagster_run=run,
            cls=self.__class__,
        )
        self._instance.add_run_tags(
            run.run_id, {DOCKER_CONTAINER_ID_TAG: container_id, DOCKER_IMAGE_TAG: docker_image}
        )

    def _process(self, run: DagsterRun | None) -> psutil.Process | None:
        container_id = (run.tags if run else {}).get(DOCKER_CONTAINER_ID_TAG, "")
        if not container_id.startswith(PROCESS_PREFIX):
            return None
        try:
            process = psutil.Process(int(container_id.removeprefix(PROCESS_PREFIX)))
            return None if process.status() == psutil.STATUS_ZOMBIE else process
        except psutil.NoSuchProcess:
            return None

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        container_id = run.tags.get(DOCKER_CONTAINER_ID_TAG)
        if not container_id:
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, msg="No container ID tag for run.")
        if self._process(run) is not None:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, msg=f"{container_id} has exited.")

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        process = self._process(run)
        if process is None:
            return False
        process.terminate()
        return True
