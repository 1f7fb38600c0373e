"""One retry schedule for every loop that reconnects or re-sends (capture, sinks, outputs), and one rule
for how often such a loop's failures are logged (``LogLimit``).

Threads that retry wait on their own stop event, so a stop request ends the wait at once:
``backoff.wait(stop_event, attempt)`` sleeps for ``delay(attempt)`` seconds unless stopped first.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: attempt 1 retries at once, then ``initial``, ``initial*factor``, ... seconds,
    capped at ``max_delay`` seconds; ``max_attempts`` None retries forever."""

    initial: float = 0.5
    factor: float = 2.0
    max_delay: float = 5.0
    max_attempts: int | None = None  # None: forever

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based), for any attempt number: past the cap the delay
        stays at ``max_delay`` (``factor ** n`` as a float overflows past ~1,000 doublings — at the 5-s cap a source
        down 85 minutes — and the OverflowError ended the retrying loop)."""
        if attempt <= 1:
            return 0.0
        n = attempt - 2
        if self.initial <= 0:
            return min(self.max_delay, 0.0)
        if self.factor > 1 and (self.max_delay <= self.initial or
                                n >= math.log(self.max_delay / self.initial, self.factor)):
            return self.max_delay
        return min(self.max_delay, self.initial * self.factor ** n)

    def exhausted(self, attempt: int) -> bool:
        """True once ``attempt`` is past ``max_attempts``."""
        return self.max_attempts is not None and attempt > self.max_attempts

    def wait(self, stop: threading.Event, attempt: int) -> bool:
        """Sleep ``delay(attempt)`` seconds or until ``stop`` is set; True if stopped."""
        return stop.wait(self.delay(attempt))


@dataclass
class LogLimit:
    """Which occurrences of a repeating failure to log as warnings, so that a source or target down for hours
    does not write a line per retry (about 17,000 a day at a 5-s backoff): occurrence ``n`` (1-based, counted by
    the caller: attempts since the last success, errors so far) is logged when ``n <= first`` or when
    ``every_s`` seconds (monotonic) have passed since the last one logged; the others go to debug level.
    Not thread-safe: one per retrying thread."""

    first: int = 5
    every_s: float = 60.0
    _last: float = field(default=float("-inf"), repr=False)
    _held: int = field(default=0, repr=False)

    def check(self, n: int, now: float | None = None) -> str | None:
        """None: log occurrence ``n`` at debug level. Else the suffix for its warning line: how many were left
        out since the last one logged and, at the ``first``-th, that the rest come once every ``every_s`` s
        ('' when there is nothing to say)."""
        now = time.monotonic() if now is None else now
        if n > self.first and now - self._last < self.every_s:
            self._held += 1
            return None
        self._last = now
        notes = [f"{self._held} more since the last line"] if self._held else []
        if n == self.first:
            notes.append(f"from now on logged once every {self.every_s:g} s")
        self._held = 0
        return f" ({'; '.join(notes)})" if notes else ""
