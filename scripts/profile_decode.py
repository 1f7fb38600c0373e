#!/usr/bin/env python3
"""Where one batched decode step's GPU time goes (torch.profiler kernel table), eager and replayed.

``--replay``: instead, the engine's own step (compiled, captured in a CUDA graph) timed over 50 replays with CUDA
events, at each ``--contexts`` length, with each decode attention (the split-KV Triton kernels and
FlashAttention-2 varlen), then the kernel table of one replay (split-KV, first rows and context).

``--engine``: one stream's whole turns through the core (``StreamingSession.step``, the default path), until its
context reaches ``--context``; then three turns under the profiler: each turn's decode ms a step (the core's own
clock, as ``bench_streams`` reports it), the GPU's busy time in that phase (the union of its kernels and copies),
and the kernels and copies that run outside the step's graph (count and µs a step).

    python3 scripts/profile_decode.py --tokenizer .bench/tokenizer --rows 32 --context 16384
    python3 scripts/profile_decode.py --tokenizer .bench/tokenizer --replay --rows 1 --contexts 4000 8000 16000
    python3 scripts/profile_decode.py --tokenizer .bench/tokenizer --engine --context 8000
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
from bench_streams import busy_us  # noqa: E402
from pipeline.engine import EngineConfig, make_core  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--replay", action="store_true", help="time the compiled, graphed step (see the doc)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4000, 8000, 16000])
    ap.add_argument("--engine", action="store_true", help="one stream's turns through the core (see the doc)")
    ap.add_argument("--sample", action="store_true", help="--engine: sample (the checkpoint's settings), not greedy")
    args = ap.parse_args()
    if args.replay:
        return replay(args)
    if args.engine:
        return engine(args)
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
    """Rows 0..n-1 at ``ctx`` keys, the step's graphs dropped so they are captured again with this attention, and one
    step run to set the runner's state and capture its graph (each replay after it advances the rows by one key);
    returns (rows, window) for ``r.graphs.run``."""
    r.split_kv = split_kv
    r.graphs.graphs.clear()
    for s in range(n):
        r.cache.lengths[s] = ctx
    nb, window = r.decode_shape(list(range(n)))
    r.decode(list(range(n)), torch.zeros(n, dtype=torch.long), [ctx] * n)
    return nb, window


def replay(args) -> int:
    model = loaded("7b", args.tokenizer, torch.device("cuda"), torch.bfloat16)
    core = make_core(model, EngineConfig(greedy=True, max_context=32768), slots=max(args.rows))
    r = core.runner
    print("| rows | context | split-KV Triton ms a step | FlashAttention-2 varlen ms a step |\n|---|---|---|---|")
    for n in args.rows:
        for ctx in args.contexts:
            cells = []
            for split_kv in (True, False):
                nb, window = _step_inputs(r, n, ctx, split_kv)
                with torch.inference_mode():
                    for _ in range(3):
                        r.graphs.run(nb, window)
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    for _ in range(50):
                        r.graphs.graphs[(nb, window, True)].replay()
                    b.record()
                    torch.cuda.synchronize()
                cells.append(f"{a.elapsed_time(b) / 50:.3f}")
            print(f"| {n} | {ctx} | " + " | ".join(cells) + " |", flush=True)
    n, ctx = args.rows[0], args.contexts[0]
    nb, window = _step_inputs(r, n, ctx, True)
    with torch.inference_mode():
        r.graphs.run(nb, window)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            r.graphs.graphs[(nb, window, True)].replay()
            torch.cuda.synchronize()
    print(f"## one replay, rows {n}, context {ctx}, split-KV")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=80))
    return 0


def engine(args) -> int:
    from pipeline.engine import StreamingSession
    from pipeline.types import Clip

    model = loaded("7b", args.tokenizer, torch.device("cuda"), torch.bfloat16)
    session = StreamingSession(model, EngineConfig(greedy=not args.sample, max_context=32768))
    clips = synthetic_clips(10_000)
    while session.context_length < args.context:
        session.step(next(clips))
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        g = session.core.runner.graphs.graphs
        next(iter(g.values())).replay()
        torch.cuda.synchronize()
    # the names of the kernels one replay of the step's graph runs
    graph_kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    core = session.core
    host = {"launch": 0.0, "read": 0.0, "decode": 0.0}

    def timed(obj, name, key):  # the host's time in obj.name, summed into host[key]
        real = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                host[key] += time.perf_counter() - t
        setattr(obj, name, wrapper)
    timed(core, "_launch", "launch"), timed(core, "_read", "read")
    timed(core.runner, "decode", "decode")
    print("| turn | context | decode steps | decode ms a step | GPU busy ms a step | GPU idle ms a step | host ms a step: "
          "launch (of which runner.decode: the step and its token choice) | waiting for the step before |")
    print("|---|---|---|---|---|---|---|---|")
    outside: dict[str, list[float]] = {}
    steps_total = 0
    for _ in range(3):
        clip = next(clips)
        for k in host:
            host[k] = 0.0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            session.step(Clip(clip.frames, clip.timestamps))
            torch.cuda.synchronize()
        st = session.last_stats
        steps = st.new_tokens - 1
        steps_total += steps
        # the decode phase: from the first kernel after the prefill's last to the end (the last ~steps graph runs)
        kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA)
        end = kernels[-1][1]
        start = end - st.decode_s * 1e6
        phase = [(max(a, start), b, name) for a, b, name in kernels if b > start]
        busy = busy_us([(a, b) for a, b, _ in phase])
        for a, b, name in phase:
            if name not in graph_kernels:
                outside.setdefault(name, []).append(b - a)
        print(f"| {session.total_turns} | {st.context} | {steps} | {st.decode_s * 1000 / steps:.3f} | "
              f"{busy / 1000 / steps:.3f} | {(end - start - busy) / 1000 / steps:.3f} | "
              f"{host['launch'] * 1000 / steps:.3f} ({host['decode'] * 1000 / steps:.3f}) | "
              f"{host['read'] * 1000 / steps:.3f} |", flush=True)
    print("\n| outside the step's graph (decode phase) | count a step | µs a step |\n|---|---|---|")
    for name, ts in sorted(outside.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {name[:90]} | {len(ts) / steps_total:.2f} | {sum(ts) / steps_total:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
