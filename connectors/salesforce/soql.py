"""A small SOQL subset for the emulator: parse a query, evaluate its WHERE clause on a record.

Supported: ``SELECT f, ... FROM obj [WHERE expr] [ORDER BY f [ASC|DESC], ...] [LIMIT n]``,
where ``expr`` combines ``= != <> < <= > >=``, ``[NOT] IN (...)``, ``AND``, ``OR``, ``NOT``
and parentheses over quoted strings (with backslash escapes), unquoted datetimes and dates,
numbers, ``true``/``false`` and ``null``. Like Salesforce, a datetime field compared with a
quoted string is an error rather than a string comparison.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from connectors.salesforce.schema import NUMERIC_TYPES, SfField, SfSchema


class SoqlError(Exception):
    """A query Salesforce would refuse with 400: ``code`` is its errorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_TOKEN = re.compile(
    r"""\s*(?:
    (?P<str>'(?:[^'\\]|\\.)*')
  | (?P<dt>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2}))
  | (?P<date>\d{4}-\d{2}-\d{2})
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<op><=|>=|!=|<>|=|<|>|\(|\)|,)
  | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
)""",
    re.VERBOSE,
)
_UNESCAPE = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: selected fields, object, WHERE tree, ORDER BY and LIMIT."""

    fields: list[str]
    obj: str
    where: Any
    order: list[tuple[str, bool]]
    limit: int | None


class _Parser:
    """A recursive-descent parser for the SOQL subset the connectors use."""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, Any]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise SoqlError("MALFORMED_QUERY", f"unexpected token at position {pos}")
            pos = m.end()
            kind = m.lastgroup or ""
            self.tokens.append((kind, self._value(kind, m.group(kind))))
        self.i = 0

    @staticmethod
    def _value(kind: str, raw: str) -> Any:
        if kind == "str":
            out, chars = [], iter(raw[1:-1])
            for ch in chars:
                if ch == "\\":
                    nxt = next(chars, "")
                    if nxt not in _UNESCAPE:
                        raise SoqlError("MALFORMED_QUERY", "invalid escape sequence in string literal")
                    ch = _UNESCAPE[nxt]
                out.append(ch)
            return "".join(out)
        if kind == "dt":
            return datetime.fromisoformat(raw.replace("Z", "+00:00")).astimezone(UTC)
        if kind == "num":
            return Decimal(raw)
        return raw

    def _peek(self, word: str | None = None) -> bool:
        if self.i >= len(self.tokens):
            return False
        kind, value = self.tokens[self.i]
        return word is None or (kind in ("word", "op") and str(value).upper() == word)

    def _take(self, word: str | None = None) -> tuple[str, Any]:
        if self.i >= len(self.tokens) or (word is not None and not self._peek(word)):
            raise SoqlError("MALFORMED_QUERY", f"expecting {word or 'more input'}")
        self.i += 1
        return self.tokens[self.i - 1]

    def _field(self) -> str:
        kind, value = self._take()
        if kind != "word":
            raise SoqlError("MALFORMED_QUERY", "expecting a field name")
        return str(value)

    def parse(self) -> Query:
        """Parse the whole query."""
        self._take("SELECT")
        fields = [self._field()]
        while self._peek(","):
            self._take(",")
            fields.append(self._field())
        self._take("FROM")
        obj = self._field()
        where = None
        if self._peek("WHERE"):
            self._take("WHERE")
            where = self._or()
        order: list[tuple[str, bool]] = []
        if self._peek("ORDER"):
            self._take("ORDER")
            self._take("BY")
            while True:
                name = self._field()
                descending = self._peek("DESC")
                if descending or self._peek("ASC"):
                    self._take()
                order.append((name, descending))
                if not self._peek(","):
                    break
                self._take(",")
        limit = None
        if self._peek("LIMIT"):
            self._take("LIMIT")
            kind, value = self._take()
            if kind != "num":
                raise SoqlError("MALFORMED_QUERY", "LIMIT needs a number")
            limit = int(value)
        if self.i != len(self.tokens):
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: {self.tokens[self.i][1]}")
        return Query(fields, obj, where, order, limit)

    def _or(self) -> Any:
        parts = [self._and()]
        while self._peek("OR"):
            self._take("OR")
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def _and(self) -> Any:
        parts = [self._not()]
        while self._peek("AND"):
            self._take("AND")
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def _not(self) -> Any:
        if self._peek("NOT"):
            self._take("NOT")
            return ("not", self._not())
        if self._peek("("):
            self._take("(")
            inner = self._or()
            self._take(")")
            return inner
        name = self._field()
        negate = self._peek("NOT")
        if negate:
            self._take("NOT")
        if self._peek("IN"):
            self._take("IN")
            self._take("(")
            values = [self._literal()]
            while self._peek(","):
                self._take(",")
                values.append(self._literal())
            self._take(")")
            return ("in", name, values, negate)
        kind, op = self._take()
        if kind != "op" or op in ("(", ")", ","):
            raise SoqlError("MALFORMED_QUERY", "expecting a comparison operator")
        return ("cmp", name, "!=" if op == "<>" else op, self._literal())

    def _literal(self) -> tuple[str, Any]:
        kind, value = self._take()
        if kind == "word":
            lowered = str(value).lower()
            if lowered in ("true", "false"):
                return ("bool", lowered == "true")
            if lowered == "null":
                return ("null", None)
            raise SoqlError("MALFORMED_QUERY", f"unexpected bare word: {value}")
        if kind == "op":
            raise SoqlError("MALFORMED_QUERY", "expecting a value")
        return (kind, value)


def validate(node: Any, schema: SfSchema) -> None:
    """Check a WHERE tree against ``schema`` as Salesforce does before running anything."""
    if node is None:
        return
    tag = node[0]
    if tag in ("and", "or"):
        for child in node[1]:
            validate(child, schema)
        return
    if tag == "not":
        validate(node[1], schema)
        return
    f = schema.find(node[1])
    if f is None:
        raise SoqlError("INVALID_FIELD", f"No such column '{node[1]}' on entity '{schema.name}'.")
    expected = _kind_of(f)
    for kind, _ in node[2] if tag == "in" else [node[3]]:
        if kind not in ("null", expected):
            raise SoqlError(
                "INVALID_QUERY_FILTER_OPERATOR",
                f"value of filter criterion for field '{f.name}' must be of type {f.type}"
                + (" and should not be enclosed in quotes" if kind == "str" else ""),
            )


def evaluate(node: Any, record: Mapping[str, Any], schema: SfSchema) -> bool:
    """Tell whether ``record`` satisfies the (validated) WHERE tree ``node``."""
    tag = node[0]
    if tag == "and":
        return all(evaluate(n, record, schema) for n in node[1])
    if tag == "or":
        return any(evaluate(n, record, schema) for n in node[1])
    if tag == "not":
        return not evaluate(node[1], record, schema)
    f = schema.find(node[1])
    value = record.get(f.name) if f is not None else None
    if tag == "in":
        hit = any(_compare(value, "=", lit) for lit in node[2])
        return hit != node[3]
    return _compare(value, node[2], node[3])


def _kind_of(f: SfField) -> str:
    by_type = {"datetime": "dt", "date": "date", "boolean": "bool"}
    return by_type.get(f.type, "num" if f.type in NUMERIC_TYPES else "str")


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _compare(value: Any, op: str, literal: tuple[str, Any]) -> bool:
    kind, lit = literal
    if kind == "null":
        return (value is None) == (op == "=") if op in ("=", "!=") else False
    if value is None:
        return op == "!="
    if kind == "num":
        value = Decimal(str(value))
    return _OPS[op](value, lit)


def parse_soql(text: str) -> Query:
    """Parse ``text`` into a ``Query``; raise ``SoqlError`` for anything outside the subset."""
    return _Parser(text).parse()
