"""The engine core: one scheduler per device, the only code that drives the model runner.

Streams hand it turns (``TurnRequest``: a clip's prompt ids and frames, or a question); it serves them
with continuous batching:

    loop:  schedule  -> the oldest-due waiting turns (up to ``prefill_batch``) are prefilled together
                        (vision + prompt onto their cache rows) and each chooses its first token; unless
                        that ended the turn, it joins the decode batch. While rows are decoding, a prefill
                        waits until ``decode_steps_per_prefill`` steps ran since the last one
           execute   -> one decode step for every row in the batch at once, its tokens chosen on the device
           update    -> the previous step's tokens are read (while this one runs); a row that produced a stop
                        id or reached its cap leaves the batch and its stream gets the ``TurnResult``

A prefill runs between two decode steps, so a new turn never waits for a batch to finish and a long
answer never blocks captions. One stream is simply a batch of one.

Overlap (the "overlap scheduler" of SGLang, vLLM's async scheduling): a row's next step is launched with the
token its previous step (or its prefill) chose, still on the device, before the host reads that token, so the GPU
never waits for the host between steps (one stream on an H200 lost ≈ 0.85 ms a token that way: 6.2 ms per token
against a 5.35-ms step). A row whose token turns out to be a stop id ran one step too many: the step is
undone (its cache position released, its speculative repetition count and its sampling draw taken back),
so a greedy or seeded stream gets exactly the tokens it gets without overlap (an unseeded stream draws from the
process-wide generator, which other rows share: its extra draw is not taken back, which changes only which
random numbers later draws get).

Two ways to drive it: ``run(requests)`` serves a list of requests to completion in the calling thread
(``livecc caption``, tests); ``start()`` runs the loop in a thread that pulls turns from attached
``StreamPort`` objects (``livecc run`` / ``serve``), oldest due first, one turn in flight per stream.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from .runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class TurnStats:
    """Where one turn's time went (seconds) and its token counts. ``vision_s`` + ``prefill_s`` is the wall time from
    the turn's start to its first token on the host; on CUDA ``vision_s`` is the vision tower's GPU time (CUDA
    events: the host does not wait between the two), so ``prefill_s`` also holds any wait for the decode step in
    flight when the turn started."""

    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    context: int = 0  # tokens in the stream's cache row after the turn


@dataclass
class TurnRequest:
    """One turn of one stream, built by its session (``session.py``) and served by the core.

    ``ids``: the turn's prompt token ids with each video item's pads expanded; ``positions`` (3, T) int64 their
    mRoPE positions; ``frames`` (T, H, W, 3) uint8 for the vision tower (None for a question turn);
    ``next_pos`` the position of the first generated token; ``max_new`` the token cap. ``frames`` may also be
    a list of video items (their visual tokens fill the pads in order). Before the prefill the
    core applies the context edits: ``reset`` (a fresh context) or ``evict`` = (start, end, shift) with
    ``evict_ids`` leaving the repetition-penalty counts. ``due`` (monotonic s) orders waiting turns."""

    slot: int
    ids: list[int]
    positions: torch.Tensor
    next_pos: int
    max_new: int
    frames: np.ndarray | list[np.ndarray] | None = None
    due: float = field(default_factory=time.monotonic)
    reset: bool = False
    evict: tuple[int, int, int] | None = None
    evict_ids: list[int] = field(default_factory=list)
    on_done: Callable[["TurnRequest", "TurnResult | BaseException"], None] | None = None


@dataclass
class TurnResult:
    tokens: list[int]  # generated ids; the last one (stop id or the capped token) was not fed to the cache
    stats: TurnStats


class StreamPort(Protocol):
    """What the core's thread asks of an attached stream (called from the engine thread only)."""

    def due(self) -> float | None:
        """Monotonic time its next turn became due, or None if it has nothing to run."""

    def next_request(self) -> TurnRequest | None:
        """Its next turn (``on_done`` set), or None if there is none after all."""


@dataclass
class _Row:
    req: TurnRequest
    tokens: list[int]  # chosen ids the host has read
    pos: int  # position of the next token to feed
    stats: TurnStats
    t_decode: float
    done: bool = False  # its turn ended (its result was handed over)


@dataclass
class _Launched:
    """A decode step in flight: its rows, the ids it chose (B,) int64 on the device (the runner's state: valid until the
    next step is launched), their host copy (complete
    once ``ready`` has passed; None off CUDA) and each row's generator state before its draw. A row whose turn
    ended before the step (``_Row.done``) has its part undone (``EngineCore._void``) and skipped."""

    rows: list[_Row]
    chosen: torch.Tensor
    host: torch.Tensor
    ready: "torch.cuda.Event | None"
    rng: list
    prefill: tuple | None = None  # a prefill's first ids: (t0, t1, vision start and end events) for its TurnStats


class EngineCore:
    """Continuous batching over one ``ModelRunner``. Not thread-safe except ``attach``/``detach``/``wake``/``stop``."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.chooser = runner.chooser  # the runner's sampler: part of its decode step
        self.stop_ids = frozenset(runner.loaded.stop_ids)
        self._init_scheduler()

    def _init_scheduler(self, prefill_batch: int = 4) -> None:
        # turns prefilled together at most, then one decode step. Measured on an H200 (7B, 1080p turns, paced
        # real-time streams, packed varlen prefill): 24 streams dropped 65 of 480 clips with 1 (p99 2.9 s) and
        # none with 4 (p99 1.13 s, every stream real time); 32 streams with 4: no drops, p99 2.0 s; with 8: p99
        # 2.6 s (the decoding rows wait for the bigger batch). Under light load a batch holds what is waiting: 1.
        self.prefill_batch = prefill_batch
        # decode steps between two prefills while rows decode: a caption needs ~16 steps, and with 1 every step
        # waits for a prefill when the GPU is busy; more steps per prefill finish captions sooner but serve waiting
        # turns slower. H200, 32 paced 1080p streams, batches of 4: p99 2.9 s with 1, 1.3 s with 2, 1.7 s with 3,
        # clips dropped with 4 (docs/performance.md)
        self.decode_steps_per_prefill = 2
        self._since_prefill = 0
        self.active: list[_Row] = []
        self._launched: _Launched | None = None  # the decode step in flight, its tokens not yet read
        self._prefilled: _Launched | None = None  # the last prefill's first ids, not yet read
        self.overlap = True  # False: each step's tokens are read before the next is launched (a benchmark's baseline)
        self._ports: list[StreamPort] = []
        self._inflight: set[int] = set()  # id() of ports with a turn in flight
        self._cond = threading.Condition()
        self._woken = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.busy_since: float | None = None  # monotonic start of the GPU work in progress (for status)
        self.steps = 0

    # -- slots --------------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.runner.cache.free_slots

    def open_slot(self, seed: int | None = None) -> int:
        """A cache row for a new stream (RuntimeError when all are taken)."""
        slot = self.runner.cache.alloc()
        self.chooser.reset(slot)
        self.chooser.seed(slot, seed)
        return slot

    def close_slot(self, slot: int) -> None:
        self.runner.cache.free(slot)

    def context_length(self, slot: int) -> int:
        return self.runner.cache.length(slot)

    # -- the synchronous form ------------------------------------------------------------------------------
    def run(self, requests: list[TurnRequest]) -> list[TurnResult]:
        """Serve ``requests`` (distinct slots) to completion in this thread; results in the same order.
        The first failure is raised after the rest are served."""
        results: dict[int, TurnResult | BaseException] = {}
        pending = sorted(requests, key=lambda r: r.due)
        for r in pending:
            r.on_done = lambda req, res: results.__setitem__(id(req), res)
        with self._on_device():
            while pending or self.active:
                if pending and self._may_prefill():
                    batch, pending = pending[:self.prefill_batch], pending[self.prefill_batch:]
                    self._prefill(batch)
                if self.active:
                    self._decode_step()
        out = [results[id(r)] for r in requests]
        for res in out:
            if isinstance(res, BaseException):
                raise res
        return out  # type: ignore[return-value]

    # -- the threaded form ---------------------------------------------------------------------------------
    def attach(self, port: StreamPort) -> None:
        with self._cond:
            self._ports.append(port)
            self._woken = True
            self._cond.notify_all()

    def detach(self, port: StreamPort) -> None:
        with self._cond:
            self._ports = [p for p in self._ports if p is not port]

    def wake(self) -> None:
        """A port has new work (call without holding the port's own lock)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def start(self) -> "EngineCore":
        self._thread = threading.Thread(target=self._loop, name="livecc-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop after the step in progress; True if the thread ended within ``timeout`` seconds."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _on_device(self):
        """The runner's GPU as this thread's current device (streams, events and graph captures are per device)."""
        dev = self.runner.device
        return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()

    def _loop(self) -> None:
        with self._on_device():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self.active and not self._woken and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                self._woken = False
                idle = [p for p in self._ports if id(p) not in self._inflight]
            if self._may_prefill():
                reqs = self._next_requests(idle)
                if reqs:
                    self._prefill(reqs)
            else:
                with self._cond:
                    self._woken = True  # look for waiting turns after this step
            if self.active:
                self._decode_step()
        self._drain(RuntimeError("the engine stopped"))

    def _drain(self, error: BaseException) -> None:
        """Stop decoding: the turns that ended in the step in flight get their result, every other turn ``error``."""
        try:
            self._read_prefill()
        except Exception:  # noqa: BLE001 - the rest fail below all the same
            log.exception("reading the last prefill's first tokens failed")
        if self._launched is not None:
            try:
                step, self._launched = self._launched, None
                self._take(step, self._read(step))
            except Exception:  # noqa: BLE001 - the rest fail below all the same
                log.exception("reading the last decode step failed")
        self._fail(self.active, error)
        self.active = []

    def _may_prefill(self) -> bool:
        """A prefill may run now: nothing is decoding, or ``decode_steps_per_prefill`` steps ran since the last."""
        return not self.active or self._since_prefill >= self.decode_steps_per_prefill

    def _next_requests(self, idle: list[StreamPort]) -> list[TurnRequest]:
        """Up to ``prefill_batch`` turns, oldest due first, from streams with none in flight."""
        ready = []
        for p in idle:
            try:
                d = p.due()
            except Exception:  # noqa: BLE001 - one stream's bug must not stop the others
                log.exception("stream due() failed")
                continue
            if d is not None:
                ready.append((d, id(p), p))
        ready.sort(key=lambda x: (x[0], x[1]))
        out = []
        for _, port_id, port in ready[:self.prefill_batch]:
            try:
                req = port.next_request()
            except Exception:  # noqa: BLE001
                log.exception("stream next_request() failed")
                continue
            if req is None:
                continue
            self._inflight.add(port_id)
            req.on_done = self._release(port_id, req.on_done)
            out.append(req)
        if len(ready) > len(out) or out:
            with self._cond:
                self._woken = True  # look again after this step
        return out

    def _release(self, port_id: int, user):
        def done(r, res):
            self._inflight.discard(port_id)
            with self._cond:
                self._woken = True
            if user is not None:
                user(r, res)
        return done

    # -- schedule / execute / update ---------------------------------------------------------------------
    def _done(self, req: TurnRequest, res) -> None:
        try:
            if req.on_done is not None:
                req.on_done(req, res)
        except Exception:  # noqa: BLE001 - a stream's handler must not stop the engine
            log.exception("turn result handler failed")

    def _prefill(self, reqs: list[TurnRequest]) -> None:
        """Context edits, vision and prefill of several turns; each chooses its first token on the device and joins the
        decode batch. The host reads those tokens after the next decode step is launched (``_read_prefill``); a turn
        that its first token ended leaves then, its part of that step undone."""
        r, ch = self.runner, self.chooser
        self.busy_since = t0 = time.perf_counter()
        self._since_prefill = 0
        try:
            self._read_prefill()  # (a prefill is always followed by a decode step, which read the one before)
            for req in reqs:
                if req.reset:
                    r.cache.reset(req.slot)
                    ch.reset(req.slot)
                if req.evict is not None:
                    r.evict(req.slot, *req.evict)
                    if req.evict_ids:
                        ch.remove(req.slot, torch.tensor(req.evict_ids, dtype=torch.long))
            items = [(id(q), v) for q in reqs if q.frames is not None
                     for v in (q.frames if isinstance(q.frames, list) else [q.frames])]
            started = r.event()
            encoded = r.encode_videos([v for _, v in items])
            tokens: dict[int, torch.Tensor] = {}
            for (key, _), vis in zip(items, encoded):
                tokens[key] = torch.cat([tokens[key], vis]) if key in tokens else vis
            seen, t1 = r.event(), time.perf_counter()  # no wait here: the prefill is queued behind the vision tower
            logits = r.prefill([(q.slot, q.ids, q.positions, tokens.get(id(q))) for q in reqs])
            slots = [q.slot for q in reqs]
            for q in reqs:
                ch.add(q.slot, torch.tensor(q.ids, dtype=torch.long))
            first = ch.choose(logits, slots, [0] * len(reqs))
            r.feed_next(slots, first)  # each row's first decode step feeds its first id from the device
            ch.add_ids(slots, first)  # counted now; taken back if it ends the turn
            host, ready = self._to_host(first)
        except Exception as e:  # noqa: BLE001 - the streams decide what a failed turn means
            self.busy_since = None
            for q in reqs:
                self._done(q, e)
            return
        rows = [_Row(q, [], q.next_pos, TurnStats(prompt_tokens=len(q.ids)), t1) for q in reqs]
        self.active.extend(rows)
        self._prefilled = _Launched(rows, first, host, ready, [None] * len(rows), (t0, t1, started, seen))
        try:
            if not self.overlap:  # read at once (to measure overlap)
                self._read_prefill()
        except Exception as e:  # noqa: BLE001 - the streams decide what a failed turn means
            self._fail(rows, e)
            self.active = [r for r in self.active if not r.done]
        finally:
            self.busy_since = None

    def _read_prefill(self) -> None:
        """Read the last prefill's first ids: a row whose first id ends its turn (a stop id, or a cap of one token)
        finishes, its part of the decode step in flight (if any) undone."""
        pre, self._prefilled = self._prefilled, None
        if pre is not None:
            self._take(pre, self._read(pre))
            self.active = [r for r in self.active if not r.done]

    def _decode_step(self) -> None:
        """Launch the next decode step of every row that goes on, then read the step before it (its tokens end
        turns, or feed the step just launched)."""
        prev, self._launched = self._launched, None
        # rows whose newest token is still on the device: in ``prev``, or a prefill's first id not yet read
        ahead = {id(r) for r in prev.rows} if prev else set()
        if self._prefilled is not None:
            ahead |= {id(r) for r in self._prefilled.rows}
        go = [row for row in self.active if len(row.tokens) + (id(row) in ahead) < row.req.max_new]
        self.busy_since = time.perf_counter()
        error = None
        try:
            if go:
                self._launched = self._launch(go, ahead)
                self.steps += 1
                self._since_prefill += 1
        except Exception as e:  # noqa: BLE001 - every row of a failed step fails, after the turns that had ended
            error, self._launched = e, None
        try:
            self._read_prefill()  # (after the launch: the step was queued before the host waits for the prefill)
            if prev:  # read even when the launch failed: turns that ended in it get their result
                self._take(prev, self._read(prev))
            if error is None and not self.overlap and self._launched is not None:  # read at once (to measure overlap)
                step, self._launched = self._launched, None
                self._take(step, self._read(step))
                self.active = [r for r in step.rows if not r.done]
                return
        except Exception as e:  # noqa: BLE001
            error = error or e
        finally:
            self.busy_since = None
        if error is not None:
            self._fail(self.active, error)
            self.active, self._launched = [], None
            return
        self.active = [r for r in self._launched.rows if not r.done] if self._launched else []

    def _fail(self, rows: list[_Row], error: BaseException) -> None:
        """Each of ``rows`` whose turn has not ended gets ``error`` as its result."""
        for row in rows:
            if not row.done:
                row.done = True
                self._done(row.req, error)

    def _take(self, step: "_Launched", new: list[int]) -> None:
        """The host has read ``step``'s ids: append them; a stop id or the cap ends the row's turn (a row whose turn
        had ended before the step is skipped: its part of the step was undone by ``_void``). For a prefill's first ids,
        the turns' vision and prefill times end here."""
        if step.prefill is not None:
            t0, t1, started, seen = step.prefill
            t2 = time.perf_counter()
            if started is not None:  # the vision tower's GPU time; the prefill's is the rest of the wall time
                t1 = t0 + min(started.elapsed_time(seen) / 1000, t2 - t0)
            for row in step.rows:
                row.stats.vision_s, row.stats.prefill_s, row.t_decode = t1 - t0, t2 - t1, t2
        for row, tok in zip(step.rows, new):
            if row.done:
                continue
            row.tokens.append(tok)
            if tok in self.stop_ids or len(row.tokens) >= row.req.max_new:
                self.chooser.remove(row.req.slot, torch.tensor([tok]))  # a turn's last id is not in its context
                self._void(row)
                self._finish(row)

    def _launch(self, rows: list[_Row], ahead: set[int]) -> _Launched:
        """One decode step for ``rows``, each fed its newest token (a row whose id() is in ``ahead``, whose newest token
        the host has not read yet, feeds it from the device), its next token chosen and counted on the device; no stream
        sync."""
        ch = self.chooser
        slots = [row.req.slot for row in rows]
        steps = [len(row.tokens) + (id(row) in ahead) for row in rows]
        feed = [None if id(row) in ahead else row.tokens[-1] for row in rows]
        rng = ch.snapshot(slots)
        chosen = self.runner.decode(slots, feed, [row.pos for row in rows], steps)  # counted now; taken back if it ends
        for row in rows:
            row.pos += 1
        return _Launched(rows, chosen, *self._to_host(chosen), rng)

    @staticmethod
    def _to_host(ids: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """A host copy of device ids, started now, and the event after which it is complete (None off CUDA)."""
        if ids.device.type == "cuda":
            host, ready = ids.to("cpu", non_blocking=True), torch.cuda.Event()
            ready.record(torch.cuda.current_stream(ids.device))  # the copy's stream (cuda:N, not the thread's)
            return host, ready
        return ids.clone(), None  # the next step overwrites the runner's ids

    @staticmethod
    def _read(step: _Launched) -> list[int]:
        if step.ready is not None:
            step.ready.synchronize()
        return step.host.tolist()

    def _void(self, row: _Row) -> None:
        """``row``'s turn has ended, but the step in flight fed it once more: give back that cache position,
        the id it chose (counted) and its draw."""
        step = self._launched
        if step is None:
            return
        for i, other in enumerate(step.rows):
            if other is row:
                slot = row.req.slot
                self.runner.cache.retract(slot, 1)
                self.chooser.remove(slot, step.chosen[i:i + 1])
                self.chooser.restore(slot, step.rng[i])
                return

    def _finish(self, row: _Row) -> None:
        row.done = True
        row.stats.decode_s = time.perf_counter() - row.t_decode
        row.stats.new_tokens = len(row.tokens)
        row.stats.context = self.runner.cache.length(row.req.slot)
        self._done(row.req, TurnResult(row.tokens, row.stats))
