"""OData v4 URL syntax as Dataverse uses it: literals, key predicates, ``$filter`` and ``$orderby``.

The connector only writes this syntax (``literal``, ``key_segment``, ``format_datetime``);
the emulator also reads it (``parse_filter``, ``evaluate``, ``parse_orderby``,
``parse_key``). The filter grammar is the small subset the connector and its tests use:
``eq ne gt ge lt le``, ``and or not``, parentheses, and string, number, boolean, null,
datetime and GUID literals.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

COMPARISONS = frozenset({"eq", "ne", "gt", "ge", "lt", "le"})

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>'(?:[^']|'')*')
    | (?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})
    | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))
    | (?P<date>\d{4}-\d{2}-\d{2})
    | (?P<num>-?\d+(?:\.\d+)?)
    | (?P<name>[A-Za-z_][\w.]*)
    | (?P<punct>[(),=])
    )""",
    re.VERBOSE,
)


class ODataSyntaxError(ValueError):
    """A ``$filter``, ``$orderby`` or key predicate the parser does not understand."""


@dataclass(frozen=True, slots=True)
class Field:
    """A column reference inside a filter expression."""

    name: str


@dataclass(frozen=True, slots=True)
class Literal:
    """A constant inside a filter expression (str, int, Decimal, bool, None, datetime, date)."""

    value: Any


@dataclass(frozen=True, slots=True)
class Compare:
    """``left op right`` with one of the six comparison operators."""

    op: str
    left: Field | Literal
    right: Field | Literal


@dataclass(frozen=True, slots=True)
class BoolOp:
    """``and``/``or`` over two sub-expressions, or ``not`` over one (``right`` is None)."""

    op: str
    left: Expr
    right: Expr | None = None


Expr = Compare | BoolOp


# --- writing ---------------------------------------------------------------------------------
def format_datetime(value: datetime) -> str:
    """Render a datetime as Dataverse does: UTC, whole seconds, ``Z`` suffix."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def literal(value: object) -> str:
    """Render a Python value as an OData literal (strings quoted, inner quotes doubled)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no OData literal for {type(value).__name__}")


def key_segment(key: Mapping[str, object] | str) -> str:
    """Render the part inside ``set(...)``: a bare GUID, or ``name='v'[,name2=...]``.

    The result is percent-encoded for a URL path (``/``, ``#``, ``?``, ``%`` and spaces
    would otherwise change what the server parses); quotes stay readable.
    """
    if isinstance(key, str):
        text = key
    else:
        if not key:
            raise ValueError("a key predicate needs at least one column")
        text = ",".join(f"{name}={literal(value)}" for name, value in key.items())
    return quote(text, safe="'(),=:-._~")


# --- reading ---------------------------------------------------------------------------------
def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ODataSyntaxError(f"unexpected text at position {pos}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _literal_value(kind: str, raw: str) -> Any:
    if kind == "str":
        return raw[1:-1].replace("''", "'")
    if kind == "guid":
        return raw.lower()
    if kind == "dt":
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).astimezone(UTC)
    if kind == "date":
        return date.fromisoformat(raw)
    if kind == "num":
        return Decimal(raw) if "." in raw else int(raw)
    lowered = raw.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    if lowered == "null":
        return None
    raise ODataSyntaxError(f"not a literal: {raw}")


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise ODataSyntaxError("unexpected end of expression")
        self.pos += 1
        return token

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "name" and token[1].lower() == word:
            self.pos += 1
            return True
        return False

    def expression(self) -> Expr:
        left = self.conjunction()
        while self.keyword("or"):
            left = BoolOp("or", left, self.conjunction())
        return left

    def conjunction(self) -> Expr:
        left = self.negation()
        while self.keyword("and"):
            left = BoolOp("and", left, self.negation())
        return left

    def negation(self) -> Expr:
        if self.keyword("not"):
            return BoolOp("not", self.negation())
        if self.peek() == ("punct", "("):
            self.take()
            inner = self.expression()
            if self.take() != ("punct", ")"):
                raise ODataSyntaxError("missing closing parenthesis")
            return inner
        left = self.operand()
        kind, op = self.take()
        if kind != "name" or op.lower() not in COMPARISONS:
            raise ODataSyntaxError(f"expected a comparison operator, got {op!r}")
        return Compare(op.lower(), left, self.operand())

    def operand(self) -> Field | Literal:
        kind, raw = self.take()
        if kind == "punct":
            raise ODataSyntaxError(f"unexpected {raw!r}")
        if kind == "name" and raw.lower() not in ("true", "false", "null"):
            return Field(raw)
        return Literal(_literal_value(kind, raw))


def parse_filter(text: str) -> Expr:
    """Parse a ``$filter`` value into an expression tree."""
    parser = _Parser(text)
    expr = parser.expression()
    if parser.peek() is not None:
        raise ODataSyntaxError(f"unexpected {parser.peek()[1]!r} after expression")  # type: ignore[index]
    return expr


def fields_of(expr: Expr) -> set[str]:
    """Return the column names an expression refers to."""
    if isinstance(expr, BoolOp):
        names = fields_of(expr.left)
        return names | fields_of(expr.right) if expr.right is not None else names
    return {side.name for side in (expr.left, expr.right) if isinstance(side, Field)}


def _normalise(value: Any) -> Any:
    return value.casefold() if isinstance(value, str) else value


def _compare(op: str, left: Any, right: Any) -> bool:
    if op in ("eq", "ne"):
        equal = _normalise(left) == _normalise(right)
        return equal if op == "eq" else not equal
    if left is None or right is None:
        return False
    left, right = _normalise(left), _normalise(right)
    try:
        if op == "gt":
            return bool(left > right)
        if op == "ge":
            return bool(left >= right)
        if op == "lt":
            return bool(left < right)
        return bool(left <= right)
    except TypeError:
        return False


def evaluate(expr: Expr, row: Mapping[str, Any]) -> bool:
    """Tell whether ``row`` satisfies ``expr`` (strings compare case-insensitively, like SQL)."""
    if isinstance(expr, BoolOp):
        if expr.op == "not":
            return not evaluate(expr.left, row)
        assert expr.right is not None
        if expr.op == "and":
            return evaluate(expr.left, row) and evaluate(expr.right, row)
        return evaluate(expr.left, row) or evaluate(expr.right, row)

    def value(side: Field | Literal) -> Any:
        return row.get(side.name) if isinstance(side, Field) else side.value

    return _compare(expr.op, value(expr.left), value(expr.right))


def parse_orderby(text: str) -> list[tuple[str, bool]]:
    """Parse ``$orderby`` into ``(column, descending)`` pairs."""
    out: list[tuple[str, bool]] = []
    for part in text.split(","):
        words = part.split()
        if not words or len(words) > 2 or not re.fullmatch(r"[A-Za-z_]\w*", words[0]):
            raise ODataSyntaxError(f"bad $orderby item {part.strip()!r}")
        direction = words[1].lower() if len(words) == 2 else "asc"
        if direction not in ("asc", "desc"):
            raise ODataSyntaxError(f"bad $orderby direction {words[1]!r}")
        out.append((words[0], direction == "desc"))
    return out


def parse_key(text: str) -> str | dict[str, Any]:
    """Parse the inside of ``set(...)``: a GUID string, or a dict of alternate-key values."""
    tokens = _tokens(text)
    if len(tokens) == 1 and tokens[0][0] == "guid":
        return tokens[0][1].lower()
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        if (
            i + 2 >= len(tokens)
            or tokens[i][0] != "name"
            or tokens[i + 1] != ("punct", "=")
            or tokens[i + 2][0] in ("name", "punct")
            and tokens[i + 2][1].lower() not in ("true", "false", "null")
        ):
            raise ODataSyntaxError("bad key predicate")
        out[tokens[i][1]] = _literal_value(tokens[i + 2][0], tokens[i + 2][1])
        i += 3
        if i < len(tokens):
            if tokens[i] != ("punct", ","):
                raise ODataSyntaxError("bad key predicate separator")
            i += 1
    if not out:
        raise ODataSyntaxError("empty key predicate")
    return out
