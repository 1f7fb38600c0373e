"""Decode steps replayed from CUDA graphs: one launch per step instead of hundreds.

A decode step (one token for each of rows 0..nb-1) has fixed shapes for a given (nb, attention window),
so it is captured once per pair, the first time that pair is needed, and replayed with new values in
four small input tensors. All graphs share one memory pool and write their logits into one buffer.
Capture runs the step on the real inputs of the step that needs it (warm-up and capture store the same
keys at the same positions that the replay then stores again), so it can happen mid-stream.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)


class DecodeGraphs:
    """CUDA graphs of ``ModelRunner.decode_step`` keyed by (rows, window); optionally torch.compile'd."""

    def __init__(self, runner, compile: bool = False):
        self.runner = runner
        self.compile = compile
        if compile:
            runner.model.compile(runner.compile_options)  # compiled on the first warm-up of each batch size
        slots, dev = runner.cache.slots, runner.device
        m = runner.model
        self.x = torch.zeros(slots, m.hidden, dtype=m.dtype, device=dev)  # the tokens' embeddings
        self.pos = torch.zeros(slots, dtype=torch.long, device=dev)
        self.at = torch.zeros(slots, dtype=torch.long, device=dev)
        self.logits = torch.zeros(slots, runner.model.vocab, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def run(self, nb: int, window: int, x: torch.Tensor, pos: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Logits (nb, V) float32 (a view into a buffer the next step overwrites) for embeddings x (nb, hidden) and
        pos, at (nb,) (``ModelRunner.decode_step``)."""
        self.x[:nb].copy_(x, non_blocking=True)
        self.pos[:nb].copy_(pos, non_blocking=True)
        self.at[:nb].copy_(at, non_blocking=True)
        key = (nb, window)
        if key not in self.graphs:
            self.graphs[key] = self._capture(nb, window)
        self.graphs[key].replay()
        return self.logits[:nb]

    @torch.inference_mode()
    def warm_up(self, buckets) -> float:
        """Compile and capture the step for each batch size in ``buckets`` (at the smallest window) now, before any
        stream runs, so that the first step of a bigger batch does not stall every stream mid-run for the
        compilation (seconds; the suspected cause of a 2.5-s p99 at 24 streams on an H200). Only on an empty cache: the steps write a
        throw-away key at position 0 of rows that hold nothing yet. Returns the seconds it took."""
        t0 = time.perf_counter()
        window = self.runner.windows[0]
        for nb in buckets:
            if (nb, window) not in self.graphs:
                self.x[:nb].zero_(), self.pos[:nb].zero_(), self.at[:nb].zero_()
                self.graphs[(nb, window)] = self._capture(nb, window)
        torch.cuda.synchronize(self.runner.device)
        return time.perf_counter() - t0

    def _step(self, nb: int, window: int) -> None:
        out = self.runner.decode_step(self.x[:nb], self.pos[:nb], self.at[:nb], window)
        self.logits[:nb].copy_(out)

    @torch.inference_mode()
    def _capture(self, nb: int, window: int) -> torch.cuda.CUDAGraph:
        try:
            return self._record(nb, window)
        except Exception as e:  # noqa: BLE001 - a compiler problem must not stop captioning
            if not self.compile:
                raise
            log.warning("torch.compile of the decode step failed (%s: %s); decoding without it",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.compile = False
            self.runner.model.uncompile()
            self.graphs.clear()
            return self._record(nb, window)

    def _record(self, nb: int, window: int) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(nb, window)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            self._step(nb, window)
        log.debug("captured the decode step for %d rows, window %d", nb, window)
        return g
