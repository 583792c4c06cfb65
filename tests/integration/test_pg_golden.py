"""The golden pgoutput capture still matches what a live server sends for the same workload."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import psycopg
import pytest

from connectors.postgres.values import ARRAY_ELEMENT_OIDS, SCALAR_OIDS

pytestmark = pytest.mark.pg

CAPTURE_DIR = Path(__file__).resolve().parents[1] / "data" / "pgoutput"


@pytest.fixture(scope="module")
def capture() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pgoutput_capture", CAPTURE_DIR / "capture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def live(pg_dsn: str, capture: ModuleType) -> Iterator[tuple[str, str]]:
    """Run the capture workload in a fresh database; yield (dsn, slot) and clean up after."""
    slot = f"golden_{os.getpid()}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        had_origin = conn.execute(
            "SELECT 1 FROM pg_replication_origin WHERE roname = %s", (capture.ORIGIN,)
        ).fetchone()
    capture.setup(pg_dsn, slot)
    try:
        capture.run_workload(pg_dsn)
        yield pg_dsn, slot
    finally:
        capture.teardown(pg_dsn, slot, drop_origin=not had_origin)


def test_live_stream_decodes_like_the_golden_capture_when_the_workload_is_replayed(live, capture):
    dsn, slot = live
    expected = capture.summarize(capture.read_capture(capture.GOLDEN))
    assert capture.summarize(capture.peek(dsn, slot)) == expected


def test_live_stream_converts_to_the_same_values_when_the_reader_timezone_differs(live, capture):
    dsn, slot = live
    settings = dict(capture.READER_SETTINGS, TimeZone="Asia/Kolkata")
    raw_kolkata = capture.peek(dsn, slot, settings=settings)
    raw_utc = capture.peek(dsn, slot)
    assert [r[2] for r in raw_kolkata] != [r[2] for r in raw_utc]  # the text really differs
    assert capture.summarize(raw_kolkata) == capture.summarize(capture.read_capture(capture.GOLDEN))


def test_live_logical_messages_match_the_capture_when_messages_are_on(live, capture):
    dsn, slot = live
    rows = [r for r in capture.peek(dsn, slot, messages=True) if r[2][:1] == b"M"]
    assert capture.summarize(rows) == capture.summarize(capture.read_capture(capture.MESSAGES))


def test_oid_tables_match_pg_type_when_checked_against_the_server(pg_dsn):
    with psycopg.connect(pg_dsn) as conn:
        names: dict[int, str] = dict(
            conn.execute("SELECT oid::int, typname FROM pg_type WHERE oid = ANY(%s)", (list(SCALAR_OIDS),))
        )
        elems: dict[int, int] = dict(
            conn.execute(
                "SELECT oid::int, typelem::int FROM pg_type WHERE oid = ANY(%s)", (list(ARRAY_ELEMENT_OIDS),)
            )
        )
    assert names == dict(SCALAR_OIDS)
    assert elems == dict(ARRAY_ELEMENT_OIDS)
