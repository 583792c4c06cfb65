"""state.checkpoints on a real SQLite file: advance, rewind generations, history, audit."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent.model import Cursor, utcnow
from state import audit, checkpoints
from state.db import State, open_state

OWNER, STREAM = "source:crm", "Account"


def cur(n: int) -> Cursor:
    return Cursor({"v": 1, "modstamp": f"2024-05-01T12:00:{n:02d}Z", "id": f"001{n:03d}"})


@pytest.fixture
def st(tmp_path: Path) -> Iterator[State]:
    s = open_state(tmp_path / "state.db")
    yield s
    s.close()


def test_checkpoints_get_returns_none_when_never_moved(st: State) -> None:
    assert checkpoints.get(st, OWNER, STREAM) is None


def test_checkpoints_advance_creates_generation_1_when_row_missing(st: State) -> None:
    cp = checkpoints.advance(st, OWNER, STREAM, cur(1))
    assert cp is not None
    assert (cp.generation, cp.cursor, cp.reason, cp.actor) == (1, cur(1), "advance", "agent")
    assert checkpoints.get(st, OWNER, STREAM) == cp


def test_checkpoints_advance_keeps_generation_and_records_history_when_moved(st: State) -> None:
    checkpoints.advance(st, OWNER, STREAM, cur(1))
    cp = checkpoints.advance(st, OWNER, STREAM, cur(2))
    assert cp is not None and cp.generation == 1 and cp.cursor == cur(2)
    moves = checkpoints.history(st, OWNER, STREAM)
    assert [(m.previous, m.cursor) for m in moves] == [(cur(1), cur(2)), (None, cur(1))]


def test_checkpoints_advance_writes_nothing_when_cursor_unchanged(st: State) -> None:
    first = checkpoints.advance(st, OWNER, STREAM, cur(1))
    assert checkpoints.advance(st, OWNER, STREAM, cur(1)) == first
    assert len(checkpoints.history(st)) == 1


def test_checkpoints_rewind_bumps_generation_with_history_and_audit_row_when_called(st: State) -> None:
    checkpoints.advance(st, OWNER, STREAM, cur(5))
    cp = checkpoints.rewind(st, OWNER, STREAM, cur(1), reason="replay since 12:00", actor="alice")
    assert (cp.generation, cp.cursor, cp.actor, cp.reason) == (2, cur(1), "alice", "replay since 12:00")
    [move, _] = checkpoints.history(st, OWNER, STREAM)
    assert (move.previous, move.cursor, move.generation, move.actor) == (cur(5), cur(1), 2, "alice")
    [rec] = audit.list_records(st, action="checkpoint_rewound")
    assert rec.actor == "alice"
    assert rec.detail["previous"] == dict(cur(5).data)
    assert rec.detail["cursor"] == dict(cur(1).data)
    assert rec.detail["generation"] == 2


def test_checkpoints_advance_returns_none_and_writes_nothing_when_generation_moved(st: State) -> None:
    seen = checkpoints.advance(st, OWNER, STREAM, cur(5))
    assert seen is not None
    checkpoints.rewind(st, OWNER, STREAM, cur(1), reason="ops", actor="alice")
    # The agent read generation 1 before the rewind and now tries to move on from it.
    assert checkpoints.advance(st, OWNER, STREAM, cur(6), expected_generation=seen.generation) is None
    after = checkpoints.get(st, OWNER, STREAM)
    assert after is not None and (after.cursor, after.generation) == (cur(1), 2)
    moved = checkpoints.advance(st, OWNER, STREAM, cur(2), expected_generation=2)
    assert moved is not None and moved.cursor == cur(2)


@pytest.mark.parametrize(("expected", "created"), [(0, True), (None, True), (1, False)])
def test_checkpoints_advance_treats_missing_row_as_generation_0_when_expected_given(
    st: State, expected: int | None, created: bool
) -> None:
    result = checkpoints.advance(st, OWNER, STREAM, cur(1), expected_generation=expected)
    assert (result is not None) == created
    assert (checkpoints.get(st, OWNER, STREAM) is not None) == created


def test_checkpoints_rewind_creates_generation_1_when_row_missing(st: State) -> None:
    cp = checkpoints.rewind(st, "resolver", "journal", Cursor({"v": 1, "seq": 0}), reason="init", actor="ops")
    assert cp.generation == 1


def test_checkpoints_list_all_orders_by_owner_and_stream_when_several(st: State) -> None:
    checkpoints.advance(st, "source:erp", "wal", Cursor({"v": 1, "lsn": "0/10"}))
    checkpoints.advance(st, OWNER, "Contact", cur(1))
    checkpoints.advance(st, OWNER, "Account", cur(1))
    assert [(c.owner, c.stream) for c in checkpoints.list_all(st)] == [
        (OWNER, "Account"),
        (OWNER, "Contact"),
        ("source:erp", "wal"),
    ]


def test_checkpoints_history_filters_and_limits_when_asked(st: State) -> None:
    for i in range(5):
        checkpoints.advance(st, OWNER, STREAM, cur(i))
    checkpoints.advance(st, OWNER, "Contact", cur(1))
    assert len(checkpoints.history(st, owner=OWNER)) == 6
    assert len(checkpoints.history(st, stream="Contact")) == 1
    assert [m.cursor for m in checkpoints.history(st, OWNER, STREAM, limit=2)] == [cur(4), cur(3)]


def test_checkpoints_prune_history_deletes_only_older_rows_when_cutoff_given(st: State) -> None:
    for i in range(3):
        checkpoints.advance(st, OWNER, STREAM, cur(i))
    assert checkpoints.prune_history(st, utcnow() - timedelta(days=1)) == 0
    assert checkpoints.prune_history(st, utcnow() + timedelta(seconds=1)) == 3
    assert checkpoints.history(st) == []
    current = checkpoints.get(st, OWNER, STREAM)
    assert current is not None and current.cursor == cur(2)
