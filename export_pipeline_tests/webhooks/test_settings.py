"""ReceiverSettings: credentials from the environment at call time, refused when absent."""

from __future__ import annotations

import pytest

from export_pipeline.core.errors import ConfigurationError
from export_pipeline.webhooks.receiver import SECRET_ENV, TOKEN_ENV, ReceiverSettings
from export_pipeline_tests.webhooks.conftest import SECRET, new_secret


def test_from_env_reads_comma_separated_secrets_and_token() -> None:
    other = new_secret()

    settings = ReceiverSettings.from_env({SECRET_ENV: f"{SECRET}, {other}", TOKEN_ENV: "tok"})

    assert settings.secrets == (SECRET, other)
    assert settings.bearer_token == "tok"
    assert len(settings.keys) == 2


def test_from_env_reads_the_environment_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.setenv(TOKEN_ENV, "first")
    assert ReceiverSettings.from_env().bearer_token == "first"
    monkeypatch.setenv(TOKEN_ENV, "second")
    assert ReceiverSettings.from_env().bearer_token == "second"


@pytest.mark.parametrize("environ", [{}, {SECRET_ENV: " , ", TOKEN_ENV: ""}])
def test_no_credentials_refuses_to_start(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="no credentials") as info:
        ReceiverSettings.from_env(environ)
    assert SECRET_ENV in str(info.value)


def test_invalid_secret_is_refused_at_start_without_echoing_it() -> None:
    with pytest.raises(ConfigurationError, match="base64") as info:
        ReceiverSettings(secrets=("whsec_not*valid*base64",))
    assert "not*valid" not in str(info.value)


def test_repr_hides_credentials() -> None:
    text = repr(ReceiverSettings(secrets=(SECRET,), bearer_token="tok-123"))

    assert SECRET not in text and "tok-123" not in text
