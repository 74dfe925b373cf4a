"""Webhook-delivery platform: message-log exports, one kind per direction (outbound, inbound).

The provider is its spec, ``deliveries.yaml`` beside this file, run by ``http_engine``:
``POST /v1/exports {start_time, end_time, direction, filters?}`` -> ``{"data": {id, status}}``;
``GET /v1/exports/{id}``; ``GET /v1/exports/{id}/download`` answers 302 to a presigned S3 URL
of one CSV. The key goes to the API host only (``core/transfer.py`` follows the redirect by
hand); S3's 403 "Request has expired" is a ``LinkExpiredError`` (ask ``/download`` again).
The API has no "modified since": windows ``[start, end)`` on ``created_at``, MERGE on ``id``.
"""

from pathlib import Path

from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.spec import load_spec

SPEC = load_spec(Path(__file__).with_name("deliveries.yaml"))
DeliveriesProvider = SpecProvider.for_spec(SPEC, "DeliveriesProvider")
