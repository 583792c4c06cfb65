"""The vendor emulators by name, for ``syncagent sandbox`` and the demo."""

from __future__ import annotations

import importlib

from connectors.emulator import EmulatorApp

EMULATORS = {
    "salesforce": ("connectors.salesforce.emulator", "SalesforceEmulator"),
    "hubspot": ("connectors.hubspot.emulator", "HubSpotEmulator"),
    "dynamics": ("connectors.dynamics.emulator", "DynamicsEmulator"),
    "netsuite": ("connectors.netsuite.emulator", "NetSuiteEmulator"),
}


def make_emulator(vendor: str) -> EmulatorApp:
    """A fresh, empty emulator of ``vendor``'s API."""
    module, cls = EMULATORS[vendor]
    app = getattr(importlib.import_module(module), cls)()
    assert isinstance(app, EmulatorApp)
    return app
