"""The production code location (deploy/Dockerfile, deploy/docker-compose.yaml).

The project's own Definitions, with the warehouse that outgrows one machine: a DuckLake lake
whose catalog is a PostgreSQL database and whose data files are on S3, and the raw/Parquet
tiers on S3 too, so every run container, on any host, reads and writes the same place. Every
setting is a ``dg.EnvVar``: read when a run or a sensor tick starts, never at import.

    EXPORT_PIPELINE_LAKE_CATALOG    postgres:host=… port=5432 dbname=ducklake user=… password=…
    EXPORT_PIPELINE_LAKE_DATA_PATH  s3://bucket/lake/
    EXPORT_PIPELINE_STORAGE         s3://bucket/files   (raw files and Parquet per export)
    AWS_*                           S3 credentials, region (AWS_ENDPOINT_URL_S3 for non-AWS S3)

Loaded with ``dagster code-server start --python-file deploy/definitions.py --attribute defs``.
"""

import dagster as dg

from export_pipeline.definitions import build_defs, default_resources
from export_pipeline.defs.resources import WarehouseResource, WebhookEventsResource

# Downloads and Parquet are staged here (relative to the working directory, /opt/dagster/app in
# the image) before they go to S3: the run container's own disk.
SCRATCH_DIR = "data"
# The webhook receiver's event store, on the volume the code server shares with it.
WEBHOOK_EVENTS = "data/webhooks/webhook_events.sqlite3"


def production_resources() -> dict[str, object]:
    resources = default_resources()
    resources["warehouse"] = WarehouseResource(
        backend="ducklake",
        lake_catalog=dg.EnvVar("EXPORT_PIPELINE_LAKE_CATALOG"),
        lake_data_path=dg.EnvVar("EXPORT_PIPELINE_LAKE_DATA_PATH"),
        storage=dg.EnvVar("EXPORT_PIPELINE_STORAGE"),
        data_dir=SCRATCH_DIR,
    )
    resources["webhook_events"] = WebhookEventsResource(path=WEBHOOK_EVENTS)
    return resources


defs = build_defs(production_resources())
