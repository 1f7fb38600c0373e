"""A bounded queue of Clips that drops the OLDEST clip when full ("skip to live").

The sampler never blocks on a slow consumer; the consumer always gets the newest clips, and
``dropped`` counts what it skipped. ``close()`` ends iteration once the queue is drained.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterator

from pipeline.types import Clip

DEFAULT_MAXSIZE = 2  # with 1 clip/s, a clip waits at most ~2 s before it is taken or dropped


class ClipQueue:
    def __init__(self, maxsize: int = DEFAULT_MAXSIZE):
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.maxsize = maxsize
        self._q: deque[Clip] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.put_count = 0
        self.dropped = 0

    def put(self, clip: Clip) -> None:
        """Append ``clip``; if full, the oldest waiting clip is dropped (and counted)."""
        with self._cond:
            if self._closed:
                return
            if len(self._q) >= self.maxsize:
                self._q.popleft()
                self.dropped += 1
            self._q.append(clip)
            self.put_count += 1
            self._cond.notify()

    def get(self, timeout: float | None = None) -> Clip | None:
        """The oldest waiting clip; None on timeout, or when closed and drained."""
        with self._cond:
            self._cond.wait_for(lambda: self._q or self._closed, timeout)
            return self._q.popleft() if self._q else None

    def oldest_ready(self) -> float | None:
        """``ready_at`` (monotonic s) of the oldest waiting clip, None if none waits."""
        with self._cond:
            return self._q[0].ready_at if self._q else None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Clip]:
        while (clip := self.get()) is not None:
            yield clip

    def stats(self) -> dict:
        with self._cond:
            return {"maxsize": self.maxsize, "waiting": len(self._q), "put": self.put_count,
                    "dropped": self.dropped}
