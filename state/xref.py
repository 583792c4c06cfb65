"""The cross-reference: which record in each system is the same canonical record.

A canonical record (``entity``, ``canonical_id``) has at most one id per system, and an id in
a system belongs to at most one canonical record. Both rules are UNIQUE keys, so a link that
would break either is refused rather than silently re-pointed.

Natural keys (a configured ``match_on`` field such as a tax number or an e-mail) let the
resolver find the canonical record of a record no system has linked yet. Each value points
at one canonical record and each record has one value per field; values are compared as
their JSON text, so the resolver normalises them (case, spaces) before noting or finding.
"""

from __future__ import annotations

import uuid
from typing import Any

from agent.errors import DataError
from agent.model import utcnow
from state import codec
from state.db import State, classify_sqlite, fetch_all, fetch_one


def new_canonical_id() -> str:
    """Return a fresh canonical id (32 hex characters)."""
    return uuid.uuid4().hex


def link(st: State, entity: str, canonical_id: str, system: str, external_id: str) -> bool:
    """Link ``system``'s ``external_id`` to the canonical record; ``True`` if the link is new.

    Linking the same pair again does nothing.

    Raises:
        DataError: the canonical record already has a different id in ``system``, or the
            external id already belongs to another canonical record.
    """
    record = f"{entity}/{canonical_id}"
    with st.write_txn():
        mine = fetch_one(
            st,
            "SELECT external_id FROM xref WHERE entity = ? AND canonical_id = ? AND system = ?",
            (entity, canonical_id, system),
        )
        if mine is not None:
            if mine["external_id"] == external_id:
                return False
            raise DataError(record, system, "already linked to a different id in this system")
        theirs = fetch_one(
            st,
            "SELECT canonical_id FROM xref WHERE entity = ? AND system = ? AND external_id = ?",
            (entity, system, external_id),
        )
        if theirs is not None:
            raise DataError(
                record, system, f"external id already linked to canonical id {theirs['canonical_id']}"
            )
        with classify_sqlite(st.path):
            st.conn.execute(
                "INSERT INTO xref (entity, canonical_id, system, external_id, linked_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (entity, canonical_id, system, external_id, codec.format_ts(utcnow())),
            )
    return True


def lookup(st: State, entity: str, system: str, external_id: str) -> str | None:
    """Return the canonical id of ``system``'s record ``external_id``, if linked."""
    r = fetch_one(
        st,
        "SELECT canonical_id FROM xref WHERE entity = ? AND system = ? AND external_id = ?",
        (entity, system, external_id),
    )
    return None if r is None else r["canonical_id"]


def external_id(st: State, entity: str, canonical_id: str, system: str) -> str | None:
    """Return the canonical record's id in ``system``, if linked."""
    r = fetch_one(
        st,
        "SELECT external_id FROM xref WHERE entity = ? AND canonical_id = ? AND system = ?",
        (entity, canonical_id, system),
    )
    return None if r is None else r["external_id"]


def members(st: State, entity: str, canonical_id: str) -> dict[str, str]:
    """Return ``{system: external_id}`` for every system linked to the canonical record."""
    rows = fetch_all(
        st,
        "SELECT system, external_id FROM xref WHERE entity = ? AND canonical_id = ? ORDER BY system",
        (entity, canonical_id),
    )
    return {r["system"]: r["external_id"] for r in rows}


def page(
    st: State, entity: str, *, after_canonical_id: str | None = None, limit: int = 500
) -> list[tuple[str, dict[str, str]]]:
    """Return up to ``limit`` canonical records after ``after_canonical_id``, with their members.

    Keyset pagination by canonical id: pass the last id of one page to get the next.
    """
    rows = fetch_all(
        st,
        "SELECT canonical_id, system, external_id FROM xref WHERE entity = ? AND canonical_id IN"
        " (SELECT DISTINCT canonical_id FROM xref WHERE entity = ? AND canonical_id > ?"
        "  ORDER BY canonical_id LIMIT ?)"
        " ORDER BY canonical_id, system",
        (entity, entity, after_canonical_id or "", limit),
    )
    out: list[tuple[str, dict[str, str]]] = []
    for r in rows:
        if not out or out[-1][0] != r["canonical_id"]:
            out.append((r["canonical_id"], {}))
        out[-1][1][r["system"]] = r["external_id"]
    return out


def count(st: State, entity: str | None = None) -> int:
    """Return the number of canonical records (not links), for one entity or all."""
    if entity is None:
        r = fetch_one(st, "SELECT count(*) AS n FROM (SELECT DISTINCT entity, canonical_id FROM xref)")
    else:
        r = fetch_one(
            st,
            "SELECT count(*) AS n FROM (SELECT DISTINCT canonical_id FROM xref WHERE entity = ?)",
            (entity,),
        )
    return 0 if r is None else int(r["n"])


def note_natural(st: State, entity: str, field: str, value: Any, canonical_id: str) -> bool:
    """Record that the canonical record's natural key ``field`` is ``value``; ``True`` if stored.

    A record whose value changed drops its old value. A value already held by another
    canonical record is left with it (``False``): two records claiming one natural key is
    for a person to sort out, not for the last writer to win.
    """
    text = codec.dumps(value)
    with st.write_txn(), classify_sqlite(st.path):
        holder = st.conn.execute(
            "SELECT canonical_id FROM xref_natural WHERE entity = ? AND field = ? AND value = ?",
            (entity, field, text),
        ).fetchone()
        if holder is not None:
            return bool(holder["canonical_id"] == canonical_id)
        st.conn.execute(
            "DELETE FROM xref_natural WHERE entity = ? AND field = ? AND canonical_id = ?",
            (entity, field, canonical_id),
        )
        st.conn.execute(
            "INSERT INTO xref_natural (entity, field, value, canonical_id, noted_at) VALUES (?, ?, ?, ?, ?)",
            (entity, field, text, canonical_id, codec.format_ts(utcnow())),
        )
    return True


def find_natural(st: State, entity: str, field: str, value: Any) -> str | None:
    """Return the canonical id whose natural key ``field`` equals ``value``, if one was noted."""
    r = fetch_one(
        st,
        "SELECT canonical_id FROM xref_natural WHERE entity = ? AND field = ? AND value = ?",
        (entity, field, codec.dumps(value)),
    )
    return None if r is None else r["canonical_id"]
