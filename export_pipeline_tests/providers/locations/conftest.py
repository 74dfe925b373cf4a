"""A locations simulator on loopback plus a provider client pointed at it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.model import ExportState, ExportStatus
from export_pipeline.providers.locations import LocationsProvider
from export_pipeline.sandbox.locations import State, create_app
from export_pipeline.sandbox.server import RunningServer

N_LOCATIONS = 60
FAST_RETRY = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, jitter=0.0)


@dataclass
class LocationsSandbox:
    state: State
    server: RunningServer
    provider: LocationsProvider

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def provider_with(self, *, token: str | None = None, retry: RetryPolicy | None = None):
        """Another client of the same simulator (other token or retry policy); caller closes."""
        return LocationsProvider.from_settings(
            base_url=self.base_url,
            token=self.state.token if token is None else token,
            retry=retry or FAST_RETRY,
        )

    def wait(self, export_id: str, timeout: float = 20.0) -> tuple[ExportStatus, list[str]]:
        """Poll until the export leaves PENDING/PROCESSING; returns it and the states seen."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            status = self.provider.get_statuses([export_id])[export_id]
            seen.append(status.state.value)
            if status.state not in (ExportState.PENDING, ExportState.PROCESSING):
                return status, seen
            if time.monotonic() > deadline:
                raise AssertionError(f"export {export_id} still {status.state} after {timeout}s")
            time.sleep(0.02)

    def download(self, status: ExportStatus) -> httpx.Response:
        """GET the export's single file exactly as a presigned link is used: no credentials."""
        (file,) = status.files
        return httpx.get(file.url, headers=self.provider.file_headers(file), timeout=30)


@pytest.fixture
def locations_sandbox(tmp_path: Path) -> Iterator[LocationsSandbox]:
    state = State(
        n_locations=N_LOCATIONS, seed=7, ready_after_seconds=0.1, directory=tmp_path / "sandbox"
    )
    with RunningServer(create_app(state)) as server:
        provider = LocationsProvider.from_settings(
            base_url=server.base_url, token=state.token, retry=FAST_RETRY
        )
        try:
            yield LocationsSandbox(state=state, server=server, provider=provider)
        finally:
            provider.close()
            state.close()
