"""Fixtures for the Mews provider: the simulator on loopback and a provider pointed at it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.model import ExportState, ExportStatus
from export_pipeline.providers.mews import MewsProvider
from export_pipeline.sandbox.mews import State, create_app
from export_pipeline.sandbox.server import RunningServer

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


@dataclass
class MewsSandbox:
    """A running simulator: drive ``state`` directly, talk to it through ``provider``."""

    state: State
    base_url: str
    provider: MewsProvider

    def provider_with(self, *, client_token: str, access_token: str) -> MewsProvider:
        return MewsProvider.from_settings(
            base_url=self.base_url,
            body_credentials={"ClientToken": client_token, "AccessToken": access_token},
            retry=FAST_RETRY,
        )

    def wait(self, export_id: str, timeout: float = 10.0) -> ExportStatus:
        """Poll until the export leaves Pending/Processing (real time, real HTTP)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.provider.get_statuses([export_id])[export_id]
            if status.state not in (ExportState.PENDING, ExportState.PROCESSING):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"export {export_id} still {status.state} after {timeout}s")
            time.sleep(0.05)


@pytest.fixture
def mews_sandbox(tmp_path) -> Iterator[MewsSandbox]:
    state = State(data_dir=tmp_path / "mews-sandbox")
    with RunningServer(create_app(state)) as server:
        provider = MewsProvider.from_settings(
            base_url=server.base_url,
            body_credentials={"ClientToken": state.client_token, "AccessToken": state.access_token},
            retry=FAST_RETRY,
        )
        try:
            yield MewsSandbox(state=state, base_url=server.base_url, provider=provider)
        finally:
            provider.close()
