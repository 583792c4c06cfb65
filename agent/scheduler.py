"""Runs the pipeline: one full cycle (``run --once``) or forever under APScheduler.

Jobs: a poll per source on its own interval, resolve (woken after each capture), a
delivery per target, slot-lag gauges, journal pruning, parked-item retries and the
watchdog ping. No job overlaps itself (``max_instances=1``, ``coalesce``). A job that
fails records it in health and backs off; a ``PermanentError`` pauses that connector's
jobs only, and ``status`` shows why.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger

from agent import pipeline
from agent.daemon import Runtime
from agent.errors import PermanentError, RetryableError, SyncAgentError
from agent.logging import log_event
from agent.model import utcnow
from agent.notify import Notifier, watchdog_interval
from agent.reconcile import lookup_for, reconcile
from state import checkpoints, health, journal, open_state, outbox
from state.db import State

logger = logging.getLogger(__name__)

#: Seconds a stop waits for jobs in flight (below the unit's TimeoutStopSec=90).
STOP_TIMEOUT = 75.0

#: Health row holding an API connector's call usage and budget (not a stream of changes).
API_STREAM = "api"


@dataclass
class CycleReport:
    """What one full cycle did, per stage, and which connectors failed."""

    captured: dict[str, int] = field(default_factory=dict)
    resolved: int = 0
    applied: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no connector failed."""
        return not self.failures


class AgentRunner:
    """Owns the job functions and their per-thread state connections."""

    def __init__(
        self, runtime: Runtime, *, notifier: Notifier | None = None, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.rt = runtime
        self.notifier = notifier or Notifier()
        self.clock = clock
        self._local = threading.local()
        self._stop = threading.Event()
        self._states: list[State] = []
        self._lock = threading.Lock()
        self._backoff: dict[str, tuple[int, float]] = {}
        self._scheduler: BlockingScheduler | None = None
        self._primed: set[str] = set()
        self._stopped: set[str] = set()
        self._running = threading.Condition()
        self._active = 0
        self._busy: set[str] = set()
        self._rerun: set[str] = set()

    # --- state per thread ---------------------------------------------------------------------
    def state(self) -> State:
        """This thread's connection to the state file."""
        st = getattr(self._local, "st", None)
        if st is None:
            st = open_state(self.rt.config.agent.state_path, background_checkpoints=True)
            self._local.st = st
            with self._lock:
                self._states.append(st)
        return st

    def close(self) -> None:
        """Close every state connection the jobs opened."""
        with self._lock:
            for st in self._states:
                st.close()
            self._states.clear()

    # --- jobs ---------------------------------------------------------------------------------
    def poll(self, name: str) -> int:
        """Capture every stream of source ``name``; return the changes journaled."""
        source = self.rt.sources[name]
        st = self.state()
        total = 0
        for stream in source.streams():
            if self._stop.is_set():
                break
            self._prime(name, stream, st)
            result = pipeline.capture(
                source,
                st,
                stream,
                limit=self.rt.config.agent.resolve_batch,
                clock=self.clock,
                should_stop=self._stop.is_set,
            )
            total += result.journaled
            health.record_success(st, name, stream, changes=result.journaled)
        self._gauges(name, st)
        return total

    def _prime(self, name: str, stream: str, st: State) -> None:
        """Replay from the last checkpoint: acknowledge what the journal already holds."""
        key = f"{name}/{stream}"
        if key in self._primed:
            return
        cp = checkpoints.get(st, pipeline.source_owner(name), stream)
        if cp is not None:
            self.rt.sources[name].commit(stream, cp.cursor)
        self._primed.add(key)

    def _gauges(self, name: str, st: State) -> None:
        source = self.rt.sources[name]
        usage = getattr(source, "api_usage", None)
        if callable(usage):
            health.set_gauges(st, name, API_STREAM, detail=usage())
        lag = getattr(source, "lag", None)
        if not callable(lag):
            return
        info = lag()
        oldest = getattr(source, "oldest_unconsumed_at", lambda: None)()
        for stream in source.streams():
            health.set_gauges(
                st,
                name,
                stream,
                lag_bytes=info.retained_bytes,
                oldest_unconsumed_at=oldest,
                detail={
                    "pending_bytes": info.pending_bytes,
                    "wal_status": info.wal_status,
                    "confirmed_flush_lsn": info.confirmed_flush_lsn,
                },
            )

    def resolve(self) -> int:
        """Resolve everything pending; return how many journal entries were resolved."""
        st = self.state()
        total = 0
        while not self._stop.is_set():
            n = pipeline.resolve_pending(st, self.rt.resolver, limit=self.rt.config.agent.resolve_batch)
            total += n
            if n == 0:
                break
        return total

    def deliver(self, target: str) -> tuple[int, int]:
        """Deliver due ops to ``target`` until none are due; return (applied, rejected)."""
        st = self.state()
        sink = self.rt.sinks[target]
        lookup = lookup_for(self.rt, target)
        applied = rejected = 0
        for _ in range(10_000):
            if self._stop.is_set():
                break
            r = pipeline.deliver(
                sink,
                st,
                self.rt.resolver,
                policy=self.rt.policy,
                limit=self.rt.config.agent.deliver_batch,
                clock=self.clock,
                lookup=lookup,
            )
            applied += r.applied
            rejected += r.rejected
            if r.applied + r.retried + r.rejected == 0 or r.applied + r.rejected == 0:
                break
        health.record_success(st, target, "deliver", changes=applied)
        return applied, rejected

    def retry_parked(self) -> int:
        """Re-resolve parked exception items whose cause may have gone."""
        return pipeline.retry_parked(self.state(), self.rt.resolver)

    def reconcile_all(self) -> None:
        """The nightly reconciliation: report drift, queue missing records (never repairs unasked)."""
        for name, entity in self.rt.config.entities.items():
            if len(entity.systems) > 1 and not self._stop.is_set():
                reconcile(self.rt, self.state(), name, repair=False, open_exceptions=True)

    def prune(self) -> None:
        """Drop journal, history and outbox rows past retention (never unresolved ones)."""
        st = self.state()
        cutoff = self.clock() - timedelta(days=self.rt.config.agent.journal_retention_days)
        n = journal.prune(st, older_than=cutoff)
        h = checkpoints.prune_history(st, cutoff)
        o = outbox.prune(st, older_than=cutoff)
        log_event(logger, "pruned", journal=n, checkpoint_history=h, outbox=o)

    # --- one cycle ----------------------------------------------------------------------------
    def run_once(self) -> CycleReport:
        """Capture every source, resolve everything, deliver everything due; then return."""
        report = CycleReport()
        for name in self.rt.sources:

            def _poll(n: str = name) -> None:
                report.captured[n] = self.poll(n)

            self._guard(f"poll:{name}", name, _poll, report)

        def _resolve() -> None:
            report.resolved = self.resolve()

        self._guard("resolve", "resolver", _resolve, report)
        self._guard("retry_parked", "resolver", self.retry_parked, report)
        for target in self.rt.sinks:

            def _deliver(t: str = target) -> None:
                applied, rejected = self.deliver(t)
                report.applied[t], report.rejected[t] = applied, rejected

            self._guard(f"deliver:{target}", target, _deliver, report)
        return report

    def _guard(
        self, job: str, connector: str, fn: Callable[[], Any], report: CycleReport | None = None
    ) -> bool:
        """Run one job; record failures in health instead of letting them escape."""
        try:
            fn()
            self._backoff.pop(job, None)
            return True
        except PermanentError as exc:
            self._record_failure(job, connector, exc, "stopped")
            self._stopped.add(connector)
            if report is not None:
                report.failures[connector] = f"{type(exc).__name__}: {exc}"
            if self._scheduler is not None:
                for j in self._scheduler.get_jobs():
                    if j.id.endswith(f":{connector}"):
                        j.pause()
            return False
        except (RetryableError, SyncAgentError) as exc:
            self._record_failure(job, connector, exc, "error")
            if report is not None:
                report.failures[connector] = f"{type(exc).__name__}: {exc}"
            return False
        except Exception as exc:  # the job wrapper is the one place that may catch everything
            logger.error("job_crashed", extra={"fields": {"job": job}}, exc_info=True)
            self._record_failure(job, connector, exc, "error")
            if report is not None:
                report.failures[connector] = f"{type(exc).__name__}: {exc}"
            return False

    def _record_failure(self, job: str, connector: str, exc: BaseException, state: str) -> None:
        attempts, _ = self._backoff.get(job, (0, 0.0))
        attempts += 1
        wait = self.rt.policy.delay(attempts, retry_after=getattr(exc, "retry_after", None))
        self._backoff[job] = (attempts, time.monotonic() + wait)
        log_event(
            logger,
            "job_failed",
            job=job,
            connector=connector,
            error=type(exc).__name__,
            message=str(exc),
            attempts=attempts,
            backoff_s=round(wait, 1),
            level=logging.WARNING,
        )
        try:
            stream = job.split(":", 1)[0] if ":" in job else job
            health.record_error(
                self.state(),
                connector,
                "deliver" if stream == "deliver" else "*",
                error=f"{type(exc).__name__}: {exc}",
                state=state,  # type: ignore[arg-type]
            )
        except SyncAgentError:
            pass

    def _backing_off(self, job: str) -> bool:
        entry = self._backoff.get(job)
        return entry is not None and time.monotonic() < entry[1]

    # --- forever ------------------------------------------------------------------------------
    def run_forever(self) -> None:
        """Schedule every job and block until ``stop()``; a clean stop finishes the batch in flight."""
        sched = BlockingScheduler(
            # The watchdog ping has a thread of its own: a long catch-up must not starve it.
            executors={
                "default": ThreadPoolExecutor(max_workers=6),
                "watchdog": ThreadPoolExecutor(max_workers=1),
            },
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 30},
        )
        self._scheduler = sched
        cfg = self.rt.config
        for name, sc in cfg.systems.items():
            if name in self.rt.sources:
                sched.add_job(
                    self._job(f"poll:{name}", name, functools.partial(self._poll_and_wake, name)),
                    "interval",
                    seconds=sc.poll_interval,
                    id=f"poll:{name}",
                    next_run_time=self.clock(),
                )
        sched.add_job(
            self._job("resolve", "resolver", self._resolve_then_deliver),
            "interval",
            seconds=cfg.agent.resolve_interval,
            id="resolve",
            next_run_time=self.clock(),
        )
        for target in self.rt.sinks:
            sched.add_job(
                self._job(f"deliver:{target}", target, functools.partial(self.deliver, target)),
                "interval",
                seconds=max(1.0, cfg.agent.resolve_interval),
                id=f"deliver:{target}",
            )
        sched.add_job(
            self._job("retry_parked", "resolver", self.retry_parked), "interval", minutes=5, id="retry_parked"
        )
        sched.add_job(self._job("prune", "state", self.prune), "interval", hours=1, id="prune")
        sched.add_job(
            self._job("reconcile", "reconcile", self.reconcile_all),
            CronTrigger.from_crontab(cfg.agent.reconcile_cron),
            id="reconcile",
        )
        interval = watchdog_interval()
        if interval:
            sched.add_job(
                self.notifier.watchdog, "interval", seconds=interval, id="watchdog", executor="watchdog"
            )
        self.notifier.ready()
        log_event(
            logger,
            "agent_started",
            sources=",".join(self.rt.sources),
            sinks=",".join(self.rt.sinks),
            config=cfg.digest,
        )
        try:
            sched.start()
        finally:
            self._wait_for_jobs(STOP_TIMEOUT)
            self.close()

    def reschedule(self) -> None:
        """Apply the (reloaded) config's poll and resolve intervals to the running jobs."""
        if self._scheduler is None:
            return
        cfg = self.rt.config
        for name, sc in cfg.systems.items():
            job = self._scheduler.get_job(f"poll:{name}")
            if job is not None and job.next_run_time is not None:  # a paused job stays paused
                self._scheduler.reschedule_job(f"poll:{name}", trigger="interval", seconds=sc.poll_interval)
        self._scheduler.reschedule_job("resolve", trigger="interval", seconds=cfg.agent.resolve_interval)

    def _job(self, job: str, connector: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            if self._stop.is_set() or self._backing_off(job) or connector in self._stopped:
                return
            with self._running:
                self._active += 1
                self._busy.add(job)
            try:
                while True:
                    self._guard(job, connector, fn)
                    with self._running:
                        # A wake-up that arrived while this job ran would be dropped by
                        # APScheduler (max_instances=1): honour it now instead of next tick.
                        if job not in self._rerun or self._stop.is_set():
                            self._busy.discard(job)
                            break
                        self._rerun.discard(job)
            finally:
                with self._running:
                    self._active -= 1
                    self._running.notify_all()

        return run

    def _wait_for_jobs(self, timeout: float) -> None:
        """After the scheduler stopped: let the jobs in flight finish their batch and commit."""
        deadline = time.monotonic() + timeout
        with self._running:
            while self._active and time.monotonic() < deadline:
                self._running.wait(0.2)
        if self._active:
            log_event(logger, "stop_timeout", jobs=self._active, level=logging.WARNING)

    def _wake(self, job_id: str) -> None:
        """Run a job now, unless the agent is stopping or the job is paused (a stopped connector)."""
        sched = self._scheduler
        if sched is None or self._stop.is_set():
            return
        job = sched.get_job(job_id)
        if job is None or job.next_run_time is None:  # paused: waking it would un-pause it
            return
        with self._running:
            if job_id in self._busy:
                self._rerun.add(job_id)
                return
        try:
            sched.modify_job(job_id, next_run_time=self.clock())
        except Exception:  # noqa: BLE001 - a scheduler shutting down under us: nothing to wake
            return

    def _poll_and_wake(self, name: str) -> None:
        if self.poll(name):
            self._wake("resolve")

    def _resolve_then_deliver(self) -> None:
        if self.resolve():
            for target in self.rt.sinks:
                self._wake(f"deliver:{target}")

    def stop(self) -> None:
        """Ask every job to finish its batch, then stop the scheduler (jobs are awaited after)."""
        self._stop.set()
        self.notifier.stopping()
        if self._scheduler is not None and self._scheduler.running:
            # Not wait=True: that holds the job-store lock while a finishing job may need it.
            self._scheduler.shutdown(wait=False)
