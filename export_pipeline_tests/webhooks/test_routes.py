"""The receiver's routes come from the providers' declarations (``pushes_events`` +
``parse_event``), not from a list of names in the receiver."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from export_pipeline.core.model import ExportKind, ExportState, ExportStatus
from export_pipeline.providers.base import ExportProvider
from export_pipeline.providers.registry import PROVIDERS
from export_pipeline.sandbox.server import RunningServer
from export_pipeline.webhooks.receiver import ReceiverSettings, create_app, event_route
from export_pipeline.webhooks.store import EventStore, event_sources
from export_pipeline_tests.webhooks.conftest import StartReceiver, encode

# A reporting.report_run.succeeded event as Stripe sends it (data.object is the report run).
STRIPE_SUCCEEDED = {
    "id": "evt_1",
    "object": "event",
    "type": "reporting.report_run.succeeded",
    "data": {
        "object": {
            "id": "frr_123",
            "object": "reporting.report_run",
            "status": "succeeded",
            "parameters": {"interval_start": 1700000000, "interval_end": 1700086400},
            "result": {"id": "file_1", "size": 10, "url": "https://files.stripe.com/v1/x"},
        }
    },
}


def test_every_provider_that_pushes_events_has_a_route_and_no_other(
    start_receiver: StartReceiver,
) -> None:
    pushing = {cls.name for cls in PROVIDERS if cls.pushes_events}
    assert {"locations", "mapping", "stripe"} <= pushing
    assert event_sources() == pushing
    receiver = start_receiver()
    with httpx.Client(base_url=receiver.base_url, timeout=10) as http:
        for cls in PROVIDERS:
            # An empty body: a route answers 401 (unauthenticated), no route 404.
            code = http.post(event_route(cls), content=b"{}").status_code
            assert code == (401 if cls.pushes_events else 404), cls.name


def test_a_spec_provider_event_is_taken_at_its_declared_route(
    start_receiver: StartReceiver, store: EventStore
) -> None:
    # Stripe signs with its own scheme (test_stripe_signature.py); a bearer token also counts.
    receiver = start_receiver(settings=ReceiverSettings(bearer_token="t"))
    token = {"Authorization": "Bearer t"}
    with httpx.Client(base_url=receiver.base_url, timeout=10) as http:
        answer = http.post(
            "/stripe/exports/events", content=encode(STRIPE_SUCCEEDED), headers=token
        )
        refused = http.post(
            "/stripe/exports/events",
            content=encode({"type": "charge.succeeded", "data": {"object": {}}}),
            headers=token,
        )
    assert answer.status_code == 202, answer.text
    [event] = store.pending()
    assert (event.source, event.export_id, event.status) == ("stripe", "frr_123", "ready")
    assert refused.status_code == 400
    assert "charge.succeeded" in refused.json()["error"]


class _Pushy(ExportProvider):
    """A provider the receiver has never heard of: only its declarations."""

    name: ClassVar[str] = "pushy"
    kinds: ClassVar[tuple[ExportKind, ...]] = (ExportKind("pushy", "things", ("id",)),)
    pushes_events: ClassVar[bool] = True

    @classmethod
    def parse_event(cls, body: Mapping[str, Any]) -> tuple[str | None, ExportStatus]:
        if "job" not in body:
            raise ValueError("pushy event without a job")
        return None, ExportStatus(export_id=str(body["job"]), state=ExportState.FAILED)

    def request_export(self, kind: ExportKind, request: object) -> ExportStatus:
        raise NotImplementedError

    def get_statuses(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        raise NotImplementedError


@pytest.mark.parametrize("body, code", [({"job": "j1"}, 202), ({"nojob": 1}, 400)])
def test_the_route_and_parser_are_the_providers_declarations(
    tmp_path: Path, body: dict[str, Any], code: int
) -> None:
    store = EventStore(tmp_path / "events.sqlite3", sources=frozenset({"pushy"}))
    app = create_app(store, ReceiverSettings(bearer_token="t"), providers=[_Pushy])
    with RunningServer(app) as server, httpx.Client(base_url=server.base_url) as http:
        answer = http.post(
            "/pushy/exports/events", json=body, headers={"Authorization": "Bearer t"}
        )
        assert http.post("/locations/exports/events", json={}).status_code == 404
    assert answer.status_code == code, answer.text
    recorded = [(e.source, e.export_id, e.status) for e in store.pending()]
    assert recorded == ([("pushy", "j1", "failed")] if code == 202 else [])
