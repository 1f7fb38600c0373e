"""What the engine's own low-bit formats share (pipeline/engine/lowbit.py, lowbit_kernels.py), for both: the parts
of one row's product added inside the one-row kernel (``SUM_IN_KERNEL``), under Triton's CPU interpreter.

The interpreter must be chosen before ``triton`` is first imported, so the checks run in a fresh Python with
``TRITON_INTERPRET=1`` (tests/interpret.py)."""

from __future__ import annotations

import os

import pytest
import torch

from interpret import interpreted

pytestmark = pytest.mark.timeout(600)


def _summed_in_kernel_matches(fmt: str, n: int, k: int) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import importlib

    m = importlib.import_module(f"pipeline.engine.{fmt}")
    cls = m.Int4Weight if fmt == "int4" else m.Fp8Weight
    torch.manual_seed(n + k)
    w = cls.from_float(torch.randn(n, k) * 0.02)
    tensors = (w.packed, w.scale, w.zero) if fmt == "int4" else (w.packed, w.scale)
    assert w.counters.shape == (-(-n // w.config[0]),) and not w.counters.any()
    assert "counters" not in w.state_dict()  # scratch state, not part of a saved weight

    def parts(x, config):  # (parts, N) float32, before any sum
        if fmt == "fp8":
            return m._product_parts(x, *tensors, *config, w.tiled)[:, 0]
        xf = x.float()
        return m._product_parts(xf, xf.view(1, -1, m.GROUP).sum(-1), *tensors, *config, w.tiled)[:, 0]

    for config in {w.config, w.config[:2] + (w.config[1],) + w.config[3:]}:  # 2+ parts; the finest split
        counters = torch.zeros(-(-n // config[0]), dtype=torch.int32)
        for _ in range(2):  # the counters left at 0: a second call sums the same
            x = torch.randn(1, k)
            summed = m.gemv(x, *tensors, config, w.tiled, counters)
            p = parts(x, config)
            assert p.shape[0] > 1 and summed.shape == (1, n)
            in_order = p[0].clone()
            for part in p[1:]:
                in_order += part
            assert torch.equal(summed[0], in_order), config  # part 0 + part 1 + ..., in float32
            assert torch.allclose(summed, m.gemv(x, *tensors, config, w.tiled), rtol=1e-5, atol=1e-6)
            assert not counters.any()
        xb = torch.randn(1, k).to(torch.bfloat16)  # stored in x's dtype (the interpreter truncates, CUDA rounds)
        got = m.gemv(xb, *tensors, config, w.tiled, counters)
        assert got.dtype == torch.bfloat16
        assert torch.allclose(got.float(), m.gemv(xb, *tensors, config, w.tiled).float(), rtol=2e-2, atol=1e-4)
    compiled = torch.compile(lambda x: m.gemv(x, *tensors, w.config, w.tiled, w.counters) * 2, fullgraph=True)
    x = torch.randn(1, k)
    # (inductor's own sums of int4's activation groups may round differently from eager's)
    assert torch.allclose(compiled(x) / 2, m.gemv(x, *tensors, w.config, w.tiled, w.counters), rtol=1e-5, atol=1e-5)
    assert not w.counters.any()


@pytest.mark.parametrize("fmt,n,k", [("fp8", 192, 1216), ("fp8", 100, 640),  # tiled (19 groups of 64), untiled
                                     ("int4", 128, 1280), ("int4", 100, 640)])  # tiled (10 groups of 128), untiled
def test_one_row_kernel_adds_its_parts_itself(fmt, n, k):
    """``SUM_IN_KERNEL``: the last program of each block of rows adds the parts (counted with an atomic), so no kernel
    runs after the product; the sums are the parts' in order, the counters are left at 0, and a compiled call
    keeps the operator whole. On the interpreter the programs run one after another (the counting and the sum are
    checked, not the memory ordering: the SASS compiled here for Hopper has the barrier, the GPU-scope fence and
    atomic, the L1 invalidation and the L1-bypassing loads; tests/test_gpu.py replays it on CUDA)."""
    pytest.importorskip("triton")
    interpreted(__file__, "_summed_in_kernel_matches", fmt, n, k)


def test_a_kernel_refuses_counters_that_do_not_fit():
    pytest.importorskip("triton")
    from pipeline.engine import fp8, int4

    w = fp8.Fp8Weight.from_float(torch.randn(128, 1024))
    with pytest.raises(ValueError, match="do not fit"):  # counters sized for another config
        fp8.launch(torch.randn(1, 1024), w.packed, w.scale, torch.empty(1, 128), w.config, w.tiled,
                   torch.zeros(1, dtype=torch.int32), torch.empty(fp8.parts(w.config, 1024), 128))
    q = int4.Int4Weight.from_float(torch.randn(128, 1024))
    x = torch.randn(1, 1024)
    with pytest.raises(ValueError, match="do not fit"):  # no scratch for the parts
        int4.launch(x, x.view(8, 128).sum(-1), q.packed, q.scale, q.zero, torch.empty(1, 128), q.config, q.tiled,
                    q.counters, None)


def test_the_kernels_compile_for_hopper_with_the_instructions_they_rely_on():
    """Every kernel compiled for sm_90 by Triton's own toolchain (ptxas included: the inline PTX and ``wgmma`` that
    the CPU's interpreter never runs), no GPU needed (scripts/sass_loop.py): the fp8 kernels convert with the
    hardware's E4M3 instruction (F2FP.*E4M3), the several-rows kernels multiply with the matrix instruction
    (HGMMA) in their main loop, and a kernel adding its parts itself has the pattern its correctness rests on: a
    barrier, a GPU-scope fence before the one atomic that counts, an L1 invalidation after it, and loads of the
    parts that bypass L1 (a GPU-scope load) — none of which a kernel that leaves the parts to a later kernel has."""
    pytest.importorskip("triton")
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    try:
        import sass_loop
    finally:
        sys.path.pop(0)

    seen = 0
    for name, code, per_thread, shared in sass_loop.kernels():
        text = "\n".join(ins for _, ins in code)
        loop = "\n".join(sass_loop.main_loop(code))
        assert loop, name
        if name.startswith("fp8"):
            assert "E4M3" in text, name  # F2FP.F16.E4M3.UNPACK_B: the paired conversion
        if "gemm" in name:
            assert "HGMMA" in loop, name
        summed = "parts added in the kernel" in name
        pattern = ("BAR.SYNC" in text and "MEMBAR" in text and "ATOMG" in text and "CCTL.IVALL" in text
                   and "LDG.E.STRONG.GPU" in text)
        assert pattern == summed, name
        seen += 1
    assert seen == 12


def test_several_rows_split_the_input_only_as_far_as_it_takes_for_enough_programs():
    """``lowbit.rows_config`` on LiveCC-7B's matrices in the engine's configs: the few-row product's parts, each an
    (M, N) float32 block written and read back, are the fewest that give ``BATCH_PROGRAMS`` programs (one for the
    wide matrices: the lm_head at 64 rows would otherwise move 7 x 64 x 151936 x 4 bytes), never more than the one-row
    split, each a whole number of iterations (the tiled layout needs it)."""
    from pipeline.engine import fp8, int4
    from pipeline.engine.lowbit import BATCH_PROGRAMS, rows_config

    shapes = {"q|k|v": (4608, 3584), "o": (3584, 3584), "gate|up": (37888, 3584), "down": (3584, 18944),
              "lm_head": (151936, 3584)}
    got = {}
    for fmt in (fp8, int4):
        for name, (n, k) in shapes.items():
            groups = k // fmt.GROUP
            config, tiled = fmt.choose(n, groups)
            several = rows_config(config, n, groups)
            assert several[:2] == config[:2] and several[3:] == config[3:] and several[2] % config[1] == 0
            parts, one_row = -(-groups // several[2]), -(-groups // config[2])
            blocks = -(-n // config[0])
            assert 1 <= parts <= one_row and (parts == one_row or blocks * parts >= BATCH_PROGRAMS), (name, parts)
            assert parts == 1 or blocks * (parts - 1) < BATCH_PROGRAMS, (name, parts)  # the fewest
            got[fmt.__name__.rsplit(".", 1)[1], name] = parts
    assert got["fp8", "lm_head"] == got["fp8", "gate|up"] == got["int4", "lm_head"] == 1
    assert got["fp8", "down"] == 10 and got["int4", "down"] == 5
