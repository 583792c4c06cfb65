"""The machinery every vendor emulator shares: a loopback HTTP server, routing, faults, a request log.

Each vendor emulator (``connectors/<vendor>/emulator.py``) is an ``EmulatorApp`` subclass
that registers routes and keeps its own records; this module only knows HTTP. Emulators
ship with the product because the demo and ``syncagent sandbox`` run them for people
rehearsing mappings, and the tests run connectors against them as real servers.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True, slots=True)
class EmuRequest:
    """One HTTP request as an emulator route sees it."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    match: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """Parse the body as JSON (numbers with fractions become Decimal)."""
        return json.loads(self.body or b"null", parse_float=Decimal)

    def arg(self, name: str, default: str | None = None) -> str | None:
        """Return the first value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default

    def header(self, name: str, default: str | None = None) -> str | None:
        """Return a request header by case-insensitive name."""
        return self.headers.get(name.lower(), default)


@dataclass(frozen=True, slots=True)
class EmuResponse:
    """An HTTP response: status, a JSON-able body (or raw bytes), extra headers."""

    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        """Render the body as bytes (JSON unless it already is bytes)."""
        if self.body is None:
            return b""
        if isinstance(self.body, bytes | bytearray):
            return bytes(self.body)
        return json.dumps(self.body, default=_json_default).encode()


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return float(value) if value != value.to_integral_value() else int(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass(slots=True)
class Fault:
    """An injected misbehaviour, consumed by the next ``remaining`` matching requests."""

    remaining: int
    response: EmuResponse | None = None
    delay: float = 0.0
    drop: bool = False
    path_prefix: str | None = None
    method: str | None = None
    lose_reply: bool = False

    def matches(self, request: EmuRequest) -> bool:
        """Tell whether this fault applies to ``request``."""
        if self.method and self.method != request.method:
            return False
        return not self.path_prefix or request.path.startswith(self.path_prefix)


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """One entry of the emulator's request log."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    status: int
    at: float


class Route:
    """A method plus a path regex with named groups, bound to a handler."""

    def __init__(self, method: str, pattern: str, handler: Callable[[EmuRequest], EmuResponse]) -> None:
        self.method = method
        self.regex = re.compile(pattern + r"\Z")
        self.handler = handler


class EmulatorApp:
    """Base of the vendor emulators: routes, fault queue, request log and a settable clock."""

    def __init__(self) -> None:
        self._routes: list[Route] = []
        self._faults: list[Fault] = []
        self._log: list[LoggedRequest] = []
        self._lock = threading.RLock()
        self._clock_offset = timedelta(0)
        self._frozen_at: datetime | None = None

    # --- routing -------------------------------------------------------------------
    def route(self, method: str, pattern: str, handler: Callable[[EmuRequest], EmuResponse]) -> None:
        """Register ``handler`` for ``method`` and the path regex ``pattern``."""
        self._routes.append(Route(method, pattern, handler))

    def not_found(self, request: EmuRequest) -> EmuResponse:
        """Answer a request no route matched (vendors override the body shape)."""
        return EmuResponse(404, {"error": "not found", "path": request.path})

    def handle(self, request: EmuRequest) -> EmuResponse | None:
        """Serve one request: injected faults first, then the matching route.

        Returns None when a fault says to drop the connection without answering.
        """
        fault = self._take_fault(request)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.drop:
                self._record(request, 0)
                return None
            if fault.response is not None:
                self._record(request, fault.response.status)
                return fault.response
        response = self._dispatch(request)
        self._record(request, response.status)
        if fault is not None and fault.lose_reply:
            return None  # served, but the answer never reaches the client
        return response

    def _dispatch(self, request: EmuRequest) -> EmuResponse:
        for r in self._routes:
            if r.method != request.method:
                continue
            m = r.regex.match(request.path)
            if m:
                bound = EmuRequest(
                    request.method, request.path, request.query, request.headers, request.body, m.groupdict()
                )
                with self._lock:
                    return r.handler(bound)
        return self.not_found(request)

    # --- faults --------------------------------------------------------------------
    def inject(
        self,
        response: EmuResponse | None = None,
        *,
        count: int = 1,
        delay: float = 0.0,
        drop: bool = False,
        path_prefix: str | None = None,
        method: str | None = None,
        lose_reply: bool = False,
    ) -> None:
        """Make the next ``count`` matching requests fail, stall, drop, or be served unanswered.

        ``drop`` closes the connection before serving; ``lose_reply`` serves the request (a
        write lands) and then closes the connection without answering.
        """
        with self._lock:
            self._faults.append(Fault(count, response, delay, drop, path_prefix, method, lose_reply))

    def clear_faults(self) -> None:
        """Remove every pending injected fault."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, request: EmuRequest) -> Fault | None:
        with self._lock:
            for f in self._faults:
                if f.matches(request):
                    f.remaining -= 1
                    if f.remaining <= 0:
                        self._faults.remove(f)
                    return f
        return None

    # --- request log ---------------------------------------------------------------
    def _record(self, request: EmuRequest, status: int) -> None:
        with self._lock:
            self._log.append(
                LoggedRequest(request.method, request.path, request.query, status, time.monotonic())
            )

    def requests(self, *, method: str | None = None, path_prefix: str | None = None) -> list[LoggedRequest]:
        """Return the logged requests, optionally filtered by method and path prefix."""
        with self._lock:
            return [
                r
                for r in self._log
                if (method is None or r.method == method)
                and (path_prefix is None or r.path.startswith(path_prefix))
            ]

    def reset_log(self) -> None:
        """Forget the logged requests."""
        with self._lock:
            self._log.clear()

    # --- clock ---------------------------------------------------------------------
    def now(self) -> datetime:
        """The emulator's notion of now (UTC), which tests may freeze or shift."""
        with self._lock:
            if self._frozen_at is not None:
                return self._frozen_at
            return datetime.now(UTC) + self._clock_offset

    def freeze_clock(self, at: datetime | None) -> None:
        """Stop the clock at ``at`` (None: let it run again)."""
        with self._lock:
            self._frozen_at = at

    def shift_clock(self, delta: timedelta) -> None:
        """Move the running clock by ``delta``."""
        with self._lock:
            self._clock_offset += delta
            if self._frozen_at is not None:
                self._frozen_at += delta


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes; with Nagle on, delayed ACKs add ~40 ms each.
    disable_nagle_algorithm = True
    server: _Server

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The Date header follows the emulator's clock, so tests can freeze or shift it."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        return self.server.app.now().strftime("%a, %d %b %Y %H:%M:%S GMT")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        return

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = EmuRequest(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        try:
            response = self.server.app.handle(request)
        except Exception as exc:  # an emulator bug must answer 500, not hang the client
            response = EmuResponse(500, {"error": "emulator failure", "detail": type(exc).__name__})
        if response is None:
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        payload = response.encode()
        headers = {"Content-Type": "application/json;charset=UTF-8", **dict(response.headers)}
        try:
            self.send_response_only(response.status)
            self.send_header("Server", "syncagent-emulator")
            if not any(k.lower() == "date" for k in headers):
                self.send_header("Date", self.date_time_string())
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout test): nothing to answer

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = do_HEAD = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: EmulatorApp) -> None:
        super().__init__(address, _Handler)
        self.app = app

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (killed, timed out) is normal here; anything else is reported."""
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class EmulatorServer:
    """Runs an ``EmulatorApp`` on a loopback port in a background thread."""

    def __init__(self, app: EmulatorApp, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("emulators listen on loopback only")
        self.app = app
        self._server = _Server((host, port), app)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the server, without a trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EmulatorServer:
        """Start serving in a daemon thread; returns self."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="emulator", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until interrupted (for ``syncagent sandbox``)."""
        self._server.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> EmulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
