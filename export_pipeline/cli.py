"""``export-pipeline``: the demo, the sandbox, the webhook receiver, ``dev`` (sandbox + UI) and
``sql`` (read-only queries on the warehouse's read path)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from export_pipeline.sandbox.bundle import Sandbox


def _demo(args: argparse.Namespace) -> int:
    from export_pipeline.sandbox.demo import run_demo

    return run_demo(
        Path(args.data_dir),
        rows=args.rows,
        changes=args.changes,
        keep=args.keep,
        log_level=args.log_level,
    )


def _pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """``NAME=VALUE`` (or bare ``NAME``) options as a dict, in order."""
    out: dict[str, str] = {}
    for item in values or []:
        name, _, value = item.partition("=")
        if not name:
            raise SystemExit(f"export-pipeline: bad {what} {item!r} (NAME=VALUE)")
        out[name.strip()] = value.strip()
    return out


def _mapping_jobs(values: list[str] | None) -> dict[str, int]:
    jobs = _pairs(values, "--mapping-job")
    try:
        return {job: int(n or 20) for job, n in jobs.items()}
    except ValueError as exc:
        raise SystemExit(
            f"export-pipeline: --mapping-job ID=RESULTS needs a number ({exc})"
        ) from None


def _start_sandbox(args: argparse.Namespace, ports: dict[str, int] | None = None) -> Sandbox:
    from export_pipeline.sandbox.bundle import start_sandbox

    sandbox = start_sandbox(
        ports,
        n_locations=args.rows,
        mews_options={"default_count": args.mews_rows},
        mapping_jobs=_mapping_jobs(args.mapping_job) or {"sandbox-job-1": 20},
    )
    try:
        sandbox.apply_faults(_pairs(args.fault, "--fault"))
    except ValueError as exc:
        sandbox.stop()
        raise SystemExit(f"export-pipeline: {exc}") from None
    return sandbox


def _sandbox(args: argparse.Namespace) -> int:
    from export_pipeline.sandbox.bundle import fixed_ports

    ports = fixed_ports() if args.fixed_ports else {}
    with _start_sandbox(args, ports) as sandbox:
        print("sandbox providers are up; export these to point the project at them:")
        for key, value in sandbox.env().items():
            print(f"export {key}={value}")
        print(f"mapping jobs: {', '.join(sandbox.mapping.jobs)}")
        sys.stdout.flush()
        try:
            threading.Event().wait()  # serve until interrupted
        except KeyboardInterrupt:
            return 0
    return 0


def instance_home(path: str) -> Path:
    """A persistent ``DAGSTER_HOME`` using the repo's ``dagster.yaml`` (run history survives
    restarts). The file is copied when it changed, so edits to the repo's copy apply."""
    home = Path(path).resolve()
    home.mkdir(parents=True, exist_ok=True)
    source = Path("dagster.yaml")
    target = home / "dagster.yaml"
    if source.is_file() and (not target.exists() or target.read_text() != source.read_text()):
        shutil.copyfile(source, target)
    return home


# The code location `dg dev` serves outside the project's root (an installed package): the
# same name as in the project's [tool.dg.project], so run history and sensor state carry over.
DEV_WORKSPACE = """\
load_from:
  - python_module:
      module_name: export_pipeline.definitions
      attribute: defs
      location_name: export_pipeline
"""


def is_dg_project(path: Path) -> bool:
    """Whether ``path`` is this project's root for ``dg`` (pyproject.toml with [tool.dg])."""
    import tomllib

    pyproject = path / "pyproject.toml"
    if not pyproject.is_file():
        return False
    dg_config = tomllib.loads(pyproject.read_text()).get("tool", {}).get("dg", {})
    return (
        dg_config.get("directory_type") == "project"
        and dg_config.get("project", {}).get("root_module") == "export_pipeline"
    )


def dg_dev_command(home: Path, host: str, port: int) -> list[str]:
    """``dg dev`` (the webserver and the daemon). In the project's root, dg builds the workspace
    from [tool.dg.project]; elsewhere it gets a workspace file in the instance directory."""
    dg = Path(sys.executable).with_name("dg")
    found = str(dg) if dg.exists() else shutil.which("dg")
    if found is None:  # dagster-dg-cli comes with the sandbox extra
        raise ModuleNotFoundError("No module named 'dagster_dg_cli'", name="dagster_dg_cli")
    cmd = [found, "dev", "-h", host, "-p", str(port)]
    if not is_dg_project(Path.cwd()):
        workspace = home / "workspace.yaml"
        workspace.write_text(DEV_WORKSPACE)
        cmd += ["-w", str(workspace)]
    return cmd


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _group_alive(child: subprocess.Popen[bytes]) -> bool:
    """Whether the child (reaped here) or any member of its group (webserver, daemon, code
    server) is still running."""
    if child.poll() is None:
        return True
    try:
        os.killpg(child.pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_group(child: subprocess.Popen[bytes], signum: int, timeout: float) -> None:
    """``signum`` to the child's whole process group, then SIGKILL to what is left after
    ``timeout`` seconds; returns once no member remains (or SIGKILL's wait ran out)."""
    for sig in (signum, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        deadline = time.monotonic() + timeout
        while _group_alive(child):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return


def run_in_own_group(
    cmd: list[str], env: dict[str, str] | None = None, stop_timeout: float = 20.0
) -> int:
    """Run ``cmd`` in a process group of its own and stop that whole group when this process
    gets SIGTERM, SIGINT or SIGHUP. ``dg dev`` starts a webserver, a daemon and code servers; a
    plain ``subprocess.call`` left them running as orphans when ``export-pipeline dev`` was
    killed (only a terminal's Ctrl-C, sent to the whole foreground group, reached them)."""

    def stop(signum: int, _frame: object) -> None:
        raise _Stop(signum)

    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    watched = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, stop) for sig in watched}
    try:
        return child.wait()
    except _Stop as received:
        for sig in watched:  # a second signal must not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        _stop_group(child, received.signum, stop_timeout)
        return 128 + received.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            _stop_group(child, signal.SIGTERM, stop_timeout)


def _dev(args: argparse.Namespace) -> int:
    """The sandbox plus the Dagster UI and daemon in one command, wired together by environment.

    The sandbox starts from its seed, then simulates activity (``--changes`` locations updated,
    half as many added, "now"), so the first Materialize after ``export-pipeline demo`` loads
    those rows incrementally; its mapping jobs are registered as ``mapping_jobs`` partitions.
    """
    import dagster as dg

    home = instance_home(args.dagster_home)
    with _start_sandbox(args) as sandbox:
        if args.changes:
            sandbox.simulate_activity(args.changes)
        # Loopback only: Dagster's telemetry would otherwise upload to telemetry.dagster.io.
        env = {
            "DAGSTER_DISABLE_TELEMETRY": "1",
            **os.environ,
            **sandbox.env(),
            "DAGSTER_HOME": str(home),
        }
        if sys.prefix != sys.base_prefix:  # dg compares the active venv with the project's
            env["VIRTUAL_ENV"] = sys.prefix
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions("mapping_jobs", list(sandbox.mapping.jobs))
        cmd = dg_dev_command(home, args.host, args.port)
        print(
            f"sandbox up (mapping jobs: {', '.join(sandbox.mapping.jobs)}); "
            f"DAGSTER_HOME={home}; starting: {' '.join(cmd)}",
            flush=True,
        )
        return run_in_own_group(cmd, env)


def _webhooks(args: argparse.Namespace) -> int:
    from export_pipeline.core.errors import ConfigurationError
    from export_pipeline.webhooks.serve import serve

    try:
        serve(host=args.host, port=args.port, store_path=Path(args.store))
    except ConfigurationError as exc:
        print(f"export-pipeline webhooks: {exc}", file=sys.stderr)
        return 2
    return 0


def _exports(args: argparse.Namespace) -> int:
    from export_pipeline.core.errors import ExportPipelineError
    from export_pipeline.core.ledger import Ledger, Warehouse

    ledger = Ledger(Warehouse(args.warehouse, lock_timeout=args.lock_timeout))
    try:
        if args.exports_command == "abandon":
            record = ledger.abandon(args.provider, args.export_id, reason=args.reason)
            print(
                f"{record.provider} export {record.export_id} ({record.kind}) abandoned: "
                "no run adopts it again; the next sync requests a new export. Its raw files "
                "stay for inspection under the retention setting."
            )
            return 0
        rows = ledger.open_exports(args.provider)
        for r in rows:
            holder = f" claimed by {r.lease_owner}" if r.lease_owner else ""
            print(f"{r.export_id}\t{r.kind}\t{r.state}\tfailures={r.permanent_failures}{holder}")
        return 0
    except (KeyError, ValueError, ExportPipelineError) as exc:
        print(f"export-pipeline exports: {exc}", file=sys.stderr)
        return 2


# Statement types `sql` runs: queries only (SELECT covers SHOW, DESCRIBE, SUMMARIZE, PRAGMA).
_READ_STATEMENTS = ("SELECT", "EXPLAIN")


def _sql_connection(args: argparse.Namespace):
    """A read-only connection on the read path: the published replica (backend duckdb) or the
    lake attached READ_ONLY (backend ducklake). Returns (connection, {name: kind})."""
    import duckdb

    if args.backend == "ducklake":
        from export_pipeline.core.warehouse import DuckLakeWarehouse, extension_directory

        catalog = args.lake_catalog or os.environ.get("EXPORT_PIPELINE_LAKE_CATALOG")
        lake = DuckLakeWarehouse(catalog or "data/lake/catalog.sqlite", args.lake_data_path)
        if lake.catalog_kind == "sqlite" and not Path(lake.catalog_target).exists():
            raise FileNotFoundError(f"no lake catalog at {lake.catalog_target}")
        con = duckdb.connect(
            config={
                "extension_directory": str(extension_directory()),
                "autoinstall_known_extensions": False,
            }
        )
        con.execute(lake.attach_sql(read_only=True))
        con.execute("USE lake")
        con.execute("SET lock_configuration = true")
        rows = con.execute(
            "SELECT schema_name || '.' || table_name, 'table' FROM duckdb_tables() "
            "WHERE database_name = 'lake' UNION ALL "
            "SELECT schema_name || '.' || view_name, 'view' FROM duckdb_views() "
            "WHERE database_name = 'lake' AND NOT internal"
        ).fetchall()
        return con, dict(rows)

    from export_pipeline.core.replica import open_replica, read_manifest

    read_dir = Path(args.read_dir) if args.read_dir else Path(args.data_dir) / "read"
    try:
        con = open_replica(read_dir)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no read replica in {read_dir}: it is published after each load "
            "(run a sync first, e.g. `export-pipeline demo`)"
        ) from None
    published = set(read_manifest(read_dir).get("tables", {}))
    rows = con.execute(
        "SELECT schema_name || '.' || view_name FROM duckdb_views() "
        "WHERE NOT internal AND database_name = current_database()"
    ).fetchall()
    return con, {r[0]: ("table" if r[0] in published else "view") for r in rows}


def _print_rows(columns: list[str], rows, fmt: str) -> None:
    """Write ``rows`` (an iterator of batches) to stdout as CSV, JSON (an array) or a table."""
    import csv

    out = sys.stdout
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(columns)
        for batch in rows:
            writer.writerows(batch)
    elif fmt == "json":
        out.write("[")
        first = True
        for batch in rows:
            for row in batch:
                out.write(
                    ("\n" if first else ",\n")
                    + json.dumps(dict(zip(columns, row, strict=True)), default=str)
                )
                first = False
        out.write("\n]\n")
    else:
        table = [
            [("NULL" if v is None else str(v)) for v in row] for batch in rows for row in batch
        ]
        widths = [len(c) for c in columns]
        for row in table:
            widths = [max(w, min(len(v), 60)) for w, v in zip(widths, row, strict=True)]

        def line(values: list[str]) -> str:
            cells = [v if len(v) <= 60 else v[:59] + "…" for v in values]
            return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        out.write(line(columns) + "\n")
        out.write("-+-".join("-" * w for w in widths) + "\n")
        for row in table:
            out.write(line(row) + "\n")
        out.write(f"({len(table)} row{'s' if len(table) != 1 else ''})\n")


def _sql(args: argparse.Namespace) -> int:
    """Query the warehouse on its read path: never blocks a load, never blocked by one."""
    import duckdb

    try:
        con, objects = _sql_connection(args)
    except FileNotFoundError as exc:
        print(f"export-pipeline sql: {exc}", file=sys.stderr)
        return 2
    try:
        if not args.query:
            listing = sorted(objects.items())
            _print_rows(["name", "type"], [listing], args.format)
            return 0
        statements = con.extract_statements(args.query)
        refused = [st.type.name for st in statements if st.type.name not in _READ_STATEMENTS]
        if refused:
            print(
                f"export-pipeline sql: read-only; refused statement type(s) {', '.join(refused)}",
                file=sys.stderr,
            )
            return 2
        for statement in statements[:-1]:
            con.execute(statement)
        cursor = con.execute(statements[-1])
        columns = [d[0] for d in cursor.description or []]

        def batches():
            while batch := cursor.fetchmany(10_000):
                yield batch

        _print_rows(columns, batches(), args.format)
        return 0
    except duckdb.Error as exc:
        print(f"export-pipeline sql: {exc}", file=sys.stderr)
        return 1
    finally:
        con.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="full then incremental locations sync against the sandbox")
    demo.add_argument("--data-dir", default="data")
    demo.add_argument("--rows", type=int, default=2000, help="locations in the sandbox")
    demo.add_argument("--changes", type=int, default=100, help="locations updated between syncs")
    demo.add_argument("--keep", action="store_true", help="do not reset the demo warehouse")
    demo.add_argument("--log-level", default="warning", help="Dagster console log level")
    demo.set_defaults(func=_demo)

    sandbox = sub.add_parser("sandbox", help="the bundled provider simulators")
    sandbox_sub = sandbox.add_subparsers(dest="sandbox_command", required=True)
    serve = sandbox_sub.add_parser("serve", help="run every simulator until interrupted")
    _sandbox_options(serve)
    serve.add_argument(
        "--random-ports",
        dest="fixed_ports",
        action="store_false",
        help="use free ports instead of each simulator's declared one (ExportProvider.sandbox; "
        "S3 on 8705)",
    )
    serve.set_defaults(func=_sandbox)

    dev = sub.add_parser("dev", help="sandbox + `dg dev` (the UI and daemon) wired together")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    dev.add_argument(
        "--dagster-home",
        default="data/dagster_home",
        help="persistent instance directory (run history); gets the repo's dagster.yaml",
    )
    dev.add_argument(
        "--changes",
        type=int,
        default=100,
        help="locations the sandbox changes at start (half as many are added)",
    )
    _sandbox_options(dev)
    dev.set_defaults(func=_dev)

    sql = sub.add_parser(
        "sql",
        help="query the warehouse read-only on its read path (works while loads run)",
        description="Run a read-only query on the warehouse's read path: the replica published "
        "after each load (backend duckdb) or the lake attached READ_ONLY (backend ducklake). "
        "Without a query, list the tables and views.",
    )
    sql.add_argument("query", nargs="?", help="SQL (SELECT, SHOW, DESCRIBE, SUMMARIZE …)")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.add_argument("--data-dir", default="data", help="the warehouse's data dir")
    sql.add_argument("--read-dir", help="the published replica's folder (default DATA_DIR/read)")
    sql.add_argument("--backend", choices=("duckdb", "ducklake"), default="duckdb")
    sql.add_argument(
        "--lake-catalog",
        help="ducklake: SQLite path or postgres:<DSN> (default $EXPORT_PIPELINE_LAKE_CATALOG, "
        "else data/lake/catalog.sqlite)",
    )
    sql.add_argument("--lake-data-path", default="data/lake/files")
    sql.set_defaults(func=_sql)

    webhooks = sub.add_parser("webhooks", help="the push receiver for export events")
    webhooks_sub = webhooks.add_subparsers(dest="webhooks_command", required=True)
    wserve = webhooks_sub.add_parser("serve", help="serve POST .../exports/events")
    wserve.add_argument("--host", default="127.0.0.1")
    wserve.add_argument("--port", type=int, default=8787)
    wserve.add_argument("--store", default="data/webhook_events.sqlite3")
    wserve.set_defaults(func=_webhooks)

    exports = sub.add_parser("exports", help="inspect open exports, abandon a bad one")
    exports.add_argument("--warehouse", default="data/warehouse.duckdb")
    exports.add_argument("--lock-timeout", type=float, default=60.0)
    exports_sub = exports.add_subparsers(dest="exports_command", required=True)
    eopen = exports_sub.add_parser("open", help="open exports of a provider, with their claims")
    eopen.add_argument("provider")
    eopen.set_defaults(func=_exports)
    abandon = exports_sub.add_parser(
        "abandon", help="give up an export on purpose: the next run requests a new one"
    )
    abandon.add_argument("provider")
    abandon.add_argument("export_id")
    abandon.add_argument("--reason", default="", help="recorded in the ledger")
    abandon.set_defaults(func=_exports)
    return parser


def _sandbox_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=2000, help="locations in the sandbox")
    parser.add_argument("--mews-rows", type=int, default=50, help="records per Mews entity type")
    parser.add_argument(
        "--mapping-job",
        action="append",
        metavar="ID=RESULTS",
        help="a mapping job the sandbox serves (repeatable; default sandbox-job-1=20)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        metavar="NAME[=VALUE]",
        help="rate_limit=N, slow=SECONDS, fail_next_export, truncate_next_download (repeatable)",
    )


# Imported only by the commands that need them (a production install has none of them).
EXTRAS = {
    "moto": "sandbox",
    "werkzeug": "sandbox",
    "dagster_dg_cli": "sandbox",  # `dev` runs `dg dev`
    "starlette": None,
    "uvicorn": None,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in EXTRAS:
            raise
        extra = EXTRAS[top] or ("webhooks" if args.command == "webhooks" else "sandbox")
        print(
            f"export-pipeline {args.command}: needs {top}, from the `{extra}` extra: "
            f"pip install 'export_pipeline[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
