"""engine.quantize=int4's own format and kernel (pipeline/engine/int4.py) on the CPU: the layout, the one-row Triton
kernel under Triton's interpreter against the dequantized weight, and the tiny model with int4 weights through the
engine (several rows: the dequantized path). On CUDA tests/test_gpu.py runs the kernel compiled, in the engine's
CUDA graphs, and the 7B's shapes.

The interpreter must be chosen before ``triton`` is first imported, so the kernel checks run in a fresh Python
with ``TRITON_INTERPRET=1`` (tests/interpret.py)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from interpret import interpreted as run_interpreted
from pipeline.engine import int4
from pipeline.engine import lowbit
from pipeline.engine.int4 import Int4Weight
from pipeline.engine.lowbit import LowBitLinear

pytestmark = pytest.mark.timeout(600)


def interpreted(check: str, *args) -> None:
    """Run this file's function ``check(*args)`` in a fresh Python under Triton's CPU interpreter."""
    run_interpreted(__file__, check, *args)


def test_layout_round_trips_and_quantization_error():
    torch.manual_seed(0)
    w = torch.randn(192, 512) * 0.02
    w[3, :128] = 0.0  # a group of zeros: the range holds 0, so zeros stay exact
    codes, scale, zero = int4.quantize(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scale.shape == zero.shape == (192, 4) and torch.equal(zero, zero.round())
    packed = int4.pack(codes)
    assert packed.shape == (192, 64) and packed.dtype == torch.int32
    assert torch.equal(int4.unpack(packed), codes)
    # the documented word layout: word j, nibble i holds column 128·(j // 16) + 16·i + j % 16
    j, i = 21, 5
    assert (int(packed[7, j]) >> (4 * i)) & 15 == int(codes[7, 128 * (j // 16) + 16 * i + j % 16])
    tiled = int4.tile(packed, 64, 2)
    assert tiled.shape == (3, 2, 64, 32) and torch.equal(int4.untile(tiled), packed)
    assert torch.equal(tiled[1, 1, 5], packed[64 + 5, 32:64])  # rows 64.., groups 2..3 are one block
    wd = int4.dequantize(packed, scale, zero, torch.float32)
    assert torch.equal(wd[3, :128], torch.zeros(128))
    err = ((wd - w).norm() / w.norm()).item()
    assert err < 0.12, err  # 4 bits min-max a group of 128 normal weights: ≈ 0.10
    with pytest.raises(ValueError, match="not a multiple"):
        int4.quantize(torch.randn(4, 100))


def test_weight_module_keeps_shape_and_dequantizes_in_blocks_of_rows():
    torch.manual_seed(1)
    w = torch.randn(128, 384)
    whole = Int4Weight.from_float(w)
    blocks = Int4Weight.from_float(w, rows_at_once=48)  # 48 does not divide 128: a short last block
    assert whole.shape == (128, 384) and whole.tiled is False  # 3 groups: not a multiple of 2, plain layout
    assert torch.equal(whole.dequantize(), blocks.dequantize())
    assert Int4Weight.from_float(torch.randn(128, 512)).tiled  # 64 | N and 2 | groups: tiled
    x = torch.randn(5, 384)
    assert torch.allclose(whole.linear(x), x @ whole.dequantize(torch.float32).T, atol=1e-4)
    lin = LowBitLinear(whole, torch.ones(128))
    assert torch.allclose(lin(x), x @ whole.dequantize(torch.float32).T + 1, atol=1e-4)


def test_several_rows_dequantize_a_block_of_rows_at_a_time(monkeypatch):
    """Rows beyond the one-row kernel's take F.linear over a dequantized block of whole tiles of rows at a time (so
    an 8-GB card never holds a bfloat16 lm_head besides its 4-bit one): the same product as the whole matrix."""
    torch.manual_seed(2)
    w = Int4Weight.from_float(torch.randn(320, 256), rows_at_once=128)  # tiled: 5 tiles of 64 rows
    assert w.tiled
    x, bias = torch.randn(2, 7, 256), torch.randn(320)
    whole = w.linear(x, bias)
    monkeypatch.setattr(lowbit, "DEQUANT_WEIGHTS", 128 * 256)  # 2 tiles of rows a block: blocks of 128, 128, 64
    seen, dequantize = [], int4.dequantize
    monkeypatch.setattr(int4, "dequantize", lambda packed, *a: seen.append(packed.shape[0]) or dequantize(packed, *a))
    blocks = w.linear(x, bias)
    assert seen == [128, 128, 64], seen  # never the whole matrix at once
    assert blocks.shape == (2, 7, 320) and torch.allclose(blocks, whole, atol=1e-5)
    assert torch.equal(w.dequantize(start=64, stop=192), w.dequantize()[64:192])


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_several_rows_compile_with_a_dynamic_row_count(monkeypatch, fmt):
    """The compiled prefill traces ``linear`` with a dynamic token count, through the blocks of dequantized rows
    (``slice.indices`` there was not traceable by torch 2.11's dynamo, the lent GPU's: the prefill fell back to
    eager on the H200, 140 ms a turn; torch 2.14 here traces it, so the GPU test checks the engine itself)."""
    import torch._dynamo

    from pipeline.engine.fp8 import Fp8Weight

    torch.manual_seed(3)
    w = {"int4": Int4Weight, "fp8": Fp8Weight}[fmt].from_float(torch.randn(320, 256), rows_at_once=128)
    monkeypatch.setattr(lowbit, "DEQUANT_WEIGHTS", 128 * 256)  # blocks of 128, 128, 64 rows: the concatenation
    torch._dynamo.reset()
    lin = torch.compile(lambda x, w: w.linear(x), fullgraph=True, dynamic=True)
    for t in (7, 9):
        x = torch.randn(1, t, 256)
        assert torch.allclose(lin(x, w), x @ w.dequantize(torch.float32).T, atol=1e-3)
    torch._dynamo.reset()


def test_the_kernel_refuses_a_tiled_config_that_does_not_fit():
    """A tiled layout read with a config whose tiles differ would give wrong sums silently: refused before launch."""
    pytest.importorskip("triton")
    w = Int4Weight.from_float(torch.randn(64, 768))  # tiled: 6 groups, 2 an iteration
    xf = torch.randn(1, 768)
    with pytest.raises(ValueError, match="needs whole tiles"):  # 3 groups a program: not whole iterations
        int4.launch(xf, xf.view(6, 128).sum(-1), w.packed, w.scale, w.zero, torch.empty(2, 64), (64, 2, 3, 4, 1),
                    tiled=True)
    with pytest.raises(ValueError, match="do not fit"):  # the plain layout's shape expected
        int4.launch(xf, xf.view(6, 128).sum(-1), w.packed, w.scale, w.zero, torch.empty(2, 64), (16, 1, 4, 4, 1))


def _kernel_matches(n: int, k: int, tiled: bool, dtype: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from pipeline.engine import int4 as m
    torch.manual_seed(n + k)
    w = m.Int4Weight.from_float(torch.randn(n, k) * 0.02)
    assert w.tiled == tiled, (w.tiled, tiled)
    want_w = w.dequantize(torch.float32)
    for config in (w.config, (8, 2, 2, 4, 1), (16, 1, 3, 4, 1)):  # the chosen one; masked tails of rows / groups
        if w.tiled and config != w.config:
            continue
        x = torch.randn(1, k).to(getattr(torch, dtype))
        y = m.gemv(x, w.packed, w.scale, w.zero, config, w.tiled)
        want = x.float() @ want_w.T
        assert y.dtype == x.dtype and y.shape == (1, n)
        err = ((y.float() - want).norm() / want.norm()).item()
        assert err < (1e-5 if dtype == "float32" else 1e-2), (config, err)
    zero_x = m.gemv(torch.zeros(1, k), w.packed, w.scale, w.zero, w.config, w.tiled)
    assert torch.equal(zero_x, torch.zeros(1, n))


@pytest.mark.parametrize("n,k,tiled,dtype", [(128, 512, True, "float32"), (40, 384, False, "float32"),
                                             (64, 256, True, "bfloat16")])
def test_one_row_kernel_equals_the_dequantized_product(n, k, tiled, dtype):
    pytest.importorskip("triton")
    interpreted("_kernel_matches", n, k, tiled, dtype)


def _rows_kernel_matches(n: int, k: int, tiled: bool, dtype: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from pipeline.engine import int4 as m
    torch.manual_seed(n + k + 1)
    w = m.Int4Weight.from_float(torch.randn(n, k) * 0.02)
    assert w.tiled == tiled, (w.tiled, tiled)
    want_w = w.dequantize(torch.float32)
    # 2 rows (one 16-row block, mostly masked), 17 (32), 64 (the most a call); the chosen config, a short last part
    # of groups, masked tails of weight rows (untiled)
    for config in (w.config, w.config[:2] + (w.config[1],) + w.config[3:], (16, 1, 3, 4, 1), (32, 2, 6, 4, 1)):
        if w.tiled and config[:2] != w.config[:2]:
            continue
        for rows in (2, 17, m.BATCH_ROWS):
            x = torch.randn(rows, k).to(getattr(torch, dtype))
            y = m.gemv(x, w.packed, w.scale, w.zero, config, w.tiled)
            want = x.float() @ want_w.T
            assert y.dtype == x.dtype and y.shape == (rows, n)
            err = ((y.float() - want).norm() / want.norm()).item()
            # float32: the groups' sums of x·(128 + q) less (128 + zero)·sum x cancel ≈ 7 of float32's 24 bits
            assert err < (5e-5 if dtype == "float32" else 2e-3), (config, rows, err)
    with pytest.raises(ValueError, match=f"at most {m.BATCH_ROWS} rows"):
        m.gemv(torch.randn(m.BATCH_ROWS + 1, k), w.packed, w.scale, w.zero, w.config, w.tiled)
    # compiled whole (the custom operator's fake gives inductor the parts' shape (parts, M, N))
    compiled = torch.compile(lambda x: m.gemv(x, w.packed, w.scale, w.zero, w.config, w.tiled) * 2, fullgraph=True)
    x = torch.randn(5, k).to(getattr(torch, dtype))
    want = m.gemv(x, w.packed, w.scale, w.zero, w.config, w.tiled)
    assert torch.allclose(compiled(x) / 2, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n,k,tiled,dtype", [(128, 768, True, "float32"), (40, 640, False, "float32"),
                                             (64, 512, True, "float16")])
def test_several_rows_kernel_equals_the_dequantized_product(n, k, tiled, dtype):
    """The several-rows kernel (a batched decode step: codes into bfloat16's mantissa, ``tl.dot``, each group's
    zero point and scale after). bfloat16 activations are for the GPU test: Triton 3.8's interpreter multiplies
    bfloat16 tensors wrongly (tests/test_fp8.py)."""
    pytest.importorskip("triton")
    interpreted("_rows_kernel_matches", n, k, tiled, dtype)


def test_int4_weights_through_the_engine_on_cpu():
    """The tiny model with every linear weight of its language model in int4 (the CPU takes the dequantized path;
    ``check`` keeps int4 to CUDA for users, where the one-row kernel runs): the engine's layers see Int4Weights,
    the weights shrink, and greedy decoding stays close to float32's."""
    from pipeline.engine import load_model
    from pipeline.engine.model import language_parts
    from pipeline.engine.quantize import decode_agreement, to_device, weight_bytes
    from pipeline.engine.runner import ModelRunner
    from pipeline.fixtures.tiny import tiny_checkpoint

    ckpt = str(tiny_checkpoint("small"))
    ref, q = load_model(ckpt, device="cpu"), load_model(ckpt, device="cpu")
    to_device(q.hf, torch.device("cpu"), "int4")
    text, head = language_parts(q.hf)
    assert isinstance(head, LowBitLinear) and isinstance(text.layers[0].self_attn.o_proj, LowBitLinear)
    runner = ModelRunner(q, slots=1, capacity=1024)
    layer = runner.model.layers[0]
    assert all(isinstance(w, Int4Weight) for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w))
    rtext, rhead = language_parts(ref.hf)
    linear = sum(m.weight.numel() * m.weight.element_size() for layer in rtext.layers
                 for m in (*layer.self_attn.children(), *layer.mlp.children()) if hasattr(m, "weight"))
    linear += rhead.weight.numel() * rhead.weight.element_size()
    # float32 -> 4 bits + a bfloat16 scale and zero per 128: 87 % of the linear weights' bytes are gone
    assert weight_bytes(q.hf) <= weight_bytes(ref.hf) - 0.85 * linear
    random.seed(0)
    prompt = [random.randrange(4000) for _ in range(64)]
    got = decode_agreement(ModelRunner(ref, slots=1, capacity=1024), runner, prompt, steps=50)
    print(got)
    assert got["cosine_mean"] > 0.75 and got["argmax_agree"] > 0.1  # hidden 128: one group a row, near ties
