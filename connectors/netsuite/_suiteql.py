"""The SuiteQL subset the NetSuite emulator understands: parse a query, run it over rows.

Grammar (case-insensitive keywords)::

    SELECT item {, item} FROM table [WHERE cond] [ORDER BY expr [ASC|DESC] {, ...}]
    item := expr [AS alias] | *
    cond := conj {OR conj};  conj := unit {AND unit};  unit := NOT unit | ( cond ) | predicate
    predicate := expr (= | <> | != | < | <= | > | >=) expr | expr IS [NOT] NULL
               | expr [NOT] IN ( expr {, expr} )
    expr := column | 'text' | number | TO_CHAR(expr, 'fmt') | TO_DATE('text', 'fmt')

Date formats use Oracle's model (``YYYY MM DD HH24 HH12 HH MI SS AM PM``, ``"quoted"``
literals, punctuation). TO_CHAR and TO_DATE work in the session zone; a date column
projected without TO_CHAR is rendered by the caller in the user's display format.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal
from typing import Any

Row = Mapping[str, Any]

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>\d+(?:\.\d+)?)|(?P<op><=|>=|<>|!=|[=<>(),*])"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))"
)
_FMT_TOKEN = re.compile(r'"[^"]*"|YYYY|HH24|HH12|HH|MM|DD|MI|SS|AM|PM|.', re.IGNORECASE)
_FMT_STRFTIME = {
    "YYYY": "%Y",
    "MM": "%m",
    "DD": "%d",
    "HH24": "%H",
    "HH12": "%I",
    "HH": "%I",
    "MI": "%M",
    "SS": "%S",
    "AM": "%p",
    "PM": "%p",
}


class SuiteQLError(Exception):
    """A query the emulator cannot parse or evaluate (NetSuite answers 400)."""


@dataclass(frozen=True, slots=True)
class Column:
    """A column reference (lower-cased)."""

    name: str


@dataclass(frozen=True, slots=True)
class Literal:
    """A text or numeric literal."""

    value: str | int | Decimal


@dataclass(frozen=True, slots=True)
class Func:
    """TO_CHAR or TO_DATE with its arguments."""

    name: str
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Compare:
    """A binary comparison."""

    op: str
    left: Any
    right: Any


@dataclass(frozen=True, slots=True)
class Logic:
    """AND / OR over parts, or NOT over one part."""

    op: str
    parts: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class IsNull:
    """``expr IS [NOT] NULL``."""

    expr: Any
    negate: bool


@dataclass(frozen=True, slots=True)
class InList:
    """``expr [NOT] IN (...)``."""

    expr: Any
    values: tuple[Any, ...]
    negate: bool


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed SELECT: items (expr, output key), table, condition, order."""

    items: tuple[tuple[Any, str], ...]
    star: bool
    table: str
    where: Any
    order: tuple[tuple[Any, bool], ...]


def parse(text: str) -> Query:
    """Parse one SELECT statement of the supported subset."""
    return _Parser(_tokenize(text)).query()


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos, end = 0, len(text.rstrip().rstrip(";"))
    while pos < end:
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise SuiteQLError(f"Invalid search query. Unexpected character at position {pos}.")
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self, offset: int = 0) -> tuple[str, str]:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else ("eof", "")

    def keyword(self, *words: str) -> bool:
        kind, value = self.peek()
        if kind == "word" and value.upper() in words:
            self.i += 1
            return True
        return False

    def expect(self, value: str) -> None:
        kind, got = self.peek()
        if got.upper() != value:
            raise SuiteQLError(f"Invalid search query. Expected {value} but found {got or 'end'}.")
        self.i += 1

    def query(self) -> Query:
        self.expect("SELECT")
        items: list[tuple[Any, str]] = []
        star = False
        while True:
            if self.peek() == ("op", "*"):
                self.i += 1
                star = True
            else:
                expr = self.expr()
                alias = self.alias(expr, len(items))
                items.append((expr, alias))
            if self.peek() != ("op", ","):
                break
            self.i += 1
        self.expect("FROM")
        kind, table = self.peek()
        if kind != "word":
            raise SuiteQLError("Invalid search query. Missing table name.")
        self.i += 1
        where = self.condition() if self.keyword("WHERE") else None
        order: list[tuple[Any, bool]] = []
        if self.keyword("ORDER"):
            self.expect("BY")
            while True:
                expr = self.expr()
                desc = self.keyword("DESC")
                if not desc:
                    self.keyword("ASC")
                order.append((expr, desc))
                if self.peek() != ("op", ","):
                    break
                self.i += 1
        if self.peek()[0] != "eof":
            raise SuiteQLError(f"Invalid search query. Unexpected {self.peek()[1]}.")
        return Query(tuple(items), star, table.lower(), where, tuple(order))

    def alias(self, expr: Any, index: int) -> str:
        if self.keyword("AS"):
            kind, value = self.peek()
            if kind != "word":
                raise SuiteQLError("Invalid search query. Missing alias.")
            self.i += 1
            return value.lower()
        if isinstance(expr, Column):
            return expr.name.rsplit(".", 1)[-1]
        return f"expr{index + 1}"

    def condition(self) -> Any:
        parts = [self.conjunction()]
        while self.keyword("OR"):
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else Logic("OR", tuple(parts))

    def conjunction(self) -> Any:
        parts = [self.unit()]
        while self.keyword("AND"):
            parts.append(self.unit())
        return parts[0] if len(parts) == 1 else Logic("AND", tuple(parts))

    def unit(self) -> Any:
        if self.keyword("NOT"):
            return Logic("NOT", (self.unit(),))
        if self.peek() == ("op", "("):
            self.i += 1
            inner = self.condition()
            self.expect(")")
            return inner
        left = self.expr()
        if self.keyword("IS"):
            negate = self.keyword("NOT")
            self.expect("NULL")
            return IsNull(left, negate)
        negate = self.keyword("NOT")
        if self.keyword("IN"):
            self.expect("(")
            values = [self.expr()]
            while self.peek() == ("op", ","):
                self.i += 1
                values.append(self.expr())
            self.expect(")")
            return InList(left, tuple(values), negate)
        kind, op = self.peek()
        if negate or kind != "op" or op not in ("=", "<>", "!=", "<", "<=", ">", ">="):
            raise SuiteQLError(f"Invalid search query. Expected a comparison near {op or 'end'}.")
        self.i += 1
        return Compare("<>" if op == "!=" else op, left, self.expr())

    def expr(self) -> Any:
        kind, value = self.peek()
        self.i += 1
        if kind == "str":
            return Literal(value[1:-1].replace("''", "'"))
        if kind == "num":
            return Literal(Decimal(value) if "." in value else int(value))
        if kind == "word" and self.peek() == ("op", "("):
            name = value.upper()
            if name not in ("TO_CHAR", "TO_DATE"):
                raise SuiteQLError(f"Invalid search query. Unknown function {value}.")
            self.i += 1
            args = [self.expr()]
            while self.peek() == ("op", ","):
                self.i += 1
                args.append(self.expr())
            self.expect(")")
            return Func(name, tuple(args))
        if kind == "word":
            return Column(value.lower())
        raise SuiteQLError(f"Invalid search query. Unexpected {value or 'end'}.")


# --- evaluation ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """How dates are read and written: the session zone and the user's display rendering."""

    zone: tzinfo = UTC
    display_zone: tzinfo = UTC
    display_datetime: str = "%m/%d/%Y %I:%M %p"
    display_date: str = "%m/%d/%Y"


def run(query: Query, rows: Sequence[Row], session: Session, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Filter, order and project ``rows``; nulls are left out of each result item."""
    known = set(columns)
    _check_columns(query, known)
    hits = [r for r in rows if query.where is None or _truth(query.where, r, session)]
    for expr, desc in reversed(query.order):
        present = [r for r in hits if _value(expr, r, session) is not None]
        absent = [r for r in hits if _value(expr, r, session) is None]
        present.sort(key=_sorter(expr, session), reverse=desc)
        hits = present + absent
    items = [(Column(c), c) for c in columns] if query.star else list(query.items)
    out: list[dict[str, Any]] = []
    for row in hits:
        item: dict[str, Any] = {"links": []}
        for expr, key in items:
            value = _value(expr, row, session)
            if value is not None:
                item[key] = _render(value, session)
        out.append(item)
    return out


def _sorter(expr: Any, session: Session) -> Callable[[Row], Any]:
    def key(row: Row) -> Any:
        return _sort_key(_value(expr, row, session))

    return key


def _check_columns(query: Query, known: set[str]) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, Column) and node.name.rsplit(".", 1)[-1] not in known:
            raise SuiteQLError(f"Invalid search query. Unknown identifier '{node.name}'.")
        for child in _children(node):
            walk(child)

    for expr, _ in query.items:
        walk(expr)
    walk(query.where)
    for expr, _ in query.order:
        walk(expr)


def _children(node: Any) -> tuple[Any, ...]:
    if isinstance(node, Func):
        return node.args
    if isinstance(node, Compare):
        return (node.left, node.right)
    if isinstance(node, Logic):
        return node.parts
    if isinstance(node, IsNull):
        return (node.expr,)
    if isinstance(node, InList):
        return (node.expr, *node.values)
    return ()


def _value(node: Any, row: Row, session: Session) -> Any:
    if isinstance(node, Column):
        return row.get(node.name.rsplit(".", 1)[-1])
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Func):
        return _call(node, row, session)
    raise SuiteQLError("Invalid search query. A condition is not a value.")


def _call(node: Func, row: Row, session: Session) -> Any:
    if (
        len(node.args) != 2
        or not isinstance(node.args[1], Literal)
        or not isinstance(node.args[1].value, str)
    ):
        raise SuiteQLError(f"Invalid search query. {node.name} needs a value and a format literal.")
    fmt = node.args[1].value
    value = _value(node.args[0], row, session)
    if value is None:
        return None
    if node.name == "TO_CHAR":
        if isinstance(value, datetime):
            return value.astimezone(session.zone).strftime(strftime_pattern(fmt))
        if isinstance(value, date):
            return value.strftime(strftime_pattern(fmt))
        return str(value)
    if not isinstance(value, str):
        raise SuiteQLError("Invalid search query. TO_DATE needs a text value.")
    try:
        parsed = datetime.strptime(value, strftime_pattern(fmt))
    except ValueError as exc:
        raise SuiteQLError(f"Invalid search query. '{value}' does not match format '{fmt}'.") from exc
    return parsed.replace(tzinfo=session.zone).astimezone(UTC)


def strftime_pattern(fmt: str) -> str:
    """Translate an Oracle date format model into a ``strftime``/``strptime`` pattern."""
    out = []
    for token in _FMT_TOKEN.findall(fmt):
        if token.startswith('"'):
            out.append(token[1:-1].replace("%", "%%"))
        else:
            out.append(_FMT_STRFTIME.get(token.upper(), token.replace("%", "%%")))
    return "".join(out)


def _truth(node: Any, row: Row, session: Session) -> bool:
    if isinstance(node, Logic):
        if node.op == "AND":
            return all(_truth(p, row, session) for p in node.parts)
        if node.op == "OR":
            return any(_truth(p, row, session) for p in node.parts)
        return not _truth(node.parts[0], row, session)
    if isinstance(node, IsNull):
        return (_value(node.expr, row, session) is None) != node.negate
    if isinstance(node, InList):
        left = _value(node.expr, row, session)
        if left is None:
            return False
        hit = any(_compare("=", left, _value(v, row, session)) for v in node.values)
        return hit != node.negate
    if isinstance(node, Compare):
        return _compare(node.op, _value(node.left, row, session), _value(node.right, row, session))
    raise SuiteQLError("Invalid search query. A value is not a condition.")


_OPS: Mapping[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "<>": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _compare(op: str, left: Any, right: Any) -> bool:
    if left is None or right is None:
        return False
    left, right = _coerce(left), _coerce(right)
    if isinstance(left, datetime) != isinstance(right, datetime):
        raise SuiteQLError("Invalid search query. Cannot compare a date with a non-date value.")
    if isinstance(left, int | Decimal) != isinstance(right, int | Decimal):
        left, right = str(left), str(right)
    return _OPS[op](left, right)


def _coerce(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def _sort_key(value: Any) -> Any:
    coerced = _coerce(value)
    if isinstance(coerced, datetime):
        return (0, coerced.timestamp(), "")
    if isinstance(coerced, int | Decimal):
        return (1, float(coerced), "")
    return (2, 0.0, str(coerced))


def _render(value: Any, session: Session) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(session.display_zone).strftime(session.display_datetime)
    if isinstance(value, date):
        return value.strftime(session.display_date)
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value
