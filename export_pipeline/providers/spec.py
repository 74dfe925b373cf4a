"""A declarative description of one asynchronous-export API: the data a provider module is.

One :class:`ExportApiSpec` says how to ask for an export, where its id, state, files, expiry and
row count live in the answers, which status words mean which :class:`ExportState`, how errors are
shaped and what each code means, which hosts get the credentials at download time, how the
increments work, and the kinds with their keys and column hints. ``providers/http_engine.py``
runs any spec; the same models are the attribute schema of the Dagster Component
(``export_pipeline.components``), so a user writes a spec in a ``defs.yaml``.

No Dagster and no DuckDB here: pydantic models and three small helpers (dotted paths, time
values, templates).

Compared with Airbyte's declarative ``AsyncRetriever`` (creation/polling/download requesters,
``status_mapping``, extractors, error handlers), on purpose:

* one ``base_url`` and one ``auth`` for every call instead of one requester per call;
* answers are read with plain dotted paths (``result.url``), not extractor components, and
  templates are whole-value placeholders (``"{window_start}"`` keeps its type: an int for Unix
  seconds, a list for ``{ids}``; a placeholder with no value drops its field), not Jinja;
* status polling can be batched (``batch_size`` ids per call, ids missing from a batch answer are
  ``lost``); Airbyte polls one job per request;
* an unknown status word has ONE engine-wide policy (below), where Airbyte raises;
* errors map to the pipeline's typed errors with a hint, and download rules say which host gets
  the API credentials (a presigned link must get none, Stripe's ``files.stripe.com`` needs the
  secret key) and what a ``(status, body pattern)`` at download time means;
* the incremental style is declared, including a window whose end the provider bounds
  (``provider_window``: Stripe's ``data_available_end``), with the cursor taken from the
  provider's answer, never the local clock.

Unknown status words: the engine treats a word that no list names as *still processing* (the
export stays open, nothing is downloaded on a word we do not understand) and reports the word in
``ExportStatus.detail["unknown_status"]`` and a warning; a run then ends with the usual "still
processing after N s" timeout naming the word, and the export stays in the ledger. A new harmless
word ("queued") does not break a pipeline; a new failure word is visible, never loaded.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from export_pipeline.core.model import ExportKind, ExportState, Incremental, LoadMode

TimeFormat = Literal["iso", "unix", "unix_ms"]
ErrorClass = Literal[
    "configuration",  # credentials/settings wrong; retrying will not help
    "rejected",  # the provider refused the request for good
    "transient",  # try again later
    "in_flight",  # one export of this kind is already being produced
    "not_ready",  # the export is not finished yet
    "expired",  # the export is gone; request it again
    "lost",  # the provider does not know the id
    "link_expired",  # a signed link died; ask for a fresh one
    "failed",  # the provider failed the export
]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Auth(_Spec):
    """How the credentials travel. Values come from the environment variables named here."""

    style: Literal["bearer", "basic", "header", "body"] = Field(
        "bearer",
        description="bearer: 'Authorization: Bearer <token>'; basic: the token as user name; "
        "header: the token in `header`; body: `body_fields` in every JSON body (no header).",
    )
    token_env: str = Field(description="Environment variable holding the token/secret key.")
    header: str = Field("Authorization", description="Header name for style=header.")
    body_fields: dict[str, str] = Field(
        default_factory=dict,
        description="style=body: JSON body field -> environment variable (e.g. ClientToken).",
    )


class ErrorRule(_Spec):
    """``(HTTP status, provider code, body pattern)`` -> error class and hint. All given parts
    must match; the first matching rule wins."""

    status: int | None = None
    code: str | None = None
    body: str | None = Field(None, description="Regular expression searched in the body.")
    error: ErrorClass
    hint: str | None = None
    as_code: str | None = Field(
        None, description="The code the error carries (default: the provider's, or HTTP_<status>)."
    )
    message: str | None = Field(
        None,
        description="What failed, before the provider's message; placeholders of the call "
        "(e.g. 'mapping job {partition} was not exported').",
    )

    def matches(self, status: int, code: str | None, body: bytes) -> bool:
        return (
            (self.status is None or self.status == status)
            and (self.code is None or self.code == code)
            and (self.body is None or re.search(self.body.encode(), body, re.S) is not None)
        )


class Call(_Spec):
    """One HTTP call. Placeholders: {window_start} {window_end} {export_id} {ids}
    {kind.<param>} {param.<name>} {partition}."""

    method: Literal["GET", "POST"] = "GET"
    path: str
    encoding: Literal["json", "form", "query"] = Field(
        "json", description="How `body` is sent: JSON body, form-encoded body, or query string."
    )
    body: dict[str, Any] = Field(default_factory=dict, description="Template of the payload.")
    record: str = Field(
        "", description="Dotted path of the export object in the answer ('' = the whole answer)."
    )
    errors: list[ErrorRule] = Field(
        default_factory=list,
        description="Error rules for this call only, tried before `errors.rules` (a 404 that "
        "means 'no such job' on create but 'lost' on status).",
    )


class StatusCall(Call):
    batch_size: int = Field(1, description="Ids per call; >1 needs {ids} in the body.")
    records: str | None = Field(
        None, description="Batched calls: dotted path of the list of export objects."
    )

    @model_validator(mode="after")
    def _batched(self) -> StatusCall:
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.batch_size > 1 and (self.records is None or "{ids}" not in repr(self.body)):
            raise ValueError("a batched status call needs `records` and an {ids} placeholder")
        if self.batch_size == 1 and "{export_id}" not in self.path + repr(self.body):
            raise ValueError("a per-id status call needs {export_id} in its path or body")
        return self


class Fields(_Spec):
    """Where things live inside one export object (dotted paths; None = not provided)."""

    id: str = "id"
    state: str = "status"
    files: str | None = Field(
        None, description="A list of file objects, or one file object ('': the record itself)."
    )
    file_url: str = Field("url", description="Inside a file object ('' = the value itself).")
    file_size: str | None = None
    file_name: str | None = None
    file_url_template: str | None = Field(
        None, description="When the answer has no URL: e.g. '{base_url}/v1/exports/{export_id}'."
    )
    expires_at: str | None = None
    expires_in: str | None = Field(None, description="Seconds the files live from now.")
    timestamp: str | None = Field(None, description="The provider's export time (the cursor).")
    rows: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    failure_code: str = Field(
        "EXPORT_FAILED", description="Code of a failed export whose answer names none."
    )
    detail: dict[str, str] = Field(
        default_factory=dict,
        description="ExportStatus.detail key -> dotted path, kept when present (e.g. Scope).",
    )
    file_name_format: str = Field(
        "part-{n:04d}{suffix}",
        description="Local file name: {n} 1-based, {i} 0-based part number, {suffix} the URL "
        "path's extension (e.g. 'part-{i:04d}.jsonl', or 'results' for one file of unknown "
        "format: the core detects it from the bytes); with file_formats: the format's, plus "
        "'.gz' when gzipped.",
    )
    file_formats: list[str] | None = Field(
        None,
        description="When the URL's extension is the only clue to the format (e.g. "
        "[.json, .csv]): a ready file whose URL path ends otherwise is refused.",
    )
    time_format: TimeFormat = "iso"


class StatusMap(_Spec):
    """Provider words -> ExportState. A word no list names: see the module docstring."""

    pending: list[str] = Field(default_factory=list)
    processing: list[str] = Field(default_factory=list)
    ready: list[str]
    failed: list[str] = Field(default_factory=list)
    expired: list[str] = Field(default_factory=list)
    lost: list[str] = Field(default_factory=list)
    http: dict[int, Literal["pending", "processing", "ready", "failed", "expired", "lost"]] = Field(
        default_factory=dict,
        description="HTTP status -> state, for answers without a status word (mapping's "
        "link call: 202 processing, 200 ready).",
    )

    @model_validator(mode="after")
    def _disjoint(self) -> StatusMap:
        seen: dict[str, str] = {}
        for state in ("pending", "processing", "ready", "failed", "expired", "lost"):
            for word in getattr(self, state):
                if word in seen:
                    raise ValueError(f"status word {word!r} is both {seen[word]} and {state}")
                seen[word] = state
        return self

    def state_of(self, word: str) -> ExportState | None:
        for state in ExportState:
            if word in getattr(self, state.value, ()):
                return state
        return None


class Errors(_Spec):
    """The error envelope and what each code means. Without a matching rule: 401/403 ->
    configuration (naming the token variable), 404 -> lost, 410 -> expired, 429/5xx ->
    transient, anything else -> rejected."""

    code: str | None = "error.code"
    message: str | None = "error.message"
    request_id: str | None = Field(None, description="Dotted path of the request id in the body.")
    request_id_header: str | None = "X-Request-Id"
    success_flag: str | None = Field(
        None,
        description="A boolean that, where an answer has it, must be true even at HTTP 200 "
        "(e.g. 'success').",
    )
    rules: list[ErrorRule] = Field(default_factory=list)


class Download(_Spec):
    """Which files get the API credentials, and what a download error means."""

    credentials: Literal["none", "api_host", "files_host"] = Field(
        "none",
        description="none: presigned links (no credentials, ever); api_host: files on the API "
        "host (credentials never follow a redirect elsewhere); files_host: files on "
        "`files_base_url`'s host, which needs the same credentials (Stripe).",
    )
    files_base_url: str | None = Field(None, description="Origin of the files (files_host).")
    rules: list[ErrorRule] = Field(default_factory=list)


class Bounds(_Spec):
    """A call that says which window the provider can serve (provider_window)."""

    call: Call
    start: str = Field(description="Dotted path of the earliest time with data.")
    end: str = Field(description="Dotted path of the latest time with data.")


class IncrementalSpec(_Spec):
    style: Literal["snapshot", "modified_since", "window", "provider_window"] = Field(
        "snapshot",
        description="snapshot: every export is full (table replaced); modified_since: rows "
        "changed since the cursor; window: [start, end) windows, cursor = end; "
        "provider_window: windows the provider bounds (`bounds`), cursor = `fields.timestamp`.",
    )
    time_format: TimeFormat = Field("iso", description="How window values are sent.")
    bounds: Bounds | None = None


class Column(_Spec):
    type: str = Field(description="DuckDB type hint, e.g. VARCHAR, BIGINT, TIMESTAMPTZ.")
    description: str = ""
    range: tuple[float, float] | None = Field(
        None, description="[min, max] checked by the asset check on value ranges."
    )


class View(_Spec):
    """An analyst view over the kind's table (e.g. nested lists unnested into rows)."""

    sql: str = Field(description="SELECT over <provider>.<kind>; DuckDB 1.4 SQL.")
    columns: dict[str, str] = Field(default_factory=dict, description="Column -> description.")


class KindSpec(_Spec):
    name: str
    primary_key: list[str]
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict, description="Values for {kind.<x>}.")
    columns: dict[str, Column] = Field(default_factory=dict, description="Type hints.")
    load_mode: Literal["merge", "snapshot", "replace_partition"] | None = None
    partition_column: str | None = Field(
        None, description="replace_partition: the column whose value is the partition key."
    )
    partitions: str | None = Field(
        None,
        description="Rows belong to user-named units (one partition per unit): the name of that "
        "set of partition keys (a Dagster dynamic partitions definition). None: unpartitioned.",
    )
    views: dict[str, View] = Field(default_factory=dict, description="Name -> analyst view.")
    encoding: str | None = Field(
        None,
        description="The files' text encoding when not UTF-8 (a Python codec name, e.g. "
        "'cp1252'); UTF-16 and UTF-32 are recognised without it.",
    )

    @model_validator(mode="after")
    def _named(self) -> KindSpec:
        _identifier("kind name", self.name)
        if (self.load_mode == "replace_partition") != (self.partition_column is not None):
            raise ValueError(f"kind {self.name}: replace_partition goes with partition_column")
        if not self.primary_key:
            raise ValueError(f"kind {self.name}: primary_key needs at least one column")
        if self.encoding is not None:
            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ValueError(f"kind {self.name}: unknown encoding {self.encoding!r}") from None
        return self


class Signing(_Spec):
    """How an API signs its webhook deliveries when not with Standard Webhooks (the default:
    the receiver's ``EXPORT_PIPELINE_WEBHOOK_SECRET``)."""

    scheme: Literal["stripe"] = Field(
        description="stripe: a `Stripe-Signature: t=<unix>,v1=<hex>` header, HMAC-SHA256 of "
        "`<t>.<raw body>` keyed with the endpoint's signing secret as is."
    )
    secret_env: str = Field(
        description="Environment variable with the endpoint's signing secret(s), "
        "comma-separated while one is rotated."
    )


class Event(_Spec):
    """A pushed event that names an export: which types count and where the export object is."""

    type_path: str | None = Field("type", description="None: events carry no type field.")
    types: list[str] = Field(default_factory=list, description="Types that count (all: []).")
    record: str = Field(description="Dotted path of the export object ('' = the event itself).")
    partition: str | None = Field(
        None, description="Dotted path of the partition key (required in the event when set)."
    )
    states: dict[str, Literal["pending", "processing", "ready", "failed", "expired", "lost"]] = (
        Field(
            default_factory=dict,
            description="Event type -> state, for events whose record names no status word. "
            "A ready event may carry no file links: the status call gives fresh ones.",
        )
    )
    id_path: str | None = Field(
        None,
        description="Dotted path of the event's own id: the key a redelivery is recognised by "
        "(None: the webhook-id header, else a hash of the body).",
    )
    signing: Signing | None = Field(
        None, description="The API's own signature scheme (None: Standard Webhooks)."
    )
    accept: list[Literal["pending", "processing", "ready", "failed", "expired", "lost"]] = Field(
        default_factory=list,
        description="The states an event may carry; another is refused (the sender gets 400). "
        "[] = any.",
    )

    @model_validator(mode="after")
    def _typed(self) -> Event:
        if (self.type_path is None) != (not self.types):
            raise ValueError("events: `types` goes with `type_path` (type_path: null, no types)")
        return self


class Sandbox(_Spec):
    """The API's simulator (``export-pipeline sandbox serve``, ``dev``, the tests)."""

    module: str = Field(description="Module with the simulator's ``State`` and ``create_app``.")
    port: int = Field(description="Its fixed port (`export-pipeline sandbox serve`).")
    files_port: int | None = Field(
        None,
        description="Fixed port of its file host, for an API whose files are on a host of their "
        "own (download.credentials: files_host). The module then has ``create_files_app``, "
        "and its ``State`` a ``files_base_url`` the bundle sets to that host's URL.",
    )


class ExportApiSpec(_Spec):
    name: str = Field(description="Provider name: the DuckDB schema and asset key prefix.")
    description: str = ""
    base_url: str = Field(description="Production API origin, e.g. https://api.stripe.com.")
    base_url_env: str | None = Field(
        None,
        description="Environment variable the deployment sets the API origin in (required then: "
        "an API whose documents name no origin, or a sandbox). None: `base_url`.",
    )
    origin_env: dict[Literal["base_url", "files_base_url"], str] = Field(
        default_factory=dict,
        description="Variables that, when set, replace the production origins `base_url` and "
        "`download.files_base_url` (a sandbox, a proxy); unset, the spec's own are used.",
    )
    auth: Auth
    param_defaults: dict[str, Any] = Field(
        default_factory=dict, description="{param.<name>} values when the run config has none."
    )
    create: Call
    status: StatusCall
    fields: Fields = Field(default_factory=Fields)
    states: StatusMap
    errors: Errors = Field(default_factory=Errors)
    download: Download = Field(default_factory=Download)
    incremental: IncrementalSpec = Field(default_factory=IncrementalSpec)
    kinds: list[KindSpec]
    events: Event | None = Field(
        None, description="Pushed events: the webhook receiver gets a route /<name>/exports/events."
    )
    sandbox: Sandbox | None = None

    @model_validator(mode="after")
    def _coherent(self) -> ExportApiSpec:
        _identifier("provider name", self.name)
        if not self.kinds:
            raise ValueError("a spec needs at least one kind")
        inc = self.incremental
        if inc.style == "provider_window" and (inc.bounds is None or not self.fields.timestamp):
            raise ValueError("provider_window needs incremental.bounds and fields.timestamp")
        if self.download.credentials == "files_host" and not self.download.files_base_url:
            raise ValueError("download.credentials=files_host needs download.files_base_url")
        files_host = self.download.files_base_url is not None
        if "files_base_url" in self.origin_env and not files_host:
            raise ValueError("origin_env.files_base_url replaces download.files_base_url: set it")
        if self.sandbox is not None and self.sandbox.files_port is not None and not files_host:
            raise ValueError("sandbox.files_port is the port of download.files_base_url's host")
        return self

    def export_kinds(self) -> tuple[ExportKind, ...]:
        incremental = {
            "snapshot": Incremental.NONE,
            "modified_since": Incremental.MODIFIED_SINCE,
            "window": Incremental.WINDOW,
            # The provider says where the window ended; that answer is the cursor.
            "provider_window": Incremental.MODIFIED_SINCE,
        }[self.incremental.style]
        default_mode = "snapshot" if self.incremental.style == "snapshot" else "merge"
        return tuple(
            ExportKind(
                provider=self.name,
                name=k.name,
                primary_key=tuple(k.primary_key),
                load_mode=LoadMode(k.load_mode or default_mode),
                incremental=incremental,
                description=k.description,
                params=dict(k.params),
                columns={c: col.type for c, col in k.columns.items()} or None,
                partition_column=k.partition_column,
                partitions=k.partitions,
                views={name: view.sql for name, view in k.views.items()},
                value_ranges={c: col.range for c, col in k.columns.items() if col.range},
                encoding=k.encoding,
            )
            for k in self.kinds
        )


def _identifier(what: str, value: str) -> None:
    # Names become DuckDB schemas/tables and Dagster asset keys: keep them plain.
    if not re.fullmatch(r"[a-z][a-z0-9_]*", value):
        raise ValueError(f"{what} {value!r} must match [a-z][a-z0-9_]* (names tables, assets)")


# -- helpers ---------------------------------------------------------------------------------

_MISSING = object()


def dig(data: Any, path: str | None, default: Any = None, *, strict: bool = False) -> Any:
    """``dig({"a": {"b": [1, 2]}}, "a.b.1") == 2``; a missing step gives ``default``.
    ``strict``: a step that meets a plain value (``{"a": "boom"}`` for ``a.b``) is a
    ValueError naming it, not a missing value (an answer of another shape than documented)."""
    if path is None:
        return default
    if path == "":
        return data
    steps = path.split(".")
    for n, step in enumerate(steps):
        if isinstance(data, Mapping):
            data = data.get(step, _MISSING)
        elif isinstance(data, list) and step.isdigit() and int(step) < len(data):
            data = data[int(step)]
        elif strict and not isinstance(data, list):
            where = ".".join(steps[:n])
            raise ValueError(f"{where!r} must be an object, got {data!r}")
        else:
            return default
        if data is _MISSING or data is None:
            return default
    return data


def format_time(value: datetime, fmt: TimeFormat) -> str | int:
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime")
    if fmt == "unix":
        return int(value.timestamp())
    if fmt == "unix_ms":
        return int(value.timestamp() * 1000)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any, fmt: TimeFormat) -> datetime | None:
    """A provider's time value (ISO text, or Unix seconds/milliseconds) -> aware UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        seconds = float(value) / (1000 if fmt == "unix_ms" else 1)
        return datetime.fromtimestamp(seconds, UTC)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


_PLACEHOLDER = re.compile(r"\{([a-z_]+(?:\.[A-Za-z0-9_]+)?)\}")


def render(template: Any, variables: Mapping[str, Any]) -> Any:
    """Fill placeholders. A value that is exactly one placeholder keeps the variable's type;
    a field whose placeholder has no value (None) is dropped. Unknown names are an error."""

    def lookup(name: str) -> Any:
        if name not in variables and not name.startswith(("kind.", "param.")):
            raise KeyError(f"unknown placeholder {{{name}}}; known: {sorted(variables)}")
        return variables.get(name)

    if isinstance(template, Mapping):
        out = {}
        for key, value in template.items():
            rendered = render(value, variables)
            if rendered is not None:
                out[key] = rendered
        return out
    if isinstance(template, list):
        return [v for v in (render(item, variables) for item in template) if v is not None]
    if not isinstance(template, str):
        return template
    whole = _PLACEHOLDER.fullmatch(template)
    if whole:
        return lookup(whole.group(1))
    values = {m.group(1): lookup(m.group(1)) for m in _PLACEHOLDER.finditer(template)}
    if any(v is None for v in values.values()):
        return None
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def render_path(path: str, variables: Mapping[str, Any]) -> str:
    """Placeholders in a URL path, each value percent-encoded (an id cannot add a path step)."""

    def fill(match: re.Match[str]) -> str:
        value = render("{" + match.group(1) + "}", variables)
        if value is None:
            raise ValueError(f"path {path!r}: no value for {{{match.group(1)}}}")
        return quote(str(value), safe="")

    return _PLACEHOLDER.sub(fill, path)


def load_spec(path: Path) -> ExportApiSpec:
    """A spec from a YAML file (the same mapping a defs.yaml holds under ``attributes.spec``)."""
    import yaml

    try:
        return ExportApiSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValidationError as exc:
        raise ValueError(f"invalid export API spec {path}: {exc}") from exc
