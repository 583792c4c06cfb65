"""Dynamics 365 / Dataverse: the connector and its emulator."""
