"""The model runner: vision, prefill and one decode step for many streams, on one device.

- ``encode_videos(clips)``: the vision tower over several clips (same-size clips in one call; a CUDA
  graph per shape on CUDA).
- ``prefill(turns)``: several streams' new turns onto their cache rows in one pass over the weights;
  logits of each turn's last token. Attention per row over the row's past plus its new tokens (flash
  kernels on CUDA, merged by log-sum-exp; SDPA with a causal mask elsewhere).
- ``decode(slots, tokens, positions)``: one token for each of B streams in one pass over the weights.
  The step always covers cache rows 0..nb-1 (nb = a batch-size bucket holding the highest slot), so
  its shapes depend only on (nb, attention window) and it is captured as a CUDA graph per pair
  (``cuda_graphs.py``). Rows not in the step compute a throw-away token: they write at their own
  first free position, which their next prefill or decode overwrites, and their output is ignored.

Only the engine thread calls a runner.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache
from .model import TextModel
from .vision import patchify
from .vision_tower import VisionTower

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# attention windows of a decode step: every row reads this many cache positions, so the steps are fine
# (2048) rather than powers of two (at 32 rows and 16.4k tokens, a 32k window doubled the step's time)
WINDOWS = (1024,) + tuple(range(2048, 131072 + 1, 2048))


def bucket(n: int, sizes: tuple[int, ...], cap: int) -> int:
    """The smallest size >= n (sizes above ``cap`` count as ``cap``)."""
    for s in sizes:
        if s >= n:
            return min(s, cap)
    return cap


class ModelRunner:
    """Weights (``TextModel``), the KV cache (``slots`` rows of ``capacity`` tokens), the vision tower, and
    the decode-step graphs of one loaded checkpoint on its device."""

    def __init__(self, loaded, slots: int, capacity: int, graphs: bool | None = None, compile: bool | None = None):
        self.loaded = loaded
        self.device = loaded.device
        on_cuda = self.device.type == "cuda"
        self.model = TextModel(loaded.hf)
        m = self.model
        self.cache = KVCache(m.n_layers, slots, m.n_kv, m.head_dim, capacity, m.dtype, self.device)
        # a row sitting out a decode step writes at its length, which a turn always leaves < capacity
        self.capacity = capacity
        self.use_graphs = on_cuda if graphs is None else graphs and on_cuda
        self.vision = VisionTower(loaded.visual, use_graphs=self.use_graphs)
        self.flash_prefill = on_cuda and m.dtype in (torch.bfloat16, torch.float16)
        self.video_token_id = loaded.video_token_id
        compile_ = (compile if compile is not None else self.use_graphs) and on_cuda
        self.graphs = DecodeGraphs(self, compile=compile_) if self.use_graphs else None
        self.windows = tuple(sorted({w for w in WINDOWS if w < capacity} | {capacity}))

    # -- vision ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_videos(self, clips: list[np.ndarray]) -> list[torch.Tensor]:
        """Visual tokens for each clip (T, H, W, 3) uint8 (T even, H and W multiples of 28): a list of
        (T/2·H/28·W/28, hidden) in the model dtype. Clips of one frame size go through the tower together
        (each temporal patch attends only within itself, so stacking clips along time changes nothing)."""
        out: list[torch.Tensor | None] = [None] * len(clips)
        groups: dict[tuple, list[int]] = {}
        for i, frames in enumerate(clips):
            groups.setdefault(frames.shape[1:], []).append(i)
        for idx in groups.values():
            frames = np.concatenate([clips[i] for i in idx]) if len(idx) > 1 else clips[idx[0]]
            pixels, grid = patchify(frames, self.loaded.patches, self.device)
            tokens = self.vision(pixels, grid)
            sizes = [len(clips[i]) // self.loaded.patches.temporal * grid[1] * grid[2]
                     // self.loaded.patches.merge ** 2 for i in idx]
            for i, part in zip(idx, tokens.split(sizes)):
                out[i] = part
        return out  # type: ignore[return-value]

    # -- prefill --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, turns: list[tuple[int, list[int], torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """New turns of several streams onto their cache rows, in one pass over the weights.

        Each turn is (slot, ids, positions (3, T), vision or None): ``ids`` with video pads expanded, which
        ``vision`` fills in order. Rows are padded to the longest turn (pads compute, are never attended
        to, and are not stored). Attention runs per row: over the row's cached past and,
        causally, its new tokens. Returns float32 logits (B, V) of each turn's last token.

        Raises RuntimeError if a row would pass the cache capacity."""
        m, cache, dev = self.model, self.cache, self.device
        B, T = len(turns), max(len(t[1]) for t in turns)
        starts, lens = [cache.length(t[0]) for t in turns], [len(t[1]) for t in turns]
        for start, n in zip(starts, lens):
            if start + n > self.capacity:
                raise RuntimeError(f"context full: {start + n} tokens > capacity {self.capacity}")
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(3, B, T, dtype=torch.long)
        for b, (_, row_ids, row_pos, _) in enumerate(turns):
            ids[b, :lens[b]] = torch.tensor(row_ids, dtype=torch.long)
            pos[:, b, :lens[b]] = row_pos
            pos[:, b, lens[b]:] = row_pos[:, -1:]
        ids = ids.to(dev)
        x = m.embed_ids(ids)
        for b, (_, _, _, vision) in enumerate(turns):
            if vision is not None:
                x[b, ids[b] == self.video_token_id] = vision.to(x.dtype)
        masks = [None if self.flash_prefill else self._causal_mask(start, n) for start, n in zip(starts, lens)]

        def attend(i, q, k, v):
            o = q.new_zeros(B, T, m.n_heads, m.head_dim)
            for b, (slot, _, _, _) in enumerate(turns):
                start, n = starts[b], lens[b]
                qb, kb, vb = q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n]
                cache.prefill_write(i, slot, start, kb, vb)
                if self.flash_prefill:
                    kp, vp = cache.row(i, slot, start)
                    o[b, :n] = m.attend_flash(qb, kb, vb, kp, vp)[0]
                else:
                    kr, vr = cache.row(i, slot, start + n)
                    o[b, :n] = m.attend_masked(qb, kr, vr, masks[b])[0]
            return o

        h = m.forward(x, pos.to(dev), attend)
        for (slot, _, _, _), n in zip(turns, lens):
            cache.advance(slot, n)
        return m.logits(h[torch.arange(B, device=dev), torch.tensor(lens, device=dev) - 1])

    def _causal_mask(self, start: int, n: int) -> torch.Tensor | None:
        """Additive mask (g·n, start+n) for the masked kernel: causal, offset by the cached tokens, rows
        repeated per query head of a group."""
        if n <= 1:
            return None
        m, end = self.model, start + n
        allowed = torch.arange(end, device=self.device)[None, :] <= torch.arange(start, end, device=self.device)[:, None]
        width = (end + 7) // 8 * 8  # rows padded to 8 for the fused kernels, then cut back
        mask = torch.full((n, width), float("-inf"), dtype=m.dtype, device=self.device)
        mask[:, :end].masked_fill_(allowed, 0.0)
        return mask.repeat(m.n_heads // m.n_kv, 1)[:, :end]

    # -- decode ---------------------------------------------------------------------------------------------
    def decode_shape(self, slots: list[int]) -> tuple[int, int]:
        """(rows, window) of the step that serves ``slots``: the batch bucket holding the highest slot, and the
        attention window holding the longest of their contexts after this token."""
        nb = bucket(max(slots) + 1, BATCH_BUCKETS, self.cache.slots)
        longest = max(self.cache.length(s) for s in slots) + 1
        return nb, bucket(longest, self.windows, self.windows[-1])

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Feed ``tokens[b]`` (device int64, (B,)) at 1-D position ``positions[b]`` into slot ``slots[b]``'s
        next cache position. Returns float32 logits (B, V) in the order of ``slots``; each row advances by one."""
        nb, window = self.decode_shape(slots)
        lengths = self.cache.lengths
        tok = torch.zeros(nb, dtype=torch.long, device=self.device)
        pos = torch.zeros(nb, dtype=torch.long)
        at = torch.tensor(lengths[:nb], dtype=torch.long)
        rows = torch.tensor(slots, dtype=torch.long)
        tok[rows.to(self.device)] = tokens
        pos[rows] = torch.tensor(positions, dtype=torch.long)
        if self.graphs is not None:
            logits = self.graphs.run(nb, window, tok, pos, at)
        else:
            logits = self.decode_step(tok, pos.to(self.device), at.to(self.device), window)
        for s in slots:
            self.cache.advance(s, 1)
        return logits.index_select(0, rows.to(self.device))

    def decode_step(self, tok: torch.Tensor, pos: torch.Tensor, at: torch.Tensor, window: int) -> torch.Tensor:
        """The fixed-shape decode step CUDA graphs capture: rows 0..nb-1 (nb = tok.shape[0]), one token each.
        tok (nb,), pos (nb,) 1-D positions, at (nb,) cache positions; attention over the first ``window``
        positions of each row, masked after ``at``. Returns float32 logits (nb, V)."""
        m, cache = self.model, self.cache
        nb = tok.shape[0]
        rows = torch.arange(nb, device=tok.device)
        x = m.embed(tok)[:, None]  # nb, 1, hidden
        masked = (torch.arange(window, device=tok.device)[None, :] > at[:, None])[:, None, None, :]

        def attend(i, q, k, v):
            cache.decode_write(i, rows, at, k, v)
            kw, vw = cache.window(i, nb, window)
            return m.attend_rows(q, kw, vw, masked)

        h = m.forward(x, pos.expand(3, nb)[:, :, None], attend, m.pre, m.post)
        return m.logits(h[:, 0])

    # -- context edits ---------------------------------------------------------------------------------------
    def evict(self, slot: int, start: int, end: int, shift: int) -> None:
        self.cache.evict(slot, start, end, shift, self.model.inv_freq)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
