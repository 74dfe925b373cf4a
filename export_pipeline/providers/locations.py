"""EV-charging network operator: bulk export of OCPI-shaped charging locations.

The provider is its spec, ``locations.yaml`` beside this file, run by ``http_engine``:
``POST /locations/exports {format, modifiedSince}`` -> ``{requestId, status}``; ``GET
/locations/exports/{id}`` -> COMPLETED with a signed ``exportUrl`` that gets no credentials and
whose extension (.json = one array, .csv = nested values as JSON text) is the only format clue;
the cursor is ``exportTimestamp``. The operator also POSTs the same COMPLETED/FAILED body to
``{rsp_webhook_url}/locations/exports/events`` (``LocationsProvider.parse_event``).
"""

from pathlib import Path

from export_pipeline.core.model import ExportStatus
from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.spec import load_spec

SPEC = load_spec(Path(__file__).with_name("locations.yaml"))
LocationsProvider = SpecProvider.for_spec(SPEC, "LocationsProvider")
(LOCATIONS,) = LocationsProvider.kinds
LOCATION_COLUMNS = LOCATIONS.columns or {}
TOKEN_ENV_VAR = SPEC.auth.token_env


def parse_event(body: object) -> ExportStatus:
    """A webhook body (COMPLETED or FAILED) -> its status; ValueError for a body to refuse."""
    return LocationsProvider.parse_event(body)[1]  # type: ignore[arg-type]
