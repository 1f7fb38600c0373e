"""A fixed-size ring of the newest Frames: the capture thread writes, samplers read.

The writer never blocks and the ring never grows: when full, ``put`` overwrites the oldest
slot. Readers wait on a condition for a frame newer than the one they hold.
"""

from __future__ import annotations

import threading

from pipeline.types import Frame

DEFAULT_SIZE = 16  # about 0.5 s at 30 fps; ~100 MB of RGB at 1080p


class RingBuffer:
    def __init__(self, size: int = DEFAULT_SIZE):
        if size < 1:
            raise ValueError("ring size must be >= 1")
        self.size = size
        self._slots: list[Frame | None] = [None] * size
        self._cond = threading.Condition()
        self.written = 0  # frames ever put
        self.overwritten = 0  # puts that replaced an older frame
        self._closed = False

    def put(self, frame: Frame) -> None:
        """Store ``frame`` (its ``index`` should increase); never blocks for readers."""
        with self._cond:
            if self.written >= self.size:
                self.overwritten += 1
            self._slots[self.written % self.size] = frame
            self.written += 1
            self._cond.notify_all()

    def latest(self) -> Frame | None:
        with self._cond:
            return self._slots[(self.written - 1) % self.size] if self.written else None

    def snapshot(self) -> list[Frame]:
        """The frames held, oldest first."""
        with self._cond:
            n = min(self.written, self.size)
            return [self._slots[i % self.size] for i in range(self.written - n, self.written)]

    def first_at_or_after(self, pts: float, eps: float = 1e-6) -> Frame | None:
        """The oldest frame held whose pts >= ``pts`` (the reference's sampling rule)."""
        for f in self.snapshot():
            if f.pts >= pts - eps:
                return f
        return None

    def wait_newer(self, than_index: int, timeout: float | None = None) -> Frame | None:
        """The newest frame once its index is > ``than_index``; None on timeout or close."""
        def newest() -> Frame | None:
            f = self._slots[(self.written - 1) % self.size] if self.written else None
            return f if f is not None and f.index > than_index else None

        with self._cond:
            self._cond.wait_for(lambda: self._closed or newest() is not None, timeout)
            return newest()

    def close(self) -> None:
        """Wake every waiter (the source has ended); later waits return None at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return min(self.written, self.size)

    def stats(self) -> dict:
        with self._cond:
            return {"size": self.size, "written": self.written, "overwritten": self.overwritten}
