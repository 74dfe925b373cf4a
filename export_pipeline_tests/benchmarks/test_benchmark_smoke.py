"""Smoke test of ``python -m benchmarks.ingest`` at a tiny size: it runs and reports its figures.

No timing assertions (the benchmark measures, it does not judge); this only guards the
benchmark's plumbing -- sandbox, real ingest child, baseline child, the JSON last line.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import ingest


def test_ingest_benchmark_reports_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert ingest.main(["--rows", "2000", "--repeat", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    for key in ingest.REQUIRED_KEYS:
        assert key in result, key
    # Each repeat against its own baseline, for the spread.
    for key in ("ratio_without_download_all", "ratio_end_to_end_all"):
        assert len(result[key]) == 2 and all(r > 0 for r in result[key]), key
    assert result["rows"] == 2000
    assert result["format"] == "json"
    assert result["bytes"] > 0
    assert result["seconds"] > 0 and result["baseline_seconds"] > 0
    assert result["ratio_vs_duckdb"] == pytest.approx(
        result["seconds"] / result["baseline_seconds"], rel=0.01
    )
    assert result["peak_rss_mb"] > 0 and result["baseline_peak_rss_mb"] > 0
    assert result["ratio_end_to_end"] == pytest.approx(
        result["seconds"] / (result["download_floor_seconds"] + result["baseline_seconds"]),
        rel=0.01,
    )
    for phase in ("download_seconds", "normalise_seconds", "load_seconds"):
        assert result[phase] >= 0, phase
    # The same ratios in each child's CPU seconds (steadier on a shared machine).
    assert result["cpu_seconds"] > 0 and result["baseline_cpu_seconds"] > 0
    assert result["cpu_ratio_end_to_end"] == pytest.approx(
        result["cpu_seconds"]
        / (result["download_floor_cpu_seconds"] + result["baseline_cpu_seconds"]),
        rel=0.01,
    )
    # Measured by a child of its own (the local run): at 2,000 rows it can take more CPU than
    # the sync on a busy machine (CI saw 4.28 against 3.86), so no order between the two.
    assert result["cpu_ratio_without_download"] > 0
    # Progress lines come before the JSON.
    assert any("ingest:" in line for line in lines[:-1])


def test_rows_sweep_reports_rss_per_size(capsys: pytest.CaptureFixture[str]) -> None:
    assert ingest.main(["--rows-sweep", "500,1000", "--format", "csv"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    assert result["rows"] == 1000 and result["format"] == "csv"
    assert set(result["rss_by_rows"]) == {"500", "1000"}
    assert all(v["peak_rss_mb"] > 0 for v in result["rss_by_rows"].values())
    # One JSON line per size before the final one.
    per_size = [json.loads(line) for line in lines[:-1] if line.startswith("{")]
    assert [r["rows"] for r in per_size] == [500, 1000]


def test_mews_multipart_benchmark_reports_json_last_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks import mews_multipart

    assert mews_multipart.main(["--rows", "2000", "--parts", "4"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    assert (result["rows"], result["parts"]) == (2000, 4)
    # Without the download is a run of its own on the downloaded parts (the sync overlaps
    # its download with the parse), and the figures say so.
    local = [line for line in lines if "ingest of the downloaded parts (no download)" in line]
    assert len(local) == 1
    local_seconds = float(local[0].split(": ", 1)[1].split("s,", 1)[0])
    assert result["seconds_without_download"] == pytest.approx(local_seconds, abs=0.006)
    assert result["ratio_without_download"] == pytest.approx(
        result["seconds_without_download"] / result["baseline_seconds"], rel=0.01
    )
    assert result["ratio_vs_duckdb"] == pytest.approx(
        result["seconds"] / result["baseline_seconds"], rel=0.01
    )
    assert result["ratio_vs_duckdb_full_scan"] > 0
    assert result["ratio_end_to_end"] > 0 and result["download_floor_seconds"] > 0
    # The floor is the better of the plain GETs one part after another and 4 at once.
    assert result["download_floor_seconds"] == min(
        result["download_floor_sequential_seconds"], result["download_floor_parallel_seconds"]
    )
    assert result["peak_rss_mb"] > 0 and result["baseline_peak_rss_mb"] > 0
    assert result["cpu_ratio_without_download"] > 0 and result["cpu_ratio_end_to_end"] > 0


def test_small_syncs_benchmark_reports_json_last_line(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import small_syncs

    assert small_syncs.main(["--job", "locations_sync", "--no-baseline"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    assert result["benchmark"] == "small_syncs" and result["job"] == "locations_sync"
    # the asset and its 2 views (its checks run after the load, in a run of their own)
    assert result["rows"] == 50 and result["steps"] == 3
    assert result["seconds"] > 0


def test_small_syncs_baseline_plans_the_same_steps_as_the_sync_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The baseline differs only in its executor: the checks the sync job leaves to
    data_checks_sensor are not steps of the baseline either."""
    from benchmarks import small_syncs

    monkeypatch.setenv(small_syncs._JOB_ENV, "mews_sync")
    plans = {}
    for executor in ("project", "multiprocess"):
        monkeypatch.setenv(small_syncs._EXECUTOR_ENV, executor)
        job = small_syncs._job()
        plans[executor] = sorted(node.name for node in job.graph.nodes)
    assert len(plans["project"]) == 9  # the 9 Mews kinds
    assert plans["multiprocess"] == plans["project"]
