"""Fixtures for mapping.travel: the simulator on loopback and a provider pointed at it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from export_pipeline.core.http import RetryPolicy
from export_pipeline.providers.mapping import MappingProvider
from export_pipeline.sandbox.mapping import State, create_app
from export_pipeline.sandbox.server import RunningServer

# Fast retries: tests exercise real HTTP, not the patience of the default back-off.
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


@dataclass
class MappingSandbox:
    state: State
    base_url: str
    provider: MappingProvider

    def provider_with(self, **settings: object) -> MappingProvider:
        """Another provider against the same sandbox (other token, other download path)."""
        options: dict[str, object] = {"token": self.state.token, "retry": FAST_RETRY}
        options.update(settings)
        return MappingProvider.from_settings(base_url=self.base_url, **options)  # type: ignore[arg-type]


def start_sandbox(state: State) -> Iterator[MappingSandbox]:
    with RunningServer(create_app(state)) as server:
        provider = MappingProvider.from_settings(
            base_url=server.base_url, token=state.token, retry=FAST_RETRY
        )
        try:
            yield MappingSandbox(state=state, base_url=server.base_url, provider=provider)
        finally:
            provider.close()
            state.close()


@pytest.fixture
def mapping_sandbox() -> Iterator[MappingSandbox]:
    yield from start_sandbox(State())
