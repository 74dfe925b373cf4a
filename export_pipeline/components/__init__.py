"""Dagster Components of export_pipeline (the ``dagster_dg_cli.registry_modules`` entry point)."""

from export_pipeline.components.export_api import ExportApiComponent

__all__ = ["ExportApiComponent"]
