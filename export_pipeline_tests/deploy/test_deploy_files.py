"""deploy/ without a Docker engine: what can be checked statically is checked here.

The compose file parses and every file it references exists; the Dockerfile copies paths that
exist and starts the code location the project declares; the run launcher's configuration
validates against dagster-docker's own schema; the ECS variant against dagster-aws's.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster_docker import DockerRunLauncher

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yaml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def instance_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "dagster.yaml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_compose_services_and_the_files_they_reference() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {
        "postgres",
        "instance_migrate",
        "code_server",
        "webserver",
        "daemon",
        "webhooks",
    }

    build = services["code_server"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()

    bind_mounts = [
        volume.split(":")[0]
        for service in services.values()
        for volume in service.get("volumes", [])
        if volume.startswith(".")
    ]
    assert bind_mounts, "the postgres init script is bind-mounted"
    for source in bind_mounts:
        assert (COMPOSE.parent / source).is_file(), source

    # The catalog database the DuckLake backend uses is created on the compose PostgreSQL.
    init_sql = (DEPLOY / "postgres" / "init-ducklake.sql").read_text()
    assert re.search(r"CREATE DATABASE\s+ducklake", init_sql, re.I)

    # Everything that talks to the instance waits for PostgreSQL to be healthy, and for its
    # tables, created once by a one-shot migration (test_lake_on_postgres runs that command).
    migrate = services["instance_migrate"]
    assert migrate["command"] == ["dagster", "instance", "migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("code_server", "webserver", "daemon"):
        depends_on = services[name]["depends_on"]
        assert depends_on["postgres"]["condition"] == "service_healthy"
        assert depends_on["instance_migrate"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["code_server"]
    # The UI and PostgreSQL are published on loopback only.
    assert services["webserver"]["ports"] == ["127.0.0.1:3000:3000"]
    assert [p.split(":")[0] for p in services["postgres"]["ports"]] == ["127.0.0.1"]
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert set(published) == {"postgres", "webserver", "webhooks"}
    assert all(p.startswith("127.0.0.1:") for ports in published.values() for p in ports)


def test_the_webhook_receiver_and_the_sensors_share_one_event_store() -> None:
    """The receiver writes events where the sensors (in the code server) read them."""
    from export_pipeline_tests.deploy.lake_worker import load_module

    services = compose()["services"]
    command = services["webhooks"]["command"]
    store = command[command.index("--store") + 1]
    workdir = [args for word, args in dockerfile_instructions() if word == "WORKDIR"][-1]
    assert store == f"{workdir}/{load_module().WEBHOOK_EVENTS}"

    def mount_of(service: str) -> str | None:
        for volume in services[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            if not source.startswith((".", "/")) and store.startswith(target + "/"):
                return source
        return None

    assert mount_of("webhooks") is not None
    assert mount_of("webhooks") == mount_of("code_server")
    assert mount_of("webhooks") in compose()["volumes"]


def test_production_code_location_is_the_project_on_the_lake_and_loads_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deploy/definitions.py: the same assets, jobs, sensors and schedules as the project, the
    warehouse on DuckLake from environment variables, loaded with none of them set."""
    from export_pipeline.definitions import defs as project_defs
    from export_pipeline_tests.deploy.lake_worker import load_module

    for name in ("EXPORT_PIPELINE_LAKE_CATALOG", "EXPORT_PIPELINE_LAKE_DATA_PATH"):
        monkeypatch.delenv(name, raising=False)
    module = load_module()
    defs = module.defs

    def names(d: object) -> tuple:
        repo = d.get_repository_def()  # type: ignore[attr-defined]
        return (
            sorted(k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()),
            sorted(j.name for j in repo.get_all_jobs()),
            sorted(s.name for s in repo.sensor_defs),
            sorted(s.name for s in repo.schedule_defs),
        )

    # Under a live instance: one disposed by an earlier test can leave Dagster's state-storage
    # context variable dangling (see test_definitions.py).
    with dg.instance_for_test():
        assert names(defs) == names(project_defs)
    warehouse = module.production_resources()["warehouse"]
    assert warehouse.backend == "ducklake"
    # Every location of the lake and the files tiers is an environment variable.
    fields = {k: v for k, v in warehouse.__dict__.items() if k.startswith(("lake_", "storage"))}
    assert all(isinstance(v, dg.EnvVar) for v in fields.values()), fields


def test_webserver_and_daemon_load_the_code_server_named_in_the_workspace() -> None:
    spec = compose()
    services = spec["services"]
    workspace = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    grpc = entry["grpc_server"]
    assert grpc["host"] == "code_server"  # the compose service name resolves on its network
    command = services["code_server"]["command"]
    assert command[command.index("--port") + 1] == str(grpc["port"])
    assert command[command.index("--location-name") + 1] == grpc["location_name"]

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert grpc["location_name"] == pyproject["tool"]["dagster"]["code_location_name"]
    # The code server serves deploy/definitions.py where the Dockerfile copies it.
    assert command[command.index("--python-file") + 1] == copied_to("deploy/definitions.py")

    # The webserver and the daemon read the workspace where the Dockerfile puts it.
    copies = [args for word, args in dockerfile_instructions() if word == "COPY"]
    home = dict(dockerfile_env())["DAGSTER_HOME"]
    assert any("deploy/workspace.yaml" in c and c.split()[-1].rstrip("/") == home for c in copies)
    for name in ("webserver", "daemon"):
        cmd = services[name]["command"]
        assert cmd[cmd.index("--workspace") + 1] == f"{home}/workspace.yaml"


def copied_to(source: str) -> str:
    """Where the Dockerfile's COPY puts ``source`` (a file destination, or a folder + name)."""
    for word, args in dockerfile_instructions():
        parts = shlex.split(args)
        if word == "COPY" and source in parts[:-1]:
            dest = parts[-1]
            return dest + Path(source).name if dest.endswith("/") else dest
    raise AssertionError(f"the Dockerfile does not copy {source}")


def dockerfile_env() -> list[tuple[str, str]]:
    pairs = []
    for word, args in dockerfile_instructions():
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                pairs.append((key, value))
    return pairs


def test_dockerfile_copies_paths_that_exist_and_starts_the_declared_location() -> None:
    instructions = dockerfile_instructions()
    copies = [shlex.split(args) for word, args in instructions if word == "COPY"]
    assert copies
    for args in copies:
        for source in args[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} missing"
    run = " ".join(args for word, args in instructions if word == "RUN")
    # the deploy extra, the lake's extension wheels, the webhook receiver's ASGI server
    assert "'.[deploy,lake,webhooks]'" in run
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"lake", "webhooks"} <= set(pyproject["project"]["optional-dependencies"])
    extras = pyproject["project"]["optional-dependencies"]["deploy"]
    assert {re.split(r"[<>=\[]", e)[0] for e in extras} >= {"dagster-postgres", "dagster-docker"}

    (cmd,) = [args for word, args in instructions if word == "CMD"]
    cmd = yaml.safe_load(cmd)  # the exec form is a JSON array
    assert cmd[:3] == ["dagster", "code-server", "start"]
    assert cmd[cmd.index("--python-file") + 1] == copied_to("deploy/definitions.py")
    assert [w for w, _ in instructions if w == "USER"] == ["USER"]  # not root at run time

    # BuildKit's per-Dockerfile ignore file must not exclude anything the COPYs need.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for args in copies:
        for source in args[:-1]:
            assert source.rstrip("/") in allowed, source


def test_run_launcher_config_validates_with_dagster_docker() -> None:
    launcher = instance_yaml()["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    result = process_config(DockerRunLauncher.config_type(), launcher["config"])
    assert result.success, result.errors
    built = DockerRunLauncher.from_config_value(None, result.value)  # type: ignore[arg-type]
    # Run containers join the compose network by its fixed name, so they reach PostgreSQL.
    network = compose()["networks"]["export_pipeline"]["name"]
    assert built.networks == [network]

    # Every variable the launcher copies into a run container is set on the daemon, which is
    # where DockerRunLauncher reads it (an unset one fails the launch).
    daemon_env = compose()["services"]["daemon"]["environment"]
    missing = [name for name in launcher["config"]["env_vars"] if name not in daemon_env]
    assert missing == []
    # ... and the code server sets the image runs start from.
    code_env = compose()["services"]["code_server"]["environment"]
    assert code_env["DAGSTER_CURRENT_IMAGE"] == compose()["services"]["code_server"]["image"]

    # A broken config is refused by the same schema (the check can fail).
    bad = dict(launcher["config"], network=["not", "a", "string"])
    assert not process_config(DockerRunLauncher.config_type(), bad).success


def test_every_variable_the_code_location_reads_reaches_sensors_and_runs() -> None:
    """Each ``dg.EnvVar`` of deploy/definitions.py's resources is set on the code server (where
    sensors evaluate) and forwarded into run containers by the launcher (from the daemon). A
    provider added to the project without its variables here fails this test."""
    from export_pipeline.defs.spec_resources import environment_variables
    from export_pipeline_tests.deploy.lake_worker import load_module

    resources = load_module().production_resources().values()
    wanted = set().union(*(environment_variables(r) for r in resources))
    assert {"LOCATIONS_API_TOKEN", "MEWS_CLIENT_TOKEN", "EXPORT_PIPELINE_LAKE_CATALOG"} <= wanted
    services = compose()["services"]
    launcher_env = set(instance_yaml()["run_launcher"]["config"]["env_vars"])
    assert wanted - set(services["code_server"]["environment"]) == set()
    assert wanted - set(services["daemon"]["environment"]) == set()
    assert wanted - launcher_env == set()


def test_every_compose_variable_is_documented_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text()))
    example = {
        line.split("=", 1)[0]
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used - example == set()


def test_ecs_launcher_notes_validate_with_dagster_aws() -> None:
    from dagster._core.instance.config import dagster_instance_config
    from dagster_aws.ecs import EcsRunLauncher

    ecs = yaml.safe_load((DEPLOY / "ecs" / "run_launcher.yaml").read_text())
    launcher = ecs["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_aws.ecs", "EcsRunLauncher")
    result = process_config(EcsRunLauncher.config_type(), launcher["config"])
    assert result.success, result.errors
    assert not process_config(EcsRunLauncher.config_type(), {"run_resources": 1}).success
    # Swapped into the production file, the whole instance config still validates.
    config, _ = dagster_instance_config(str(DEPLOY), overrides={"run_launcher": launcher})
    assert config["run_launcher"]["class"] == "EcsRunLauncher"


@pytest.mark.parametrize("name", ["docker-compose.yaml", "dagster.yaml", "workspace.yaml"])
def test_no_secret_literal_in_deploy_files(name: str) -> None:
    """Secrets reach containers from the environment; the files only name variables."""
    text = (DEPLOY / name).read_text()
    keys = re.compile(r"(?im)^\s*([\w-]*(?:password|token|secret|api_key)[\w-]*):\s*(\S+)")
    dsn = re.compile(r"(?i)password=(\S+)")
    found = [m.group(2) for m in keys.finditer(text)] + [m.group(1) for m in dsn.finditer(text)]
    assert all(value.startswith(("${", "{env:")) for value in found), found
    if name == "docker-compose.yaml":
        assert len(found) >= 5  # the check looked at something


def test_the_instance_schema_accepts_the_production_file() -> None:
    """The whole file against Dagster's instance schema (on PostgreSQL itself: see
    test_production_instance.py)."""
    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(DEPLOY))
    assert config["run_retries"] == {
        "enabled": True,
        "max_retries": 2,
        "retry_on_asset_or_op_failure": False,
    }
    assert config["run_monitoring"]["enabled"] is True
