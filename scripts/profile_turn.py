#!/usr/bin/env python3
"""Where a turn's GPU time goes: prefill of B rows and vision of B clips, straight on the model runner.

For each B: wall time (host included, synchronised), the summed time of the GPU kernels, and that time by
kind (GEMM, attention, the rest), so launch overhead shows as wall minus kernel time; then the attention
of one layer two ways (PyTorch's varlen flash reading
every row in place in the cache with ``seqused_k``, and the same over contiguous copies); and the GEMM throughput of the
prefill's four matrices in bfloat16 and FP8 (``torch._scaled_mm``).

    python3 scripts/profile_turn.py --tokenizer .bench/tokenizer --rows 1 8 --context 16000
    python3 scripts/profile_turn.py --tokenizer .bench/tokenizer --rows 1 4 --quantize fp8   # the weights in fp8

With ``--quantize`` (``engine.quantize``) the prefill's products run as the engine runs them for many rows: each
weight dequantized to bfloat16 a block of rows at a time, then cuBLAS (the conversions show under "other").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import loaded, synthetic_clips  # noqa: E402

from pipeline.engine import EngineConfig, make_core  # noqa: E402


def kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "cudnn")):
        return "attention"
    if any(s in n for s in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "sm90", "cublas")):
        return "gemm"
    return "other"


def timed(fn, reps: int = 5) -> tuple[float, float, dict[str, float], list]:
    """(wall ms, kernel ms, kernel ms by kind, top kernels) of one call of ``fn``, after warm-up."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / reps * 1000
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by: dict[str, float] = {}
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us <= 0 or e.key.startswith("ProfilerStep"):
            continue
        by[kind(e.key)] = by.get(kind(e.key), 0) + us / 1000
        rows.append((us / 1000, e.count, e.key[:90]))
    rows.sort(reverse=True)
    return wall, sum(by.values()), by, rows[:10]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=16000)
    ap.add_argument("--quantize", choices=["none", "int8", "int4", "fp8"], default="none",
                    help="the language model's weights (engine.quantize)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = loaded("7b", args.tokenizer, dev, torch.bfloat16, args.quantize)
    core = make_core(model, EngineConfig(greedy=True, max_context=32768), slots=max(args.rows))
    r, m = core.runner, core.runner.model
    frames = next(iter(synthetic_clips(2))).frames[:2]  # 2 frames of the opener, resized
    vis = r.encode_videos([frames])[0]
    nv = vis.shape[0]
    ids = [151644] * 11 + [model.video_token_id] * nv + [151645] * 11
    T = len(ids)
    print(f"# 7B shape, bf16, weights {args.quantize}, frames {frames.shape}, {nv} visual tokens, {T}-token turns, context {args.context}\n")
    out = []
    for B in args.rows:
        pos = torch.arange(args.context, args.context + T).expand(3, T)
        turns = [(s, ids, pos, vis) for s in range(B)]

        def prefill():
            for s in range(B):
                r.cache.lengths[s] = args.context
            r.prefill(turns)

        cudnn, compiled = r.cudnn_past, r.prefill_compiled
        for label, use, comp in (("FlashAttention-2", False, False), ("cuDNN past + FlashAttention-2", True, False),
                                 ("cuDNN past + FlashAttention-2, compiled norms/rotary/SiLU", True, True)):
            if (use and not cudnn) or (comp and not compiled):
                continue
            r.cudnn_past, r.prefill_compiled = use, comp
            wall, kern, by, top = timed(prefill)
            out.append(f"| prefill, {label} | {B} | {wall:.1f} | {kern:.1f} | {by.get('gemm', 0):.1f} | "
                       f"{by.get('attention', 0):.1f} | {by.get('other', 0):.1f} | {wall / B:.1f} |")
            print(f"## prefill ({label}), {B} rows: top kernels (ms, calls)")
            for ms, n, name in top:
                print(f"  {ms:8.2f} {n:6d}  {name}")
        clips = [frames] * B
        wall, kern, by, top = timed(lambda: r.encode_videos(clips))
        out.append(f"| vision | {B} | {wall:.1f} | {kern:.1f} | {by.get('gemm', 0):.1f} | "
                   f"{by.get('attention', 0):.1f} | {by.get('other', 0):.1f} | {wall / B:.1f} |")
        print(f"## vision, {B} clips: top kernels (ms, calls)")
        for ms, n, name in top:
            print(f"  {ms:8.2f} {n:6d}  {name}")
    print("\n| what | B | wall ms | kernels ms | GEMM | attention | other | wall ms per row |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(out))

    # one layer's prefill attention over B rows: in place in the cache (the engine's strided view) vs contiguous rows
    print("\n| attention, one layer | B | varlen in the cache ms | varlen, contiguous rows ms | max diff |")
    print("|---|---|---|---|---|")
    H, KV, D = m.n_heads, m.n_kv, m.head_dim
    for B in args.rows:
        S = args.context + T
        q = torch.randn(B * T, H, D, device=dev, dtype=torch.bfloat16)
        for s in range(B):
            r.cache.k[0, s, :, :S].normal_()
            r.cache.v[0, s, :, :S].normal_()
        kf, vf = r.cache.varlen(0)
        kc = torch.stack([r.cache.k[0, s, :, :S].transpose(0, 1) for s in range(B)]).reshape(B * S, KV, D)
        vc = torch.stack([r.cache.v[0, s, :, :S].transpose(0, 1) for s in range(B)]).reshape(B * S, KV, D)
        cq = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * T
        used = torch.full((B,), S, device=dev, dtype=torch.int32)
        ck_cache = torch.tensor([s * r.cache.varlen_stride for s in range(B)] + [(B - 1) * r.cache.varlen_stride + r.capacity],
                                device=dev, dtype=torch.int32)
        ck = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * S
        in_cache = lambda: m.attend_varlen(q, kf, vf, cq, ck_cache, used, T, S)  # noqa: E731
        packed = lambda: m.attend_varlen(q, kc, vc, cq, ck, used, T, S)  # noqa: E731
        diff = (in_cache().float() - packed().float()).abs().max().item()
        print(f"| | {B} | {timed(in_cache)[0]:.2f} | {timed(packed)[0]:.2f} | {diff:.3g} |")

    # GEMMs of one layer's prefill, bf16 vs fp8 (of the bfloat16 weights; with --quantize, of them dequantized)
    print("\n| GEMM (M tokens × K → N) | bf16 ms | bf16 TFLOP/s | fp8 ms | fp8 TFLOP/s |")
    print("|---|---|---|---|---|")
    w = m.layers[0]
    for M in (T, T * 8):
        for name, W in (("qkv", w.qkv_w), ("o", w.o_w), ("gate_up", w.gate_up_w), ("down", w.down_w)):
            W = W.dequantize() if hasattr(W, "dequantize") else W  # a low-bit weight (lowbit.LowBitWeight)
            N, K = W.shape
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            tb = timed(lambda: x @ W.t(), reps=20)[0]
            try:
                x8 = x.to(torch.float8_e4m3fn)
                w8 = W.to(torch.float8_e4m3fn)
                one = torch.ones((), device=dev)
                tf = timed(lambda: torch._scaled_mm(x8, w8.t(), one, one, out_dtype=torch.bfloat16), reps=20)[0]
            except Exception:  # noqa: BLE001
                tf = float("nan")
            fl = 2 * M * N * K / 1e12
            print(f"| {name} {M}×{K}→{N} | {tb:.3f} | {fl / tb * 1000:.0f} | {tf:.3f} | {fl / tf * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
