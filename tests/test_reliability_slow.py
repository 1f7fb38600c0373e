"""The consumer forced slower than real time for 60 s, then fast again: lag bounded, drops counted,
recovery afterwards. The real pipeline (capture thread, sampler, clip queue, engine thread,
dispatcher) with a scripted engine (tests/test_run_pipeline.py's FakeSession) whose turns take
2.5 s (2.5x slower than real time) during the first SLOW_S seconds, then 20 ms.

The capture-level version (a consumer taking 3 s per clip) is test_capture_live.py::
test_slow_consumer_skips_to_live; this is the same through ``Pipeline``.
"""

from __future__ import annotations

import time

import pytest

from pipeline import config
from pipeline.app import Pipeline
from scripted import FakeSession, Recorder, ScriptedEngine

SLOW_S = 60.0
SLOW_TURN_S = 2.5
AFTER_S = 12.0


@pytest.mark.slow
@pytest.mark.timeout(SLOW_S + AFTER_S + 60)
def test_engine_slower_than_real_time_for_60s_then_recovers():
    t = {}

    def behave(turn):
        time.sleep(SLOW_TURN_S if time.monotonic() < t["slow_until"] else 0.02)

    cfg = config.validate({"capture": {"source": "lavfi:testsrc2=size=160x120:rate=10"}, "server": {"enabled": False},
                           "shutdown": {"turn_timeout_s": 5.0, "sinks_timeout_s": 5.0}}, "test")
    rec = Recorder()
    arrivals: list[tuple[float, float]] = []  # (caption stop in stream time, wall clock it reached the sink)
    on_caption = rec.on_caption

    def timed(c):
        arrivals.append((c.stop, time.monotonic()))
        on_caption(c)

    rec.on_caption = timed
    p = Pipeline(cfg, sinks=[rec], session_factory=lambda m, c, e: FakeSession(m, c, behave),
                 engine=ScriptedEngine().start())
    t["slow_until"] = time.monotonic() + 1e9
    p.start()
    try:
        rec.wait(lambda r: len(r.captions) >= 1, 30)  # the opener (fast: slow_until is far off... until now)
        t0 = p.capture.first_arrival  # monotonic time of stream time 0 (lavfi is paced: stream time = wall)
        t["slow_until"] = time.monotonic() + SLOW_S
        slow_start = time.monotonic()
        time.sleep(SLOW_S)
        mid = p.snapshot()
        time.sleep(AFTER_S)
        end = p.snapshot()
    finally:
        final = p.stop()
    assert not p.error and final["recorder"]["state"] == "stopped", (p.error, final)

    def lag(stop, at):  # how far behind live a caption is when it reaches the sink
        return (at - t0) - stop

    slow = [lag(s, a) for s, a in arrivals if slow_start + 2 * SLOW_TURN_S < a <= slow_start + SLOW_S]
    after = [lag(s, a) for s, a in arrivals if a > slow_start + SLOW_S + 4]
    first_half, second_half = slow[: len(slow) // 2], slow[len(slow) // 2:]
    dropped_slow, dropped_end = mid["queue"]["dropped"], end["queue"]["dropped"]
    print(f"\nslow phase: {len(slow)} turns, lag {min(slow):.1f}-{max(slow):.1f} s (first half max "
          f"{max(first_half):.1f}, second half max {max(second_half):.1f}), {dropped_slow} clips dropped; "
          f"after: {len(after)} turns, lag max {max(after):.2f} s, {dropped_end - dropped_slow} more dropped")
    # bounded: one slow turn + the clip queue (2 clips = 2 s of stream) + a turn's frames, and not growing
    assert max(slow) < SLOW_TURN_S + 2 + 2 + 1.5, slow
    assert max(second_half) <= max(first_half) + 1.0
    # drops counted: ~60 clips arrived for ~24 turns
    assert dropped_slow >= SLOW_S / SLOW_TURN_S * 0.8
    assert len(slow) <= SLOW_S / SLOW_TURN_S + 1
    # recovery: back to live (one clip per second, a turn's own second of frames + sampler lookahead)
    assert after and max(after) < 2.0, after
    assert dropped_end - dropped_slow <= 2
    assert len(after) >= (AFTER_S - 4) * 0.8
