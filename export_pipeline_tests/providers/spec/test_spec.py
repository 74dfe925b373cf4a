"""The spec and the generic engine, layer by layer: pure validation, status mapping and error
classification on real ``httpx.Response`` objects, then the batched shape over loopback HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from export_pipeline.core.errors import (
    ConfigurationError,
    ExportExpiredError,
    ExportInFlightError,
    ExportLostError,
    LinkExpiredError,
    ProviderRejectedError,
    TransientProviderError,
)
from export_pipeline.core.model import ExportRequest, ExportState, Incremental, LoadMode
from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.spec import ExportApiSpec, dig, render, render_path
from export_pipeline.sandbox.server import RunningServer


def spec_dict(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "acme",
        "base_url": "http://127.0.0.1:9",
        "auth": {"token_env": "ACME_TOKEN"},
        "create": {"method": "POST", "path": "/exports", "body": {"since": "{window_start}"}},
        "status": {"path": "/exports/{export_id}"},
        "fields": {"files": "files", "file_size": "size", "rows": "rows"},
        "states": {"pending": ["QUEUED"], "ready": ["DONE"], "failed": ["ERROR"]},
        "errors": {
            "request_id": "meta.request_id",
            "rules": [
                {"code": "ONE_AT_A_TIME", "error": "in_flight", "hint": "wait"},
                {"status": 400, "body": "too big", "error": "rejected", "hint": "smaller"},
            ],
        },
        "download": {"rules": [{"status": 403, "body": "expired", "error": "link_expired"}]},
        "incremental": {"style": "modified_since"},
        "kinds": [{"name": "things", "primary_key": ["id"]}],
    }
    base.update(overrides)
    return base


def provider_for(data: dict[str, Any], base_url: str | None = None, **kw: Any) -> SpecProvider:
    cls = SpecProvider.for_spec(ExportApiSpec.model_validate(data))
    return cls.from_settings(token=kw.pop("token", "t0k"), base_url=base_url, **kw)


@pytest.fixture
def acme() -> Iterator[SpecProvider]:
    provider = provider_for(spec_dict())
    yield provider
    provider.close()


# -- the spec itself (pure) --------------------------------------------------------------------


def test_kinds_follow_the_incremental_style() -> None:
    for style, incremental, mode in (
        ("snapshot", Incremental.NONE, LoadMode.SNAPSHOT),
        ("window", Incremental.WINDOW, LoadMode.MERGE),
        ("modified_since", Incremental.MODIFIED_SINCE, LoadMode.MERGE),
    ):
        (kind,) = ExportApiSpec.model_validate(
            spec_dict(incremental={"style": style})
        ).export_kinds()
        assert (kind.incremental, kind.load_mode, kind.key) == (incremental, mode, "acme/things")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"states": {"ready": ["DONE"], "failed": ["DONE"]}}, "both ready and failed"),
        ({"status": {"path": "/exports"}}, "needs {export_id}"),
        ({"status": {"path": "/s", "batch_size": 50}}, "needs `records`"),
        ({"incremental": {"style": "provider_window"}}, "needs incremental.bounds"),
        ({"download": {"credentials": "files_host"}}, "needs download.files_base_url"),
        ({"origin_env": {"files_base_url": "X_FILES_URL"}}, "replaces download.files_base_url"),
        ({"origin_env": {"token": "X"}}, "origin_env.token"),
        ({"sandbox": {"module": "m", "port": 1, "files_port": 2}}, "files_base_url's host"),
        ({"kinds": [{"name": "Bad Name", "primary_key": ["id"]}]}, "must match"),
        ({"colour": "blue"}, "Extra inputs"),
        (
            {"kinds": [{"name": "k", "primary_key": ["id"], "load_mode": "replace_partition"}]},
            "goes with partition_column",
        ),
    ],
)
def test_an_incoherent_spec_is_refused_with_a_reason(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ExportApiSpec.model_validate(spec_dict(**change))


def test_templates_keep_types_and_drop_missing_values() -> None:
    variables = {"window_start": 1700000000, "window_end": None, "ids": ["a", "b"]}
    body = {"start": "{window_start}", "end": "{window_end}", "Ids": "{ids}", "x": "at {ids}"}
    assert render(body, variables) == {"start": 1700000000, "Ids": ["a", "b"], "x": "at ['a', 'b']"}
    assert render({"f": "{kind.format}"}, {"kind.format": "csv"}) == {"f": "csv"}
    with pytest.raises(KeyError, match="unknown placeholder"):
        render({"a": "{windw_start}"}, variables)
    # An id cannot add a path step or a query.
    assert render_path("/e/{export_id}", {"export_id": "../x?y"}) == "/e/..%2Fx%3Fy"
    assert dig({"a": {"b": [{"c": 1}]}}, "a.b.0.c") == 1 and dig({"a": None}, "a.b", 5) == 5


# -- status mapping (pure: the engine's reading of one answer) ---------------------------------


def test_status_words_map_onto_the_state_machine(acme: SpecProvider) -> None:
    ready = acme._status(
        {"id": 7, "status": "DONE", "rows": 3, "files": [{"url": "https://cdn/x/a.csv", "size": 9}]}
    )
    assert ready.export_id == "7" and ready.state is ExportState.READY and ready.expected_rows == 3
    (file,) = ready.files
    assert (file.name, file.size_bytes, file.authenticated) == ("part-0001.csv", 9, False)
    assert acme._status({"id": "8", "status": "QUEUED"}).state is ExportState.PENDING
    failed = acme._status({"id": "9", "status": "ERROR"})
    assert failed.state is ExportState.FAILED and failed.error_code == "EXPORT_FAILED"


def test_an_unknown_word_keeps_the_export_open_and_is_reported(acme: SpecProvider) -> None:
    status = acme._status({"id": "1", "status": "REINDEXING", "files": [{"url": "https://x/y"}]})
    # The one policy: never download on a word we do not understand, never fail a healthy export.
    assert status.state is ExportState.PROCESSING and status.files == ()
    assert status.detail["unknown_status"] == "REINDEXING"


def test_answers_of_another_shape_are_refused_naming_the_field(acme: SpecProvider) -> None:
    # A per-id answer about another export must never update this one.
    with pytest.raises(ProviderRejectedError, match="asked for export 1 but the answer is about 2"):
        acme._status({"id": "2", "status": "QUEUED"}, "1")
    with pytest.raises(ProviderRejectedError, match="'rows' must be a count"):
        acme._status({"id": "3", "status": "DONE", "rows": -1, "files": []})
    assert acme._status({"id": "4", "status": "DONE", "rows": "12"}).expected_rows == 12


def test_file_formats_name_the_file_or_refuse_it() -> None:
    fields = {"files": "files", "file_formats": [".json", ".csv"], "file_name_format": "x{suffix}"}
    provider = provider_for(spec_dict(fields=fields))
    try:
        done = provider._status(
            {"id": "1", "status": "DONE", "files": [{"url": "https://c/a.CSV.gz?sig=s3cret"}]}
        )
        assert done.files[0].name == "x.csv.gz"
        with pytest.raises(ProviderRejectedError, match=r"no \.json or \.csv extension") as err:
            provider._status(
                {"id": "1", "status": "DONE", "files": [{"url": "https://c/a.xml?sig=s3cret"}]}
            )
        assert "s3cret" not in str(err.value)  # a signed query is a secret
        assert "https://c/a.xml?sig=" in str(err.value)  # the URL's shape stays
    finally:
        provider.close()


# -- error classification (pure, on real httpx responses) --------------------------------------


def _answer(status: int, body: Any = None, **headers: str) -> httpx.Response:
    request = httpx.Request("GET", "http://127.0.0.1:9/x")
    if isinstance(body, bytes):
        return httpx.Response(status, content=body, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


def _envelope(code: str, message: str = "m") -> dict[str, Any]:
    return {"error": {"code": code, "message": message}, "meta": {"request_id": "r-1"}}


@pytest.mark.parametrize(
    ("response", "error_class", "hint"),
    [
        (_answer(409, _envelope("ONE_AT_A_TIME")), ExportInFlightError, "wait"),
        (_answer(400, _envelope("X", "export too big")), ProviderRejectedError, "smaller"),
        (_answer(401, _envelope("UNAUTHORIZED")), ConfigurationError, "ACME_TOKEN"),
        (_answer(404, _envelope("NOT_FOUND")), ExportLostError, None),
        (_answer(410, b"gone"), ExportExpiredError, None),
        (_answer(503, b"<html>"), TransientProviderError, None),
        (_answer(400, _envelope("INVALID_FORMAT")), ProviderRejectedError, None),
    ],
)
def test_error_answers_become_typed_errors(
    acme: SpecProvider, response: httpx.Response, error_class: type, hint: str | None
) -> None:
    error = acme.error_for(response, export_id="e1")
    assert type(error) is error_class
    assert error.provider == "acme" and error.export_id == "e1"
    if hint:
        assert hint in (error.hint or "")
    if response.headers.get("content-type") == "application/json":
        assert error.request_id == "r-1"


def test_download_rules_and_the_fallback(acme: SpecProvider) -> None:
    s3 = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    assert isinstance(acme.classify_download_error(_answer(403, s3)), LinkExpiredError)
    assert acme.classify_download_error(_answer(403, b"<Error>Denied</Error>")) is None


# -- the batched shape, body credentials, success:false at HTTP 200 (over loopback) ------------


def _batch_app(seen: list[dict[str, Any]]) -> Starlette:
    async def status(request: Request) -> JSONResponse:
        body = await request.json()
        seen.append(body)
        if body.get("ClientToken") != "ct":
            return JSONResponse({"success": False, "message": "bad token"})
        known = [i for i in body["ExportIds"] if not i.startswith("gone")]
        exports = [{"Id": i, "Status": "Success", "Files": [{"Url": f"https://s3/{i}"}]}
                   for i in known]  # fmt: skip
        return JSONResponse({"success": True, "Exports": exports})

    return Starlette(routes=[Route("/exports/getAll", status, methods=["POST"])])


def test_batched_status_with_body_credentials() -> None:
    seen: list[dict[str, Any]] = []
    data = spec_dict(
        auth={"style": "body", "token_env": "X_ACCESS", "body_fields": {"ClientToken": "X_CT"}},
        status={
            "method": "POST",
            "path": "/exports/getAll",
            "batch_size": 2,
            "body": {"ExportIds": "{ids}"},
            "records": "Exports",
        },
        fields={"id": "Id", "state": "Status", "files": "Files", "file_url": "Url"},
        states={"ready": ["Success"]},
        errors={"success_flag": "success", "message": "message"},
    )
    with RunningServer(_batch_app(seen)) as server:
        provider = provider_for(data, server.base_url, body_credentials={"ClientToken": "ct"})
        statuses = provider.get_statuses(["a", "b", "gone-1"])
        assert [len(body["ExportIds"]) for body in seen] == [2, 1]  # ceil(3 / 2) calls
        assert (
            statuses["a"].state is ExportState.READY
            and statuses["b"].files[0].url == "https://s3/b"
        )
        assert statuses["gone-1"].state is ExportState.LOST  # left out of a batch answer

        wrong = provider_for(data, server.base_url, body_credentials={"ClientToken": "nope"})
        with pytest.raises(ProviderRejectedError, match="bad token"):
            wrong.get_statuses(["a"])  # HTTP 200, success:false
        provider.close()
        wrong.close()


def test_request_sends_the_window_in_the_declared_format(acme: SpecProvider) -> None:
    seen: list[Any] = []

    async def create(request: Request) -> JSONResponse:
        seen.append(await request.json())
        return JSONResponse({"id": "e1", "status": "QUEUED"})

    app = Starlette(routes=[Route("/exports", create, methods=["POST"])])
    with RunningServer(app) as server:
        provider = provider_for(spec_dict(), server.base_url)
        status = provider.request_export(provider.kinds[0], ExportRequest())
        since = datetime(2025, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
        provider.request_export(provider.kinds[0], ExportRequest(modified_since=since))
        provider.close()
    assert status.state is ExportState.PENDING
    assert seen == [{}, {"since": "2025-01-02T03:04:05Z"}]  # a full export sends no `since`


# -- mapping's shape: the status is a link call without id or word; partitions ----------------


def _link_app() -> Starlette:
    async def link(request: Request) -> JSONResponse:
        file_id = request.path_params["file_id"]
        if file_id == "busy":
            return JSONResponse({"status": "processing"}, status_code=202)
        if file_id == "purged":
            return JSONResponse({"error": {"code": "GONE", "message": "purged"}}, status_code=410)
        return JSONResponse({"downloadUrl": f"https://s3/{file_id}", "expiresInSeconds": 60})

    return Starlette(routes=[Route("/exports/{file_id}/download", link, methods=["GET"])])


def test_state_from_the_http_status_and_a_relative_expiry() -> None:
    data = spec_dict(
        status={"path": "/exports/{export_id}/download"},
        fields={"state": "state", "files": "", "file_url": "downloadUrl",
                "expires_in": "expiresInSeconds"},
        states={"ready": ["done"], "http": {202: "processing", 200: "ready"}},
        incremental={"style": "snapshot"},
        kinds=[{"name": "results", "primary_key": ["id"], "load_mode": "replace_partition",
                "partition_column": "jobId"}],
        events={"types": ["export.ready"], "record": "data", "partition": "data.jobId"},
    )  # fmt: skip
    with RunningServer(_link_app()) as server:
        provider = provider_for(data, server.base_url)
        before = datetime.now(UTC)
        statuses = provider.get_statuses(["f1", "busy", "purged"])
        provider.close()
    ready = statuses["f1"]
    assert ready.state is ExportState.READY and ready.files[0].url == "https://s3/f1"
    assert ready.expires_at is not None
    assert timedelta(seconds=59) <= ready.expires_at - before <= timedelta(seconds=120)
    assert statuses["busy"].state is ExportState.PROCESSING
    assert (
        statuses["purged"].state is ExportState.EXPIRED and statuses["purged"].error_code == "GONE"
    )
    (kind,) = provider.kinds
    assert (kind.load_mode, kind.partition_column) == (LoadMode.REPLACE_PARTITION, "jobId")
    partition, _ = provider.parse_event(
        {
            "type": "export.ready",
            "data": {"id": "f2", "state": "done", "jobId": 42, "downloadUrl": "u"},
        }
    )
    assert partition == "42"


# -- options Mews and mapping use (pure: real httpx.Response objects, no server) --------------


def test_a_call_rule_comes_first_and_names_what_failed() -> None:
    data = spec_dict(
        create={
            "method": "POST",
            "path": "/jobs/{partition}/export",
            "errors": [
                {"status": 404, "error": "rejected", "as_code": "JOB_NOT_FOUND",
                 "message": "no job {partition}"},
            ],
        },
    )  # fmt: skip
    provider = provider_for(data)
    create = provider.spec.create
    missing = _answer(404, _envelope("NOT_FOUND", "nope"))
    error = provider.error_for(missing, call=create, variables={"partition": "j-7"})
    assert type(error) is ProviderRejectedError and error.code == "JOB_NOT_FOUND"
    assert error.message == "no job j-7: nope"
    # The same answer to another call (the status call) keeps the spec-wide meaning: lost.
    assert type(provider.error_for(missing, call=provider.spec.status)) is ExportLostError
    provider.close()


def test_file_names_detail_failure_code_and_ranges() -> None:
    data = spec_dict(
        fields={"files": "files", "failure_code": "Failed", "detail": {"scope": "Scope"},
                "file_name_format": "part-{i:04d}.jsonl"},
        kinds=[{"name": "things", "primary_key": ["id"],
                "columns": {"score": {"type": "DOUBLE", "range": [0, 1]}}}],
    )  # fmt: skip
    provider = provider_for(data)
    ready = provider._status(
        {"id": "e1", "status": "DONE", "Scope": {"ChainIds": ["c"]},
         "files": [{"url": "https://s3/a?sig=1"}, {"url": "/files/b"}]}
    )  # fmt: skip
    assert [f.name for f in ready.files] == ["part-0000.jsonl", "part-0001.jsonl"]
    assert ready.files[1].url == "http://127.0.0.1:9/files/b"  # relative: on the API host
    assert ready.detail == {"scope": {"ChainIds": ["c"]}}
    failed = provider._status({"id": "e2", "status": "ERROR"})
    assert failed.error_code == "Failed" and "ERROR" in (failed.error_message or "")
    assert provider.kinds[0].value_ranges == {"score": (0.0, 1.0)}
    provider.close()


def test_events_from_raw_bodies_with_states_by_type() -> None:
    data = spec_dict(
        fields={"id": "fileId", "files": "", "file_url": "url", "timestamp": "at"},
        events={"type_path": "event", "types": ["done", "broke"], "record": "",
                "partition": "jobId", "states": {"done": "ready", "broke": "failed"}},
    )  # fmt: skip
    cls = SpecProvider.for_spec(ExportApiSpec.model_validate(data))
    job, ready = cls.parse_event(b'{"event": "done", "jobId": "j1", "fileId": "f1"}')
    assert (job, ready.export_id, ready.state, ready.files) == ("j1", "f1", ExportState.READY, ())
    _, failed = cls.parse_event({"event": "broke", "jobId": "j1", "fileId": "f2"})
    assert failed.state is ExportState.FAILED
    for body, complaint in [
        (b"{nope", "not JSON"),
        ({"event": "done", "fileId": "f1"}, "jobId"),
        ({"event": "done", "jobId": "j1", "fileId": " "}, "fileId"),
        ({"event": "done", "jobId": "j1", "fileId": "f1", "at": "yesterday"}, "at"),
    ]:
        with pytest.raises(ValueError, match=complaint):
            cls.parse_event(body)
