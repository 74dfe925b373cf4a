"""Smoke test of ``python -m benchmarks.read_during_load`` at a tiny size: its plumbing works
(load children, the reader process, the JSON last line). No timing is asserted."""

from __future__ import annotations

import json

import pytest

from benchmarks import read_during_load


def test_read_during_load_reports_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert read_during_load.main(["--rows", "2000", "--interval", "0.05"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    for key in read_during_load.REQUIRED_KEYS:
        assert key in result, key
    assert result["rows"] == 2000
    assert result["reader_queries"] > 0 and result["reader_errors"] == 0
    assert result["ratio_with_reader"] == pytest.approx(
        result["seconds_with_reader"] / result["seconds_alone"], rel=0.01
    )
    assert result["publish_seconds"] > 0
