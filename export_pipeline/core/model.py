"""The provider-independent vocabulary: export kinds, states, statuses, files.

Nothing here imports Dagster, DuckDB or HTTP; every other layer speaks these types.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from itertools import islice
from types import MappingProxyType
from typing import Any, Protocol


class ExportState(StrEnum):
    """One state machine for every provider; each provider maps its own words onto it."""

    PENDING = "pending"  # requested, provider has not started
    PROCESSING = "processing"  # provider is generating it
    READY = "ready"  # files can be downloaded
    LOADED = "loaded"  # data committed to the warehouse (terminal)
    FAILED = "failed"  # provider failed it, or we gave up on it (terminal)
    EXPIRED = "expired"  # files gone before we loaded them; ask again (terminal)
    LOST = "lost"  # provider no longer knows the id (terminal)

    @property
    def is_open(self) -> bool:
        return self in OPEN_STATES

    @property
    def is_terminal(self) -> bool:
        return not self.is_open


OPEN_STATES = frozenset({ExportState.PENDING, ExportState.PROCESSING, ExportState.READY})

# Provider statuses can skip steps (PENDING -> READY) but never leave a terminal state,
# except FAILED -> LOADED is not allowed either: a loaded export is loaded forever.
ALLOWED_TRANSITIONS: Mapping[ExportState, frozenset[ExportState]] = MappingProxyType(
    {
        ExportState.PENDING: frozenset(ExportState) - {ExportState.LOADED},
        ExportState.PROCESSING: frozenset(ExportState) - {ExportState.LOADED, ExportState.PENDING},
        ExportState.READY: frozenset(
            {
                ExportState.READY,
                ExportState.LOADED,
                ExportState.FAILED,
                ExportState.EXPIRED,
                ExportState.LOST,
            }
        ),
        ExportState.LOADED: frozenset({ExportState.LOADED}),
        ExportState.FAILED: frozenset({ExportState.FAILED}),
        ExportState.EXPIRED: frozenset({ExportState.EXPIRED}),
        ExportState.LOST: frozenset({ExportState.LOST}),
    }
)


def can_transition(current: ExportState, new: ExportState) -> bool:
    return new in ALLOWED_TRANSITIONS[current]


class LoadMode(StrEnum):
    MERGE = "merge"  # upsert by primary key (incremental exports)
    SNAPSHOT = "snapshot"  # table becomes exactly this export (full exports)
    REPLACE_PARTITION = "replace_partition"  # rows of one partition value are replaced


class Incremental(StrEnum):
    NONE = "none"  # every export is full
    MODIFIED_SINCE = "modified_since"  # cursor = provider's export timestamp of last load
    WINDOW = "window"  # cursor = end of last loaded [start, end) window


class SchemaContract(StrEnum):
    """What a load does with columns, struct fields or types the table does not have yet."""

    EVOLVE = "evolve"  # add them / widen the type inside the load transaction (the default)
    FREEZE = "freeze"  # fail the load, naming them (like dlt's schema contract "freeze")


class FileFormat(StrEnum):
    CSV = "csv"
    JSON_ARRAY = "json"
    JSONL = "jsonl"


@dataclass(frozen=True)
class ExportKind:
    """One kind of export of one provider; assets, checks, schedules are built from these."""

    provider: str
    name: str
    primary_key: tuple[str, ...]
    load_mode: LoadMode = LoadMode.MERGE
    incremental: Incremental = Incremental.NONE
    description: str = ""
    # Provider-specific request facts, e.g. {"entity_type": "Reservation"}.
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # Column -> DuckDB type: type *hints*, never a filter. Every key the data holds lands (top
    # level and nested); the declared ones get these types, so CSV (nested values as JSON text)
    # and JSON give the same table. See docs/schema.md.
    columns: Mapping[str, str] | None = field(default=None, hash=False)
    schema_contract: SchemaContract = SchemaContract.EVOLVE
    # The files' text encoding when it is not UTF-8 (a Python codec name, e.g. "cp1252"): such
    # files are transcoded before DuckDB reads them. UTF-16 and UTF-32 are told by their bytes
    # and need no setting; a UTF-8 byte-order mark outranks it. See docs/schema.md.
    encoding: str | None = None
    # Columns that must not be NULL (the primary key always is); range checks count a NULL as
    # a failure only for these.
    not_null: tuple[str, ...] = ()
    # Extra analyst views: view name (unqualified, in the provider schema) -> SELECT over the table.
    views: Mapping[str, str] = field(default_factory=dict, hash=False)
    partition_column: str | None = None  # for REPLACE_PARTITION
    # Rows belong to user-named units (mapping jobs): the name of that set of partition keys.
    # Dagster makes it a dynamic partitions definition; None = not partitioned.
    partitions: str | None = None
    # Column checked for >0 rows / value ranges by asset checks: name -> (min, max).
    value_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.encoding is not None:
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(
                    f"kind {self.key}: unknown encoding {self.encoding!r} (a Python codec name, "
                    "e.g. 'cp1252', 'latin-1', 'shift_jis')"
                ) from None

    @property
    def schema(self) -> str:
        return self.provider

    @property
    def table(self) -> str:
        """Qualified DuckDB table name, e.g. ``mews.reservation``."""
        return f"{self.provider}.{self.name}"

    @property
    def key(self) -> str:
        """Stable identifier, e.g. ``mews/reservation`` (also the Dagster asset key path)."""
        return f"{self.provider}/{self.name}"


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file of an export."""

    url: str
    name: str  # stable local file name, e.g. "part-0001.jsonl"
    size_bytes: int | None = None  # as announced by the provider, verified after download
    # True: send the provider's auth headers to the API host (they are dropped on any redirect
    # to another host). False: a presigned link that must get no credentials at all.
    authenticated: bool = False


@dataclass(frozen=True)
class ExportRequest:
    """What we ask a provider for. The window is explicit, never a hidden global."""

    modified_since: datetime | None = None  # also the window start for WINDOW kinds
    window_end: datetime | None = None
    params: Mapping[str, Any] = field(
        default_factory=dict, hash=False
    )  # e.g. {"format": "csv"} or {"mapping_job_id": "..."}
    partition: str | None = None


@dataclass(frozen=True)
class ExportStatus:
    """A provider's answer about one export, already mapped to our vocabulary."""

    export_id: str
    state: ExportState
    files: tuple[RemoteFile, ...] = ()
    expires_at: datetime | None = None
    provider_timestamp: datetime | None = None  # e.g. exportTimestamp; drives the cursor
    expected_rows: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    provider_status: str | None = None  # the provider's own word, for humans
    detail: Mapping[str, Any] = field(
        default_factory=dict, hash=False
    )  # extra JSON-safe fields (Scope, sizes)


class ExportApi(Protocol):
    """What the core asks of a provider. ``providers.base.ExportProvider`` is one; the core
    types against this so that it never imports ``providers`` (which imports the core)."""

    name: str
    kinds: tuple[ExportKind, ...]
    status_batch_size: int  # ids one status call can carry
    pushes_events: bool
    api: Any  # its ``core.http.ApiClient``: credentials and timeout for downloads

    @property
    def api_host(self) -> str: ...

    def kind(self, name: str) -> ExportKind: ...

    def request_export(self, kind: ExportKind, request: ExportRequest) -> ExportStatus: ...

    def get_statuses(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]: ...

    def parse_event(self, body: Mapping[str, Any]) -> tuple[str | None, ExportStatus]: ...

    def close(self) -> None: ...


def batched(items: Sequence[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of at most ``size`` (export ids per status call)."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
