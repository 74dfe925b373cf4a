"""Fixtures: the Stripe simulator (API host + file host) on free loopback ports, per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from export_pipeline.core.http import RetryPolicy
from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.stripe import StripeProvider
from export_pipeline.sandbox.stripe import State, StripeSandbox

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def stripe_sandbox() -> Iterator[StripeSandbox]:
    with StripeSandbox(State(transactions=400, available_transactions=300)) as sandbox:
        yield sandbox


def connect(sandbox: StripeSandbox, token: str | None = None) -> SpecProvider:
    return StripeProvider.from_settings(
        base_url=sandbox.api_url,
        files_base_url=sandbox.files_url,
        token=sandbox.state.token if token is None else token,
        retry=FAST_RETRY,
        timeout=10.0,
    )


@pytest.fixture
def stripe(stripe_sandbox: StripeSandbox) -> Iterator[SpecProvider]:
    provider = connect(stripe_sandbox)
    yield provider
    provider.close()
