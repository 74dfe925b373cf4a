"""Stripe signs its webhook deliveries its own way (``Stripe-Signature``), declared in
``stripe.yaml`` (``events.signing``): the receiver checks that scheme, with Stripe's own secret,
on Stripe's route. The headers are made per Stripe's documented algorithm and each one is first
accepted by Stripe's own library (``stripe.WebhookSignature.verify_header``), so the tests send
what Stripe sends."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import stripe

from export_pipeline.webhooks.receiver import ReceiverSettings
from export_pipeline.webhooks.store import EventStore
from export_pipeline_tests.webhooks.conftest import SECRET, StartReceiver, encode, sign
from export_pipeline_tests.webhooks.test_routes import STRIPE_SUCCEEDED

ROUTE = "/stripe/exports/events"
STRIPE_SECRET = "whsec_test_5Tq0zPzQ8fVbX1yZ2aB3cD4eF5gH6iJ7"  # Stripe's are not base64 keys
BODY = encode(STRIPE_SUCCEEDED)


def stripe_headers(body: bytes, secret: str = STRIPE_SECRET, at: float | None = None) -> dict:
    stamp = str(int(time.time() if at is None else at))
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    header = (
        f"t={stamp},v1={digest},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"
    )
    if at is None:  # a current header: Stripe's library must take it as genuine
        assert stripe.WebhookSignature.verify_header(body, header, secret, tolerance=300)
    return {"content-type": "application/json", "stripe-signature": header}


@pytest.fixture
def http(start_receiver: StartReceiver) -> Iterator[httpx.Client]:
    settings = ReceiverSettings.from_env(
        {
            "EXPORT_PIPELINE_WEBHOOK_SECRET": SECRET,
            "STRIPE_WEBHOOK_SECRET": f"whsec_old_rotated_out,{STRIPE_SECRET}",
        }
    )
    with httpx.Client(base_url=start_receiver(settings=settings).base_url, timeout=10) as client:
        yield client


def test_a_stripe_signed_event_is_recorded_once_by_its_event_id(
    http: httpx.Client, store: EventStore
) -> None:
    first = http.post(ROUTE, content=BODY, headers=stripe_headers(BODY))
    assert first.status_code == 202, first.text
    assert first.json()["event_id"] == "evt_1"
    # Stripe retries with a new timestamp and signature: the same event, by its id.
    again = http.post(ROUTE, content=BODY, headers=stripe_headers(BODY, at=time.time() + 5))
    assert (again.status_code, again.json()["duplicate"]) == (200, True)
    [event] = store.pending()
    assert (event.source, event.event_id, event.export_id, event.status) == (
        "stripe",
        "evt_1",
        "frr_123",
        "ready",
    )


@pytest.mark.parametrize(
    "make_headers, reason",
    [
        (lambda: stripe_headers(BODY, secret="whsec_someone_else"), "no matching signature"),
        (lambda: stripe_headers(BODY, at=time.time() - 600), "outside the accepted window"),
        (lambda: {"stripe-signature": "t=soon,v1=abc"}, "t=<integer Unix seconds>"),
        (lambda: {"stripe-signature": f"t={int(time.time())}"}, "no v1 signature"),
        # Standard Webhooks signed with the receiver's secret: not Stripe's scheme, not its secret
        (lambda: sign(BODY), "missing Stripe-Signature header"),
    ],
    ids=["wrong-secret", "stale", "bad-timestamp", "no-v1", "other-scheme"],
)
def test_a_stripe_event_without_a_good_stripe_signature_is_refused(
    http: httpx.Client, store: EventStore, make_headers: Callable[[], dict], reason: str
) -> None:
    # Headers made when the test runs (a timestamp taken at collection goes stale in a long run).
    headers = make_headers()
    answer = http.post(ROUTE, content=BODY, headers=headers)
    assert answer.status_code == 401, answer.text
    assert reason in answer.json()["error"]
    assert store.pending() == []


def test_without_stripe_s_secret_its_route_refuses_and_the_others_still_work(
    start_receiver: StartReceiver, store: EventStore
) -> None:
    settings = ReceiverSettings.from_env({"EXPORT_PIPELINE_WEBHOOK_SECRET": SECRET})
    assert settings.provider_secrets == {}
    assert "STRIPE" not in repr(settings) and STRIPE_SECRET not in repr(settings)
    with httpx.Client(base_url=start_receiver(settings=settings).base_url) as client:
        answer = client.post(ROUTE, content=BODY, headers=stripe_headers(BODY))
    assert answer.status_code == 401
    assert answer.json()["error"] == "no stripe signing secret configured on the receiver"
    assert store.pending() == []


def test_stripe_s_secret_alone_is_a_configured_receiver() -> None:
    settings = ReceiverSettings.from_env({"STRIPE_WEBHOOK_SECRET": STRIPE_SECRET})
    assert settings.provider_secrets == {"stripe": (STRIPE_SECRET,)}
    assert STRIPE_SECRET not in repr(settings)
