"""Burn-in captions under encoder lag (regression test for 73285a9): a caption appears and expires on
the frames its timing gives (tick n is due at t0 + n / fps), however late the encoder thread
processes those ticks (a loaded machine). Before the fix the sink used the time a tick was processed:
a late activation tick kept a caption on too long, a late expiry tick ended it early (a CI run's 608
cue ended 2 frames early).

The lag is injected deterministically: the sink module sees a virtual monotonic clock that moves only
when the encoder waits for its next tick (``_stop.wait``) or when the test stalls it before a chosen
tick; frames are encoded as fast as the machine goes, so the output does not depend on the load.
The sink, its encoder thread and the MP4 it writes are the real ones; the file is decoded with PyAV.
"""

from __future__ import annotations

import threading
import types

import av
import numpy as np
import pytest

import plugins.sinks.burnin.sink as sink_mod
from pipeline.plugins import make_sink
from pipeline.types import Caption, Frame
from test_sink_burnin import H, W, caption_region_diff

FPS = 30
TTL_S = 7.5 / FPS  # mid-frame: a caption is on exactly 8 frames (no rounding at a frame boundary)
SHOWN = 8
STALL_S = 0.2  # 6 frame periods
# caption A arrives while the encoder is stalled (its activation tick is processed 0.2 s late); these
# ticks are in the first open's wait for audio (hold_for_audio). Caption B shows on time and the
# encoder stalls 0.2 s before its 4th frame (its expiry is checked late); these ticks are written
# straight away (write_tick).
A_TICK, B_TICK = 3, 25
STALL_BEFORE = {A_TICK, B_TICK + 3}
LAST_TICK = 45


class Clock:
    """Virtual monotonic seconds; only the encoder thread moves it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def monotonic(self) -> float:
        return self.t


class LaggingWait(threading.Event):
    """The sink's stop event. The encoder waits on it until its next tick is due: here that wait moves
    the virtual clock to the tick's due time instead of sleeping, or STALL_S past it for the ticks in
    STALL_BEFORE (the thread woke up late, as on a loaded machine; the ticks after it are then
    processed back to back, late too, until the clock is caught up). Captions are posted while the
    encoder waits for their tick; after LAST_TICK the encoder is stopped."""

    def __init__(self, clock: Clock, sink, stall_before=STALL_BEFORE) -> None:
        super().__init__()
        self.clock, self.sink, self.stall_before = clock, sink, stall_before
        self.woke: dict[int, float] = {}  # tick waited for -> virtual time the encoder woke up
        self.done = threading.Event()

    def wait(self, timeout=None) -> bool:
        if self.is_set() or not timeout:
            return self.is_set()
        self.clock.t += timeout
        if self.sink.t0 is None:
            return False
        n = round((self.clock.t - self.sink.t0) * FPS)  # the tick it waited for
        if n > LAST_TICK:
            self.set()
            self.done.set()
            return True
        if n in self.stall_before and n not in self.woke:
            self.clock.t += STALL_S
        if n == A_TICK:  # arrives during the stall
            self.sink.on_caption(Caption(0.0, 1.0, "Caption A arrives during a stall"))
        if n == B_TICK:
            self.sink.on_caption(Caption(1.0, 2.0, "Caption B expires after a stall"))
        self.woke.setdefault(n, self.clock.t)
        return False


def run_sink(path, ttl_s: float, stall_before, clock: Clock) -> tuple:
    """A burn-in sink to an MP4 on the virtual ``clock`` (the sink module's ``time``), lagging before the ticks in
    ``stall_before``, until LAST_TICK: (sink, path, tick -> virtual time the encoder woke for it)."""
    # audio on (no audio comes): the first open waits audio_wait_s, the ticks of the wait are held
    sink = make_sink(f"burnin:{path}", fps=FPS, ttl_s=ttl_s, preset="ultrafast", audio_wait_s=0.5)
    sink._stop = stop = LaggingWait(clock, sink, stall_before)
    sink.on_frame(Frame(np.full((H, W, 3), 128, np.uint8), 0.0))  # grey picture, repeated
    sink.start()
    try:
        assert stop.done.wait(30), f"encoder did not reach tick {LAST_TICK}: {sink.counters}"
    finally:
        sink.stop()
    assert sink.error is None
    return sink, path, stop.woke


def captioned_ticks(path) -> list[int]:
    """The ticks (frame n = tick n) whose frame in the MP4 carries a caption."""
    with av.open(str(path)) as c:
        frames = [(f.time, caption_region_diff(f.to_ndarray(format="rgb24"))) for f in c.decode(video=0)]
    t_first = frames[0][0]
    ticks = [round((t - t_first) * FPS) for t, _ in frames]
    assert ticks == list(range(LAST_TICK + 1))  # one frame a tick, frame n = tick n
    assert all(d > 8 or d < 3 for _, d in frames), [round(d, 1) for _, d in frames]  # captioned or plain
    return [n for n, (_, d) in zip(ticks, frames) if d > 8]


@pytest.fixture
def lagging_sink(tmp_path, monkeypatch):
    """A burn-in sink to an MP4 on the virtual clock, lagging before the ticks in STALL_BEFORE."""
    clock = Clock()
    monkeypatch.setattr(sink_mod, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    return run_sink(tmp_path / "lag.mp4", TTL_S, STALL_BEFORE, clock)


def test_late_ticks_do_not_move_captions(lagging_sink):
    """Each caption is on the 8 frames from the tick it arrived at. On the processing-time clock
    (before 73285a9) A stayed on frames 3-16 (its activation was seen 0.2 s late) and B ended after
    frames 25-27 (its 4th tick was processed 0.2 s late)."""
    sink, path, woke = lagging_sink
    due = lambda n: sink.t0 + n / FPS  # noqa: E731
    # the lag happened: the encoder woke up STALL_S late for these ticks and processed the next
    # ones back to back (no wait: already due), late as well
    for n in STALL_BEFORE:
        assert woke[n] - due(n) == pytest.approx(STALL_S), (n, woke[n] - due(n))
        assert not any(n + k in woke for k in range(1, 6)), sorted(woke)
    # caption A's ticks are in the first open's wait for audio (hold_for_audio), B's are written at once
    assert A_TICK + SHOWN < sink.counters["ticks_waiting_audio"] <= B_TICK
    assert sink.counters["ticks_skipped"] == 0 and sink.counters["frames_out"] == LAST_TICK + 1
    captioned = captioned_ticks(path)
    expected = list(range(A_TICK, A_TICK + SHOWN)) + list(range(B_TICK, B_TICK + SHOWN))
    assert captioned == expected, f"captioned frames {captioned}, expected {expected} ({SHOWN} frames each)"


@pytest.mark.parametrize("start", [1000.0, 86_400.0 + 1 / 3])
def test_a_ttl_of_whole_frames_shows_that_many_frames(tmp_path, monkeypatch, start):
    """ttl_s = 8 frame periods exactly (as the default 5 s is 150 frames at 30 fps): each caption is on exactly 8
    frames. Expiry compares two due times t0 + n / fps whose difference rounds either side of ttl_s in floating
    point (at a monotonic clock of 1000 s it came out 1.5e-14 s short every time), so without a tolerance the
    caption stayed a 9th frame."""
    clock = Clock(start)
    monkeypatch.setattr(sink_mod, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    sink, path, _ = run_sink(tmp_path / "ttl.mp4", SHOWN / FPS, set(), clock)
    expected = list(range(A_TICK, A_TICK + SHOWN)) + list(range(B_TICK, B_TICK + SHOWN))
    assert captioned_ticks(path) == expected
