"""The one resource class of every provider: its settings come from the provider's spec.

Each provider gets a subclass (``SpecApiResource.for_provider``) that carries the provider class
as class data; the fields are what a user sets: the origins when they are not the production ones
(a sandbox), the secrets, and the few settings a provider module adds (mapping's
``download_path``). ``SpecApiResource.from_env(cls)`` is the resource the project's Definitions
use: every setting the spec names a variable for (``base_url_env``, ``auth.token_env``,
``auth.body_fields``) as a ``dg.EnvVar``, so secrets are read when a run or tick starts, never
at import, and never shown in the UI. The optional origins of ``origin_env`` are read when the
provider is built.

Dagster builds only the resources a run's assets (or a sensor, a schedule) require, and resolves
only their EnvVars: a Stripe-only run needs ``STRIPE_API_KEY`` and none of the other providers'
variables (``export_pipeline_tests/dagster/test_resources.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, ClassVar

import dagster as dg
from pydantic import Field

from export_pipeline.core.http import RetryPolicy
from export_pipeline.defs.resources import ProviderResource
from export_pipeline.providers.base import ExportProvider
from export_pipeline.providers.http_engine import SpecProvider


class SpecApiResource(ProviderResource):
    """An export API described by a spec. Use ``SpecApiResource.for_provider(cls)``."""

    provider_class: ClassVar[type[SpecProvider]]

    base_url: str | None = Field(None, description="API origin; default: the spec's base_url.")
    files_base_url: str | None = Field(
        None, description="Origin of files that need the credentials; default: the spec's."
    )
    token: str | None = Field(
        None, description="Token or secret key (pass dg.EnvVar of the spec's auth.token_env)."
    )
    body_credentials: dict[str, str] = Field(
        default_factory=dict,
        description="auth.style body: JSON body field -> value (pass dg.EnvVar values).",
    )
    options: dict[str, str] = Field(
        default_factory=dict,
        description="Settings the provider's module adds to the spec's (mapping: download_path).",
    )

    def build(self, retry: RetryPolicy | None = None) -> ExportProvider:
        # The spec's optional origins (origin_env: a sandbox's, a proxy's), read when a run
        # builds the provider; an origin set on the resource wins, and unset, the spec's own.
        origins = {f: os.environ.get(v) for f, v in self.provider_class.spec.origin_env.items()}
        return self.provider_class.from_settings(
            token=self.token or "",
            body_credentials=self.body_credentials,
            base_url=self.base_url or origins.get("base_url"),
            files_base_url=self.files_base_url or origins.get("files_base_url"),
            timeout=self.timeout_seconds,
            retry=retry,
            **self.options,
        )

    @classmethod
    def for_provider(cls, provider_class: type[SpecProvider]) -> type[SpecApiResource]:
        name = f"{provider_class.spec.name.title().replace('_', '')}ApiResource"
        return type(name, (cls,), {"provider_class": provider_class, "__module__": __name__})

    @classmethod
    def from_env(cls, provider_class: type[SpecProvider], **fields: Any) -> SpecApiResource:
        """The resource with every variable the spec names as a ``dg.EnvVar`` (``fields``
        override, e.g. ``base_url`` for a component pointed at a simulator)."""
        spec = provider_class.spec
        auth = spec.auth
        settings: dict[str, Any] = {}
        if spec.base_url_env:
            settings["base_url"] = dg.EnvVar(spec.base_url_env)
        if auth.style == "body":
            settings["body_credentials"] = {f: dg.EnvVar(e) for f, e in auth.body_fields.items()}
        else:
            settings["token"] = dg.EnvVar(auth.token_env)
        settings.update({k: v for k, v in fields.items() if v is not None})
        return cls.for_provider(provider_class)(**settings)


def spec_resources(providers: Iterable[type[ExportProvider]]) -> dict[str, SpecApiResource]:
    """``<name>_api`` for every provider, its variables as ``dg.EnvVar``s."""
    return {
        f"{cls.name}_api": SpecApiResource.from_env(cls)
        for cls in providers
        if issubclass(cls, SpecProvider)
    }


def environment_variables(resource: dg.ConfigurableResource) -> set[str]:
    """Every ``dg.EnvVar`` a resource's settings name (what a deployment must set)."""
    found: set[str] = set()
    for value in vars(resource).values():
        values = value.values() if isinstance(value, dict) else [value]
        found |= {v.env_var_name for v in values if isinstance(v, dg.EnvVar)}
    return found
