#!/usr/bin/env python3
"""The engine's low-bit Triton kernels compiled for Hopper (sm_90) without a GPU, and what their main loop costs.

Each kernel of ``pipeline/engine/lowbit_kernels.py`` is compiled with Triton's own toolchain for compute capability
9.0 in the engine's configurations (``int4.TILED_CONFIG``, ``fp8.LARGE_CONFIG``/``SMALL_CONFIG``; bfloat16
activations, the inline-PTX conversions, tiled weights) and disassembled with the ``cuobjdump`` Triton ships. The
main loop is the longest span from a backward branch's target to the branch; the table gives its SASS instructions and
what they are per weight a thread handles (a thread's share of an iteration's BLOCK_N x GROUPS x GROUP weights),
the matrix instructions (HGMMA: ``wgmma``), the conversions and the loads in it, and the kernel's shared memory.

An H200 streams ≈ 16 1-byte weights a clock per SM at 4.3 TB/s (≈ 33 4-bit ones; 132 SMs at 1.98 GHz) and issues
128 thread instructions a clock per SM (4 schedulers x 32 lanes): a loop above ≈ 8 instructions a 1-byte weight
(≈ 4 a 4-bit one) cannot keep up with memory, and one near it needs every scheduler busy. A static count, not a
measurement: a cheap check of a kernel change where no GPU is at hand (the sixteenth session had none); time it
with ``profile_gemv.py`` on one.

    python3 scripts/sass_loop.py
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pipeline.engine import fp8, int4, lowbit_kernels as K  # noqa: E402


def compiled(fn, signature: dict, constants: dict, warps: int, aligned: tuple[int, ...]):
    """``fn`` compiled for sm_90: pointer arguments and the ``aligned`` integer ones taken as multiples of 16."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
             if kind.startswith("*") or i in aligned}
    src = ASTSource(fn=fn, signature={**signature, **{c: "constexpr" for c in constants}}, constexprs=constants,
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of a cubin, by Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", out)]


def main_loop(code: list[tuple[int, str]]) -> list[str]:
    """The instructions of the longest loop: from a backward branch's target to the branch."""
    loops = [(int(m.group(1), 16), at) for at, ins in code
             if (m := re.search(r"BRA 0x([0-9a-f]+)", ins)) and int(m.group(1), 16) < at]
    if not loops:
        return []
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return [ins for at, ins in code if start <= at <= end]


def row(name: str, code: list[tuple[int, str]], weights_a_thread: float, shared: int) -> str:
    body = main_loop(code)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for ins in body)
    conv = ops["F2FP"] + ops["HADD2"] + ops["F2F"] + ops["I2F"] + ops["PRMT"] + ops["LOP3"]
    loads = ops["LDG"] + ops["LDGSTS"] + ops["LDS"] + ops["LDSM"]
    return (f"| {name} | {len(body)} | {weights_a_thread:g} | {len(body) / weights_a_thread:.2f} | {ops['HGMMA']} | "
            f"{ops['FFMA']} | {conv} | {loads} | {shared} |")


def kernels():
    """(name, SASS [(address, instruction)], weights a thread handles an iteration, shared bytes) of each kernel in
    the engine's configurations (tests/test_lowbit.py checks their machine code)."""
    out = []
    for config in (fp8.LARGE_CONFIG, fp8.SMALL_CONFIG):
        block_n, groups, _, warps, _ = config
        per_thread = block_n * groups * fp8.GROUP / (warps * 32)
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "y_ptr": "*fp32", "N": "i32", "KW": "i32",
               "G": "i32", "PER": "i32"}
        k = compiled(K.fp8_gemv, sig, {"BLOCK_N": block_n, "GROUPS": groups, "ASM": True, "EVEN": True,
                                        "TILED": True}, warps, (5,))
        out.append((f"fp8_gemv {config}", sass(k.asm["cubin"]), per_thread, k.metadata.shared))
        sig = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "y_ptr": "*fp32", "M": "i32", "N": "i32",
               "KW": "i32", "G": "i32", "PER": "i32"}
        for block_m in (16, 64):
            k = compiled(K.fp8_gemm, sig, {"BLOCK_M": block_m, "BLOCK_N": block_n, "GROUPS": groups, "ASM": True,
                                            "EVEN": True, "TILED": True}, warps, (6,))
            out.append((f"fp8_gemm {config}, {block_m} rows a program", sass(k.asm["cubin"]), per_thread,
                        k.metadata.shared))
    block_n, groups, _, warps, stages = int4.TILED_CONFIG
    per_thread = block_n * groups * int4.GROUP / (warps * 32)
    sig = {"x_ptr": "*fp32", "xs_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*fp32",
           "N": "i32", "KW": "i32", "G": "i32", "PER": "i32"}
    k = compiled(K.int4_gemv, sig, {"BLOCK_N": block_n, "GROUPS": groups, "STAGES": stages, "ASM": True,
                                     "EVEN": True, "TILED": True}, warps, (7,))
    out.append((f"int4_gemv {int4.TILED_CONFIG}", sass(k.asm["cubin"]), per_thread, k.metadata.shared))
    sig = {"x_ptr": "*bf16", "xs_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "y_ptr": "*fp32",
           "M": "i32", "N": "i32", "KW": "i32", "G": "i32", "PER": "i32"}
    for block_m in (16, 64):
        k = compiled(K.int4_gemm, sig, {"BLOCK_M": block_m, "BLOCK_N": block_n, "GROUPS": groups, "ASM": True,
                                         "EVEN": True, "TILED": True}, warps, (8,))
        out.append((f"int4_gemm {int4.TILED_CONFIG}, {block_m} rows a program", sass(k.asm["cubin"]), per_thread,
                    k.metadata.shared))
    return out


def main() -> int:
    print(f"# Triton {triton.__version__}, sm_90 (compiled here, no GPU), main loop of each kernel\n")
    print("| kernel, config | loop instructions | weights a thread an iteration | instructions a weight | HGMMA | "
          "FFMA | conversions (F2FP, HADD2, PRMT, LOP3) | loads (global, async, shared) | shared bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, code, per_thread, shared in kernels():
        print(row(name, code, per_thread, shared))
    return 0


if __name__ == "__main__":
    sys.exit(main())
