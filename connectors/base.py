"""The connector protocols: small ``typing.Protocol``s that sources and sinks satisfy.

A source reads changes after a cursor; ``commit`` is called only after the journal has
committed them (PostgreSQL advances its slot there; API sources do nothing). A sink applies
ops and answers one ``Outcome`` per op. Batch-wide failures raise (classified errors from
``agent.errors``); per-record failures are outcomes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from agent.model import Batch, Cursor, Op, Outcome, Problem


@runtime_checkable
class Source(Protocol):
    """Reads changes from one system, stream by stream, after an opaque cursor."""

    name: str

    def streams(self) -> Sequence[str]:
        """Return the names of the streams this source reads (each has its own cursor)."""
        ...

    def read(self, stream: str, cursor: Cursor | None, *, limit: int) -> Batch:
        """Return the next batch of changes after ``cursor`` (None: from the start)."""
        ...

    def commit(self, stream: str, cursor: Cursor) -> None:
        """Acknowledge that everything up to ``cursor`` is durably journaled."""
        ...

    def check(self) -> list[Problem]:
        """Return what is wrong with this source's setup and reachability."""
        ...


@runtime_checkable
class Sink(Protocol):
    """Applies ops to one system; upserts by key so a replay creates nothing twice."""

    name: str

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ``ops`` and return one outcome per op, in order."""
        ...

    def check(self) -> list[Problem]:
        """Return what is wrong with this sink's setup and reachability."""
        ...


@runtime_checkable
class Resync(Protocol):
    """Optional capability of sources that cannot rewind: re-read rows as ``read`` changes."""

    def resync(
        self, stream: str, *, since: datetime | None, after_key: str | None, chunk: int
    ) -> Iterator[Batch]:
        """Yield batches of ``read`` changes, keyset-chunked, resumable from ``after_key``."""
        ...


def content_digest(fields: Mapping[str, Any]) -> str:
    """A short digest of a record's values, for positions whose version stamp is coarse.

    Salesforce's SystemModstamp and NetSuite's lastmodifieddate tick in whole seconds: two
    edits within one second carry one stamp, and a position of id and stamp alone would let
    the journal drop the second as a repeat. Re-reads of the same content keep one position.
    """
    text = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
