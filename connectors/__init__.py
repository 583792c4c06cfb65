"""Connectors: one subpackage per external system, registered explicitly by config type."""

from __future__ import annotations

from connectors.base import Resync, Sink, Source

__all__ = ["Resync", "Sink", "Source"]
