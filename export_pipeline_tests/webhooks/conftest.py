"""Fixtures: the real receiver on loopback, a temp event store, a known secret, a signer.

Signatures are made with the ``standardwebhooks`` reference library, not with our own code, so
the tests prove interoperability with real Standard Webhooks senders.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from export_pipeline.sandbox.server import RunningServer
from export_pipeline.webhooks.receiver import ReceiverSettings, create_app
from export_pipeline.webhooks.store import EventStore

LOCATIONS_PATH = "/locations/exports/events"
MAPPING_PATH = "/mapping/exports/events"
MAX_BODY = 4096


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


SECRET = new_secret()

COMPLETED = {
    "requestId": "7890abcd-ef12-3456-7890-abcdef123456",
    "status": "COMPLETED",
    "exportUrl": "https://downloads.operator.com/exports/7890abcd.json",
    "downloadExpiresAt": "2025-06-09T00:00:00Z",
    "exportTimestamp": "2025-06-08T15:30:00Z",
    "totalCount": 45678,
}
FAILED = {
    "requestId": "7890abcd-ef12-3456-7890-abcdef123457",
    "status": "FAILED",
    "error": {
        "code": "EXPORT_GENERATION_FAILED",
        "message": "Unable to generate export due to system error",
    },
}
MAPPING_COMPLETED = {
    "event": "mapping.export.completed",
    "mappingJobId": "job-42",
    "exportFileId": "file-9001",
    "message": "Export ready",
}


def encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body).encode()


def sign(
    body: bytes,
    *,
    secret: str = SECRET,
    msg_id: str | None = None,
    timestamp: datetime | None = None,
) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, signed by the reference library."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = timestamp or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id=msg_id, timestamp=timestamp, data=body.decode())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signature,
    }


def minutes_ago(minutes: float) -> datetime:
    return datetime.now(UTC) - timedelta(minutes=minutes)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "events" / "webhook_events.sqlite3"


@pytest.fixture
def store(store_path: Path) -> EventStore:
    # A short busy timeout so "store locked" tests answer 503 quickly.
    return EventStore(store_path, busy_timeout_seconds=0.5)


@pytest.fixture
def settings() -> ReceiverSettings:
    return ReceiverSettings(secrets=(SECRET,), max_body_bytes=MAX_BODY)


StartReceiver = Callable[..., RunningServer]


@pytest.fixture
def start_receiver(store: EventStore, settings: ReceiverSettings) -> Iterator[StartReceiver]:
    """Start a receiver (defaults: the test store and settings); all are stopped at teardown."""
    servers: list[RunningServer] = []

    def start(*, store: EventStore = store, settings: ReceiverSettings = settings) -> RunningServer:
        server = RunningServer(create_app(store, settings)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def receiver(start_receiver: StartReceiver) -> RunningServer:
    return start_receiver()


@pytest.fixture
def client(receiver: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=receiver.base_url, timeout=10) as http:
        yield http
