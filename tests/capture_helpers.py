"""Small helpers shared by the capture tests."""

from __future__ import annotations

import time

import dataclasses

from pipeline.capture import CaptureThread, RingBuffer, SourceOptions, resolve
from pipeline.types import Frame


def grab(source, n: int = 10, timeout: float = 30, **kw) -> tuple[list[Frame], CaptureThread, list]:
    """Capture until ``n`` distinct newest frames were seen; stop; return (frames, capture, events)."""
    events: list = []
    ring = RingBuffer(8)
    names = {f.name for f in dataclasses.fields(SourceOptions)}
    opts = {k: kw.pop(k) for k in list(kw) if k in names}
    if opts:
        source = resolve(source, **opts)
    cap = CaptureThread(source, ring, on_event=events.append, **kw).start()
    frames: list[Frame] = []
    try:
        assert cap.wait_ready(timeout), f"no frame within {timeout}s"
        deadline = time.monotonic() + timeout
        last = -1
        while len(frames) < n:
            f = ring.wait_newer(last, timeout=max(0.1, deadline - time.monotonic()))
            assert f is not None, f"only {len(frames)} frames within {timeout}s ({cap.error})"
            frames.append(f)
            last = f.index
    finally:
        t = time.monotonic()
        assert cap.stop(), "capture thread did not stop"
        assert time.monotonic() - t < cap.stop_bound
    return frames, cap, events


def check_frames(frames: list[Frame], width: int, height: int) -> None:
    assert all(f.image.shape == (height, width, 3) and f.image.dtype.name == "uint8" for f in frames)
    pts = [f.pts for f in frames]
    assert pts == sorted(pts) and len(set(pts)) == len(pts), pts
    idx = [f.index for f in frames]
    assert idx == sorted(idx)
