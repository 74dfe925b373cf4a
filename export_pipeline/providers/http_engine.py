"""The one generic provider: runs any :class:`~export_pipeline.providers.spec.ExportApiSpec`
through the core (``ApiClient`` for calls, ``ExportStatus``/``RemoteFile`` for answers, the typed
errors of ``core/errors.py``). No Dagster, no DuckDB.

A provider module is then ``SPEC = ExportApiSpec(...)`` and ``Provider = SpecProvider.for_spec(
SPEC)``; a hook is a subclass overriding one method where an API is truly odd.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any, ClassVar

import httpx

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportExpiredError,
    ExportFailedError,
    ExportInFlightError,
    ExportLostError,
    ExportNotReadyError,
    ExportPipelineError,
    LinkExpiredError,
    ProviderRejectedError,
    TransientProviderError,
)
from export_pipeline.core.http import ApiClient, RetryPolicy
from export_pipeline.core.model import (
    ExportKind,
    ExportRequest,
    ExportState,
    ExportStatus,
    RemoteFile,
)
from export_pipeline.core.redact import redact_url
from export_pipeline.providers.base import ExportProvider, batched
from export_pipeline.providers.spec import (
    Call,
    ErrorClass,
    ExportApiSpec,
    TimeFormat,
    dig,
    format_time,
    parse_time,
    render,
    render_path,
)

log = logging.getLogger(__name__)

ERROR_CLASSES: dict[ErrorClass, type[ExportPipelineError]] = {
    "configuration": ConfigurationError,
    "rejected": ProviderRejectedError,
    "transient": TransientProviderError,
    "in_flight": ExportInFlightError,
    "not_ready": ExportNotReadyError,
    "expired": ExportExpiredError,
    "lost": ExportLostError,
    "link_expired": LinkExpiredError,
    "failed": ExportFailedError,
}


def _host(url: str) -> str:
    parsed = httpx.URL(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)
    return f"{parsed.host}:{port}" if port else parsed.host


class SpecProvider(ExportProvider):
    """An :class:`ExportProvider` whose every fact comes from ``spec``."""

    spec: ClassVar[ExportApiSpec]

    def __init__(
        self,
        api: ApiClient,
        *,
        files_base_url: str | None = None,
        body_credentials: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(api)
        self.files_base_url = files_base_url or self.spec.download.files_base_url
        self.body_credentials = dict(body_credentials or {})

    @classmethod
    def for_spec(cls, spec: ExportApiSpec, class_name: str | None = None) -> type[SpecProvider]:
        """A provider class for ``spec`` (the registry lists classes: name, kinds, batch size)."""
        name = class_name or f"{spec.name.title().replace('_', '')}Provider"
        attrs = {
            "spec": spec,
            "name": spec.name,
            "kinds": spec.export_kinds(),
            "status_batch_size": spec.status.batch_size,
            "pushes_events": spec.events is not None,
            "events": spec.events,
            "sandbox": spec.sandbox,
            "__doc__": spec.description or f"{spec.name} exports, run from its spec.",
        }
        return type(name, (cls,), attrs)

    @classmethod
    def from_settings(
        cls,
        *,
        token: str = "",
        base_url: str | None = None,
        files_base_url: str | None = None,
        body_credentials: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> SpecProvider:
        """Build from the values of the spec's environment variables (read by the caller)."""
        auth = cls.spec.auth
        missing = [] if token or auth.style == "body" else [auth.token_env]
        missing += [
            env for f, env in auth.body_fields.items() if not (body_credentials or {}).get(f)
        ]
        if missing:
            raise ConfigurationError(
                f"no credentials for the {cls.spec.name} API",
                provider=cls.spec.name,
                hint=f"set {', '.join(missing)}",
            )
        headers = {}
        if auth.style == "bearer":
            headers["Authorization"] = f"Bearer {token}"
        elif auth.style == "basic":
            headers["Authorization"] = "Basic " + base64.b64encode(f"{token}:".encode()).decode()
        elif auth.style == "header":
            headers[auth.header] = token
        api = ApiClient(
            provider=cls.spec.name,
            base_url=base_url or cls.spec.base_url,
            headers=headers,
            token_env_var=auth.token_env,
            retry=retry,
            timeout=timeout,
            raise_on_401=False,  # the envelope's request id is worth keeping: we classify 401s
        )
        return cls(api, files_base_url=files_base_url, body_credentials=body_credentials)

    # -- calls ------------------------------------------------------------------------------

    def request_export(self, kind: ExportKind, request: ExportRequest) -> ExportStatus:
        start, end = request.modified_since, request.window_end
        inc = self.spec.incremental
        if inc.style == "window" and (start is None or end is None):
            raise ValueError(f"{kind.key} exports are time windows: pass both bounds")
        if inc.bounds is not None:
            start, end = self._bounded(kind, start, end)
        variables = self._variables(kind, request)
        variables["window_start"] = format_time(start, inc.time_format) if start else None
        variables["window_end"] = format_time(end, inc.time_format) if end else None
        answer = self._call(self.spec.create, variables, kind=kind.name)
        status = self._status(dig(answer, self.spec.create.record, answer), created=True)
        if kind.partition_column and request.partition is not None:
            status.detail[kind.partition_column] = request.partition
        return status

    def get_statuses(self, export_ids: Sequence[str]) -> dict[str, ExportStatus]:
        call = self.spec.status
        statuses: dict[str, ExportStatus] = {}
        for chunk in batched(list(dict.fromkeys(export_ids)), call.batch_size):
            variables = {"ids": chunk, "export_id": chunk[0]}
            try:
                answer, http = self._call(
                    call, variables, export_id=chunk[0] if len(chunk) == 1 else None, http=True
                )
            except (ExportLostError, ExportExpiredError) as exc:
                if len(chunk) > 1:
                    raise
                gone = ExportState.LOST if isinstance(exc, ExportLostError) else ExportState.EXPIRED
                statuses[chunk[0]] = self._gone(chunk[0], gone, exc)
                continue
            if call.batch_size == 1:
                status = self._status(dig(answer, call.record, answer), chunk[0], http)
                statuses[status.export_id] = status
            for record in dig(answer, call.records, []) if call.batch_size > 1 else []:
                status = self._status(record)
                statuses[status.export_id] = status
            for export_id in chunk:  # a batch answer that leaves an id out does not know it
                statuses.setdefault(export_id, self._gone(export_id, ExportState.LOST, None))
        return statuses

    @classmethod
    def parse_event(cls, body: bytes | str | Mapping[str, Any]) -> tuple[str | None, ExportStatus]:
        """A pushed event (raw JSON or decoded) -> ``(partition key, status)``; ValueError naming
        what is wrong for a body we refuse (a receiver answers 400 with it). Needs no client."""
        name, events = cls.spec.name, cls.spec.events
        if events is None:
            raise ValueError(f"{name} does not push events")
        if isinstance(body, bytes | str):
            try:
                body = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{name} event body is not JSON: {exc}") from exc
        if not isinstance(body, Mapping):
            raise ValueError(f"{name} event body must be a JSON object, got {type(body).__name__}")
        kind = dig(body, events.type_path) if events.type_path else None
        record = dig(body, events.record)
        if (events.types and kind not in events.types) or not isinstance(record, Mapping):
            raise ValueError(f"invalid {name} event: type {kind!r} (expected {events.types})")
        partition = dig(body, events.partition) if events.partition else None
        required = {cls.spec.fields.id: dig(record, cls.spec.fields.id)}
        if events.partition:
            required[events.partition] = partition
        for path, value in required.items():
            if not isinstance(value, str | int) or not str(value).strip():
                raise ValueError(f"{name} event {kind!r} lacks a non-empty {path!r}")
        try:
            event = None if kind is None else str(kind)
            status = cls(None)._status(record, event=event)  # type: ignore[arg-type]
        except ExportPipelineError as exc:
            raise ValueError(f"invalid {name} event {kind!r}: {exc.message}") from exc
        if events.accept and status.state.value not in events.accept:
            words = [w for state in events.accept for w in getattr(cls.spec.states, state)]
            raise ValueError(
                f"invalid {name} export event: status {status.provider_status!r} "
                f"(events are {' or '.join(words)})"
            )
        return (None if partition is None else str(partition).strip()), status

    def classify_download_error(self, response: httpx.Response) -> ExportPipelineError | None:
        """Typed error for an error answer met while downloading (called by core/transfer)."""
        code, message, request_id = self._envelope(response)
        for rule in self.spec.download.rules:
            if rule.matches(response.status_code, code, response.content or b""):
                return ERROR_CLASSES[rule.error](
                    f"download refused: {message or f'HTTP {response.status_code}'}",
                    provider=self.name,
                    code=rule.as_code or code or f"HTTP_{response.status_code}",
                    request_id=request_id,
                    hint=rule.hint,
                )
        return self.error_for(response) if code is not None else None

    @property
    def api_host(self) -> str:
        """The one origin that gets credentials at download time (``core/transfer.py``)."""
        if self.spec.download.credentials == "files_host" and self.files_base_url:
            return _host(self.files_base_url)
        return self.api.host

    # -- mapping ----------------------------------------------------------------------------

    def error_for(
        self,
        response: httpx.Response,
        *,
        export_id: str | None = None,
        kind: str | None = None,
        call: Call | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> ExportPipelineError:
        """Map an error answer (envelope or bare status) to a typed error with its request id:
        ``call``'s own rules first, then the spec's, then the defaults."""
        code, message, request_id = self._envelope(response)
        status = response.status_code
        ctx: dict[str, Any] = {
            "provider": self.name,
            "kind": kind,
            "export_id": export_id,
            "code": code or f"HTTP_{status}",
            "request_id": request_id,
        }
        text = message or f"HTTP {status}"
        for rule in [*(call.errors if call else ()), *self.spec.errors.rules]:
            if rule.matches(status, code, response.content or b""):
                what = render(rule.message, variables or {}) if rule.message else None
                ctx["code"] = rule.as_code or ctx["code"]
                return ERROR_CLASSES[rule.error](
                    f"{what}: {text}" if what else text, hint=rule.hint, **ctx
                )
        auth = self.spec.auth
        # Credentials in the body (Mews): any of them may be the wrong one.
        envs = " and ".join(auth.body_fields.values()) if auth.style == "body" else auth.token_env
        if status in (401, 403):
            return ConfigurationError(
                f"the {self.name} API rejected our credentials: {text} (check {envs})",
                hint=f"set valid credentials in {envs}",
                **ctx,
            )
        if status == 404:
            return ExportLostError(f"not found: {text}", hint="request the export again", **ctx)
        if status == 410:
            return ExportExpiredError(f"gone: {text}", hint="request the export again", **ctx)
        if status == 429 or status >= 500:
            return TransientProviderError(text, hint="try again later", **ctx)
        return ProviderRejectedError(f"request refused: {text}", **ctx)

    def _envelope(self, response: httpx.Response) -> tuple[str | None, str | None, str | None]:
        errors = self.spec.errors
        try:
            body = response.json()
        except ValueError:
            body = None
        code = dig(body, errors.code)
        message = dig(body, errors.message)
        request_id = dig(body, errors.request_id)
        if request_id is None and errors.request_id_header:
            request_id = response.headers.get(errors.request_id_header)
        return (
            None if code is None else str(code),
            None if message is None else str(message),
            None if request_id is None else str(request_id),
        )

    def _call(
        self,
        call: Call,
        variables: Mapping[str, Any],
        *,
        export_id: str | None = None,
        kind: str | None = None,
        http: bool = False,
    ) -> Any:
        """The answer's JSON (and its HTTP status when ``http``); error answers raise."""
        payload = render(call.body, variables)
        if self.spec.auth.style == "body" and call.encoding == "json":
            payload = {**payload, **self.body_credentials}  # given credentials win
        path = render_path(call.path, variables)
        sent = {{"json": "json", "form": "data", "query": "params"}[call.encoding]: payload}
        if call.method == "GET" and call.encoding == "json":
            sent = {"params": payload or None}
        response = self.api.request(call.method, path, **sent)
        where = {"export_id": export_id, "kind": kind, "call": call, "variables": variables}
        if response.status_code >= 300:
            stated = self._stated(response) if http else None
            if stated is not None:  # a status answer with a known word (mapping's 422 failed)
                return stated, response.status_code
            raise self.error_for(response, **where)
        try:
            answer = response.json()
        except ValueError:
            raise ProviderRejectedError(
                f"{call.method} {call.path} answered HTTP {response.status_code} without JSON",
                provider=self.name,
                kind=kind,
                export_id=export_id,
            ) from None
        flag = self.spec.errors.success_flag
        if flag is not None and dig(answer, flag, True) is not True:  # absent: not checked
            raise self.error_for(response, **where)
        return (answer, response.status_code) if http else answer

    def _stated(self, response: httpx.Response) -> Any:
        """An error answer's JSON when it is an export's status (a word the spec knows)."""
        try:
            answer = response.json()
        except ValueError:
            return None
        word = dig(answer, self.spec.fields.state)
        return answer if self.spec.states.state_of(str(word)) is not None else None

    def _bounded(
        self, kind: ExportKind, start: datetime | None, end: datetime | None
    ) -> tuple[datetime, datetime]:
        """Clip the window to what the provider can serve (its answer, not our clock)."""
        bounds = self.spec.incremental.bounds
        assert bounds is not None
        answer = self._call(bounds.call, self._variables(kind, ExportRequest()), kind=kind.name)
        fmt = self.spec.fields.time_format
        first, last = (
            parse_time(dig(answer, bounds.start), fmt),
            parse_time(dig(answer, bounds.end), fmt),
        )
        if first is None or last is None:
            raise ProviderRejectedError(
                f"the bounds call answered no {bounds.start}/{bounds.end}",
                provider=self.name,
                kind=kind.name,
            )
        start = max(start, first) if start else first
        end = min(end, last) if end else last
        if end <= start:
            raise ExportNotReadyError(
                f"no data available after {start.isoformat()} yet (available until "
                f"{last.isoformat()})",
                provider=self.name,
                kind=kind.name,
                code="NO_DATA_AVAILABLE",
                hint="the provider prepares data with a delay; a later run picks it up",
            )
        return start, end

    def _variables(self, kind: ExportKind, request: ExportRequest) -> dict[str, Any]:
        variables: dict[str, Any] = {"partition": request.partition}
        variables.update({f"kind.{k}": v for k, v in kind.params.items()})
        params = {**self.spec.param_defaults, **request.params}
        variables.update({f"param.{k}": v for k, v in params.items()})
        return variables

    def _gone(
        self, export_id: str, state: ExportState, error: ExportPipelineError | None
    ) -> ExportStatus:
        """A per-id answer 404/410 (or an id a batch left out): LOST/EXPIRED, not an error."""
        request_id = error.request_id if error else None
        return ExportStatus(
            export_id=export_id,
            state=state,
            error_code=(error.code if error else None) or "NOT_FOUND",
            error_message=error.message if error else "export not found",
            detail={"request_id": request_id} if request_id else {},
        )

    def _status(
        self,
        record: Any,
        export_id: str | None = None,
        http: int | None = None,
        *,
        created: bool = False,
        event: str | None = None,
    ) -> ExportStatus:
        """One export object -> ExportStatus. ``export_id``/``http``: what a per-id call knows
        when the answer does not say (mapping's link call has no id and no status word).
        ``created``: the create call's answer (no word = just accepted, pending). ``event``: the
        pushed event's type (its state when the record names none; links may be absent)."""
        f = self.spec.fields
        found = dig(record, f.id) if isinstance(record, Mapping) else None
        if not isinstance(record, Mapping) or (found is None and export_id is None):
            raise ProviderRejectedError(
                f"answer has no export object with {f.id!r}", provider=self.name
            )
        if found is not None and export_id is not None and str(found) != export_id:
            raise ProviderRejectedError(
                f"asked for export {export_id} but the answer is about {found}",
                provider=self.name,
                export_id=export_id,
            )
        export_id = str(found if found is not None else export_id)
        try:
            return self._read_status(record, export_id, http, created=created, event=event)
        except ValueError as exc:  # an answer of another shape than the spec says
            raise ProviderRejectedError(
                f"cannot read the status of export {export_id}: {exc}",
                provider=self.name,
                export_id=export_id,
                hint="the provider's API changed or misbehaves; report it with this message",
            ) from None

    def _read_status(
        self,
        record: Mapping[str, Any],
        export_id: str,
        http: int | None,
        *,
        created: bool,
        event: str | None,
    ) -> ExportStatus:
        f = self.spec.fields
        word = str(dig(record, f.state, ""))
        state = self.spec.states.state_of(word)
        if not word and http in self.spec.states.http:
            word = f"HTTP {http}"
            state = ExportState(self.spec.states.http[http])
        elif not word and event and self.spec.events and event in self.spec.events.states:
            word, state = event, ExportState(self.spec.events.states[event])
        elif not word and created:
            word, state = "created", ExportState.PENDING
        detail: dict[str, Any] = {
            key: dig(record, path)
            for key, path in f.detail.items()
            if dig(record, path) is not None
        }
        if state is None:
            # The one policy for unknown words (see providers/spec.py): still open, never loaded.
            log.warning("%s export %s: unknown status word %r", self.name, export_id, word)
            state, detail["unknown_status"] = ExportState.PROCESSING, word
        ready = state is ExportState.READY
        files = self._files(record, export_id, links_optional=event is not None) if ready else ()
        failed = state is ExportState.FAILED
        code = dig(record, f.error_code, strict=True) if failed else None
        message = dig(record, f.error_message, strict=True)
        if failed and not message:
            message = f"{self.name} reported the export as {word} (no reason given)"
        rows = dig(record, f.rows, strict=True)
        if rows is not None and (isinstance(rows, bool) or not str(rows).isdigit()):
            raise ValueError(f"{f.rows!r} must be a count (an integer >= 0), got {rows!r}")
        return ExportStatus(
            export_id=export_id,
            state=state,
            files=files,
            expires_at=self._expiry(record),
            provider_timestamp=_time(record, f.timestamp, f.time_format),
            expected_rows=None if rows is None else int(rows),
            error_code=str(code) if code is not None else (f.failure_code if failed else None),
            error_message=message,
            provider_status=word,
            detail=detail,
        )

    def _expiry(self, record: Mapping[str, Any]) -> datetime | None:
        f = self.spec.fields
        seconds = dig(record, f.expires_in) if f.expires_in else None
        if seconds is not None:  # a lifetime from now (the link call just answered)
            return datetime.now(UTC) + timedelta(seconds=float(seconds))
        return _time(record, f.expires_at, f.time_format)

    def _files(
        self, record: Mapping[str, Any], export_id: str, *, links_optional: bool = False
    ) -> tuple[RemoteFile, ...]:
        f = self.spec.fields
        base_url = self.api.base_url if self.api is not None else self.spec.base_url
        found = dig(record, f.files) if f.files is not None else None  # "" = the record
        if found is None and f.file_url_template:
            found = [{}]
        items = found if isinstance(found, list) else [found] if found is not None else []
        authenticated = self.spec.download.credentials != "none"
        files = []
        for i, item in enumerate(items, start=1):
            url = dig(item, f.file_url) if f.file_url else item
            if url is None and f.file_url_template:
                url = f.file_url_template.format(base_url=base_url, export_id=export_id)
            if url is None and links_optional:
                continue  # a "ready" event without links: the status call hands out fresh ones
            if not isinstance(url, str):
                raise ProviderRejectedError(
                    f"ready export without a file URL at {f.files}.{f.file_url}",
                    provider=self.name,
                    export_id=export_id,
                )
            url = str(httpx.URL(base_url + "/").join(url))  # a relative link is on the API host
            suffix = _suffix(url, f.file_formats)
            name = dig(item, f.file_name) if f.file_name else None
            files.append(
                RemoteFile(
                    url=url,
                    name=str(name)
                    if name
                    else f.file_name_format.format(n=i, i=i - 1, suffix=suffix),
                    size_bytes=dig(item, f.file_size) if f.file_size else None,
                    authenticated=authenticated,
                )
            )
        return tuple(files)


def _time(record: Mapping[str, Any], path: str | None, fmt: TimeFormat) -> datetime | None:
    value = dig(record, path, strict=True)
    try:
        return parse_time(value, fmt)
    except (ValueError, OverflowError):
        raise ValueError(f"{path!r} is not a time: {value!r}") from None


def _suffix(url: str, formats: Sequence[str] | None) -> str:
    """The local name's extension: the URL path's (or, with ``formats``, the format's + .gz)."""
    path = PurePosixPath(httpx.URL(url).path)
    if formats is None:
        return path.suffix if len(path.suffix) < 8 else ""
    suffixes = [s.lower() for s in path.suffixes]
    gz = ".gz" if suffixes[-1:] == [".gz"] else ""
    extension = suffixes[-2 if gz else -1] if len(suffixes) > bool(gz) else ""
    if extension not in formats:
        # Redacted: the URL keeps its shape (host, path), a signed link's secrets do not.
        raise ValueError(
            f"file {redact_url(url)} has no {' or '.join(formats)} extension, cannot tell the "
            "format"
        )
    return extension + gz
