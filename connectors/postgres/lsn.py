"""PostgreSQL log sequence numbers: the ``X/XXXXXXXX`` text form and the 64-bit integer."""

from __future__ import annotations

_LSN_MAX = (1 << 64) - 1


def lsn_to_str(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints it, e.g. ``0/16B3748`` (uppercase, unpadded)."""
    if not 0 <= lsn <= _LSN_MAX:
        raise ValueError("LSN out of range")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    """Parse PostgreSQL's ``X/X`` LSN text; raises ValueError if it is not one."""
    hi, sep, lo = text.partition("/")
    if not sep or not _is_hex32(hi) or not _is_hex32(lo):
        raise ValueError("not an LSN: expected 'X/X' with 1-8 hex digits on each side")
    return (int(hi, 16) << 32) | int(lo, 16)


def _is_hex32(part: str) -> bool:
    return 0 < len(part) <= 8 and part.isascii() and all(c in "0123456789abcdefABCDEF" for c in part)
