"""agent.metrics: exposition text from a Snapshot, parsed back line by line; the loopback endpoint."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import load_config
from agent.errors import ConfigError, RetryableError
from agent.health import Snapshot, StreamStatus, snapshot
from agent.metrics import CONTENT_TYPE, MetricsServer, parse_listen, render
from state import open_state

# --- a strict reader of text format 0.0.4 -----------------------------------------------------------

_SAMPLE = re.compile(
    r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r" (?P<value>\S+)(?: (?P<ts>-?\d+))?"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_TYPES = {"counter", "gauge", "summary", "histogram", "untyped"}

Series = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    samples: dict[Series, float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def _unescape(text: str) -> str:
    return re.sub(r"\\([\\\"n])", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def _labels(text: str | None, lineno: int) -> frozenset[tuple[str, str]]:
    if not text:
        return frozenset()
    pairs, pos = [], 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"line {lineno}: bad label set {text!r} at {pos}"
        pairs.append((m.group(1), _unescape(m.group(2))))
        pos = m.end()
        if pos < len(text):
            assert text[pos] == ",", f"line {lineno}: expected ',' in {text!r}"
            pos += 1
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), f"line {lineno}: repeated label"
    return frozenset(pairs)


def _family_of(sample_name: str, types: Mapping[str, str]) -> str | None:
    if sample_name in types:
        return sample_name
    for suffix in ("_sum", "_count", "_bucket"):
        base = sample_name.removesuffix(suffix)
        if base != sample_name and types.get(base) in ("summary", "histogram"):
            return base
    return None


def parse(text: str) -> Exposition:
    """Parse exposition text, asserting every line is valid and every family is declared once."""
    assert text.endswith("\n"), "the body ends with a line feed"
    out = Exposition()
    done: set[str] = set()
    current = None
    for lineno, line in enumerate(text.splitlines(), 1):
        assert line == line.strip() and line, f"line {lineno}: blank or padded line"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[0] == "#" and parts[1] in ("HELP", "TYPE"), f"line {lineno}: {line!r}"
            name = parts[2]
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name), f"line {lineno}: bad name"
            if parts[1] == "TYPE":
                assert parts[3] in _TYPES, f"line {lineno}: unknown type"
                assert name not in out.types, f"line {lineno}: {name} typed twice"
                out.types[name] = parts[3]
            else:
                assert name not in out.helps, f"line {lineno}: {name} has two HELP lines"
                out.helps[name] = parts[3]
            if current != name:
                assert name not in done, f"line {lineno}: family {name} split in two"
                if current is not None:
                    done.add(current)
                current = name
            continue
        m = _SAMPLE.fullmatch(line)
        assert m, f"line {lineno}: not a sample: {line!r}"
        family = _family_of(m.group("name"), out.types)
        assert family == current, f"line {lineno}: sample outside its family's block"
        value = m.group("value")
        assert re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?|NaN|[+-]Inf", value), value
        series = (m.group("name"), _labels(m.group("labels"), lineno))
        assert series not in out.samples, f"line {lineno}: duplicate series"
        out.samples[series] = float(value)
    assert set(out.helps) == set(out.types), "every family has HELP and TYPE"
    return out


# --- snapshots ---------------------------------------------------------------------------------------


def _stream(connector: str, stream: str, **kw: Any) -> StreamStatus:
    base: dict[str, Any] = dict(
        connector=connector,
        type="postgres",
        stream=stream,
        healthy=True,
        state="ok",
        reason="",
        fix="",
        cursor=None,
        last_success_at="2025-01-01T00:00:00+00:00",
        changes_total=0,
        lag_bytes=None,
        oldest_unconsumed_age_s=None,
        last_error=None,
    )
    base.update(kw)
    return StreamStatus(**base)


def make_snapshot(cls: type[Snapshot] = Snapshot, **kw: Any) -> Snapshot:
    args: dict[str, Any] = dict(
        ok=False,
        generated_at="2025-01-01T00:00:00+00:00",
        state_path="/var/lib/syncagent/state.db",
        schema_version=7,
        streams=[
            _stream("erp", "erp.customers", changes_total=120, lag_bytes=4096, oldest_unconsumed_age_s=3.5),
            _stream("erp", "erp.contracts", changes_total=8, lag_bytes=4096, oldest_unconsumed_age_s=12.25),
            _stream(
                "crm",
                "Account",
                type="salesforce",
                healthy=False,
                state="error",
                reason="RateLimited",
                changes_total=42,
            ),
        ],
        resolver={"position": 100, "journal_last_seq": 170, "backlog": 70, "generation": 1},
        outbox={
            "crm": {"pending": 5, "due": 2, "retrying": 3, "oldest_age_s": 61.5},
            "erp": {"pending": 0, "due": 0, "retrying": 0, "oldest_age_s": None},
        },
        exceptions={
            "open": 4,
            "by_reason": {
                "missing_mapping": {"count": 3, "oldest_age_s": 7200.0},
                'bad "value"\\ in\nfield': {"count": 1, "oldest_age_s": 5.0},
            },
        },
        journal={"erp": {"count": 128, "pending": 70}},
        problems=["crm/Account: RateLimited"],
    )
    args.update(kw)
    return cls(**args)


@dataclass(frozen=True, slots=True)
class BusinessSnapshot(Snapshot):
    """A snapshot as the integrator will extend it: business figures in one mapping."""

    business: Mapping[str, Any] = field(default_factory=dict)


BUSINESS = {
    "closed_won_to_project_seconds": {
        "quantiles": {"0.5": 90.0, "0.9": 300.0, "0.99": 1800.5},
        "sum": 5400.0,
        "count": 30,
    },
    "invoice_readiness_delay_seconds": {"quantiles": {"0.5": 3600.0}, "sum": 7200.0, "count": 2},
    "journal_fate": {"propagated": 900, "echo": 450, "ignored": 12, "exception": 4},
    "api_budget_used": {"crm": {"used": 1234, "limit": 50000}, "hubspot": 77},
}


# --- render ------------------------------------------------------------------------------------------


def test_render_emits_valid_exposition_with_every_core_metric_when_given_a_snapshot() -> None:
    exp = parse(render(make_snapshot()))
    assert exp.value("syncagent_up") == 1
    assert exp.value("syncagent_healthy") == 0
    assert exp.value("syncagent_connector_healthy", connector="crm", stream="Account", type="salesforce") == 0
    assert (
        exp.value("syncagent_connector_healthy", connector="erp", stream="erp.customers", type="postgres")
        == 1
    )
    assert exp.value("syncagent_changes_captured_total", connector="erp", stream="erp.contracts") == 8
    assert exp.types["syncagent_changes_captured_total"] == "counter"
    assert exp.series("syncagent_slot_lag_bytes") == {frozenset({("connector", "erp")}): 4096}
    assert exp.value("syncagent_oldest_unconsumed_seconds", connector="erp") == 12.25
    assert exp.value("syncagent_resolver_backlog") == 70
    assert exp.value("syncagent_outbox_pending", target="crm") == 5
    assert exp.value("syncagent_outbox_oldest_seconds", target="crm") == 61.5
    assert exp.value("syncagent_outbox_oldest_seconds", target="erp") == 0
    assert exp.value("syncagent_exceptions_open", reason="missing_mapping") == 3
    assert exp.value("syncagent_exception_oldest_seconds", reason="missing_mapping") == 7200


def test_render_escapes_label_values_when_they_hold_quotes_backslashes_and_newlines() -> None:
    text = render(make_snapshot())
    assert 'reason="bad \\"value\\"\\\\ in\\nfield"' in text
    exp = parse(text)
    assert exp.value("syncagent_exceptions_open", reason='bad "value"\\ in\nfield') == 1


def test_render_omits_business_metrics_when_snapshot_lacks_them() -> None:
    exp = parse(render(make_snapshot()))
    assert not [n for n in exp.types if "closed_won" in n or "journal_fate" in n or "budget" in n]


def test_render_emits_business_summaries_and_counters_when_snapshot_carries_them() -> None:
    exp = parse(render(make_snapshot(BusinessSnapshot, business=BUSINESS)))
    assert exp.types["syncagent_closed_won_to_project_seconds"] == "summary"
    assert exp.value("syncagent_closed_won_to_project_seconds", quantile="0.99") == 1800.5
    assert exp.value("syncagent_closed_won_to_project_seconds_count") == 30
    assert exp.value("syncagent_closed_won_to_project_seconds_sum") == 5400
    assert exp.value("syncagent_invoice_readiness_delay_seconds", quantile="0.5") == 3600
    assert exp.types["syncagent_journal_fate_total"] == "counter"
    assert exp.value("syncagent_journal_fate_total", fate="echo") == 450
    assert exp.value("syncagent_api_budget_used", connector="crm") == 1234
    assert exp.value("syncagent_api_budget_used", connector="hubspot") == 77
    assert exp.series("syncagent_api_budget_limit") == {frozenset({("connector", "crm")}): 50000}


def test_render_adds_extra_counters_and_gauges_when_named() -> None:
    exp = parse(render(make_snapshot(), {"reloads_total": 3, "syncagent_config_age_seconds": 12.5}))
    assert (exp.types["syncagent_reloads_total"], exp.value("syncagent_reloads_total")) == ("counter", 3)
    assert exp.value("syncagent_config_age_seconds") == 12.5


@pytest.mark.parametrize("name", ["bad-name", "up", "with space_total"])
def test_render_refuses_extra_when_name_is_invalid_or_taken(name: str) -> None:
    with pytest.raises(ValueError, match="metric name"):
        render(make_snapshot(), {name: 1})


def test_render_handles_empty_snapshot_when_nothing_has_run_yet() -> None:
    empty = make_snapshot(
        ok=True, streams=[], outbox={}, exceptions={"open": 0, "by_reason": {}}, resolver={}, journal={}
    )
    exp = parse(render(empty))
    assert exp.value("syncagent_healthy") == 1
    assert exp.series("syncagent_connector_healthy") == {}
    assert "syncagent_resolver_backlog" in exp.types


def test_render_reads_real_snapshot_when_built_from_a_fresh_state_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[agent]\nstate_path = "{tmp_path / "state.db"}"\n'
        '[systems.erp]\ntype = "postgres"\ndbname = "erp"\nuser = "syncagent"\n'
    )
    cfg = load_config(config, environ={})
    st = open_state(cfg.agent.state_path)
    try:
        exp = parse(render(snapshot(cfg, st)))
    finally:
        st.close()
    assert exp.value("syncagent_connector_healthy", connector="erp", stream="-", type="postgres") == 0
    assert exp.value("syncagent_resolver_backlog") == 0


# --- the endpoint ------------------------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, list[int]]]:
    calls: list[int] = []

    def snap() -> Snapshot:
        calls.append(1)
        return make_snapshot(resolver={"backlog": len(calls)})

    server = MetricsServer("127.0.0.1:0", snap)
    server.start()
    yield server, calls
    server.stop()


def test_metrics_server_serves_fresh_exposition_when_scraped_over_loopback(
    served: tuple[MetricsServer, list[int]],
) -> None:
    server, _ = served
    host, port = server.address
    assert host == "127.0.0.1" and port > 0
    with httpx.Client(timeout=5) as client:
        first = client.get(server.url)
        second = client.get(server.url)
    assert first.status_code == 200
    assert first.headers["content-type"] == CONTENT_TYPE
    assert parse(first.text).value("syncagent_resolver_backlog") == 1
    assert parse(second.text).value("syncagent_resolver_backlog") == 2


def test_metrics_server_answers_404_when_path_is_not_metrics(served: tuple[MetricsServer, list[int]]) -> None:
    server, calls = served
    host, port = server.address
    response = httpx.get(f"http://{host}:{port}/", timeout=5)
    assert response.status_code == 404
    assert calls == []


def test_metrics_server_answers_500_and_keeps_serving_when_snapshot_fails() -> None:
    results: list[Exception | None] = [RetryableError("database is locked"), None]

    def snap() -> Snapshot:
        failure = results.pop(0)
        if failure is not None:
            raise failure
        return make_snapshot()

    server = MetricsServer("127.0.0.1:0", snap)
    server.start()
    try:
        assert httpx.get(server.url, timeout=5).status_code == 500
        assert httpx.get(server.url, timeout=5).status_code == 200
    finally:
        server.stop()


def test_metrics_server_releases_port_when_stopped(served: tuple[MetricsServer, list[int]]) -> None:
    server, _ = served
    url = server.url
    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)


def test_metrics_server_binds_ipv6_loopback_when_asked() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = MetricsServer("[::1]:0", make_snapshot)
    try:
        server.start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        assert server.url.startswith("http://[::1]:")
        assert httpx.get(server.url, timeout=5).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464", "metrics.example.com:9464", "127.0.0.1", "127.0.0.1:x"],
)
def test_metrics_server_refuses_listen_when_not_loopback_host_and_port(listen: str) -> None:
    with pytest.raises(ConfigError) as info:
        MetricsServer(listen, make_snapshot)
    assert [e.key for e in info.value.errors] == ["metrics.listen"]


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:9", ("127.0.0.1", 9)),
        ("[::1]:9464", ("::1", 9464)),
    ],
)
def test_parse_listen_accepts_loopback_when_given_host_and_port(
    listen: str, address: tuple[str, int]
) -> None:
    assert parse_listen(listen) == address
