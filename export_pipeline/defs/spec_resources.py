"""The one resource class for providers run from a spec (``providers/http_engine.py``).

Each spec gets a subclass (``SpecApiResource.for_provider``) that carries the provider class as
class data; the fields are only what a user sets: the origins when they are not the production
ones (a sandbox), and optionally the secret.

The secret is read from the variable the spec names (``auth.token_env``) when a run or sensor
builds the client, not through a ``dg.EnvVar`` field: Dagster resolves the EnvVars of *every*
resource of the Definitions for every run, so an EnvVar here would make each job of every other
provider fail while, say, ``STRIPE_API_KEY`` is unset. Read lazily, only a run that talks to
Stripe needs it, and a missing key fails that run naming the variable. It is never part of the
resource config, so never shown in the UI or logged.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import ClassVar

from pydantic import Field

from export_pipeline.core.http import RetryPolicy
from export_pipeline.defs.resources import ProviderResource
from export_pipeline.providers.base import ExportProvider
from export_pipeline.providers.http_engine import SpecProvider


class SpecApiResource(ProviderResource):
    """An export API described by a spec. Use ``SpecApiResource.for_provider(cls)``."""

    provider_class: ClassVar[type[SpecProvider]]

    token: str | None = Field(
        None,
        description="Secret key or token; default: the spec's auth.token_env variable, read when "
        "a run builds the client. Pass a dg.EnvVar only if every run has it set.",
    )
    base_url: str | None = Field(None, description="API origin; default: the spec's base_url.")
    files_base_url: str | None = Field(
        None, description="Origin of files that need the credentials; default: the spec's."
    )

    def build(self, retry: RetryPolicy | None = None) -> ExportProvider:
        auth = self.provider_class.spec.auth
        token = self.token or os.environ.get(auth.token_env, "")
        # style=body (Mews): each body field's value from its own variable, read the same way.
        body = {field: os.environ.get(env, "") for field, env in auth.body_fields.items()}
        return self.provider_class.from_settings(
            token=token,
            body_credentials=body,
            base_url=self.base_url,
            files_base_url=self.files_base_url,
            timeout=self.timeout_seconds,
            retry=retry,
        )

    @classmethod
    def for_provider(cls, provider_class: type[SpecProvider]) -> type[SpecApiResource]:
        name = f"{provider_class.spec.name.title().replace('_', '')}ApiResource"
        return type(name, (cls,), {"provider_class": provider_class, "__module__": __name__})


def spec_resources(providers: Iterable[type[ExportProvider]]) -> dict[str, SpecApiResource]:
    """``<name>_api`` for every spec-run provider (secrets read lazily, see above)."""
    return {
        f"{cls.name}_api": SpecApiResource.for_provider(cls)()
        for cls in providers
        if issubclass(cls, SpecProvider)
    }
