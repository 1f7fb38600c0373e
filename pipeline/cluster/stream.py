"""A stream's CPU side in a cluster: the ``Pipeline`` (capture, sampler, clip queue, sinks, metrics) with its
engine on a remote ``GpuWorker``.

``RemoteEngine`` stands where ``Pipeline`` expects an ``EngineWorker``: its ``core`` is one thread that takes
this stream's turns (``due``/``next_request``, as the engine core does) and sends each to the worker
(``worker.turn.remote``: the clip's frames travel through Ray's object store); its sessions are
``RemoteSession``s that build no tensors, only name the clip or question. When the worker dies, the turn in
flight waits until ``move`` names another worker, which opens a fresh context on the stream's recent
commentary; the turn is then served there (opening on the last 3 s of frames), so nothing is lost but time.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time

import numpy as np

from ..engine.context import History
from ..engine.core import TurnStats
from ..types import Caption, Clip, StreamEvent

log = logging.getLogger("livecc.cluster")

OPENER_FRAMES = 6  # frames a moved stream's first turn opens with (the sampler's opener, 3 s at 2 fps)


@dataclasses.dataclass
class _Req:
    kind: str  # "clip" | "ask"
    clip: Clip | None = None
    question: str = ""
    start: float = 0.0
    stop: float = 0.0
    due: float = 0.0
    on_done: object = None


class RemoteSession:
    """The ``StreamingSession`` attributes ``Pipeline`` reads, mirrored from the worker after each turn."""

    def __init__(self, engine: "RemoteEngine", cfg):
        self.engine = engine
        self.query = cfg.query
        self.sent_query: str | None = None
        self.context_length = 0
        self.rollovers = 0
        self.total_turns = 0
        self.last_stats = TurnStats()
        self.history = History(cfg.history_chars)
        self._remote_rollovers = 0

    def video_request(self, clip: Clip) -> _Req:
        return _Req("clip", clip=clip, start=clip.start, stop=clip.stop, due=clip.ready_at)

    def question_request(self, question: str, at: float = 0.0) -> _Req:
        return _Req("ask", question=question, start=at, stop=at, due=time.monotonic())

    def set_query(self, query: str) -> None:
        self.query = query
        self.engine.set_query(query)

    def reset(self) -> None:  # the worker handles a full context itself
        pass

    def finish(self, req: _Req, result: tuple[Caption, dict]) -> Caption:
        cap, fig = result
        self.total_turns += 1
        if fig["rollovers"] < self._remote_rollovers:
            self._remote_rollovers = 0  # a fresh session (moved)
        self.rollovers += fig["rollovers"] - self._remote_rollovers
        self._remote_rollovers = fig["rollovers"]
        self.sent_query, self.context_length, self.last_stats = fig["sent_query"], fig["context_tokens"], fig["stats"]
        if req.kind == "clip":
            self.history.add(cap.text)
            cap = dataclasses.replace(cap, latency_s=time.monotonic() - req.due)
        return dataclasses.replace(cap, turn=self.total_turns)

    def close(self) -> None:
        self.engine.close()


class RemoteCore:
    """The engine-core face ``Pipeline`` attaches to: a thread serving this stream's turns on the worker."""

    def __init__(self, engine: "RemoteEngine"):
        self.engine = engine
        self.port = None
        self.busy_since: float | None = None
        self._cond = threading.Condition()
        self._woken = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="livecc-remote-core", daemon=True)

    def attach(self, port) -> None:
        with self._cond:
            self.port = port
        self.wake()

    def detach(self, port) -> None:
        with self._cond:
            if self.port is port:
                self.port = None

    def wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._woken and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._woken = False
                port = self.port
            if port is None or port.due() is None:
                continue
            req = port.next_request()
            if req is None:
                continue
            self.busy_since = time.perf_counter()
            result = self.engine.serve(req)
            self.busy_since = None
            req.on_done(req, result)
            self.wake()  # look again: more clips may be waiting


class RemoteEngine:
    """What ``Pipeline`` needs of an ``EngineWorker`` (``core``, ``open_session``, ``model``), for stream ``sid``
    served by the Ray actor ``worker`` (named ``worker_name``)."""

    model = None  # no weights here

    def __init__(self, sid: str, cfg, worker, worker_name: str, on_event):
        self.sid = sid
        self.cfg = cfg
        self.worker, self.worker_name = worker, worker_name
        self.core = RemoteCore(self)
        self.session: RemoteSession | None = None
        self.moves = 0
        self._on_event = on_event
        self._recent: collections.deque[Clip] = collections.deque(maxlen=4)
        self._moved = threading.Condition()
        self._stopping = False

    def open_session(self, cfg) -> RemoteSession:
        import ray

        self.cfg = cfg
        self.session = RemoteSession(self, cfg)
        ray.get(self.worker.open.remote(self.sid, cfg, []))
        self.core.start()
        return self.session

    def move(self, worker, worker_name: str) -> None:
        """Continue on ``worker``: a fresh context opened on the recent commentary (RuntimeError if it is full)."""
        import dataclasses as dc

        import ray

        cfg = dc.replace(self.cfg, query=self.session.query)
        ray.get(worker.open.remote(self.sid, cfg, list(self.session.history.texts)))
        old = self.worker_name
        with self._moved:
            if worker_name != old:
                try:
                    self.worker.close.remote(self.sid)  # a drained worker gives its row back
                except Exception:  # noqa: BLE001 - a dead one has nothing to give back
                    pass
            self.worker, self.worker_name = worker, worker_name
            self.moves += 1
            self._moved.notify_all()
        log.warning("stream %s moved from %s to %s", self.sid, old, worker_name)
        self._on_event(StreamEvent("stream_moved", round(self._recent[-1].stop, 3) if self._recent else 0.0,
                                   f"{old} -> {worker_name}"))

    def set_query(self, query: str) -> None:
        try:
            self.worker.set_query.remote(self.sid, query)  # a moved stream reopens with it anyway
        except Exception as e:  # noqa: BLE001
            log.warning("stream %s: query not sent to %s: %s", self.sid, self.worker_name, e)

    def close(self) -> None:
        self.core.stop()
        with self._moved:
            self._stopping = True
            self._moved.notify_all()
        try:
            self.worker.close.remote(self.sid)
        except Exception:  # noqa: BLE001
            pass

    def serve(self, req: _Req):
        """(Caption, figures) from the worker, or the exception the turn raised there. A worker that dies (or
        that the stream leaves) mid-turn: wait for ``move`` and serve the turn on the new worker."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if req.kind == "clip":
            self._recent.append(req.clip)
        while True:
            with self._moved:
                worker, moves = self.worker, self.moves
                if self._stopping:
                    return RuntimeError("the stream is stopping")
            ref = (worker.turn.remote(self.sid, req.clip) if req.kind == "clip"
                   else worker.ask.remote(self.sid, req.question, req.start))
            while True:
                ready, _ = ray.wait([ref], timeout=0.5)
                if ready or self.moves != moves or self._stopping:
                    break
            if ready:
                try:
                    return ray.get(ref)
                except RayTaskError as e:
                    if self.moves == moves and not isinstance(e.cause, KeyError):
                        return e.cause if e.cause is not None else e
                except RayActorError:
                    pass
            with self._moved:  # the worker is gone or was left: wait for the next one
                self._moved.wait_for(lambda: self.moves != moves or self._stopping)
            if req.kind == "clip" and self.moves != moves:
                req.clip = self._opener(req.clip)

    def _opener(self, clip: Clip) -> Clip:
        """``clip`` preceded by the recent frames of its size: the fresh context opens on 3 s, as a rollover."""
        same = [c for c in self._recent if c.frames.shape[1:] == clip.frames.shape[1:]]
        frames = np.concatenate([c.frames for c in same])[-OPENER_FRAMES:]
        stamps = sum((c.timestamps for c in same), ())[-OPENER_FRAMES:]
        if len(frames) % 2:
            frames, stamps = frames[1:], stamps[1:]
        return dataclasses.replace(clip, frames=frames, timestamps=tuple(stamps))


class StreamActor:
    """One stream as a Ray actor: ``start(worker, name)``, ``move(worker, name)``, control and reporting.

    Made again by Ray when its process dies (``max_restarts``); the service then calls ``start`` again."""

    def __init__(self, sid: str, cfg, sinks: list[dict]):
        self.sid, self.cfg, self.blocks = sid, cfg, sinks
        self.pipeline = None
        self.engine: RemoteEngine | None = None
        self.incarnation = time.time()
        self.started = False
        self.server = None  # the sinks' routes (see _sink_server)
        self.sinks_token = ""

    def start(self, worker, worker_name: str) -> dict:
        from ..app import Pipeline
        from ..plugins import make_sink

        self.started = True

        sinks = []
        for block in self.blocks:
            block = dict(block)
            if block.get("kind") == "overlay" and not block.get("name"):
                block["name"] = self.sid
            sinks.append(make_sink(block))
        self.server = self._sink_server(sinks)
        self.engine = RemoteEngine(self.sid, self.cfg.engine_config(), worker, worker_name,
                                   lambda ev: self.pipeline._on_event(ev))
        self.pipeline = Pipeline(self.cfg, stream_id=self.sid, sinks=sinks, engine=self.engine, server=self.server)
        try:
            self.pipeline.start()
        except Exception:
            self._stop_server()
            raise
        return self.ping()

    def _sink_server(self, sinks):
        """The sinks' routes (the overlay page: ``/overlay/{id}...``) on a server of this actor's own, on
        loopback at a free port with a random token; the head passes requests through to it. None when no
        sink has routes."""
        import secrets

        from ..server import HttpServer

        server = HttpServer("127.0.0.1", 0, token=secrets.token_urlsafe(24), name=f"sinks-{self.sid}")
        for sink in sinks:
            sink.mount(server)
        if not server._methods:
            return None
        server.start()
        self.sinks_token = server.token.decode()
        return server

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def move(self, worker, worker_name: str) -> dict:
        if not self.started:  # restarted by Ray before the service saw it: start afresh there
            return self.start(worker, worker_name)
        self.engine.move(worker, worker_name)
        return self.ping()

    def ping(self) -> dict:
        """{started, incarnation, pid, paused, worker, ended, error, sinks: {port, token} or None}."""
        p = self.pipeline
        srv = self.server
        return {"started": self.started, "incarnation": self.incarnation, "pid": os.getpid(),
                "paused": p is not None and p.paused,
                "worker": self.engine.worker_name if self.engine else None,
                "ended": p is not None and p.wait(0), "error": p.error if p is not None else None,
                "sinks": {"port": srv.port, "token": self.sinks_token} if srv is not None else None}

    def snapshot(self) -> dict:
        snap = dict(self.pipeline.snapshot()) if self.pipeline is not None else {"stream": self.sid, "state": "new"}
        snap["worker"] = self.engine.worker_name if self.engine else None
        snap["moves"] = self.engine.moves if self.engine else 0
        snap["pid"] = os.getpid()
        return snap

    def metrics(self) -> bytes:
        return self.pipeline.metrics.render() if self.pipeline is not None else b""

    def set_query(self, query: str, timeout: float) -> dict:
        return self.pipeline.set_query(query).result(timeout)

    def ask(self, question: str, timeout: float) -> Caption:
        return self.pipeline.ask(question).result(timeout)

    def pause(self) -> bool:
        return self.pipeline.pause()

    def resume(self) -> bool:
        return self.pipeline.resume()

    def stop(self) -> dict:
        """The sinks' final status (files finalised)."""
        if self.pipeline is None:
            return {}
        out = self.pipeline.stop()
        self.engine.close()
        self._stop_server()
        return out
