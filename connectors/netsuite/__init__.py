"""NetSuite: SuiteQL change capture, REST record writes, M2M auth, and a loopback emulator."""

from __future__ import annotations

from connectors.netsuite.client import NetSuiteConnector, NetSuiteM2M, NsDeletes, NsRecord, standard_records

__all__ = ["NetSuiteConnector", "NetSuiteM2M", "NsDeletes", "NsRecord", "standard_records"]
