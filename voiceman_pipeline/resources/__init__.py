"""Dagster resources: memory management, output writing, model engines."""
