"""deploy/dagster.yaml, unmodified, as a real DagsterInstance on a real PostgreSQL server with
its compute logs on the loopback S3 server."""

import shutil
from pathlib import Path

import dagster as dg
import pytest
from dagster import OpExecutionContext
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
from dagster_docker import DockerRunLauncher
from dagster_postgres import (
    PostgresEventLogStorage,
    PostgresRunStorage,
    PostgresScheduleStorage,
)

from export_pipeline.sandbox.s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, S3Server
from export_pipeline_tests.deploy.postgres import PostgresServer

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
LOG_BUCKET = "deploy-compute-logs"


def instance_env(postgres: PostgresServer, database: str, s3: S3Server) -> dict[str, str]:
    """What the compose file gives every service, pointed at the test servers. boto3 reads
    AWS_ENDPOINT_URL_S3, so the production file needs no endpoint setting for the S3 stand-in."""
    return {
        "DAGSTER_POSTGRES_HOST": postgres.host,
        "DAGSTER_POSTGRES_PORT": str(postgres.port),
        "DAGSTER_POSTGRES_USER": postgres.user,
        "DAGSTER_POSTGRES_PASSWORD": postgres.password,
        "DAGSTER_POSTGRES_DB": database,
        "DAGSTER_COMPUTE_LOGS_BUCKET": LOG_BUCKET,
        "DAGSTER_COMPUTE_LOGS_PREFIX": "dagster/compute-logs",
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
        "AWS_REGION": s3.region,
        "AWS_DEFAULT_REGION": s3.region,
        "AWS_ENDPOINT_URL_S3": s3.endpoint_url,
    }


@dg.op
def say_hello(context: OpExecutionContext) -> int:
    context.log.info("hello from a run stored in PostgreSQL")
    return 1


@dg.job
def hello_job() -> None:
    say_hello()


def test_production_dagster_yaml_is_a_working_instance_on_postgres(
    postgres: PostgresServer,
    shared_s3: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    database = "dagster_prod_yaml"
    postgres.create_database(database)
    shared_s3.ensure_bucket(LOG_BUCKET)
    for key, value in instance_env(postgres, database, shared_s3).items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert isinstance(instance.run_launcher, DockerRunLauncher)
        assert instance.run_launcher.networks == ["export_pipeline"]
        assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_start_timeout_seconds == 300
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        assert not instance.run_retries_retry_on_asset_or_op_failure
        run_queue = instance.get_concurrency_config().run_queue_config
        assert run_queue is not None and run_queue.max_concurrent_runs == 8

        # A run through this instance lands in PostgreSQL: its record and its events.
        result = hello_job.execute_in_process(instance=instance)
        assert result.success
        rows = postgres.query(database, f"SELECT status FROM runs WHERE run_id = '{result.run_id}'")
        assert rows == [("SUCCESS",)]
        (n_events,) = postgres.query(
            database, f"SELECT count(*) FROM event_logs WHERE run_id = '{result.run_id}'"
        )[0]
        assert n_events > 0
        assert instance.get_run_by_id(result.run_id).status is dg.DagsterRunStatus.SUCCESS

        # Step logs go to the S3 bucket named by the environment.
        manager = instance.compute_log_manager
        log_key = ["deploy-test", result.run_id, "say_hello"]
        with manager.capture_logs(log_key):
            print("a line of step output")
        keys = [
            o["Key"]
            for o in shared_s3.client()
            .list_objects_v2(Bucket=LOG_BUCKET, Prefix="dagster/compute-logs/")
            .get("Contents", [])
        ]
        assert any(result.run_id in key and key.endswith(".out") for key in keys), keys
