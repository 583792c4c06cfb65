"""HubSpot CRM connector (v3 search/list/batch, v4 associations) and its emulator."""

from __future__ import annotations

from connectors.hubspot.api import HsObject, HubSpotApi, HubSpotOAuth
from connectors.hubspot.client import HubSpotConnector
from connectors.hubspot.emulator import HubSpotEmulator

__all__ = ["HsObject", "HubSpotApi", "HubSpotConnector", "HubSpotEmulator", "HubSpotOAuth"]
