"""The lake of the production code location (deploy/definitions.py) on real servers: DuckLake
catalog in PostgreSQL, data files on the loopback S3 server. Two worker processes load two
providers at once while an analyst's read-only attach queries the lake the whole time."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest

from export_pipeline.core.warehouse import DuckLakeWarehouse, close_lakes, extension_directory
from export_pipeline.sandbox.bundle import Sandbox
from export_pipeline.sandbox.s3 import S3Server
from export_pipeline_tests.deploy.postgres import PostgresServer
from export_pipeline_tests.deploy.test_deploy_files import compose
from export_pipeline_tests.deploy.test_production_instance import (
    DEPLOY,
    LOG_BUCKET,
    instance_env,
)

LAKE_BUCKET = "deploy-lake"
JOBS = ("locations_sync", "deliveries_sync")
# Run by path: the worker imports only dagster and deploy/definitions.py (the tests package is
# not installed, and the worker's working directory is its own scratch folder).
WORKER = str(Path(__file__).with_name("lake_worker.py"))
BIN = Path(sys.executable).parent  # the virtualenv's console scripts (`dagster`)


def lake_env(postgres: PostgresServer, database: str, run_name: str) -> dict[str, str]:
    """deploy/definitions.py's settings: catalog in PostgreSQL, lake and file tiers on S3."""
    dsn = (
        f"host={postgres.host} port={postgres.port} dbname={database} "
        f"user={postgres.user} password={postgres.password}"
    )
    return {
        "EXPORT_PIPELINE_LAKE_CATALOG": f"postgres:{dsn}",
        "EXPORT_PIPELINE_LAKE_DATA_PATH": f"s3://{LAKE_BUCKET}/{run_name}/lake/",
        "EXPORT_PIPELINE_STORAGE": f"s3://{LAKE_BUCKET}/{run_name}/files",
    }


def analyst_connection(lake: DuckLakeWarehouse, s3: S3Server) -> duckdb.DuckDBPyConnection:
    """What an analyst elsewhere runs: the extensions, an S3 secret, a READ_ONLY attach."""
    con = duckdb.connect(
        config={
            "extension_directory": str(extension_directory()),
            "autoinstall_known_extensions": False,
        }
    )
    for extension in ("ducklake", "postgres_scanner", "httpfs"):
        con.execute(f"LOAD {extension}")
    host = s3.endpoint_url.removeprefix("http://")
    con.execute(
        "CREATE SECRET lake_s3 (TYPE s3, KEY_ID 'testing', SECRET 'testing', "
        f"REGION '{s3.region}', ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)"
    )
    con.execute(lake.attach_sql(alias="lake", read_only=True))
    return con


class Reader(threading.Thread):
    """Queries the lake in a loop until stopped; records every error and each snapshot seen."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        super().__init__(daemon=True)
        self.con = con
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.snapshots: list[int] = []
        self.queries = 0

    def read_once(self) -> None:
        snapshot = self.con.execute("SELECT max(snapshot_id) FROM lake.snapshots()").fetchone()[0]
        self.con.execute(
            "SELECT provider, state, count(*) FROM lake.pipeline.exports GROUP BY ALL"
        ).fetchall()
        tables = self.con.execute(
            "SELECT schema_name, table_name FROM duckdb_tables() "
            "WHERE database_name = 'lake' AND schema_name <> 'pipeline'"
        ).fetchall()
        for schema, table in tables:
            self.con.execute(f'SELECT count(*) FROM lake."{schema}"."{table}"').fetchone()
        self.snapshots.append(snapshot)
        self.queries += 1

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.read_once()
            except duckdb.Error as exc:
                self.errors.append(str(exc))
            self.stop.wait(0.2)


def test_two_providers_load_into_the_lake_at_once_while_an_analyst_reads(
    postgres: PostgresServer,
    shared_s3: S3Server,
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dagster_db, lake_db = "dagster_lake_e2e", "ducklake_e2e"
    postgres.create_database(dagster_db)
    postgres.create_database(lake_db)
    shared_s3.ensure_bucket(LAKE_BUCKET)
    shared_s3.ensure_bucket(LOG_BUCKET)
    settings = lake_env(postgres, lake_db, tmp_path.name)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((DEPLOY / "dagster.yaml").read_text())
    env = {
        **instance_env(postgres, dagster_db, shared_s3),
        **sandbox.env(),
        **settings,
        "DAGSTER_HOME": str(home),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # for this process's lake and instance; children inherit

    # The lake exists before anyone loads (the first attach creates it, ledger included).
    lake = DuckLakeWarehouse(
        settings["EXPORT_PIPELINE_LAKE_CATALOG"], settings["EXPORT_PIPELINE_LAKE_DATA_PATH"]
    )
    with lake.connect() as con:
        con.execute("SELECT count(*) FROM pipeline.exports").fetchone()
    close_lakes()

    # Dagster's tables created once, by the command of the compose file's one-shot service, as
    # in production: two workers creating them at once on a fresh database can fail on each
    # other's DDL.
    migrate = compose()["services"]["instance_migrate"]["command"]
    done = subprocess.run(
        [str(BIN / migrate[0]), *migrate[1:]],
        cwd=tmp_path,
        env=dict(os.environ),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    reader = Reader(analyst_connection(lake, shared_s3))
    reader.read_once()  # before any load: the analyst is attached first
    go = tmp_path / "go"
    workers = []
    for job in JOBS:
        log = (tmp_path / f"{job}.log").open("wb")
        workers.append(
            (
                job,
                log,
                subprocess.Popen(
                    [sys.executable, WORKER, job, str(go)],
                    cwd=tmp_path,
                    env=dict(os.environ),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
            )
        )
    reader.start()
    go.touch()  # both workers start loading together
    try:
        codes = {job: proc.wait(timeout=300) for job, _, proc in workers}
    finally:
        reader.stop.set()
        reader.join(timeout=30)
        for _, log, proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    # A string, so pytest shows the failing worker's traceback whole (it abridges a dict's repr).
    outputs = "\n".join(
        f"--- {job} exited {codes[job]}:\n{(tmp_path / f'{job}.log').read_text()[-6000:]}"
        for job in JOBS
        if codes[job] != 0
    )
    assert codes == dict.fromkeys(JOBS, 0), outputs
    # The analyst never saw an error, and saw the lake move while the loads committed.
    assert reader.errors == []
    reader.read_once()
    assert reader.snapshots[-1] > reader.snapshots[0]

    con = reader.con
    exports = con.execute(
        "SELECT provider, export_id, rows_loaded FROM lake.pipeline.exports "
        "WHERE state = 'loaded' ORDER BY provider, kind"
    ).fetchall()
    assert [e[0] for e in exports] == ["deliveries", "deliveries", "locations"]
    assert con.execute("SELECT count(*) FROM lake.locations.locations").fetchone()[0] == 300
    delivered = con.execute(
        "SELECT (SELECT count(*) FROM lake.deliveries.outbound_messages) "
        "+ (SELECT count(*) FROM lake.deliveries.inbound_messages)"
    ).fetchone()[0]
    assert delivered == sum(e[2] for e in exports if e[0] == "deliveries") > 0
    # Each export load is its own snapshot (data, ledger and cursor committed together).
    snapshots = {lake.snapshot_of_export(p, export_id) for p, export_id, _ in exports}
    assert None not in snapshots and len(snapshots) == 3

    # The catalog is in PostgreSQL ...
    (n_snapshots,) = postgres.query(lake_db, "SELECT count(*) FROM ducklake_snapshot")[0]
    assert n_snapshots >= 4
    # ... the data files on S3, Parquet any tool can read.
    prefix = settings["EXPORT_PIPELINE_LAKE_DATA_PATH"].removeprefix(f"s3://{LAKE_BUCKET}/")
    client = shared_s3.client()
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket=LAKE_BUCKET, Prefix=prefix).get("Contents", [])
        if o["Key"].endswith(".parquet")
    ]
    assert keys
    body = client.get_object(Bucket=LAKE_BUCKET, Key=keys[0])["Body"].read()
    assert pq.read_table(io.BytesIO(body)).num_rows > 0
    # And Dagster recorded both runs in its PostgreSQL database.
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert sorted(r.job_name for r in runs) == sorted(JOBS)
        assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}

    # Maintenance on PostgreSQL and S3: a zero window leaves one snapshot, the data as of now,
    # and on S3 only the files that snapshot names.
    counts = (
        "SELECT (SELECT count(*) FROM lake.locations.locations), "
        "(SELECT count(*) FROM lake.pipeline.exports)"
    )
    before = con.execute(counts).fetchone()
    done = lake.maintain(timedelta(0), grace=timedelta(0))
    assert done.snapshots_expired >= 3 and done.files_deleted > 0
    assert postgres.query(lake_db, "SELECT count(*) FROM ducklake_snapshot")[0] == (1,)
    assert con.execute(counts).fetchone() == before
    after = [
        o["Key"]
        for o in client.list_objects_v2(Bucket=LAKE_BUCKET, Prefix=prefix).get("Contents", [])
        if o["Key"].endswith(".parquet")
    ]
    assert 0 < len(after) < len(keys)
    close_lakes()
