"""The decode step's split-KV attention kernels (pipeline/engine/decode_attention.py), run on the CPU by Triton's
interpreter against float32 attention; on the GPU tests/test_gpu.py runs them in bf16.

The interpreter must be chosen before ``triton`` is first imported (``TRITON_INTERPRET=1``; set later, its
``tl.zeros`` is not patched), so each check runs in a fresh Python with it set (``interpreted``)."""

from __future__ import annotations

import os

import pytest
import torch

from interpret import interpreted as run_interpreted

pytest.importorskip("triton")

H, KV, D = 28, 4, 128  # LiveCC-7B's attention (Qwen2-VL-7B: 28 query heads over 4 KV heads)


def interpreted(check: str, *args) -> None:
    """Run this file's function ``check(*args)`` in a fresh Python under Triton's CPU interpreter."""
    run_interpreted(__file__, check, *args)


def _kernels():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from pipeline.engine import decode_attention as da
    return da


def reference(q, k, v, n):
    """float32 attention of q (H, D) over the first n keys of one row's k/v (KV, L, D)."""
    kk = k[:, :n].float().repeat_interleave(H // KV, 0)
    vv = v[:, :n].float().repeat_interleave(H // KV, 0)
    s = torch.einsum("hd,hld->hl", q.float(), kk) * D ** -0.5
    return torch.einsum("hl,hld->hd", s.softmax(-1), vv)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 5e-4)])
def test_split_kv_attention_equals_attention_over_each_rows_own_keys(dtype, tol):
    # (bfloat16 only on the GPU: the interpreter's dot of bfloat16 tiles is wrong, tests/test_gpu.py checks it)
    interpreted("check_against_float32", dtype, tol)


def check_against_float32(dtype: str, tol: float) -> None:
    # lengths: one key, less than a split, a split's edge, and past several splits; a spare cache row (slot 4)
    da = _kernels()
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    slots, cap, window = 5, 1600, 1536
    k = torch.randn(slots, KV, cap, D, generator=g).to(dtype)
    v = torch.randn(slots, KV, cap, D, generator=g).to(dtype)
    q = torch.randn(4, H, D, generator=g).to(dtype)
    for split in (256, 512):
        used = torch.tensor([1, 200, split, 1500], dtype=torch.int32)
        out = da.decode_attention(q, k, v, used, window, split=split)
        assert out.shape == q.shape and out.dtype == dtype
        for b in range(4):
            err = (out[b].float() - reference(q[b], k[b], v[b], int(used[b]))).abs().max().item()
            assert err < tol, (split, b, int(used[b]), err)


def test_a_rows_output_depends_only_on_its_own_keys():
    # split boundaries at fixed multiples of the split length: alone or in a batch of its size class, in a small
    # or a large window (the CUDA graph buckets), a row gets the same bits
    interpreted("check_row_independence")


def check_row_independence() -> None:
    da = _kernels()
    g = torch.Generator().manual_seed(1)
    k = torch.randn(3, KV, 2048, D, generator=g).half()
    v = torch.randn(3, KV, 2048, D, generator=g).half()
    q = torch.randn(3, H, D, generator=g).half()
    used = torch.tensor([900, 40, 1200], dtype=torch.int32)
    assert da.split_keys(1) == da.split_keys(3)
    together = da.decode_attention(q, k, v, used, 1280)
    alone = da.decode_attention(q[:1], k, v, used[:1], 1024)
    wide = da.decode_attention(q, k, v, used, 2048)
    assert torch.equal(together[0], alone[0])
    assert torch.equal(together, wide)


def test_split_lengths_follow_the_rows():
    from pipeline.engine.decode_attention import split_keys

    assert [split_keys(n) for n in (1, 4, 8, 16, 32, 128)] == [256, 256, 512, 512, 1024, 1024]


def test_shapes_it_cannot_take_are_refused():
    from pipeline.engine import decode_attention as da

    q = torch.zeros(1, 6, 128)
    k = torch.zeros(1, 4, 64, 128)
    with pytest.raises(ValueError, match="multiple of KV"):
        da.decode_attention(q, k, k, torch.ones(1, dtype=torch.int32), 64)
