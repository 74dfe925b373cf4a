"""README's path in a real browser: `export-pipeline demo`, then `export-pipeline dev` (webserver
and daemon on loopback against the sandbox), driven by Debian's chromium through Playwright.

Needs /usr/bin/chromium (`apt-get install -y chromium`, done by .ci/run) and the `playwright`
package (dev extra); Playwright's own browser download is never used. Set
EXPORT_PIPELINE_SCREENSHOTS=1 to refresh docs/screenshots/*.png from this run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import httpx
import pytest

from export_pipeline.sandbox.server import free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def asset_groups() -> dict[str, set[str]]:
    """Every asset the definitions hold, by group: a new provider's assets are checked too."""
    from export_pipeline.definitions import defs

    graph = defs.resolve_asset_graph()
    groups: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        groups.setdefault(graph.get(key).group_name, set()).add(key.path[-1])
    return groups


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "export_pipeline.cli", *args]


@pytest.fixture
def ui(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """README's two commands in a fresh directory: the demo, then `dev` on a free port."""
    assert CHROMIUM.exists(), "apt-get install -y chromium (.ci/run does)"
    for name in ("workspace.yaml", "dagster.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    demo = subprocess.run(
        cli("demo", "--rows", "300", "--changes", "20"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    port = free_port()
    log = (tmp_path / "dev.log").open("w")
    dev = subprocess.Popen(
        cli("dev", "--port", str(port), "--rows", "300", "--changes", "20"),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Dagster's freshness daemon evaluates every 30 s by default; the test waits for it.
        env={**os.environ, "FRESHNESS_DAEMON_INTERVAL_SECONDS": "5"},
        start_new_session=True,  # its own process group: the webserver and daemon stop with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert dev.poll() is None, (tmp_path / "dev.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "dagster dev did not come up"
            time.sleep(1)
        yield base, tmp_path
    finally:
        os.killpg(dev.pid, signal.SIGTERM)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(timeout=30)
        log.close()


def shoot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"))
    if os.environ.get("EXPORT_PIPELINE_SCREENSHOTS") == "1":
        page.screenshot(path=str(REPO / "docs" / "screenshots" / f"{name}.png"))


def test_readme_path_in_a_real_browser(ui: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    base, work = ui
    warehouse = work / "data" / "warehouse.duckdb"
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1600, "height": 1000},
        )
        page = browser.new_page()
        page.set_default_timeout(60_000)
        # The UI's community dialog (an e-mail field and "Skip", first visit only) can open
        # after the page settled and then takes every click: skip it whenever it shows.
        page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda skip: skip.click())

        # Every asset in its group's lineage graph. The graph renders only the nodes inside the
        # viewport and opens wherever it likes: pan up from there, then down, until all are seen.
        for n, (group, names) in enumerate(sorted(asset_groups().items())):
            url = f"{base}/locations/export_pipeline/asset-groups/{group}"
            page.goto(url, wait_until="networkidle")
            page.get_by_text("Latest event").first.wait_for()  # a node drawn
            if n == 0:
                shoot(page, tmp_path, "asset-graph")
            page.mouse.move(1000, 600)
            seen: set[str] = set()
            for dy in [-400] * 6 + [400] * 30:
                html = page.content()
                seen |= {name for name in names if f">{name}<" in html}
                if seen == names:
                    break
                page.mouse.wheel(0, dy)
                page.wait_for_timeout(200)
            assert seen == names, f"not in the {group} graph: {sorted(names - seen)}"

        # Materialize locations/locations from its page and wait for the run to succeed.
        page.goto(f"{base}/assets/locations/locations", wait_until="networkidle")
        page.get_by_role("button", name="Materialize").first.click()
        page.get_by_text("Launched run").wait_for()
        toast = page.locator("a[href*='/runs/']").filter(has_text="View").first
        run_url = toast.get_attribute("href")  # the "Launched run …  View" toast
        assert run_url
        page.goto(run_url if run_url.startswith("http") else f"{base}{run_url}")
        page.get_by_text("Success", exact=True).first.wait_for(timeout=180_000)
        shoot(page, tmp_path, "run")
        run_log = page.inner_text("body")
        assert "requested locations/locations export" in run_log

        # The asset page: table rows, the export id, the schema, the checks.
        with duckdb.connect(str(warehouse), read_only=True) as con:
            export_id, rows = con.execute(
                "SELECT export_id, rows_loaded FROM pipeline.exports "
                "WHERE state = 'loaded' ORDER BY loaded_at DESC LIMIT 1"
            ).fetchone()
            table_rows = con.execute("SELECT count(*) FROM locations.locations").fetchone()[0]
        assert rows == 30  # after the demo, dev's first Materialize loads the sandbox's changes
        page.goto(f"{base}/assets/locations/locations", wait_until="networkidle")
        page.get_by_text("Row count").wait_for()
        overview = page.inner_text("body")
        assert "Row count" in overview and f"{table_rows}" in overview
        assert "Location id, unique within the operator" in overview  # the column schema
        # The freshness policy (2 h for an hourly kind), as the daemon judged it after the load.
        for _ in range(60):
            state = overview.split("Freshness policy\n", 1)[1].split("\n", 1)[0]
            if state != "Not evaluated":
                break
            page.wait_for_timeout(1000)
            page.reload(wait_until="networkidle")
            page.get_by_text("Row count").wait_for()
            overview = page.inner_text("body")
        assert state == "Passing", state
        shoot(page, tmp_path, "asset-overview")
        page.goto(f"{base}/assets/locations/locations?view=events", wait_until="networkidle")
        page.get_by_text(export_id).first.wait_for()
        page.goto(f"{base}/assets/locations/locations?view=checks", wait_until="networkidle")
        page.get_by_text("rows_match_provider").first.wait_for()
        checks = page.inner_text("body")
        assert "primary_key_unique" in checks
        shoot(page, tmp_path, "asset-checks")
        browser.close()
