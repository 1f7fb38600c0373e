"""A resolution change mid-file: the capture thread follows it, offline clips stay one size each.

(The offline frame rule itself is tested in tests/test_vod.py and against the reference in test_parity.py.)
"""

from __future__ import annotations


import numpy as np

import servers
from pipeline.capture import CaptureThread, RingBuffer, resolve
from pipeline.capture.sampler import conform
from pipeline.capture.files import file_clips

BITS = 10
BLOCK = 40  # px: each bit of the frame index is a BLOCK x BLOCK square, white = 1
W, H = 640, 360


def test_resolution_change_mid_stream(media_dir):
    """Two MPEG-TS pieces of different sizes, back to back: frames follow the new size, the
    change is an event, and a clip spanning it has one size."""
    a = servers.make_video(media_dir / "a.ts", size="320x240", fps=30, seconds=2)
    b = servers.make_video(media_dir / "b.ts", size="640x360", fps=30, seconds=2)
    both = media_dir / "both.ts"
    both.write_bytes(a.read_bytes() + b.read_bytes())
    events = []
    ring = RingBuffer(200)
    cap = CaptureThread(resolve(str(both), pace=False), ring, on_event=events.append).start()
    assert cap.done.wait(30) and cap.error is None
    sizes = [f.image.shape[:2] for f in ring.snapshot()]
    assert sizes[0] == (240, 320) and sizes[-1] == (360, 640)
    assert [e.kind for e in events] == ["format_changed", "source_ended"]
    assert "320x240" in events[0].detail and "640x360" in events[0].detail
    pts = [f.pts for f in ring.snapshot()]
    assert pts == sorted(pts)  # stream time stays monotonic across the splice
    clips = list(file_clips(str(both)))
    assert all(len({fr.shape for fr in c.frames}) == 1 for c in clips)
    assert conform([np.zeros((10, 20, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)])[0].shape == (28, 56, 3)
