"""Connectors: one subpackage per external system, registered explicitly by config type.

``REGISTRY`` maps a config ``type`` to the connector's class(es): ``(source, sink)`` for
systems whose capture and writes are separate objects, or one class that is both.
"""

from __future__ import annotations

from connectors.base import Resync, Sink, Source
from connectors.dynamics import DynamicsConnector
from connectors.hubspot import HubSpotConnector
from connectors.netsuite import NetSuiteConnector
from connectors.postgres import PostgresSource
from connectors.postgres.sink import PostgresSink
from connectors.salesforce import SalesforceConnector

REGISTRY: dict[str, object] = {
    "postgres": (PostgresSource, PostgresSink),
    "salesforce": SalesforceConnector,
    "hubspot": HubSpotConnector,
    "dynamics": DynamicsConnector,
    "netsuite": NetSuiteConnector,
}

__all__ = ["REGISTRY", "Resync", "Sink", "Source"]
