"""What every provider module implements. No Dagster and no DuckDB in providers/."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from export_pipeline.core.http import ApiClient
from export_pipeline.core.model import (
    ExportKind,
    ExportRequest,
    ExportStatus,
    RemoteFile,
)
from export_pipeline.core.model import (
    batched as batched,  # re-exported: providers batch their status calls with it
)
from export_pipeline.providers.spec import Event, Sandbox


class ExportProvider(ABC):
    """One asynchronous-export API.

    Subclasses declare ``name``, ``kinds`` and ``status_batch_size`` and implement the two calls.
    They only speak HTTP: mapping the provider's words to ExportState, its files to RemoteFile,
    its error codes to the typed errors in ``core.errors``.

    Everything the Dagster definitions, the CLI and the webhook receiver need to know about a
    provider is declared here (a spec provider takes it from its spec), so none of them names
    a provider: partitioning is ``ExportKind.partitions``; pushed events are ``pushes_events``
    + ``parse_event`` (the receiver's route is ``/<name>/exports/events``); the simulator is
    ``sandbox``.
    """

    name: ClassVar[str]
    kinds: ClassVar[tuple[ExportKind, ...]]
    # How many export ids one status call can carry (Mews: 1000; most APIs: 1).
    status_batch_size: ClassVar[int] = 1
    # The API pushes export events (webhooks): the receiver takes them, the sensor absorbs them.
    pushes_events: ClassVar[bool] = False
    # How its pushed events are declared (signature scheme, event id); None: Standard Webhooks
    # signed with the receiver's secret, deduplicated by webhook-id.
    events: ClassVar[Event | None] = None
    # The API's simulator and its fixed port (``export-pipeline sandbox serve``, ``dev``).
    sandbox: ClassVar[Sandbox | None] = None

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    def kind(self, name: str) -> ExportKind:
        for kind in self.kinds:
            if kind.name == name:
                return kind
        raise KeyError(f"{self.name} has no export kind {name!r}")

    @abstractmethod
    def request_export(self, kind: ExportKind, request: ExportRequest) -> ExportStatus:
        """Ask for a new export. Raises ExportInFlightError when the API allows only one."""

    @classmethod
    def parse_event(cls, body: Mapping[str, Any]) -> tuple[str | None, ExportStatus]:
        """A pushed event's body -> (partition key or None, the status it announces).

        Offline: no credentials, no call (the receiver has neither). ValueError, naming what
        is wrong, for a body that is refused (the receiver answers 400 with it).
        """
        raise ValueError(f"{cls.name} does not push export events")

    @abstractmethod
    def get_statuses(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        """Current status of each id, in ceil(len / status_batch_size) calls.

        Ids the provider does not know come back with state LOST.
        """

    def file_headers(self, file: RemoteFile) -> dict[str, str]:
        """Headers for downloading ``file``: credentials only for authenticated API files."""
        return self.api.auth_headers if file.authenticated else {}

    @property
    def api_host(self) -> str:
        return self.api.host

    def close(self) -> None:
        self.api.close()
