"""Typed Dagster resources: the settings a user changes. Secrets arrive as ``dg.EnvVar``."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from export_pipeline.core.errors import ConfigurationError
from export_pipeline.core.http import RetryPolicy
from export_pipeline.core.ingest import POISON_BUDGET, IngestSettings
from export_pipeline.core.ledger import Ledger
from export_pipeline.core.netpolicy import UrlPolicy, parse_allow
from export_pipeline.core.storage import Storage, storage_from_setting
from export_pipeline.core.transfer import DownloadLimits
from export_pipeline.core.warehouse import Warehouse as WarehouseBackend
from export_pipeline.core.warehouse import warehouse_from_settings
from export_pipeline.core.windows import IncrementalSettings
from export_pipeline.providers.base import ExportProvider

# Read when a run starts (never at import) if ``allowed_download_hosts`` is left empty; the
# sandbox's ``env()`` sets it to the sandbox's own loopback origins.
ALLOWED_HOSTS_ENV = "EXPORT_PIPELINE_ALLOWED_DOWNLOAD_HOSTS"


class LazyS3Resource(S3Resource):
    """dagster-aws's ``S3Resource``, but no boto3 client until S3 storage actually needs one.

    ``S3Resource`` hands every op that requires ``s3`` a ready boto3 client, so each step start
    ran botocore's credential chain, which probes the instance-metadata address
    (169.254.169.254) even when storage is local. This one hands over itself; ``get_client`` is
    only called by ``WarehouseResource.storage_backend`` when ``storage`` is ``s3://...``.
    Same configuration fields as ``S3Resource``.
    """

    def get_object_to_set_on_execution_context(self) -> object:
        return self


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse (tables and the ledger) and where files land. See docs/warehouse.md."""

    backend: str = Field(
        "duckdb",
        description="'duckdb' (the embedded file at `path`, default) or 'ducklake' (a lake: "
        "`lake_catalog` + `lake_data_path`; needs the `lake` extra).",
    )
    path: str = Field("data/warehouse.duckdb", description="DuckDB file (backend duckdb).")
    lake_catalog: str = Field(
        "data/lake/catalog.sqlite",
        description="DuckLake catalog: a SQLite path (one machine) or 'postgres:<libpq DSN>' "
        "(many machines; pass it as dg.EnvVar, it holds a password).",
    )
    lake_data_path: str = Field(
        "data/lake/files",
        description="Where the lake's Parquet data files go: a local folder or s3://bucket/prefix "
        "(AWS_* variables; AWS_ENDPOINT_URL for an S3-compatible server).",
    )
    read_replica: bool = Field(
        True,
        description="Backend duckdb: after each load, publish the read replica analysts query "
        "(`export-pipeline sql`) while loads run.",
    )
    read_dir: str = Field(
        "", description="Where the read replica goes (default: read/ beside `path`)."
    )
    data_dir: str = Field("data", description="Local root of data/raw and data/parquet.")
    storage: str = Field(
        "local",
        description="'local' (files under data_dir) or 's3://bucket/prefix' (s3 resource).",
    )
    lock_timeout_seconds: float = Field(
        600.0, description="How long to wait for another process's write lock on the DuckDB file."
    )

    def warehouse(self, *, lock_timeout: float | None = None) -> WarehouseBackend:
        return warehouse_from_settings(
            backend=self.backend,
            path=Path(self.path),
            lake_catalog=self.lake_catalog,
            lake_data_path=self.lake_data_path,
            lock_timeout=self.lock_timeout_seconds if lock_timeout is None else lock_timeout,
            read_dir=self.read_dir or None,
            publish_reads=self.read_replica,
        )

    def ledger(self, *, lock_timeout: float | None = None) -> Ledger:
        return Ledger(self.warehouse(lock_timeout=lock_timeout))

    def storage_backend(self, s3: object | None = None) -> Storage:
        """Local or S3 storage. ``s3`` is what the ``s3`` resource key holds where we are called.

        dagster-aws's ``S3Resource`` attaches a different object to op/asset contexts: code that
        declares ``required_resource_keys={"s3"}`` gets the boto3 *client* (from
        ``get_object_to_set_on_execution_context``), while ``build_resources`` or a direct call
        may hand over the ``S3Resource`` itself. Both are accepted; anything else (no ``s3``
        resource) leaves the factory empty, which ``storage_from_setting`` reports clearly when
        the setting asks for S3.
        """
        factory: Callable[[], object] | None = None
        if callable(getattr(s3, "get_client", None)):
            factory = s3.get_client  # type: ignore[union-attr]
        elif s3 is not None and callable(getattr(s3, "upload_file", None)):
            client = s3
            factory = lambda: client  # noqa: E731 - the client the resource already built
        return storage_from_setting(
            self.storage, data_dir=Path(self.data_dir), s3_client_factory=factory
        )


class SyncSettingsResource(dg.ConfigurableResource):
    """How exports are waited for, downloaded and windowed. Shared by assets and schedules."""

    overlap_seconds: int = Field(300, description="Re-read this much before the cursor.")
    settle_seconds: int = Field(120, description="WINDOW exports end this long before now.")
    initial_lookback_hours: int = Field(
        168, description="First WINDOW export starts this far back."
    )
    poll_initial_seconds: float = 1.0
    poll_max_seconds: float = 30.0
    wait_timeout_seconds: float = Field(900.0, description="How long a run waits for an export.")
    download_concurrency: int = Field(
        2,
        description="Parts of a multi-part export downloaded at once. Fewer than the parts, the "
        "first ones land early and are parsed while the rest download; as many as the parts, all "
        "land together at the end.",
    )
    http_max_attempts: int = 5
    http_base_delay_seconds: float = 0.5
    duckdb_memory_limit: str = Field(
        "400MB", description="DuckDB memory cap per run; beyond it DuckDB spills to disk."
    )
    verify_row_count: bool = True
    stage_while_parsing: bool = Field(
        True,
        description="DuckDB file on local storage: load each finished Parquet file while the "
        "next is parsed, in the load's transaction (the write lock is then held from the first "
        "finished file). Off: the load starts when normalise ends.",
    )
    parse_while_downloading: bool = Field(
        True,
        description="A multi-part export: parse each part as soon as it has landed, while the "
        "later parts download. Off: the parse starts when the last part has landed.",
    )
    step_retry_seconds: float = Field(
        30.0,
        description="After a retryable error (an export of the kind already in flight at the "
        "provider, the provider unavailable) Dagster retries the step after this long.",
    )
    step_max_retries: int = Field(
        3, description="How often a step is retried after a retryable error before it fails."
    )
    allowed_download_hosts: str = Field(
        "",
        description="Non-public hosts that provider-supplied download URLs may reach, "
        "comma-separated: 'loopback', 'private', 'link-local', a CIDR, an address or a host "
        "name, each optionally ':port'. Empty: public addresses only (plus each provider's "
        f"configured API origin), or the {ALLOWED_HOSTS_ENV} environment variable when set. "
        "See docs/security.md.",
    )
    max_download_bytes: int = Field(
        20 * 1024**3, description="Largest file accepted (announced or sent), in bytes."
    )
    max_decompressed_bytes: int = Field(
        50 * 1024**3, description="Largest size a gzip file may inflate to, in bytes."
    )
    max_expansion_ratio: float = Field(
        200.0, description="Largest inflated/compressed ratio of a gzip file (bomb guard)."
    )
    poison_budget: int = Field(
        POISON_BUDGET,
        description="Permanent failures (parse, integrity, a link dead after fresh ones) an "
        "export may cause before it is given up and the next run requests a new one.",
    )
    lease_seconds: float = Field(
        1200.0,
        description="How long a run's claim on an export lasts between renewals; a dead run's "
        "claim lapses after this (at once when its process is seen gone on this host).",
    )
    claim_wait_seconds: float = Field(
        300.0,
        description="How long a run waits for an export another run is ingesting before it "
        "stops with a message naming that run.",
    )

    def incremental(self) -> IncrementalSettings:
        return IncrementalSettings(
            overlap=timedelta(seconds=self.overlap_seconds),
            settle=timedelta(seconds=self.settle_seconds),
            initial_lookback=timedelta(hours=self.initial_lookback_hours),
        )

    def retry(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.http_max_attempts, base_delay=self.http_base_delay_seconds
        )

    def ingest(self) -> IngestSettings:
        return IngestSettings(
            poll_initial_seconds=self.poll_initial_seconds,
            poll_max_seconds=self.poll_max_seconds,
            wait_timeout_seconds=self.wait_timeout_seconds,
            download_concurrency=self.download_concurrency,
            verify_row_count=self.verify_row_count,
            duckdb_memory_limit=self.duckdb_memory_limit,
            stage_while_parsing=self.stage_while_parsing,
            parse_while_downloading=self.parse_while_downloading,
            retry=self.retry(),
            url_policy=self.url_policy(),
            download_limits=DownloadLimits(
                max_file_bytes=self.max_download_bytes,
                max_decompressed_bytes=self.max_decompressed_bytes,
                max_expansion_ratio=self.max_expansion_ratio,
            ),
            poison_budget=self.poison_budget,
            lease_seconds=self.lease_seconds,
            claim_wait_seconds=self.claim_wait_seconds,
        )

    def url_policy(self) -> UrlPolicy:
        setting = self.allowed_download_hosts or os.environ.get(ALLOWED_HOSTS_ENV, "")
        try:
            return UrlPolicy(allow=parse_allow(setting))
        except ValueError as exc:
            raise ConfigurationError(
                f"allowed_download_hosts: {exc}",
                hint="comma-separated loopback / private / link-local / CIDR / host[:port]",
            ) from None


class ProviderResource(dg.ConfigurableResource):
    """Base of the per-API resources: ``build()`` returns a ready provider client."""

    timeout_seconds: float = 30.0

    def build(self, retry: RetryPolicy | None = None) -> ExportProvider:
        raise NotImplementedError


class WebhookEventsResource(dg.ConfigurableResource):
    """The receiver's event store, read by the sensors (the receiver never touches DuckDB)."""

    path: str = Field("data/webhook_events.sqlite3", description="SQLite file of pushed events.")
