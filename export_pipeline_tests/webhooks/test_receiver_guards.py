"""The receiver's resource guards over a real socket: slow-loris heads and bodies, a bound on
connections, deeply nested JSON (400, not 500), and no secret in its log or store."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest

from export_pipeline.sandbox.server import RunningServer
from export_pipeline.webhooks.receiver import ReceiverSettings, create_app
from export_pipeline.webhooks.serve import uvicorn_options
from export_pipeline.webhooks.store import EventStore
from export_pipeline_tests.webhooks.conftest import COMPLETED, LOCATIONS_PATH, encode, sign

SIGNATURE = "c0ffee5ecretsignature"
SIGNED_URL = (
    "https://bucket.s3.amazonaws.com/exports/7890abcd.json"
    f"?X-Amz-Credential=AKIAEXAMPLESECRET%2F20250608&X-Amz-Signature={SIGNATURE}"
)


@pytest.fixture
def guarded_settings(settings: ReceiverSettings) -> ReceiverSettings:
    return replace(
        settings,
        header_timeout_seconds=0.5,
        body_timeout_seconds=0.5,
        max_json_depth=16,
        max_body_bytes=64 * 1024,
    )


@pytest.fixture
def guarded(store: EventStore, guarded_settings: ReceiverSettings) -> Iterator[RunningServer]:
    """The receiver with the same uvicorn options ``export-pipeline webhooks serve`` uses."""
    app = create_app(store, guarded_settings)
    with RunningServer(app, options=uvicorn_options(guarded_settings)) as server:
        yield server


def _connect(server: RunningServer) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=20)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_half_sent_head_is_closed_by_the_server(guarded: RunningServer) -> None:
    with _connect(guarded) as sock:
        sock.sendall(b"POST " + LOCATIONS_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # The server closes the connection (EOF) on its own; the socket timeout (20 s) is
        # only a backstop so a regression fails instead of hanging.
        assert _read_all(sock) == b""


def test_slow_body_is_answered_408_and_closed(guarded: RunningServer) -> None:
    body = encode(COMPLETED)
    head = (
        f"POST {LOCATIONS_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    head += "".join(f"{k}: {v}\r\n" for k, v in sign(body).items() if k != "content-type")
    with _connect(guarded) as sock:
        sock.sendall(head.encode() + b"\r\n" + body[:10])  # ... and the rest never comes
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_connections_beyond_the_bound_get_503(
    store: EventStore, guarded_settings: ReceiverSettings
) -> None:
    settings = replace(guarded_settings, max_connections=2, header_timeout_seconds=30)
    app = create_app(store, settings)
    with RunningServer(app, options=uvicorn_options(settings)) as server:
        idle = [_connect(server), _connect(server)]
        try:
            body = encode(COMPLETED)
            response = httpx.post(
                f"{server.base_url}{LOCATIONS_PATH}", content=body, headers=sign(body), timeout=20
            )
            assert response.status_code == 503
            assert store.count() == 0
        finally:
            for sock in idle:
                sock.close()


def test_deeply_nested_signed_body_is_400_logged_without_secrets(
    guarded: RunningServer, store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    # 5000 levels: json.loads would raise RecursionError (a 500, which senders retry forever).
    nested = "[" * 5000 + json.dumps(SIGNED_URL) + "]" * 5000
    fields = json.dumps({**COMPLETED, "exportUrl": SIGNED_URL})
    body = (fields[:-1] + f', "extra": {nested}}}').encode()
    with caplog.at_level(logging.INFO, logger="export_pipeline"):
        response = httpx.post(
            f"{guarded.base_url}{LOCATIONS_PATH}", content=body, headers=sign(body), timeout=20
        )
    assert response.status_code == 400
    assert "nested deeper than 16" in response.json()["error"]
    assert store.count() == 0
    assert "nested deeper" in caplog.text
    assert SIGNATURE not in caplog.text and "AKIAEXAMPLESECRET" not in caplog.text
