"""Asset checks per export kind, built from the same list as the assets."""

from collections.abc import Callable

import dagster as dg

from export_pipeline.core import checks
from export_pipeline.core.model import ExportKind, LoadMode
from export_pipeline.defs.assets import asset_key


def _check(
    kind: ExportKind,
    name: str,
    description: str,
    evaluate: Callable[..., checks.CheckOutcome],
    *,
    blocking: bool = True,
    severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR,
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset_key(kind),
        name=name,
        description=description,
        blocking=blocking,
        required_resource_keys={"warehouse"},
    )
    def _fn(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        ledger = context.resources.warehouse.ledger()
        with ledger.warehouse.connect() as con:
            if not checks.table_exists(con, kind):
                return dg.AssetCheckResult(
                    passed=True, description="table not created yet", severity=severity
                )
            outcome = evaluate(con, ledger)
        return dg.AssetCheckResult(
            passed=outcome.passed,
            description=outcome.description,
            metadata=outcome.metadata,
            severity=severity,
        )

    return _fn


def build_checks(kind: ExportKind) -> list[dg.AssetChecksDefinition]:
    def _last_loaded(con, ledger):
        # The latest loaded export of the kind, any partition.
        row = con.execute(
            "SELECT partition_key FROM pipeline.exports WHERE provider = ? AND kind = ? "
            "AND state = 'loaded' ORDER BY loaded_at DESC LIMIT 1",
            [kind.provider, kind.name],
        ).fetchone()
        record = ledger.last_loaded(kind.provider, kind.name, row[0]) if row else None
        return checks.rows_match_provider(con, kind, record)

    defs = [
        _check(
            kind,
            "rows_match_provider",
            "Rows and bytes of the last loaded export equal what the provider announced.",
            _last_loaded,
        ),
        _check(
            kind,
            "primary_key_unique",
            f"({', '.join(kind.primary_key)}) is unique and never NULL.",
            lambda con, _ledger: checks.primary_key_unique(con, kind),
        ),
    ]
    if kind.value_ranges:
        defs.append(
            _check(
                kind,
                "values_in_range",
                "Bounded columns stay within their documented range.",
                lambda con, _ledger: checks.values_in_range(con, kind),
            )
        )
    if kind.load_mode is LoadMode.REPLACE_PARTITION:
        defs.append(
            _check(
                kind,
                "partitions_have_rows",
                "Flags partitions whose latest export brought zero rows.",
                lambda con, _ledger: checks.empty_partitions(con, kind),
                blocking=False,
                severity=dg.AssetCheckSeverity.WARN,
            )
        )
    return defs
