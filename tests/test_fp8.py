"""engine.quantize=fp8's own layout and kernel (pipeline/engine/fp8.py) on the CPU: the layout, the quantization,
the one-row Triton kernel under Triton's interpreter (its plain-Triton conversion; on CUDA the inline PTX one runs,
tests/test_gpu.py) against the dequantized weight, and the tiny model with fp8 weights through the engine (several
rows: the dequantized path).

The interpreter must be chosen before ``triton`` is first imported, so the kernel checks run in a fresh Python
with ``TRITON_INTERPRET=1`` (tests/interpret.py)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from interpret import interpreted
from pipeline.engine import fp8, lowbit
from pipeline.engine.fp8 import Fp8Weight
from pipeline.engine.lowbit import LowBitLinear

pytestmark = pytest.mark.timeout(600)


def test_layout_round_trips_and_quantization_error():
    torch.manual_seed(0)
    w = torch.randn(192, 512) * 0.02
    w[3] = 0.0  # a row of zeros: codes of 0 and a tiny scale, never 0/0 (torchao's scale of 0 gave NaN)
    w[5, 7] = 3.0  # an outlier: the row's scale is its amax / 448, exactly representable at the top
    codes, scale = fp8.quantize(w)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (192,) and scale.dtype == torch.float32
    assert torch.isfinite(codes.float()).all() and float(codes[5, 7].float()) == 448.0
    packed = fp8.pack(codes)
    assert packed.shape == (192, 128) and packed.dtype == torch.int32
    assert torch.equal(fp8.unpack(packed).view(torch.uint8), codes.view(torch.uint8))
    # the documented word layout: word j, byte i holds column 64·(j // 16) + 16·i + j % 16
    j, i = 21, 2
    byte = (int(packed[7, j]) >> (8 * i)) & 0xFF
    assert byte == int(codes[7, 64 * (j // 16) + 16 * i + j % 16].view(torch.uint8))
    wd = fp8.dequantize(packed, scale, torch.float32)
    assert torch.equal(wd[3], torch.zeros(512)) and float(wd[5, 7]) == pytest.approx(3.0)
    err = ((wd - w).norm() / w.norm()).item()
    assert err < 0.035, err  # E4M3: 3 mantissa bits, ≈ 2.6 % on normal weights
    with pytest.raises(ValueError, match="not a multiple"):
        fp8.pack(fp8.quantize(torch.randn(4, 100))[0])


def test_weight_module_quantizes_in_blocks_and_dequantizes_rows():
    torch.manual_seed(1)
    w = torch.randn(100, 320)  # 100 rows: not whole tiles of 64, the plain layout
    whole, blocks = Fp8Weight.from_float(w), Fp8Weight.from_float(w, rows_at_once=48)
    assert whole.shape == (100, 320) and not whole.tiled and whole.dtype == torch.bfloat16
    assert torch.equal(whole.dequantize(torch.float32), blocks.dequantize(torch.float32))
    tiled = Fp8Weight.from_float(torch.randn(192, 256), rows_at_once=64)
    assert tiled.tiled and tiled.packed.shape == (3, 4, 64, 16)  # (N/64, G/1, 64 rows, 1 group x 16 words)
    assert torch.equal(tiled.dequantize(start=64, stop=192), tiled.dequantize()[64:192])
    x = torch.randn(5, 320)
    assert torch.allclose(whole.linear(x), x @ whole.dequantize(torch.float32).T, atol=1e-3)
    lin = LowBitLinear(whole, torch.ones(100))
    assert torch.allclose(lin(x), x @ whole.dequantize(torch.float32).T + 1, atol=1e-3)


def test_several_rows_dequantize_a_block_of_rows_at_a_time(monkeypatch):
    torch.manual_seed(2)
    w = Fp8Weight.from_float(torch.randn(320, 256), rows_at_once=128)  # tiled: 5 tiles of 64 rows
    x, bias = torch.randn(2, 7, 256), torch.randn(320)
    whole = w.linear(x, bias)
    monkeypatch.setattr(lowbit, "DEQUANT_WEIGHTS", 128 * 256)  # 2 tiles of rows a block: 128, 128, 64
    seen, dequantize = [], fp8.dequantize
    monkeypatch.setattr(fp8, "dequantize", lambda packed, *a: seen.append(packed.shape[0]) or dequantize(packed, *a))
    blocks = w.linear(x, bias)
    assert seen == [128, 128, 64], seen
    assert blocks.shape == (2, 7, 320) and torch.allclose(blocks, whole, atol=1e-4)


def test_a_weight_with_nan_or_inf_is_refused_at_quantization():
    """A NaN or an infinity makes a row's scale non-finite and every output of that row NaN on every call: refused
    when the weight is quantized (loading), with the rows named."""
    from pipeline.engine.int4 import Int4Weight

    for cls in (Fp8Weight, Int4Weight):
        for bad in (float("nan"), float("inf")):
            w = torch.randn(64, 256)
            w[9, 5] = bad
            with pytest.raises(ValueError, match="NaN or infinite values in rows 0..64"):
                cls.from_float(w)


def test_a_damaged_checkpoint_is_one_line_at_load(tmp_path, monkeypatch):
    """A checkpoint with a NaN in a weight loaded with quantize=fp8: ModelLoadError naming the matrix, not a traceback
    and not a model that answers NaN (``check`` is let through here: fp8 is for CUDA 8.9+; the quantization itself
    runs on the CPU)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeline.engine import ModelLoadError, load_model
    from pipeline.engine import quantize as quantization
    from pipeline.fixtures.tiny import tiny_checkpoint

    ckpt = tmp_path / "damaged"
    shutil.copytree(tiny_checkpoint("small"), ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    name = next(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))
    tensors[name][3, 7] = float("nan")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(quantization, "check", lambda *a: None)
    with pytest.raises(ModelLoadError, match=r"quantize=fp8: a \(\d+, \d+\) weight holds NaN or infinite values") as e:
        load_model(str(ckpt), device="cpu", quantize="fp8")
    assert "\n" not in str(e.value)


def test_the_kernel_refuses_a_config_that_does_not_fit():
    pytest.importorskip("triton")
    w = Fp8Weight.from_float(torch.randn(64, 384))  # tiled (64, 1, 4, 4, 1): 6 groups of 64
    assert w.tiled and w.config == fp8.SMALL_CONFIG
    xf = torch.randn(1, 384)
    with pytest.raises(ValueError, match="needs whole tiles"):
        fp8.launch(xf, w.packed, w.scale, torch.empty(2, 64), (64, 4, 4, 4, 1), tiled=True)  # 4 groups a tile: 6
    with pytest.raises(ValueError, match="do not fit"):
        fp8.launch(xf, w.packed, w.scale, torch.empty(2, 64), (16, 1, 4, 4, 1))


def _kernel_matches(n: int, k: int, tiled: bool, dtype: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from pipeline.engine import fp8 as m
    torch.manual_seed(n + k)
    w = m.Fp8Weight.from_float(torch.randn(n, k) * 0.02)
    assert w.tiled == tiled, (w.tiled, tiled)
    want_w = w.dequantize(torch.float32)
    # the chosen one; masked tails of rows / groups; one part (no sums of parts: the output in x's dtype)
    for config in (w.config, (8, 2, 2, 4, 1), (16, 1, 3, 4, 1), (16, 2, 0, 4, 1), w.config[:2] + (0,) + w.config[3:]):
        if w.tiled and config[:2] != w.config[:2]:
            continue
        x = torch.randn(1, k).to(getattr(torch, dtype))
        y = m.gemv(x, w.packed, w.scale, config, w.tiled)
        want = x.float() @ want_w.T
        assert y.dtype == x.dtype and y.shape == (1, n)
        err = ((y.float() - want).norm() / want.norm()).item()
        assert err < (1e-5 if dtype == "float32" else 1e-2), (config, err)
    assert torch.equal(m.gemv(torch.zeros(1, k), w.packed, w.scale, w.config, w.tiled), torch.zeros(1, n))


@pytest.mark.parametrize("n,k,tiled,dtype", [(128, 512, True, "float32"), (40, 448, False, "float32"),
                                             (64, 256, True, "bfloat16"),
                                             (64, 384, True, "float32")])  # tiled, 6 groups: a short last part
def test_one_row_kernel_equals_the_dequantized_product(n, k, tiled, dtype):
    pytest.importorskip("triton")
    interpreted(__file__, "_kernel_matches", n, k, tiled, dtype)


def _rows_kernel_matches(n: int, k: int, tiled: bool, dtype: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from pipeline.engine import fp8 as m
    torch.manual_seed(n + k + 1)
    w = m.Fp8Weight.from_float(torch.randn(n, k) * 0.02)
    assert w.tiled == tiled, (w.tiled, tiled)
    want_w = w.dequantize(torch.float32)
    # 2 rows (one 16-row block, mostly masked), 17 (32), 64 (the most a call): the chosen config, one part, and
    # untiled configs with masked tails of weight rows and groups
    for config in (w.config, w.config[:2] + (0,) + w.config[3:], (16, 1, 3, 4, 1), (32, 2, 0, 4, 1)):
        if w.tiled and config[:2] != w.config[:2]:
            continue
        for rows in (2, 17, m.BATCH_ROWS):
            x = torch.randn(rows, k).to(getattr(torch, dtype))
            y = m.gemv(x, w.packed, w.scale, config, w.tiled)
            want = x.float() @ want_w.T
            assert y.dtype == x.dtype and y.shape == (rows, n)
            err = ((y.float() - want).norm() / want.norm()).item()
            assert err < (1e-5 if dtype == "float32" else 2e-3), (config, rows, err)
    with pytest.raises(ValueError, match=f"at most {m.BATCH_ROWS} rows"):
        m.gemv(torch.randn(m.BATCH_ROWS + 1, k), w.packed, w.scale, w.config, w.tiled)
    # compiled whole (the custom operator's fake gives inductor the parts' shape (parts, M, N))
    compiled = torch.compile(lambda x: m.gemv(x, w.packed, w.scale, w.config, w.tiled) * 2, fullgraph=True)
    x = torch.randn(5, k).to(getattr(torch, dtype))
    assert torch.allclose(compiled(x) / 2, m.gemv(x, w.packed, w.scale, w.config, w.tiled), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("n,k,tiled,dtype", [(128, 512, True, "float32"), (40, 448, False, "float32"),
                                             (64, 384, True, "float16")])
def test_several_rows_kernel_equals_the_dequantized_product(n, k, tiled, dtype):
    """The several-rows kernel (a batched decode step: the weights converted once for every row, then ``tl.dot``).
    bfloat16 activations are for the GPU test: Triton 3.8's interpreter multiplies bfloat16 tensors wrongly (a
    relative error of 4e9 on a plain 16 x 16 ``tl.dot``), float16 ones right."""
    pytest.importorskip("triton")
    interpreted(__file__, "_rows_kernel_matches", n, k, tiled, dtype)


def test_fp8_weights_through_the_engine_on_cpu():
    """The tiny model with every linear weight of its language model in fp8 (the CPU takes the dequantized path;
    ``check`` keeps fp8 to CUDA 8.9+ for users, where the one-row kernel runs): the engine's layers see Fp8Weights,
    the lm_head too (a scale per row: its zero rows stay zero, no NaN), and greedy decoding stays close to
    float32's."""
    from pipeline.engine import load_model
    from pipeline.engine.model import language_parts
    from pipeline.engine.quantize import decode_agreement, to_device, weight_bytes
    from pipeline.engine.runner import ModelRunner
    from pipeline.fixtures.tiny import tiny_checkpoint

    ckpt = str(tiny_checkpoint("small"))
    ref, q = load_model(ckpt, device="cpu"), load_model(ckpt, device="cpu")
    to_device(q.hf, torch.device("cpu"), "fp8")
    text, head = language_parts(q.hf)
    assert isinstance(head, LowBitLinear) and isinstance(head.weight, Fp8Weight)
    runner = ModelRunner(q, slots=1, capacity=1024)
    layer = runner.model.layers[0]
    assert all(isinstance(w, Fp8Weight) for w in (layer.qkv_w, layer.o_w, layer.gate_up_w, layer.down_w))
    assert weight_bytes(q.hf) < weight_bytes(ref.hf)
    random.seed(0)
    prompt = [random.randrange(4000) for _ in range(64)]
    got = decode_agreement(ModelRunner(ref, slots=1, capacity=1024), runner, prompt, steps=50)
    print(got)
    assert got["cosine_mean"] > 0.9 and got["argmax_agree"] > 0.3
