"""Poison-export policy: a bad export is retired after its budget, never blocks its kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from export_pipeline.cli import main
from export_pipeline.core.errors import ExportFailedError, ParseError
from export_pipeline.core.model import ExportRequest, ExportState
from export_pipeline.providers.locations import LOCATIONS
from export_pipeline_tests.providers.locations.conftest import N_LOCATIONS, LocationsSandbox
from export_pipeline_tests.reliability.conftest import MakeRunner, exports, table_rows

BAD_JSON = b'[\n{"id": "LOC1", "name": "ok"},\n{"id": "LOC2", "name": \n]\n'


def test_a_bad_export_is_retired_after_its_budget_and_the_next_run_asks_anew(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    sandbox = locations_sandbox.state
    sandbox.corrupt_next_export = BAD_JSON
    runner = make_runner(poison_budget=2)

    with pytest.raises(ParseError) as first:
        runner.sync(LOCATIONS, ExportRequest(params={"format": "json"}))
    bad_id = first.value.export_id
    assert bad_id and "line" in str(first.value)
    assert exports(runner) == [(bad_id, "ready", 1)]  # within budget: still adoptable
    downloads = sandbox.downloads

    # The next run adopts it (a fixed pipeline could read it), re-reads the verified raw file
    # instead of downloading it again, fails the same way, and so uses up the budget.
    with pytest.raises(ParseError):
        make_runner(poison_budget=2).sync(LOCATIONS, ExportRequest(params={"format": "json"}))
    assert sandbox.downloads == downloads
    assert sandbox.call_counts["request"] == 1
    record = runner.ledger.get("locations", bad_id)
    assert record is not None and record.state is ExportState.FAILED
    assert record.permanent_failures == 2
    assert record.error_message and record.error_message.startswith("retired after 2")
    # Its raw file is kept for inspection.
    raw = Path(runner.storage.local_dir("raw", LOCATIONS, bad_id))
    assert [p.read_bytes() for p in raw.iterdir()] == [BAD_JSON]

    # The run after requests a new export by itself and recovers.
    result = make_runner(poison_budget=2).sync(LOCATIONS, ExportRequest(params={"format": "json"}))
    assert result.export_id != bad_id and not result.adopted
    assert table_rows(runner) == (N_LOCATIONS, N_LOCATIONS)
    # An explicit ingest of the retired export is refused, naming why.
    with pytest.raises(ExportFailedError, match="retired after 2"):
        runner.ingest(LOCATIONS, bad_id)


def test_full_refresh_and_another_format_never_adopt_an_open_export(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    sandbox = locations_sandbox.state
    sandbox.corrupt_next_export = BAD_JSON
    runner = make_runner()
    with pytest.raises(ParseError):
        runner.sync(LOCATIONS, ExportRequest(params={"format": "json"}))
    [(bad_id, state, _)] = exports(runner)
    assert state == "ready"

    csv = make_runner().sync(LOCATIONS, ExportRequest(params={"format": "csv"}))
    assert csv.export_id != bad_id and not csv.adopted
    full = make_runner().sync(LOCATIONS, ExportRequest(params={"format": "json"}), adopt=False)
    assert full.export_id not in (bad_id, csv.export_id) and not full.adopted
    assert sandbox.call_counts["request"] == 3
    assert table_rows(runner) == (N_LOCATIONS, N_LOCATIONS)


def test_an_operator_abandons_an_export_from_the_command_line(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner, tmp_path: Path, capsys
) -> None:
    sandbox = locations_sandbox.state
    runner = make_runner()
    record, _ = runner.start(LOCATIONS, ExportRequest(params={"format": "json"}))
    warehouse = str(tmp_path / "w.duckdb")

    assert main(["exports", "--warehouse", warehouse, "open", "locations"]) == 0
    assert record.export_id in capsys.readouterr().out
    code = main(
        ["exports", "--warehouse", warehouse, "abandon", "locations", record.export_id,
         "--reason", "provider support says the file is broken"]
    )  # fmt: skip
    assert code == 0
    assert "abandoned" in capsys.readouterr().out
    abandoned = runner.ledger.get("locations", record.export_id)
    assert abandoned is not None and abandoned.state is ExportState.FAILED
    assert abandoned.error_code == "ABANDONED"
    assert "provider support" in (abandoned.error_message or "")

    result = make_runner().sync(LOCATIONS, ExportRequest(params={"format": "json"}))
    assert result.export_id != record.export_id and not result.adopted
    assert sandbox.call_counts["request"] == 2
    # A loaded export cannot be abandoned; an unknown one is named.
    assert (
        main(["exports", "--warehouse", warehouse, "abandon", "locations", result.export_id]) == 2
    )
    assert "already loaded" in capsys.readouterr().err
    assert main(["exports", "--warehouse", warehouse, "abandon", "locations", "nope"]) == 2


def test_a_file_shape_the_reader_chokes_on_is_a_parse_failure_of_that_export(
    locations_sandbox: LocationsSandbox, make_runner: MakeRunner
) -> None:
    """A ragged CSV (a row with a missing and a row with an extra field): the run fails naming
    the provider, export and file, and it counts against the export's budget instead of
    leaving it open for good."""
    sandbox = locations_sandbox.state
    sandbox.corrupt_next_export = b"id,name,city\r\nL1,a,x\r\nL2,b\r\nL3,c,y,extra\r\n"
    runner = make_runner(poison_budget=1)
    with pytest.raises(ParseError) as info:
        runner.sync(LOCATIONS, ExportRequest(params={"format": "csv"}))
    assert info.value.provider == "locations" and info.value.export_id
    assert info.value.file and info.value.file.endswith(".csv")
    [(export_id, state, failures)] = exports(runner)
    assert (export_id, state, failures) == (info.value.export_id, "failed", 1)
