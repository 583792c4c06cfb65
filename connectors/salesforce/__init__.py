"""Salesforce: SOQL change polling and sObject Collections writes, plus its loopback emulator."""

from __future__ import annotations

from connectors.salesforce.client import ApiBudget, SalesforceConnector
from connectors.salesforce.source import SfObject, soql_quote

__all__ = ["ApiBudget", "SalesforceConnector", "SfObject", "soql_quote"]
