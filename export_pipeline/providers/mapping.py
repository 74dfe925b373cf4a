"""mapping.travel: hotel-mapping results, exported one mapping job at a time (``mapping``).

The provider is its spec, ``mapping.yaml`` beside this file, run by ``providers/http_engine.py``:
``POST /api/v1/mapping/{mappingJobId}/export`` answers HTTP 200 ``{success, exportFileId,
message}`` (``success: false`` is an error with the provider's message, never an empty export);
``GET /api/v1/exports/{exportFileId}/download`` (our guess, configurable) answers 202 while the
file is generated and 200 ``{downloadUrl, expiresInSeconds}`` (a presigned link living ~60 s);
one export kind, ``mapping/results``, loaded with REPLACE_PARTITION on ``mappingJobId``.

The hooks here are what the API truly needs beyond data: the job id of a request (its partition
key or ``params["mapping_job_id"]``, which must agree) and the configurable download call.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from export_pipeline.core.errors import ConfigurationError
from export_pipeline.core.model import ExportKind, ExportRequest, ExportStatus
from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.spec import load_spec

SPEC = load_spec(Path(__file__).with_name("mapping.yaml"))
DEFAULT_DOWNLOAD_PATH = "/api/v1/exports/{exportFileId}/download"


class MappingProvider(SpecProvider.for_spec(SPEC)):  # type: ignore[misc]
    """mapping.travel results exports: one trigger call per mapping job, one file per export."""

    @classmethod
    def from_settings(  # type: ignore[override]
        cls, *, download_path: str = DEFAULT_DOWNLOAD_PATH, **settings: Any
    ) -> MappingProvider:
        """The engine's settings plus ``download_path``, the link call (a documented guess)."""
        if "{exportFileId}" not in download_path:
            raise ConfigurationError(
                f"mapping download_path {download_path!r} has no {{exportFileId}} placeholder",
                provider=cls.name,
                hint="use e.g. /api/v1/exports/{exportFileId}/download",
            )
        provider = super().from_settings(**settings)
        status = cls.spec.status
        path = download_path.replace("{exportFileId}", "{export_id}")
        # The status call's rules (a non-JSON 404: no such call) name the path in use.
        errors = [
            r.model_copy(update={"hint": f"{r.hint} (now {download_path})"}) for r in status.errors
        ]
        update = {"path": path, "errors": errors}
        provider.spec = cls.spec.model_copy(update={"status": status.model_copy(update=update)})
        return provider  # type: ignore[return-value]

    def request_export(self, kind: ExportKind, request: ExportRequest) -> ExportStatus:
        if kind not in self.kinds:
            raise ValueError(f"{self.name} cannot export kind {kind.key!r}")
        return super().request_export(kind, replace(request, partition=job_id_of(request)))


def job_id_of(request: ExportRequest) -> str:
    """The mapping job of a request: its partition key, or params["mapping_job_id"].

    Dagster runs pass the dynamic partition key; ad-hoc calls (CLI, config) are more natural
    with a param. Given both, they must agree.
    """
    partition, param = request.partition, request.params.get("mapping_job_id")
    if partition and param and str(param) != partition:
        raise ConfigurationError(
            f"mapping export request names two jobs: partition {partition!r} "
            f"and params['mapping_job_id'] {param!r}",
            provider=SPEC.name,
            kind=RESULTS.name,
            hint="give the mapping job id once",
        )
    job_id = (partition or (str(param) if param else "")).strip()
    if not job_id:
        raise ConfigurationError(
            "mapping export request has no mapping job id",
            provider=SPEC.name,
            kind=RESULTS.name,
            hint="materialize a mappingJobId partition or pass params['mapping_job_id']",
        )
    return job_id


(RESULTS,) = MappingProvider.kinds
EVENT_COMPLETED, EVENT_FAILED = SPEC.events.types  # type: ignore[union-attr]
