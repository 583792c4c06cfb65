"""Prometheus metrics: the status snapshot in text exposition format 0.0.4, served on loopback.

``render`` turns an ``agent.health.Snapshot`` (plus a few counters the caller keeps) into
the text format; ``MetricsServer`` serves it at ``GET /metrics`` from a stdlib threading
HTTP server that binds loopback addresses only. Every scrape builds a fresh snapshot, so
the numbers are the ones ``syncagent status`` would show at that moment.

The business metrics (closed-won to ERP project, journal fates, invoice readiness, API
budget) are read from snapshot fields of those names, or from a ``business`` mapping on
the snapshot, when present; a snapshot without them renders without them.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent import __version__
from agent.errors import ConfigError, ConfigIssue, SyncAgentError
from agent.health import Snapshot
from agent.logging import log_event

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
PREFIX = "syncagent_"
SUMMARY_QUANTILES = ("0.5", "0.9", "0.99")

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@dataclass
class _Family:
    """One metric family: its HELP and TYPE lines and its samples."""

    name: str
    type: str
    help: str
    samples: list[tuple[str, tuple[tuple[str, str], ...], float]] = field(default_factory=list)

    def add(self, value: Any, suffix: str = "", **labels: Any) -> None:
        """Add a sample; values that are not numbers (None, text) are left out."""
        number = _number(value)
        if number is not None:
            self.samples.append((suffix, tuple((k, str(v)) for k, v in labels.items()), number))

    def lines(self) -> Iterable[str]:
        """The family's exposition lines."""
        yield f"# HELP {self.name} {_escape_help(self.help)}"
        yield f"# TYPE {self.name} {self.type}"
        for suffix, labels, value in self.samples:
            yield f"{self.name}{suffix}{_labels(labels)} {_format(value)}"


def render(snapshot: Snapshot, extra: Mapping[str, float] | None = None) -> str:
    """Render ``snapshot`` (and ``extra`` counters or gauges, by metric name) as exposition text."""
    families = [*_agent(snapshot), *_streams(snapshot), *_pipeline(snapshot), *_business(snapshot)]
    families += _extra(extra or {}, {f.name for f in families})
    return "\n".join(line for f in families for line in f.lines()) + "\n"


def _agent(snap: Snapshot) -> list[_Family]:
    up = _Family(f"{PREFIX}up", "gauge", "1 while the agent's state file can be read for a snapshot.")
    up.add(1)
    healthy = _Family(
        f"{PREFIX}healthy", "gauge", "1 when `syncagent status` finds nothing unhealthy, else 0."
    )
    healthy.add(1 if snap.ok else 0)
    info = _Family(f"{PREFIX}build_info", "gauge", "Version and state schema of the running agent.")
    info.add(1, version=__version__, schema_version=snap.schema_version)
    return [up, healthy, info]


def _streams(snap: Snapshot) -> list[_Family]:
    healthy = _Family(
        f"{PREFIX}connector_healthy",
        "gauge",
        "1 when the connector stream polls successfully and on time; `syncagent status` says why not.",
    )
    captured = _Family(
        f"{PREFIX}changes_captured_total", "counter", "Changes journaled from the connector stream."
    )
    lag = _Family(
        f"{PREFIX}slot_lag_bytes",
        "gauge",
        "WAL the ERP keeps for the replication slot (bytes behind the current position).",
    )
    oldest = _Family(
        f"{PREFIX}oldest_unconsumed_seconds",
        "gauge",
        "Age of the oldest change the source holds that the agent has not journaled yet.",
    )
    lag_by: dict[str, float] = {}
    oldest_by: dict[str, float] = {}
    for s in snap.streams:
        healthy.add(1 if s.healthy else 0, connector=s.connector, stream=s.stream, type=s.type)
        captured.add(s.changes_total, connector=s.connector, stream=s.stream)
        # Slot figures belong to the connector, not to each of its streams: keep the worst.
        for value, into in ((s.lag_bytes, lag_by), (s.oldest_unconsumed_age_s, oldest_by)):
            number = _number(value)
            if number is not None:
                into[s.connector] = max(number, into.get(s.connector, number))
    for connector in sorted(lag_by):
        lag.add(lag_by[connector], connector=connector)
    for connector in sorted(oldest_by):
        oldest.add(oldest_by[connector], connector=connector)
    return [healthy, captured, lag, oldest]


def _pipeline(snap: Snapshot) -> list[_Family]:
    backlog = _Family(f"{PREFIX}resolver_backlog", "gauge", "Journal entries captured but not resolved yet.")
    backlog.add(_get(snap.resolver, "backlog"))
    pending = _Family(f"{PREFIX}outbox_pending", "gauge", "Operations waiting for delivery to the target.")
    pending_oldest = _Family(
        f"{PREFIX}outbox_oldest_seconds",
        "gauge",
        "Age of the oldest operation waiting for the target (0 when none waits).",
    )
    for target, row in sorted(snap.outbox.items()):
        pending.add(_get(row, "pending"), target=target)
        pending_oldest.add(_get(row, "oldest_age_s") or 0, target=target)
    open_ = _Family(f"{PREFIX}exceptions_open", "gauge", "Items in the exception queue waiting for a person.")
    exc_oldest = _Family(
        f"{PREFIX}exception_oldest_seconds", "gauge", "Age of the oldest open exception item, by reason."
    )
    by_reason = _get(snap.exceptions, "by_reason")
    for reason, row in sorted(by_reason.items() if isinstance(by_reason, Mapping) else []):
        open_.add(_get(row, "count"), reason=reason)
        exc_oldest.add(_get(row, "oldest_age_s"), reason=reason)
    return [backlog, pending, pending_oldest, open_, exc_oldest]


def _business(snap: Snapshot) -> list[_Family]:
    out: list[_Family] = []
    for key, text in (
        (
            "closed_won_to_project_seconds",
            "Time from a deal closed-won in the CRM to its project in the ERP.",
        ),
        (
            "invoice_readiness_delay_seconds",
            "Time from a billable milestone done to its invoice being ready.",
        ),
    ):
        value = _business_value(snap, key)
        if isinstance(value, Mapping):
            out.append(_summary(f"{PREFIX}{key}", text, value))
    fates = _business_value(snap, "journal_fate")
    if isinstance(fates, Mapping):
        f = _Family(
            f"{PREFIX}journal_fate_total",
            "counter",
            "Journal entries by what resolve made of them (propagated, echo, ignored, exception...).",
        )
        for fate, count in sorted(fates.items()):
            f.add(count, fate=fate)
        out.append(f)
    budget = _business_value(snap, "api_budget_used")
    if isinstance(budget, Mapping):
        used = _Family(f"{PREFIX}api_budget_used", "gauge", "API calls used of the connector's daily budget.")
        limit = _Family(f"{PREFIX}api_budget_limit", "gauge", "The connector's daily API call budget.")
        for connector, value in sorted(budget.items()):
            if isinstance(value, Mapping):
                used.add(_get(value, "used"), connector=connector)
                limit.add(_get(value, "limit"), connector=connector)
            else:
                used.add(value, connector=connector)
        out.append(used)
        if limit.samples:
            out.append(limit)
    return out


def _summary(name: str, text: str, value: Mapping[str, Any]) -> _Family:
    """A summary from ``{"quantiles": {"0.5": s, ...}, "sum": s, "count": n}``."""
    f = _Family(name, "summary", text)
    quantiles = value.get("quantiles")
    if isinstance(quantiles, Mapping):
        for q, v in sorted(quantiles.items(), key=lambda kv: float(kv[0])):
            f.add(v, quantile=_format(float(q)))
    f.add(value.get("sum", 0), "_sum")
    f.add(value.get("count", 0), "_count")
    return f


def _extra(extra: Mapping[str, float], taken: set[str]) -> list[_Family]:
    out = []
    for raw, value in sorted(extra.items()):
        name = raw if raw.startswith(PREFIX) else PREFIX + raw
        if not _NAME.fullmatch(name) or name in taken:
            raise ValueError(f"not a usable metric name: {raw!r}")
        kind = "counter" if name.endswith("_total") else "gauge"
        f = _Family(name, kind, f"syncagent {kind} {name[len(PREFIX) :]}.")
        f.add(value)
        out.append(f)
    return out


def _business_value(snap: Snapshot, key: str) -> Any:
    value = getattr(snap, key, None)
    if value is None:
        business = getattr(snap, "business", None)
        if isinstance(business, Mapping):
            value = business.get(key)
    return value


def _get(row: Any, key: str) -> Any:
    return row.get(key) if isinstance(row, Mapping) else None


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _format(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


# --- the HTTP endpoint ------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:9464`` for IPv6) and refuse anything but a loopback host."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not port.isdigit() or int(port) > 65535 or not loopback:
        raise ConfigError(
            [
                ConfigIssue(
                    "-",
                    "metrics.listen",
                    f"{listen!r}: the metrics endpoint binds a loopback 'host:port' only, "
                    "such as '127.0.0.1:9464' (put a TLS proxy in front to scrape it remotely)",
                )
            ]
        )
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], snapshot_fn: Callable[[], Snapshot]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.snapshot_fn = snapshot_fn
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scrape that crashed: log it (the connection closes, Prometheus marks the scrape failed)."""
        logger.error("metrics_scrape_crashed", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10
    server_version = "syncagent-metrics"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != METRICS_PATH:
            self._reply(404, "not found: metrics are at /metrics\n")
            return
        try:
            body = render(self.server.snapshot_fn())
        except SyncAgentError as exc:
            log_event(logger, "metrics_scrape_failed", error=type(exc).__name__, level=logging.WARNING)
            self._reply(500, "snapshot failed; see the agent's log\n")
            return
        self._reply(200, body, CONTENT_TYPE)

    def _reply(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: one line every 15 s would drown the journal."""


class MetricsServer:
    """``GET /metrics`` on a loopback address, answered from a fresh snapshot per scrape."""

    def __init__(self, listen: str, snapshot_fn: Callable[[], Snapshot]) -> None:
        self._address = parse_listen(listen)
        self._snapshot_fn = snapshot_fn
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when ``listen`` asked for port 0)."""
        if self._server is None:
            return self._address
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        """The scrape URL."""
        host, port = self.address
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}{METRICS_PATH}"

    def start(self) -> None:
        """Bind and serve on a background thread; raises OSError if the port is taken."""
        if self._server is not None:
            return
        self._server = _Server(self._address, self._snapshot_fn)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="syncagent-metrics",
            daemon=True,
        )
        self._thread.start()
        log_event(logger, "metrics_listening", url=self.url)

    def stop(self) -> None:
        """Stop serving and close the socket; waits for the serving thread."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
