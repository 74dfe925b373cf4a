"""Simulator of Stripe's Reporting API (report runs) over real HTTP on loopback.

Two servers, like production: the API (``api.stripe.com``) and the file host
(``files.stripe.com``), which wants the *same* secret key (``Authorization: Bearer sk_…`` or
Basic with the key as user name); a report file is not a presigned link.

* ``GET /v1/reporting/report_types/{id}`` -> ``reporting.report_type`` with
  ``data_available_start`` / ``data_available_end`` (Unix seconds).
* ``POST /v1/reporting/report_runs`` (form: ``report_type``, ``parameters[interval_start]``,
  ``parameters[interval_end]``) -> ``reporting.report_run``, status ``pending``; 400
  ``invalid_request_error`` when the interval leaves the report type's available data.
* ``GET /v1/reporting/report_runs/{id}`` -> ``pending`` until ``ready_after_seconds``, then
  ``succeeded`` with ``result`` (a File: id, size, url on the file host, expires_at) or
  ``failed`` with ``error``.
* ``GET /v1/files/{file_id}/contents`` on the file host -> the CSV.

Errors are Stripe's envelope ``{"error": {"type", "code", "message"}}`` with a ``Request-Id``
header. Fault switches: ``fail_next_runs`` (runs end ``failed``), ``rate_limit_next`` (429s
with ``Retry-After: 0``), ``revoke_key()`` (every call 401). Data: balance transactions derived
from their index (one every ``spacing_seconds`` from ``BASE_START``), so any window is cheap.
"""

from __future__ import annotations

import csv
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from export_pipeline.sandbox.server import RunningServer

DEFAULT_TOKEN = "sk_test_sandbox"
REPORT_TYPE = "balance_change_from_activity.itemized.1"
BASE_START = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp())
CSV_COLUMNS = (
    "balance_transaction_id",
    "created_utc",
    "available_on_utc",
    "currency",
    "gross",
    "fee",
    "net",
    "reporting_category",
    "description",
)
CATEGORIES = ("charge", "refund", "payout", "charge")


def _utc(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class _Run:
    id: str
    report_type: str
    interval_start: int
    interval_end: int
    created: float
    fail: bool = False
    file_id: str | None = None
    path: Path | None = None


class State:
    """The account behind the simulator; tests change its switches between calls."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        transactions: int = 500,
        spacing_seconds: int = 600,
        available_transactions: int | None = None,
        ready_after_seconds: float = 0.0,
    ) -> None:
        self.token = token
        self.transactions = transactions
        self.spacing_seconds = spacing_seconds
        # Stripe prepares data with a delay: only this many transactions are "available".
        self.available = transactions if available_transactions is None else available_transactions
        self.ready_after_seconds = ready_after_seconds
        self.files_base_url = ""  # set when the file host starts
        self.fail_next_runs = 0
        self.rate_limit_next = 0
        self.key_revoked = False
        self.runs: dict[str, _Run] = {}
        self.calls: list[tuple[str, str, str | None]] = []  # method, path, Authorization
        self._lock = threading.Lock()
        self._dir = tempfile.TemporaryDirectory(prefix="stripe-sandbox-")

    # -- data ------------------------------------------------------------------------------

    def created_at(self, i: int) -> int:
        return BASE_START + i * self.spacing_seconds

    @property
    def data_available_end(self) -> int:
        return self.created_at(self.available)

    def make_available(self, transactions: int) -> None:
        """Stripe's twice-daily data preparation: more transactions become reportable."""
        self.available = min(self.transactions, self.available + transactions)

    def rows_between(self, start: int, end: int) -> list[list[str]]:
        rows = []
        for i in range(self.available):
            created = self.created_at(i)
            if start <= created < end:
                category = CATEGORIES[i % len(CATEGORIES)]
                gross = (i % 97 + 1) * (-1 if category in ("refund", "payout") else 1) * 100 + 99
                fee = 30 + abs(gross) // 40 if category == "charge" else 0
                rows.append(
                    [
                        f"txn_{i:08d}",
                        _utc(created),
                        _utc(created + 2 * 86400),
                        "usd",
                        f"{gross / 100:.2f}",
                        f"{fee / 100:.2f}",
                        f"{(gross - fee) / 100:.2f}",
                        category,
                        f"Transaction {i}, with a comma",
                    ]
                )
        return rows

    # -- runs ------------------------------------------------------------------------------

    def report_type(self) -> dict[str, Any]:
        return {
            "id": REPORT_TYPE,
            "object": "reporting.report_type",
            "data_available_start": BASE_START,
            "data_available_end": self.data_available_end,
            "default_columns": list(CSV_COLUMNS),
            "livemode": False,
            "name": "Balance change from activity (itemized)",
            "updated": self.data_available_end,
            "version": 1,
        }

    def create_run(self, report_type: str, start: int, end: int) -> _Run:
        with self._lock:
            fail = self.fail_next_runs > 0
            self.fail_next_runs -= fail
            run = _Run(f"frr_{uuid.uuid4().hex[:16]}", report_type, start, end, time.time(), fail)
            self.runs[run.id] = run
        return run

    def run_body(self, run_id: str, *, just_created: bool = False) -> dict[str, Any]:
        run = self.runs[run_id]
        # A new run is always pending (Stripe starts processing after answering).
        done = not just_created and time.time() - run.created >= self.ready_after_seconds
        status = "pending" if not done else "failed" if run.fail else "succeeded"
        if status == "succeeded" and run.path is None:
            self._write(run)
        result = None
        if status == "succeeded":
            assert run.path is not None
            result = {
                "id": run.file_id,
                "object": "file",
                "created": int(run.created),
                "expires_at": int(run.created) + 7 * 86400,
                "filename": f"{run.file_id}.csv",
                "purpose": "finance_report_run",
                "size": run.path.stat().st_size,
                "type": "csv",
                "url": f"{self.files_base_url}/v1/files/{run.file_id}/contents",
            }
        return {
            "id": run.id,
            "object": "reporting.report_run",
            "created": int(run.created),
            "error": "The report could not be generated (simulated)." if run.fail else None,
            "livemode": False,
            "parameters": {"interval_start": run.interval_start, "interval_end": run.interval_end},
            "report_type": run.report_type,
            "result": result,
            "status": status,
            "succeeded_at": int(time.time()) if status == "succeeded" else None,
        }

    def event_body(self, run_id: str) -> dict[str, Any]:
        """The ``reporting.report_run.succeeded`` (or ``.failed``) webhook event for a run."""
        body = self.run_body(run_id)
        return {
            "id": f"evt_{uuid.uuid4().hex[:16]}",
            "object": "event",
            "type": f"reporting.report_run.{body['status']}",
            "data": {"object": body},
        }

    def _write(self, run: _Run) -> None:
        run.file_id = f"file_{uuid.uuid4().hex[:16]}"
        run.path = Path(self._dir.name) / f"{run.file_id}.csv"
        with run.path.open("w", newline="", encoding="utf-8") as out:
            writer = csv.writer(out)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(self.rows_between(run.interval_start, run.interval_end))

    def file_path(self, file_id: str) -> Path | None:
        for run in self.runs.values():
            if run.file_id == file_id:
                return run.path
        return None

    # -- faults ----------------------------------------------------------------------------

    def revoke_key(self) -> None:
        self.key_revoked = True

    def authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            import base64

            header = "Bearer " + base64.b64decode(header[6:]).decode().split(":", 1)[0]
        return not self.key_revoked and header == f"Bearer {self.token}"

    def take_rate_limit(self) -> bool:
        with self._lock:
            if self.rate_limit_next > 0:
                self.rate_limit_next -= 1
                return True
        return False

    def close(self) -> None:
        self._dir.cleanup()


def _error(status: int, type_: str, message: str, code: str | None = None) -> JSONResponse:
    error = {"type": type_, "message": message, **({"code": code} if code else {})}
    return JSONResponse(
        {"error": error}, status_code=status, headers={"Request-Id": f"req_{uuid.uuid4().hex[:14]}"}
    )


def _gate(state: State, request: Request) -> Response | None:
    state.calls.append((request.method, request.url.path, request.headers.get("authorization")))
    if not state.authorized(request):
        return _error(401, "invalid_request_error", "Invalid API Key provided.")
    if state.take_rate_limit():
        response = _error(429, "invalid_request_error", "Too many requests.", "rate_limit")
        response.headers["Retry-After"] = "0"
        return response
    return None


def _json(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, headers={"Request-Id": f"req_{uuid.uuid4().hex[:14]}"})


def create_api_app(state: State) -> Starlette:
    async def report_type(request: Request) -> Response:
        if (denied := _gate(state, request)) is not None:
            return denied
        if request.path_params["type_id"] != REPORT_TYPE:
            return _error(404, "invalid_request_error", "No such report type", "resource_missing")
        return _json(state.report_type())

    async def create_run(request: Request) -> Response:
        if (denied := _gate(state, request)) is not None:
            return denied
        # Form-encoded like Stripe's API (parsed by hand: no python-multipart needed).
        form = {k: v[-1] for k, v in parse_qs((await request.body()).decode()).items()}
        report_type = form.get("report_type")
        if report_type != REPORT_TYPE:
            return _error(400, "invalid_request_error", f"Invalid report_type {report_type!r}")
        try:
            start = int(str(form.get("parameters[interval_start]", BASE_START)))
            end = int(str(form.get("parameters[interval_end]", state.data_available_end)))
        except ValueError:
            return _error(
                400, "invalid_request_error", "Invalid integer", "parameter_invalid_integer"
            )
        if not BASE_START <= start < end <= state.data_available_end:
            return _error(
                400,
                "invalid_request_error",
                f"interval must lie within data_available_start ({BASE_START}) and "
                f"data_available_end ({state.data_available_end})",
            )
        run = state.create_run(str(report_type), start, end)
        return _json(state.run_body(run.id, just_created=True))

    async def get_run(request: Request) -> Response:
        if (denied := _gate(state, request)) is not None:
            return denied
        run_id = request.path_params["run_id"]
        if run_id not in state.runs:
            return _error(404, "invalid_request_error", f"No such report run: '{run_id}'",
                          "resource_missing")  # fmt: skip
        return _json(state.run_body(run_id))

    return Starlette(
        routes=[
            Route("/v1/reporting/report_types/{type_id}", report_type, methods=["GET"]),
            Route("/v1/reporting/report_runs", create_run, methods=["POST"]),
            Route("/v1/reporting/report_runs/{run_id}", get_run, methods=["GET"]),
        ]
    )


def create_files_app(state: State) -> Starlette:
    async def contents(request: Request) -> Response:
        if (denied := _gate(state, request)) is not None:
            return denied
        path = state.file_path(request.path_params["file_id"])
        if path is None:
            return _error(404, "invalid_request_error", "No such file", "resource_missing")
        return FileResponse(path, media_type="text/csv")

    return Starlette(routes=[Route("/v1/files/{file_id}/contents", contents, methods=["GET"])])


# What the sandbox bundle starts for every provider (its API); the file host is
# ``create_files_app``, which the bundle starts too (the spec's sandbox.files_port).
create_app = create_api_app


class StripeSandbox:
    """Both servers on free loopback ports; ``api_url`` / ``files_url`` once started."""

    def __init__(self, state: State | None = None) -> None:
        self.state = state or State()
        self._api = RunningServer(create_api_app(self.state))
        self._files = RunningServer(create_files_app(self.state))

    @property
    def api_url(self) -> str:
        return self._api.base_url

    @property
    def files_url(self) -> str:
        return self._files.base_url

    def start(self) -> StripeSandbox:
        self._files.start()
        self.state.files_base_url = self._files.base_url
        self._api.start()
        return self

    def stop(self) -> None:
        self._api.stop()
        self._files.stop()
        self.state.close()

    def __enter__(self) -> StripeSandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
