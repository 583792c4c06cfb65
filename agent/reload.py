"""Watch the config file and hand over a new ``Config`` only when it is valid and different.

Editors save in different ways: in place (modified, closed), by writing a temporary file
and renaming it over the original (moved), or by moving the original aside and creating a
new one (created). All of them show up as events in the file's folder, so the watcher
observes the folder and keeps only events naming the config file. One save emits several
events; a debounce (0.5 s by default) turns them into one check. The check loads the file
with the caller's ``load`` (the daemon's ``open_config``, so connector checks are included)
and then calls ``on_valid`` only when the digest differs from the running config's, or
``on_invalid`` with the ``ConfigError`` (every key and reason) when it does not load.
The running config is never touched here: swapping it is the caller's job.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.config import Config
from agent.errors import ConfigError
from agent.logging import log_event

logger = logging.getLogger(__name__)

DEFAULT_DEBOUNCE = 0.5
# Reading the file ourselves emits "opened" and "closed_no_write": reacting to those would
# make every check trigger the next one.
_EVENT_TYPES = frozenset({"created", "modified", "moved", "closed"})


class ConfigWatcher:
    """Debounced watchdog observer on the config file; calls back with validated configs."""

    def __init__(
        self,
        path: str | Path,
        on_valid: Callable[[Config], None],
        on_invalid: Callable[[ConfigError], None],
        load: Callable[[Path], Config],
        *,
        digest: str | None = None,
        debounce: float = DEFAULT_DEBOUNCE,
    ) -> None:
        """Watch ``path``; ``digest`` is the running config's (else the file's at ``start()``)."""
        self.path = Path(os.path.abspath(path))
        self._on_valid = on_valid
        self._on_invalid = on_invalid
        self._load = load
        self._digest = digest
        self._debounce = debounce
        # A symlinked config (e.g. into a deployment folder) changes where its target lives.
        self._names = {str(self.path), os.path.realpath(self.path)}
        self._cv = threading.Condition()
        self._due: float | None = None
        self._force = False
        self._stopping = False
        self._rejected: str | None = None
        self._observer: Any = None
        self._worker: threading.Thread | None = None

    @property
    def digest(self) -> str | None:
        """Digest of the config last handed over (or the one running at start)."""
        return self._digest

    def start(self) -> None:
        """Begin watching; returns at once (events are handled on background threads)."""
        if self._observer is not None:
            return
        if self._digest is None:
            try:
                self._digest = self._load(self.path).digest
            except ConfigError:
                self._digest = None
        self._stopping = False
        observer = Observer()
        handler = _Handler(self._names, self._poke)
        for folder in sorted({os.path.dirname(n) for n in self._names}):
            observer.schedule(handler, folder, recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._worker = threading.Thread(target=self._run, name="syncagent-config-watch", daemon=True)
        self._worker.start()
        log_event(logger, "config_watch_started", path=str(self.path), config=self._digest)

    def stop(self) -> None:
        """Stop watching; a check already running finishes first."""
        observer, self._observer = self._observer, None
        if observer is None:
            return
        observer.stop()
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        observer.join(timeout=5)
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None

    def trigger(self) -> None:
        """Check the file soon even without an event (SIGHUP); repeats a rejection if still bad."""
        with self._cv:
            self._force = True
        self._poke()

    # --- internals ----------------------------------------------------------------------------

    def _poke(self) -> None:
        with self._cv:
            self._due = time.monotonic() + self._debounce
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping:
                    if self._due is not None:
                        wait = self._due - time.monotonic()
                        if wait <= 0:
                            break
                        self._cv.wait(wait)
                    else:
                        self._cv.wait()
                if self._stopping:
                    return
                self._due = None
                force, self._force = self._force, False
            self._check(force)

    def _check(self, force: bool) -> None:
        try:
            content = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            content = None  # gone between rename steps, or unreadable: load() says which
        try:
            cfg = self._load(self.path)
        except ConfigError as exc:
            if content is not None and content == self._rejected and not force:
                return  # the same broken bytes again (an attribute change): already reported
            self._rejected = content
            self._on_invalid(exc)
            return
        self._rejected = None
        if cfg.digest == self._digest:
            return
        try:
            self._on_valid(cfg)
        except ConfigError as exc:
            # The caller may refuse a valid file it cannot apply live (a new system, say).
            self._rejected = content
            self._on_invalid(exc)
            return
        log_event(logger, "config_reloaded", path=str(self.path), previous=self._digest, config=cfg.digest)
        self._digest = cfg.digest


class _Handler(FileSystemEventHandler):
    """Passes on events that name the config file; ignores the folder's other files."""

    def __init__(self, names: set[str], poke: Callable[[], None]) -> None:
        super().__init__()
        self._names = names
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Poke the watcher when the event creates, changes or renames onto the config file."""
        if event.event_type not in _EVENT_TYPES or event.is_directory:
            return
        paths = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
        if paths & self._names:
            self._poke()
