"""One retry schedule for every loop that reconnects or re-sends (capture, sinks, outputs).

Threads that retry wait on their own stop event, so a stop request ends the wait at once:
``backoff.wait(stop_event, attempt)`` sleeps for ``delay(attempt)`` seconds unless stopped first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: attempt 1 retries at once, then ``initial``, ``initial*factor``, ... seconds,
    capped at ``max_delay`` seconds; ``max_attempts`` None retries forever."""

    initial: float = 0.5
    factor: float = 2.0
    max_delay: float = 5.0
    max_attempts: int | None = None  # None: forever

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based)."""
        if attempt <= 1:
            return 0.0
        return min(self.max_delay, self.initial * self.factor ** (attempt - 2))

    def exhausted(self, attempt: int) -> bool:
        """True once ``attempt`` is past ``max_attempts``."""
        return self.max_attempts is not None and attempt > self.max_attempts

    def wait(self, stop: threading.Event, attempt: int) -> bool:
        """Sleep ``delay(attempt)`` seconds or until ``stop`` is set; True if stopped."""
        return stop.wait(self.delay(attempt))
