#!/usr/bin/env python3
"""Where one batched decode step's GPU time goes (torch.profiler kernel table), eager and replayed.

    python3 scripts/profile_decode.py --tokenizer .bench/tokenizer --rows 32 --context 16384
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
