#!/usr/bin/env python3
"""GPU benchmark of ``engine.quantize``: every mode in one run, on LiveCC-7B's shape with random weights.

For each mode (none = bfloat16, int8, int4, fp8 where the GPU has compute capability >= 8.9):
  * weight GiB (``quantize.weight_bytes``), then ``--seconds`` of synthetic 1080p video through the engine's
    default path (CUDA graphs + compiled decode step, rollover context, greedy 16-token turns) at each
    ``--contexts`` KV-cache capacity: peak GiB (``torch.cuda.max_memory_allocated``), decode ms/token, turn
    p50/p99 (turns that captured a new decode graph are left out and counted apart);
  * the 8-GiB card: int4 loaded and run at a 16k context under
    ``torch.cuda.set_per_process_memory_fraction(--cap-gib / total)`` (the caching allocator's limit; a real card
    also holds the CUDA context, ~0.3-0.5 GiB, outside it);
  * against bfloat16 on the same inputs: logits cosine similarity and argmax agreement over ``--steps`` decode
    steps (``quantize.decode_agreement``: a 512-token prompt, then teacher-forced greedy steps).

Weights are random (no download on the lent machines): this measures memory, speed and kernel correctness,
not caption quality.

    python3 scripts/bench_quantize.py --tokenizer .bench/tokenizer --out bench-out/quantize
    python3 scripts/bench_quantize.py --tokenizer .bench/tokenizer --steps 0          # the table and the 8-GiB case
    python3 scripts/bench_quantize.py --tokenizer .bench/tokenizer --modes none fp8 int4 --contexts 16384 --steps 0 --cap-gib 0
    python3 scripts/bench_quantize.py --tokenizer .bench/tokenizer --contexts --cap-gib 0   # the logits check only
    python3 scripts/bench_quantize.py --shape tiny --device cpu --modes none int8 --seconds 6 --steps 50 \
        --tokenizer .bench/tokenizer   # a dry run anywhere (CPU: float32, no graphs, memory figures 0)
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import random_model, summarize, synthetic_clips, wrap  # noqa: E402
from pipeline.engine import EngineConfig, StreamingSession  # noqa: E402
from pipeline.engine.quantize import decode_agreement, to_device  # noqa: E402
from pipeline.engine.runner import ModelRunner  # noqa: E402
from pipeline.types import Clip  # noqa: E402

GiB = 2**30


def build(args, mode: str, cap_gib: float | None = None):
    """The random model in ``mode`` on the device; with ``cap_gib`` the allocator is capped before it moves there."""
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if CUDA else torch.float32
    hf = random_model(args.shape, dev, dtype).cpu()  # same seed: the same weights in every mode
    free()
    if cap_gib:
        torch.cuda.set_per_process_memory_fraction(cap_gib * GiB / torch.cuda.get_device_properties(dev).total_memory)
    to_device(hf, dev, mode)
    return wrap(hf, args.tokenizer, args.shape, dev, dtype, mode)


CUDA = torch.cuda.is_available()


def free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def run_turns(model, clips, max_context: int) -> dict:
    free()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / GiB if CUDA else 0.0  # the weights (and anything left over)
    session = StreamingSession(model, EngineConfig(greedy=True, max_context=max_context))
    graphs = session.core.runner.graphs
    turns = []
    for clip in clips:
        n = len(graphs.graphs) if graphs else 0
        t0 = time.perf_counter()
        cap = session.step(Clip(clip.frames, clip.timestamps))  # ready now
        session.core.runner.synchronize()
        st = session.last_stats
        turns.append(dict(latency=time.perf_counter() - t0, vision=st.vision_s, prefill=st.prefill_s,
                          decode=st.decode_s, tokens=st.new_tokens, context=st.context, token_ids=list(cap.token_ids),
                          captured=bool(graphs) and len(graphs.graphs) > n))
    peak = torch.cuda.max_memory_allocated() / GiB if CUDA else 0.0
    steady = [t for t in turns[1:] if not t["captured"]]
    out = summarize([turns[0]] + steady, peak)
    out.update(allocated_before_gib=before, captures=sum(t["captured"] for t in turns), compiled=bool(graphs) and graphs.compile,
               rollovers=session.rollovers)
    out.pop("turns")
    median = sorted(t["latency"] for t in steady)[len(steady) // 2] if steady else 0.0
    out["slow_turns"] = [dict({k: round(t[k] * 1e3, 1) for k in ("latency", "vision", "prefill", "decode")},
                              turn=i + 1, context=t["context"], tokens=t["tokens"])
                         for i, t in enumerate(turns[1:]) if not t["captured"] and t["latency"] > 2 * median]
    session.close()
    del session, graphs
    free()
    return out


def agreement(args, modes: list[str]) -> dict:
    ref = build(args, "none")
    random.seed(0)
    prompt = [random.randrange(150000) for _ in range(512)]
    cap = len(prompt) + args.steps + 16
    ref_runner = ModelRunner(ref, slots=1, capacity=cap)
    out = {}
    for mode in modes:
        q = build(args, mode)
        out[mode] = decode_agreement(ref_runner, ModelRunner(q, slots=1, capacity=cap), prompt, args.steps)
        print(f"{mode} vs none over {args.steps} decode steps: {json.dumps(out[mode])}", flush=True)
        del q
        free()
    return out


def table(rows: dict, contexts: list[int]) -> str:
    c0 = contexts[0]
    head = ["mode", "weights GiB"] + [f"peak GiB {c // 1024}k" for c in contexts] + \
        [f"decode ms/token ({c0 // 1024}k)", "turn p50 ms", "turn p99 ms", "decode vs bf16", "compiled"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows.get("none", {}).get(c0, {}).get("ms_per_token")
    for mode, r in rows.items():
        runs = [r.get(c, {}) for c in contexts]
        first = runs[0]
        speed = f"{base / first['ms_per_token']:.2f}x" if base and first.get("ms_per_token") else "-"
        cells = [mode, f"{r['weight_gib']:.2f}"] + [f"{x.get('peak_gib', float('nan')):.2f}" for x in runs] + \
            [f"{first.get('ms_per_token', float('nan')):.2f}", f"{first.get('p50', float('nan')):.1f}",
             f"{first.get('p99', float('nan')):.1f}", speed, str(first.get("compiled", "-"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="folder with a Qwen2 tokenizer (the tiny qwen checkpoint's)")
    ap.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", nargs="+", default=["none", "int8", "int4", "fp8"],
                    help="engine.quantize modes")
    ap.add_argument("--contexts", type=int, nargs="*", default=[16384, 32768], help="none: no engine runs")
    ap.add_argument("--seconds", type=int, default=40, help="seconds of video per run")
    ap.add_argument("--steps", type=int, default=1000, help="decode steps of the logits check")
    ap.add_argument("--cap-gib", type=float, default=8.0, help="the small card: int4 at a 16k context in this much")
    ap.add_argument("--out", default="bench-out/quantize")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    cc = torch.cuda.get_device_capability() if CUDA else (0, 0)
    modes = [m for m in args.modes if not m.startswith("fp8") or cc >= (8, 9)]
    import torchao

    name = torch.cuda.get_device_name() if CUDA else "cpu"
    print(f"device {name} (cc {cc[0]}.{cc[1]}), torch {torch.__version__}, torchao "
          f"{torchao.__version__}, shape {args.shape}, modes {modes}", flush=True)
    clips = list(synthetic_clips(args.seconds))
    results: dict = {"modes": {}}
    for mode in modes:
        t = time.perf_counter()
        model = build(args, mode)
        row = results["modes"][mode] = {"weight_gib": model.weight_bytes / GiB, "load_s": time.perf_counter() - t}
        for ctx in args.contexts:
            try:
                row[ctx] = run_turns(model, clips, ctx)
            except torch.OutOfMemoryError as e:
                row[ctx] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            print(mode, ctx, json.dumps(row[ctx]), flush=True)
        del model
        free()
    if "int4" in modes and args.cap_gib and CUDA:
        try:
            model = build(args, "int4", cap_gib=args.cap_gib)
            results["capped"] = dict(run_turns(model, clips, 16384), cap_gib=args.cap_gib,
                                     weight_gib=model.weight_bytes / GiB)
            del model
        except torch.OutOfMemoryError as e:
            results["capped"] = {"cap_gib": args.cap_gib, "error": f"out of memory: {str(e).splitlines()[0]}"}
        finally:
            free()
            torch.cuda.set_per_process_memory_fraction(1.0)
        print(f"int4 under {args.cap_gib:g} GiB at a 16k context: {json.dumps(results['capped'])}", flush=True)
    if args.steps:
        results["agreement"] = agreement(args, [m for m in modes if m != "none"])
    if args.contexts:
        print(table(results["modes"], args.contexts))
    (Path(args.out) / "quantize.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
