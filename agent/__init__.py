"""syncagent: keeps a CRM and an ERP in step."""

__version__ = "0.1.0"
__all__ = ["__version__"]
