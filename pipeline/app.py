"""The live pipeline: capture thread -> ring buffer -> sampler -> clip queue -> ONE engine thread -> sinks.

Threads and who owns what:

- the capture thread (``CaptureThread``) decodes the source into the ring buffer; every frame is
  also handed to the dispatcher for sinks that want frames (burn-in), latest-wins; when a sink
  wants audio (burn-in passthrough) and the input has it, decoded audio goes to the dispatcher too,
  in order through a bounded queue;
- the sampler thread (``LiveSampler``) takes 2 frames per second of stream time into clips and puts
  them into a bounded clip queue that drops the oldest clip when the engine falls behind;
- the engine thread (here) is the only thread that touches the model (the GPU). It waits on one
  condition for either a clip or a command from the control API (query change, question), runs
  commands between turns, and publishes each caption to the dispatcher;
- the dispatcher gives every sink its own worker thread and bounded queue, so no sink can stall
  the engine;
- the HTTP server (overlay page, control API, /metrics) runs its own event loop thread.

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

from .capture import Backoff, CaptureThread, ClipQueue, LiveSampler, RingBuffer, SourceOptions, resolve
from .config import RunConfig, is_loopback
from .metrics import Metrics
from .redact import redact
from .types import Caption, Frame, StreamEvent

log = logging.getLogger("livecc.app")

MAX_CONSECUTIVE_ERRORS = 3  # engine turns failing in a row before the pipeline gives up
RECENT_CAPTIONS = 20  # kept for /api/status


class PipelineError(RuntimeError):
    """The pipeline cannot run (a source that won't open, an engine that keeps failing)."""


class _TeeRing(RingBuffer):
    """The ring buffer the capture thread writes; each frame is also passed to ``on_frame``."""

    def __init__(self, size: int, on_frame):
        super().__init__(size)
        self._on_frame = on_frame

    def put(self, frame: Frame) -> None:
        super().put(frame)
        self._on_frame(frame)


class _Inbox(ClipQueue):
    """The clip queue, waking the engine thread's condition on every put and on close."""

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


class Pipeline:
    """One live stream captioned end to end. ``start()``, then ``wait()``, then ``stop()``."""

    def __init__(self, cfg: RunConfig, source: str | None = None, *, model=None, metrics: Metrics | None = None,
                 sinks: list | None = None, session_factory=None):
        self.cfg = cfg
        self.source_spec = source or cfg.capture.source
        if not self.source_spec:
            raise PipelineError("no source: give SOURCE on the command line or capture.source in the config")
        self.engine_cfg = cfg.engine_config()
        self.metrics = metrics or Metrics()
        self.model = model
        self._sinks = sinks
        self._session_factory = session_factory  # (model, EngineConfig) -> session; default StreamingSession
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
        self.server = None
        self.control = None
        self.recent: collections.deque[Caption] = collections.deque(maxlen=RECENT_CAPTIONS)
        self.query_log: collections.deque[tuple[int, str]] = collections.deque(maxlen=100)  # (turn, query)
        self._cond = threading.Condition()
        self._commands: collections.deque[Command] = collections.deque()
        self._query_waiters: list[Future] = []
        self._paused = False
        self._stop_turns = False
        self._stopping = False
        self._busy_since: float | None = None
        self._errors_in_row = 0
        self._rollovers = 0
        self._done = threading.Event()  # the engine loop ended, or a stop was requested
        self._consumer: threading.Thread | None = None
        self.metrics.bind(self.snapshot)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "Pipeline":
        from .capture import CaptureError
        from .fanout.dispatch import Dispatcher
        from .plugins import make_sink

        cfg, cap = self.cfg, self.cfg.capture
        self.state = "starting"
        opts = SourceOptions(pace=cap.pace, listen=cap.listen, transport=cap.transport, low_latency=cap.low_latency,
                             relay=cap.relay, video_size=cap.video_size, framerate=cap.framerate,
                             pixel_format=cap.pixel_format, decoder_threads=cap.decoder_threads,
                             thread_type=cap.thread_type, open_timeout=cap.open_timeout,
                             read_timeout=cap.read_timeout, live=cap.live, options=dict(cap.options))
        try:
            self.source = resolve(self.source_spec, opts)
        except CaptureError as e:
            raise PipelineError(str(e)) from None
        if self.source.kind == "file" and not os.path.isfile(self.source.url):
            raise PipelineError(f"{self.source.display}: no such file")  # before a long model load
        if self._sinks is None:
            blocks = cfg.sinks or [{"kind": "console"}]
            try:
                self._sinks = [make_sink(dict(b)) for b in blocks]
            except ValueError as e:
                raise PipelineError(str(e)) from None
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
        if self.model is None:
            from .engine import load_model

            self.state = "loading"
            log.info("loading %s", self.engine_cfg.model)
            self.model = load_model(self.engine_cfg.model, device=self.engine_cfg.device, dtype=self.engine_cfg.dtype)
        if self._done.is_set():  # stopped (Ctrl-C) while the model loaded: start nothing more
            self.state = "stopping"
            return self
        if self._session_factory is None:
            from .engine import StreamingSession

            self._session_factory = StreamingSession
        self.session = self._session_factory(self.model, self.engine_cfg)
        if cfg.server.enabled:
            port = cfg.server.port or _free_port(cfg.server.host)
            if cfg.server.port == 0:  # port 0: overlay sinks that share the server follow the port picked
                for sink in self._sinks:
                    if getattr(sink, "name", "") == "overlay" and (sink.host, sink.port) == (cfg.server.host, 0):
                        sink.port = port
            self._start_server(port)
        self.dispatcher = Dispatcher(self._sinks)
        self.dispatcher.start()
        log.info("captions to %s", ", ".join(s.describe() for s in self._sinks))
        self.queue = _Inbox(cfg.sampler.queue_size, self._wake)
        s = cfg.sampler
        self.sampler = LiveSampler(ring, self.queue, fps=s.fps, opener_frames=s.opener_frames,
                                   turn_frames=s.turn_frames, max_pixels=self.engine_cfg.max_pixels,
                                   lookahead=s.lookahead_s, hold_s=s.hold_s, on_event=self._on_event)
        self._consumer = threading.Thread(target=self._engine_loop, name="livecc-engine", daemon=True)
        self._consumer.start()
        if not self.source.live:
            self.capture.start()
        self._t_start = time.monotonic()
        self.sampler.start()
        self.state = "running"
        log.info("capturing %s", self.source.display)
        return self

    def _start_server(self, port: int) -> None:
        import ipaddress

        from plugins.sinks.overlay import OverlayServer

        from .control import ControlAPI

        srv = self.cfg.server
        allowed: list[str] = []
        try:
            ip = ipaddress.ip_address(srv.host.strip("[]"))
            if not ip.is_unspecified and not is_loopback(srv.host):
                allowed.append(srv.host.strip("[]"))
        except ValueError:
            allowed.append(srv.host)  # a host name: it is what clients put in the Host header
        self.server = OverlayServer.shared(srv.host, port, max_request_bytes=srv.max_request_bytes,
                                           allowed_hosts=allowed)
        self.control = ControlAPI(self, srv)
        self.control.mount(self.server)
        try:
            self.server.acquire()
        except OSError as e:
            self.server = None
            raise PipelineError(f"server: {e} (is another livecc running? set server.port)") from None
        log.info("control API and metrics at %s (overlay page %s/overlay)", self.server.url, self.server.url)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the stream ended (finite source, fatal error) or ``request_stop``; True if so."""
        return self._done.wait(timeout)

    def request_stop(self) -> None:
        """Ask ``wait`` to return (safe from a signal handler: sets an event, nothing else)."""
        self._done.set()

    def stop(self) -> dict:
        """Graceful shutdown; returns the sinks' final status. Idempotent."""
        with self._cond:
            if self._stopping:
                return {}
            self._stopping = True
            self._stop_turns = True
            self._cond.notify_all()
        self.state = "stopping"
        sd = self.cfg.shutdown
        t0 = time.monotonic()
        if self.capture is not None:
            if not self.capture.stop():
                log.warning("capture did not stop within %.1f s; abandoned", self.capture.stop_bound)
        if self.sampler is not None:
            self.sampler.stop()
        if self._consumer is not None and self._consumer.is_alive():
            left = max(0.0, sd.turn_timeout_s - (time.monotonic() - t0))
            self._consumer.join(left)
            if self._consumer.is_alive():
                log.warning("the engine turn in progress did not finish within %.1f s; abandoned",
                            sd.turn_timeout_s)
        self._fail_commands("the pipeline is stopping")
        status = self.dispatcher.stop(sd.sinks_timeout_s) if self.dispatcher is not None else {}
        for name, st in status.items():
            if st.get("state") == "hung":
                log.error("sink %s did not finish closing", name)
        if self.server is not None:
            self.server.release()
            self.server = None
        self.state = "stopped"
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
        self.metrics.event(ev.kind)
        if ev.kind == "source_error":
            self.error = ev.detail
        if self.dispatcher is not None:
            self.dispatcher.event(ev)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the engine thread -------------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while (not self._commands and not self._stop_turns and not self.queue.closed
                           and (self._paused or len(self.queue) == 0)):
                        self._cond.wait()
                    if self._stop_turns:
                        break
                    cmd = self._commands.popleft() if self._commands else None
                    paused = self._paused
                if cmd is not None:
                    self._run_command(cmd)
                    continue
                if paused:  # the source ended while paused
                    break
                clip = self.queue.get(timeout=0)
                if clip is None:
                    if self.queue.closed:
                        break
                    continue
                if not self._turn(clip):
                    break
        except Exception as e:  # a bug: report it and end the run (exit status 1)
            log.exception("engine loop failed")
            self.error = f"engine loop failed: {type(e).__name__}: {e}"
        finally:
            self._fail_commands("the engine has stopped")
            self._done.set()

    def _turn(self, clip) -> bool:
        from .engine import ContextFullError

        self._busy_since = time.monotonic()
        try:
            try:
                cap = self.session.step(clip)
            except ContextFullError as e:
                log.warning("context full (%s): starting a fresh context", e)
                self.session.reset()
                self._on_event(StreamEvent("context_reset", clip.start, str(e)))
                cap = self.session.step(clip)
        except Exception as e:
            self.metrics.turn_errors.inc()
            self._errors_in_row += 1
            log.error("engine turn at %.1f s failed: %s: %s", clip.start, type(e).__name__, e,
                      exc_info=self._errors_in_row == 1)
            if self._errors_in_row >= MAX_CONSECUTIVE_ERRORS:
                self.error = f"the engine failed {self._errors_in_row} turns in a row: {type(e).__name__}: {e}"
                return False
            return True
        finally:
            self._busy_since = None
        self._errors_in_row = 0
        rolls = getattr(self.session, "rollovers", 0)
        if rolls != self._rollovers:  # the engine's context policy started a fresh context
            self._rollovers = rolls
            self._on_event(StreamEvent("context_rollover", clip.start, f"rollover {rolls}"))
        self._publish(cap)
        if self._query_waiters and self.session.sent_query == self.session.query:
            self.query_log.append((cap.turn, self.session.query))
            for fut in self._query_waiters:
                if not fut.done():
                    fut.set_result({"query": self.session.query, "turn": cap.turn, "caption": cap.text,
                                    "start": round(cap.start, 3), "stop": round(cap.stop, 3)})
            self._query_waiters = []
        return True

    def _publish(self, cap: Caption) -> None:
        self.recent.append(cap)
        self.metrics.turn(cap, self.session.last_stats)
        if self.dispatcher is not None:
            self.dispatcher.caption(cap)

    def _run_command(self, cmd: Command) -> None:
        if cmd.future.done():  # the requester gave up
            return
        try:
            if cmd.kind == "query":
                self.session.set_query(cmd.arg)
                self.metrics.query_changes.inc()
                for old in self._query_waiters:  # a newer query replaced it before any turn carried it
                    if not old.done():
                        old.set_result({"query": None, "superseded": True})
                self._query_waiters = [cmd.future]  # resolved by the next caption turn, which carries it
            elif cmd.kind == "ask":
                at = self.recent[-1].stop if self.recent else (self.capture.stream_time if self.capture else 0.0)
                self._busy_since = time.monotonic()
                try:
                    ans = self.session.ask(cmd.arg, at=at)
                finally:
                    self._busy_since = None
                ans = dataclasses.replace(ans, latency_s=time.monotonic() - cmd.received)
                self._publish(ans)
                cmd.future.set_result(ans)
            else:
                raise ValueError(f"unknown command {cmd.kind!r}")
        except Exception as e:
            log.warning("%s command failed: %s: %s", cmd.kind, type(e).__name__, e)
            if not cmd.future.done():
                cmd.future.set_exception(e)

    def _fail_commands(self, why: str) -> None:
        with self._cond:
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
        with self._cond:
            if self._stopping or self._consumer is None or not self._consumer.is_alive():
                fut.set_exception(PipelineError("the pipeline is not running"))
                return fut
            self._commands.append(Command(kind, arg, fut))
            self._cond.notify_all()
        return fut

    def set_query(self, query: str) -> Future:
        """The future resolves when the next caption turn carrying ``query`` is out:
        ``{"query", "turn", "caption", "start", "stop"}`` (``{"superseded": True}`` if replaced first)."""
        return self.submit("query", query)

    @property
    def paused(self) -> bool:
        return self._paused

    def ask(self, question: str) -> Future:
        return self.submit("ask", question)

    def pause(self) -> bool:
        return self._set_paused(True)

    def resume(self) -> bool:
        return self._set_paused(False)

    def _set_paused(self, paused: bool) -> bool:
        with self._cond:
            changed = self._paused != paused
            self._paused = paused
            self._cond.notify_all()
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
                and self._consumer is not None and self._consumer.is_alive())

    @property
    def live(self) -> bool:
        if self.state in ("new", "loading", "starting"):
            return True
        return self.state == "running" and self._consumer is not None and self._consumer.is_alive()

    def snapshot(self) -> dict:
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
            window = [t for t in ticks if t >= now - m.sample_rate.window]
            sampled = len(window) / min(m.sample_rate.window, max(1e-3, now - self._t_start))
        gpu = {}
        if self.model is not None and getattr(self.model, "device", None) is not None and \
                self.model.device.type == "cuda":
            import torch

            gpu = {"allocated": torch.cuda.memory_allocated(self.model.device),
                   "reserved": torch.cuda.memory_reserved(self.model.device)}
        last = self.recent[-1] if self.recent else None
        busy = self._busy_since
        return {
            "state": self.state,
            "ready": self.ready,
            "live": self.live,
            "error": redact(self.error) if self.error else None,
            "source": self.source.display if self.source is not None else redact(str(self.source_spec)),
            "model": self.engine_cfg.model,
            "device": str(getattr(self.model, "device", "")) if self.model is not None else None,
            "uptime_s": round(time.time() - self.started_at, 1),
            "paused": self._paused,
            "query": self.session.query if self.session is not None else self.engine_cfg.query,
            "turns": self.session.turns if self.session is not None else 0,
            "context_tokens": self.session.context_length if self.session is not None else 0,
            "busy_s": round(now - busy, 3) if busy is not None else 0.0,
            "input_fps": round(m.input_rate.rate(now), 2),
            "sampled_fps": round(sampled, 2),
            "turns_per_s": round(m.turn_rate.rate(now), 2),
            "latency_p50_s": _r(m.latencies.percentile(50)),
            "latency_p95_s": _r(m.latencies.percentile(95)),
            "queue": self.queue.stats() if self.queue is not None else {},
            "capture": cstats,
            "sampler": dict(self.sampler.stats) if self.sampler is not None else {},
            "gpu": gpu,
            "last_caption": _caption_json(last),
            "recent": [_caption_json(c) for c in list(self.recent)[-5:]],
            "sinks": self.dispatcher.status() if self.dispatcher is not None else {},
        }


def _free_port(host: str) -> int:
    """A port free on ``host`` a moment ago (for ``server.port: 0``: the overlay sinks must know it up front)."""
    import socket

    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _caption_json(c: Caption | None) -> dict | None:
    if c is None:
        return None
    return {"start": round(c.start, 3), "stop": round(c.stop, 3), "text": c.text, "kind": c.kind,
            "query": c.query, "turn": c.turn, "latency_s": round(c.latency_s, 3)}
