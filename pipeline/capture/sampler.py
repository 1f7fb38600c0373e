"""Turn decoded frames into model Clips at 2 frames per second of stream time.

Live (:class:`LiveSampler`, a named daemon thread): ticks on a monotonic wall-clock schedule
(tick k at ``t0 + k/fps + lookahead``; waits on its stop event until the next tick, no
polling, no drift). At tick k the grid time is ``k/fps`` of stream time and the frame taken is
the reference's: the first frame held in the ring with pts >= grid time; if that frame has not
arrived yet, the newest frame (counted as ``late``). ``lookahead`` (0.2 s) gives the frame for
the grid time time to arrive, so the chosen pts is within one frame interval of the grid time.
Clip timestamps are these grid times: stream time since the first frame, which is what viewers
see, so the model's ``Time=a-b s`` matches. If stream time and the wall clock drift apart by
more than ``DRIFT_S`` (encoder clock, a gap), the schedule re-anchors on the newest frame;
grid times stay increasing and on the 1/fps grid.

Gaps: while the newest frame is at most ``hold_s`` (2 s) old, ticks keep taking it (repeated
frames, counted); past that, sampling pauses (a partial clip is dropped, event
``sampling_paused``) until a new frame arrives (``sampling_resumed``). The opener has
``opener_frames`` (6: grid 0.0..2.5), every later clip ``turn_frames`` (2); after a pause the
session continues with 2-frame clips.

Recorded files are chunked offline by :mod:`pipeline.capture.files` (the reference's exact frame rule).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.capture.clipqueue import ClipQueue
from pipeline.capture.ringbuffer import RingBuffer
from pipeline.capture.frames import MAX_PIXELS, even_frames, resize_frames
from pipeline.types import Clip, Frame, StreamEvent

log = logging.getLogger(__name__)

FPS = 2.0
OPENER_FRAMES = 6
TURN_FRAMES = 2
LOOKAHEAD_S = 0.2
HOLD_S = 2.0
DRIFT_S = 1.0
_ids = itertools.count(1)


@dataclass(frozen=True)
class Sample:
    """One tick: the grid time, the frame taken, and when."""

    grid: float  # stream seconds (the clip timestamp)
    pts: float  # the chosen frame's stream time
    index: int  # the chosen frame's index
    tick: float  # monotonic time the tick ran
    repeated: bool = False  # the frame was already used (a gap being held)


class LiveSampler:
    """Reads ``ring`` at ``fps`` ticks of wall-clock time; puts Clips into ``queue``."""

    def __init__(self, ring: RingBuffer, queue: ClipQueue | None = None, *, fps: float = FPS,
                 opener_frames: int = OPENER_FRAMES, turn_frames: int = TURN_FRAMES,
                 max_pixels: int = MAX_PIXELS, lookahead: float = LOOKAHEAD_S, hold_s: float = HOLD_S,
                 on_event: Callable[[StreamEvent], None] | None = None, name: str | None = None):
        if opener_frames % 2 or turn_frames % 2:
            raise ValueError("frames per clip must be even (temporal patch of 2)")
        self.ring, self.queue = ring, queue if queue is not None else ClipQueue()
        self.fps, self.opener_frames, self.turn_frames = fps, opener_frames, turn_frames
        self.max_pixels, self.lookahead, self.hold_s = max_pixels, lookahead, hold_s
        self.on_event = on_event
        self.samples: deque[Sample] = deque(maxlen=4096)  # recent ticks, for metrics and tests
        self.stats = {"ticks": 0, "late": 0, "repeated": 0, "clips": 0, "paused": 0, "reanchored": 0,
                      "partial_dropped": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name or f"livecc-sampler-{next(_ids)}")
        self.done = threading.Event()

    def start(self) -> "LiveSampler":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def __enter__(self) -> "LiveSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _emit(self, kind: str, stream_time: float, detail: str = "") -> None:
        log.info("%s at %.2fs %s", kind, stream_time, detail)
        if self.on_event is not None:
            try:
                self.on_event(StreamEvent(kind, round(stream_time, 3), detail))
            except Exception:
                log.exception("sampler event listener failed on %s", kind)

    def _wait_frame(self, than_index: int) -> Frame | None:
        """Block (in condition waits) until a frame newer than ``than_index``, stop, or the end."""
        while not self._stop.is_set():
            f = self.ring.wait_newer(than_index, timeout=0.25)
            if f is not None:
                return f
            if self.ring.closed:
                return None
        return None

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("sampler failed")
        finally:
            self.queue.close()
            self.done.set()

    def _loop(self) -> None:
        step = 1.0 / self.fps
        first = self._wait_frame(-1)
        if first is None:
            return
        t0 = first.arrival - first.pts  # monotonic time of stream time 0
        k = math.ceil(first.pts * self.fps - 1e-6)
        pending: list[tuple[np.ndarray, float]] = []
        used_index = -1
        while not self._stop.is_set():
            grid = k * step
            wait = t0 + grid + self.lookahead - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            now = time.monotonic()
            newest = self.ring.latest()
            f = self.ring.first_at_or_after(grid)
            if f is None and self.ring.closed:
                break  # the source ended and no frame stands for this grid time
            if f is None:
                if now - newest.arrival > self.hold_s:  # a gap: pause until frames come back
                    self.stats["paused"] += 1
                    if pending:
                        self.stats["partial_dropped"] += 1
                    pending = []
                    self._emit("sampling_paused", grid, f"no frame for {now - newest.arrival:.1f}s")
                    f = self._wait_frame(newest.index)
                    if f is None:
                        break
                    t0 = f.arrival - f.pts
                    k = max(k, math.ceil(f.pts * self.fps - 1e-6))
                    self._emit("sampling_resumed", k * step)
                    continue
                f = newest
                self.stats["late"] += 1
            elif abs(newest.pts - grid) > DRIFT_S and now - newest.arrival <= self.hold_s:
                # stream time and wall clock have drifted apart: follow the stream
                self.stats["reanchored"] += 1
                t0 = newest.arrival - newest.pts
                k = max(k + 1, math.ceil((newest.pts - self.lookahead) * self.fps - 1e-6))
                continue
            repeated = f.index <= used_index
            self.stats["ticks"] += 1
            self.stats["repeated"] += repeated
            used_index = max(used_index, f.index)
            self.samples.append(Sample(grid, f.pts, f.index, now, repeated))
            pending.append((resize_frames(f.image[None], self.max_pixels)[0], grid))
            need = self.opener_frames if self.stats["clips"] == 0 else self.turn_frames
            if len(pending) >= need:
                self._put(pending)
                pending = []
            k += 1
        if pending and self.ring.closed:  # the source ended: the tail, padded to even
            self._put(pending)

    def _put(self, pending: list[tuple[np.ndarray, float]]) -> None:
        self.queue.put(make_clip([p[0] for p in pending], [p[1] for p in pending], 1.0 / self.fps))
        self.stats["clips"] += 1


def make_clip(frames: list[np.ndarray], grid: list[float], step: float) -> Clip:
    """Stack already-resized frames into a Clip; pad an odd count (the pad stands for the next
    grid time); frames of another size (the source changed resolution) are resized to the last's."""
    frames = conform(frames)
    grid = list(grid)
    arr = even_frames(np.stack(frames))
    while len(grid) < len(arr):
        grid.append(grid[-1] + step)
    return Clip(arr, tuple(round(g, 6) for g in grid), time.monotonic(), interval=step)


def conform(frames: list[np.ndarray]) -> list[np.ndarray]:
    """Same-size frames: any frame whose size differs from the last one's is resized to it."""
    h, w = frames[-1].shape[:2]
    return [fr if fr.shape[:2] == (h, w) else _resize_to(fr, h, w) for fr in frames]


def _resize_to(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp_(0, 255).round_().to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()
