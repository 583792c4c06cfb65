"""Sync benchmark: both directions through the agent against the Salesforce emulator."""
