"""Retry policy: exponential backoff with full jitter and a cap, honouring Retry-After.

Attempts and the next attempt time live on the outbox row, so a schedule survives
restarts; this module only computes the delay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.errors import RateLimited


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff parameters: base delay, cap, and attempts before a failure is given up."""

    base_seconds: float = 2.0
    cap_seconds: float = 600.0
    max_attempts: int = 12

    def delay(
        self, attempt: int, *, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 1).

        A server's Retry-After is a floor: we never come back earlier than it asked.
        """
        ceiling = min(self.cap_seconds, self.base_seconds * (2 ** max(0, attempt - 1)))
        jittered = (rng or random).uniform(0, ceiling)
        if retry_after is not None:
            return max(float(retry_after), jittered)
        return jittered

    def next_attempt_at(
        self,
        now: datetime,
        attempt: int,
        *,
        retry_after: float | None = None,
        rng: random.Random | None = None,
    ) -> datetime:
        """The time of the next attempt after ``attempt`` failures."""
        return now + timedelta(seconds=self.delay(attempt, retry_after=retry_after, rng=rng))

    def exhausted(self, attempts: int) -> bool:
        """Tell whether ``attempts`` failures mean giving up (the exception queue)."""
        return attempts >= self.max_attempts


def retry_after_of(exc: BaseException) -> float | None:
    """Return the server-requested wait carried by ``exc``, if any."""
    return exc.retry_after if isinstance(exc, RateLimited) else None
