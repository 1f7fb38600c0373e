#!/usr/bin/env python3
"""Where a prefill turn's GPU time goes at a given context length (torch.profiler kernel table).

``--contexts``: instead, one stream's 1080p turns (the default path: the prefill replayed from its CUDA graph) at
each context length: the turn's prefill time as the core measures it (``TurnStats.prefill_s``, median of 4 turns:
until the host has the first token) next to the GPU time of the prefill graph alone (replayed; it rewrites the same
keys at the same positions) and that time by kernel kind (GEMM, attention, the rest). The difference is what the
host adds around the graph.

    python3 scripts/profile_prefill.py --tokenizer .bench/tokenizer --context 16000
    python3 scripts/profile_prefill.py --tokenizer .bench/tokenizer --contexts 4000 8000 12000 16000 --past-split 1 3
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import loaded, set_past_split, synthetic_clips  # noqa: E402
from profile_turn import timed  # noqa: E402
from pipeline.engine import EngineConfig, StreamingSession  # noqa: E402
from pipeline.engine import runner  # noqa: E402

DEFAULT_SPLIT = runner.PAST_SPLIT  # the engine's own, before any --past-split


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--context", type=int, default=16000)
    ap.add_argument("--contexts", type=int, nargs="+", help="the graphed prefill's GPU time at each (see the doc)")
    ap.add_argument("--past-split", type=int, nargs="+", default=[0],
                    help="the cuDNN attention over the past in this many parts (bench_gpu.set_past_split; 0: the "
                         "engine's default); with --contexts each value a stream of its own")
    args = ap.parse_args()
    if args.contexts:
        return graphed(args)
    if len(args.past_split) > 1:
        ap.error("--past-split takes one value without --contexts")
    set_past_split(args.past_split[0] or DEFAULT_SPLIT)
    model = loaded("7b", args.tokenizer, torch.device("cuda"), torch.bfloat16)
    clips = list(synthetic_clips(args.context // 400 + 8))
    s = StreamingSession(model, EngineConfig(greedy=True, context="none", max_new_tokens=1, compile=True))
    for c in clips:
        s.step(c)
        if s.context_length >= args.context:
            break
    times = []
    for c in clips[-4:]:
        s.step(c)
        times.append(s.last_stats.prefill_s * 1000)
    print(f"context {s.context_length}: prefill ms {[round(t, 1) for t in times]}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        s.step(clips[-1])
        torch.cuda.synchronize()
    print(f"profiled turn: {(time.perf_counter() - t) * 1000:.1f} ms, prefill {s.last_stats.prefill_s * 1000:.1f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    return 0


def graphed(args) -> int:
    model = loaded("7b", args.tokenizer, torch.device("cuda"), torch.bfloat16)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, 1080p turns, one stream\n")
    print("| past split | context | turn tokens | prefill_s p50 (core) | graph replay ms | kernels ms | GEMM | attention "
          "| other |")
    print("|---|---|---|---|---|---|---|---|---|")
    for parts in args.past_split:
        set_past_split(parts or DEFAULT_SPLIT)
        graphed_stream(args, model, parts or DEFAULT_SPLIT)
        gc.collect()
        torch.cuda.empty_cache()
    return 0


def graphed_stream(args, model, parts: int) -> None:
    clips = synthetic_clips(max(args.contexts) // 300 + 20)
    s = StreamingSession(model, EngineConfig(greedy=True, context="none", max_new_tokens=1))
    graphs = s.core.runner.prefill_graphs
    for target in args.contexts:
        while s.context_length < target:
            s.step(next(clips))
        times = []
        for _ in range(4):
            s.step(next(clips))
            times.append(s.last_stats.prefill_s * 1000)
        key, (g, _, _) = next(reversed(graphs.graphs.items()))  # the graph the last turn replayed
        with torch.inference_mode():
            wall, kern, by, _ = timed(g.replay, reps=20)
        print(f"| {parts} | {s.context_length} | {key[1]} | {sorted(times)[len(times) // 2]:.2f} | {wall:.2f} | "
              f"{kern:.2f} | "
              f"{by.get('gemm', 0):.2f} | {by.get('attention', 0):.2f} | {by.get('other', 0):.2f} |", flush=True)
    s.close()


if __name__ == "__main__":
    sys.exit(main())
