"""The live path end to end against nginx-rtmp: sampling accuracy over 60 s, a slow consumer,
and a publisher killed and restarted 5 times."""

from __future__ import annotations

import os
import queue
import threading
import time

import pytest

import servers
from pipeline.capture import CaptureThread, ClipQueue, LiveSampler, RingBuffer
from pipeline.capture.sampler import LOOKAHEAD_S

W, H, FPS = 320, 240, 30


@pytest.fixture
def live_feed(nginx_rtmp, stream_key, media_dir):
    """A 30 fps H.264 feed published to nginx-rtmp by ffmpeg -re (stream copy of a looped file:
    the publisher costs next to no CPU, so timings measure us)."""
    src = media_dir / f"loop_{W}x{H}_{FPS}.mp4"
    if not src.exists():
        servers.make_video(src, size=f"{W}x{H}", fps=FPS, seconds=10)
    url = nginx_rtmp.url(stream_key)
    pub = servers.Publisher(url, input_file=str(src))
    yield url, pub
    pub.close()


@pytest.mark.timeout(150)
def test_sampler_accuracy_60s(live_feed):
    """2 frames/s within 1 % over 60 s; each chosen frame's pts within one frame interval of its tick."""
    url, pub = live_feed
    pub.start()
    ring, clips = RingBuffer(), ClipQueue(maxsize=1000)
    with CaptureThread(url, ring, wait_for_source=True) as cap, LiveSampler(ring, clips) as sampler:
        assert cap.wait_ready(20)
        t_first = None
        while True:  # wait (on the queue) until 60 s of ticks were sampled
            assert clips.get(timeout=10) is not None
            s = list(sampler.samples)
            t_first = s[0].tick
            if s[-1].tick - t_first >= 60.0:
                break
    samples = [x for x in sampler.samples if x.tick - t_first <= 60.0 + 1e-9]
    n, span = len(samples), samples[-1].tick - samples[0].tick
    rate = (n - 1) / span
    skew = [x.pts - x.grid for x in samples]
    # wall-clock regularity: each tick against its schedule (first tick + grid offset)
    jitter = [x.tick - (samples[0].tick + (x.grid - samples[0].grid)) for x in samples]
    print(f"\nsampled {n} frames over {span:.3f} s wall: {rate:.4f} frames/s; pts - grid: "
          f"min {min(skew) * 1000:.1f} ms, max {max(skew) * 1000:.1f} ms; late {sampler.stats['late']}, "
          f"repeated {sampler.stats['repeated']}, reanchored {sampler.stats['reanchored']}; "
          f"tick lateness vs schedule: max {max(jitter) * 1000:.1f} ms, min {min(jitter) * 1000:.1f} ms")
    assert abs(rate - 2.0) / 2.0 < 0.01
    assert abs(span - 60.0) < 0.6
    assert all(abs(d) < 1.0 / FPS + 1e-3 for d in skew), skew  # within one frame interval
    grids = [x.grid for x in samples]
    assert grids == [i * 0.5 for i in range(len(grids))]  # on the 2 fps grid, from stream time 0
    assert sampler.stats["repeated"] == 0 and cap.stats["lost"] == 0


@pytest.mark.timeout(90)
def test_slow_consumer_skips_to_live(live_feed):
    """A consumer 3x slower than real time: lag stays bounded, the oldest clips are dropped."""
    url, pub = live_feed
    pub.start()
    maxsize = 2
    ring, clips = RingBuffer(), ClipQueue(maxsize=maxsize)
    # bound on (stream time now - start of the clip the consumer just took):
    # the clip waited < maxsize clip intervals (1 s each) before being taken or dropped,
    # + its own 1 s span + the sampler's lookahead + scheduling margin
    bound = maxsize * 1.0 + 1.0 + LOOKAHEAD_S + 0.5
    lags = []
    with CaptureThread(url, ring, wait_for_source=True) as cap, LiveSampler(ring, clips) as sampler:
        assert cap.wait_ready(20)
        t_end = time.monotonic() + 24
        while time.monotonic() < t_end:
            clip = clips.get(timeout=10)
            assert clip is not None
            lags.append(cap.stream_time - clip.start)
            span = clip.stop - clip.start
            time.sleep(3 * span)  # the work: 3x slower than real time
        st = clips.stats()
    print(f"\nlags at pickup (s): {[round(x, 2) for x in lags]}; bound {bound:.1f}; queue {st}")
    assert max(lags[1:]) < bound  # lags[0] is the opener, taken at once
    assert st["dropped"] >= 8  # about 2 of every 3 clips are skipped
    assert st["put"] == len(lags) + st["dropped"] + st["waiting"]
    # without skipping the lag would grow by 2 s per clip taken (12 s after 6); it stays bounded


@pytest.mark.timeout(150)
def test_publisher_killed_and_restarted_5_times(live_feed):
    url, pub = live_feed
    threads_before = set(threading.enumerate())
    fds_before = servers.open_fds()
    events: queue.Queue = queue.Queue()
    ring, clips = RingBuffer(), ClipQueue(maxsize=100)
    pub.start()
    cap = CaptureThread(url, ring, on_event=events.put, wait_for_source=True).start()
    sampler = LiveSampler(ring, clips, on_event=events.put).start()
    seen = []

    def next_event(kind: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while True:
            ev = events.get(timeout=max(0.01, deadline - time.monotonic()))
            seen.append(ev)
            if ev.kind == kind:
                return ev

    try:
        assert cap.wait_ready(20)
        assert clips.get(timeout=10) is not None  # the opener
        for i in range(5):
            pub.stop()  # SIGKILL: the encoder vanishes
            lost = next_event("source_lost")
            pub.start()
            back = next_event("source_back")
            back_seen = time.monotonic()
            assert back.stream_time >= lost.stream_time
            # sampling resumes: a clip of frames from after the reconnect
            while True:
                clip = clips.get(timeout=15)
                assert clip is not None, f"no clip after restart {i + 1}: {seen} {cap.stats} {pub.log_text()[-2000:]}"
                if clip.ready_at > back_seen and clip.start > back.stream_time:
                    break
        while not events.empty():
            seen.append(events.get())
        kinds = [e.kind for e in seen]
        assert kinds.count("source_lost") == 5 and kinds.count("source_back") == 5
        # the sampler held the last frame for HOLD_S, then paused turns until the source was back
        assert kinds.count("sampling_paused") == 5 and kinds.count("sampling_resumed") == 5, [(e.kind, e.stream_time, round(e.created_at % 100, 2)) for e in seen]
        assert "source_error" not in kinds
        assert cap.stats["sessions"] == 6
        # stream time kept counting through the gaps: it follows the wall clock since the start
        assert abs(cap.stream_time - (ring.latest().arrival - cap.first_arrival)) < 2.0
    finally:
        assert sampler.stop(5)
        assert cap.stop()
        pub.stop()
    leaked = [t for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert not leaked, leaked
    assert servers.open_fds() <= fds_before, (fds_before, os.listdir("/proc/self/fd"))
