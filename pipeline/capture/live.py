"""One live source end to end: CaptureThread -> RingBuffer -> LiveSampler -> ClipQueue.

    with LiveCapture("rtmp://0.0.0.0:1935/live?listen=1", on_event=print) as live:
        for clip in live:          # Clips: 6 frames first, then 2 per second of stream
            engine.turn(clip)
"""

from __future__ import annotations

from typing import Callable, Iterator

from pipeline.capture.clipqueue import DEFAULT_MAXSIZE, ClipQueue
from pipeline.backoff import Backoff
from pipeline.capture.reader import CaptureThread
from pipeline.capture.ringbuffer import DEFAULT_SIZE, RingBuffer
from pipeline.capture.sampler import FPS, LiveSampler
from pipeline.capture.sources import Source, SourceOptions, resolve
from pipeline.capture.frames import MAX_PIXELS
from pipeline.types import Clip, StreamEvent


class LiveCapture:
    def __init__(self, source: str | Source, *, options: SourceOptions | None = None,
                 on_event: Callable[[StreamEvent], None] | None = None, max_pixels: int = MAX_PIXELS,
                 fps: float = FPS, queue_size: int = DEFAULT_MAXSIZE, ring_size: int = DEFAULT_SIZE,
                 backoff: Backoff = Backoff(), wait_for_source: bool | None = None, wait_after_end: bool = False):
        src = source if isinstance(source, Source) else resolve(source, options)
        self.ring = RingBuffer(ring_size)
        self.clips = ClipQueue(queue_size)
        self.capture = CaptureThread(src, self.ring, on_event=on_event, backoff=backoff,
                                     wait_for_source=wait_for_source, wait_after_end=wait_after_end)
        self.sampler = LiveSampler(self.ring, self.clips, fps=fps, max_pixels=max_pixels, on_event=on_event)

    @property
    def source(self) -> Source:
        return self.capture.source

    def start(self) -> "LiveCapture":
        self.capture.start()
        self.sampler.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True at the first frame; raises the CaptureError if the source failed first."""
        return self.capture.wait_ready(timeout)

    def get(self, timeout: float | None = None) -> Clip | None:
        """The next clip; None on timeout or once the source has ended and the queue is drained."""
        return self.clips.get(timeout)

    def __iter__(self) -> Iterator[Clip]:
        return iter(self.clips)

    def stop(self) -> bool:
        """Stop both threads (bounded: see CaptureThread.stop_bound); True if both ended."""
        ok = self.capture.stop()
        ok = self.sampler.stop() and ok
        self.clips.close()
        return ok

    @property
    def error(self):
        return self.capture.error

    def stats(self) -> dict:
        return {"capture": dict(self.capture.stats), "ring": self.ring.stats(),
                "sampler": dict(self.sampler.stats), "queue": self.clips.stats()}

    def __enter__(self) -> "LiveCapture":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
