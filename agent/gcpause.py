"""Hold off Python's cyclic garbage collector while a capture batch is built and journaled.

A capture batch allocates thousands of containers that stay alive until the batch is
journaled (a Change and its dicts per row). Each allocation counts toward the collector's
thresholds, so building one batch triggers dozens of collections that walk objects which
are all still in use, and every few batches a full collection that walks the whole heap:
about 1 us of every captured change's cost. Nothing a batch allocates forms reference
cycles, so reference counting frees it all once the batch is journaled; pausing the
collector for the batch loses nothing. Garbage cycles that other threads make meanwhile
wait at most one batch (tens of milliseconds) and are collected once the pause ends.

The pause is process-wide (the collector has one switch), so pauses are counted: the
collector comes back on when the last one ends, and only if it was on when the first began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]

_lock = threading.Lock()
_pauses = 0
_resume = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run the block with automatic garbage collection off (nested and thread-safe)."""
    global _pauses, _resume
    with _lock:
        if _pauses == 0:
            _resume = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _resume:
                gc.enable()
