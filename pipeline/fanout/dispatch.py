"""Fan captions, events and frames out to sinks without ever blocking the caller.

Each sink gets its own worker thread and a bounded queue. The producer (the GPU consumer, the
capture thread) only appends to queues: when a queue is full its oldest item is dropped and
counted. Frames are latest-wins: a sink that is slower than the video sees the newest frame
and the skipped ones are counted. Audio (for sinks with ``wants_audio``) is delivered in order
through its own bounded queue (``audio_queue_size``): when full, the oldest chunk is dropped and
counted (``audio_dropped``); audio is never retried.

A sink call that raises is logged (``LogLimit``: the first errors, then one a minute per sink) and retried with exponential backoff (``retry``, a
:class:`~pipeline.backoff.Backoff` whose ``max_attempts`` counts every attempt at one item); when the
attempts run out the item is dropped and the sink reported ``failed`` until its next success. After
``stop``, a sink that lost anything (an item given up, a start that never succeeded, a failed ``stop``)
stays ``failed`` (with ``last_error``), the others are ``stopped``.
Before each call the sink's ``deadline`` is set (see :class:`~pipeline.fanout.sink.Sink`): start
of the call + ``call_timeout``, or the shutdown deadline when earlier. A call that runs longer
than ``call_timeout`` marks the sink ``hung``; the dispatcher keeps going without
it (its queue keeps dropping the oldest items) and, at ``stop``, abandons its thread (a daemon).
If the stuck call ever returns, the sink goes back to ``ok``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Iterable

from .sink import DeliveryError, Sink
from ..backoff import Backoff, LogLimit
from ..redact import redact
from ..types import AudioChunk, Caption, Frame, StreamEvent

log = logging.getLogger(__name__)

OK, RETRYING, FAILED, HUNG, STOPPED, STARTING = "ok", "retrying", "failed", "hung", "stopped", "starting"
DISCONNECTED = "disconnected"  # reported (never set): a sink whose stats() say connected: False


#: 4 attempts per item: at once, then after 0.2, 0.4 and 0.8 s (a failed start: forever, up to 10 s apart)
RETRY = Backoff(initial=0.2, factor=2.0, max_delay=10.0, max_attempts=4)


_STOP = object()


class _Worker:
    def __init__(self, sink: Sink, name: str, queue_size: int, backoff: Backoff, call_timeout: float,
                 audio_queue_size: int = 512) -> None:
        self.sink = sink
        self.audio: collections.deque = collections.deque()
        self.audio_queue_size = audio_queue_size
        self.name = name
        self.backoff = backoff
        self.call_timeout = call_timeout
        self.items: collections.deque = collections.deque()
        self.queue_size = queue_size
        self.frame: Frame | None = None
        self.cond = threading.Condition()
        self.stopping = False  # under cond: no more puts
        self.stopped = threading.Event()  # set with stopping: ends a backoff wait at once
        self.stop_deadline = float("inf")  # monotonic: Dispatcher.stop's deadline
        self.state = STARTING
        self.started = False
        self.call_started: float | None = None
        self.call_what = ""
        self.counters = collections.Counter()
        self.traced = False  # a traceback logged already (only the first unexpected error gets one)
        # a target down for hours fails every caption (3,600 lines an hour): the first errors each warn, then one a
        # minute, saying how many were left out; counters and last_error see all
        self._error_log = LogLimit()
        self.last_error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"sink-{name}", daemon=True)

    # --- producer side (never blocks) ------------------------------------------------
    def put(self, kind: str, item: Any) -> None:
        with self.cond:
            if self.stopping:
                return
            if len(self.items) >= self.queue_size:
                self.items.popleft()
                self.counters["dropped"] += 1
            self.items.append((kind, item))
            self.cond.notify()

    def put_frame(self, frame: Frame) -> None:
        with self.cond:
            if self.stopping:
                return
            if self.frame is not None:
                self.counters["frames_dropped"] += 1
            self.frame = frame
            self.cond.notify()

    def put_audio(self, chunk: AudioChunk) -> None:
        with self.cond:
            if self.stopping:
                return
            if len(self.audio) >= self.audio_queue_size:
                self.audio.popleft()
                self.counters["audio_dropped"] += 1
            self.audio.append(chunk)
            self.cond.notify()

    def request_stop(self, deadline: float) -> None:
        with self.cond:
            self.stopping = True
            self.stopped.set()
            self.stop_deadline = deadline
            if self.call_started is not None:  # a call in progress must end by the shutdown deadline too
                self.sink.deadline = min(self.sink.deadline or deadline, deadline)
            self.items.append(("stop", _STOP))
            self.cond.notify()

    # --- worker side -----------------------------------------------------------------
    def _call(self, what: str, fn, *args) -> None:
        self.call_what = what
        self.call_started = time.monotonic()
        with self.cond:  # request_stop may lower it from another thread
            self.sink.deadline = min(self.call_started + self.call_timeout, self.stop_deadline)
        try:
            fn(*args)
        finally:
            self.call_started = None
            if self.state == HUNG:
                log.warning("sink %s returned from a hung %s call", self.name, what)
                self.state = OK

    def _deliver(self, what: str, fn, *args) -> bool:
        attempt = 0
        while True:
            try:
                self._call(what, fn, *args)
                if self.state in (RETRYING, FAILED, STARTING):
                    self.state = OK
                return True
            except DeliveryError as e:  # the sink already retried: count, don't retry
                self._error(what, e)
                self.state = FAILED
                self.counters["failed"] += 1
                return False
            except Exception as e:
                self._error(what, e)
                attempt += 1
                if self.backoff.exhausted(attempt + 1) or self.stopping:
                    self.state = FAILED
                    self.counters["failed"] += 1
                    return False
                self.state = RETRYING
                self.counters["retries"] += 1
                if self.backoff.wait(self.stopped, attempt + 1):
                    self.state = FAILED
                    self.counters["failed"] += 1
                    return False

    def _error(self, what: str, e: BaseException) -> None:
        self.counters["errors"] += 1
        self.last_error = redact(f"{what}: {type(e).__name__}: {e}")
        # the first unexpected error's traceback, for a bug; a disk or network error (OSError) and a sink's own
        # verdict after its retries (DeliveryError) say all in one line
        trace = not isinstance(e, (OSError, DeliveryError)) and not self.traced
        self.traced = self.traced or trace
        note = self._error_log.check(self.counters["errors"])
        if note is None and not trace:
            log.debug("sink %s: %s", self.name, self.last_error)
            return
        log.warning("sink %s: %s%s", self.name, self.last_error, note or "", exc_info=trace)

    def _ensure_started(self) -> bool:
        attempt = 0
        while not self.started:
            if self.stopping and attempt == 0 and self.counters["start_failures"]:
                return False  # stopping: no more attempts for a sink that never started
            try:
                self._call("start", self.sink.start)
                self.started = True
                self.state = OK
                return True
            except Exception as e:
                self._error("start", e)
                attempt += 1
                self.counters["start_failures"] += 1
                self.state = FAILED if self.backoff.exhausted(attempt + 1) else RETRYING
                # keep trying while running (a server may come back); the queue keeps dropping
                if self.backoff.wait(self.stopped, attempt + 1):
                    return False
        return True

    def _run(self) -> None:
        self._ensure_started()
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.items or self.frame is not None or self.audio)
                if self.items:
                    kind, item = self.items.popleft()
                    frame = None
                elif self.audio:
                    kind, item = "audio", self.audio.popleft()
                    frame = None
                else:
                    kind, item = "frame", None
                    frame, self.frame = self.frame, None
            if item is _STOP:
                break
            if not self.started:
                if not self._ensure_started():
                    self.counters["dropped"] += 1
                    continue
            if kind == "caption":
                if self._deliver("on_caption", self.sink.on_caption, item):
                    self.counters["captions"] += 1
            elif kind == "event":
                if self._deliver("on_event", self.sink.on_event, item):
                    self.counters["events"] += 1
            elif kind == "audio":
                try:  # audio is not retried either: the next chunk is coming
                    self._call("on_audio", self.sink.on_audio, item)
                    self.counters["audio"] += 1
                except Exception as e:
                    self._error("on_audio", e)
            elif frame is not None:
                try:  # frames are not retried: the next one is coming
                    self._call("on_frame", self.sink.on_frame, frame)
                    self.counters["frames"] += 1
                except Exception as e:
                    self._error("on_frame", e)
        # drain done; close the sink
        stop_failed = False
        if self.started:
            try:
                self._call("stop", self.sink.stop)
            except Exception as e:
                self._error("stop", e)
                stop_failed = True
        if self.state != HUNG:
            # what the run's summary and exit status go by: did this sink lose anything?
            lost = self.counters["failed"] or stop_failed or (not self.started and self.counters["start_failures"])
            self.state = FAILED if lost else STOPPED

    def status(self, now: float) -> dict:
        started = self.call_started
        if started is not None and now - started > self.call_timeout and self.state != HUNG:
            self.state = HUNG
            self.counters["hangs"] += 1
            log.error("sink %s hung in %s for %.1f s; moving on without it", self.name, self.call_what, now - started)
        with self.cond:
            queued = len(self.items)
        try:
            detail = self.sink.stats()
        except Exception as e:  # a reporting bug must not break the status display
            detail = {"error": redact(f"{type(e).__name__}: {e}")}
        state = self.state
        if state == OK and isinstance(detail, dict) and detail.get("connected") is False:
            state = DISCONNECTED  # its calls succeed (it queues), but nothing reaches anyone: never "ok"
        return {
            "state": state,
            "sink": redact(self.sink.describe()),
            "queued": queued,
            "captions": self.counters["captions"],
            "events": self.counters["events"],
            "frames": self.counters["frames"],
            "dropped": self.counters["dropped"],
            "frames_dropped": self.counters["frames_dropped"],
            "audio": self.counters["audio"],
            "audio_dropped": self.counters["audio_dropped"],
            "errors": self.counters["errors"],
            "retries": self.counters["retries"],
            "failed": self.counters["failed"],
            "hangs": self.counters["hangs"],
            "last_error": self.last_error,
            "busy_s": round(now - started, 3) if started is not None else 0.0,
            "detail": detail,
        }


class Dispatcher:
    """Deliver to many sinks; ``caption``/``event``/``frame`` return at once, whatever the sinks do."""

    def __init__(
        self,
        sinks: Iterable[Sink] = (),
        *,
        queue_size: int = 256,
        call_timeout: float = 10.0,
        retry: Backoff = RETRY,
        watch_interval: float = 0.5,
        audio_queue_size: int = 512,
    ) -> None:
        self.call_timeout = call_timeout
        self.audio_queue_size = audio_queue_size
        self._audio_workers: list[_Worker] = []
        self.queue_size = queue_size
        self.retry = retry
        self.watch_interval = watch_interval
        self._workers: dict[str, _Worker] = {}
        self._frame_workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._running = False
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None
        for s in sinks:
            self.add(s)

    def add(self, sink: Sink, name: str | None = None) -> str:
        base = name or getattr(sink, "name", type(sink).__name__)
        name, n = base, 2
        while name in self._workers:
            name, n = f"{base}#{n}", n + 1
        w = _Worker(sink, name, self.queue_size, self.retry, self.call_timeout, self.audio_queue_size)
        with self._lock:
            self._workers[name] = w
            if getattr(sink, "wants_frames", False):
                self._frame_workers.append(w)
            if getattr(sink, "wants_audio", False):
                self._audio_workers.append(w)
        if self._running:
            w.thread.start()
        return name

    @property
    def sinks(self) -> dict[str, Sink]:
        return {n: w.sink for n, w in self._workers.items()}

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        for w in self._workers.values():
            w.thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="sink-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._closed.wait(self.watch_interval):
            self.status()

    # --- producer API ----------------------------------------------------------------
    def caption(self, caption: Caption) -> None:
        for w in self._workers.values():
            w.put("caption", caption)

    def event(self, event: StreamEvent) -> None:
        for w in self._workers.values():
            w.put("event", event)

    def frame(self, frame: Frame) -> None:
        for w in self._frame_workers:
            w.put_frame(frame)

    def audio(self, chunk: AudioChunk) -> None:
        for w in self._audio_workers:
            w.put_audio(chunk)

    @property
    def wants_frames(self) -> bool:
        return bool(self._frame_workers)

    @property
    def wants_audio(self) -> bool:
        return bool(self._audio_workers)

    # --- reporting -------------------------------------------------------------------
    def status(self) -> dict[str, dict]:
        now = time.monotonic()
        return {n: w.status(now) for n, w in list(self._workers.items())}

    def stop(self, timeout: float = 10.0) -> dict[str, dict]:
        """Deliver what is queued, call every sink's ``stop``, wait up to ``timeout`` in all.

        Sinks still busy at the deadline are reported ``hung`` and their threads abandoned.
        """
        deadline = time.monotonic() + timeout
        workers = list(self._workers.values())
        for w in workers:
            w.request_stop(deadline)
        for w in workers:
            if w.thread.is_alive() or w.thread.ident is None:
                if w.thread.ident is None:
                    continue
                w.thread.join(max(0.0, deadline - time.monotonic()))
        self._closed.set()
        now = time.monotonic()
        status = {}
        for w in workers:
            if w.thread.is_alive():
                if w.state != HUNG:
                    w.state = HUNG
                    w.counters["hangs"] += 1
                log.error("sink %s did not stop within %.1f s (in %s); abandoned", w.name, timeout, w.call_what)
            status[w.name] = w.status(now)
        self._running = False
        return status
