"""The receiver over real HTTP on loopback: auth, size limits, parsing, durability, answers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from export_pipeline.providers import locations
from export_pipeline.sandbox.server import RunningServer
from export_pipeline.webhooks.receiver import ReceiverSettings
from export_pipeline.webhooks.store import EventStore
from export_pipeline_tests.webhooks.conftest import (
    COMPLETED,
    FAILED,
    LOCATIONS_PATH,
    MAPPING_COMPLETED,
    MAPPING_PATH,
    MAX_BODY,
    SECRET,
    StartReceiver,
    encode,
    minutes_ago,
    new_secret,
    sign,
)

RECEIVER_LOGGER = "export_pipeline.webhooks.receiver"


def test_signed_completed_event_is_accepted_and_stored(
    client: httpx.Client, store: EventStore
) -> None:
    body = encode(COMPLETED)
    headers = sign(body, msg_id="msg_completed_1")

    response = client.post(LOCATIONS_PATH, content=body, headers=headers)

    assert response.status_code == 202, response.text
    assert response.json()["received"] is True
    assert response.json()["duplicate"] is False
    [event] = store.pending()
    assert event.source == "locations"
    assert event.event_id == "msg_completed_1"
    assert event.export_id == COMPLETED["requestId"]
    assert event.status == "ready"
    assert event.body == COMPLETED
    assert event.consumed_at is None


def test_one_byte_change_to_the_body_is_401(client: httpx.Client, store: EventStore) -> None:
    body = encode(COMPLETED)
    headers = sign(body)
    tampered = body.replace(b"45678", b"45679")
    assert len(tampered) == len(body) and tampered != body

    response = client.post(LOCATIONS_PATH, content=tampered, headers=headers)

    assert response.status_code == 401
    assert "signature" in response.json()["error"]
    assert store.count() == 0


@pytest.mark.parametrize("age_minutes", [6, -6], ids=["too-old", "too-new"])
def test_timestamp_outside_the_window_is_401(
    client: httpx.Client, store: EventStore, age_minutes: float
) -> None:
    body = encode(COMPLETED)
    headers = sign(body, timestamp=minutes_ago(age_minutes))

    response = client.post(LOCATIONS_PATH, content=body, headers=headers)

    assert response.status_code == 401
    assert "window" in response.json()["error"]
    assert store.count() == 0


def test_timestamp_inside_a_configured_window_is_accepted(
    start_receiver: StartReceiver,
) -> None:
    server = start_receiver(settings=ReceiverSettings(secrets=(SECRET,), tolerance_seconds=900))
    body = encode(COMPLETED)
    # 10 minutes old: outside the library default of 5, inside our configured 15.
    headers = sign(body, timestamp=minutes_ago(10))

    response = httpx.post(server.base_url + LOCATIONS_PATH, content=body, headers=headers)

    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h: {k: v for k, v in h.items() if k != "webhook-signature"},
        lambda h: {k: v for k, v in h.items() if k != "webhook-id"},
        lambda h: {**h, "webhook-signature": "v1"},
        lambda h: {**h, "webhook-signature": "v1,not*base64!"},
        lambda h: {**h, "webhook-signature": "v2," + h["webhook-signature"].split(",", 1)[1]},
        lambda h: {**h, "webhook-timestamp": "soon"},
    ],
    ids=["no-signature", "no-id", "no-comma", "bad-base64", "wrong-version", "bad-timestamp"],
)
def test_missing_or_malformed_signature_headers_are_401_not_500(
    client: httpx.Client, store: EventStore, mangle
) -> None:
    body = encode(COMPLETED)

    response = client.post(LOCATIONS_PATH, content=body, headers=mangle(sign(body)))

    assert response.status_code == 401, response.text
    assert store.count() == 0


def test_signature_by_another_secret_is_401(client: httpx.Client) -> None:
    body = encode(COMPLETED)

    response = client.post(LOCATIONS_PATH, content=body, headers=sign(body, secret=new_secret()))

    assert response.status_code == 401


def test_rotation_accepts_old_and_new_secret(
    start_receiver: StartReceiver, store: EventStore
) -> None:
    old, new = new_secret(), new_secret()
    server = start_receiver(settings=ReceiverSettings(secrets=(new, old)))
    url = server.base_url + LOCATIONS_PATH
    body = encode(COMPLETED)

    by_old = httpx.post(url, content=body, headers=sign(body, secret=old, msg_id="m-old"))
    by_new = httpx.post(url, content=body, headers=sign(body, secret=new, msg_id="m-new"))
    # A sender mid-rotation may send both signatures in one header.
    both = sign(body, secret=new, msg_id="m-both")
    both["webhook-signature"] = (
        sign(body, secret=old, msg_id="m-both")["webhook-signature"]
        + " "
        + both["webhook-signature"]
    )
    by_both = httpx.post(url, content=body, headers=both)
    by_stranger = httpx.post(url, content=body, headers=sign(body, secret=new_secret()))

    assert (by_old.status_code, by_new.status_code, by_both.status_code) == (202, 202, 202)
    assert by_stranger.status_code == 401
    assert {e.event_id for e in store.pending()} == {"m-old", "m-new", "m-both"}


def test_bearer_mode(start_receiver: StartReceiver, store: EventStore) -> None:
    server = start_receiver(settings=ReceiverSettings(bearer_token="s3cret-token"))
    url = server.base_url + LOCATIONS_PATH
    body = encode(COMPLETED)
    json_type = {"content-type": "application/json"}

    ok = httpx.post(
        url, content=body, headers={**json_type, "authorization": "Bearer s3cret-token"}
    )
    wrong = httpx.post(url, content=body, headers={**json_type, "authorization": "Bearer nope"})
    missing = httpx.post(url, content=body, headers=json_type)
    basic = httpx.post(url, content=body, headers={**json_type, "authorization": "Basic czNjcmV0"})

    assert ok.status_code == 202, ok.text
    assert (wrong.status_code, missing.status_code, basic.status_code) == (401, 401, 401)
    assert "s3cret-token" not in wrong.text
    [event] = store.pending()
    # No webhook-id header: the event id is a hash of the body, so a redelivery is a duplicate.
    assert event.event_id.startswith("sha256:")
    again = httpx.post(
        url, content=body, headers={**json_type, "authorization": "Bearer s3cret-token"}
    )
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert store.count() == 1


def test_signature_is_required_when_only_secrets_are_configured(client: httpx.Client) -> None:
    body = encode(COMPLETED)

    response = client.post(
        LOCATIONS_PATH, content=body, headers={"authorization": "Bearer anything"}
    )

    assert response.status_code == 401


def test_secrets_and_tokens_never_reach_the_log(
    start_receiver: StartReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_receiver(settings=ReceiverSettings(secrets=(SECRET,), bearer_token="tok-XYZ"))
    url = server.base_url + LOCATIONS_PATH
    body = encode(COMPLETED)

    httpx.post(url, content=body, headers={"authorization": "Bearer tok-XYZ-wrong"})
    httpx.post(url, content=body, headers={"authorization": "Bearer tok-XYZ"})
    httpx.post(url, content=body + b" ", headers=sign(body))

    assert caplog.records, "the receiver should log rejected deliveries"
    text = caplog.text + repr(server.app.state.settings)  # type: ignore[attr-defined]
    assert "tok-XYZ" not in text
    assert SECRET not in text and SECRET.removeprefix("whsec_") not in text


def test_replayed_id_is_a_duplicate_and_stored_once(
    client: httpx.Client, store: EventStore
) -> None:
    body = encode(COMPLETED)
    headers = sign(body, msg_id="msg_replayed")

    first = client.post(LOCATIONS_PATH, content=body, headers=headers)
    second = client.post(LOCATIONS_PATH, content=body, headers=headers)

    assert first.status_code == 202 and first.json()["duplicate"] is False
    assert second.status_code in (200, 202) and second.json()["duplicate"] is True
    assert store.count() == 1
    assert len(store.pending()) == 1


def test_malformed_json_is_400(client: httpx.Client, store: EventStore) -> None:
    body = b'{"requestId": "abc", "status": '

    response = client.post(LOCATIONS_PATH, content=body, headers=sign(body))

    assert response.status_code == 400
    assert response.json()["received"] is False
    assert store.count() == 0


def test_non_utf8_body_is_400(client: httpx.Client, store: EventStore) -> None:
    body = b'{"requestId": "\xff\xfe"}'
    # The reference library cannot sign non-UTF-8 bytes; sign like a sender would, over raw bytes.
    ts = str(int(time.time()))
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    sig = base64.b64encode(
        hmac.new(key, b"m1." + ts.encode() + b"." + body, hashlib.sha256).digest()
    )
    headers = {
        "webhook-id": "m1",
        "webhook-timestamp": ts,
        "webhook-signature": "v1," + sig.decode(),
    }

    response = client.post(LOCATIONS_PATH, content=body, headers=headers)

    assert response.status_code == 400
    assert store.count() == 0


@pytest.mark.parametrize(
    "body",
    [
        {k: v for k, v in COMPLETED.items() if k != "requestId"},
        {**COMPLETED, "status": "EXPLODED"},
        [COMPLETED],
    ],
    ids=["missing-requestId", "unknown-status", "not-an-object"],
)
def test_json_that_is_not_an_event_is_400_and_logged(
    client: httpx.Client,
    store: EventStore,
    caplog: pytest.LogCaptureFixture,
    body: object,
) -> None:
    caplog.set_level(logging.WARNING, logger=RECEIVER_LOGGER)
    raw = encode(body)  # type: ignore[arg-type]
    headers = sign(raw, msg_id="msg_bad_event")

    response = client.post(LOCATIONS_PATH, content=raw, headers=headers)

    assert response.status_code == 400
    assert response.json()["error"]
    assert store.count() == 0
    [record] = [r for r in caplog.records if r.name == RECEIVER_LOGGER and "400" in r.getMessage()]
    message = record.getMessage()
    assert "msg_bad_event" in message  # the event id
    assert "locations" in message  # the source
    assert repr(raw[:200].decode()) in message  # what it looked like (no secrets here)
    assert record.levelno >= logging.WARNING


def test_failed_event_is_stored_with_the_providers_error_code(
    client: httpx.Client, store: EventStore
) -> None:
    body = encode(FAILED)

    response = client.post(LOCATIONS_PATH, content=body, headers=sign(body))

    assert response.status_code == 202, response.text
    [event] = store.pending()
    assert event.export_id == FAILED["requestId"]
    assert event.status == "failed"
    assert event.body["error"]["code"] == "EXPORT_GENERATION_FAILED"
    # What the sensor will do with it: the stored body still parses to the provider's error.
    status = locations.parse_event(event.body)
    assert status.error_code == "EXPORT_GENERATION_FAILED"


def test_mapping_event_is_accepted(client: httpx.Client, store: EventStore) -> None:
    body = encode(MAPPING_COMPLETED)

    response = client.post(MAPPING_PATH, content=body, headers=sign(body, msg_id="map-1"))

    assert response.status_code == 202, response.text
    [event] = store.pending(source="mapping")
    assert event.export_id == "file-9001"
    assert event.status == "ready"
    assert event.body["mappingJobId"] == "job-42"
    assert store.pending(source="locations") == []


def test_mapping_endpoint_rejects_a_locations_body(client: httpx.Client, store: EventStore) -> None:
    body = encode(COMPLETED)

    response = client.post(MAPPING_PATH, content=body, headers=sign(body))

    assert response.status_code == 400
    assert store.count() == 0


def test_oversized_body_with_content_length_is_413(client: httpx.Client, store: EventStore) -> None:
    body = encode({**COMPLETED, "padding": "x" * MAX_BODY})

    response = client.post(LOCATIONS_PATH, content=body, headers=sign(body))

    assert response.status_code == 413
    assert store.count() == 0


def test_declared_oversize_is_refused_before_the_body_is_read(receiver: RunningServer) -> None:
    # Declare 10 MB, send 2 bytes and wait: a server that read the body first would hang.
    request = (
        f"POST {LOCATIONS_PATH} HTTP/1.1\r\nHost: {receiver.host}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n{}"
    ).encode()
    with socket.create_connection((receiver.host, receiver.port), timeout=5) as sock:
        sock.sendall(request)
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]

    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"


def test_oversized_chunked_body_is_413(client: httpx.Client, store: EventStore) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"requestId": "x", "padding": "'
        for _ in range(MAX_BODY // 512 + 2):
            yield b"x" * 512
        yield b'"}'

    body = b"".join(chunks())
    response = client.post(LOCATIONS_PATH, content=chunks(), headers=sign(body))

    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413
    assert store.count() == 0


def test_chunked_body_under_the_limit_is_accepted(client: httpx.Client) -> None:
    body = encode(COMPLETED)

    response = client.post(LOCATIONS_PATH, content=iter([body[:10], body[10:]]), headers=sign(body))

    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 202, response.text


def test_restart_loses_no_recorded_event(start_receiver: StartReceiver, store_path: Path) -> None:
    first = start_receiver(store=EventStore(store_path))
    body = encode(COMPLETED)
    headers = sign(body, msg_id="before-restart")
    assert (
        httpx.post(first.base_url + LOCATIONS_PATH, content=body, headers=headers).status_code
        == 202
    )
    first.stop()

    second = start_receiver(store=EventStore(store_path))
    failed = encode(FAILED)
    after = httpx.post(
        second.base_url + LOCATIONS_PATH, content=failed, headers=sign(failed, msg_id="after")
    )
    replay = httpx.post(second.base_url + LOCATIONS_PATH, content=body, headers=headers)

    assert after.status_code == 202
    assert replay.status_code in (200, 202) and replay.json()["duplicate"] is True
    events = EventStore(store_path).pending()
    assert [(e.event_id, e.export_id, e.status) for e in events] == [
        ("before-restart", COMPLETED["requestId"], "ready"),
        ("after", FAILED["requestId"], "failed"),
    ]


def test_locked_store_is_503_with_retry_after_and_the_retry_succeeds(
    client: httpx.Client, store: EventStore, store_path: Path
) -> None:
    body = encode(COMPLETED)
    headers = sign(body, msg_id="during-lock")
    blocker = sqlite3.connect(store_path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        refused = client.post(LOCATIONS_PATH, content=body, headers=headers)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert refused.status_code == 503
    assert int(refused.headers["retry-after"]) > 0
    assert "Traceback" not in refused.text
    assert store.count() == 0
    # The sender retries the same delivery once the store is free again.
    retried = client.post(LOCATIONS_PATH, content=body, headers=headers)
    assert retried.status_code == 202 and retried.json()["duplicate"] is False


def test_healthz(client: httpx.Client) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"ok": True}


def test_base_path_prefixes_every_route(start_receiver: StartReceiver) -> None:
    server = start_receiver(settings=ReceiverSettings(secrets=(SECRET,), base_path="hooks/"))
    body = encode(COMPLETED)

    prefixed = httpx.post(
        server.base_url + "/hooks" + LOCATIONS_PATH, content=body, headers=sign(body)
    )
    bare = httpx.post(server.base_url + LOCATIONS_PATH, content=body, headers=sign(body))

    assert prefixed.status_code == 202
    assert bare.status_code == 404
    assert httpx.get(server.base_url + "/hooks/healthz").status_code == 200
