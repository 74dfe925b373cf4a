"""A lock wait names who holds the warehouse (pid; a load or a reader) and says what to do."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from export_pipeline.core.errors import WarehouseBusyError
from export_pipeline.core.ledger import Ledger, Warehouse

READER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
print("holding", flush=True)
sys.stdin.read()
"""
# A pipeline process: its command line names the package, as a Dagster run's or the CLI's does.
LOADER = """
import sys, duckdb  # export_pipeline load
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
sys.stdin.read()
"""


@contextmanager
def holding(script: str, path: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def connect(path: Path, lock_timeout: float) -> None:
    with Warehouse(path, lock_timeout=lock_timeout).connect():
        pass


@pytest.fixture
def warehouse_file(tmp_path: Path) -> Path:
    path = tmp_path / "w.duckdb"
    Ledger(Warehouse(path)).open_exports("locations")  # creates the file and the ledger
    return path


def test_a_reader_holding_the_file_is_named_as_a_reader(warehouse_file: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="export_pipeline")
    with holding(READER, warehouse_file) as reader, pytest.raises(WarehouseBusyError) as info:
        connect(warehouse_file, 0.3)
    message = str(info.value)
    assert f"a reader or another program (PID {reader.pid}) `" in message
    assert "close that session" in message  # what to do
    assert "gave up after 0s (warehouse.lock_timeout_seconds)" in message
    assert "a load is running" not in message
    assert f"(PID {reader.pid}) `" in caplog.text  # the wait itself was announced


def test_a_pipeline_process_holding_the_file_is_named_as_a_load(warehouse_file: Path) -> None:
    with holding(LOADER, warehouse_file) as loader, pytest.raises(WarehouseBusyError) as info:
        connect(warehouse_file, 0.2)
    message = str(info.value)
    assert f"a pipeline process (PID {loader.pid}) `" in message
    assert "a load or another run" in message and "ends by itself" in message
