"""Decode steps replayed from CUDA graphs: one launch per token instead of hundreds.

The decode step (one token onto the cache) has the same shapes every time, so it is captured once
per attention window (the smallest window that holds the context is used) and replayed with new
values in three small input tensors. On CPU the same fixed-shape step runs eagerly, which is how the
tests check that it computes what the plain step computes.
"""

from __future__ import annotations

import logging

import torch

from .decoder import TextDecoder

log = logging.getLogger(__name__)

WINDOWS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class StaticDecode:
    def __init__(self, decoder: TextDecoder, use_graphs: bool | None = None, compile: bool = False):
        self.dec = decoder
        if compile:
            decoder.compile()  # compiled on the first (warm-up) call, before capture
        dev = decoder.device
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(3, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        cap = decoder.cache.capacity
        self.windows = sorted({w for w in WINDOWS if w < cap} | {cap})
        self.use_graphs = dev.type == "cuda" if use_graphs is None else use_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if self.use_graphs:
            try:
                self._capture_all()
            except Exception as e:  # noqa: BLE001 - a compiler problem must not stop captioning
                if not compile:
                    raise
                log.warning("torch.compile of the decode step failed (%s: %s); decoding without it",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                decoder.uncompile()
                self.graphs.clear()
                self.outputs.clear()
                self._capture_all()

    def window_for(self, slot: int) -> int:
        for w in self.windows:
            if slot < w:
                return w
        raise RuntimeError(f"slot {slot} past the cache capacity {self.dec.cache.capacity}")

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Capture one graph per window. Runs while the cache is empty: the warm-up writes slot 0."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for w in self.windows:
                for _ in range(2):
                    self.dec.decode_static(self.tok, self.pos, self.slot, w)
        torch.cuda.current_stream().wait_stream(stream)
        for w in self.windows:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.outputs[w] = self.dec.decode_static(self.tok, self.pos, self.slot, w)
            self.graphs[w] = g
        torch.cuda.synchronize()

    def __call__(self, tok: int, pos: int, slot: int) -> torch.Tensor:
        """Logits (V,) after feeding ``tok`` at position ``pos`` into cache slot ``slot``."""
        self.tok.fill_(tok)
        self.pos.fill_(pos)
        self.slot.fill_(slot)
        w = self.window_for(slot)
        if self.use_graphs:
            self.graphs[w].replay()
            return self.outputs[w]
        return self.dec.decode_static(self.tok, self.pos, self.slot, w)
