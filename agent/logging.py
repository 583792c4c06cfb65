"""Event logging: one event per line, logfmt by default, JSON on request.

Messages are event names; fields travel in ``extra={"fields": {...}}`` through
``log_event``. Values are ids, counts, cursors and durations, never record field values
or secrets. Configured once, by the CLI entry point.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

_RESERVED = frozenset({"event", "level", "logger", "ts"})


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (rendered as logfmt or JSON)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    if text == "" or any(c in text for c in ' ="\\\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    """Render a record as ``event=... level=... key=value ...``."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a logfmt line."""
        parts = []
        if self.timestamps:
            parts.append(
                "ts=" + datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            )
        event, fields = _event_and_fields(record)
        parts.append("level=" + record.levelname.lower())
        parts.append("event=" + _logfmt_value(event))
        parts.append("logger=" + record.name)
        for k, v in fields.items():
            parts.append(f"{k}={_logfmt_value(v)}")
        if record.exc_info:
            parts.append("exc=" + _logfmt_value(self.formatException(record.exc_info)))
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object per line, with the same fields as logfmt."""

    def __init__(self, *, timestamps: bool) -> None:
        super().__init__()
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as a JSON line."""
        out: dict[str, Any] = {}
        if self.timestamps:
            out["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        event, fields = _event_and_fields(record)
        out.update(level=record.levelname.lower(), event=event, logger=record.name)
        out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _event_and_fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The event name and fields of a record.

    Modules that may not import this one (connectors, state) log pre-rendered logfmt
    messages such as ``"event=slot_advanced slot=%s"``; those are parsed back into fields
    so that both output formats carry them the same way.
    """
    message = record.getMessage()
    fields: dict[str, Any] = {}
    if message.startswith("event="):
        pairs = _parse_logfmt(message)
        message = str(pairs.pop("event", message))
        fields.update(pairs)
    extra = getattr(record, "fields", None) or {}
    fields.update(extra)
    return message, {(f"field_{k}" if k in _RESERVED else k): v for k, v in fields.items()}


def _parse_logfmt(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] == " ":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq]
        i = eq + 1
        if i < n and text[i] == '"':
            i += 1
            buf = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(text[i])
                i += 1
            value = "".join(buf)
            i += 1
        else:
            end = text.find(" ", i)
            end = n if end < 0 else end
            value = text[i:end]
            i = end
        if key:
            out[key] = value
    return out


def setup(*, level: str = "info", fmt: str = "logfmt", stream: Any = None) -> None:
    """Configure the root logger once: stderr, no file handlers; no timestamps under journald."""
    under_journald = "JOURNAL_STREAM" in os.environ
    handler = logging.StreamHandler(stream or sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(timestamps=not under_journald)
    else:
        formatter = LogfmtFormatter(timestamps=not under_journald)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs full URLs at INFO; our own event hook logs redacted ones.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
