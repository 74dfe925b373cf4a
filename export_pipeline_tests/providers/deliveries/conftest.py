"""Fixtures: one real S3 server (moto on loopback) per session, a fresh API simulator per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from export_pipeline.core.http import RetryPolicy
from export_pipeline.providers.deliveries import DeliveriesProvider
from export_pipeline.sandbox.deliveries import State, create_app
from export_pipeline.sandbox.s3 import S3Server
from export_pipeline.sandbox.server import RunningServer

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)


@dataclass
class DeliveriesSandbox:
    state: State
    base_url: str
    provider: DeliveriesProvider
    s3: S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def deliveries_sandbox(s3_server: S3Server) -> Iterator[DeliveriesSandbox]:
    # moto's buckets are process-global: a bucket per test keeps tests independent.
    state = State(s3_server, bucket=f"deliveries-{uuid.uuid4().hex[:12]}")
    with RunningServer(create_app(state)) as server:
        provider = DeliveriesProvider.from_settings(
            base_url=server.base_url, token=state.token, retry=FAST_RETRY, timeout=10.0
        )
        try:
            yield DeliveriesSandbox(state, server.base_url, provider, s3_server)
        finally:
            provider.close()
