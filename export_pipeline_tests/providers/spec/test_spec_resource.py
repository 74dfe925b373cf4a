"""The one Dagster resource class of every provider: the variables its spec names become
``dg.EnvVar``s (body credentials included, Mews' style), resolved by Dagster when the resource
is built, never read at import."""

from __future__ import annotations

import dagster as dg
import pytest

from export_pipeline.core.errors import ConfigurationError
from export_pipeline.defs.spec_resources import SpecApiResource, environment_variables
from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.spec import ExportApiSpec
from export_pipeline_tests.providers.spec.test_spec import spec_dict

BODY_AUTH = {
    "style": "body",
    "token_env": "ACME_ACCESS_TOKEN",
    "body_fields": {"ClientToken": "ACME_CLIENT_TOKEN", "AccessToken": "ACME_ACCESS_TOKEN"},
}


def test_body_credentials_come_from_the_named_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = SpecProvider.for_spec(
        ExportApiSpec.model_validate(spec_dict(auth=BODY_AUTH, base_url_env="ACME_URL"))
    )
    resource = SpecApiResource.from_env(cls)
    assert environment_variables(resource) == {"ACME_URL", "ACME_CLIENT_TOKEN", "ACME_ACCESS_TOKEN"}
    monkeypatch.setenv("ACME_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("ACME_ACCESS_TOKEN", "at")
    monkeypatch.setenv("ACME_CLIENT_TOKEN", "")
    with (
        dg.build_resources({"api": resource}) as built,
        pytest.raises(ConfigurationError, match="set ACME_CLIENT_TOKEN"),
    ):
        built.api.build()
    monkeypatch.setenv("ACME_CLIENT_TOKEN", "ct")
    with dg.build_resources({"api": resource}) as built:
        provider = built.api.build()
    assert provider.body_credentials == {"ClientToken": "ct", "AccessToken": "at"}
    assert provider.api.auth_headers == {}  # nothing in headers for style=body
    assert provider.api.base_url == "http://127.0.0.1:9"
    provider.close()


def test_an_unset_variable_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cls = SpecProvider.for_spec(ExportApiSpec.model_validate(spec_dict()))
    resource = SpecApiResource.from_env(cls, base_url="http://127.0.0.1:9")
    token_env = cls.spec.auth.token_env
    monkeypatch.delenv(token_env, raising=False)
    with pytest.raises(Exception, match=token_env), dg.build_resources({"api": resource}):
        pass
