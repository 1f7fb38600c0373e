"""Decode steps and a lone row's prefill replayed from CUDA graphs: one launch instead of hundreds.

A decode step (one token for each of rows 0..nb-1, and the choice of the next) has fixed shapes for a given (nb,
attention window), so it is captured once per pair, the first time that pair is needed, and replayed on the runner's
``state`` (the rows' ids, positions, cache positions, steps), which the step advances itself. All graphs share one
memory pool and write their logits into one buffer.
Capture runs the step on the real inputs of the step that needs it (warm-up and capture store the same
keys at the same positions that the replay then stores again), so it can happen mid-stream.
The prefill of one row is captured per (slot, turn length) the same way (``PrefillGraphs``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import torch

from ..errors import first_line

log = logging.getLogger(__name__)


class DecodeGraphs:
    """CUDA graphs of ``ModelRunner.step`` (a decode step with its token choice) keyed by (rows, window, choice);
    optionally torch.compile'd (choice False: ``step_model`` alone, for a batch with a seeded stream). The step reads
    and advances the runner's ``state``, so a caption's steps replay with no input copied in between."""

    def __init__(self, runner, compile: bool = False):
        self.runner = runner
        self.compile = compile
        if compile:
            # compiled on the first warm-up of each batch size
            runner.model.compile(runner.compile_options, runner.one_row_compile_options)
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def run(self, nb: int, window: int, choice: bool = True) -> None:
        """``ModelRunner.step(nb, window)`` from its graph (captured the first time it is needed); ``choice`` False:
        ``step_model`` alone (the caller chooses: a seeded stream's draw)."""
        key = (nb, window, choice)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        self.graphs[key].replay()

    @torch.inference_mode()
    def warm_up(self, buckets) -> float:
        """Compile and capture the step for each batch size in ``buckets`` (at the smallest window) now, before any
        stream runs, so that the first step of a bigger batch does not stall every stream mid-run for the
        compilation (seconds; the suspected cause of a 2.5-s p99 at 24 streams on an H200). Only on an empty cache: the
        steps write a throw-away key at position 0 of rows that hold nothing yet. Returns the seconds it took."""
        t0 = time.perf_counter()
        window = self.runner.windows[0]
        for nb in buckets:
            if (nb, window, True) not in self.graphs:
                self.runner.state[:, :nb].zero_()  # every row sitting out: nothing chosen is counted
                self.graphs[(nb, window, True)] = self._capture(nb, window, True)
        torch.cuda.synchronize(self.runner.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def _capture(self, nb: int, window: int, choice: bool) -> torch.cuda.CUDAGraph:
        try:
            return self._record(nb, window, choice)
        except Exception as e:  # noqa: BLE001 - a compiler problem must not stop captioning
            if not self.compile:
                raise
            log.warning("torch.compile of the decode step failed (%s); decoding without it", first_line(e))
            self.compile = False
            self.runner.model.uncompile()
            self.graphs.clear()
            return self._record(nb, window, choice)

    def _record(self, nb: int, window: int, choice: bool) -> torch.cuda.CUDAGraph:
        """Warm the step up twice and capture it. The warm-up runs advance the rows' state and count their choices,
        so both are put back after each: the replay that follows starts from the step's real inputs (the keys the
        warm-up stored at those positions are stored again)."""
        r = self.runner
        step = r.step if choice else r.step_model
        state, counts = r.state[:, :nb].clone(), r.chooser.counts[:nb].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(nb, window)
                r.state[:, :nb].copy_(state), r.chooser.counts[:nb].copy_(counts)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
            step(nb, window)
        log.debug("captured the decode step for %d rows, window %d (%s)", nb, window,
                  "with its token choice" if choice else "model only")
        return g


class PrefillGraphs:
    """One stream's prefill replayed from a CUDA graph, keyed by (slot, turn length, cuDNN past).

    Alone, one row's prefill is bound by the CPU launching its ≈ 1,300 kernels (H200, 386-token turns at 16k:
    ≈ 40 ms of wall for 18–26 ms of GPU work, ``scripts/profile_turn.py``), and every video turn of a stream at one
    resolution has the same length. So the prefill of a lone row is captured once its (slot, length) has been seen
    twice, and replayed after that with new values in four small inputs. The graph attends with one
    FlashAttention varlen call (key bound = the cache capacity, the used length an input); on Hopper the past's
    whole ``PAST_BLOCK``s go to cuDNN as in the eager prefill (``ModelRunner.prefill_one``). cuDNN plans per
    shape, so that part of the key is the past it reads (a multiple of 2048 keys: a new graph every ≈ 5 s of a
    1080p stream, and the graph of the shorter past is dropped then). If cuDNN cannot be captured, the graphs
    attend with FlashAttention alone from then on (logged once).
    Their activations share the decode graphs' memory pool; each graph keeps its inputs (≈ 3 MB for a 386-token
    turn of the 7B), so at most ``limit`` graphs are kept (least recently used dropped first; default 2 per
    slot, at least 8) and turns longer than ``max_tokens`` stay eager (a long question is rarely asked twice)."""

    def __init__(self, runner, pool, limit: int | None = None, max_tokens: int = 2048):
        self.runner, self.pool, self.max_tokens = runner, pool, max_tokens
        self.limit = limit or max(8, 2 * runner.cache.slots)
        self.graphs: OrderedDict[tuple[int, int, int], tuple] = OrderedDict()
        self.seen: dict[tuple[int, int], int] = {}
        self.enabled = True
        self.cudnn = runner.cudnn_past  # the past's blocks through cuDNN inside the graphs (Hopper)

    def run(self, slot: int, x: torch.Tensor, pos: torch.Tensor, at: torch.Tensor, used: int,
            past: int = 0) -> torch.Tensor | None:
        """Float32 logits (1, V) of the turn's last token, or None if this turn is not (yet) served by a graph
        (then the caller runs the eager prefill). x (T, hidden) the turn's embeddings, pos (3, 1, T) int64 mRoPE
        positions, at (T,) int64 cache positions, ``used`` the row's length after the turn, ``past`` how many of
        the row's first keys go through cuDNN (a multiple of ``runner.PAST_BLOCK``; 0 unless ``self.cudnn``)."""
        T = x.shape[0]
        key = (slot, T, past)
        if key not in self.graphs:
            if not self.enabled or T > self.max_tokens:
                return None
            if len(self.seen) > 4096:  # one-off lengths (questions) must not pile up over hours
                self.seen.clear()
            self.seen[key[:2]] = self.seen.get(key[:2], 0) + 1
            if self.seen[key[:2]] < 2:
                return None
            entry = self._capture(slot, x, pos, at, used, past)
            if entry is None:
                return None
            for old in [k for k in self.graphs if k[:2] == key[:2]]:  # a shorter past: not needed again
                del self.graphs[old]
            while len(self.graphs) >= self.limit:  # a dropped length must be seen twice again to come back
                self.seen[self.graphs.popitem(last=False)[0][:2]] = 0
            self.graphs[key] = entry
        self.graphs.move_to_end(key)
        g, inputs, out = self.graphs[key]
        for buf, value in zip(inputs, (x, pos, at)):
            buf.copy_(value, non_blocking=True)
        inputs[3].fill_(used)
        g.replay()
        return out.clone()

    @torch.inference_mode()
    def _capture(self, slot, x, pos, at, used, past):
        runner = self.runner
        dev, T = x.device, x.shape[0]
        inputs = (x.clone(), pos.clone(), at.clone(), torch.full((1,), used, dtype=torch.int32, device=dev))
        stride = runner.cache.varlen_stride
        fixed = (torch.full((T,), slot, dtype=torch.long, device=dev),
                 torch.tensor([0, T], dtype=torch.int32, device=dev),
                 torch.tensor([slot * stride + past, slot * stride + runner.capacity], dtype=torch.int32, device=dev),
                 torch.arange(T, device=dev))
        out = torch.empty(1, runner.model.vocab, dtype=torch.float32, device=dev)

        def step():
            out.copy_(runner.prefill_one(*inputs, *fixed, slot=slot, past=past))

        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: writes the turn's keys where the replay writes them again
                step()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                step()
        except torch.cuda.OutOfMemoryError:  # no room for this graph now: this turn and the next of its kind eager
            self.seen[(slot, x.shape[0])] = 0
            return None
        except Exception as e:  # noqa: BLE001 - captioning goes on with the eager prefill
            if past:  # cuDNN inside a graph: the graphs attend with FlashAttention alone from now on
                log.warning("capturing cuDNN's attention in the prefill graph failed (%s); the prefill graphs use "
                            "FlashAttention alone", first_line(e))
                self.cudnn = False
                return None
            log.warning("capturing the prefill in a CUDA graph failed (%s); prefill stays eager", first_line(e))
            self.enabled = False
            return None
        log.debug("captured the prefill of slot %d, %d tokens, %d past keys through cuDNN", slot, T, past)
        return g, inputs + fixed, out  # the graph reads ``fixed`` too: kept alive with it
