"""The GPU worker: one ``EngineWorker`` (a model, its ``EngineCore`` thread, N KV-cache rows) serving the turns
of the streams placed on it, batched together by the core.

It keeps each stream's ``StreamingSession`` (the protocol state: prompts, positions, context policy) and its
cache row; the stream's capture, sampler and sinks run elsewhere (``stream.py``) and send clips here with
``turn``. Runs as a Ray actor (``service.py`` makes one per GPU), but is a plain class: its methods are
thread-safe and block until their turn is served, so a threaded actor batches its streams' turns.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from concurrent.futures import Future

from ..engine import ContextFullError, EngineConfig
from ..engine.context import rollover_query
from ..types import Caption, Clip


@dataclasses.dataclass
class _Job:
    kind: str  # "clip" | "ask"
    arg: object  # the Clip, or (question, at)
    due: float = dataclasses.field(default_factory=time.monotonic)
    future: Future = dataclasses.field(default_factory=Future)


class _Stream:
    """One stream's side of the core (a ``StreamPort``): its session and the turns waiting for the core."""

    def __init__(self, session, query: str, resume: str):
        self.session = session
        self.query = query
        self.resume = resume  # recent commentary the first turn opens with (a moved stream), else ""
        self.jobs: collections.deque[_Job] = collections.deque()
        self.lock = threading.Lock()
        self.inflight = False
        self.closed = False

    def due(self) -> float | None:
        with self.lock:
            return None if self.closed or not self.jobs else self.jobs[0].due

    def next_request(self):
        with self.lock:
            if self.closed or not self.jobs:
                return None
            job = self.jobs.popleft()
            self.inflight = True
        try:
            req = self._build(job)
        except Exception as e:  # noqa: BLE001 - fails that turn only
            self._finished(job, e)
            return None
        req.on_done = lambda r, res: self._finished(job, res, r)
        return req

    def _build(self, job: _Job):
        s = self.session
        if job.kind == "ask":
            return s.question_request(*job.arg)
        if self.resume and s.total_turns == 0:  # as a rollover: the query carries the recent commentary
            s.set_query(rollover_query(self.query, self.resume))
            try:
                return s.video_request(job.arg)
            finally:
                s.set_query(self.query)
                self.resume = ""
        try:
            return s.video_request(job.arg)
        except ContextFullError:
            s.reset()
            return s.video_request(job.arg)

    def _finished(self, job: _Job, res, req=None) -> None:
        try:
            if isinstance(res, BaseException):
                job.future.set_exception(res)
            else:
                job.future.set_result(self.session.finish(req, res))
        except Exception as e:  # noqa: BLE001
            job.future.set_exception(e)
        finally:
            with self.lock:
                self.inflight = False
                close = self.closed
            if close:
                self.session.close()

    def summary(self) -> dict:
        s = self.session
        return {"query": s.query, "sent_query": s.sent_query, "context_tokens": s.context_length,
                "rollovers": s.rollovers, "stats": s.last_stats}


class GpuWorker:
    """``open`` a stream (a cache row), ``turn``/``ask`` it (block until served), ``close`` it; ``ping`` for
    health and metrics. ``cfg``: the engine's shared settings (model, device, ``max_streams``)."""

    def __init__(self, cfg: EngineConfig, name: str, slots: int | None = None):
        from ..engine_worker import EngineWorker

        self.name = name
        self.engine = EngineWorker(cfg, slots=slots or cfg.max_streams or None).start()
        self.streams: dict[str, _Stream] = {}
        self.turns = 0
        self._lock = threading.Lock()

    def open(self, sid: str, cfg: EngineConfig, history: list[str] = ()) -> dict:
        """A session on a free row for stream ``sid`` (replacing one it had here). ``history``: the stream's
        recent captions; when given, its first turn opens a fresh context on them as a rollover does.
        RuntimeError when the engine is full."""
        self.close(sid)
        session = self.engine.open_session(cfg)
        for text in history:
            session.history.add(text)
        st = _Stream(session, session.query, session.history.text())
        with self._lock:
            self.streams[sid] = st
        self.engine.core.attach(st)
        return self.ping()

    def close(self, sid: str) -> None:
        with self._lock:
            st = self.streams.pop(sid, None)
        if st is None:
            return
        self.engine.core.detach(st)
        with st.lock:
            st.closed = True
            pending, st.jobs = list(st.jobs), collections.deque()
            busy = st.inflight
        for job in pending:
            job.future.set_exception(RuntimeError(f"stream {sid} left worker {self.name}"))
        if not busy:
            st.session.close()

    def _submit(self, sid: str, job: _Job):
        st = self.streams.get(sid)
        if st is None:
            raise KeyError(f"stream {sid!r} is not open on worker {self.name}")
        with st.lock:
            st.jobs.append(job)
        self.engine.core.wake()
        cap = job.future.result()
        self.turns += 1
        return cap, st.summary()

    def turn(self, sid: str, clip: Clip) -> tuple[Caption, dict]:
        """Caption ``clip`` (T x H x W x 3 uint8, from the stream's sampler) in stream ``sid``'s context;
        returns (the caption, the session's figures: query, sent_query, context_tokens, rollovers, stats)."""
        return self._submit(sid, _Job("clip", dataclasses.replace(clip, ready_at=time.monotonic())))

    def ask(self, sid: str, question: str, at: float) -> tuple[Caption, dict]:
        return self._submit(sid, _Job("ask", (question, at)))

    def set_query(self, sid: str, query: str) -> None:
        st = self.streams[sid]
        st.session.set_query(query)
        st.query = query

    def ping(self) -> dict:
        """{name, pid, slots, free, streams, turns, alive}."""
        e = self.engine
        return {"name": self.name, "pid": os.getpid(), "slots": e.slots, "free": e.free_slots,
                "streams": sorted(self.streams), "turns": self.turns, "alive": e.core.alive}

    def stop(self) -> None:
        self.engine.stop(5.0)
