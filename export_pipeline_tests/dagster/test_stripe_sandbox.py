"""Stripe in the sandbox bundle (what ``export-pipeline dev`` starts): the project's own
Definitions, pointed at the Stripe simulator by the spec's optional origin variables, load the
report through the real ``stripe_sync`` job; without those variables the resource keeps
Stripe's production origins."""

from __future__ import annotations

import dagster as dg
import duckdb
import pytest

from export_pipeline.defs.spec_resources import SpecApiResource, environment_variables
from export_pipeline.providers.stripe import StripeProvider
from export_pipeline.sandbox.bundle import fixed_ports
from export_pipeline_tests.dagster.conftest import DagsterSetup


@pytest.fixture
def simulators() -> tuple[str, ...]:
    return ("stripe",)


def test_the_sandbox_points_the_projects_stripe_at_its_simulator(
    dagster_setup: DagsterSetup,
) -> None:
    setup = dagster_setup
    state = setup.sandbox.stripe
    env = setup.sandbox.env()
    # Both hosts, and the simulator's key: a real key in the shell never reaches `dev`.
    assert env["STRIPE_API_URL"] == setup.sandbox.urls["stripe"]
    assert env["STRIPE_FILES_URL"] == setup.sandbox.files_urls["stripe"] == state.files_base_url
    assert env["STRIPE_API_KEY"] == state.token
    assert set(setup.sandbox.allowed_download_hosts().split(",")) >= {
        env["STRIPE_API_URL"].removeprefix("http://"),
        env["STRIPE_FILES_URL"].removeprefix("http://"),
    }

    result = setup.job("stripe_sync").execute_in_process(
        instance=setup.instance, resources=setup.for_provider("stripe"), raise_on_error=False
    )
    assert result.success, [e.message for e in result.all_events if e.is_failure]

    with duckdb.connect(str(setup.warehouse_path), read_only=True) as con:
        rows = con.execute(
            "SELECT balance_transaction_id FROM stripe.balance_change_from_activity"
        ).fetchall()
    ids = {r[0] for r in rows}
    # The first window is all the data Stripe has made available.
    expected = {row[0] for row in state.rows_between(state.created_at(0), state.data_available_end)}
    assert ids == expected and len(ids) == state.available
    paths = [path for _method, path, _auth in state.calls]
    assert any(p.startswith("/v1/reporting/report_runs") for p in paths)
    assert any(p.startswith("/v1/files/") for p in paths)  # the report came from the file host
    assert {auth for *_rest, auth in state.calls} == {f"Bearer {state.token}"}


def test_without_the_origin_variables_stripe_keeps_its_production_origins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def origins(resource: SpecApiResource) -> tuple[str, str | None]:
        with dg.build_resources({"api": resource}) as built:  # as a run builds it
            provider = built.api.build()
        try:
            return provider.api.base_url, provider.files_base_url  # type: ignore[attr-defined]
        finally:
            provider.close()

    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_x")
    for variable in ("STRIPE_API_URL", "STRIPE_FILES_URL"):
        monkeypatch.delenv(variable, raising=False)
    resource = SpecApiResource.from_env(StripeProvider)
    assert origins(resource) == ("https://api.stripe.com", "https://files.stripe.com")
    # What a deployment must set: the key only.
    assert environment_variables(resource) == {"STRIPE_API_KEY"}

    # Read when the provider is built (a run), not when the definitions load.
    monkeypatch.setenv("STRIPE_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("STRIPE_FILES_URL", "http://127.0.0.1:10")
    assert origins(resource) == ("http://127.0.0.1:9", "http://127.0.0.1:10")
    # An origin set on the resource (a component's attribute) wins.
    explicit = SpecApiResource.from_env(StripeProvider, base_url="http://127.0.0.1:11")
    assert origins(explicit) == ("http://127.0.0.1:11", "http://127.0.0.1:10")


def test_sandbox_serve_has_fixed_ports_for_both_stripe_hosts() -> None:
    ports = fixed_ports()
    assert ports["stripe"] == StripeProvider.sandbox.port  # type: ignore[union-attr]
    assert ports["stripe_files"] == StripeProvider.sandbox.files_port  # type: ignore[union-attr]
    assert len(set(ports.values())) == len(ports)
