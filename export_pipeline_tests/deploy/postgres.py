"""A throwaway PostgreSQL server from the Debian packages, for the deployment tests.

``initdb`` + ``pg_ctl`` from ``/usr/lib/postgresql/<version>/bin`` (``apt-get install
postgresql``; ``.ci/run`` installs it), a temporary data directory, loopback TCP on a free port,
no Unix socket, password (SCRAM) authentication. PostgreSQL refuses to run as root, so when the
tests run as root the server runs as the ``postgres`` system user the package creates.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from export_pipeline.sandbox.server import free_port

SUPERUSER = "export_pipeline"
SERVICE_USER = "postgres"  # created by the Debian package; used only when we are root


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries (or a user to run them as) are missing."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/*/bin`` that has ``initdb`` and ``pg_ctl``."""
    candidates = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bin_dir = Path(initdb).parent
        try:
            version = int(bin_dir.parent.name.split(".")[0])
        except ValueError:
            continue
        if (bin_dir / "pg_ctl").exists():
            candidates.append((version, bin_dir))
    if not candidates:
        raise PostgresUnavailable(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
            "(install them with `apt-get install -y postgresql`; .ci/run does)"
        )
    return max(candidates)[1]


@dataclass
class PostgresServer:
    """A running server; ``stop()`` (or leaving the ``with`` block) removes everything."""

    bin_dir: Path = field(default_factory=find_bin_dir)
    host: str = "127.0.0.1"
    port: int = 0
    user: str = SUPERUSER
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    root: Path | None = None

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def _as_service_user(self, argv: Sequence[str]) -> list[str]:
        if os.geteuid() != 0:
            return list(argv)
        return ["runuser", "-u", SERVICE_USER, "--", *argv]

    def _run(self, argv: Sequence[str]) -> None:
        proc = subprocess.run(
            self._as_service_user(argv), capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv[:2])} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )

    def start(self) -> PostgresServer:
        try:
            return self._start()
        except BaseException:
            self.stop()  # nothing left behind: no server, no data directory
            raise

    def _start(self) -> PostgresServer:
        if os.geteuid() == 0:
            try:
                import pwd

                service = pwd.getpwnam(SERVICE_USER)
            except KeyError as exc:
                raise PostgresUnavailable(
                    f"running as root and there is no '{SERVICE_USER}' user to run PostgreSQL "
                    "as (the postgresql package creates it)"
                ) from exc
        # Under /tmp (world-traversable), not pytest's per-user tmp (0700, root-owned).
        self.root = Path(tempfile.mkdtemp(prefix="export-pipeline-pg-"))
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            os.chown(self.root, service.pw_uid, service.pw_gid)
            os.chown(pwfile, service.pw_uid, service.pw_gid)
        os.chmod(pwfile, 0o600)
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # a test cluster: no fsync at creation
            ]
        )
        pwfile.unlink()
        self.port = self.port or free_port(self.host)
        options = " ".join(
            [
                f"-c listen_addresses={self.host}",
                f"-c port={self.port}",
                "-c unix_socket_directories=''",
                "-c fsync=off",  # throwaway data: durability is not under test here
                "-c max_connections=200",  # daemon + code server + runs + lake clients
            ]
        )
        try:
            self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    str(self.root / "server.log"),
                    "-o",
                    options,
                ]
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nserver log:\n{self.log()[-3000:]}") from None
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run(
                    [str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast"]
                )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        path = (self.root or Path("/nonexistent")) / "server.log"
        return path.read_text() if path.exists() else ""

    def url(self, database: str = "postgres") -> str:
        """A libpq URL (``postgresql://user:password@host:port/db``)."""
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (fresh: dropped first if it exists); returns its URL."""
        import psycopg2

        con = psycopg2.connect(self.url())
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return self.url(name)

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg2

        con = psycopg2.connect(self.url(database))
        try:
            with con.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            con.close()
