"""What the engine's own low-bit formats share (pipeline/engine/lowbit.py, lowbit_kernels.py), for both: the
kernels' machine code for Hopper, compiled here without a GPU, and how several rows split the input."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.timeout(600)


def test_the_kernels_compile_for_hopper_with_the_instructions_they_rely_on():
    """Every kernel compiled for sm_90 by Triton's own toolchain (ptxas included: the inline PTX and ``wgmma`` that
    the CPU's interpreter never runs), no GPU needed (scripts/sass_loop.py): the fp8 kernels convert with the
    hardware's E4M3 instruction (F2FP.*E4M3), the several-rows kernels multiply with the matrix instruction
    (HGMMA) in their main loop, the one-row kernels with plain multiply-adds (FFMA, no HGMMA)."""
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
        else:
            assert "FFMA" in loop and "HGMMA" not in loop, name
        seen += 1
    assert seen == 9


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
