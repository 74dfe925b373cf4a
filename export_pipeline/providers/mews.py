"""Mews Connector API: full JSON Lines exports of nine entity types (``mews``).

The provider is its spec, ``mews.yaml`` beside this file, run by ``providers/http_engine.py``:

- ``POST /api/connector/v1/exports/add`` ``{ClientToken, AccessToken, Client, EntityType}`` ->
  ``{"Export": {Id, Status, EntityType, Files: [{Url, SizeInBytes}], ExpiresUtc}}``;
- ``POST /api/connector/v1/exports/getAll`` ``{..., ExportIds}`` (at most 1000 ids) ->
  ``{"Exports": [...]}`` (with ``Scope``); ids missing from the answer are LOST.

Quirks the spec states: credentials in every body (``auth.style: body``); one Pending/Processing
export per entity type (HTTP 400 -> ``ExportInFlightError``, the run adopts it); a 401 names both
token variables; several presigned parts per export that die at ``ExpiresUtc`` (403/410 at
download -> expired; another 403 -> ask ``getAll`` for fresh links); a Failed export carries no
reason. Every export is a full snapshot. An unknown status word follows the engine's one policy
(still processing, reported), which is what this beta API needs.
"""

from __future__ import annotations

import re
from pathlib import Path

from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.spec import load_spec

SPEC = load_spec(Path(__file__).with_name("mews.yaml"))
MewsProvider = SpecProvider.for_spec(SPEC, "MewsProvider")
# The Mews entity types in asset order: {kind.entity_type} of each kind.
ENTITY_TYPES: tuple[str, ...] = tuple(k.params["entity_type"] for k in MewsProvider.kinds)


def snake_case(name: str) -> str:
    """``AvailabilityAdjustment`` -> ``availability_adjustment`` (table and asset names)."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
