"""Each source kind against a real server / encoder on loopback (see tests/servers.py)."""

from __future__ import annotations

import threading
import time

import pytest

import servers
from capture_helpers import check_frames, grab
from pipeline.capture import CaptureThread, RingBuffer, resolve

pytestmark = pytest.mark.timeout(90)
W, H = 320, 240


def test_rtmp_pull(nginx_rtmp, publisher, stream_key):
    url = nginx_rtmp.url(stream_key)
    publisher(url, size=f"{W}x{H}", fps=30, audio=True)
    t = time.monotonic()
    frames, cap, events = grab(url, n=30, wait_for_source=True)
    check_frames(frames, W, H)
    assert frames[0].pts < 1.0  # stream time starts at 0
    assert cap.stats["sessions"] == 1 and not events
    assert time.monotonic() - t < 20


def test_rtmp_listen(publisher):
    """An encoder (OBS, ffmpeg) pushes RTMP straight to us."""
    port = servers.free_port()
    events = []
    ring = RingBuffer(8)
    with CaptureThread(f"rtmp://127.0.0.1:{port}/live/secretkey?listen=1", ring, on_event=events.append) as cap:
        servers.wait_until(lambda: servers.is_listening(port), 10, "our RTMP listener")
        publisher(f"rtmp://127.0.0.1:{port}/live/secretkey", size=f"{W}x{H}")
        assert cap.wait_ready(20)
        f = ring.wait_newer(ring.latest().index, timeout=5)
        assert f is not None and f.image.shape == (H, W, 3)
    assert not cap.alive
    assert "secretkey" not in cap.source.display


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_pull(rtsp_server, transport):
    srv = rtsp_server(size=f"{W}x{H}", fps=30)
    frames, cap, _ = grab(srv.url, n=20, transport=transport)
    check_frames(frames, W, H)
    assert cap.source.options["rtsp_transport"] == transport


def test_rtsp_listen(publisher):
    port = servers.free_port()
    ring = RingBuffer(8)
    with CaptureThread(f"rtsp://127.0.0.1:{port}/live?listen=1", ring) as cap:
        servers.wait_until(lambda: servers.is_listening(port), 10, "our RTSP listener")
        publisher(f"rtsp://127.0.0.1:{port}/live", size=f"{W}x{H}")
        assert cap.wait_ready(20)
        assert ring.wait_newer(ring.latest().index, timeout=5).image.shape == (H, W, 3)
    assert not cap.alive


def test_srt_through_relay(publisher):
    """PyAV's wheel lacks libsrt: the system ffmpeg relays, transparently; it is reaped on stop."""
    port = servers.free_port("udp")
    before = servers.child_pids()
    ring = RingBuffer(8)
    with CaptureThread(f"srt://127.0.0.1:{port}?mode=listener&passphrase=0123456789abc", ring) as cap:
        assert cap.source.relay
        servers.wait_until(lambda: servers.is_listening(port, "udp"), 10, "the SRT relay's listener")
        pub = publisher(f"srt://127.0.0.1:{port}?mode=caller&passphrase=0123456789abc", size=f"{W}x{H}")
        assert cap.wait_ready(20)
        assert ring.wait_newer(ring.latest().index, timeout=5).image.shape == (H, W, 3)
        assert "0123456789abc" not in cap.source.display
    assert not cap.alive
    assert not servers.child_pids() - before - {pub.proc.pid}  # the relay ffmpeg was killed and reaped


def test_stop_while_srt_listener_waits():
    """An SRT listener waits for its caller with no timeout: stop() kills the relay at once."""
    port = servers.free_port("udp")
    before = servers.child_pids()
    cap = CaptureThread(f"srt://127.0.0.1:{port}?mode=listener", RingBuffer(2)).start()
    servers.wait_until(lambda: servers.is_listening(port, "udp"), 10, "the SRT relay's listener")
    t = time.monotonic()
    assert cap.stop(5) and time.monotonic() - t < 2
    assert cap.error is None and not servers.child_pids() - before


def test_stop_while_waiting_for_a_publisher(nginx_rtmp, stream_key):
    """Pulling a key nobody publishes: FFmpeg blocks in open; stop() still returns within its bound."""
    cap = CaptureThread(nginx_rtmp.url(stream_key), RingBuffer(2), wait_for_source=True).start()
    assert not cap.wait_ready(0.5)
    t = time.monotonic()
    assert cap.stop() and time.monotonic() - t < cap.stop_bound
    assert cap.error is None and cap.stats["frames"] == 0


def test_hls_over_http():
    with servers.HlsServer(size=f"{W}x{H}") as hls:
        frames, cap, _ = grab(hls.url, n=20)
    check_frames(frames, W, H)
    assert cap.source.kind == "hls"


def test_udp_mpegts(publisher):
    port = servers.free_port("udp")
    ring = RingBuffer(8)
    with CaptureThread(f"udp://127.0.0.1:{port}", ring) as cap:
        # FFmpeg binds the port while opening: send once it is bound
        servers.wait_until(lambda: servers.is_listening(port, "udp"), 10, "our UDP socket")
        publisher(f"udp://127.0.0.1:{port}?pkt_size=1316", size=f"{W}x{H}")
        assert cap.wait_ready(20)
        assert ring.wait_newer(ring.latest().index, timeout=5).image.shape == (H, W, 3)


def _read_all(spec: str, **kw):
    ring = RingBuffer(4)
    ended = threading.Event()
    events = []
    cap = CaptureThread(spec, ring, on_event=lambda e: (events.append(e), ended.set()), **kw)
    t = time.monotonic()
    cap.start()
    assert ended.wait(30)
    took = time.monotonic() - t
    assert cap.stop(5)
    return cap, events, took


def test_file_paced_and_fast(media_dir):
    path = servers.make_video(media_dir / "three_s.mp4", size=f"{W}x{H}", fps=30, seconds=3)
    cap, events, took = _read_all(str(path))  # paced at real time by default
    assert [e.kind for e in events] == ["source_ended"]
    assert cap.stats["frames"] == 90 and 2.8 < took < 6, took
    assert abs(cap.stream_time - 89 / 30) < 1e-6
    cap, events, took = _read_all(f"file:{path}")
    assert took > 2.8
    cap = CaptureThread(resolve(str(path), pace=False), RingBuffer(4))  # as fast as possible
    t = time.monotonic()
    cap.start()
    assert cap.done.wait(30)
    assert cap.stats["frames"] == 90 and time.monotonic() - t < 2.5


def test_lavfi_paced():
    ring = RingBuffer(4)
    with CaptureThread(f"lavfi:testsrc2=size={W}x{H}:rate=30", ring) as cap:
        assert cap.wait_ready(10)
        t0 = time.monotonic()
        first = ring.latest()
        while time.monotonic() - t0 < 1.5:
            ring.wait_newer(ring.latest().index, timeout=1)
        last = ring.latest()
    # paced at real time: 1.5 s of wall clock is 1.5 s of stream time (+- scheduling)
    assert abs((last.pts - first.pts) - (last.arrival - first.arrival)) < 0.15
    assert last.image.shape == (H, W, 3)
