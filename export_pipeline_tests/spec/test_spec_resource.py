"""The one Dagster resource class of spec-run providers: secrets read lazily from the variables
the spec names, body credentials included (Mews' style)."""

from __future__ import annotations

import pytest

from export_pipeline.core.errors import ConfigurationError
from export_pipeline.defs.spec_resources import SpecApiResource
from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.spec import ExportApiSpec
from export_pipeline_tests.spec.test_spec import spec_dict

BODY_AUTH = {
    "style": "body",
    "token_env": "ACME_ACCESS_TOKEN",
    "body_fields": {"ClientToken": "ACME_CLIENT_TOKEN", "AccessToken": "ACME_ACCESS_TOKEN"},
}


def test_body_credentials_come_from_the_named_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = SpecProvider.for_spec(ExportApiSpec.model_validate(spec_dict(auth=BODY_AUTH)))
    resource = SpecApiResource.for_provider(cls)(base_url="http://127.0.0.1:9")
    monkeypatch.setenv("ACME_ACCESS_TOKEN", "at")
    monkeypatch.delenv("ACME_CLIENT_TOKEN", raising=False)
    with pytest.raises(ConfigurationError, match="set ACME_CLIENT_TOKEN"):
        resource.build()
    monkeypatch.setenv("ACME_CLIENT_TOKEN", "ct")
    provider = resource.build()
    assert provider.body_credentials == {"ClientToken": "ct", "AccessToken": "at"}
    assert provider.api.auth_headers == {}  # nothing in headers for style=body
    provider.close()
