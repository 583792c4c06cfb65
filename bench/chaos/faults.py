"""The chaos harness's fault injectors: the agent process, CRM storms, PostgreSQL restarts, a full disk.

- ``AgentProcess`` runs ``python -m agent.cli -c CFG run`` (the daemon), SIGKILLs and restarts it,
  and keeps its JSON log lines (stderr, through a pipe) in a file and in counters.
- ``StormySalesforce`` is the Salesforce emulator with time-boxed storms: while one is on, each
  API call is, with the storm's probability, preceded by one of the emulator's own fault helpers
  (``fail_next``, ``throttle_next``, a 429 through ``inject``, ``expire_all_tokens``, a dropped
  connection, a slow answer).
- ``DiskFiller`` puts the state file's folder on a small tmpfs and fills it with a ballast file
  until writes fail, then frees it. Without ``mount`` rights it falls back to
  ``RLIMIT_FSIZE = 0`` on the agent process (writes fail with EFBIG instead of ENOSPC).
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agent.localpg import LocalCluster
from connectors.emulator import EmuRequest, EmuResponse
from connectors.salesforce.emulator import SalesforceEmulator

REPO = Path(__file__).resolve().parents[2]
# A token storm expires sessions, not fresh ones: the agent's retry after its refresh must
# work, else the storm is a credential revocation (which stops the connector by design).
FRESH_TOKEN_SECONDS = 0.5
STORM_KINDS = ("5xx", "429", "403", "token", "drop", "lost_reply", "slow")


# --- the agent process ------------------------------------------------------------------------


@dataclass
class AgentLog:
    """What the agent's log said: events by name, job failures by error, crashes and other lines."""

    events: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    crashed: Counter[str] = field(default_factory=Counter)
    other_lines: int = 0
    last_other: list[str] = field(default_factory=list)

    def feed(self, line: str) -> None:
        """Count one log line."""
        try:
            rec = json.loads(line)
        except ValueError:
            self.other_lines += 1
            self.last_other = (self.last_other + [line.rstrip()])[-20:]
            return
        if not isinstance(rec, dict):
            return
        event = str(rec.get("event"))
        self.events[event] += 1
        if event == "job_failed":
            job = str(rec.get("job", "?")).split(":")[0]
            self.failures[f"{job}: {rec.get('error')}"] += 1
        elif event == "job_crashed":
            exc = str(rec.get("exc") or "").strip().splitlines()
            self.crashed[f"{rec.get('job')}: {exc[-1] if exc else '?'}"] += 1


class AgentProcess:
    """The agent daemon as a child process, killed and restarted at will."""

    def __init__(self, config: Path, log_path: Path, env: Mapping[str, str]) -> None:
        self.config = config
        self.log_path = log_path
        self.env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        self.log = AgentLog()
        self.proc: subprocess.Popen[str] | None = None
        self.started_at = 0.0
        self.starts = 0
        self.kills = 0
        self.exits: Counter[str] = Counter()
        self._pumps: list[threading.Thread] = []
        self._file: IO[str] = log_path.open("a", encoding="utf-8")
        self._file_lock = threading.Lock()
        self.fsize_limit: int | None = None

    def start(self) -> None:
        """Start the daemon (``run`` without ``--once``)."""
        argv = [sys.executable, "-m", "agent.cli", "-c", str(self.config), "--log-format", "json", "run"]
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if self.fsize_limit is not None:  # the disk is "full": the new process starts without room
            resource.prlimit(self.proc.pid, resource.RLIMIT_FSIZE, (self.fsize_limit, resource.RLIM_INFINITY))
        self.started_at = time.monotonic()
        self.starts += 1
        pump = threading.Thread(target=self._pump, args=(self.proc,), daemon=True, name="agent-log")
        pump.start()
        self._pumps.append(pump)

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._file_lock:
                self._file.write(line)
                self.log.feed(line)

    @property
    def pid(self) -> int | None:
        """The running child's pid."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def uptime(self) -> float:
        """Seconds since the last start."""
        return time.monotonic() - self.started_at

    def exited(self) -> int | None:
        """The exit status of a child that ended on its own (None while it runs)."""
        if self.proc is None:
            return None
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL the daemon and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.kills += 1
        self.proc = None

    def note_exit(self) -> int | None:
        """Record an exit the harness did not cause; return its status."""
        code = self.exited()
        if code is not None:
            self.exits[str(code)] += 1
            self.proc = None
        return code

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean stop); return the exit status (None if it had to be killed)."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self.proc = None
        return code

    def close(self) -> None:
        """Kill the child if it still runs, wait for its log, close the log file."""
        self.kill()
        for pump in self._pumps:
            pump.join(timeout=5)
        with self._file_lock:
            self._file.close()


# --- CRM storms -------------------------------------------------------------------------------


@dataclass
class Storm:
    """A storm: which fault, how likely per API call, and until when."""

    kind: str
    rate: float
    until: float


class StormySalesforce(SalesforceEmulator):
    """The Salesforce emulator with time-boxed fault storms and a count of successful writes."""

    def __init__(self, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._rng = random.Random(f"chaos-storm:{seed}")
        self.storm: Storm | None = None
        self.faulted: Counter[str] = Counter()
        self.writes_ok = 0

    def start_storm(self, kind: str, rate: float, seconds: float) -> None:
        """Start a storm of ``kind`` lasting ``seconds``."""
        if kind not in STORM_KINDS:
            raise ValueError(f"unknown storm kind {kind!r}")
        with self._lock:
            self.storm = Storm(kind, rate, time.monotonic() + seconds)

    def calm(self) -> None:
        """End any storm and drop queued faults."""
        with self._lock:
            self.storm = None
        self.clear_faults()

    def handle(self, request: EmuRequest) -> EmuResponse | None:
        """Serve one request, arming one fault for it first when a storm says so."""
        lose_reply = self._maybe_fault(request)
        response = super().handle(request)
        write = "/composite/sobjects" in request.path and request.method in ("PATCH", "DELETE")
        if response is not None and response.status == 200 and write:
            with self._lock:
                self.writes_ok += 1
            if lose_reply:
                return None  # applied here, the answer never reaches the agent
        return response

    def _token_age(self, request: EmuRequest) -> float:
        """Seconds since the request's bearer token was issued (infinite when unknown)."""
        auth = request.header("authorization") or ""
        with self._lock:
            expires = self._tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
            if expires is None:
                return float("inf")
            return (self.now() - (expires - self.token_lifetime)).total_seconds()

    def _maybe_fault(self, request: EmuRequest) -> bool:
        """Arm one fault for ``request`` when the storm hits it; True: drop the reply of a write."""
        with self._lock:
            storm = self.storm
            if storm is None:
                return False
            if time.monotonic() >= storm.until:
                self.storm = None
                return False
            hit = self._rng.random() < storm.rate
            pick = self._rng.random()
        token_call = request.path.startswith("/services/oauth2/")
        if not hit or (token_call and storm.kind != "token"):
            return False
        if storm.kind == "lost_reply":
            lost = "/composite/sobjects" in request.path
            if lost:
                self.faulted["lost_reply"] += 1
            return lost
        self.faulted[storm.kind] += 1
        api = "/services/data/v"
        if storm.kind == "5xx":
            self.fail_next(1, status=503 if pick < 0.6 else 500)
        elif storm.kind == "429":
            body = [{"message": "Too many requests", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
            wait = "1" if pick < 0.7 else "3"
            self.inject(EmuResponse(429, body, {"Retry-After": wait}), count=1, path_prefix=api)
        elif storm.kind == "403":
            self.throttle_next(1, daily=pick < 0.3)
        elif storm.kind == "token":
            if token_call:
                if pick < 0.3:  # the token endpoint itself stumbles now and then
                    self.inject(EmuResponse(503, {"error": "temporarily_unavailable"}), count=1)
            elif self._token_age(request) > FRESH_TOKEN_SECONDS:
                self.expire_all_tokens()
        elif storm.kind == "drop":
            self.inject(None, count=1, drop=True, path_prefix=api)
        elif storm.kind == "slow":
            self.slow_next(1, 0.5 + 2.5 * pick)
        return False


# --- PostgreSQL restarts ------------------------------------------------------------------------


def restart_cluster(cluster: LocalCluster, *, timeout: int = 60) -> None:
    """Restart the throwaway cluster in place (fast shutdown), its output going to its log file.

    ``LocalCluster.restart()`` runs ``pg_ctl restart`` without ``-l`` under
    ``capture_output``: the new postmaster inherits the pipes and the call never returns.
    ``pg_ctl restart`` reuses the options saved in ``postmaster.opts``.
    """
    argv = [
        str(cluster.bindir / "pg_ctl"),
        "-D",
        str(cluster.root / "data"),
        "-l",
        str(cluster.root / "server.log"),
        "-m",
        "fast",
        "-w",
        "-t",
        str(timeout),
        "restart",
    ]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", cluster.user, "--", *argv]
    out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 30)
    if out.returncode != 0:
        raise RuntimeError(f"pg_ctl restart failed: {(out.stderr or out.stdout).strip()[-500:]}")


class Restarter:
    """Restarts a cluster in a background thread (the harness's own ERP writes keep retrying)."""

    def __init__(self, restart: Any) -> None:
        self._restart = restart
        self._thread: threading.Thread | None = None
        self.done = 0
        self.errors: list[str] = []
        self.seconds: list[float] = []

    @property
    def busy(self) -> bool:
        """True while a restart runs."""
        return self._thread is not None and self._thread.is_alive()

    def trigger(self) -> bool:
        """Start a restart unless one runs; tell whether it started."""
        if self.busy:
            return False
        self._thread = threading.Thread(target=self._run, daemon=True, name="pg-restart")
        self._thread.start()
        return True

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._restart()
            self.done += 1
        except Exception as exc:  # reported in the summary, never fatal to the harness
            self.errors.append(f"{type(exc).__name__}: {exc}")
        self.seconds.append(round(time.monotonic() - started, 2))

    def wait(self) -> None:
        """Wait for a running restart to finish."""
        if self._thread is not None:
            self._thread.join()


# --- a full disk --------------------------------------------------------------------------------


class DiskFiller:
    """Fills the state file's folder until writes fail, then frees it (tmpfs, or RLIMIT_FSIZE)."""

    BALLAST = "ballast.bin"

    def __init__(self, folder: Path, size_mb: int, *, mode: str = "tmpfs") -> None:
        self.folder = folder
        self.size_mb = size_mb
        self.mode = mode
        self.mounted = False
        self.mount_error: str | None = None
        self.fills = 0
        self.full = False
        self.ballast_bytes = 0

    def setup(self) -> str:
        """Mount the tmpfs (or fall back to the rlimit mode); return the mode in use."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.mode == "tmpfs":
            out = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0755", "tmpfs", str(self.folder)],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0:
                self.mounted = True
            else:
                self.mount_error = (out.stderr or out.stdout).strip() or f"mount exited {out.returncode}"
                self.mode = "rlimit"
        return self.mode

    def fill(self, agent: AgentProcess) -> None:
        """Make writes to the folder fail from now on."""
        self.fills += 1
        self.full = True
        if self.mode == "tmpfs":
            self.ballast_bytes = _fill(self.folder / self.BALLAST)
        else:
            agent.fsize_limit = 0
            if agent.pid is not None:
                resource.prlimit(agent.pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))

    def free(self, agent: AgentProcess) -> None:
        """Let writes succeed again."""
        self.full = False
        if self.mode == "tmpfs":
            (self.folder / self.BALLAST).unlink(missing_ok=True)
        else:
            agent.fsize_limit = None
            if agent.pid is not None:
                unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
                resource.prlimit(agent.pid, resource.RLIMIT_FSIZE, unlimited)

    def teardown(self) -> None:
        """Remove the ballast and unmount (always called, in a ``finally``)."""
        (self.folder / self.BALLAST).unlink(missing_ok=True)
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)
            self.mounted = False


def _fill(path: Path) -> int:
    """Write ``path`` until the file system refuses; return the bytes written."""
    written = 0
    chunk = b"\0" * (1 << 20)
    with path.open("wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            piece = chunk[:size]
            while True:
                try:
                    f.write(piece)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise
                    break
                written += size
    return written
