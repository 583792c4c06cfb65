"""Check config-supplied row filters: a boolean expression over the table's own columns, or refused.

A row filter ends up inside ``CREATE PUBLICATION ... WHERE (...)``, so it is parsed with
pglast (PostgreSQL's own parser) rather than trusted as text. Only a small, side-effect-free
grammar passes: comparisons, AND/OR/NOT, IS [NOT] NULL, IS [NOT] TRUE/FALSE, IS [NOT]
DISTINCT FROM, IN over constants, BETWEEN, LIKE/ILIKE, constants, casts to simple built-in
types, unqualified column references and a few immutable built-in functions. What passes is
returned deparsed by pglast, so what reaches the server is the normalised tree, never the
raw text (comments and odd spacing cannot survive).
"""

from __future__ import annotations

from collections.abc import Collection

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType
from pglast.parser import ParseError, scan
from pglast.stream import RawStream

from agent.errors import ConfigError, ConfigIssue

__all__ = ["check_row_filter", "referenced_columns"]

_MAX_LENGTH = 2000

# Immutable built-ins only (PostgreSQL refuses non-immutable functions in row filters too).
# date_trunc is left out on purpose: its timestamptz variant depends on TimeZone (stable).
_FUNCTIONS = frozenset({"lower", "upper", "length", "char_length", "abs", "btrim", "ltrim", "rtrim"})
_COMPARISONS = frozenset({"=", "<>", "!=", "<", "<=", ">", ">="})
_ARITHMETIC = frozenset({"+", "-", "*", "/", "%", "||"})
_TYPES = frozenset(
    {
        "int2", "int4", "int8", "smallint", "integer", "int", "bigint", "numeric", "decimal",
        "float4", "float8", "real", "text", "varchar", "bpchar", "char", "bool", "boolean",
        "date", "timestamp", "timestamptz", "time", "uuid",
    }
)  # fmt: skip
_SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid", "oid"})
_COMPARE_KINDS = frozenset(
    {
        A_Expr_Kind.AEXPR_DISTINCT,
        A_Expr_Kind.AEXPR_NOT_DISTINCT,
        A_Expr_Kind.AEXPR_LIKE,
        A_Expr_Kind.AEXPR_ILIKE,
    }
)
_BETWEEN_KINDS = frozenset(
    {
        A_Expr_Kind.AEXPR_BETWEEN,
        A_Expr_Kind.AEXPR_NOT_BETWEEN,
        A_Expr_Kind.AEXPR_BETWEEN_SYM,
        A_Expr_Kind.AEXPR_NOT_BETWEEN_SYM,
    }
)
# Every clause a SELECT can carry besides its WHERE: any of them set means the text escaped
# the WHERE (e.g. "x = 1 ORDER BY 1", "true GROUP BY 1").
_OTHER_CLAUSES = (
    "distinctClause", "intoClause", "fromClause", "groupClause", "havingClause", "windowClause",
    "valuesLists", "sortClause", "limitOffset", "limitCount", "lockingClause", "withClause",
    "larg", "rarg",
)  # fmt: skip


class _Refused(Exception):
    """Internal: why a filter was refused; turned into a ConfigIssue."""


class _Scope:
    """Internal: the columns a filter may use, and the ones it was seen to use."""

    __slots__ = ("allowed", "seen")

    def __init__(self, allowed: frozenset[str] | None, seen: set[str]) -> None:
        self.allowed = allowed
        self.seen = seen


def check_row_filter(expr: str, columns: Collection[str] | None, *, key: str) -> str:
    """Return the normalised row filter, or raise ConfigError naming ``key`` and the reason.

    ``columns`` are the table's column names; when given, any other name is refused.
    """
    try:
        return _check(expr, None if columns is None else frozenset(columns), set())
    except _Refused as exc:
        raise ConfigError([ConfigIssue(file="", key=key, reason=f"row filter refused: {exc}")]) from None


def referenced_columns(expr: str) -> frozenset[str]:
    """Return the column names an accepted row filter uses; raises ConfigError if it is refused."""
    seen: set[str] = set()
    try:
        _check(expr, None, seen)
    except _Refused as exc:
        raise ConfigError(
            [ConfigIssue(file="", key="row_filter", reason=f"row filter refused: {exc}")]
        ) from None
    return frozenset(seen)


def _check(expr: str, columns: frozenset[str] | None, seen: set[str]) -> str:
    if not isinstance(expr, str) or not expr.strip():
        raise _Refused("it must be a non-empty SQL boolean expression")
    if len(expr) > _MAX_LENGTH:
        raise _Refused(f"it is longer than {_MAX_LENGTH} characters")
    text = "SELECT 1 WHERE " + expr
    try:
        tokens = scan(text)
        statements = parse_sql(text)
    except ParseError as exc:
        raise _Refused(f"it is not valid SQL ({exc})") from None
    if any(tok.name in ("SQL_COMMENT", "C_COMMENT") for tok in tokens):
        raise _Refused("comments are not allowed")
    if len(statements) != 1:
        raise _Refused("it must be one expression, not several statements")
    stmt = statements[0].stmt
    if not isinstance(stmt, ast.SelectStmt) or stmt.whereClause is None:
        raise _Refused("it must be a plain boolean expression (only a WHERE condition)")
    if any(getattr(stmt, name, None) for name in _OTHER_CLAUSES) or not _is_select_one(stmt):
        raise _Refused("it must be a plain boolean expression, with no further SQL clauses")
    _boolean(stmt.whereClause, _Scope(columns, seen))
    return str(RawStream()(stmt.whereClause))


def _is_select_one(stmt: ast.SelectStmt) -> bool:
    targets = stmt.targetList or ()
    if len(targets) != 1 or not isinstance(targets[0], ast.ResTarget):
        return False
    value = targets[0].val
    return (
        targets[0].name is None
        and isinstance(value, ast.A_Const)
        and isinstance(value.val, ast.Integer)
        and value.val.ival == 1
    )


def _boolean(node: object, scope: _Scope) -> None:
    """Check a node that must yield a boolean."""
    if isinstance(node, ast.BoolExpr):
        if node.boolop not in (BoolExprType.AND_EXPR, BoolExprType.OR_EXPR, BoolExprType.NOT_EXPR):
            raise _Refused("unsupported boolean operator")
        for arg in node.args or ():
            _boolean(arg, scope)
        return
    if isinstance(node, ast.NullTest):
        _value(node.arg, scope)
        return
    if isinstance(node, ast.BooleanTest):
        _boolean(node.arg, scope)
        return
    if isinstance(node, ast.A_Expr):
        _predicate(node, scope)
        return
    if isinstance(node, ast.ColumnRef):
        _column(node, scope)  # a boolean column used as a condition
        return
    if isinstance(node, ast.A_Const):
        if node.isnull or isinstance(node.val, ast.Boolean):
            return
        raise _Refused("a constant that is not true/false/NULL is not a condition")
    if isinstance(node, ast.TypeCast):
        _cast(node, scope)
        return
    raise _Refused(f"{_describe(node)} is not allowed as a condition")


def _predicate(node: ast.A_Expr, scope: _Scope) -> None:
    kind = node.kind
    if kind == A_Expr_Kind.AEXPR_OP:
        op = _operator(node)
        if op not in _COMPARISONS:
            raise _Refused(f"operator {op!r} does not give a condition; use a comparison")
        _value(node.lexpr, scope)
        _value(node.rexpr, scope)
        return
    if kind in _COMPARE_KINDS:
        _operator(node)
        _value(node.lexpr, scope)
        _value(node.rexpr, scope)
        return
    if kind == A_Expr_Kind.AEXPR_IN:
        _operator(node)
        _value(node.lexpr, scope)
        items = node.rexpr
        if not isinstance(items, tuple | list) or not items:
            raise _Refused("IN needs a list of constants")
        for item in items:
            _constant(item)
        return
    if kind in _BETWEEN_KINDS:
        _value(node.lexpr, scope)
        bounds = node.rexpr
        if not isinstance(bounds, tuple | list) or len(bounds) != 2:
            raise _Refused("BETWEEN needs two bounds")
        for bound in bounds:
            _value(bound, scope)
        return
    raise _Refused(f"{_describe(node)} is not allowed")


def _operator(node: ast.A_Expr) -> str:
    names = node.name or ()
    if len(names) != 1 or not isinstance(names[0], ast.String):
        raise _Refused("schema-qualified operators (OPERATOR(...)) are not allowed")
    return str(names[0].sval)


def _value(node: object, scope: _Scope) -> None:
    """Check a node that yields a value (operand of a comparison or function)."""
    if isinstance(node, ast.ColumnRef):
        _column(node, scope)
    elif isinstance(node, ast.A_Const):
        return
    elif isinstance(node, ast.TypeCast):
        _cast(node, scope)
    elif isinstance(node, ast.FuncCall):
        _function(node, scope)
    elif isinstance(node, ast.CoalesceExpr):
        for arg in node.args or ():
            _value(arg, scope)
    elif isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_OP:
        op = _operator(node)
        if op in _ARITHMETIC:
            if node.lexpr is not None:
                _value(node.lexpr, scope)
            _value(node.rexpr, scope)
        else:
            _boolean(node, scope)
    elif isinstance(node, ast.SubLink):
        raise _Refused("subqueries are not allowed")
    else:
        _boolean(node, scope)


def _constant(node: object) -> None:
    if isinstance(node, ast.A_Const):
        return
    if isinstance(node, ast.TypeCast) and isinstance(node.arg, ast.A_Const):
        _type_name(node.typeName)
        return
    if isinstance(node, ast.A_Expr) and node.kind == A_Expr_Kind.AEXPR_OP and node.lexpr is None:
        if _operator(node) == "-" and isinstance(node.rexpr, ast.A_Const):
            return  # a negative number
    if isinstance(node, ast.SubLink):
        raise _Refused("subqueries are not allowed")
    raise _Refused(f"IN lists may hold only constants, not {_describe(node)}")


def _column(node: ast.ColumnRef, scope: _Scope) -> None:
    fields = node.fields or ()
    if len(fields) != 1 or not isinstance(fields[0], ast.String):
        raise _Refused("column references must be unqualified column names (no table., no *)")
    name = str(fields[0].sval)
    if name in _SYSTEM_COLUMNS:
        raise _Refused(f"system column {name!r} is not allowed")
    if scope.allowed is not None and name not in scope.allowed:
        raise _Refused(f"unknown column {name!r}; the table has {', '.join(sorted(scope.allowed))}")
    scope.seen.add(name)


def _cast(node: ast.TypeCast, scope: _Scope) -> None:
    _type_name(node.typeName)
    _value(node.arg, scope)


def _type_name(type_name: ast.TypeName | None) -> None:
    if type_name is None:
        raise _Refused("a cast needs a type")
    names = [str(n.sval) for n in type_name.names or () if isinstance(n, ast.String)]
    simple = len(names) == 1 or (len(names) == 2 and names[0] == "pg_catalog")
    if not simple or names[-1] not in _TYPES or type_name.setof or type_name.arrayBounds:
        raise _Refused(f"cast to {'.'.join(names) or '?'} is not allowed; use a simple built-in type")
    for mod in type_name.typmods or ():
        if not isinstance(mod, ast.A_Const):
            raise _Refused("type modifiers must be constants")


def _function(node: ast.FuncCall, scope: _Scope) -> None:
    names = [str(n.sval) for n in node.funcname or () if isinstance(n, ast.String)]
    simple = len(names) == 1 or (len(names) == 2 and names[0] == "pg_catalog")
    if not simple or names[-1] not in _FUNCTIONS:
        raise _Refused(
            f"function {'.'.join(names) or '?'}() is not allowed; allowed: {', '.join(sorted(_FUNCTIONS))}"
        )
    if (
        node.agg_star
        or node.agg_distinct
        or node.agg_order
        or node.agg_filter
        or node.over
        or node.func_variadic
        or node.agg_within_group
    ):
        raise _Refused(f"{names[-1]}() may not be used as an aggregate or window function")
    for arg in node.args or ():
        if isinstance(arg, ast.NamedArgExpr):
            raise _Refused("named function arguments are not allowed")
        _value(arg, scope)


def _describe(node: object) -> str:
    if isinstance(node, ast.ParamRef):
        return "a parameter ($n)"
    if isinstance(node, ast.SubLink):
        return "a subquery"
    if isinstance(node, ast.FuncCall):
        return "a function call"
    if isinstance(node, ast.A_Expr) and node.kind is not None:
        return f"the {node.kind.name.removeprefix('AEXPR_').replace('_', ' ')} expression"
    return f"a {type(node).__name__} expression"
