"""Business workflows run by the resolver: closed-won set-up, billing, change orders, time actuals.

Registration is explicit: ``REGISTRY`` maps each ``[workflows.NAME]`` table to its class,
and ``build_workflows(config)`` makes the enabled ones, in registry order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agent.config import Config
from agent.workflows.base import (
    Workflow,
    WorkflowContext,
    WorkflowInstance,
    WorkflowResult,
    WorkflowSet,
)
from agent.workflows.billing import Billing
from agent.workflows.change_order import ChangeOrder
from agent.workflows.closed_won import ClosedWon
from agent.workflows.options import METRICS, WORKFLOW_OPTIONS
from agent.workflows.time_actuals import TimeActuals

REGISTRY: Mapping[str, Callable[[str, Config, Mapping[str, Any]], Workflow]] = {
    "closed_won": ClosedWon,
    "change_order": ChangeOrder,
    "billing": Billing,
    "time_actuals": TimeActuals,
}


def build_workflows(config: Config) -> WorkflowSet:
    """The workflows the config enables, ready for the resolver."""
    return WorkflowSet(
        [
            make(name, config, config.workflows[name])
            for name, make in REGISTRY.items()
            if name in config.workflows and config.workflows[name].get("enabled", True)
        ]
    )


__all__ = [
    "METRICS",
    "REGISTRY",
    "WORKFLOW_OPTIONS",
    "Billing",
    "ChangeOrder",
    "ClosedWon",
    "TimeActuals",
    "Workflow",
    "WorkflowContext",
    "WorkflowInstance",
    "WorkflowResult",
    "WorkflowSet",
    "build_workflows",
]
