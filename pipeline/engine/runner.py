"""The model runner: vision, prefill and one decode step for many streams, on one device.

- ``encode_video(frames)``: the vision tower over one clip (CUDA graph per clip shape on CUDA).
- ``prefill(slot, ids, positions, vision)``: one stream's new turn onto its cache row; logits of its
  last token. Attention over the row's past plus the new tokens (flash kernels on CUDA, merged by
  log-sum-exp; SDPA with a causal mask elsewhere).
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
WINDOWS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


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
    def encode_video(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Frames (T, H, W, 3) uint8 (T even, H and W multiples of 28) -> visual tokens (T/2·H/28·W/28, hidden)
        in the model dtype, and the merged grid (t, h, w) the positions need."""
        pixels, (gt, gh, gw) = patchify(frames, self.loaded.patches, self.device)
        m = self.loaded.patches.merge
        return self.vision(pixels, (gt, gh, gw)), (gt, gh // m, gw // m)

    # -- prefill --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], positions: torch.Tensor, vision: torch.Tensor | None) -> torch.Tensor:
        """Append ``ids`` (video pads already expanded; ``vision`` fills them in order) at positions
        ``positions`` (3, T) to ``slot``'s cache row. Returns float32 logits (V,) of the last token.

        Raises RuntimeError if the row would pass the cache capacity."""
        m, cache = self.model, self.cache
        start, T = cache.length(slot), len(ids)
        end = start + T
        if end > self.capacity:
            raise RuntimeError(f"context full: {end} tokens > capacity {self.capacity}")
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        x = m.embed_ids(ids_t)[None]
        if vision is not None:
            x[0, ids_t == self.video_token_id] = vision.to(x.dtype)
        mask = None
        if not self.flash_prefill and T > 1:  # causal, offset by the cached tokens; rows repeat per group
            q_idx = torch.arange(start, end, device=self.device)[:, None]
            allowed = torch.arange(end, device=self.device)[None, :] <= q_idx
            width = (end + 7) // 8 * 8  # rows padded to 8 for the fused kernels, then cut back
            mask = torch.full((T, width), float("-inf"), dtype=m.dtype, device=self.device)
            mask[:, :end].masked_fill_(allowed, 0.0)
            mask = mask.repeat(m.n_heads // m.n_kv, 1)[:, :end]

        def attend(i, q, k, v):
            cache.prefill_write(i, slot, start, k, v)
            if self.flash_prefill and T > 1:
                kp, vp = cache.row(i, slot, start)
                return m.attend_flash(q, k, v, kp, vp)
            kr, vr = cache.row(i, slot, end)
            return m.attend_masked(q, kr, vr, mask)

        h = m.forward(x, positions.to(self.device)[:, None, :], attend)
        cache.advance(slot, T)
        return m.logits(h[0, -1])

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
        mask = (torch.arange(window, device=tok.device)[None, :] <= at[:, None])[:, None, None, :]

        def attend(i, q, k, v):
            cache.decode_write(i, rows, at, k, v)
            kw, vw = cache.window(i, nb, window)
            return m.attend_rows(q, kw, vw, mask)

        h = m.forward(x, pos.expand(3, nb)[:, :, None], attend, m.pre, m.post)
        return m.logits(h[:, 0])

    # -- context edits ---------------------------------------------------------------------------------------
    def evict(self, slot: int, start: int, end: int, shift: int) -> None:
        self.cache.evict(slot, start, end, shift, self.model.inv_freq)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
