"""A mapping.travel simulator: per-job results exports, success:false at HTTP 200, 60 s links.

Routes (one organization per :class:`State`; its token is ``State.token``):

- ``POST /api/v1/mapping/{job}/export`` -> always 200 ``{success, exportFileId?, message}``,
  except 401 (bad token) and 404 (unknown job), exactly as the public documents describe.
  Jobs with zero results, and ``State.fail_next_export_message``, give ``success: false``.
- ``GET {State.download_path}`` (default ``/api/v1/exports/{exportFileId}/download``) ->
  200 ``{downloadUrl, expiresInSeconds}``; 202 ``{"status": "processing"}`` before
  ``ready_after_seconds``; 422 ``{"status": "failed", "message"}`` for a failed generation;
  404 for unknown ids.
- ``GET /files/{exportFileId}?expires=&signature=`` -> the file, no credentials needed
  (presigned). An expired or tampered link gets 403 with an S3-style XML body.

Files are deliberately hard to recognise: Content-Type ``application/octet-stream``, gzip
served as raw bytes (no Content-Encoding) and a Content-Disposition file name that always
says ``.csv`` whatever the format, so a client has to detect the format from the content.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from export_pipeline.sandbox.signing import check_signature, sign_path

FileFormatName = Literal["csv", "json", "jsonl"]

COLUMNS: tuple[str, ...] = (
    "mappingJobId",
    "partnerInventoryId",
    "supplierHotelId",
    "referenceHotelId",
    "referenceName",
    "referenceCountryCode",
    "referenceCity",
    "confidence",
    "matchMethod",
)
MATCH_METHODS: tuple[str, ...] = ("exact", "fuzzy", "geo", "manual")

# Names with accents, non-Latin scripts, commas and quotes: the CSV writer has to quote them
# and every reader has to keep them byte-exact.
_HOTEL_NAMES: tuple[str, ...] = (
    "Hôtel de la Cité",
    'Hotel "La Perla", Spa & Resort',
    "Ryokan Ōkura 大倉旅館",
    "Zürich Grand Hotel",
    "Гостиница Москва",
    "Ξενοδοχείο Ακρόπολις",
    "Hotel Ñandú",
    "فندق النخيل",
    "Smörgås Inn",
    "São Paulo Plaza",
)
_CITIES: tuple[tuple[str, str], ...] = (
    ("FR", "Paris"),
    ("ES", "Málaga"),
    ("JP", "京都市"),
    ("CH", "Zürich"),
    ("RU", "Москва"),
    ("GR", "Αθήνα"),
    ("AR", "Córdoba"),
    ("AE", "Dubai"),
    ("SE", "Göteborg"),
    ("BR", "São Paulo"),
)

FILES_PREFIX = "/files"


def _json(status: int, body: Any, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


@dataclass
class SandboxExport:
    """One triggered export: a snapshot of the job's rows written in the org's format."""

    export_id: str
    job_id: str
    created_at: float  # epoch seconds
    path: Path | None
    rows: tuple[dict[str, Any], ...]
    file_format: FileFormatName
    gzip: bool
    failed_message: str | None = None


class State:
    """Switches and seeded data of one simulated mapping.travel organization (thread-safe)."""

    def __init__(
        self,
        *,
        token: str = "sandbox-mapping-token",
        seed: int = 6,
        file_format: FileFormatName = "csv",
        gzip: bool = False,
        ready_after_seconds: float = 0.0,
        link_ttl_seconds: float = 60.0,
        download_path: str = "/api/v1/exports/{exportFileId}/download",
        files_dir: Path | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self.token = token
        self.seed = seed
        self.file_format: FileFormatName = file_format
        self.gzip = gzip
        self.ready_after_seconds = ready_after_seconds
        self.link_ttl_seconds = link_ttl_seconds
        # Read once by create_app: the route is built from it.
        self.download_path = download_path
        self.fail_next_export_message: str | None = None
        # The next triggered export is generated as failed (download call -> status failed).
        self.fail_next_generation_message: str | None = None
        self.jobs: dict[str, list[dict[str, Any]]] = {}
        self.exports: dict[str, SandboxExport] = {}
        self.export_calls = 0
        self.download_link_calls = 0
        self.downloads = 0
        self._job_counter = 0
        self._export_counter = 0
        self._request_counter = 0
        self._own_dir = files_dir is None
        self.files_dir = Path(files_dir or tempfile.mkdtemp(prefix="mapping-sandbox-"))
        self.files_dir.mkdir(parents=True, exist_ok=True)

    # -- data ------------------------------------------------------------------------------

    def _uuid(self, purpose: str, n: int) -> str:
        rng = random.Random(f"{self.seed}:{purpose}:{n}")
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    def make_rows(self, job_id: str, n_results: int) -> list[dict[str, Any]]:
        """Deterministic result rows for ``job_id`` (same seed + job id -> same rows)."""
        rng = random.Random(f"{self.seed}:rows:{job_id}")
        inventory = f"inv-{rng.randrange(100, 999)}"
        rows = []
        for i in range(n_results):
            method = MATCH_METHODS[i % len(MATCH_METHODS)]
            country, city = _CITIES[rng.randrange(len(_CITIES))]
            # Edges of the range appear on purpose: manual matches are certain (1.0) and the
            # very first fuzzy one is 0.0 so range checks are exercised at both ends.
            if method == "manual":
                confidence = 1.0
            elif i == 1:
                confidence = 0.0
            else:
                confidence = round(rng.uniform(0.35, 0.999), 4)
            rows.append(
                {
                    "mappingJobId": job_id,
                    "partnerInventoryId": inventory,
                    "supplierHotelId": f"SUP-{i + 1:06d}",
                    "referenceHotelId": f"REF-{rng.randrange(10**7, 10**8)}",
                    "referenceName": _HOTEL_NAMES[rng.randrange(len(_HOTEL_NAMES))],
                    "referenceCountryCode": country,
                    "referenceCity": city,
                    "confidence": confidence,
                    "matchMethod": method,
                }
            )
        return rows

    def add_job(self, n_results: int, job_id: str | None = None) -> str:
        """Create a completed mapping job with ``n_results`` seeded rows; returns its id."""
        with self._lock:
            if job_id is None:
                self._job_counter += 1
                job_id = self._uuid("job", self._job_counter)
            self.jobs[job_id] = self.make_rows(job_id, n_results)
            return job_id

    def set_results(self, job_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace a job's results (creating the job); ``mappingJobId`` is filled in if absent."""
        with self._lock:
            self.jobs[job_id] = [{"mappingJobId": job_id, **dict(row)} for row in rows]

    def rows(self, job_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self.jobs[job_id]]

    def drop_export(self, export_id: str) -> None:
        """Forget an export (the provider purged it): its download call then answers 404."""
        with self._lock:
            export = self.exports.pop(export_id)
            if export.path is not None:
                export.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.files_dir, ignore_errors=True)

    # -- behaviour used by the routes -------------------------------------------------------

    def next_request_id(self) -> str:
        with self._lock:
            self._request_counter += 1
            return f"req-{self.seed}-{self._request_counter:06d}"

    def authorized(self, request: Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    def trigger(self, job_id: str) -> tuple[int, dict[str, Any]]:
        """The export call: (HTTP status, body)."""
        with self._lock:
            self.export_calls += 1
            if job_id not in self.jobs:
                return 404, {"message": f"Mapping job {job_id} not found"}
            if self.fail_next_export_message is not None:
                message, self.fail_next_export_message = self.fail_next_export_message, None
                return 200, {"success": False, "message": message}
            rows = tuple(dict(r) for r in self.jobs[job_id])
            if not rows:
                return 200, {"success": False, "message": "No results to export for this job"}
            self._export_counter += 1
            export_id = str(uuid.uuid4())  # unique across sandbox restarts, like the real API
            failed, self.fail_next_generation_message = self.fail_next_generation_message, None
            export = SandboxExport(
                export_id=export_id,
                job_id=job_id,
                created_at=time.time(),
                path=None,
                rows=rows,
                file_format=self.file_format,
                gzip=self.gzip,
                failed_message=failed,
            )
            if failed is None:
                export.path = self._write(export)
            self.exports[export_id] = export
            return 200, {
                "success": True,
                "exportFileId": export_id,
                "message": "Export triggered successfully",
            }

    def _write(self, export: SandboxExport) -> Path:
        """Write the file in the org's format, streaming row by row (never one big string)."""
        path = self.files_dir / f"{export.export_id}.bin"
        with path.open("wb") as raw:
            # mtime=0 and no file name inside the gzip header: byte-identical files per seed.
            sink: Any = (
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if export.gzip else raw
            )
            text = io.TextIOWrapper(sink, encoding="utf-8", newline="")
            if export.file_format == "csv":
                writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(export.rows)
            elif export.file_format == "json":
                text.write("[")
                for i, row in enumerate(export.rows):
                    text.write(("," if i else "") + "\n" + json.dumps(row, ensure_ascii=False))
                text.write("\n]\n")
            else:
                for row in export.rows:
                    text.write(json.dumps(row, ensure_ascii=False) + "\n")
            text.flush()
            text.detach()
            if export.gzip:
                sink.close()
        return path

    def link(self, export_id: str, base_url: str) -> tuple[int, dict[str, Any]]:
        """The download-link call: (HTTP status, body)."""
        with self._lock:
            self.download_link_calls += 1
            export = self.exports.get(export_id)
            if export is None:
                return 404, {"message": f"Export file {export_id} not found"}
            if export.failed_message is not None:
                return 422, {"status": "failed", "message": export.failed_message}
            if time.time() < export.created_at + self.ready_after_seconds:
                return 202, {"status": "processing", "message": "Export is being generated"}
            # Rounded up so a link is valid for at least the announced seconds.
            expires = math.ceil(time.time() + self.link_ttl_seconds)
            url = base_url.rstrip("/") + sign_path(f"{FILES_PREFIX}/{export_id}", expires)
            return 200, {"downloadUrl": url, "expiresInSeconds": int(self.link_ttl_seconds)}

    def file_for_download(self, export_id: str) -> Path | None:
        with self._lock:
            export = self.exports.get(export_id)
            if export is None or export.path is None or not export.path.exists():
                return None
            self.downloads += 1
            return export.path


_S3_DENIED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    "<Message>{message}</Message></Error>"
)


def create_app(state: State) -> Starlette:
    """The simulator as an ASGI app; routes read and change ``state`` under its lock."""

    def api_headers() -> dict[str, str]:
        return {"X-Request-Id": state.next_request_id()}

    def unauthorized() -> JSONResponse:
        return _json(401, {"message": "Unauthorized"}, api_headers())

    def export(request: Request) -> Response:
        if not state.authorized(request):
            return unauthorized()
        status, body = state.trigger(request.path_params["job"])
        return _json(status, body, api_headers())

    def download_link(request: Request) -> Response:
        if not state.authorized(request):
            return unauthorized()
        status, body = state.link(request.path_params["exportFileId"], str(request.base_url))
        headers = api_headers()
        if status == 202:
            headers["Retry-After"] = "1"
        return _json(status, body, headers)

    def download_file(request: Request) -> Response:
        export_id = request.path_params["exportFileId"]
        problem = check_signature(
            f"{FILES_PREFIX}/{export_id}",
            request.query_params.get("expires"),
            request.query_params.get("signature"),
        )
        if problem is not None:
            message = (
                "Request has expired" if problem == "expired" else f"Access denied ({problem})"
            )
            return Response(
                _S3_DENIED.format(message=message), status_code=403, media_type="application/xml"
            )
        path = state.file_for_download(export_id)
        if path is None:
            return Response(
                _S3_DENIED.replace("AccessDenied", "NoSuchKey").format(message="Not found"),
                status_code=404,
                media_type="application/xml",
            )
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename="mapping-export.csv",  # whatever the real format: do not trust it
        )

    return Starlette(
        routes=[
            Route("/api/v1/mapping/{job}/export", export, methods=["POST"]),
            Route(state.download_path, download_link, methods=["GET"]),
            Route(FILES_PREFIX + "/{exportFileId}", download_file, methods=["GET"]),
        ]
    )
