"""No secret in anything a run writes: a full sync, failing runs with signed links, a rejected
and an accepted webhook; then every byte written is searched for the tokens and signatures.

What is searched: Dagster's event log and compute logs (every file under the instance's root),
stdout/stderr, Python log records, the ledger tables, Parquet key-value metadata, the webhook
store and the receiver's log. The failing runs also show the download URL policy end to end:
an ``exportUrl`` on another loopback port or on the metadata address is refused, the canary
listener there is never connected to.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import dagster as dg
import duckdb
import httpx
import pyarrow.parquet as pq
import pytest

from export_pipeline.sandbox.server import RunningServer
from export_pipeline.webhooks.receiver import ReceiverSettings, create_app
from export_pipeline.webhooks.store import EventStore
from export_pipeline_tests.dagster.conftest import DagsterSetup
from export_pipeline_tests.webhooks.conftest import LOCATIONS_PATH, SECRET, encode, sign


@pytest.fixture
def simulators() -> tuple[str, ...]:
    return ("locations",)  # the sandbox starts only these


API_TOKEN = "tok-LOCATIONS-7f3a9c1e5b"
LINK_SIG = "sig7e1d4c0ffee9b8a7"
AMZ_SIG = "amzsig5a4b3c2d1e0f"
AMZ_CRED = "AKIAQSECRETCREDX9"
SIGNED_EVENT_URL = (
    "https://bucket.s3.amazonaws.com/exports/abc.json"
    f"?X-Amz-Credential={AMZ_CRED}%2F20250608%2Fus-east-1&X-Amz-Signature={AMZ_SIG}"
)
SECRETS = (API_TOKEN, LINK_SIG, AMZ_SIG, AMZ_CRED, SECRET.removeprefix("whsec_"))
# The sandbox signs links with an HMAC in hex: any such value left unredacted is a leak.
UNREDACTED = re.compile(r"(?i)(?:signature|sig)(?:=|%3D)(?!REDACTED)[0-9a-f]{8,}")


def _run(setup: DagsterSetup, config: dict | None = None) -> dg.ExecuteInProcessResult:
    return setup.job("locations_sync").execute_in_process(
        run_config={"ops": {"locations__locations": {"config": config or {}}}},
        instance=setup.instance,
        raise_on_error=False,
    )


def _everything_written(setup: DagsterSetup, run_ids: list[str]) -> str:
    parts: list[str] = []
    for run_id in run_ids:  # the event log through Dagster's API (messages, metadata, errors)
        for entry in setup.instance.all_logs(run_id):
            parts.append(dg.serialize_value(entry))
    # Every file under the instance root (event log DB, compute logs) and the data dir (raw
    # files, Parquet, the webhook store), as bytes.
    for root in (Path(setup.instance.root_directory), setup.data_dir):
        for path in root.rglob("*"):
            if path.is_file():
                parts.append(path.read_bytes().decode("latin-1"))
    with duckdb.connect(str(setup.warehouse_path), read_only=True) as con:
        tables = con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema = 'pipeline'"
        ).fetchall()
        assert tables, "the ledger tables exist"
        for schema, table in tables:
            parts.append(repr(con.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall()))
    for parquet in setup.data_dir.rglob("*.parquet"):
        meta = pq.read_metadata(parquet)
        parts.append(repr(meta.metadata) + repr(meta.schema))
    return "\n".join(parts)


def test_no_token_or_signature_in_anything_written(
    dagster_setup: DagsterSetup,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    setup = dagster_setup
    sandbox = setup.sandbox.locations
    sandbox.token = API_TOKEN
    monkeypatch.setenv("LOCATIONS_API_TOKEN", API_TOKEN)
    caplog.set_level(logging.DEBUG)
    canary = socket.socket()
    canary.bind(("127.0.0.1", 0))
    canary.listen(8)
    canary.setblocking(False)
    canary_port = canary.getsockname()[1]
    run_ids = []
    try:
        # 1. A full sync that works.
        ok = _run(setup)
        assert ok.success
        run_ids.append(ok.run_id)

        # 2. Failing runs whose errors used to carry the signed link.
        failures = {
            # No .json/.csv extension: the whole signed URL went into the error.
            "extension": f"http://127.0.0.1:{canary_port}/x.bin?sig={LINK_SIG}&u=",
            # Another loopback port: used to be fetched and loaded.
            "loopback": f"http://127.0.0.1:{canary_port}",
            # The cloud metadata address, in decimal.
            "metadata": "http://2852039166/latest",
        }
        messages = {}
        for name, base in failures.items():
            sandbox.download_base_url = base
            failed = _run(setup, {"full_refresh": True})
            assert not failed.success, name
            run_ids.append(failed.run_id)
            # The failure as Dagster recorded it (step error, its cause, the Failure).
            messages[name] = "\n".join(dg.serialize_value(e) for e in failed.all_events)
        sandbox.download_base_url = None
        assert "no .json or .csv extension" in messages["extension"]
        assert f"127.0.0.1:{canary_port}" in messages["extension"]  # the URL's shape stays
        assert "host '127.0.0.1' is a loopback address" in messages["loopback"]
        assert "169.254.169.254" in messages["metadata"] and "link-local" in messages["metadata"]
        with pytest.raises(BlockingIOError):
            canary.accept()  # nothing ever connected to the other loopback port
    finally:
        canary.close()

    # 3. The receiver: one rejected event (400, logged) and one accepted (stored), both signed
    # links; the store is the one the sensors read.
    store = EventStore(Path(setup.resources["webhook_events"].path))
    settings = ReceiverSettings(secrets=(SECRET,), max_body_bytes=8192)
    with RunningServer(create_app(store, settings)) as receiver:
        url = f"{receiver.base_url}{LOCATIONS_PATH}"
        bad = encode({"status": "COMPLETED", "exportUrl": SIGNED_EVENT_URL})  # no requestId
        good = encode(
            {
                "requestId": "evt-export-1",
                "status": "COMPLETED",
                "exportUrl": SIGNED_EVENT_URL,
                "downloadExpiresAt": "2025-06-09T00:00:00Z",
                "exportTimestamp": "2025-06-08T15:30:00Z",
                "totalCount": 3,
            }
        )
        assert httpx.post(url, content=bad, headers=sign(bad)).status_code == 400
        assert httpx.post(url, content=good, headers=sign(good)).status_code == 202
    (stored,) = store.pending(source="locations")
    assert stored.body["exportUrl"].startswith("https://bucket.s3.amazonaws.com/exports/abc.json")
    assert "X-Amz-Signature=REDACTED" in stored.body["exportUrl"]
    assert "rejected (400)" in caplog.text

    # 4. Everything written, searched.
    out, err = capfd.readouterr()
    written = "\n".join(
        [
            _everything_written(setup, run_ids),
            out,
            err,
            caplog.text,
            "\n".join(r.getMessage() for r in caplog.records),
        ]
    )
    assert "REDACTED" in written  # the links were there, redacted
    for secret in SECRETS:
        assert secret not in written, f"{secret!r} leaked"
    leaks = [written[max(0, m.start() - 300) : m.end()] for m in UNREDACTED.finditer(written)]
    assert not leaks, leaks[:3]
