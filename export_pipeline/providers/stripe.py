"""Stripe Reporting API report runs: the provider is its spec, ``stripe.yaml`` beside this file.

``POST /v1/reporting/report_runs`` (form-encoded report_type, parameters[interval_start|end] in
Unix seconds) -> a ``reporting.report_run`` pending | succeeded | failed, whose ``result`` File
has a ``url`` on files.stripe.com that needs the same secret key. Windows end at the report
type's ``data_available_end``; the cursor is the run's own ``parameters.interval_end``.
"""

from pathlib import Path

from export_pipeline.providers.http_engine import SpecProvider
from export_pipeline.providers.spec import load_spec

SPEC = load_spec(Path(__file__).with_name("stripe.yaml"))
StripeProvider = SpecProvider.for_spec(SPEC, "StripeProvider")
