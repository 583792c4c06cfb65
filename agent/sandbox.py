"""The vendor emulators by name, for ``syncagent sandbox`` and the demo."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from connectors.emulator import EmulatorApp, EmulatorServer

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


def serve(vendor: str, *, port: int, seed_demo: bool, announce: Callable[[str], None]) -> None:
    """Run ``vendor``'s emulator in the foreground until Ctrl-C."""
    app = make_emulator(vendor)
    if seed_demo:
        app.seed_demo()  # type: ignore[attr-defined]
    server = EmulatorServer(app, port=port)
    announce(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
