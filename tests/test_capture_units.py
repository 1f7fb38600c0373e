"""Ring buffer, clip queue, sources registry, backoff: no servers needed."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipeline.capture import Backoff, CaptureThread, ClipQueue, LiveSampler, RingBuffer, SourceOptions, resolve
from pipeline.capture.sources import Source
from pipeline.plugins import SOURCES, registry
from pipeline.types import Clip, Frame


def _frame(i: int) -> Frame:
    return Frame(np.zeros((2, 2, 3), np.uint8), i / 30, time.monotonic(), i)


def test_ring_keeps_newest_never_grows():
    ring = RingBuffer(4)
    assert ring.latest() is None and len(ring) == 0
    for i in range(10):
        ring.put(_frame(i))
    assert len(ring) == 4 and [f.index for f in ring.snapshot()] == [6, 7, 8, 9]
    assert ring.latest().index == 9
    assert ring.stats() == {"size": 4, "written": 10, "overwritten": 6}
    assert ring.first_at_or_after(7.5 / 30).index == 8
    assert ring.first_at_or_after(1.0) is None


def test_ring_wait_newer_wakes_on_put_and_close():
    ring = RingBuffer(2)
    got = []
    t = threading.Thread(target=lambda: got.append(ring.wait_newer(-1, timeout=5)))
    t.start()
    ring.put(_frame(0))
    t.join(5)
    assert got[0].index == 0
    assert ring.wait_newer(0, timeout=0.05) is None  # nothing newer: times out
    t = threading.Thread(target=lambda: got.append(ring.wait_newer(0, timeout=5)))
    t0 = time.monotonic()
    t.start()
    ring.close()
    t.join(5)
    assert got[1] is None and time.monotonic() - t0 < 1


def test_clip_queue_drops_oldest():
    q = ClipQueue(2)
    clips = [Clip(np.zeros((2, 1, 1, 3), np.uint8), (i, i + 0.5)) for i in range(5)]
    for c in clips:
        q.put(c)
    assert q.dropped == 3 and len(q) == 2
    assert q.get(0) is clips[3] and q.get(0) is clips[4] and q.get(0.01) is None
    q.put(clips[0])
    q.close()
    assert list(q) == [clips[0]] and q.get() is None
    assert q.stats() == {"maxsize": 2, "waiting": 0, "put": 6, "dropped": 3}


def test_clip_stop_is_one_frame_interval_after_the_last_frame():
    frames = np.zeros((2, 1, 1, 3), np.uint8)
    assert Clip(frames, (4.0, 5.0), interval=1.0).stop == 6.0  # 1 fps
    assert Clip(frames, (3.0, 3.5)).stop == 4.0  # no interval given: the timestamps' spacing
    assert Clip(frames, (6.0, 6.2), interval=0.2).stop == pytest.approx(6.4)
    with pytest.raises(ValueError):
        Clip(frames[:1], (1.0,))


def test_sampler_at_one_frame_per_second():
    """LiveSampler(fps=1) on a paced test pattern: grid 1 s apart, each clip's stop = last grid time + 1 s."""
    ring, clips = RingBuffer(64), ClipQueue(10)
    with CaptureThread(resolve("lavfi:testsrc2=size=64x48:rate=10"), ring) as cap, \
            LiveSampler(ring, clips, fps=1, opener_frames=2, turn_frames=2, lookahead=0.1):
        assert cap.wait_ready(10)
        got = [clips.get(timeout=10), clips.get(timeout=10)]
    assert [(c.timestamps, c.stop) for c in got] == [((0.0, 1.0), 2.0), ((2.0, 3.0), 4.0)]


def test_backoff_schedule():
    b = Backoff(initial=0.5, factor=2, max_delay=3)
    assert [b.delay(a) for a in range(1, 7)] == [0, 0.5, 1, 2, 3, 3]


def test_backoff_stays_at_its_cap_for_any_attempt_count():
    """A source down for hours is retried 17,280 times a day at the 5-s cap; ``factor ** n`` overflowed a float at
    attempt 1,026 (85 minutes) and the OverflowError ended the capture (found by the fresh-clone CI run of
    tests/test_capture_errors.py, whose 300 instant retries had reached it)."""
    assert Backoff().delay(10**6) == 5.0 and Backoff().delay(1026) == 5.0
    assert Backoff(initial=0.0, max_delay=0.0).delay(5000) == 0.0
    assert Backoff(initial=0.2, factor=1.0, max_delay=5).delay(10**6) == 0.2
    assert Backoff(initial=8.0, max_delay=5.0).delay(3) == 5.0
    b = Backoff(initial=0.5, factor=1.7, max_delay=30)
    ds = [b.delay(a) for a in range(1, 3000)]
    assert ds == sorted(ds) and ds[-1] == 30 and ds[:3] == [0.0, 0.5, 0.85]


def test_resolve_kinds():
    s = resolve("rtmp://0.0.0.0:1935/live?listen=1")
    assert s.listen and s.url == "rtmp://0.0.0.0:1935/live" and s.options["listen"] == "1"
    assert resolve("rtmp://h/live/k").options["rtmp_live"] == "live"
    assert resolve("rtsp://cam/s", transport="udp").options["rtsp_transport"] == "udp"
    assert resolve("rtsp://0.0.0.0:8554/x?listen=1").options["rtsp_flags"] == "listen"
    assert resolve("srt://h:9000?mode=caller").relay
    assert resolve("https://h/a/b.m3u8?token=x").kind == "hls"
    assert resolve("udp://127.0.0.1:5000").format == "mpegts"
    f = resolve("/tmp/x.mp4")
    assert (f.kind, f.pace, f.live) == ("file", True, False)
    assert resolve("file:///tmp/x.mp4", pace=False).url == "/tmp/x.mp4"
    lav = resolve("lavfi:testsrc2=size=1280x720:rate=30")
    assert (lav.format, lav.url, lav.pace) == ("lavfi", "testsrc2=size=1280x720:rate=30", True)
    cam = resolve("v4l2:/dev/video0", video_size="1280x720", framerate=30, pixel_format="mjpeg")
    assert cam.options == {"video_size": "1280x720", "framerate": "30", "input_format": "mjpeg"}
    assert cam.relay and cam.relay_format == "nut"  # PyAV's wheel has no v4l2
    mac = resolve("avfoundation:0", pixel_format="nv12")
    assert mac.format == "avfoundation" and mac.options["pixel_format"] == "nv12"
    assert resolve("dshow:video=USB Camera").url == "video=USB Camera"
    low = resolve("rtmp://h/live/k")
    assert low.options["analyzeduration"] == "500000" and low.options["fflags"] == "nobuffer"
    assert "analyzeduration" not in resolve("rtmp://h/live/k", low_latency=False).options
    assert resolve("rtmp://h/live/k", options={"rw_timeout": "1"}).options["rw_timeout"] == "1"
    assert resolve("https://h/vod.m3u8", live=False).live is False
    with pytest.raises(Exception, match="transport"):
        resolve("rtsp://h/x", transport="quic")


def test_register_a_source_kind():
    """A source kind registered by hand (as a test or an embedding program does) resolves like a built-in."""
    def factory(spec: str, opts: SourceOptions) -> Source:
        return Source("demo", "testsrc2=size=64x64:rate=5", format="lavfi", live=False, pace=opts.pace is not False)

    registry.register(SOURCES, "demo", factory)
    try:
        assert "demo" in registry.names(SOURCES)
        assert resolve("demo:anything").format == "lavfi"
    finally:
        registry.unregister(SOURCES, "demo")
    with pytest.raises(Exception, match="unknown source kind 'demo'"):
        resolve("demo:anything")


def test_live_capture_lavfi_end_to_end():
    """LiveCapture on a paced test pattern: the opener, then 2-frame clips; threads end on stop."""
    import threading as th

    from pipeline.capture import LiveCapture
    from pipeline.capture.frames import smart_resize

    before = set(th.enumerate())
    with LiveCapture("lavfi:testsrc2=size=320x240:rate=30", queue_size=10) as live:
        assert live.wait_ready(10)
        opener = live.get(timeout=10)
        second = live.get(timeout=5)
    assert opener.timestamps == (0.0, 0.5, 1.0, 1.5, 2.0, 2.5) and opener.stop == 3.0
    assert second.timestamps == (3.0, 3.5)
    assert opener.frames.shape == (6, *smart_resize(240, 320), 3)
    assert second.ready_at - opener.ready_at == pytest.approx(1.0, abs=0.25)
    assert len(list(live)) <= 10  # stopped: the queue is closed, iteration ends once drained
    assert not [t for t in set(th.enumerate()) - before if t.is_alive()]
