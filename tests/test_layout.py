"""The module boundaries of style.md, enforced: import direction and pinned public names."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED_FROM_AGENT = {"agent.model", "agent.errors"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if node.module == "agent"}
    return names


@pytest.mark.parametrize("package", ["connectors", "state"])
def test_layout_package_imports_only_model_and_errors_from_agent(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "agent" and name not in ALLOWED_FROM_AGENT and name != "agent":
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
            other = "state" if package == "connectors" else "connectors"
            if top == other:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_layout_only_pipeline_and_composition_roots_import_connectors_and_state_together() -> None:
    both = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        tops = {n.split(".")[0] for n in _imports(path)}
        if {"connectors", "state"} <= tops:
            both.append(path.relative_to(ROOT).as_posix())
    assert set(both) <= {"agent/pipeline.py", "agent/daemon.py", "agent/ops.py", "agent/scheduler.py",
                         "agent/reconcile.py", "agent/demo/run.py", "agent/workflows/runner.py"}


def test_layout_has_no_grab_bag_modules() -> None:
    banned = {"utils.py", "helpers.py", "common.py", "constants.py"}
    found = [p for pkg in ("agent", "connectors", "state") for p in (ROOT / pkg).rglob("*.py") if p.name in banned]
    assert found == []


@pytest.mark.parametrize("package,expected", [
    ("connectors", {"REGISTRY", "Resync", "Sink", "Source"}),
    ("state", {"AuditRecord", "Checkpoint", "CheckpointMove", "ConnectorHealth", "ExceptionItem", "ExceptionStats",
               "JournalRow", "JournalStats", "OutboxDepth", "OutboxRow", "ShadowValue", "State", "audit",
               "checkpoints", "classify_sqlite", "codec", "exceptions", "health", "journal", "migrations",
               "open_state", "outbox", "schema_version", "shadow", "workflows", "xref"}),
    ("agent", {"__version__"}),
])
def test_layout_public_names_are_pinned(package: str, expected: set[str]) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) == expected
    for name in module.__all__:
        assert hasattr(module, name)


def test_layout_modules_stay_under_600_lines() -> None:
    big = {p.relative_to(ROOT).as_posix(): n for pkg in ("agent", "connectors", "state")
           for p in (ROOT / pkg).rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert big == {}
