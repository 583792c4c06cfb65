"""The Sink contract, one test per behaviour, run against every connector built from config.

Ops are shaped as resolve shapes them: an upsert keyed by the target's external-id field
while the cross-reference does not know the record, then keyed by the record's own id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from agent.errors import RateLimited
from agent.model import Outcome

if TYPE_CHECKING:
    from conftest import System


def _statuses(outcomes: list[Outcome]) -> list[str]:
    return [o.status for o in outcomes]


def test_sink_creates_nothing_twice_when_the_same_upserts_are_replayed(system: System) -> None:
    """Upserts by external id, applied twice, answer the same record ids and leave one record each."""
    ops = [system.upsert_op(n) for n in range(3)]
    first = system.sink.apply(ops)
    assert _statuses(first) == ["applied"] * 3
    ids = [o.external_id for o in first]
    assert all(ids) and len(set(ids)) == 3
    again = system.sink.apply(ops)
    assert _statuses(again) == ["applied"] * 3
    assert [o.external_id for o in again] == ids
    assert system.records() == {i: f"Firm {n}" for n, i in enumerate(ids)}


def test_sink_updates_the_same_record_when_the_op_is_keyed_by_its_own_id(system: System) -> None:
    """Once linked, an op keyed by the record's id changes that record and creates none."""
    (created,) = system.sink.apply([system.upsert_op(1)])
    assert created.external_id
    (updated,) = system.sink.apply([system.upsert_op(1, name="Firm One", known_id=created.external_id)])
    assert updated.status == "applied" and updated.external_id == created.external_id
    assert system.records() == {created.external_id: "Firm One"}


def test_sink_rejects_only_the_bad_record_when_one_op_of_ten_is_refused(system: System) -> None:
    """The refused op alone is a reject naming why; the other nine apply in the same call."""
    ops = [system.upsert_op(n, bad=(n == 6)) for n in range(10)]
    outcomes = system.sink.apply(ops)
    assert [n for n, o in enumerate(outcomes) if o.status != "applied"] == [6]
    assert outcomes[6].status == "reject" and outcomes[6].reason and outcomes[6].detail
    assert len(system.records()) == 9


def test_sink_deletes_idempotently_when_a_delete_is_replayed(system: System) -> None:
    """A delete applies, and applying it again (the record is gone) applies too."""
    kept, gone = system.sink.apply([system.upsert_op(1), system.upsert_op(2)])
    assert gone.external_id and kept.external_id
    delete = system.delete_op(gone.external_id)
    assert _statuses(system.sink.apply([delete])) == ["applied"]
    assert _statuses(system.sink.apply([delete])) == ["applied"]
    assert list(system.records()) == [kept.external_id]


def test_sink_does_not_recreate_a_record_when_an_op_keyed_by_its_id_finds_it_deleted(system: System) -> None:
    """An update of a linked record that was deleted meanwhile is refused, not a silent re-create."""
    (created,) = system.sink.apply([system.upsert_op(1)])
    assert created.external_id
    system.delete(created.external_id)
    (outcome,) = system.sink.apply([system.upsert_op(1, name="Firm One", known_id=created.external_id)])
    assert outcome.status == "reject" and outcome.reason
    assert system.records() == {}


def test_sink_defers_the_batch_when_the_server_throttles(api_system: System) -> None:
    """A throttle raises RateLimited or answers retry for every op, rejects nothing, loses nothing."""
    ops = [api_system.upsert_op(n) for n in range(3)]
    api_system.sink.apply(ops[:1])  # a token in hand, so the throttle meets a write
    api_system.inject_rate_limit("write")
    try:
        outcomes = api_system.sink.apply(ops)
    except RateLimited as exc:
        assert exc.retry_after is None or exc.retry_after > 0
    else:
        assert _statuses(outcomes) == ["retry"] * 3
    assert _statuses(api_system.sink.apply(ops)) == ["applied"] * 3
    assert len(api_system.records()) == 3


def test_sink_refreshes_the_token_once_when_it_expired(api_system: System) -> None:
    """An expired token costs one new grant and the write goes through."""
    api_system.sink.apply([api_system.upsert_op(1)])
    grants = api_system.token_grants()
    api_system.expire_tokens()
    assert _statuses(api_system.sink.apply([api_system.upsert_op(2)])) == ["applied"]
    assert api_system.token_grants() == grants + 1
    assert len(api_system.records()) == 2


@pytest.mark.parametrize("n", [1, 250])
def test_sink_answers_one_outcome_per_op_in_order_when_batches_are_split(system: System, n: int) -> None:
    """However the connector splits a batch into requests, outcome i belongs to op i."""
    ops = [system.upsert_op(i) for i in range(n)]
    outcomes = system.sink.apply(ops)
    assert _statuses(outcomes) == ["applied"] * n
    records = system.records()
    assert [records[str(o.external_id)] for o in outcomes] == [f"Firm {i}" for i in range(n)]
