"""Every CLI command has help text and is documented in the runbook and the README."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from agent.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def command_paths(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            yield path, cmd
            yield from command_paths(cmd, path + " ")
        else:
            yield path, cmd


COMMANDS = list(command_paths(cli))


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[p for p, _ in COMMANDS])
def test_docs_every_command_has_help_text(path: str, cmd: click.Command) -> None:
    assert (cmd.help or "").strip(), f"`syncagent {path}` has no help text"


@pytest.mark.parametrize("doc", ["docs/operations.md", "README.md"])
def test_docs_every_command_appears_in_the_docs(doc: str) -> None:
    text = (ROOT / doc).read_text()
    missing = [p for p, c in COMMANDS if not isinstance(c, click.Group) and f"syncagent {p}" not in text
               and f"`{p}" not in text]
    assert missing == [], f"{doc} does not mention: {missing}"
