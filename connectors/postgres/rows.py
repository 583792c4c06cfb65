"""Compiled readers for the common row change: pgoutput bytes straight into a ``Change``.

Every journaled PostgreSQL row change is decoded once, when the journal is read
(``connectors.postgres.rowformat``), and that is mostly turning Insert/Update/Delete
messages into Changes. A generic loop over the columns pays, per column, for the loop
itself, a name lookup, a separate pass for type conversion and a dict store; here each
published table version gets its own function, compiled once from a fixed template, in which
the columns are unrolled and each column's conversion is inlined. Nothing taken from the
server (column names, values) is ever part of the compiled source: names reach the function
as constants bound in its namespace, and the template only varies by column count, position
and type.

A reader handles the plain case: an Insert, an Update without an old tuple and a Delete
('K' or 'O'), with every column text ('t') or NULL ('n') and every value converting
cleanly. For anything else (unchanged TOAST 'u', a changed key, malformed bytes, a value
its converter rejects) it returns None and the caller takes the general path, which
decodes the message fully and reports or keeps what it finds. Readers never raise.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

from agent.model import Change, build_change
from connectors.postgres.values import Converter, PgValueError

__all__ = ["MEMO_SIZE", "RowReader", "compile_reader"]

# (data, position, version, source_ts, origin, trace_id) -> Change, or None: take the general path.
RowReader = Callable[[bytes, str, str, "datetime | None", "str | None", str], "Change | None"]

# Converted values of memoised columns kept per column before the memo starts afresh.
MEMO_SIZE: Final = 4096

_FAILURES: Final = (IndexError, struct.error, UnicodeDecodeError, ValueError, ArithmeticError, PgValueError)

# How a column's text ('t') value is read: ``s:p`` is its byte range in ``data``.
_TEXT = "data[s:p].decode()"
_INT = "int(data[s:p])"
_DECIMAL = "_Decimal(data[s:p].decode())"
_CONVERT = "C{i}(data[s:p].decode())"
_MEMO = """t = data[s:p]
        v{i} = M{i}.get(t)
        if v{i} is None:
            v{i} = C{i}(t.decode())
            if len(M{i}) >= {memo_size}:
                M{i}.clear()
            M{i}[t] = v{i}"""

_COLUMN = """
    k = data[p]
    if k == 116:
        s = p + 5
        p = s + _I(data, p + 1)[0]
        {read}
    elif k == 110:
        v{i} = None
        p += 1
    else:
        return None"""

_BODY = """
def read(data, position, version, ts, origin, trace_id):
    try:
        tag = data[0]
        marker = data[5]
        if marker == 78:
            if tag == 73:
                op = "insert"
            elif tag == 85:
                op = "update"
            else:
                return None
        elif tag == 68 and (marker == 75 or marker == 79):
            op = "delete"
        else:
            return None
        if _H(data, 6)[0] != {ncols}:
            return None
        p = 8{columns}
    except _FAILURES:
        return None
    if p != len(data):
        return None
    if op == "delete" and marker == 75:
        fields = {{{identity}}}
    else:
        fields = {{{all_fields}}}
    return _build(SOURCE, STREAM, OBJECT, op, {{{key}}}, fields, position, version, ts, origin, _NONE, None,
                  trace_id)
"""


def compile_reader(
    *,
    source: str,
    stream: str,
    object_name: str,
    names: Sequence[str],
    converters: Sequence[Converter | None],
    fast: Sequence[str | None],
    key: Sequence[int],
    identity: Sequence[int],
) -> RowReader:
    """Compile the reader of one table version.

    ``names`` (distinct) and ``converters`` have one entry per published column; ``fast``
    says per column how its text converts: ``"int"`` (``int``), ``"decimal"`` (``Decimal``),
    ``"memo"`` (its converter, memoised on the raw bytes: for types whose text repeats, such
    as timestamps) or None (its converter, or the text itself where it has none). ``key``
    and ``identity`` are column indexes: the change's key, and the columns a key-only
    ('K') Delete carries.
    """
    if len(set(names)) != len(names):
        raise ValueError("a compiled reader needs distinct column names")
    namespace: dict[str, Any] = {
        "_I": struct.Struct(">I").unpack_from,
        "_H": struct.Struct(">H").unpack_from,
        "_Decimal": Decimal,
        "_FAILURES": _FAILURES,
        "_build": build_change,
        "_NONE": frozenset(),
        "SOURCE": source,
        "STREAM": stream,
        "OBJECT": object_name,
    }
    columns = []
    for i, (name, conv, how) in enumerate(zip(names, converters, fast, strict=True)):
        namespace[f"N{i}"] = name
        if how == "int":
            read = f"v{i} = {_INT}"
        elif how == "decimal":
            read = f"v{i} = {_DECIMAL}"
        elif conv is None:
            read = f"v{i} = {_TEXT}"
        elif how == "memo":
            namespace[f"C{i}"] = conv
            namespace[f"M{i}"] = {}
            read = _MEMO.format(i=i, memo_size=MEMO_SIZE)
        else:
            namespace[f"C{i}"] = conv
            read = f"v{i} = " + _CONVERT.format(i=i)
        columns.append(_COLUMN.format(i=i, read=read).replace("\n", "\n    "))
    source_text = _BODY.format(
        ncols=len(names),
        columns="".join(columns),
        identity=", ".join(f"N{i}: v{i}" for i in identity),
        all_fields=", ".join(f"N{i}: v{i}" for i in range(len(names))),
        key=", ".join(f"N{i}: v{i}" for i in key),
    )
    exec(compile(source_text, f"<pgoutput reader for {len(names)} columns>", "exec"), namespace)  # noqa: S102
    reader: RowReader = namespace["read"]
    return reader
