"""One live stream: capture thread -> ring buffer -> sampler -> clip queue -> engine core -> sinks.

Threads and who owns what:

- the capture thread (``CaptureThread``) decodes the source into the ring buffer; every frame is
  also handed to the dispatcher for sinks that want frames (burn-in), latest-wins; when a sink
  wants audio (burn-in passthrough) and the input has it, decoded audio goes to the dispatcher too,
  in order through a bounded queue;
- the sampler thread (``LiveSampler``) takes 2 frames per second of stream time into clips and puts
  them into a bounded clip queue that drops the oldest clip when the engine falls behind;
- the engine thread (``EngineCore``, shared by every stream of the process: ``engine_worker.py``) is the
  only thread that touches the model (the GPU). It pulls this stream's turns through the ``StreamPort``
  methods here (``due``/``next_request``), oldest due first across streams, batches their decoding with
  other streams', and hands each result back (``_on_result``), which publishes the caption. Commands from
  the control API (query change, question) run on that thread between this stream's turns;
- the dispatcher gives every sink its own worker thread and bounded queue, so no sink can stall
  the engine;
- the HTTP server (``pipeline/server.py``: control API, /metrics, and the routes sinks mount, such as
  the overlay's page) runs its own event loop thread.

Shutdown (``stop``): stop capture and sampler, let the turn in progress finish within
``shutdown.turn_timeout_s`` (else abandon it), then flush and close every sink within
``shutdown.sinks_timeout_s`` (MP4 finalised, subtitles complete), then stop the HTTP server.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Any

from .capture import Backoff, CaptureThread, ClipQueue, LiveSampler, RingBuffer, Source, SourceOptions, resolve
from .config import RunConfig
from .errors import PipelineError
from .metrics import RATE_WINDOW_S, Metrics
from .redact import redact
from .snapshot import Snapshot
from .types import Caption, Frame, StreamEvent

log = logging.getLogger("livecc.app")

MAX_CONSECUTIVE_ERRORS = 3  # engine turns failing in a row before the pipeline gives up
RECENT_CAPTIONS = 20  # kept for /api/status



class _TeeRing(RingBuffer):
    """The ring buffer the capture thread writes; each frame is also passed to ``on_frame``."""

    def __init__(self, size: int, on_frame):
        super().__init__(size)
        self._on_frame = on_frame

    def put(self, frame: Frame) -> None:
        super().put(frame)
        self._on_frame(frame)


class _Inbox(ClipQueue):
    """The clip queue, waking the engine core on every put and on close."""

    def __init__(self, maxsize: int, wake):
        super().__init__(maxsize)
        self._wake = wake

    def put(self, clip) -> None:
        super().put(clip)
        self._wake()

    def close(self) -> None:
        super().close()
        self._wake()


@dataclasses.dataclass
class Command:
    kind: str  # "query" | "ask"
    arg: Any
    future: Future
    received: float = dataclasses.field(default_factory=time.monotonic)


def resolve_source(spec: str, cap: Any) -> Source:
    """The Source for ``spec`` with the ``capture:`` section ``cap``'s options (nothing is opened).

    Raises PipelineError for an unknown or broken source kind, or a file source that does not exist."""
    from .capture import CaptureError

    opts = SourceOptions(pace=cap.pace, listen=cap.listen, transport=cap.transport, low_latency=cap.low_latency,
                         relay=cap.relay, video_size=cap.video_size, framerate=cap.framerate,
                         pixel_format=cap.pixel_format, decoder_threads=cap.decoder_threads,
                         thread_type=cap.thread_type, open_timeout=cap.open_timeout,
                         read_timeout=cap.read_timeout, live=cap.live, options=dict(cap.options))
    try:
        source = resolve(spec, opts)
    except CaptureError as e:
        raise PipelineError(str(e)) from None
    if source.kind == "file" and not os.path.isfile(source.url):
        raise PipelineError(f"{source.display}: no such file")
    return source


class Pipeline:
    """One live stream captioned end to end. ``start()``, then ``wait()``, then ``stop()``.

    ``engine``: an ``EngineWorker`` shared with other streams (``livecc serve``); None makes one of its own
    with one cache row (``livecc run``), loading ``model`` unless given. ``stream_id`` names the stream in
    logs, metrics and routes."""

    def __init__(self, cfg: RunConfig, source: str | None = None, *, model=None, metrics: Metrics | None = None,
                 sinks: list | None = None, session_factory=None, engine=None, stream_id: str = "main",
                 server=None):
        self.cfg = cfg
        self.stream_id = stream_id
        self.source_spec = source or cfg.capture.source
        if not self.source_spec:
            raise PipelineError("no source: give SOURCE on the command line or capture.source in the config")
        self.engine_cfg = cfg.engine_config()
        self.metrics = metrics or Metrics()
        self.model = model
        self.engine = engine
        self._own_engine = engine is None
        self._sinks = sinks
        self._session_factory = session_factory  # (model, EngineConfig, core) -> session; default StreamingSession
        self.state = "new"
        self.started_at = time.time()
        self._t_start = time.monotonic()
        self.error: str | None = None
        self.session = None
        self.source = None
        self.capture: CaptureThread | None = None
        self.sampler: LiveSampler | None = None
        self.queue: _Inbox | None = None
        self.dispatcher = None
        self.server = server
        self._own_server = server is None
        self.control = None
        self.recent: collections.deque[Caption] = collections.deque(maxlen=RECENT_CAPTIONS)
        self._lock = threading.Lock()
        self._commands: collections.deque[Command] = collections.deque()
        self._query_waiters: list[Future] = []
        self._paused = False
        self._stopping = False
        self._attached = False
        self._inflight: Command | None | bool = False  # False: no turn in flight; else its command (or None)
        self._idle = threading.Condition(self._lock)  # notified when the turn in flight ends
        self._errors_in_row = 0
        self._rollovers = 0
        self._ending: StreamEvent | None = None  # source_ended / source_error, held until the queue is drained
        self._done = threading.Event()  # the stream ended, or a stop was requested
        self.metrics.bind(self.snapshot)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        from .fanout.dispatch import Dispatcher
        from .plugins import make_sink

        cfg, cap = self.cfg, self.cfg.capture
        self.state = "starting"
        self.source = resolve_source(self.source_spec, cap)  # before a long model load
        if self._sinks is None:
            blocks = cfg.sinks or [{"kind": "console"}]
            try:
                self._sinks = [make_sink(dict(b)) for b in blocks]
            except ValueError as e:
                raise PipelineError(str(e)) from None
        if cfg.server.enabled and self._own_server:  # bound before the model loads: a port in use fails at once
            self._start_server()
        # the source opens while the model loads (an encoder may not be up yet: the capture thread waits for it,
        # see capture.wait_for_source); the ring keeps the newest frames until the sampler starts. A file
        # starts with the sampler instead (it plays paced: frames read during the load would be skipped)
        wants_audio = any(getattr(sink, "wants_audio", False) for sink in self._sinks)
        ring = _TeeRing(cap.ring_size, self._on_frame)
        self.capture = CaptureThread(
            self.source, ring, on_event=self._on_event, wait_for_source=cap.wait_for_source,
            wait_after_end=cap.wait_after_end,
            on_audio=(lambda chunk: self.dispatcher and self.dispatcher.audio(chunk)) if wants_audio else None,
            backoff=Backoff(initial=cap.reconnect_initial_s, max_delay=cap.reconnect_max_s,
                            max_attempts=cap.reconnect_max_attempts))
        if self.source.live:
            self.capture.start()
        if self.engine is None:
            from .engine_worker import EngineWorker

            self.state = "loading"
            if self.model is None:
                log.info("loading %s", self.engine_cfg.model)
            if self._session_factory is None:
                self.engine = EngineWorker(self.engine_cfg, model=self.model, slots=1)
                self.model = self.engine.model
        if self._done.is_set():  # stopped (Ctrl-C) while the model loaded: start nothing more
            self.state = "stopping"
            return self
        if self._session_factory is not None:  # a scripted engine (tests)
            self.session = self._session_factory(self.model, self.engine_cfg, self.engine)
        else:
            self.model = self.engine.model
            try:
                self.session = self.engine.open_session(self.engine_cfg)
            except RuntimeError as e:
                raise PipelineError(str(e)) from None
        self.dispatcher = Dispatcher(self._sinks)
        self.dispatcher.start()
        log.info("captions to %s", ", ".join(s.describe() for s in self._sinks))
        core = self.engine.core
        self.queue = _Inbox(cfg.sampler.queue_size, core.wake)
        s = cfg.sampler
        self.sampler = LiveSampler(ring, self.queue, fps=s.fps, opener_frames=s.opener_frames,
                                   turn_frames=s.turn_frames, max_pixels=self.engine_cfg.max_pixels,
                                   lookahead=s.lookahead_s, hold_s=s.hold_s, on_event=self._on_event)
        if self._own_engine:
            self.engine.start()
        core.attach(self)
        self._attached = True
        if not self.source.live:
            self.capture.start()
        self._t_start = time.monotonic()
        self.sampler.start()
        self.state = "running"
        log.info("capturing %s", self.source.display)
        return self

    def _start_server(self) -> None:
        """The HTTP server: the control API's routes and every sink's (``Sink.mount``), then listen."""
        from .control import ControlAPI
        from .server import from_settings

        srv = self.cfg.server
        server = from_settings(srv)
        self.control = ControlAPI(self, srv)
        try:
            server.mount(self.control.routes())
            for sink in self._sinks:
                sink.mount(server)
        except ValueError as e:
            raise PipelineError(f"server: {e}") from None
        try:
            server.start()
        except OSError as e:
            raise PipelineError(f"server {srv.host}:{srv.port}: {e.strerror or e} (is another livecc running? "
                                f"choose another port: --port N, or server.port in the config)") from None
        self.server = server
        log.info("control API and metrics at %s", server.url)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the stream ended (finite source, fatal error) or ``request_stop``; True if so."""
        return self._done.wait(timeout)

    def request_stop(self) -> None:
        """Ask ``wait`` to return (safe from a signal handler: sets an event, nothing else)."""
        self._done.set()

    def stop(self) -> dict:
        """Graceful shutdown; returns the sinks' final status. Idempotent."""
        with self._lock:
            if self._stopping:
                return {}
            self._stopping = True
        self.state = "stopping"
        sd = self.cfg.shutdown
        t0 = time.monotonic()
        if self.capture is not None:
            if not self.capture.stop():
                log.warning("capture did not stop within %.1f s; abandoned", self.capture.stop_bound)
        if self.sampler is not None:
            self.sampler.stop()
        core = self.engine.core if self.engine is not None else None
        if core is not None and self._attached:
            core.detach(self)  # no new turns; the one in flight may finish
            with self._idle:
                finished = self._idle.wait_for(lambda: self._inflight is False, sd.turn_timeout_s)
            if not finished:
                log.warning("the engine turn in progress did not finish within %.1f s; abandoned",
                            sd.turn_timeout_s)
            elif self.session is not None and hasattr(self.session, "close"):
                self.session.close()  # the cache row is free for another stream
        self._fail_commands("the pipeline is stopping")
        ending, self._ending = self._ending, None
        if ending is not None:  # stopped before the queue drained: the end is still told
            self._tell(ending)
        if self._own_engine and self.engine is not None:
            self.engine.stop(max(0.0, sd.turn_timeout_s - (time.monotonic() - t0)))
        status = self.dispatcher.stop(sd.sinks_timeout_s) if self.dispatcher is not None else {}
        for name, st in status.items():
            if st.get("state") == "hung":
                log.error("sink %s did not finish closing", name)
        if self.server is not None and self._own_server:
            self.server.stop()
            self.server = None
        self.state = "stopped"
        self._done.set()
        if self.capture is not None:
            log.info("stopped in %.1f s", time.monotonic() - t0)
        return status

    @property
    def exit_code(self) -> int:
        return 1 if self.error else 0

    # -- producer callbacks (capture / sampler threads) ------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        self.metrics.input_rate.mark(frame.arrival)
        d = self.dispatcher
        if d is not None and d.wants_frames:
            d.frame(frame)

    def _on_event(self, ev: StreamEvent) -> None:
        held, self._ending = self._ending, None
        if held is not None:
            self._tell(held)
        if ev.kind in ("source_ended", "source_error") and not self._done.is_set() and self.queue is not None:
            self._ending = ev  # told once the clips still queued are captioned (see _check_ended)
            if ev.kind == "source_error":
                self.error = ev.detail
            return
        self._tell(ev)

    def _tell(self, ev: StreamEvent) -> None:
        self.metrics.event(ev.kind)
        if ev.kind == "source_error":
            self.error = ev.detail
        if self.dispatcher is not None:
            self.dispatcher.event(ev)

    # -- the stream's side of the engine core (called on the engine thread) ---------------------------------
    def due(self) -> float | None:
        """When this stream's next turn became due (monotonic s), None if it has none (StreamPort)."""
        with self._lock:
            if self._stopping:
                return None
            if self._commands:
                return self._commands[0].received
            paused = self._paused
        if not paused:
            ready = self.queue.oldest_ready() if self.queue is not None else None
            if ready is not None:
                return ready
        self._check_ended()
        return None

    def next_request(self):
        """This stream's next turn: a question, else the oldest clip (StreamPort). Query changes are applied
        here, between turns, without a turn of their own."""
        while True:
            with self._lock:
                cmd = self._commands.popleft() if self._commands else None
                paused = self._paused
            if cmd is not None:
                if cmd.future.done():  # the requester gave up
                    continue
                if cmd.kind == "query":
                    self._apply_query(cmd)
                    continue
                try:
                    at = self.recent[-1].stop if self.recent else (self.capture.stream_time if self.capture else 0.0)
                    req = self.session.question_request(cmd.arg, at)
                except Exception as e:  # noqa: BLE001 - a bad question fails that request only
                    log.warning("ask command failed: %s: %s", type(e).__name__, e)
                    cmd.future.set_exception(e)
                    continue
                return self._in_flight(req, cmd)
            if paused or self.queue is None:
                return None
            clip = self.queue.get(timeout=0)
            if clip is None:
                self._check_ended()
                return None
            req = self._video_request(clip)
            if req is not None:
                return self._in_flight(req, None)

    def _video_request(self, clip):
        from .engine import ContextFullError

        try:
            try:
                return self.session.video_request(clip)
            except ContextFullError as e:
                log.warning("context full (%s): starting a fresh context", e)
                self.session.reset()
                self._on_event(StreamEvent("context_reset", clip.start, str(e)))
                return self.session.video_request(clip)
        except Exception as e:  # noqa: BLE001 - counted like a failed turn
            self._turn_failed(clip.start, e)
            return None

    def _in_flight(self, req, cmd: Command | None):
        with self._lock:
            self._inflight = cmd
        req.on_done = self._on_result
        return req

    def _on_result(self, req, result) -> None:
        """The engine served (or failed) this stream's turn."""
        with self._lock:
            cmd = self._inflight if self._inflight is not False else None
        try:
            if isinstance(result, BaseException):
                if cmd is not None:
                    log.warning("ask command failed: %s: %s", type(result).__name__, result)
                    cmd.future.set_exception(result)
                else:
                    self._turn_failed(req.start, result)
                return
            cap = self.session.finish(req, result)
            if cmd is not None:
                cap = dataclasses.replace(cap, latency_s=time.monotonic() - cmd.received)
                self._publish(cap)
                cmd.future.set_result(cap)
                return
            self._errors_in_row = 0
            rolls = getattr(self.session, "rollovers", 0)
            if rolls != self._rollovers:  # the engine's context policy started a fresh context
                self._rollovers = rolls
                self._on_event(StreamEvent("context_rollover", req.start, f"rollover {rolls}"))
            self._publish(cap)
            if self._query_waiters and self.session.sent_query == self.session.query:
                for fut in self._query_waiters:
                    if not fut.done():
                        fut.set_result({"query": self.session.query, "turn": cap.turn, "caption": cap.text,
                                        "start": round(cap.start, 3), "stop": round(cap.stop, 3)})
                self._query_waiters = []
        finally:
            with self._idle:
                self._inflight = False
                self._idle.notify_all()
            self._check_ended()

    def _turn_failed(self, at: float, e: BaseException) -> None:
        self.metrics.turn_errors.inc()
        self._errors_in_row += 1
        log.error("engine turn at %.1f s failed: %s: %s", at, type(e).__name__, e,
                  exc_info=(type(e), e, e.__traceback__) if self._errors_in_row == 1 else None)
        if self._errors_in_row >= MAX_CONSECUTIVE_ERRORS:
            self.error = f"the engine failed {self._errors_in_row} turns in a row: {type(e).__name__}: {e}"
            self._end()

    def _check_ended(self) -> None:
        """The stream is over once its source ended and every clip and command was served."""
        q = self.queue
        with self._lock:
            idle = self._inflight is False and not self._commands
        if q is not None and len(q) == 0 and idle:
            ending, self._ending = self._ending, None
            if ending is not None:  # the end of the source, after its last caption
                self._tell(ending)
            if q.closed:
                self._end()

    def _end(self) -> None:
        if self._attached and self.engine is not None:
            self.engine.core.detach(self)
        self._fail_commands("the engine has stopped")
        self._done.set()

    def _publish(self, cap: Caption) -> None:
        self.recent.append(cap)
        self.metrics.turn(cap, getattr(self.session, "last_stats", None))
        if self.dispatcher is not None:
            self.dispatcher.caption(cap)

    def _apply_query(self, cmd: Command) -> None:
        try:
            self.session.set_query(cmd.arg)
        except ValueError as e:
            cmd.future.set_exception(e)
            return
        self.metrics.query_changes.inc()
        for old in self._query_waiters:  # a newer query replaced it before any turn carried it
            if not old.done():
                old.set_result({"query": None, "superseded": True})
        self._query_waiters = [cmd.future]  # resolved by the next caption turn, which carries it

    def _fail_commands(self, why: str) -> None:
        with self._lock:
            pending, self._commands = [c.future for c in self._commands], collections.deque()
            pending += self._query_waiters
            self._query_waiters = []
        for fut in pending:
            if not fut.done():
                fut.set_exception(PipelineError(why))

    # -- control (any thread) -------------------------------------------------------------------------
    def submit(self, kind: str, arg: Any) -> Future:
        """Queue a command for the engine thread (run between turns); the future holds its result."""
        fut: Future = Future()
        with self._lock:
            running = not self._stopping and self._attached and not self._done.is_set() and self.engine is not None \
                and self.engine.core.alive
            if running:
                self._commands.append(Command(kind, arg, fut))
        if not running:
            fut.set_exception(PipelineError("the pipeline is not running"))
            return fut
        self.engine.core.wake()
        return fut

    def set_query(self, query: str) -> Future:
        """The future resolves when the next caption turn carrying ``query`` is out:
        ``{"query", "turn", "caption", "start", "stop"}`` (``{"superseded": True}`` if replaced first)."""
        return self.submit("query", query)

    @property
    def paused(self) -> bool:
        return self._paused

    def ask(self, question: str) -> Future:
        """A ``Future[Caption]`` (kind "answer") for a question about the stream so far."""
        return self.submit("ask", question)

    def pause(self) -> bool:
        return self._set_paused(True)

    def resume(self) -> bool:
        return self._set_paused(False)

    def _set_paused(self, paused: bool) -> bool:
        with self._lock:
            changed = self._paused != paused
            self._paused = paused
        if self.engine is not None:
            self.engine.core.wake()
        if changed:
            self.metrics.paused.set(1 if paused else 0)
            at = self.capture.stream_time if self.capture else 0.0
            self._on_event(StreamEvent("captioning_paused" if paused else "captioning_resumed", round(at, 3)))
            log.info("captioning %s", "paused" if paused else "resumed")
        return paused

    # -- reporting -------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return (self.state == "running" and self.capture is not None and self.capture.stats["frames"] > 0
                and self.engine is not None and self.engine.core.alive)

    @property
    def live(self) -> bool:
        if self.state in ("new", "loading", "starting"):
            return True
        return self.state == "running" and self.engine is not None and self.engine.core.alive

    def snapshot(self) -> Snapshot:
        """Everything the status display, /api/status and /metrics show; secret-free."""
        now = time.monotonic()
        m = self.metrics
        cap = self.capture
        cstats = dict(cap.stats) if cap is not None else {}
        cstats["reconnects"] = max(0, cstats.get("sessions", 0) - 1)
        cstats["stream_time"] = round(cap.stream_time, 3) if cap is not None else 0.0
        sampled = 0.0
        if self.sampler is not None:
            ticks = [s.tick for s in list(self.sampler.samples)[-64:]]
            window = [t for t in ticks if t >= now - RATE_WINDOW_S]
            sampled = len(window) / min(RATE_WINDOW_S, max(1e-3, now - self._t_start))
        gpu = {}
        if self.model is not None and getattr(self.model, "device", None) is not None and \
                self.model.device.type == "cuda":
            import torch

            gpu = {"allocated": torch.cuda.memory_allocated(self.model.device),
                   "reserved": torch.cuda.memory_reserved(self.model.device)}
        last = self.recent[-1] if self.recent else None
        busy = self.engine.core.busy_since if self.engine is not None and self._inflight is not False else None
        sess = self.session
        return {
            "stream": self.stream_id,
            "state": self.state,
            "ready": self.ready,
            "live": self.live,
            "error": redact(self.error) if self.error else None,
            "source": self.source.display if self.source is not None else redact(str(self.source_spec)),
            "model": self.engine_cfg.model,
            "device": str(getattr(self.model, "device", "")) if self.model is not None else None,
            "uptime_s": round(time.time() - self.started_at, 1),
            "paused": self._paused,
            "query": sess.query if sess is not None else self.engine_cfg.query,
            "turns": getattr(sess, "total_turns", 0) if sess is not None else 0,
            "context_tokens": sess.context_length if sess is not None else 0,
            "busy_s": round(time.perf_counter() - busy, 3) if busy is not None else 0.0,
            "input_fps": round(m.input_rate.rate(now), 2),
            "sampled_fps": round(sampled, 2),
            "turns_per_s": round(m.turn_rate.rate(now), 2),
            "latency_p50_s": _r(m.latencies.percentile(50)),
            "latency_p95_s": _r(m.latencies.percentile(95)),
            "queue": self.queue.stats() if self.queue is not None else {},
            "capture": cstats,
            "sampler": dict(self.sampler.stats) if self.sampler is not None else {},
            "gpu": gpu,
            "quantize": getattr(self.model, "quantize", self.engine_cfg.quantize),
            "weight_bytes": getattr(self.model, "weight_bytes", 0),
            "last_caption": last.to_json(tokens=False) if last is not None else None,
            "recent": [c.to_json(tokens=False) for c in list(self.recent)[-5:]],
            "sinks": self.dispatcher.status() if self.dispatcher is not None else {},
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)

