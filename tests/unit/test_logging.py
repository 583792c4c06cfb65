from __future__ import annotations

import io
import json
import logging

import pytest

from agent.logging import log_event, setup


@pytest.fixture
def capture() -> io.StringIO:
    buf = io.StringIO()
    yield buf
    logging.getLogger().handlers.clear()


def test_log_event_renders_logfmt_with_quoted_values(capture: io.StringIO) -> None:
    setup(fmt="logfmt", stream=capture)
    log_event(logging.getLogger("t"), "batch_journaled", source="erp", n=42, cursor="lsn=0/1 x", trace_id=None)
    line = capture.getvalue().strip()
    assert "event=batch_journaled" in line and "source=erp" in line and "n=42" in line
    assert 'cursor="lsn=0/1 x"' in line and 'trace_id=""' in line


def test_log_event_renders_the_same_fields_as_json(capture: io.StringIO) -> None:
    setup(fmt="json", stream=capture)
    log_event(logging.getLogger("t"), "batch_journaled", source="erp", n=42)
    obj = json.loads(capture.getvalue())
    assert obj["event"] == "batch_journaled" and obj["source"] == "erp" and obj["n"] == 42


def test_formatter_parses_prerendered_logfmt_messages_when_a_module_cannot_import_log_event(
        capture: io.StringIO) -> None:
    setup(fmt="json", stream=capture)
    logging.getLogger("connectors.x").info('event=slot_advanced slot=%s note="%s"', "s1", "a b")
    obj = json.loads(capture.getvalue())
    assert obj["event"] == "slot_advanced" and obj["slot"] == "s1" and obj["note"] == "a b"


def test_reserved_field_names_do_not_overwrite_the_event(capture: io.StringIO) -> None:
    setup(fmt="json", stream=capture)
    logging.getLogger("t").info("x", extra={"fields": {"logger": "y", "ts": "z"}})
    obj = json.loads(capture.getvalue())
    assert obj["event"] == "x" and obj["logger"] == "t" and obj["field_logger"] == "y"
