"""Dynamics 365 / Dataverse: ``DynamicsConnector`` (Source, Sink, Resync) and its emulator."""

from __future__ import annotations

from connectors.dynamics.client import DynamicsConnector
from connectors.dynamics.emulator import DynamicsEmulator
from connectors.dynamics.emulator_store import TableSpec
from connectors.dynamics.session import DvTable

__all__ = ["DvTable", "DynamicsConnector", "DynamicsEmulator", "TableSpec"]
