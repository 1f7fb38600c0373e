"""clips_from_file: exactly the frames the reference rule picks, resized per smart_resize."""

from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np
import pytest

import servers
from pipeline.capture import CaptureThread, RingBuffer, clips_from_file, reference_pick, resolve
from pipeline.capture.sampler import conform
from pipeline.frames import MAX_PIXELS, resize_frames, smart_resize

BITS = 10
BLOCK = 40  # px: each bit of the frame index is a BLOCK x BLOCK square, white = 1
W, H = 640, 360


def _index_image(i: int) -> np.ndarray:
    img = np.full((H, W, 3), 60, np.uint8)
    for b in range(BITS):
        if i >> b & 1:
            x = BLOCK * (b + 1)
            img[140:140 + BLOCK, x:x + BLOCK] = 255
    return img


def _read_index(img: np.ndarray) -> int:
    h, w = img.shape[:2]
    sy, sx = h / H, w / W
    y = int((140 + BLOCK / 2) * sy)
    return sum(1 << b for b in range(BITS) if img[y, int((BLOCK * (b + 1) + BLOCK / 2) * sx)].mean() > 160)


def _frame_clock_video(path, fps: int, n: int):
    """An H.264 file written with PyAV whose frame i shows i in pixels and has pts i/fps."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": "12", "preset": "ultrafast", "bf": "0"}
        for i in range(n):
            f = av.VideoFrame.from_ndarray(_index_image(i), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, fps)
            out.mux(s.encode(f))
        out.mux(s.encode(None))
    return path


def _decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize("fps,n", [(30, 126), (25, 105)])  # 4.2 s: 9 grid points, an odd tail
def test_clips_from_file_pick_reference_frames(tmp_path, fps, n):
    path = _frame_clock_video(tmp_path / f"clock{fps}.mp4", fps, n)
    clips = list(clips_from_file(str(path)))
    # grid t = k/2 for k = 0..8 (last pts is (n-1)/fps = 4.13..4.16 s); frame = first with i/fps >= t
    expected = [math.ceil(Fraction(k, 2) * fps) for k in range(9)]
    assert expected == reference_pick([Fraction(i, fps) for i in range(n)])
    assert [c.timestamps for c in clips] == [(0.0, 0.5, 1.0, 1.5, 2.0, 2.5), (3.0, 3.5), (4.0, 4.5)]
    assert [len(c.frames) for c in clips] == [6, 2, 2]
    got = [_read_index(f) for c in clips for f in c.frames]
    assert got == expected + [expected[-1]]  # the odd tail is padded by repeating the last frame
    # resized per smart_resize, and equal to resize_frames of those decoded frames
    decoded = _decoded(path)
    sh, sw = smart_resize(H, W, max_pixels=MAX_PIXELS)
    assert all(c.frames.shape[1:] == (sh, sw, 3) for c in clips)
    want = resize_frames(np.stack([decoded[i] for i in expected[:6]]))
    assert np.array_equal(clips[0].frames, want)
    assert clips[0].start == 0.0 and clips[0].stop == 3.0


def test_clips_from_file_max_pixels(tmp_path):
    path = _frame_clock_video(tmp_path / "small.mp4", 30, 40)
    clip = next(iter(clips_from_file(str(path), max_pixels=128 * 28 * 28)))
    assert clip.frames.shape[1:3] == smart_resize(H, W, max_pixels=128 * 28 * 28)
    assert len(clip.frames) == 4 and clip.timestamps == (0.0, 0.5, 1.0, 1.5)  # 1.33 s: 3 frames, padded


def test_clips_from_file_errors(tmp_path, media_dir):
    from pipeline.capture import CaptureError
    with pytest.raises(CaptureError, match="No such file"):
        next(clips_from_file(str(tmp_path / "missing.mp4")))
    with pytest.raises(CaptureError, match="no video stream"):
        next(clips_from_file(str(servers.make_audio(media_dir / "a.m4a"))))


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
    clips = list(clips_from_file(str(both)))
    assert all(len({fr.shape for fr in c.frames}) == 1 for c in clips)
    assert conform([np.zeros((10, 20, 3), np.uint8), np.zeros((28, 56, 3), np.uint8)])[0].shape == (28, 56, 3)
