"""Every provider the project ships. Adding an API = one module (a spec run by
``providers/http_engine.py``, see docs/adding-a-provider.md) + one line here."""

from __future__ import annotations

from export_pipeline.providers.base import ExportProvider
from export_pipeline.providers.deliveries import DeliveriesProvider
from export_pipeline.providers.locations import LocationsProvider
from export_pipeline.providers.mapping import MappingProvider
from export_pipeline.providers.mews import MewsProvider
from export_pipeline.providers.stripe import StripeProvider

PROVIDERS: tuple[type[ExportProvider], ...] = (
    LocationsProvider,
    MewsProvider,
    DeliveriesProvider,
    MappingProvider,
    StripeProvider,
)


def provider_class(name: str) -> type[ExportProvider]:
    for cls in PROVIDERS:
        if cls.name == name:
            return cls
    raise KeyError(f"unknown provider {name!r}; known: {', '.join(c.name for c in PROVIDERS)}")
