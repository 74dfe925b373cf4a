"""Asset checks per export kind, built from the same list as the assets.

The data checks are not part of the sync runs. A sync run that fails for one kind is a failed
run, and Dagster shows every check *planned* in a failed run as "Execution failed", even the
checks of kinds that loaded fine. So each check runs in its own run, started by
``data_checks_sensor`` (an automation condition sensor, on by default) once its asset has
materialized: a kind whose load failed keeps its last evaluation (of the data still in its
table), and the other kinds' checks evaluate and turn red only for their own data.

A manual Materialize still plans the asset's checks in its run (Dagster's UI does): when that
load fails, the asset step evaluates them on the unchanged table (``judge_planned_checks``).

``blocking`` keeps its Dagster meaning: in a run that includes the check (Execute from the UI,
or a manual Materialize, which plans the asset's checks too), assets downstream of the
checked asset wait for it and do not run when it fails; an automated downstream asset can wait
for it across runs with ``AutomationCondition.all_deps_blocking_checks_passed()``.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from export_pipeline.core import checks
from export_pipeline.core.errors import WarehouseBusyError
from export_pipeline.core.model import ExportKind, LoadMode
from export_pipeline.defs.assets import asset_key

# A check waits this long for another process's load, then reports itself skipped.
CHECK_LOCK_TIMEOUT = 60.0

# Run a check after each materialization of its asset, once: Dagster's `eager()` condition
# (its recommendation for checks) without "no dependency missing", which for a check on a
# partitioned asset (mapping jobs) would wait for every registered partition. A failed load is
# no materialization: nothing is requested, and the check keeps its last evaluation.
CHECK_AUTOMATION = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("after each materialization")
DATA_CHECKS_SENSOR = "data_checks_sensor"


def skipped(reason: str, severity: dg.AssetCheckSeverity) -> dg.AssetCheckResult:
    """A check that could not look at data: not a failure (it would turn the asset red for a
    reason that says nothing about the data). Shown as passed with ``skipped`` = the reason."""
    return dg.AssetCheckResult(
        passed=True,
        description=f"skipped: {reason}",
        metadata={"skipped": reason},
        severity=severity,
    )


@dataclass(frozen=True)
class DataCheck:
    """One data check of a kind: its SQL (``core/checks.py``) and how Dagster shows it."""

    kind: ExportKind
    name: str
    description: str
    evaluate: Callable[..., checks.CheckOutcome]
    blocking: bool = True
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR

    @property
    def key(self) -> dg.AssetCheckKey:
        return dg.AssetCheckKey(asset_key(self.kind), self.name)

    def run(self, warehouse: Any) -> dg.AssetCheckResult:
        """Evaluate on the table as it stands, through the ``warehouse`` resource."""
        ledger = warehouse.ledger(lock_timeout=CHECK_LOCK_TIMEOUT)
        try:
            with ledger.warehouse.connect() as con:
                if not checks.table_exists(con, self.kind):
                    return skipped("the table does not exist yet (nothing loaded)", self.severity)
                outcome = self.evaluate(con, ledger)
        except WarehouseBusyError:
            return skipped("the warehouse was busy with a load; the next run checks", self.severity)
        if outcome.description == "nothing loaded yet":
            return skipped(outcome.description, self.severity)
        return dg.AssetCheckResult(
            passed=outcome.passed,
            description=outcome.description,
            metadata=outcome.metadata,
            severity=self.severity,
        )

    def definition(self) -> dg.AssetChecksDefinition:
        @dg.asset_check(
            asset=asset_key(self.kind),
            name=self.name,
            description=self.description,
            blocking=self.blocking,
            required_resource_keys={"warehouse"},
            automation_condition=CHECK_AUTOMATION,
        )
        def _fn(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
            return self.run(context.resources.warehouse)

        return _fn


def data_checks(kind: ExportKind) -> list[DataCheck]:
    def _last_loaded(con, ledger):
        return checks.rows_match_provider(con, kind, checks.last_loaded_export(con, ledger, kind))

    specs = [
        DataCheck(
            kind,
            "rows_match_provider",
            "Rows and bytes of the last loaded export equal what the provider announced.",
            _last_loaded,
        ),
        DataCheck(
            kind,
            "primary_key_unique",
            f"({', '.join(kind.primary_key)}) is unique and never NULL.",
            lambda con, _ledger: checks.primary_key_unique(con, kind),
        ),
    ]
    if kind.value_ranges:
        specs.append(
            DataCheck(
                kind,
                "values_in_range",
                "Bounded columns stay within their documented range.",
                lambda con, _ledger: checks.values_in_range(con, kind),
            )
        )
    if kind.load_mode is LoadMode.REPLACE_PARTITION:
        specs.append(
            DataCheck(
                kind,
                "partitions_have_rows",
                "Flags partitions whose latest export brought zero rows.",
                lambda con, _ledger: checks.empty_partitions(con, kind),
                blocking=False,
                severity=dg.AssetCheckSeverity.WARN,
            )
        )
    return specs


def build_checks(kind: ExportKind) -> list[dg.AssetChecksDefinition]:
    return [spec.definition() for spec in data_checks(kind)]


def judge_planned_checks(context: dg.AssetExecutionContext, kind: ExportKind) -> None:
    """The kind's load failed in a run that planned its checks (a manual Materialize plans
    them): evaluate them now on the table as it stands (the failed load changed nothing), so
    they show a verdict on the data rather than "Execution failed" (their own steps are
    skipped after a failed asset step, and the run fails)."""
    planned = {
        record.dagster_event.event_specific_data.asset_check_key
        for record in context.instance.all_logs(
            context.run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED
        )
        if record.dagster_event is not None
    }
    for spec in data_checks(kind):
        if spec.key not in planned:
            continue
        try:
            result = spec.run(context.resources.warehouse)
        except Exception as exc:  # never hide the load's own error behind a check's
            context.log.warning(f"{spec.key.to_user_string()}: not evaluated ({exc})")
            continue
        context.log_event(
            dg.AssetCheckEvaluation(
                asset_key=spec.key.asset_key,
                check_name=spec.name,
                passed=result.passed,
                metadata={**result.metadata, "evaluated_after": "the load failed"},
                severity=spec.severity,
                description=result.description,
                blocking=spec.blocking,
            )
        )


def build_checks_sensor(
    checks_: Sequence[dg.AssetChecksDefinition], name: str = DATA_CHECKS_SENSOR
) -> dg.AutomationConditionSensorDefinition:
    """Launches a run of a kind's checks after each materialization of its asset (their
    ``automation_condition``). On by default: it reads the event log, and the runs it starts
    read the warehouse only, never a provider."""
    return dg.AutomationConditionSensorDefinition(
        name,
        target=dg.AssetSelection.checks(*checks_),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Runs each kind's data checks after its asset materializes (never in a "
        "sync run: a failed kind must not turn the other kinds' checks red).",
    )
