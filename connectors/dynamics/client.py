"""``DynamicsConnector``: the Dynamics 365 / Dataverse Web API as a Source, Sink and Resync.

Usage::

    client = make_client("https://contoso.crm.dynamics.com")
    tokens = ClientCredentials(client, f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
                               client_id, Secret(secret), scope="https://contoso.crm.dynamics.com/.default")
    dv = DynamicsConnector("dynamics", client, auth=BearerAuth(tokens), tables={
        "account": DvTable("accounts", "account", "accountid", ("name", "erp_customerid"),
                           alternate_key=("erp_customerid",)),
    })

Reading is in ``connectors/dynamics/source.py`` (cursor shapes are documented there),
writing in ``sink.py``, the HTTP plumbing in ``session.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from agent.errors import AuthError, CursorUnavailable, PermanentError, RetryableError, SyncAgentError
from agent.model import Batch, Cursor, Op, Outcome, Problem, utcnow
from connectors.dynamics.odata import literal
from connectors.dynamics.session import DvSession, DvTable
from connectors.dynamics.sink import DvWriter
from connectors.dynamics.source import MAX_PAGE_SIZE, DvReader


class DynamicsConnector:
    """Reads Dataverse tables by delta link or ``modifiedon``; upserts by alternate key."""

    def __init__(
        self,
        name: str,
        client: httpx.Client,
        *,
        auth: httpx.Auth,
        tables: Mapping[str, DvTable],
        api_path: str = "/api/data/v9.2",
        page_size: int = MAX_PAGE_SIZE,
        lookback: timedelta = timedelta(minutes=2),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be within 1..{MAX_PAGE_SIZE} (Dataverse's maximum page)")
        if not tables:
            raise ValueError("a Dynamics connector needs at least one table")
        self.name = name
        self.tables = dict(tables)
        self.session = DvSession(client, auth, api_path, clock)
        self._reader = DvReader(name, self.session, page_size=page_size, lookback=lookback)
        self._writer = DvWriter(self.session, self.tables)

    def streams(self) -> Sequence[str]:
        """Return the configured table names; each is a stream with its own cursor."""
        return list(self.tables)

    def read(self, stream: str, cursor: Cursor | None, *, limit: int) -> Batch:
        """Return the next batch of changes of ``stream`` after ``cursor``."""
        return self._reader.read(stream, self._table(stream), cursor, limit)

    def cursor_for_time(self, stream: str, when: datetime) -> Cursor:
        """A cursor that re-reads ``stream`` from ``when``; delta links cannot go back in time."""
        table = self.tables[stream]
        if table.change_tracking:
            raise CursorUnavailable(
                f"{self.name}/{stream}: a change-tracking delta token cannot be rewound to a time; "
                "the rewind is a resync of the table"
            )
        return Cursor(
            {
                "v": 1,
                "mode": "modifiedon",
                "ts": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "id": "",
            }
        )

    def commit(self, stream: str, cursor: Cursor) -> None:
        """Do nothing: Dataverse keeps no per-client position to acknowledge."""

    def resync(
        self, stream: str, *, since: datetime | None, after_key: str | None, chunk: int
    ) -> Iterator[Batch]:
        """Re-read ``stream`` as ``read`` changes in key order; the last batch holds a fresh cursor."""
        return self._reader.resync(stream, self._table(stream), since=since, after_key=after_key, chunk=chunk)

    def apply(self, ops: Sequence[Op]) -> list[Outcome]:
        """Apply ops (upserts and deletes), one outcome per op in order."""
        return self._writer.apply(ops)

    def fetch(self, object_name: str, ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """Return the current rows of table ``object_name`` by primary key; ``None`` where there is none.

        ``$filter`` on the key, 50 keys per query, selecting the columns a change carries.
        """
        out: dict[str, dict[str, Any] | None] = dict.fromkeys(ids)
        found = self._reader.fetch(self._table(object_name), list(out))
        for rid in out:
            out[rid] = found.get(rid)
        return out

    def check(self) -> list[Problem]:
        """Check the token, each table, its columns, change tracking and alternate key."""
        try:
            self.session.get_json(self.session.path("WhoAmI"))
        except AuthError as exc:
            return [Problem(self.name, f"Dataverse refused the token: {exc}",
                            "check the tenant, client id and secret, and that an application user with "
                            "a security role exists for the app registration")]  # fmt: skip
        except SyncAgentError as exc:
            return [Problem(self.name, f"Dataverse is not reachable: {exc}", "check the org URL and network")]
        problems: list[Problem] = []
        for stream, table in self.tables.items():
            try:
                problems.extend(self._check_table(stream, table))
            except RetryableError as exc:
                problems.append(Problem(f"{self.name}.{stream}", f"check failed: {exc}", "retry later"))
        return problems

    def _check_table(self, stream: str, table: DvTable) -> list[Problem]:
        subject = f"{self.name}.{stream}"
        definition = self.session.path(f"EntityDefinitions(LogicalName={literal(table.logical_name)})")
        try:
            meta = self.session.get_json(
                definition, params={"$select": "LogicalName,EntitySetName,ChangeTrackingEnabled"}
            )
        except PermanentError as exc:
            return [Problem(subject, f"table {table.logical_name} not found: {exc}", "fix logical_name")]
        problems: list[Problem] = []
        if meta.get("EntitySetName") not in (None, table.entity_set):
            problems.append(Problem(subject, f"entity set is {meta.get('EntitySetName')!r}, not "
                                             f"{table.entity_set!r}", "fix entity_set"))  # fmt: skip
        if table.change_tracking and meta.get("ChangeTrackingEnabled") is False:
            problems.append(Problem(subject, f"change tracking is off for {table.logical_name}",
                                    "enable 'Track changes' on the table, or set change_tracking = false "
                                    "to poll by modifiedon (deletes are then not seen)"))  # fmt: skip
        try:
            self.session.get_json(
                self.session.path(table.entity_set), params={"$select": table.select(), "$top": "1"}
            )
        except PermanentError as exc:
            problems.append(Problem(subject, f"cannot read the configured columns: {exc}", "fix fields"))
        if table.alternate_key:
            problems.extend(self._check_key(subject, definition, table))
        return problems

    def _check_key(self, subject: str, definition: str, table: DvTable) -> list[Problem]:
        wanted = set(table.alternate_key or ())
        try:
            keys = self.session.get_json(
                definition + "/Keys", params={"$select": "LogicalName,KeyAttributes,EntityKeyIndexStatus"}
            )
        except PermanentError as exc:
            return [
                Problem(subject, f"cannot list alternate keys: {exc}", "grant metadata read to the app user")
            ]
        match = next(
            (k for k in keys.get("value") or [] if set(k.get("KeyAttributes") or []) == wanted), None
        )
        if match is None:
            return [Problem(subject, f"no alternate key on {sorted(wanted)}",
                            "define the alternate key on the table (upserts need it)")]  # fmt: skip
        if match.get("EntityKeyIndexStatus") not in (None, "Active"):
            status = match.get("EntityKeyIndexStatus")
            return [Problem(subject, f"alternate key {match.get('LogicalName')} is {status}",
                            "wait for the key's index job, or reactivate the key")]  # fmt: skip
        return []

    def _table(self, stream: str) -> DvTable:
        table = self.tables.get(stream)
        if table is None:
            raise PermanentError(f"{self.name}: no table configured for stream {stream!r}")
        return table
