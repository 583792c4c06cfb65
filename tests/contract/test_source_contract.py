"""The Source contract, one test per behaviour, run against every connector built from config.

Sources are at-least-once: a change may come again (look-back windows, a restart inside a
transaction), but then under the same ``position``, which the journal's unique key absorbs.
Within one walk from the beginning nothing repeats.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING

import pytest

from agent.errors import RateLimited
from agent.model import Change, Cursor

if TYPE_CHECKING:
    from conftest import System


def _ids(system: System, changes: list[Change]) -> list[str]:
    return [system.record_id(c) for c in changes]


def _new(changes: list[Change], seen: list[Change]) -> list[Change]:
    before = {c.position for c in seen}
    return [c for c in changes if c.position not in before]


def _stored(cursors: dict[str, Cursor]) -> dict[str, Cursor]:
    """Cursors as the checkpoint store gives them back: through JSON."""
    return {s: Cursor(json.loads(json.dumps(dict(c.data)))) for s, c in cursors.items()}


def test_source_reads_only_what_changed_after_the_cursor_when_polled_again(system: System) -> None:
    """Changes after a stored cursor come back under new positions, after a restart too; nothing older does."""
    ids = system.create(3, tie=False)
    system.settle()
    first, cursors = system.drain()
    assert sorted(_ids(system, first)) == sorted(ids)
    assert {c.op for c in first} <= {"insert", "update", "read"}
    added = system.create(2, tie=False)
    system.update(ids[0])
    system.settle()
    system.restart()
    again, _ = system.drain(_stored(cursors))
    fresh = _new(again, first)
    assert sorted(_ids(system, fresh)) == sorted([*added, ids[0]])
    assert {c.op for c in fresh} <= {"insert", "update"}
    renamed = [c for c in fresh if system.record_id(c) == ids[0]]
    assert renamed[0].fields[system.name_field] == "Renamed"


def test_source_names_each_change_after_the_configured_object_when_read(system: System) -> None:
    """A change carries the object the config maps (resolve finds its entity by it) and its stream."""
    system.create(2)
    system.settle()
    changes, _ = system.drain()
    assert len(changes) == 2
    assert {c.object_name for c in changes} == {system.object_name}
    assert {c.stream for c in changes} <= set(system.streams)
    assert {c.source for c in changes} == {system.source.name}


def test_source_keeps_the_latest_change_when_a_record_changes_again_in_the_tick_it_was_read(
    system: System,
) -> None:
    """A record read and changed again before the server clock ticks on is not lost to the dedup key."""
    (rid,) = system.create(1)
    first, cursors = system.drain()
    system.update(rid)
    system.settle()
    again, _ = system.drain(cursors)
    journal: dict[str, Change] = {}
    for change in [*first, *again]:
        journal.setdefault(change.position, change)  # the journal's unique key keeps the first
    kept = [c for c in journal.values() if system.record_id(c) == rid]
    assert kept and kept[-1].fields[system.name_field] == "Renamed", "the second change was dropped"


def test_source_reads_each_tied_record_once_when_a_tie_spans_pages(system: System) -> None:
    """Records sharing one modification time, more than a page of them, come exactly once."""
    ids = system.create(system.walk, tie=True)
    system.settle()
    changes, _ = system.drain(limit=2)
    assert len({c.source_ts for c in changes}) == 1, "the records did not tie"
    assert sorted(_ids(system, changes)) == sorted(ids)
    assert len({c.position for c in changes}) == len(changes)


@pytest.mark.parametrize("step", [-1, 1], ids=["limit_below_page", "limit_above_page"])
def test_source_reads_each_record_once_when_a_walk_crosses_page_and_cap_boundaries(
    system: System, step: int
) -> None:
    """A walk longer than a page (and a query cap) with a batch limit off the page size loses nothing."""
    ids = system.create(system.walk, tie=False)
    system.settle()
    changes, _ = system.drain(limit=system.page + step)
    assert Counter(_ids(system, changes)) == Counter(ids)
    assert len({c.source_ts for c in changes}) > 1


def test_source_reports_a_delete_when_a_record_is_deleted(system: System) -> None:
    """A deleted record comes back as one op 'delete' keyed by its id; the others stay alive."""
    ids = system.create(3)
    system.settle()
    first, cursors = system.drain()
    system.delete(ids[1])
    system.settle()
    again, _ = system.drain(cursors)
    fresh = _new(again, first)
    assert [(c.op, system.record_id(c)) for c in fresh] == [("delete", ids[1])]
    assert all(c.op != "delete" for c in again if system.record_id(c) != ids[1])


def test_source_resumes_from_a_stored_checkpoint_when_restarted(system: System) -> None:
    """A cursor stored mid-walk lets a rebuilt connector finish it: no loss, repeats share positions."""
    ids = system.create(system.walk, tie=False)
    system.settle()
    stream = system.streams[0]
    first = system.source.read(stream, None, limit=3)
    assert first.more
    system.source.commit(stream, first.next_cursor)
    system.restart()
    rest, _ = system.drain(_stored({stream: first.next_cursor}))
    union = [*first.changes, *rest]
    assert sorted(set(_ids(system, union))) == sorted(ids)
    by_position = {c.position: system.record_id(c) for c in union}
    assert sorted(by_position.values()) == sorted(ids), "a record came again under a new position"


def test_source_serves_a_batch_again_when_it_was_not_committed_before_a_crash(system: System) -> None:
    """A batch read but never acknowledged (a crash before the journal commit) comes again, same positions."""
    system.create(3, tie=False)
    system.settle()
    _, cursors = system.drain()
    added = system.create(2, tie=False)
    system.settle()
    stream = system.streams[0]
    lost = system.source.read(stream, cursors[stream], limit=100)
    assert set(added) <= set(_ids(system, list(lost.changes)))
    system.restart()
    again, _ = system.drain(_stored(cursors))
    assert {c.position for c in lost.changes} <= {c.position for c in again}


def test_source_reads_changes_made_during_a_walk_when_it_polls_next(system: System) -> None:
    """A record changed or created while a walk is under way is read by a later poll, not lost."""
    ids = system.create(system.walk, tie=False)
    system.settle()
    stream = system.streams[0]
    first = system.source.read(stream, None, limit=3)
    assert first.more
    system.source.commit(stream, first.next_cursor)
    read_already = _ids(system, list(first.changes))[0]
    system.update(read_already)
    added = system.create(1)
    system.settle()
    rest, cursors = system.drain({stream: first.next_cursor})
    system.settle()
    later, _ = system.drain(cursors)
    everything = [*first.changes, *rest, *later]
    assert set(_ids(system, everything)) == {*ids, *added}
    names = [c.fields.get(system.name_field) for c in everything if system.record_id(c) == read_already]
    assert "Renamed" in names


def test_source_raises_rate_limited_and_then_reads_when_the_server_throttles(api_system: System) -> None:
    """The vendor's throttle answer is RateLimited for the batch; the next read gets everything."""
    ids = api_system.create(3)
    api_system.settle()
    api_system.inject_rate_limit("read")
    with pytest.raises(RateLimited) as caught:
        api_system.source.read(api_system.streams[0], None, limit=100)
    assert caught.value.retry_after is None or caught.value.retry_after > 0
    changes, _ = api_system.drain()
    assert sorted(set(_ids(api_system, changes))) == sorted(ids)


def test_source_refreshes_the_token_once_when_it_expired(api_system: System) -> None:
    """An expired token costs one new grant; the read succeeds without an error reaching the caller."""
    ids = api_system.create(2)
    api_system.settle()
    api_system.drain()
    grants = api_system.token_grants()
    api_system.expire_tokens()
    changes, _ = api_system.drain()
    assert sorted(set(_ids(api_system, changes))) == sorted(ids)
    assert api_system.token_grants() == grants + 1
