"""What each column means, per export kind and analyst view: the providers' declarations in
words. Assets show them as their column schema before the first run, the load writes them as
DuckDB ``COMMENT``s, and ``docs/tables.md`` is generated from them (``python -m
export_pipeline.providers.column_docs > docs/tables.md``; a test keeps it current).

Every column a kind declares (``ExportKind.columns``) must be described here, or in its spec
for providers run from a spec (``columns: {name: {type, description}}``); a test checks.
Declared columns are type hints: the columns a kind does not declare (nested Mews objects, say)
arrive as the provider sends them, typed from the data.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from typing import Any

from export_pipeline.core.model import ExportKind

LINEAGE: Mapping[str, tuple[str, str]] = {
    "_export_id": ("VARCHAR", "Provider's id of the export this row was last loaded from."),
    "_source_file": ("VARCHAR", "File of that export the row came from."),
    "_loaded_at": ("TIMESTAMPTZ", "When the row was loaded into the warehouse (UTC)."),
}

_LOCATIONS = {
    "id": "Location id, unique within the operator (OCPI Location.id).",
    "country_code": "ISO 3166-1 alpha-2 country of the operator (CPO).",
    "party_id": "OCPI party id of the operator (CPO), 3 characters.",
    "publish": "Whether the location may be shown to the public.",
    "name": "Display name of the location.",
    "address": "Street and number.",
    "city": "City or town.",
    "postal_code": "Postal code.",
    "country": "ISO 3166-1 alpha-3 country of the location.",
    "coordinates": "Latitude and longitude (decimal degrees, as text).",
    "operator": "Operator name and website.",
    "time_zone": "IANA time zone of the location.",
    "evses": "Charging stations (EVSEs) with their status and nested connectors.",
    "last_updated": "When the operator last changed the location (drives modifiedSince).",
}

_EVSES = {
    "country_code": "Country of the operator (from the location).",
    "party_id": "Party id of the operator (from the location).",
    "location_id": "Location the EVSE belongs to (locations.locations.id).",
    "evse_uid": "EVSE uid, unique within the operator.",
    "evse_id": "eMI3 EVSE id printed on the charger.",
    "status": "Current status (AVAILABLE, CHARGING, OUTOFORDER …).",
    "connector_count": "Number of connectors of the EVSE.",
    "last_updated": "When the EVSE last changed.",
}

_CONNECTORS = {
    "country_code": "Country of the operator (from the location).",
    "party_id": "Party id of the operator (from the location).",
    "location_id": "Location the connector belongs to.",
    "evse_uid": "EVSE the connector belongs to.",
    "connector_id": "Connector id within its EVSE.",
    "standard": "Plug standard (IEC_62196_T2, CHADEMO …).",
    "format": "SOCKET or CABLE.",
    "power_type": "AC_1_PHASE, AC_3_PHASE or DC.",
    "max_voltage": "Maximum voltage (V).",
    "max_amperage": "Maximum current (A).",
    "max_electric_power": "Maximum power (W).",
    "last_updated": "When the connector last changed.",
}

_MESSAGES_COMMON = {
    "id": "Message id (unique per direction).",
    "created_at": "When the message was created (drives the export window).",
    "event_type": "Event type carried by the message.",
    "status": "delivered, failed, or pending (retries scheduled).",
    "attempt_count": "Delivery attempts so far.",
    "last_attempt_at": "When the last attempt was made.",
    "next_attempt_at": "When the next attempt is due (only while pending).",
    "response_status_code": "HTTP status of the last answer (empty when none came).",
    "response_time_ms": "Duration of the last attempt in milliseconds.",
    "payload_size_bytes": "Size of the message body in bytes.",
    "idempotency_key": "Idempotency key sent with the message.",
}

DOCS: Mapping[str, Mapping[str, str]] = {
    "locations/locations": _LOCATIONS,
    "locations/evses": _EVSES,
    "locations/connectors": _CONNECTORS,
    "deliveries/outbound_messages": {
        **_MESSAGES_COMMON,
        "endpoint_id": "Subscriber endpoint the message was sent to.",
        "endpoint_url": "URL of that endpoint.",
    },
    "deliveries/inbound_messages": {
        **_MESSAGES_COMMON,
        "inbound_endpoint_id": "Our endpoint that received the message.",
        "source": "Sender of the message.",
        "signature_verified": "Whether the sender's signature was valid.",
    },
}


@functools.cache
def _spec_docs() -> dict[str, dict[str, str]]:
    """Descriptions declared in the specs of spec-run providers (``columns: {c: {...}}``)."""
    from export_pipeline.providers.registry import PROVIDERS

    out: dict[str, dict[str, str]] = {}
    for cls in PROVIDERS:
        spec = getattr(cls, "spec", None)
        for k in getattr(spec, "kinds", ()):
            out[f"{spec.name}/{k.name}"] = {c: col.description for c, col in k.columns.items()}
    return out


def column_docs(kind: ExportKind) -> list[tuple[str, str, str]]:
    """``(name, type, description)`` of the kind's table, lineage columns last."""
    docs = DOCS.get(kind.key) or _spec_docs().get(kind.key) or {}
    names = list(kind.columns or docs)
    cols = [
        (n, (kind.columns or {}).get(n, "detected from the data"), docs.get(n, "")) for n in names
    ]
    return cols + [(n, t, d) for n, (t, d) in LINEAGE.items()]


def view_docs(kind: ExportKind, view: str) -> list[tuple[str, str, str]]:
    """``(name, type, description)`` of one of the kind's analyst views (types follow the
    table's)."""
    docs = DOCS.get(f"{kind.provider}/{view}", {})
    return [(n, "", d) for n, d in docs.items()]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def apply_comments(con: Any, kind: ExportKind) -> int:
    """Write the descriptions as DuckDB ``COMMENT``s on the kind's table, its views and their
    columns (those that exist). Returns how many were written."""
    # Only what differs is written: on DuckLake every COMMENT is catalog change (a snapshot).
    database = con.execute("SELECT current_database()").fetchone()[0]
    existing = {
        (t, c): comment
        for t, c, comment in con.execute(
            "SELECT table_name, column_name, comment FROM duckdb_columns() "
            "WHERE schema_name = ? AND database_name = ?",
            [kind.schema, database],
        ).fetchall()
    }
    described = dict(
        con.execute(
            "SELECT table_name, comment FROM duckdb_tables() WHERE schema_name = ? "
            "AND database_name = ? UNION ALL SELECT view_name, comment FROM duckdb_views() "
            "WHERE schema_name = ? AND database_name = ?",
            [kind.schema, database, kind.schema, database],
        ).fetchall()
    )
    # DuckLake (1.4) keeps no comments on a view's columns ("it is not a table").
    lake = (
        con.execute(
            "SELECT type FROM duckdb_databases() WHERE database_name = ?", [database]
        ).fetchone()[0]
        == "ducklake"
    )
    done = 0
    targets = [(kind.name, "TABLE", kind.description, column_docs(kind))]
    targets += [
        (view, "VIEW", f"View over {kind.table}.", view_docs(kind, view)) for view in kind.views
    ]
    for name, what, description, columns in targets:
        if not any(t == name for t, _ in existing):
            continue
        qualified = f'"{kind.schema}"."{name}"'
        if (described.get(name) or "") != (description or ""):
            con.execute(f"COMMENT ON {what} {qualified} IS {_literal(description)}")
            done += 1
        if what == "VIEW" and lake:
            continue
        for column, _, text in columns:
            if text and (name, column) in existing and existing[(name, column)] != text:
                con.execute(f'COMMENT ON COLUMN {qualified}."{column}" IS {_literal(text)}')
                done += 1
    return done


def tables_markdown() -> str:
    """``docs/tables.md``: every table and view with its columns, from the declarations."""
    from export_pipeline.providers.registry import PROVIDERS

    out = [
        "# Tables",
        "",
        "Generated from `export_pipeline/providers/column_docs.py` and the providers' kinds by",
        "`python -m export_pipeline.providers.column_docs > docs/tables.md` (a test keeps it",
        "current). The same descriptions are the assets' column schema in the Dagster UI and",
        "the tables' DuckDB `COMMENT`s (`SELECT * FROM duckdb_columns()`).",
    ]
    for provider in PROVIDERS:
        for kind in provider.kinds:
            out += ["", f"## `{kind.table}`", "", kind.description, ""]
            out += [
                f"Asset `{kind.key}`; primary key ({', '.join(kind.primary_key)}); "
                f"load mode `{kind.load_mode.value}`.",
                "",
                "| column | type | description |",
                "|---|---|---|",
            ]
            out += [f"| `{n}` | {t} | {d} |" for n, t, d in column_docs(kind)]
            for view in kind.views:
                out += ["", f"### view `{kind.schema}.{view}` (from `{kind.table}`)", ""]
                out += ["| column | description |", "|---|---|"]
                out += [f"| `{n}` | {d} |" for n, _, d in view_docs(kind, view)]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(tables_markdown())
