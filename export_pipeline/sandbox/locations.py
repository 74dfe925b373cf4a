"""Simulator of the EV-charging operator's locations bulk export API, served over real HTTP.

Behaves like the documented API (seed 001): ``POST /locations/exports`` -> 202 PENDING,
``GET /locations/exports/{id}`` PENDING -> PROCESSING -> COMPLETED with a signed ``exportUrl``
that needs no credentials, ``GET /downloads/{id}.{json|csv}`` serving the file (Range-capable).

Data are OCPI-shaped locations derived on the fly from ``(seed, index)``, so a 200,000-location
operator costs no memory; only mutated and added locations live in a small override dict.
The clock is real time, so ``modifiedSince`` and ``exportTimestamp`` behave like production:
the export is a snapshot taken when it completes and includes every location whose
``last_updated`` is after ``modifiedSince``.

Simulator-only choices (documented here, not in the API): PENDING for the first half of
``ready_after_seconds`` (or ``processing_after_seconds``), then PROCESSING; the export is
written the first time its status is asked for after that; every COMPLETED status answer
carries a freshly signed link valid for ``link_ttl_seconds`` (capped by the export's own expiry).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import random
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from export_pipeline.sandbox.signing import check_signature, sign_path

DEFAULT_TOKEN = "sandbox-locations-token"
ERROR_CODES = ("INVALID_FORMAT", "INVALID_DATE_RANGE", "EXPORT_SIZE_EXCEEDED")
FORMATS = ("json", "csv")

# Generated locations were all last updated during 2024, so any modifiedSince after
# BASE_END selects only what mutate() touched.
BASE_START = datetime(2024, 1, 1, tzinfo=UTC)
BASE_SPREAD_SECONDS = 366 * 86400
BASE_END = BASE_START + timedelta(seconds=BASE_SPREAD_SECONDS)
_BASE_START_TS = int(BASE_START.timestamp())

# Column order of the CSV export (the simulator's own list; the client declares its own types).
CSV_COLUMNS = (
    "id",
    "country_code",
    "party_id",
    "publish",
    "name",
    "address",
    "city",
    "postal_code",
    "country",
    "coordinates",
    "operator",
    "time_zone",
    "evses",
    "last_updated",
)
NESTED_COLUMNS = frozenset({"coordinates", "operator", "evses"})

_ISO_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")

# (country_code, parties, ISO 3166 alpha-3, time zone, lat range, lon range, cities, streets)
_COUNTRIES: tuple[tuple[Any, ...], ...] = (
    (
        "NL",
        ("ABC", "EVB", "NUO"),
        "NLD",
        "Europe/Amsterdam",
        (51.0, 53.4),
        (3.6, 7.1),
        ("Amsterdam", "Utrecht", "'s-Hertogenbosch", "Den Haag", "Groningen"),
        ("Keizersgracht", "Damrak", "Stationsplein", "Oudegracht", "Coolsingel"),
    ),
    (
        "DE",
        ("ION", "EWE", "ENB"),
        "DEU",
        "Europe/Berlin",
        (47.5, 54.8),
        (6.1, 14.9),
        ("München", "Köln", "Düsseldorf", "Berlin", "Görlitz"),
        ("Königstraße", "Hauptstraße", "Schloßallee", "Mühlenweg", "Friedrichstraße"),
    ),
    (
        "BE",
        ("BEC", "ALL"),
        "BEL",
        "Europe/Brussels",
        (49.6, 51.4),
        (2.6, 6.3),
        ("Liège", "Bruxelles", "Gent", "Antwerpen", "Namur"),
        ("Rue de la Loi", "Veldstraat", "Meir", "Place Saint-Lambert", "Chaussée de Louvain"),
    ),
    (
        "FR",
        ("IZI", "TOT"),
        "FRA",
        "Europe/Paris",
        (43.3, 50.9),
        (-1.5, 7.6),
        ("Paris", "Lyon", "Besançon", "Orléans", "Nîmes"),
        ("Rue de Rivoli", "Avenue des Champs-Élysées", "Quai Saint-Étienne", "Rue Grenéta"),
    ),
)
_OPERATORS = (
    ("Allego", "https://www.allego.eu"),
    ("Fastned", "https://fastnedcharging.com"),
    ("IONITY", "https://ionity.eu"),
    ("Électra", None),
    ("Stadtwerke Köln", "https://www.rheinenergie.com"),
)
_NAME_PATTERNS = (
    "Laadplein {street}",
    "Ladepark {city}",
    "Borne de recharge {street}",
    'Parking "{city} Centrum", P{n}',
    "Station {street} {n}",
    "⚡ Hub {city}",
)
_EVSE_STATUSES = ("AVAILABLE", "CHARGING", "BLOCKED", "OUTOFORDER", "INOPERATIVE", "RESERVED")
_CONNECTOR_PROFILES = (
    ("IEC_62196_T2", "SOCKET", "AC_3_PHASE", 400, 32, 22000),
    ("IEC_62196_T2", "SOCKET", "AC_3_PHASE", 400, 16, 11000),
    ("IEC_62196_T2_COMBO", "CABLE", "DC", 920, 500, 350000),
    ("IEC_62196_T2_COMBO", "CABLE", "DC", 500, 125, 50000),
    ("CHADEMO", "CABLE", "DC", 500, 125, 50000),
    ("DOMESTIC_F", "SOCKET", "AC_1_PHASE", 230, 16, 3680),
)

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_OPERATOR_JSON = tuple(_dumps({"name": name, "website": site}) for name, site in _OPERATORS)
_CONNECTOR_JSON = tuple(
    _dumps(
        {
            "standard": standard,
            "format": fmt,
            "power_type": power,
            "max_voltage": volts,
            "max_amperage": amps,
            "max_electric_power": watts,
        }
    )[1:-1]
    for standard, fmt, power, volts, amps, watts in _CONNECTOR_PROFILES
)


_SCALAR_KEYS = frozenset(c for c in CSV_COLUMNS if c not in NESTED_COLUMNS)


@functools.lru_cache(maxsize=1 << 16)
def _js(value: str | bool | None) -> str:
    """JSON text of a frequently repeated scalar (names, cities, codes)."""
    return _dumps(value)


class _Row(NamedTuple):
    """One location as both formats need it: scalar values plus nested values as JSON text."""

    scalars: dict[str, Any]
    coordinates: str
    operator: str
    evses: str

    def json_text(self) -> str:
        s = self.scalars
        if s.keys() != _SCALAR_KEYS:  # not from _generate: take the slow, general path
            head = _dumps(s)[:-1]
        else:  # the hot path of big exports: few distinct strings, encoded once
            head = (
                f'{{"id":{_dumps(s["id"])},"country_code":{_js(s["country_code"])},'
                f'"party_id":{_js(s["party_id"])},"publish":{_js(s["publish"])},'
                f'"name":{_js(s["name"])},"address":{_js(s["address"])},'
                f'"city":{_js(s["city"])},"postal_code":{_js(s["postal_code"])},'
                f'"country":{_js(s["country"])},"time_zone":{_js(s["time_zone"])},'
                f'"last_updated":{_dumps(s["last_updated"])}'
            )
        return (
            f'{head},"coordinates":{self.coordinates},"operator":{self.operator},'
            f'"evses":{self.evses}}}'
        )

    def csv_cells(self) -> list[str]:
        s = self.scalars
        nested = {"coordinates": self.coordinates, "operator": self.operator, "evses": self.evses}
        cells = []
        for column in CSV_COLUMNS:
            if column in nested:
                cells.append(nested[column])
                continue
            value = s.get(column)
            if isinstance(value, bool):
                cells.append("true" if value else "false")
            else:
                cells.append("" if value is None else str(value))
        return cells

    def to_doc(self) -> dict[str, Any]:
        return json.loads(self.json_text())

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> _Row:
        scalars = {k: v for k, v in doc.items() if k not in NESTED_COLUMNS}
        return cls(
            scalars, _dumps(doc["coordinates"]), _dumps(doc["operator"]), _dumps(doc["evses"])
        )


def _fmt_ts(epoch: float) -> str:
    """Epoch seconds -> OCPI DateTime (UTC, Z); milliseconds only when there are any."""
    whole = int(epoch)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    millis = round((epoch - whole) * 1000)
    if millis >= 1000:
        return _fmt_ts(whole + 1)
    return f"{text}.{millis:03d}Z" if millis else f"{text}Z"


def _fmt_z(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class _Export:
    id: str
    format: str
    modified_since: datetime | None
    requested_at: float  # time.monotonic()
    failure: tuple[str, str] | None = None
    path: Path | None = None
    export_timestamp: datetime | None = None
    total_count: int | None = None
    completed_at: float | None = None  # epoch seconds
    expired: bool = False


class State:
    """The operator's data and the switches tests flip; every method is thread-safe.

    Switches (plain attributes, set them directly):
      ready_after_seconds, processing_after_seconds, processing_status, rate_limit_next,
      retry_after_seconds,
      fail_next_export, reject_next_request, max_export_rows, link_ttl_seconds,
      expired_links_next (the next N completed status answers carry a link that expired 5 s
      ago; later ones a fresh link),
      expire_exports_after_seconds, truncate_next_download, download_base_url,
      ignore_range (the file host answers every GET with the whole file, 200, although it
      advertises ``Accept-Ranges``), corrupt_next_export (bytes written over the next export's
      file once it is complete).
    Counters: calls (list of (method, path)), call_counts (Counter of paths' route names),
      downloads (successful 200/206 answers), bytes_sent (body bytes of every download answer,
      cut or not), requests_by_id (id -> modifiedSince or None).
    """

    def __init__(
        self,
        *,
        n_locations: int = 500,
        seed: int = 0,
        token: str = DEFAULT_TOKEN,
        ready_after_seconds: float = 0.2,
        link_ttl_seconds: float = 3600,
        expire_exports_after_seconds: float | None = None,
        retry_after_seconds: int = 1,
        directory: Path | str | None = None,
    ) -> None:
        self.seed = seed
        self.token = token
        self.ready_after_seconds = ready_after_seconds
        self.processing_status = "PROCESSING"  # word used between PENDING and COMPLETED
        # PENDING -> PROCESSING after this long (None: half of ready_after_seconds).
        self.processing_after_seconds: float | None = None
        self.rate_limit_next = 0
        self.retry_after_seconds = retry_after_seconds
        self.fail_next_export: tuple[str, str] | None = None
        self.reject_next_request: str | None = None
        self.max_export_rows: int | None = None  # beyond this -> EXPORT_SIZE_EXCEEDED
        self.link_ttl_seconds = link_ttl_seconds
        self.expired_links_next = 0
        self.expire_exports_after_seconds = expire_exports_after_seconds
        self.truncate_next_download = False
        self.download_base_url: str | None = None  # serve links from another host
        self.ignore_range = False
        self.corrupt_next_export: bytes | None = None

        self.bytes_sent = 0

        self.calls: list[tuple[str, str]] = []
        self.downloads = 0
        self.requests_by_id: dict[str, datetime | None] = {}

        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._count = n_locations
        self._overrides: dict[int, tuple[float, _Row]] = {}
        self._exports: dict[str, _Export] = {}
        self._rng = random.Random(f"locations-state-{seed}")
        self._key = f"locations-{seed}".encode()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="locations-sandbox-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- data
    @property
    def n_locations(self) -> int:
        with self._lock:
            return self._count

    def _base_ts(self, i: int) -> int:
        """last_updated of an untouched location: cheap, so filtering needs no generation."""
        return _BASE_START_TS + (i * 2654435761 + self.seed * 40503) % BASE_SPREAD_SECONDS

    def _generate(self, i: int, last_updated: float | None = None) -> _Row:
        """Location ``i`` from 64 hash bytes: deterministic per (seed, i), ~10 us, no state.

        Nested values are built as JSON text directly (they are ASCII), which is what both
        export formats need; this keeps a 200k export at a few seconds.
        """
        d = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=64, key=self._key).digest()
        cc, parties, country, tz, (la0, la1), (lo0, lo1), cities, streets = _COUNTRIES[
            i % len(_COUNTRIES)
        ]
        party = parties[i % len(parties)]
        city = cities[d[0] % len(cities)]
        street = streets[d[1] % len(streets)]
        loc_ts = float(self._base_ts(i)) if last_updated is None else last_updated
        operator = _OPERATOR_JSON[d[2] % len(_OPERATOR_JSON)]
        lat = la0 + int.from_bytes(d[3:6], "little") / 0xFFFFFF * (la1 - la0)
        lon = lo0 + int.from_bytes(d[6:9], "little") / 0xFFFFFF * (lo1 - lo0)
        evses = []
        pos = 20
        for k in range(1, d[10] % 4 + 2):
            if last_updated is None:
                age = int.from_bytes(d[pos : pos + 2], "little") * 39  # up to ~30 days
                evse_ts = _fmt_ts(loc_ts - age)
            else:
                evse_ts = _fmt_ts(loc_ts)
            connectors = ",".join(
                f'{{"id":"{c}",{_CONNECTOR_JSON[d[pos + 3 + c] % len(_CONNECTOR_JSON)]},'
                f'"last_updated":"{evse_ts}"}}'
                for c in range(1, d[pos + 3] % 3 + 2)
            )
            evses.append(
                f'{{"uid":"{i}-{k}","evse_id":"{cc}*{party}*E{i:07d}*{k}",'
                f'"status":"{_EVSE_STATUSES[d[pos + 2] % len(_EVSE_STATUSES)]}",'
                f'"connectors":[{connectors}],"last_updated":"{evse_ts}"}}'
            )
            pos += 7
        small = d[11] % 4 * 1000 + int.from_bytes(d[12:14], "little") % 1000
        postal = 1000 + small if cc in ("NL", "BE") else 10000 + small * 20 + d[14] % 20
        scalars = {
            "id": f"LOC{i:07d}",
            "country_code": cc,
            "party_id": party,
            "publish": d[15] > 12,  # ~5% unpublished
            "name": _NAME_PATTERNS[d[16] % len(_NAME_PATTERNS)].format(
                street=street, city=city, n=d[17] % 9 + 1
            ),
            "address": f"{street} {d[18] % 250 + 1}",
            "city": city,
            "postal_code": str(postal),
            "country": country,
            "time_zone": tz,
            "last_updated": _fmt_ts(loc_ts),
        }
        return _Row(
            scalars,
            f'{{"latitude":"{lat:.6f}","longitude":"{lon:.6f}"}}',
            operator,
            "[" + ",".join(evses) + "]",
        )

    def location(self, i: int) -> dict[str, Any]:
        """The current version of location ``i`` (0-based), as an export would contain it."""
        with self._lock:
            if not 0 <= i < self._count:
                raise IndexError(f"no location {i} (have {self._count})")
            override = self._overrides.get(i)
        row = override[1] if override is not None else self._generate(i)
        return row.to_doc()  # a fresh copy the caller may change

    def mutate(self, updated: int = 0, added: int = 0) -> None:
        """Change ``updated`` existing locations (an EVSE status) and add ``added`` new ones.

        Touched locations get ``last_updated = now``, so a modifiedSince export picks them up.
        """
        with self._lock:
            if updated > self._count:
                raise ValueError(f"cannot update {updated} of {self._count} locations")
            now = round(time.time(), 3)
            for i in sorted(self._rng.sample(range(self._count), updated)):
                doc = self.location(i)
                evse = doc["evses"][self._rng.randrange(len(doc["evses"]))]
                choices = [s for s in _EVSE_STATUSES if s != evse["status"]]
                evse["status"] = self._rng.choice(choices)
                evse["last_updated"] = _fmt_ts(now)
                doc["last_updated"] = _fmt_ts(now)
                self._overrides[i] = (now, _Row.from_doc(doc))
            for i in range(self._count, self._count + added):
                self._overrides[i] = (now, self._generate(i, last_updated=now))
            self._count += added

    def _snapshot(self) -> tuple[datetime, int, dict[int, tuple[float, _Row]]]:
        """Time, size and touched locations at one instant; the export is exactly this."""
        with self._lock:
            return _now(), self._count, dict(self._overrides)

    def _rows(
        self,
        count: int,
        overrides: dict[int, tuple[float, _Row]],
        modified_since: datetime | None,
    ) -> Iterator[_Row]:
        """Locations of a snapshot, in index order, one at a time (never all in memory)."""
        since = modified_since.timestamp() if modified_since else None
        if since is not None and since >= BASE_END.timestamp():
            for i in sorted(overrides):  # nothing generated qualifies: only touched ones
                ts, row = overrides[i]
                if ts > since:
                    yield row
            return
        for i in range(count):
            override = overrides.get(i)
            if override is not None:
                if since is None or override[0] > since:
                    yield override[1]
            elif since is None or self._base_ts(i) > since:
                yield self._generate(i)

    def count_rows(self, modified_since: datetime | None = None) -> int:
        """How many locations an export made now would hold (cheap: no generation)."""
        since = modified_since.timestamp() if modified_since else None
        with self._lock:
            count, overrides = self._count, dict(self._overrides)
        if since is None:
            return count
        n = sum(1 for ts, _ in overrides.values() if ts > since)
        if since < BASE_END.timestamp():
            n += sum(1 for i in range(count) if i not in overrides and self._base_ts(i) > since)
        return n

    # -------------------------------------------------------------- exports
    def create_export(self, fmt: str, modified_since: datetime | None) -> _Export:
        with self._lock:
            export_id = str(uuid.uuid4())  # unique across sandbox restarts, like a real API
            export = _Export(
                id=export_id,
                format=fmt,
                modified_since=modified_since,
                requested_at=time.monotonic(),
                failure=self.fail_next_export,
            )
            self.fail_next_export = None
            self._exports[export_id] = export
            self.requests_by_id[export_id] = modified_since
            return export

    def get_export(self, export_id: str) -> _Export | None:
        with self._lock:
            return self._exports.get(export_id)

    def complete(self, export_id: str) -> None:
        """Finish an export now (write its file or fail it), whatever the delay says."""
        export = self.get_export(export_id)
        if export is None:
            raise KeyError(export_id)
        with self._write_lock:
            if export.completed_at is not None:
                return
            if export.failure is None:
                self._write(export)
            export.completed_at = time.time()

    def expire(self, export_id: str) -> None:
        """Make an export EXPIRED now: status says so and its file answers 410."""
        export = self.get_export(export_id)
        if export is None:
            raise KeyError(export_id)
        with self._lock:
            export.expired = True
            if export.path is not None:
                export.path.unlink(missing_ok=True)

    def _write(self, export: _Export) -> None:
        snapshot, count, overrides = self._snapshot()
        path = self.directory / f"{export.id}.{export.format}"
        partial = path.with_suffix(path.suffix + ".partial")
        rows = self._rows(count, overrides, export.modified_since)
        written = 0
        with partial.open("w", encoding="utf-8", newline="") as out:
            if export.format == "json":
                out.write("[")
                for row in rows:
                    out.write(",\n" if written else "\n")
                    out.write(row.json_text())
                    written += 1
                out.write("\n]\n" if written else "]\n")
            else:
                writer = csv.writer(out)
                writer.writerow(CSV_COLUMNS)
                for row in rows:
                    writer.writerow(row.csv_cells())
                    written += 1
        with self._lock:
            corrupt, self.corrupt_next_export = self.corrupt_next_export, None
        if corrupt is not None:
            partial.write_bytes(corrupt)
        partial.replace(path)
        with self._lock:
            export.path = path
            export.total_count = written
            export.export_timestamp = snapshot.replace(microsecond=0)

    def _is_expired(self, export: _Export) -> bool:
        if export.expired:
            return True
        limit = self.expire_exports_after_seconds
        due = export.completed_at is not None and export.failure is None and limit is not None
        if due and time.time() >= export.completed_at + limit:  # type: ignore[operator]
            self.expire(export.id)
            return True
        return False

    def status_word(self, export_id: str) -> str:
        """Advance the export's clock (writing its file when due) and return the API's word."""
        export = self.get_export(export_id)
        if export is None:
            raise KeyError(export_id)
        if export.completed_at is None:
            elapsed = time.monotonic() - export.requested_at
            processing_after = self.processing_after_seconds
            if processing_after is None:
                processing_after = self.ready_after_seconds / 2
            if elapsed < processing_after:
                return "PENDING"
            if elapsed < self.ready_after_seconds:
                return self.processing_status
            self.complete(export_id)
        if export.failure is not None:
            return "FAILED"
        return "EXPIRED" if self._is_expired(export) else "COMPLETED"

    def status_body(self, export_id: str, base_url: str) -> dict[str, Any]:
        """The JSON of ``GET /locations/exports/{id}`` (also the webhook body when final)."""
        word = self.status_word(export_id)
        export = self.get_export(export_id)
        assert export is not None
        body: dict[str, Any] = {"requestId": export_id, "status": word}
        if word == "FAILED" and export.failure is not None:
            body["error"] = {"code": export.failure[0], "message": export.failure[1]}
        elif word == "COMPLETED":
            assert export.completed_at is not None and export.export_timestamp is not None
            expires = time.time() + self.link_ttl_seconds
            with self._lock:
                if self.expired_links_next > 0:
                    self.expired_links_next -= 1
                    expires = time.time() - 5
            if self.expire_exports_after_seconds is not None:
                expires = min(expires, export.completed_at + self.expire_exports_after_seconds)
            root = (self.download_base_url or base_url).rstrip("/")
            link = sign_path(f"/downloads/{export.id}.{export.format}", expires)
            body |= {
                "exportUrl": f"{root}{link}",
                "downloadExpiresAt": _fmt_z(datetime.fromtimestamp(int(expires), UTC)),
                "exportTimestamp": _fmt_z(export.export_timestamp),
                "totalCount": export.total_count,
            }
        return body

    def event_body(self, export_id: str, base_url: str) -> dict[str, Any]:
        """The body the operator would POST to ``{rsp_webhook_url}/locations/exports/events``.

        Finishes the export first; for the webhook receiver's end-to-end tests.
        """
        self.complete(export_id)
        body = self.status_body(export_id, base_url)
        if body["status"] not in ("COMPLETED", "FAILED"):
            raise ValueError(f"export {export_id} is {body['status']}; no event is sent for that")
        return body

    # ------------------------------------------------------------- plumbing
    def _record(self, request: Request) -> None:
        with self._lock:
            self.calls.append((request.method, request.url.path))

    @property
    def call_counts(self) -> Counter[str]:
        """Calls per route: "request", "status", "download"."""
        with self._lock:
            calls = list(self.calls)
        counts: Counter[str] = Counter()
        for method, path in calls:
            if path.startswith("/downloads/"):
                counts["download"] += 1
            elif method == "POST":
                counts["request"] += 1
            else:
                counts["status"] += 1
        return counts

    def _take_rate_limit(self) -> bool:
        with self._lock:
            if self.rate_limit_next > 0:
                self.rate_limit_next -= 1
                return True
            return False

    def _take_rejection(self) -> str | None:
        with self._lock:
            code, self.reject_next_request = self.reject_next_request, None
            return code

    def _take_truncation(self) -> bool:
        with self._lock:
            take, self.truncate_next_download = self.truncate_next_download, False
            return take

    def _count_download(self) -> None:
        with self._lock:
            self.downloads += 1

    def _count_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def close(self) -> None:
        """Remove the export files (when the simulator owns its directory)."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_MESSAGES = {
    "INVALID_FORMAT": "Unsupported export format. Supported formats: json, csv",
    "INVALID_DATE_RANGE": "modifiedSince must be an ISO 8601 UTC time with Z, not in the future",
    "EXPORT_SIZE_EXCEEDED": "Requested export would exceed size limits",
}


def _error(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    headers.setdefault("X-Request-Id", str(uuid.uuid4()))
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _denied(message: str) -> Response:
    """S3-style refusal of a signed link: XML, not the API's JSON error shape."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>AccessDenied</Code><Message>{message}</Message></Error>\n"
    )
    return Response(body, status_code=403, media_type="application/xml")


class _Counted:
    """Counts the body bytes a response really sent (``State.bytes_sent``)."""

    def __init__(self, inner: Response, state: State, *, drop_range: bool = False) -> None:
        self.inner = inner
        self.state = state
        self.drop_range = drop_range

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                self.state._count_bytes(len(message.get("body", b"")))
            await send(message)

        if self.drop_range:  # a host that ignores Range: it never sees the header
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
            scope = dict(scope, headers=headers)
        await self.inner(scope, receive, counting)


class _TruncatedFileResponse(Response):
    """Announces the full Content-Length (or the rest of it, for a Range), sends half of it,
    then drops the connection. Like a real object store it says ``Accept-Ranges: bytes``."""

    def __init__(self, path: Path, headers: dict[str, str], start: int = 0) -> None:
        super().__init__(status_code=200 if start == 0 else 206, headers=headers)
        self.path = path
        self.start = start

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        total = self.path.stat().st_size
        size = total - self.start
        self.headers["content-length"] = str(size)
        self.headers["accept-ranges"] = "bytes"
        if self.start:
            self.headers["content-range"] = f"bytes {self.start}-{total - 1}/{total}"
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        remaining = size // 2
        with self.path.open("rb") as f:
            f.seek(self.start)
            while remaining > 0:
                chunk = f.read(min(65536, remaining))
                remaining -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        # Returning without the final body message makes the server close the connection.


def create_app(state: State) -> Starlette:
    """The operator's API and its download host as one Starlette app."""

    def gate(request: Request) -> Response | None:
        state._record(request)
        if state._take_rate_limit():
            return _error(
                429,
                "RATE_LIMIT_EXCEEDED",
                "Too many requests",
                **{"Retry-After": str(state.retry_after_seconds)},
            )
        if request.headers.get("authorization") != f"Bearer {state.token}":
            return _error(
                401,
                "UNAUTHORIZED",
                "Authentication failed",
                **{"WWW-Authenticate": 'Bearer realm="locations"'},
            )
        return None

    async def create_export(request: Request) -> Response:
        if (refusal := gate(request)) is not None:
            return refusal
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "INVALID_REQUEST", "Request body must be a JSON object")
        if not isinstance(body, dict):
            return _error(400, "INVALID_REQUEST", "Request body must be a JSON object")
        if (code := state._take_rejection()) is not None:
            return _error(400, code, _MESSAGES.get(code, code))
        fmt = body.get("format")
        if fmt not in FORMATS:
            return _error(400, "INVALID_FORMAT", _MESSAGES["INVALID_FORMAT"])
        since_text = body.get("modifiedSince")
        since: datetime | None = None
        if since_text is not None:
            if not isinstance(since_text, str) or not _ISO_Z.match(since_text):
                return _error(400, "INVALID_DATE_RANGE", _MESSAGES["INVALID_DATE_RANGE"])
            try:
                since = datetime.fromisoformat(since_text.replace("Z", "+00:00"))
            except ValueError:
                return _error(400, "INVALID_DATE_RANGE", _MESSAGES["INVALID_DATE_RANGE"])
            if since > _now():
                return _error(400, "INVALID_DATE_RANGE", "modifiedSince is in the future")
        limit = state.max_export_rows
        if limit is not None and await run_in_threadpool(state.count_rows, since) > limit:
            return _error(
                400,
                "EXPORT_SIZE_EXCEEDED",
                f"Requested export would exceed size limits ({limit} locations)",
            )
        export = state.create_export(fmt, since)
        return JSONResponse(
            {
                "requestId": export.id,
                "status": "PENDING",
                "message": "Export request queued for processing",
            },
            status_code=202,
            headers={"X-Request-Id": str(uuid.uuid4())},
        )

    async def export_status(request: Request) -> Response:
        if (refusal := gate(request)) is not None:
            return refusal
        export_id = request.path_params["export_id"]
        if state.get_export(export_id) is None:
            return _error(404, "NOT_FOUND", f"Export request {export_id} not found")
        body = await run_in_threadpool(state.status_body, export_id, str(request.base_url))
        return JSONResponse(body, headers={"X-Request-Id": str(uuid.uuid4())})

    async def download(request: Request) -> Response:
        state._record(request)  # no auth and no rate limit: this is the file host
        path = request.url.path
        problem = check_signature(
            path, request.query_params.get("expires"), request.query_params.get("signature")
        )
        if problem is not None:
            text = "Request has expired" if problem == "expired" else f"Access denied: {problem}"
            return _denied(text)
        export_id, _, ext = request.path_params["file"].rpartition(".")
        export = state.get_export(export_id)
        if export is None or export.format != ext or export.completed_at is None:
            return Response("Not Found\n", status_code=404, media_type="text/plain")
        if state._is_expired(export) or export.path is None or not export.path.exists():
            return Response("Gone: this export has expired\n", status_code=410)
        assert export.export_timestamp is not None
        filename = f"locations-export-{export.export_timestamp:%Y-%m-%d}.{ext}"
        media_type = "application/json" if ext == "json" else "text/csv; charset=utf-8"
        headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
        if request.method == "GET" and state._take_truncation():
            state._count_download()
            headers["Content-Type"] = media_type
            match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("range", ""))
            start = int(match.group(1)) if match and not state.ignore_range else 0
            return _Counted(_TruncatedFileResponse(export.path, headers, start), state)
        if request.method == "GET":
            state._count_download()
        return _Counted(  # type: ignore[return-value]
            FileResponse(export.path, media_type=media_type, headers=headers),
            state,
            drop_range=state.ignore_range,
        )

    return Starlette(
        routes=[
            Route("/locations/exports", create_export, methods=["POST"]),
            Route("/locations/exports/{export_id}", export_status, methods=["GET"]),
            Route("/downloads/{file}", download, methods=["GET", "HEAD"]),
        ]
    )
