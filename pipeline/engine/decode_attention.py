"""The decode step's attention on CUDA: split-KV ("flash-decoding") over each row's cache, as two Triton kernels.

One new token a row attends over its cached keys. PyTorch's FlashAttention-2 varlen call (the engine's kernel for
every prefill) reads a row's keys once per *query* head and, at one row, fills few of the GPU's SMs: at 16k keys it
takes 29.7 µs a layer on an H200 where reading the row's K and V takes 8.2 (``docs/performance.md``, sixth pass).
Here each program takes one row, one KV head and one split of ``split_keys(rows)`` keys, with the query heads
that share the KV head as the rows of its tile (Qwen2's grouped-query attention: 28 query heads over 4 KV heads),
so K and V are read once; a second kernel merges the splits by their log-sum-exp. The method is Tri Dao et al.'s
Flash-Decoding (2023, https://crfm.stanford.edu/2023/10/12/flashdecoding.html); a tile of the query heads sharing
a KV head is the approach of the grouped Triton decode kernels of LightLLM and SGLang.

Split boundaries sit at fixed multiples of the split length (``split_keys``: by the number of rows), so a row's
output depends only on its own keys and that length: the same in every attention window (the CUDA graph buckets)
and in every batch of the same size class.

Kernels are built on first use (``triton`` is imported then), so importing this module costs nothing; under
``TRITON_INTERPRET=1`` they run on the CPU (tests/test_decode_attention.py).
"""

from __future__ import annotations

import functools
import math

import torch

BLOCK_N = 64  # keys a loop iteration reads


def split_keys(rows: int) -> int:
    """Keys a program reads for a step of ``rows`` rows: short splits (more programs) when few rows fill the GPU,
    long ones when many rows do. Measured on an H200, one layer of the 7B's attention (µs; FlashAttention-2
    varlen in brackets; ``scripts/profile_attention.py``): 1 row at 4k keys 11.6 / 16.8 / 29.0 for splits of 256 /
    512 / 1024 (17.4); at 16k 20.1 / 21.3 / 30.2 (29.8); 8 rows at 16k 76.8 / 71.6 / 68.4 (87.0); 32 rows at 16k
    265.5 / 248.3 / 239.3 (260.4)."""
    return 256 if rows <= 4 else 512 if rows <= 16 else 1024


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def split_kv(q_ptr, k_ptr, v_ptr, used_ptr, o_ptr, lse_ptr,
                 s_qb, s_qh, s_kb, s_kh, s_kt, s_ob, s_oh, s_os, s_lb, s_lh,
                 scale_log2, KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        bk, s = tl.program_id(0), tl.program_id(1)
        b, kvh = bk // KV, bk % KV
        n = tl.load(used_ptr + b)
        start = s * SPLIT
        if start < n:  # splits past the row's length write nothing: the merge reads only the row's splits
            g = tl.arange(0, BLOCK_H)
            heads = kvh * GROUP + g
            hmask = g < GROUP
            d = tl.arange(0, D)
            q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=hmask[:, None], other=0.0)
            kbase = k_ptr + b * s_kb + kvh * s_kh
            vbase = v_ptr + b * s_kb + kvh * s_kh
            m = tl.full([BLOCK_H], float("-inf"), tl.float32)
            den = tl.zeros([BLOCK_H], tl.float32)
            acc = tl.zeros([BLOCK_H, D], tl.float32)
            end = tl.minimum(start + SPLIT, n)
            for t0 in range(start, end, BLOCK):
                t = t0 + tl.arange(0, BLOCK)
                live = t < end
                k = tl.load(kbase + t[:, None] * s_kt + d[None, :], mask=live[:, None], other=0.0)
                sc = tl.dot(q, tl.trans(k)) * scale_log2  # BLOCK_H, BLOCK, in log2 units
                sc = tl.where(live[None, :], sc, float("-inf"))
                m_new = tl.maximum(m, tl.max(sc, 1))
                p = tl.exp2(sc - m_new[:, None])
                alpha = tl.exp2(m - m_new)
                den = den * alpha + tl.sum(p, 1)
                v = tl.load(vbase + t[:, None] * s_kt + d[None, :], mask=live[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                m = m_new
            o = acc / den[:, None]
            tl.store(o_ptr + b * s_ob + heads[:, None] * s_oh + s * s_os + d[None, :], o, mask=hmask[:, None])
            tl.store(lse_ptr + b * s_lb + heads * s_lh + s, m + tl.log2(den), mask=hmask)

    @triton.jit
    def merge(o_ptr, lse_ptr, used_ptr, out_ptr, s_ob, s_oh, s_os, s_lb, s_lh, s_xb, s_xh,
              H: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr, BLOCK_S: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        n = tl.load(used_ptr + b)
        splits = tl.cdiv(n, SPLIT)
        d = tl.arange(0, D)
        m = tl.full([1], float("-inf"), tl.float32)
        den = tl.zeros([1], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for s0 in range(0, splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            live = s < splits
            lse = tl.load(lse_ptr + b * s_lb + h * s_lh + s, mask=live, other=float("-inf"))
            o = tl.load(o_ptr + b * s_ob + h * s_oh + s[:, None] * s_os + d[None, :], mask=live[:, None], other=0.0)
            m_new = tl.maximum(m, tl.max(lse, 0))
            w = tl.exp2(lse - m_new)
            alpha = tl.exp2(m - m_new)
            den = den * alpha + tl.sum(w, 0)
            acc = acc * alpha + tl.sum(w[:, None] * o, 0)
            m = m_new
        tl.store(out_ptr + b * s_xb + h * s_xh + d, (acc / den).to(out_ptr.dtype.element_ty))

    return triton, split_kv, merge


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: torch.Tensor, window: int,
                     scale: float | None = None, split: int | None = None) -> torch.Tensor:
    """One query a row over the row's first ``used[b]`` cached keys, split-KV.

    q (B, H, D) bf16/fp16 (the step's new token, its key/value already stored); k, v (B', KV, L, D) with B' >= B:
    one layer of the cache (``KVCache.k[layer]``: slots, KV heads, capacity, head_dim; the last dim contiguous);
    used (B,) int32 on q's device, 1 <= used[b] <= window <= L: keys 0 .. used[b] - 1 of row b are read. ``window``
    (a Python int) sizes the grid (splits of ``split`` keys) and the scratch space; rows may use any length up to it,
    so one CUDA graph serves them all. ``scale``: the softmax scale, D ** -0.5 by default (Qwen2's); ``split``: keys a
    program reads, a multiple of ``BLOCK_N`` (default ``split_keys(B)``).
    Returns (B, H, D) in q's dtype. Raises ValueError for shapes it does not take (H not a multiple of KV, D not a
    power of two)."""
    B, H, D = q.shape
    KV = k.shape[1]
    if H % KV or D & (D - 1) or k.stride(-1) != 1 or v.stride() != k.stride():
        raise ValueError(f"decode_attention takes H a multiple of KV and D a power of two, unit-stride K/V "
                         f"laid out alike; got q {tuple(q.shape)}, k {tuple(k.shape)} {k.stride()}")
    triton, split_kv, merge = _kernels()
    q = q.contiguous()
    group = H // KV
    split = split_keys(B) if split is None else split
    splits = triton.cdiv(window, split)
    # scratch rows padded to a multiple of 16: the strides Triton specializes on (divisible by 16 or not) stay the
    # same in every window, so a new window (a new CUDA graph mid-run) never compiles the kernels again (the
    # suspected cause of one 655-ms turn on an H200)
    room = triton.cdiv(splits, 16) * 16
    o = torch.empty(B, H, room, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, room, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    scale = D ** -0.5 if scale is None else scale
    split_kv[(B * KV, splits)](q, k, v, used, o, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                               k.stride(2), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                               scale * math.log2(math.e), KV=KV, GROUP=group,
                               BLOCK_H=max(16, triton.next_power_of_2(group)), D=D, SPLIT=split, BLOCK=BLOCK_N,
                               num_warps=4, num_stages=2)
    merge[(B * H,)](o, lse, used, out, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                    out.stride(0), out.stride(1), H=H, D=D, SPLIT=split, BLOCK_S=16, num_warps=4)
    return out
