"""One locations sync as a run process does it: ``python -m ... <base_url> <token> <dir>``.

The crash harness starts this in a child process with ``EXPORT_PIPELINE_KILL_AT`` set, so the
process SIGKILLs itself at that point; the test then calls :func:`sync_once` in-process for the
rerun and the incremental run, against the same warehouse and data dir.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.ingest import ExportRunner, IngestResult, IngestSettings
from export_pipeline.core.ledger import Ledger, Warehouse
from export_pipeline.core.storage import LocalStorage
from export_pipeline.core.windows import IncrementalSettings, next_request
from export_pipeline.providers.locations import LOCATIONS, LocationsProvider

RETRY = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, jitter=0.0)


def sync_once(base_url: str, token: str, root: Path, owner: str | None = None) -> IngestResult:
    provider = LocationsProvider.from_settings(base_url=base_url, token=token, retry=RETRY)
    ledger = Ledger(Warehouse(root / "warehouse.duckdb", lock_timeout=30))
    runner = ExportRunner(
        provider,
        ledger,
        LocalStorage(root / "data"),
        IngestSettings(poll_initial_seconds=0.02, retry=RETRY, claim_wait_seconds=0),
        owner=owner,
    )
    try:
        request = next_request(
            LOCATIONS,
            ledger.cursor("locations", LOCATIONS.name),
            now=datetime.now(UTC),
            settings=IncrementalSettings(),
            params={"format": "json"},
        )
        assert request is not None
        return runner.sync(LOCATIONS, request, timeout=60)
    finally:
        provider.close()


if __name__ == "__main__":
    result = sync_once(sys.argv[1], sys.argv[2], Path(sys.argv[3]), owner="crash-harness")
    print(f"loaded {result.export_id}: {result.rows} rows")
