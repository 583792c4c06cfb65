"""The long-running service around the scheduler: config watch, signals, metrics endpoint.

``serve`` is what ``syncagent run`` does without ``--once``: SIGTERM/SIGINT finish the batch
in flight and exit 0; SIGHUP (``systemctl reload``) re-reads the config; an edited config
file that validates is swapped in live, one that does not is refused with a log line per
problem while the old one keeps running.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from agent.config import Config
from agent.daemon import Runtime, open_config, swap_config
from agent.errors import ConfigError
from agent.health import Snapshot, snapshot
from agent.logging import log_event
from agent.metrics import MetricsServer
from agent.reload import ConfigWatcher
from agent.scheduler import AgentRunner
from state import open_state

logger = logging.getLogger(__name__)


class Service:
    """Owns the runner, the config watcher and the metrics server for one ``run``."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.runner = AgentRunner(runtime)
        self.watcher = ConfigWatcher(
            runtime.config.path,
            on_valid=self._apply,
            on_invalid=self._reject,
            load=open_config,
            digest=runtime.config.digest,
        )
        listen = runtime.config.metrics_listen
        self.metrics = MetricsServer(listen, self.snapshot) if listen else None

    def snapshot(self) -> Snapshot:
        """A fresh status snapshot from a read-only connection of its own (metrics threads)."""
        st = open_state(self.rt.config.agent.state_path, readonly=True)
        try:
            return snapshot(self.rt.config, st)
        finally:
            st.close()

    def _apply(self, config: Config) -> None:
        swap_config(self.rt, config)
        self.runner.reschedule()

    def _reject(self, exc: ConfigError) -> None:
        for issue in exc.errors:
            log_event(
                logger,
                "config_rejected",
                file=issue.file,
                key=issue.key,
                reason=issue.reason,
                level=logging.ERROR,
            )
        log_event(logger, "config_kept", digest=self.rt.config.digest, level=logging.WARNING)

    def serve(self) -> None:
        """Run until SIGTERM or SIGINT."""

        def _stop(_sig: int, _frame: Any) -> None:
            self.runner.stop()

        def _reload(_sig: int, _frame: Any) -> None:
            log_event(logger, "reload_requested", signal="SIGHUP")
            self.watcher.trigger()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGHUP, _reload)
        self.watcher.start()
        if self.metrics is not None:
            self.metrics.start()
            log_event(logger, "metrics_listening", url=self.metrics.url)
        try:
            self.runner.run_forever()
        finally:
            self.watcher.stop()
            if self.metrics is not None:
                self.metrics.stop()
            log_event(logger, "agent_stopped")
