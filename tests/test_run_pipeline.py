"""The pipeline as a stream of the engine core, with a scripted engine (no model): ordering of commands and turns,
shutdown bounds, context-full recovery, an engine that keeps failing. Real capture (lavfi, small)."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline import config
from pipeline.app import Pipeline
from pipeline.engine import ContextFullError
from scripted import FakeSession, Recorder, ScriptedEngine

pytestmark = pytest.mark.timeout(90)

SOURCE = "lavfi:testsrc2=size=160x120:rate=10"


def make(behave=None, **shutdown):
    cfg = config.validate({"capture": {"source": SOURCE}, "server": {"enabled": False},
                           "shutdown": {"turn_timeout_s": 1.0, "sinks_timeout_s": 5.0, **shutdown}}, "test")
    rec = Recorder()
    holder = {}

    def factory(model, ecfg, engine):
        holder["s"] = FakeSession(model, ecfg, behave)
        return holder["s"]

    p = Pipeline(cfg, sinks=[rec], session_factory=factory, engine=ScriptedEngine().start())
    return p, rec, holder


def test_one_engine_thread_runs_turns_and_commands_in_order():
    p, rec, h = make()
    p.start()
    try:
        rec.wait(lambda r: len(r.captions) >= 2)
        res = p.set_query("new instruction").result(10)
        ans = p.ask("what now?").result(10)
        rec.wait(lambda r: any(c.kind == "caption" and c.turn > ans.turn for c in r.captions))
    finally:
        p.stop()
    s = h["s"]
    assert s.threads == {"livecc-engine"}  # the model is only ever touched by the engine thread
    assert s.prompts[res["turn"]] == "new instruction"
    assert all(s.prompts[t] != "new instruction" for t in s.prompts if t < res["turn"])
    assert ans.kind == "answer" and ans.text == "answer to what now?"
    assert any(c.kind == "answer" for c in rec.captions) and rec.stopped


def test_a_stuck_turn_is_abandoned_within_the_bound_and_sinks_still_close():
    release, stuck = threading.Event(), threading.Event()

    def behave(turn):
        if turn == 2:
            stuck.set()
            release.wait(60)  # a turn that never ends by itself

    p, rec, _ = make(behave)
    p.start()
    try:
        assert stuck.wait(30)
        t0 = time.monotonic()
        p.stop()
        took = time.monotonic() - t0
    finally:
        release.set()
    assert took < 1.0 + 5.0  # turn bound + capture stop, far below the stuck turn
    assert rec.stopped and p.state == "stopped"


def test_context_full_starts_a_fresh_context():
    def behave(turn):
        if turn == 3 and not getattr(behave, "done", False):
            behave.done = True
            raise ContextFullError("full")

    p, rec, h = make(behave)
    p.start()
    try:
        rec.wait(lambda r: len(r.captions) >= 4)
    finally:
        p.stop()
    assert h["s"].resets == 1
    assert any(e.kind == "context_reset" for e in rec.events)
    assert p.error is None


def test_an_engine_that_keeps_failing_ends_the_run_with_an_error():
    def behave(turn):
        raise RuntimeError("CUDA error: an illegal memory access")

    p, rec, _ = make(behave)
    p.start()
    try:
        assert p.wait(30)
    finally:
        p.stop()
    assert p.exit_code == 1 and "3 turns in a row" in p.error
    assert p.metrics.turn_errors._value.get() == 3


def test_the_end_of_the_source_comes_after_its_last_caption():
    """A file that ends while clips still wait for the engine: source_ended reaches the sinks after the last
    caption (it was printed before it)."""
    cfg = config.validate({"capture": {"source": "lavfi:testsrc2=size=160x120:rate=10:duration=6"},
                           "sampler": {"queue_size": 16}, "server": {"enabled": False},
                           "shutdown": {"turn_timeout_s": 1.0, "sinks_timeout_s": 5.0}}, "test")
    rec = Recorder()
    order: list[str] = []
    rec.on_caption = lambda c, f=rec.on_caption: (order.append("caption"), f(c))
    rec.on_event = lambda e, f=rec.on_event: (order.append(e.kind), f(e))
    p = Pipeline(cfg, sinks=[rec], engine=ScriptedEngine().start(),
                 session_factory=lambda m, c, e: FakeSession(m, c, lambda turn: time.sleep(0.4)))
    p.start()
    try:
        assert p.wait(60)
    finally:
        p.stop()
    assert "source_ended" in order and order.count("caption") >= 3
    assert order.index("source_ended") > max(i for i, k in enumerate(order) if k == "caption")
