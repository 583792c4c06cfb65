"""agent.reload: a real config file in tmp_path, a real watchdog observer, the real loader."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import Config, load_config
from agent.errors import ConfigError
from agent.reload import ConfigWatcher

DEBOUNCE = 0.1
# Long enough for a second callback to show up if the debounce let one through.
QUIET = DEBOUNCE * 4

TEMPLATE = """\
[agent]
state_path = "{state}"

[systems.erp]
type = "postgres"
dbname = "erp"
user = "syncagent"
poll_interval = {interval}
"""


class Recorder:
    """Collects callbacks from the watcher's thread and lets the test wait for them."""

    def __init__(self) -> None:
        self.valid: list[Config] = []
        self.invalid: list[ConfigError] = []
        self._cv = threading.Condition()

    def on_valid(self, cfg: Config) -> None:
        with self._cv:
            self.valid.append(cfg)
            self._cv.notify_all()

    def on_invalid(self, exc: ConfigError) -> None:
        with self._cv:
            self.invalid.append(exc)
            self._cv.notify_all()

    def wait(self, total: int, timeout: float = 5.0) -> None:
        """Wait until ``total`` callbacks arrived, then a little more to catch extra ones."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self.valid) + len(self.invalid) < total:
                left = deadline - time.monotonic()
                assert left > 0, f"timed out: {len(self.valid)} valid, {len(self.invalid)} invalid"
                self._cv.wait(left)
        time.sleep(QUIET)


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "etc"
        self.dir.mkdir()
        self.path = self.dir / "config.toml"
        self.state = tmp_path / "state.db"
        self.rec = Recorder()

    def text(self, interval: object) -> str:
        return TEMPLATE.format(state=self.state, interval=interval)

    def load(self, path: Path) -> Config:
        return load_config(path, environ={})


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Setup, ConfigWatcher]]:
    s = Setup(tmp_path)
    s.path.write_text(s.text(5))
    watcher = ConfigWatcher(s.path, s.rec.on_valid, s.rec.on_invalid, s.load, debounce=DEBOUNCE)
    watcher.start()
    yield s, watcher
    watcher.stop()


def test_watcher_calls_on_valid_once_when_file_is_edited_in_place(setup: tuple[Setup, ConfigWatcher]) -> None:
    s, watcher = setup
    before = watcher.digest
    s.path.write_text(s.text(7))
    s.rec.wait(1)
    assert [c.systems["erp"].poll_interval for c in s.rec.valid] == [7.0]
    assert s.rec.invalid == []
    assert watcher.digest == s.rec.valid[0].digest != before


def test_watcher_reports_every_key_and_keeps_old_config_when_edit_is_invalid(
    setup: tuple[Setup, ConfigWatcher],
) -> None:
    s, watcher = setup
    before = watcher.digest
    s.path.write_text(s.text(-1).replace('user = "syncagent"', 'usr = "syncagent"'))
    s.rec.wait(1)
    assert s.rec.valid == []
    keys = {e.key for e in s.rec.invalid[0].errors}
    assert {"systems.erp.poll_interval", "systems.erp.usr", "systems.erp.user"} <= keys
    assert watcher.digest == before
    s.path.write_text(s.text(9))  # the fix is taken up
    s.rec.wait(2)
    assert [c.systems["erp"].poll_interval for c in s.rec.valid] == [9.0]


def test_watcher_reports_syntax_error_when_toml_is_broken(setup: tuple[Setup, ConfigWatcher]) -> None:
    s, _ = setup
    s.path.write_text("[agent\n")
    s.rec.wait(1)
    assert s.rec.valid == []
    assert "TOML syntax error" in s.rec.invalid[0].errors[0].reason


def test_watcher_sees_editor_atomic_rename_when_temp_file_replaces_config(
    setup: tuple[Setup, ConfigWatcher],
) -> None:
    s, _ = setup
    tmp = s.dir / ".config.toml.swp"
    tmp.write_text(s.text(11))
    os.replace(tmp, s.path)
    s.rec.wait(1)
    assert [c.systems["erp"].poll_interval for c in s.rec.valid] == [11.0]
    assert s.rec.invalid == []


def test_watcher_sees_backup_then_create_when_editor_moves_original_aside(
    setup: tuple[Setup, ConfigWatcher],
) -> None:
    s, _ = setup
    os.rename(s.path, s.dir / "config.toml~")
    s.path.write_text(s.text(13))
    s.rec.wait(1)
    assert [c.systems["erp"].poll_interval for c in s.rec.valid] == [13.0]
    assert s.rec.invalid == []


def test_watcher_makes_one_callback_when_one_save_emits_many_events(
    setup: tuple[Setup, ConfigWatcher],
) -> None:
    s, _ = setup
    text = s.text(17)
    with open(s.path, "w") as f:  # a slow save: truncate, then several flushed chunks
        for i in range(0, len(text), 16):
            f.write(text[i : i + 16])
            f.flush()
            os.fsync(f.fileno())
    os.utime(s.path)
    s.rec.wait(1)
    assert len(s.rec.valid) == 1 and s.rec.invalid == []


def test_watcher_stays_quiet_when_saved_content_is_unchanged_or_other_files_change(
    setup: tuple[Setup, ConfigWatcher],
) -> None:
    s, _ = setup
    s.path.write_text(s.text(5))
    (s.dir / "syncagent.env").write_text("SF_CLIENT_ID=x\n")
    time.sleep(DEBOUNCE + QUIET)
    assert s.rec.valid == [] and s.rec.invalid == []


def test_watcher_reports_rejection_once_until_triggered_when_same_broken_file_is_touched(
    setup: tuple[Setup, ConfigWatcher],
) -> None:
    s, watcher = setup
    s.path.write_text(s.text(0))
    s.rec.wait(1)
    os.utime(s.path)  # an attribute change of the same broken bytes is not news
    time.sleep(DEBOUNCE + QUIET)
    assert len(s.rec.invalid) == 1
    watcher.trigger()  # SIGHUP asks again, and hears the rejection again
    s.rec.wait(2)
    assert len(s.rec.invalid) == 2 and s.rec.valid == []


def test_watcher_passes_caller_refusal_to_on_invalid_when_on_valid_raises(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.path.write_text(s.text(5))
    refusals: list[ConfigError] = []
    done = threading.Event()

    def refuse(cfg: Config) -> None:
        raise ConfigError([])

    def invalid(exc: ConfigError) -> None:
        refusals.append(exc)
        done.set()

    watcher = ConfigWatcher(s.path, refuse, invalid, s.load, debounce=DEBOUNCE)
    watcher.start()
    try:
        before = watcher.digest
        s.path.write_text(s.text(6))
        assert done.wait(5)
        assert len(refusals) == 1 and watcher.digest == before
    finally:
        watcher.stop()


def test_watcher_ignores_edits_when_stopped(setup: tuple[Setup, ConfigWatcher]) -> None:
    s, watcher = setup
    watcher.stop()
    s.path.write_text(s.text(21))
    time.sleep(DEBOUNCE + QUIET)
    assert s.rec.valid == [] and s.rec.invalid == []


def test_watcher_follows_symlink_target_when_config_is_a_link(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    target_dir = tmp_path / "deploy"
    target_dir.mkdir()
    target = target_dir / "config.toml"
    target.write_text(s.text(5))
    s.path.symlink_to(target)
    watcher = ConfigWatcher(s.path, s.rec.on_valid, s.rec.on_invalid, s.load, debounce=DEBOUNCE)
    watcher.start()
    try:
        target.write_text(s.text(23))
        s.rec.wait(1)
        assert [c.systems["erp"].poll_interval for c in s.rec.valid] == [23.0]
    finally:
        watcher.stop()
