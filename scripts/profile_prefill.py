#!/usr/bin/env python3
"""Where a prefill turn's GPU time goes at a given context length (torch.profiler kernel table).

    python3 scripts/profile_prefill.py --tokenizer .bench/tokenizer --context 16000
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
from pipeline.engine import EngineConfig, StreamingSession  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--context", type=int, default=16000)
    args = ap.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
