"""Run the webhook receiver with uvicorn (the CLI's ``export-pipeline webhooks serve``)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from export_pipeline.core.redact import RedactingFilter, get_logger
from export_pipeline.webhooks.receiver import ReceiverSettings, create_app
from export_pipeline.webhooks.store import EventStore

logger = get_logger(__name__)  # redacts secrets from every message

DEFAULT_STORE_PATH = Path("data/webhook_events.sqlite3")
# Largest request head (request line + headers) we buffer; h11's default is 16 KiB too.
MAX_HEADER_BYTES = 16 * 1024


class _HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for the request head (slow-loris defence).

    uvicorn only times out *idle* keep-alive connections: a client that sends half a request
    line and then one byte a minute holds its connection forever. Here every request cycle
    (a new connection, or the next request on a kept-alive one) must deliver its complete head
    within ``header_timeout`` seconds, else the connection is closed. The body has its own
    deadline in the app (``ReceiverSettings.body_timeout_seconds``).
    """

    header_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_deadline)

    def _head_deadline(self) -> None:
        # IDLE: the head of the current request is still incomplete (or never started).
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.warning(
                "webhook receiver: closing connection from %s, no complete request head "
                "within %.0fs",
                self.client[0] if self.client else "?",
                self.header_timeout,
            )
            self.transport.close()


def uvicorn_options(settings: ReceiverSettings) -> dict[str, Any]:
    """Server-level guards for the receiver, shared by ``serve`` and the tests."""
    protocol = type(
        "ReceiverH11Protocol",
        (_HeaderTimeoutProtocol,),
        {"header_timeout": settings.header_timeout_seconds},
    )
    return {
        "http": protocol,
        # Beyond this many open connections (or requests in flight) uvicorn answers 503.
        "limit_concurrency": settings.max_connections,
        # Senders are machines; an idle kept-alive connection should not hold a slot for long.
        "timeout_keep_alive": 5,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "server_header": False,
    }


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
    # Every handler redacts: uvicorn's own lines (an access log of a query string) included.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
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
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
        **uvicorn_options(settings),
    )
