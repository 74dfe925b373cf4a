"""Stripe in the project's own Definitions (registered in providers/registry.py): the generic
resource, the asset factory, and the exports sensor launching the ingest of a ready run."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import duckdb
import pytest

from export_pipeline.core.errors import ConfigurationError
from export_pipeline.core.model import ExportRequest
from export_pipeline.definitions import build_defs, default_resources
from export_pipeline.defs.resources import (
    SyncSettingsResource,
    WarehouseResource,
    WebhookEventsResource,
)
from export_pipeline.defs.spec_resources import SpecApiResource
from export_pipeline.providers.stripe import StripeProvider
from export_pipeline.sandbox.stripe import StripeSandbox

KEY = dg.AssetKey(["stripe", "balance_change_from_activity"])
OTHER_PROVIDERS_ENV = (
    "LOCATIONS_API_URL",
    "LOCATIONS_API_TOKEN",
    "MEWS_PLATFORM_ADDRESS",
    "MEWS_CLIENT_TOKEN",
    "MEWS_ACCESS_TOKEN",
    "DELIVERIES_API_URL",
    "DELIVERIES_API_KEY",
    "MAPPING_API_URL",
    "MAPPING_API_TOKEN",
)


def _resources(sandbox: StripeSandbox, tmp_path: Path) -> dict[str, object]:
    resources = default_resources()
    resources |= {
        "warehouse": WarehouseResource(
            path=str(tmp_path / "w.duckdb"), data_dir=str(tmp_path / "data")
        ),
        "sync_settings": SyncSettingsResource(
            poll_initial_seconds=0.05, http_base_delay_seconds=0.01
        ),
        "webhook_events": WebhookEventsResource(path=str(tmp_path / "events.sqlite3")),
        "stripe_api": SpecApiResource.from_env(
            StripeProvider, base_url=sandbox.api_url, files_base_url=sandbox.files_url
        ),
    }
    return resources


def test_the_default_resource_reads_the_key_named_by_the_spec(
    stripe_sandbox: StripeSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    resource = default_resources()["stripe_api"]
    assert isinstance(resource, SpecApiResource) and resource.provider_class is StripeProvider
    # The secret is a reference to the variable, never its value.
    assert isinstance(resource.token, dg.EnvVar) and resource.token.env_var_name == "STRIPE_API_KEY"
    monkeypatch.setenv("STRIPE_API_KEY", "")
    with (
        dg.build_resources({"stripe_api": resource}) as built,
        pytest.raises(ConfigurationError, match="set STRIPE_API_KEY"),
    ):
        built.stripe_api.build()
    monkeypatch.setenv("STRIPE_API_KEY", stripe_sandbox.state.token)
    sandboxed = SpecApiResource.from_env(
        StripeProvider, base_url=stripe_sandbox.api_url, files_base_url=stripe_sandbox.files_url
    )
    with dg.build_resources({"stripe_api": sandboxed}) as built:
        provider = built.stripe_api.build()
    assert provider.api.auth_headers == {"authorization": f"Bearer {stripe_sandbox.state.token}"}
    provider.close()


def test_materialize_then_the_sensor_ingests_a_run_requested_elsewhere(
    stripe_sandbox: StripeSandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Stripe-only run and tick need Stripe's variables and none of the other providers':
    # Dagster builds (and resolves the EnvVars of) only the resources they require.
    for name in OTHER_PROVIDERS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STRIPE_API_KEY", stripe_sandbox.state.token)
    resources = _resources(stripe_sandbox, tmp_path)
    defs = build_defs(resources)
    with dg.instance_for_test() as instance:
        job = defs.resolve_job_def("stripe_sync")
        result = job.execute_in_process(instance=instance)
        assert result.success
        (mat,) = result.asset_materializations_for_node("stripe__balance_change_from_activity")
        assert mat.metadata["rows"].value == 300

        # A run started by another process (or a webhook): the sensor confirms it with Stripe
        # and launches exactly one ingest for it.
        stripe_sandbox.state.make_available(40)
        warehouse = resources["warehouse"]
        with dg.build_resources({"stripe_api": resources["stripe_api"]}) as built:
            provider = built.stripe_api.build()
        kind = provider.kind("balance_change_from_activity")
        from export_pipeline.core.ingest import ExportRunner

        runner = ExportRunner(provider, warehouse.ledger(), warehouse.storage_backend())
        record, _ = runner.start(kind, ExportRequest(), source="elsewhere")
        provider.close()
        sensor = defs.resolve_sensor_def("stripe_exports_sensor")
        # As Dagster's code server evaluates a tick: with the sensor's required resources only.
        required = {k: resources[k] for k in sensor.required_resource_keys}
        tick = sensor.evaluate_tick(
            dg.build_sensor_context(instance=instance, resources=required, definitions=defs)
        )
        (request,) = tick.run_requests
        assert request.run_key == f"stripe:{record.export_id}"
        again = job.execute_in_process(instance=instance, run_config=request.run_config)
        assert again.success
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as con:
        assert con.execute(
            "SELECT count(*) FROM stripe.balance_change_from_activity"
        ).fetchone() == (340,)
        states = con.execute("SELECT state FROM pipeline.exports ORDER BY requested_at").fetchall()
    assert states == [("loaded",), ("loaded",)]
