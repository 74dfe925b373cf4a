"""The suite's loopback-only guard itself: it refuses before connecting, in this process and in
Python children, and a refusal fails the test even when the caller swallowed the error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from export_pipeline.defs.resources import LazyS3Resource
from export_pipeline_tests.conftest import netguard


def _forget(before: int) -> list[str]:
    """Take the attempts this test provoked on purpose out of the record (so it can pass)."""
    taken = netguard.ATTEMPTS[before:]
    del netguard.ATTEMPTS[before:]
    return taken


def test_connect_and_dns_off_loopback_are_refused_in_process() -> None:
    before = len(netguard.ATTEMPTS)
    with pytest.raises(netguard.NetworkGuardError):
        socket.create_connection(("192.0.2.1", 80), timeout=5)  # TEST-NET-1: never routed
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.com", 443)
    sock = socket.socket()
    try:
        assert sock.connect_ex(("169.254.169.254", 80)) != 0 or True
    except netguard.NetworkGuardError:
        pass
    finally:
        sock.close()
    taken = _forget(before)
    assert len(taken) == 3, taken
    assert "192.0.2.1" in taken[0] and "example.com" in taken[1] and "169.254" in taken[2]
    # Loopback and localhost stay usable.
    assert socket.getaddrinfo("localhost", 80)
    assert socket.getaddrinfo("127.0.0.1", 80)


def test_children_are_guarded_and_reported(tmp_path: Path) -> None:
    log = Path(os.environ[netguard.ENV_LOG])
    size = log.stat().st_size
    code = "import socket; socket.create_connection(('192.0.2.1', 80), timeout=5)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    try:
        assert proc.returncode != 0
        assert "network guard" in proc.stderr
        assert "192.0.2.1" in log.read_text()[size:]
    finally:
        with log.open("r+") as f:  # forget the provoked attempt
            f.truncate(size)


def test_lazy_s3_resource_builds_no_client_until_asked() -> None:
    """The default ``s3`` resource hands steps itself, not a boto3 client: nothing probes the
    instance-metadata address when storage is local (the guard would fail this test)."""

    @dg.asset(required_resource_keys={"s3"})
    def uses_s3(context) -> str:
        return type(context.resources.s3).__name__

    result = dg.materialize([uses_s3], resources={"s3": LazyS3Resource()})
    assert result.output_for_node("uses_s3") == "LazyS3Resource"
