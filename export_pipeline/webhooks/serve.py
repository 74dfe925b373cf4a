"""Run the webhook receiver with uvicorn (the CLI's ``export-pipeline webhooks serve``)."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from export_pipeline.core.redact import get_logger
from export_pipeline.webhooks.receiver import ReceiverSettings, create_app
from export_pipeline.webhooks.store import EventStore

logger = get_logger(__name__)  # redacts secrets from every message

DEFAULT_STORE_PATH = Path("data/webhook_events.sqlite3")


def serve(
    host: str = "127.0.0.1",
    port: int = 8787,
    store_path: Path = DEFAULT_STORE_PATH,
) -> None:
    """Serve until interrupted. Credentials come from the environment, read now.

    Settings and the store are built before uvicorn starts, so a missing secret or an unusable
    store file stops the command with a clear error instead of a server that answers 401/503 to
    every delivery. Binds to loopback by default: put a TLS-terminating proxy in front of it.
    """
    # Our own log lines (401/400/503 reasons) must reach the console next to uvicorn's;
    # basicConfig does nothing when the embedding program already configured logging.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = ReceiverSettings.from_env()
    store = EventStore(Path(store_path), busy_timeout_seconds=2.0)
    app = create_app(store, settings)
    logger.info(
        "webhook receiver on http://%s:%d, events in %s, %r", host, port, store.path, settings
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        # Senders are machines; a stalled connection should not hold a worker for long.
        timeout_keep_alive=5,
        server_header=False,
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
    )
