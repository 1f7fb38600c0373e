#!/usr/bin/env python3
"""Where one batched decode step's GPU time goes (torch.profiler kernel table), eager and replayed.

``--replay``: instead, the engine's own step (compiled, captured in a CUDA graph) timed over 50 replays with CUDA
events, at each ``--contexts`` length, with each decode attention (the split-KV Triton kernels and
FlashAttention-2 varlen), then the kernel table of one replay (split-KV, first rows and context).

    python3 scripts/profile_decode.py --tokenizer .bench/tokenizer --rows 32 --context 16384
    python3 scripts/profile_decode.py --tokenizer .bench/tokenizer --replay --rows 1 --contexts 4000 8000 16000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import loaded  # noqa: E402
from pipeline.engine import EngineConfig, make_core  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--replay", action="store_true", help="time the compiled, graphed step (see the doc)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4000, 8000, 16000])
    args = ap.parse_args()
    if args.replay:
        return replay(args)
    model = loaded("7b", args.tokenizer, torch.device("cuda"), torch.bfloat16)
    core = make_core(model, EngineConfig(greedy=True, max_context=32768, compile=False), slots=max(args.rows))
    r = core.runner
    for n in args.rows:
        for s in range(n):
            r.cache.lengths[s] = args.context
        nb, window = r.decode_shape(list(range(n)))
        tok = r.model.embed_ids(torch.zeros(nb, dtype=torch.long))  # the step takes embeddings
        pos = torch.full((nb,), args.context, dtype=torch.long, device="cuda")
        at = torch.full((nb,), args.context, dtype=torch.long, device="cuda")
        with torch.inference_mode():
            for _ in range(3):
                r.decode_step(tok, pos, at, window)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                r.decode_step(tok, pos, at, window)
            torch.cuda.synchronize()
            eager = (time.perf_counter() - t) / 5 * 1000
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                r.decode_step(tok, pos, at, window)
                torch.cuda.synchronize()
        print(f"## rows {n} (bucket {nb}), window {window}: eager step {eager:.1f} ms wall")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
    return 0


def _step_inputs(r, n: int, ctx: int, split_kv: bool):
    """Rows 0..n-1 at ``ctx`` keys, the step's graphs dropped so they are captured again with this attention;
    returns (rows, window, embeddings, positions, cache positions) for ``r.graphs.run``."""
    r.split_kv = split_kv
    r.graphs.graphs.clear()
    for s in range(n):
        r.cache.lengths[s] = ctx
    nb, window = r.decode_shape(list(range(n)))
    x = r.model.embed_ids(torch.zeros(nb, dtype=torch.long, device="cuda"))
    return nb, window, x, torch.full((nb,), ctx, dtype=torch.long), torch.full((nb,), ctx, dtype=torch.long)


def replay(args) -> int:
    model = loaded("7b", args.tokenizer, torch.device("cuda"), torch.bfloat16)
    core = make_core(model, EngineConfig(greedy=True, max_context=32768), slots=max(args.rows))
    r = core.runner
    print("| rows | context | split-KV Triton ms a step | FlashAttention-2 varlen ms a step |\n|---|---|---|---|")
    for n in args.rows:
        for ctx in args.contexts:
            cells = []
            for split_kv in (True, False):
                nb, window, x, pos, at = _step_inputs(r, n, ctx, split_kv)
                with torch.inference_mode():
                    for _ in range(3):
                        r.graphs.run(nb, window, x, pos, at)
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    for _ in range(50):
                        r.graphs.graphs[(nb, window)].replay()
                    b.record()
                    torch.cuda.synchronize()
                cells.append(f"{a.elapsed_time(b) / 50:.3f}")
            print(f"| {n} | {ctx} | " + " | ".join(cells) + " |", flush=True)
    n, ctx = args.rows[0], args.contexts[0]
    nb, window, x, pos, at = _step_inputs(r, n, ctx, True)
    with torch.inference_mode():
        r.graphs.run(nb, window, x, pos, at)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            r.graphs.graphs[(nb, window)].replay()
            torch.cuda.synchronize()
    print(f"## one replay, rows {n}, context {ctx}, split-KV")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=80))
    return 0


if __name__ == "__main__":
    sys.exit(main())
