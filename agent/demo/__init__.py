"""The bundled demo: a small professional-services ERP schema and its sample data."""

from __future__ import annotations

from importlib.resources import files


def erp_schema_sql() -> str:
    """The demo ERP's DDL (schema ``erp``): customers, contracts, projects and billing tables."""
    return files(__package__).joinpath("erp_schema.sql").read_text()


__all__ = ["erp_schema_sql"]
