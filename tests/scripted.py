"""A scripted engine for pipeline tests (no model): a session whose turns follow a script, served by an
``EngineCore`` whose prefill/decode are replaced by the script. The scheduler (ports, due order, one turn
in flight per stream, the engine thread) is the real one."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from pipeline.engine.core import EngineCore, TurnRequest, TurnResult, TurnStats
from pipeline.fanout.sink import Sink
from pipeline.types import Caption


class ScriptedCore(EngineCore):
    def __init__(self):  # no model runner: turns are served by the session's script (its thread runs on the CPU)
        self._init_scheduler()
        self.runner = SimpleNamespace(device=torch.device("cpu"))
        self.slots_open = 0

    @property
    def free_slots(self) -> int:
        return 1

    def _prefill(self, reqs: list[TurnRequest]) -> None:
        for req in reqs:
            self._done(req, TurnResult([], TurnStats()))


class ScriptedEngine:
    """The EngineWorker surface a Pipeline uses."""

    def __init__(self):
        self.core = ScriptedCore()
        self.model = None

    def start(self):
        if not self.core.alive:
            self.core.start()
        return self

    def stop(self, timeout=None):
        return self.core.stop(timeout)


class FakeSession:
    """The StreamingSession surface the pipeline uses; ``behave(turn)`` scripts each turn (it runs on the
    engine thread while the turn is built: it may raise, e.g. ContextFullError, or block)."""

    def __init__(self, model, cfg, behave=None):
        self.cfg = cfg
        self.query = cfg.query
        self.sent_query = None
        self.turns = self.total_turns = 0
        self.context_length = 0
        self.rollovers = 0
        self.last_stats = TurnStats()
        self.behave = behave or (lambda turn: None)
        self.threads = set()
        self.resets = 0
        self.prompts: dict[int, str | None] = {}

    def set_query(self, q):
        self.query = q

    def reset(self):
        self.resets += 1
        self.turns = 0
        self.context_length = 0
        self.sent_query = None

    def video_request(self, clip):
        self.threads.add(threading.current_thread().name)
        self.behave(self.total_turns + 1)
        req = TurnRequest(0, [], None, 0, 1, due=clip.ready_at)
        req.kind, req.start, req.stop = "caption", clip.start, clip.stop
        req.query = self.query if self.query != self.sent_query else None
        return req

    def question_request(self, question, at=0.0):
        self.threads.add(threading.current_thread().name)
        req = TurnRequest(0, [], None, 0, 1)
        req.kind, req.start, req.stop, req.query = "answer", at, at, question
        return req

    def finish(self, req, result):
        self.threads.add(threading.current_thread().name)
        self.turns += 1
        self.total_turns += 1
        self.context_length += 100
        if req.kind == "answer":
            self.sent_query = None
            return Caption(req.start, req.stop, f"answer to {req.query}", kind="answer", query=req.query,
                           turn=self.total_turns)
        self.prompts[self.total_turns] = req.query
        self.sent_query = self.query
        return Caption(req.start, req.stop, f"turn {self.total_turns}", turn=self.total_turns, latency_s=0.01)

    def close(self):
        pass


class Recorder(Sink):
    name = "recorder"

    def __init__(self):
        super().__init__()
        self.captions, self.events, self.stopped = [], [], False
        self.cond = threading.Condition()

    def on_caption(self, c):
        with self.cond:
            self.captions.append(c)
            self.cond.notify_all()

    def on_event(self, e):
        with self.cond:
            self.events.append(e)
            self.cond.notify_all()

    def stop(self):
        self.stopped = True

    def wait(self, pred, timeout=30):
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self), timeout)
