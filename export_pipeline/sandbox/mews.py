"""Mews Connector export simulator over real HTTP (``exports/add``, ``exports/getAll``, files).

What it reproduces, because the pipeline has to cope with it:

- auth in the JSON body (``ClientToken``, ``AccessToken``, ``Client``); a wrong token is HTTP 401
  ``{"Message": "Invalid ClientToken."}`` as Mews answers it;
- one Pending/Processing export per entity type: ``exports/add`` answers HTTP 400 otherwise;
- ``getAll`` takes at most 1000 ids (HTTP 400 beyond) and carries ``Scope`` on each export;
- exports move Pending -> Processing -> Success by time since creation (evaluated whenever the
  API is called), then turn Expired at ``ExpiresUtc``;
- a Success export is the full entity set at that moment, written to disk as JSON Lines split
  into several parts, with the true ``SizeInBytes``, behind signed links that die at
  ``ExpiresUtc`` (403), with ``Content-Length`` and ``Range``.

Records are generated lazily from ``(seed, entity type, index)``, so a million reservations cost
no memory; updates and deletions are a small override (version per index, deleted index set).

Switches on :class:`State`: ``fail_next`` (entity types whose next export fails),
``size_lie_next`` (next export announces a wrong ``SizeInBytes``), ``expire(export_id)``,
``drop_last_part(export_id)``,
``link_ttl_seconds``, ``pending_seconds``/``processing_seconds``, ``parts`` or
``max_records_per_part``, ``mutate(...)``, ``seed_open_exports(n)``. Counters: ``add_calls``,
``getall_calls``, ``downloads``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from export_pipeline.sandbox.signing import check_signature, sign_path

ENTITY_TYPES: tuple[str, ...] = (
    "OrderItem",
    "Payment",
    "Reservation",
    "Customer",
    "Company",
    "Bill",
    "AvailabilityAdjustment",
    "AvailabilityBlock",
    "ResourceBlock",
)
MAX_EXPORT_IDS = 1000
DEFAULT_CLIENT_TOKEN = "sandbox-mews-client-token"
DEFAULT_ACCESS_TOKEN = "sandbox-mews-access-token"

# Records are dated relative to this instant so that the same seed gives the same bytes.
_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z
_UPDATE_EPOCH = 1_735_689_600  # 2025-01-01T00:00:00Z, later than every generated UpdatedUtc

_FIRST_NAMES = (
    "Søren", "Zoë", "José", "Łukasz", "Anaïs", "Yūki", "Ахмед", "Siobhán", "Björn", "Chloé",
    "Oğuz", "Nguyễn", "美咲", "Amélie", "John", "Priya",
)  # fmt: skip
_LAST_NAMES = (
    "Müller", "Jørgensen", "日本", "O'Brien", "García", "Dvořák", "Nováková", "Иванова",
    "Schröder", "Kowalski", "Smith", "Núñez", "van der Berg", "Þórsdóttir", "Al-Hāshimī", "Lee",
)  # fmt: skip
_NOTES = (
    None,
    None,
    "Late arrival ✈️ around 23:00",
    "Allergic to nuts; needs ground floor",
    "Zimmer mit Aussicht, bitte",
    'VIP "gold" guest',
    "Line one\nline two",
    "Path C:\\temp should stay a backslash",
    "常連のお客様",
    "",
)
_CITIES = (
    ("Praha", "CZ", "110 00"),
    ("København", "DK", "1050"),
    ("München", "DE", "80331"),
    ("Kraków", "PL", "31-001"),
    ("Reykjavík", "IS", "101"),
    ("東京", "JP", "100-0001"),
    ("London", "GB", "EC1A 1BB"),
    ("São Paulo", "BR", "01000-000"),
)
_COMPANIES = (
    "Müller & Söhne GmbH",
    "Nordisk Rejse A/S",
    "株式会社さくら旅行",
    "Acme Travel Ltd.",
    "Hôtellerie Générale SARL",
    "Kraków Events sp. z o.o.",
)
_CURRENCIES = ("EUR", "CZK", "GBP", "DKK")
_TAX_CODES = (("CZ-S", 0.21), ("CZ-R", 0.12), ("DE-S", 0.19), ("UK-S", 0.2))


def _iso(epoch: float) -> str:
    """Mews timestamps: UTC, ISO 8601 with a Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _iso_ms(epoch: float) -> str:
    return _iso(epoch)[:-1] + f".{round(epoch % 1 * 1000) % 1000:03d}Z"


def _uuid(rng: random.Random) -> str:
    """A version-4 UUID string from ``rng`` (deterministic, faster than ``uuid.UUID``)."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:32]}"


@dataclass(frozen=True)
class _Pools:
    """Ids shared by many records (enterprises, services, rates...), fixed per seed."""

    chain_id: str
    enterprise_ids: tuple[str, ...]
    service_ids: tuple[str, ...]
    rate_ids: tuple[str, ...]
    category_ids: tuple[str, ...]
    resource_ids: tuple[str, ...]
    accounting_category_ids: tuple[str, ...]
    age_category_ids: tuple[str, ...]

    @classmethod
    def from_seed(cls, seed: int) -> _Pools:
        rng = random.Random(f"{seed}:pools")

        def ids(n: int) -> tuple[str, ...]:
            return tuple(_uuid(rng) for _ in range(n))

        return cls(
            chain_id=_uuid(rng),
            enterprise_ids=ids(2),
            service_ids=ids(3),
            rate_ids=ids(6),
            category_ids=ids(5),
            resource_ids=ids(40),
            accounting_category_ids=ids(8),
            age_category_ids=ids(2),
        )


def _amount(rng: random.Random, currency: str, low: float = 10.0, high: float = 900.0) -> dict:
    code, rate = rng.choice(_TAX_CODES)
    net = round(rng.uniform(low, high), 2)
    tax = round(net * rate, 2)
    return {
        "Currency": currency,
        "NetValue": net,
        "GrossValue": round(net + tax, 2),
        "TaxValues": [{"Code": code, "Value": tax}],
        "Breakdown": {"Items": [{"TaxRateCode": code, "NetValue": net, "TaxValue": tax}]},
    }


def _address(rng: random.Random) -> dict:
    city, country, postal = rng.choice(_CITIES)
    return {
        "Line1": f"{rng.choice(_LAST_NAMES)}straße {rng.randint(1, 200)}",
        "Line2": None,
        "City": city,
        "PostalCode": postal,
        "CountryCode": country,
        "CountrySubdivisionCode": None,
    }


def _times(rng: random.Random) -> tuple[float, float]:
    created = _EPOCH + rng.randrange(300 * 86_400)
    return created, created + rng.randrange(30 * 86_400)


def _reservation(rng: random.Random, p: _Pools) -> dict:
    created, updated = _times(rng)
    start = created + rng.randrange(1, 120) * 86_400
    nights = rng.randint(1, 14)
    currency = rng.choice(_CURRENCIES)
    return {
        "Id": _uuid(rng),
        "ServiceId": rng.choice(p.service_ids),
        "EnterpriseId": rng.choice(p.enterprise_ids),
        "GroupId": _uuid(rng),
        "Number": str(rng.randint(1000, 9_999_999)),
        "ChannelNumber": rng.choice([None, f"BDC-{rng.randint(10**8, 10**9)}"]),
        "State": rng.choice(["Confirmed", "Started", "Processed", "Canceled", "Optional"]),
        "Origin": rng.choice(["Distributor", "Connector", "Commander", "ChannelManager"]),
        "Purpose": rng.choice(["Leisure", "Business", "Student"]),
        "CreatedUtc": _iso(created),
        "UpdatedUtc": _iso(updated),
        "StartUtc": _iso(start),
        "EndUtc": _iso(start + nights * 86_400),
        "ReleasedUtc": None,
        "RequestedCategoryId": rng.choice(p.category_ids),
        "AssignedResourceId": rng.choice([None, *p.resource_ids[:8]]),
        "RateId": rng.choice(p.rate_ids),
        "CompanyId": None,
        "TravelAgencyId": None,
        "AvailabilityBlockId": None,
        "VoucherId": None,
        "Customer": {
            "Id": _uuid(rng),
            "FirstName": rng.choice(_FIRST_NAMES),
            "LastName": rng.choice(_LAST_NAMES),
            "Email": f"guest{rng.randrange(10**6)}@example.com",
            "NationalityCode": rng.choice(["CZ", "DK", "DE", "JP", "GB", None]),
        },
        "CompanionIds": [_uuid(rng) for _ in range(rng.randint(0, 3))],
        "PersonCounts": [
            {"AgeCategoryId": p.age_category_ids[0], "Count": rng.randint(1, 3)},
            {"AgeCategoryId": p.age_category_ids[1], "Count": rng.randint(0, 2)},
        ],
        "Options": {
            "OwnerCheckedIn": rng.random() < 0.3,
            "AllCompanionsCheckedIn": rng.random() < 0.2,
            "ConnectorCheckIn": False,
        },
        "Amount": _amount(rng, currency, 80, 4000),
        "Notes": rng.choice(_NOTES),
    }


def _order_item(rng: random.Random, p: _Pools) -> dict:
    created, updated = _times(rng)
    currency = rng.choice(_CURRENCIES)
    units = rng.randint(1, 5)
    unit = _amount(rng, currency, 2, 300)
    product = rng.random() < 0.5
    return {
        "Id": _uuid(rng),
        "EnterpriseId": rng.choice(p.enterprise_ids),
        "AccountId": _uuid(rng),
        "AccountType": rng.choice(["Customer", "Company"]),
        "ServiceId": rng.choice(p.service_ids),
        "ServiceOrderId": _uuid(rng),
        "BillId": rng.choice([None, _uuid(rng)]),
        "AccountingCategoryId": rng.choice(p.accounting_category_ids),
        "Type": rng.choice(["SpaceOrder", "ProductOrder", "CityTax", "Deposit"]),
        "UnitCount": units,
        "UnitAmount": unit,
        "Amount": {**unit, "NetValue": round(unit["NetValue"] * units, 2),
                   "GrossValue": round(unit["GrossValue"] * units, 2)},
        "RevenueType": rng.choice(["Service", "Product", "Additional"]),
        "ConsumedUtc": _iso(created + 3600),
        "ClosedUtc": rng.choice([None, _iso(updated)]),
        "AccountingState": rng.choice(["Open", "Closed", "Inactive"]),
        "CreatedUtc": _iso(created),
        "UpdatedUtc": _iso(updated),
        "Data": {"Discriminator": "Product", "Value": {"ProductId": _uuid(rng)}}
        if product
        else {"Discriminator": "Rebate", "Value": None},
        "Options": {"CanceledWithReservation": rng.random() < 0.1},
        "Notes": rng.choice(_NOTES),
    }  # fmt: skip


def _payment(rng: random.Random, p: _Pools) -> dict:
    created, updated = _times(rng)
    card = rng.random() < 0.6
    return {
        "Id": _uuid(rng),
        "EnterpriseId": rng.choice(p.enterprise_ids),
        "AccountId": _uuid(rng),
        "AccountType": "Customer",
        "BillId": rng.choice([None, _uuid(rng)]),
        "ReservationId": rng.choice([None, _uuid(rng)]),
        "AccountingCategoryId": rng.choice(p.accounting_category_ids),
        "Amount": _amount(rng, rng.choice(_CURRENCIES), 5, 3000),
        "State": rng.choice(["Charged", "Canceled", "Pending"]),
        "Type": "CreditCard" if card else rng.choice(["Cash", "Invoice", "BankTransfer"]),
        "Kind": rng.choice(["Payment", "Payment", "Refund"]),
        "AccountingState": rng.choice(["Open", "Closed"]),
        "Identifier": f"PAY-{rng.randrange(10**8):08d}",
        "ChargedUtc": _iso(created),
        "CreatedUtc": _iso(created),
        "UpdatedUtc": _iso(updated),
        "SettlementId": None,
        "Data": {
            "Discriminator": "CreditCard",
            "CreditCard": {
                "Id": _uuid(rng),
                "Number": f"************{rng.randrange(10**4):04d}",
                "Type": rng.choice(["Visa", "MasterCard", "Amex"]),
            },
        }
        if card
        else None,
        "Notes": rng.choice(_NOTES),
    }


def _customer(rng: random.Random, p: _Pools) -> dict:
    created, updated = _times(rng)
    return {
        "Id": _uuid(rng),
        "ChainId": p.chain_id,
        "Number": str(rng.randrange(10**6, 10**7)),
        "Title": rng.choice([None, "Mister", "Miss", "Misses"]),
        "Sex": rng.choice([None, "Male", "Female"]),
        "FirstName": rng.choice(_FIRST_NAMES),
        "LastName": rng.choice(_LAST_NAMES),
        "SecondLastName": None,
        "NationalityCode": rng.choice(["CZ", "DK", "DE", "JP", "GB", None]),
        "LanguageCode": rng.choice(["cs-CZ", "da-DK", "de-DE", "ja-JP", "en-GB", None]),
        "BirthDate": rng.choice([None, f"{rng.randint(1940, 2005)}-{rng.randint(1, 12):02d}-15"]),
        "Email": rng.choice([None, f"c{rng.randrange(10**6)}@example.org"]),
        "Phone": rng.choice([None, f"+420 {rng.randrange(10**8, 10**9)}"]),
        "Address": rng.choice([None, _address(rng)]),
        "Classifications": rng.sample(["Returning", "VeryImportant", "Staff", "Blacklist"], 2),
        "Options": rng.choice([[], ["SendMarketingEmails"], ["Invoiceable"]]),
        "IsActive": rng.random() < 0.95,
        "CreatedUtc": _iso(created),
        "UpdatedUtc": _iso(updated),
        "Notes": rng.choice(_NOTES),
    }


def _company(rng: random.Random, p: _Pools) -> dict:
    created, updated = _times(rng)
    return {
        "Id": _uuid(rng),
        "ChainId": p.chain_id,
        "Name": f"{rng.choice(_COMPANIES)} #{rng.randrange(1000)}",
        "Number": rng.randrange(1, 10**5),
        "Identifier": f"{rng.randrange(10**7, 10**8)}",
        "TaxIdentifier": rng.choice([None, f"CZ{rng.randrange(10**7, 10**8)}"]),
        "IsActive": rng.random() < 0.9,
        "MotherCompanyId": None,
        "InvoicingEmail": rng.choice([None, f"billing{rng.randrange(999)}@example.com"]),
        "WebsiteUrl": rng.choice([None, "https://example.com"]),
        "Address": _address(rng),
        "CreditRating": {"Basic": rng.choice(["CreditOk", "PaymentRequiredUpfront", None])},
        "Options": {"Invoiceable": rng.random() < 0.5, "AddFeesToInvoices": False},
        "CreatedUtc": _iso(created),
        "UpdatedUtc": _iso(updated),
        "Notes": rng.choice(_NOTES),
    }


def _bill(rng: random.Random, p: _Pools) -> dict:
    created, updated = _times(rng)
    closed = rng.random() < 0.6
    return {
        "Id": _uuid(rng),
        "Name": rng.choice([None, "Invoice", "Účet"]),
        "EnterpriseId": rng.choice(p.enterprise_ids),
        "AccountId": _uuid(rng),
        "AssociatedAccountIds": [_uuid(rng) for _ in range(rng.randint(0, 2))],
        "State": "Closed" if closed else "Open",
        "Type": rng.choice(["Receipt", "Invoice"]),
        "Number": str(rng.randrange(10**5)) if closed else None,
        "CreatedUtc": _iso(created),
        "IssuedUtc": _iso(updated) if closed else None,
        "DueUtc": _iso(updated + 14 * 86_400) if closed else None,
        "PaidUtc": None,
        "UpdatedUtc": _iso(updated),
        "Options": {"DisplayCustomer": True, "DisplayTaxation": rng.random() < 0.5},
        "OwnerData": {
            "Discriminator": "BillCustomerData",
            "Value": {"FirstName": rng.choice(_FIRST_NAMES), "LastName": rng.choice(_LAST_NAMES),
                      "Address": _address(rng)},
        },
        "Notes": rng.choice(_NOTES),
    }  # fmt: skip


def _availability_adjustment(rng: random.Random, p: _Pools) -> dict:
    created, updated = _times(rng)
    return {
        "Id": _uuid(rng),
        "AvailabilityBlockId": rng.choice([None, _uuid(rng)]),
        "ResourceCategoryId": rng.choice(p.category_ids),
        "StartUtc": _iso(created),
        "EndUtc": _iso(created + rng.randint(1, 10) * 86_400),
        "UnitCount": rng.randint(-5, 10),
        "ActivityState": rng.choice(["Active", "Deleted"]),
        "ReleaseOverrideUtc": None,
        "PaxCounts": rng.choice([None, [{"PersonCount": 2, "UnitCount": rng.randint(1, 4)}]]),
        "UpdatedUtc": _iso(updated),
        "Notes": rng.choice(_NOTES),
    }


def _availability_block(rng: random.Random, p: _Pools) -> dict:
    created, updated = _times(rng)
    first = created + rng.randrange(10, 200) * 86_400
    return {
        "Id": _uuid(rng),
        "EnterpriseId": rng.choice(p.enterprise_ids),
        "ServiceId": rng.choice(p.service_ids),
        "RateId": rng.choice(p.rate_ids),
        "VoucherId": None,
        "BookerId": rng.choice([None, _uuid(rng)]),
        "CompanyId": rng.choice([None, _uuid(rng)]),
        "Name": f"{rng.choice(_COMPANIES)} \u2013 group {rng.randrange(100)}",
        "State": rng.choice(["Confirmed", "Optional", "Inquired", "Canceled"]),
        "ReservationPurpose": rng.choice(["Leisure", "Business"]),
        "Budget": {"Currency": rng.choice(_CURRENCIES), "Value": rng.randrange(1000, 90_000)},
        "FirstTimeUnitStartUtc": _iso(first),
        "LastTimeUnitStartUtc": _iso(first + rng.randint(1, 6) * 86_400),
        "ReleasedUtc": _iso(first - 7 * 86_400),
        "RollingReleaseOffset": None,
        "ExternalIdentifier": rng.choice([None, f"EXT-{rng.randrange(10**6)}"]),
        "IsActive": True,
        "CreatedUtc": _iso(created),
        "UpdatedUtc": _iso(updated),
        "Notes": rng.choice(_NOTES),
    }


def _resource_block(rng: random.Random, p: _Pools) -> dict:
    created, updated = _times(rng)
    return {
        "Id": _uuid(rng),
        "EnterpriseId": rng.choice(p.enterprise_ids),
        "AssignedResourceId": rng.choice(p.resource_ids),
        "IsActive": rng.random() < 0.9,
        "Type": rng.choice(["OutOfOrder", "InternalUse"]),
        "Name": rng.choice(["Renovation", "Wasserschaden", "清掃", "Maintenance"]),
        "StartUtc": _iso(created),
        "EndUtc": _iso(created + rng.randint(1, 5) * 86_400),
        "CreatedUtc": _iso(created),
        "UpdatedUtc": _iso(updated),
        "DeletedUtc": None,
        "Notes": rng.choice(_NOTES),
    }


_GENERATORS: Mapping[str, Callable[[random.Random, _Pools], dict]] = {
    "OrderItem": _order_item,
    "Payment": _payment,
    "Reservation": _reservation,
    "Customer": _customer,
    "Company": _company,
    "Bill": _bill,
    "AvailabilityAdjustment": _availability_adjustment,
    "AvailabilityBlock": _availability_block,
    "ResourceBlock": _resource_block,
}


@dataclass
class _Collection:
    """One entity type: indices ``0..total-1``, minus ``deleted``; ``versions`` marks updates."""

    total: int
    deleted: set[int] = field(default_factory=set)
    versions: dict[int, int] = field(default_factory=dict)
    mutations: int = 0

    @property
    def live(self) -> int:
        return self.total - len(self.deleted)


@dataclass(frozen=True)
class _Snapshot:
    """What an export contains: a frozen copy of a collection's (small) override state."""

    entity_type: str
    total: int
    deleted: frozenset[int]
    versions: Mapping[int, int]

    @property
    def live(self) -> int:
        return self.total - len(self.deleted)


@dataclass
class _Export:
    id: str
    entity_type: str
    created: float
    fail: bool = False
    size_lie: bool = False
    stay_pending: bool = False
    status: str = "Pending"
    expires_at: float | None = None
    parts: list[tuple[Path, int]] = field(default_factory=list)  # (file, announced size)
    writer: threading.Thread | None = None


@dataclass(frozen=True)
class Mutation:
    """Ids touched by :meth:`State.mutate`, so tests can check the next snapshot."""

    updated: tuple[str, ...]
    deleted: tuple[str, ...]
    added: tuple[str, ...]


class State:
    """The simulated Mews account: data, exports, switches and counters (thread-safe)."""

    def __init__(
        self,
        *,
        seed: int = 7,
        counts: Mapping[str, int] | None = None,
        default_count: int = 50,
        data_dir: str | Path | None = None,
        client_token: str = DEFAULT_CLIENT_TOKEN,
        access_token: str = DEFAULT_ACCESS_TOKEN,
        pending_seconds: float = 0.1,
        processing_seconds: float = 0.1,
        parts: int = 3,
        max_records_per_part: int | None = None,
        link_ttl_seconds: float = 3600.0,
        write_wait_seconds: float = 5.0,
    ) -> None:
        unknown = set(counts or {}) - set(ENTITY_TYPES)
        if unknown:
            raise ValueError(f"unknown Mews entity types: {sorted(unknown)}")
        self.seed = seed
        self.client_token = client_token
        self.access_token = access_token
        self.pending_seconds = pending_seconds
        self.processing_seconds = processing_seconds
        self.parts = parts
        self.max_records_per_part = max_records_per_part
        self.link_ttl_seconds = link_ttl_seconds
        # How long one API call waits for a due snapshot to finish writing before answering
        # "Processing": long enough that small exports succeed on the first due poll.
        self.write_wait_seconds = write_wait_seconds
        self.fail_next: set[str] = set()
        self.size_lie_next = False
        self.add_calls = 0
        self.getall_calls = 0
        self.downloads = 0
        self.pools = _Pools.from_seed(seed)
        self.enterprise_ids = list(self.pools.enterprise_ids)
        self.chain_ids = [self.pools.chain_id]
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="mews-sandbox-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._collections = {
            t: _Collection(total=(counts or {}).get(t, default_count)) for t in ENTITY_TYPES
        }
        self._exports: dict[str, _Export] = {}

    # -- data --------------------------------------------------------------------------------

    def record(self, entity_type: str, index: int, version: int = 0) -> dict[str, Any]:
        """Record number ``index`` of a type, as of update ``version`` (0 = as generated)."""
        rng = random.Random(f"{self.seed}:{entity_type}:{index}")
        record = _GENERATORS[entity_type](rng, self.pools)
        if version:
            # An update keeps Id and shape (columns stay stable) and changes a few values.
            record["UpdatedUtc"] = _iso(_UPDATE_EPOCH + version * 3600 + index % 3600)
            record["Notes"] = f"Revision {version} \u2013 geändert"
        return record

    def _iter_snapshot(self, snap: _Snapshot) -> Iterator[dict[str, Any]]:
        for index in range(snap.total):
            if index not in snap.deleted:
                yield self.record(snap.entity_type, index, snap.versions.get(index, 0))

    def _snapshot(self, entity_type: str) -> _Snapshot:
        with self._lock:
            c = self._collections[entity_type]
            return _Snapshot(entity_type, c.total, frozenset(c.deleted), dict(c.versions))

    def records(self, entity_type: str) -> Iterator[dict[str, Any]]:
        """The current records of a type (lazily; what the next export will contain)."""
        return self._iter_snapshot(self._snapshot(entity_type))

    def count(self, entity_type: str) -> int:
        with self._lock:
            return self._collections[entity_type].live

    def mutate(
        self, entity_type: str, *, updated: int = 0, deleted: int = 0, added: int = 0
    ) -> Mutation:
        """Update, delete and add records (deterministically chosen); returns their Ids."""
        with self._lock:
            c = self._collections[entity_type]
            if updated + deleted > c.live:
                raise ValueError(f"only {c.live} {entity_type} records to update/delete")
            rng = random.Random(f"{self.seed}:mutate:{entity_type}:{c.mutations}")
            c.mutations += 1
            if 2 * (updated + deleted) > c.live:
                picked = rng.sample([i for i in range(c.total) if i not in c.deleted],
                                    updated + deleted)  # fmt: skip
            else:
                chosen: dict[int, None] = {}
                while len(chosen) < updated + deleted:
                    i = rng.randrange(c.total)
                    if i not in c.deleted:
                        chosen[i] = None
                picked = list(chosen)
            to_update, to_delete = picked[:updated], picked[updated:]
            for i in to_update:
                c.versions[i] = c.versions.get(i, 0) + 1
            c.deleted.update(to_delete)
            new = range(c.total, c.total + added)
            c.total += added
        return Mutation(
            updated=tuple(self.record(entity_type, i)["Id"] for i in to_update),
            deleted=tuple(self.record(entity_type, i)["Id"] for i in to_delete),
            added=tuple(self.record(entity_type, i)["Id"] for i in new),
        )

    # -- exports -----------------------------------------------------------------------------

    def seed_open_exports(self, n: int, entity_type: str = "Reservation") -> list[str]:
        """Test helper: ``n`` exports that stay Pending forever, bypassing the one-in-flight rule.

        They do block ``exports/add`` for ``entity_type`` afterwards, as a real pending one would.
        """
        now = time.time()
        ids = [str(uuid.uuid4()) for _ in range(n)]
        with self._lock:
            for export_id in ids:
                self._exports[export_id] = _Export(export_id, entity_type, now, stay_pending=True)
        return ids

    def expire(self, export_id: str) -> None:
        """Switch: the export turns Expired now and its files are gone (downloads get 410)."""
        with self._lock:
            export = self._exports[export_id]
            export.status = "Expired"
            export.expires_at = min(export.expires_at or time.time(), time.time())
            self._drop_files(export)

    def drop_last_part(self, export_id: str) -> None:
        """Switch: the export's status lists one part fewer from now on (a file store that
        re-split the export); the dropped part's links answer 404."""
        with self._lock:
            export = self._exports[export_id]
            export.parts = export.parts[:-1]

    def status_of(self, export_id: str) -> str:
        """The Mews status word as the API would report it now (advances the clock logic)."""
        with self._lock:
            export = self._exports[export_id]
            self._advance(export, time.time())
            return export.status

    def close(self) -> None:
        """Delete the files when the State created its own temporary directory."""
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _drop_files(self, export: _Export) -> None:
        shutil.rmtree(self.data_dir / export.id, ignore_errors=True)

    def _advance(self, export: _Export, now: float) -> None:
        """Move ``export`` along its timeline; starts the snapshot writer when it is due."""
        if export.status in ("Failed", "Expired") or export.stay_pending:
            return
        if export.status == "Success":
            if export.expires_at is not None and now > export.expires_at:
                export.status = "Expired"
                self._drop_files(export)
            return
        elapsed = now - export.created
        if elapsed < self.pending_seconds:
            return
        export.status = "Processing"
        if elapsed < self.pending_seconds + self.processing_seconds:
            return
        if export.fail:
            export.status = "Failed"
            return
        if export.writer is None:
            snap = self._snapshot(export.entity_type)
            export.writer = threading.Thread(
                target=self._write, args=(export, snap), daemon=True, name=f"mews-{export.id}"
            )
            export.writer.start()

    def _write(self, export: _Export, snap: _Snapshot) -> None:
        """Stream the snapshot into JSON Lines parts; then the export becomes Success."""
        live = snap.live
        if self.max_records_per_part:
            n_parts = math.ceil(live / self.max_records_per_part)
        else:
            n_parts = min(self.parts, live)
        folder = self.data_dir / export.id
        folder.mkdir(parents=True, exist_ok=True)
        written: list[tuple[Path, int]] = []
        try:
            records = self._iter_snapshot(snap)
            for part in range(n_parts):
                # Parts differ by at most one record.
                size = live * (part + 1) // n_parts - live * part // n_parts
                path = folder / f"{part}.jsonl"
                with path.open("wb", buffering=1 << 20) as out:
                    for _ in range(size):
                        line = json.dumps(next(records), ensure_ascii=False, separators=(",", ":"))
                        out.write(line.encode() + b"\n")
                written.append((path, path.stat().st_size))
        except Exception:
            with self._lock:
                export.status = "Failed"
            raise
        with self._lock:
            if export.status != "Processing":  # expired/failed by a switch meanwhile
                self._drop_files(export)
                return
            if export.size_lie and written:
                path, real = written[0]
                written[0] = (path, real + 5)
            export.parts = written
            export.expires_at = float(math.ceil(time.time() + self.link_ttl_seconds))
            export.status = "Success"

    def _add(self, entity_type: str) -> tuple[_Export | None, str | None]:
        """Create an export, or say which one of the type is still running."""
        with self._lock:
            now = time.time()
            for other in self._exports.values():
                if other.entity_type == entity_type:
                    self._advance(other, now)
                    if other.status in ("Pending", "Processing"):
                        return None, other.id
            export = _Export(str(uuid.uuid4()), entity_type, now)
            if entity_type in self.fail_next:
                self.fail_next.discard(entity_type)
                export.fail = True
            if self.size_lie_next:
                self.size_lie_next = False
                export.size_lie = True
            self._exports[export.id] = export
            return export, None

    def _lookup(self, export_ids: list[str]) -> tuple[list[_Export], list[threading.Thread]]:
        with self._lock:
            now = time.time()
            found = [self._exports[i] for i in export_ids if i in self._exports]
            for export in found:
                self._advance(export, now)
            busy = [
                e.writer
                for e in found
                if e.status == "Processing" and e.writer is not None and e.writer.is_alive()
            ]
            return found, busy

    def _render(self, export: _Export, base_url: str, *, scope: bool) -> dict[str, Any]:
        with self._lock:
            body: dict[str, Any] = {
                "Id": export.id,
                "Status": export.status,
                "EntityType": export.entity_type,
                "Files": [],
                "ExpiresUtc": _iso_ms(export.expires_at) if export.expires_at else None,
            }
            if export.status == "Success":
                assert export.expires_at is not None
                body["Files"] = [
                    {
                        "Url": base_url
                        + sign_path(f"/files/{export.id}/{part}.jsonl", export.expires_at),
                        "SizeInBytes": announced,
                    }
                    for part, (_, announced) in enumerate(export.parts)
                ]
            if scope:
                body["Scope"] = {"EnterpriseIds": self.enterprise_ids, "ChainIds": self.chain_ids}
            return body

    def _file(self, export_id: str, part: int) -> tuple[Path | None, int]:
        """(path, HTTP status) of a part: 404 unknown, 410 expired, 200 ok."""
        with self._lock:
            export = self._exports.get(export_id)
            if export is None:
                return None, 404
            self._advance(export, time.time())
            if export.status == "Expired":
                return None, 410
            if export.status != "Success" or not 0 <= part < len(export.parts):
                return None, 404
            self.downloads += 1
            return export.parts[part][0], 200


def _error(status: int, message: str) -> JSONResponse:
    """Mews error shape."""
    return JSONResponse({"Message": message, "RequestId": str(uuid.uuid4())}, status_code=status)


def create_app(state: State) -> Starlette:
    """The Mews Connector export endpoints and the file host, backed by ``state``."""

    async def body_of(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        try:
            body = await request.json()
        except ValueError:
            return None, _error(400, "Invalid JSON in request body.")
        if not isinstance(body, dict):
            return None, _error(400, "Request body must be a JSON object.")
        if body.get("ClientToken") != state.client_token:
            return None, _error(401, "Invalid ClientToken.")
        if body.get("AccessToken") != state.access_token:
            return None, _error(401, "Invalid AccessToken.")
        if not isinstance(body.get("Client"), str) or not body["Client"]:
            return None, _error(400, "Missing Client.")
        return body, None

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    async def add(request: Request) -> Response:
        with state._lock:
            state.add_calls += 1
        body, problem = await body_of(request)
        if problem:
            return problem
        assert body is not None
        entity_type = body.get("EntityType")
        if entity_type not in ENTITY_TYPES:
            return _error(400, f"Invalid EntityType {entity_type!r}.")
        export, _running = state._add(entity_type)
        if export is None:
            return _error(
                400,
                f"An export of entity type {entity_type} is already pending or processing.",
            )
        return JSONResponse({"Export": state._render(export, base(request), scope=False)})

    async def get_all(request: Request) -> Response:
        with state._lock:
            state.getall_calls += 1
        body, problem = await body_of(request)
        if problem:
            return problem
        assert body is not None
        ids = body.get("ExportIds")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return _error(400, "ExportIds must be an array of strings.")
        if len(ids) > MAX_EXPORT_IDS:
            return _error(400, f"ExportIds: at most {MAX_EXPORT_IDS} items are allowed.")
        found, busy = state._lookup(ids)
        if busy:
            deadline = time.monotonic() + state.write_wait_seconds
            for writer in busy:
                remaining = max(0.0, deadline - time.monotonic())
                await anyio.to_thread.run_sync(writer.join, remaining)
            found, _ = state._lookup(ids)
        return JSONResponse(
            {"Exports": [state._render(e, base(request), scope=True) for e in found]}
        )

    async def download(request: Request) -> Response:
        export_id = request.path_params["export_id"]
        part = request.path_params["part"]
        reason = check_signature(
            f"/files/{export_id}/{part}.jsonl",
            request.query_params.get("expires"),
            request.query_params.get("signature"),
        )
        if reason:
            return _error(403, f"Download link {reason}.")
        path, status = state._file(export_id, part)
        if status == 410:
            return _error(410, "The export has expired.")
        if path is None:
            return _error(404, "File not found.")
        return FileResponse(path, media_type="application/x-ndjson")

    return Starlette(
        routes=[
            Route("/api/connector/v1/exports/add", add, methods=["POST"]),
            Route("/api/connector/v1/exports/getAll", get_all, methods=["POST"]),
            Route("/files/{export_id}/{part:int}.jsonl", download, methods=["GET", "HEAD"]),
        ]
    )
