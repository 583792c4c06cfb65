"""Secret references: ``{credential = "name"}`` (systemd LoadCredential=) or ``{env = "NAME"}``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.model import Secret


class SecretRefError(ValueError):
    """A secret reference that cannot be resolved; the message says why (never the value)."""


def resolve_secret(value: Any, env: Mapping[str, str]) -> Secret:
    """Resolve a secret reference; ``SecretRefError`` says why it cannot be."""
    if isinstance(value, str):
        raise SecretRefError('secrets are never inline: use {credential = "name"} or {env = "NAME"}')
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("credential", "env"):
        raise SecretRefError('must be {credential = "name"} or {env = "NAME"}')
    ((how, ref),) = value.items()
    if not isinstance(ref, str) or not ref:
        raise SecretRefError(f"{how} must name a {'credential' if how == 'credential' else 'variable'}")
    if how == "env":
        if ref not in env:
            raise SecretRefError(f"environment variable {ref} is not set")
        return Secret(env[ref])
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        raise SecretRefError(f"credential {ref!r} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)")
    if "/" in ref or ref.startswith("."):
        raise SecretRefError("a credential name is a plain file name")
    try:
        return Secret((Path(cred_dir) / ref).read_text().strip())
    except OSError:
        raise SecretRefError(f"credential {ref!r} not found in $CREDENTIALS_DIRECTORY") from None
