"""The opencv: source plugin: OpenCV's VideoCapture feeding the same capture thread and ring buffer."""

from __future__ import annotations

import subprocess
import threading

import numpy as np
import pytest

import servers
from pipeline.capture import CaptureError, CaptureThread, ClipQueue, LiveSampler, RingBuffer, resolve
from pipeline.plugins import SOURCES, registry


@pytest.fixture(scope="module")
def red_mp4(tmp_path_factory):
    """2 s of pure red at 10 fps, H.264 in MP4, written by ffmpeg."""
    path = tmp_path_factory.mktemp("cv") / "red.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "color=c=red:s=64x48:r=10:d=2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def capture(spec: str, **kw) -> tuple[list, list, CaptureThread]:
    ring, events = RingBuffer(100), []
    cap = CaptureThread(resolve(spec, **kw), ring, on_event=events.append).start()
    assert cap.done.wait(20)
    return ring.snapshot(), events, cap


def test_opencv_reads_an_mp4_like_pyav(red_mp4):
    frames, events, cap = capture(f"opencv:{red_mp4}", pace=False)
    assert cap.error is None and [e.kind for e in events] == ["source_ended"]
    assert len(frames) == 20 and [f.index for f in frames] == list(range(20))
    assert [f.pts for f in frames] == pytest.approx([i / 10 for i in range(20)], abs=1e-3)  # seconds, from 0
    img = frames[0].image
    assert img.dtype == np.uint8 and img.shape == (48, 64, 3)
    assert img[..., 0].min() > 200 and img[..., 2].max() < 60  # RGB order (OpenCV decodes BGR)
    pyav, _, _ = capture(str(red_mp4), pace=False)  # the same file through PyAV
    assert [f.pts for f in pyav] == pytest.approx([f.pts for f in frames], abs=1e-3)
    assert np.abs(pyav[5].image.astype(int) - frames[5].image.astype(int)).max() <= 3


def test_opencv_frames_reach_the_sampler(red_mp4):
    ring, clips = RingBuffer(32), ClipQueue(4)
    with CaptureThread(resolve(f"opencv:{red_mp4}"), ring), LiveSampler(ring, clips, opener_frames=2, lookahead=0.1):
        clip = clips.get(timeout=10)
    assert clip.timestamps == (0.0, 0.5) and clip.stop == 1.0 and clip.frames.dtype == np.uint8


def test_opencv_spec_errors_and_registry():
    assert "opencv" in registry.names(SOURCES)
    src = resolve("opencv:0?api=v4l2", video_size="640x480", framerate=30)
    assert (src.kind, src.url, src.format, src.live, src.pace) == ("opencv", "0", "v4l2", True, False)
    with pytest.raises(CaptureError, match="no backend 'nope'"):
        resolve("opencv:0?api=nope")
    with pytest.raises(CaptureError, match="expected opencv:"):
        resolve("opencv:0?fps=3")
    ring = RingBuffer(2)
    cap = CaptureThread(resolve("opencv:/dev/video-none-here?api=v4l2"), ring, wait_for_source=False).start()
    with pytest.raises(CaptureError, match="cannot open"):
        cap.wait_ready(10)


def test_opencv_live_input_is_timed_by_the_wall_clock_and_reconnects(red_mp4):
    """A target that is not a file (here an HTTP URL through OpenCV's FFmpeg backend) is live: frames
    are timed at capture, its end is source_lost, and it is opened again (source_back)."""
    ring, events, back = RingBuffer(100), [], threading.Event()

    def on_event(e):
        events.append(e.kind)
        if e.kind == "source_back":
            back.set()

    with servers.HttpDir(red_mp4.parent) as http:
        cap = CaptureThread(resolve(f"opencv:{http.url(red_mp4.name)}?api=ffmpeg"), ring, on_event=on_event).start()
        assert cap.wait_ready(10) and back.wait(15)
        assert cap.stop()
    assert events[:2] == ["source_lost", "source_back"] and cap.error is None
    pts = [f.pts for f in ring.snapshot()]
    assert pts == sorted(pts) and cap.stats["frames"] >= 20
