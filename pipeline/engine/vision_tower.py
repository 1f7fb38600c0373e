"""Qwen2-VL's vision tower run over the checkpoint's own modules, shaped for speed.

Same arithmetic as transformers' forward, but the per-frame attention runs as one batched call
(frames of a clip attend within their own temporal patch, so they are a batch), nothing on the way
asks the GPU for a number, and on CUDA the whole tower is captured in a graph per clip shape. With
``compile`` the small element-wise kernels of each block (the float32 rotary of q and k, the MLP's
activation) are fused by torch.compile: half of the tower's kernel time was in them (H200, 1080p clip:
4.0 of 8.6 ms, ``scripts/profile_turn.py``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..errors import first_line
from .model import rotate_half

log = logging.getLogger(__name__)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding of q and k (N, heads, head_dim) in float32, back in their dtype (transformers' own
    arithmetic); cos/sin (N, 1, head_dim) float32."""
    qf, kf = q.float(), k.float()
    return (qf * cos + rotate_half(qf) * sin).to(q.dtype), (kf * cos + rotate_half(kf) * sin).to(k.dtype)


class VisionTower:
    def __init__(self, visual, use_graphs: bool = False, compile: bool = False):
        self.v = visual
        self.blocks = visual.blocks
        attn = self.blocks[0].attn
        self.heads = attn.num_heads
        self.dim = attn.qkv.in_features
        self.head_dim = self.dim // self.heads
        self.merge = visual.spatial_merge_size
        self.inv_freq = visual.rotary_pos_emb.inv_freq.float()
        self.use_graphs = use_graphs
        self.seen: dict[tuple, int] = {}
        self.graphs: dict[tuple, tuple] = {}
        self._rope: dict[tuple, tuple] = {}
        self.rope_qk, self.act = rope_qk, None  # None: each block's own MLP
        if compile:
            self.compile()

    def compile(self) -> None:
        """torch.compile the rotary and (when every block has the same parameter-free activation) the MLP's
        activation, with a dynamic patch count: one compilation (at the stream's first clip, the opener) serves every
        clip shape after it, so the first 1-s clip does not stall its turn compiling again (H200, static shapes: the first
        bf16 run's turns after the opener took up to 1.4 s)."""
        self.rope_qk = torch.compile(rope_qk, fullgraph=True, dynamic=True)
        if not all(hasattr(b.mlp, n) for b in self.blocks for n in ("fc1", "act", "fc2")):
            return  # an MLP of another shape: each block runs its own
        act = self.blocks[0].mlp.act
        stateless = not isinstance(act, torch.nn.Module) or not list(act.parameters())
        if len({type(b.mlp.act) for b in self.blocks}) == 1 and stateless:
            self.act = torch.compile(act, fullgraph=True, dynamic=True)

    def mlp(self, blk, x: torch.Tensor) -> torch.Tensor:
        """Block ``blk``'s MLP over x (N, dim) -> (N, dim): its own module, or fc1 -> the compiled activation -> fc2."""
        if self.act is None:
            return blk.mlp(x)
        return blk.mlp.fc2(self.act(blk.mlp.fc1(x)))

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].mlp.fc2.weight.dtype

    def rotary(self, grid: tuple[int, int, int]):
        """cos, sin (N, head_dim) float32 for a (t, h, w) patch grid, rows in merge-window order."""
        if grid not in self._rope:
            t, h, w = grid
            m = self.merge
            hpos = torch.arange(h).view(h, 1).expand(h, w)
            wpos = torch.arange(w).view(1, w).expand(h, w)
            order = lambda p: p.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()  # noqa: E731
            pos = torch.stack([order(hpos), order(wpos)], dim=-1).repeat(t, 1).to(self.inv_freq.device)
            freqs = pos[..., None].float() * self.inv_freq  # N, 2, d/4
            f = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
            emb = torch.cat([f, f], dim=-1)
            self._rope[grid] = (emb.cos(), emb.sin())
        return self._rope[grid]

    def forward(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t = grid[0]
        cos, sin = self.rotary(grid)
        cos, sin = cos[:, None], sin[:, None]
        x = self.v.patch_embed(pixels)
        n_all = x.shape[0]
        n = n_all // t
        for blk in self.blocks:
            h = blk.norm1(x)
            q, k, v = blk.attn.qkv(h).reshape(n_all, 3, self.heads, self.head_dim).permute(1, 0, 2, 3).unbind(0)
            q, k = self.rope_qk(q, k, cos, sin)
            # each temporal patch attends within itself: the patches are a batch
            q, k, v = (z.reshape(t, n, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v)
            x = x + blk.attn.proj(o.transpose(1, 2).reshape(n_all, self.dim))
            x = x + self.mlp(blk, blk.norm2(x))
        return self.v.merger(x)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Visual tokens (t·h·w / merge², hidden) in the tower's dtype for ``pixels`` (t·h·w, C·T·P·P) of a
        ``grid`` (t, h, w). If torch.compile fails (no working compiler: e.g. no Triton on Windows, no C++
        compiler), the tower runs uncompiled from then on (logged once) instead of failing the turn."""
        try:
            return self._run(pixels.to(self.dtype), grid)
        except Exception as e:  # noqa: BLE001 - a compiler problem must not stop captioning
            if self.rope_qk is rope_qk:
                raise
            log.warning("torch.compile of the vision tower failed (%s); running it uncompiled", first_line(e))
            self.rope_qk, self.act = rope_qk, None
            self.graphs.clear()
            return self._run(pixels.to(self.dtype), grid)

    def _run(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        if not self.use_graphs:
            return self.forward(pixels, grid)
        key = (grid, pixels.shape)
        self.seen[key] = self.seen.get(key, 0) + 1
        if key not in self.graphs and self.seen[key] >= 2:  # a shape seen twice is worth a graph
            self.graphs[key] = self._capture(pixels, grid)
        if key in self.graphs:
            g, inp, out = self.graphs[key]
            inp.copy_(pixels)
            g.replay()
            return out
        return self.forward(pixels, grid)

    def _capture(self, pixels: torch.Tensor, grid):
        inp = pixels.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward(inp, grid)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):  # other threads may use the GPU meanwhile
            out = self.forward(inp, grid)
        return g, inp, out
