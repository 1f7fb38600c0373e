#!/usr/bin/env python3
"""GPU benchmark: our streaming engine vs the reference LiveCC loop, same GPU, same run.

Builds a Qwen2-VL with LiveCC-7B's exact shape and random weights on the GPU (no download is possible
on the lent machines), feeds synthetic 1080p frames through the real engine for N seconds of video
(opener + one turn per second, 16-token captions), and prints per-turn latency by phase. With
``--livecc-repo`` it then runs ``scripts/bench_reference.py`` (the unmodified reference loop, in a
subprocess with its own transformers 4.57.6 on ``--reference-path``) and prints both side by side.

    python3 scripts/bench_gpu.py --seconds 60 --tokenizer .bench/tokenizer \
        [--livecc-repo .bench/livecc --reference-path /tmp/ref457] [--out results/]
    python3 scripts/bench_gpu.py --shape tiny --device cpu --seconds 8   # a dry run anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.engine import EngineConfig, LoadedModel, StreamingSession  # noqa: E402
from pipeline.engine.quantize import to_device, weight_bytes  # noqa: E402
from pipeline.engine.vision import PatchSpec  # noqa: E402
from pipeline.capture.frames import resize_frames  # noqa: E402
from pipeline.types import Clip  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064,
               vision=dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=3584, mlp_ratio=4)),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=152064,
                 vision=dict(depth=2, embed_dim=64, num_heads=4, hidden_size=128, mlp_ratio=4)),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A Qwen2-VL of the given shape with random weights, built directly on the device."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    s = dict(SHAPES[shape])
    vision = s.pop("vision")
    section = [16, 24, 24] if shape == "7b" else [4, 6, 6]
    cfg = Qwen2VLConfig(text_config=dict(s, max_position_embeddings=32768, rope_theta=1e6,
                                         rope_scaling={"type": "mrope", "mrope_section": section},
                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": section}),
                        vision_config=dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                           in_channels=3), **s)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Qwen2VLForConditionalGeneration(cfg)
        finally:
            torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("ln_q.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model.to(dtype).eval().requires_grad_(False)


def loaded(shape: str, tokenizer_dir: str, device: torch.device, dtype: torch.dtype,
           quantize: str = "none") -> LoadedModel:
    """The random model as the engine loads a checkpoint; ``quantize`` as ``engine.quantize`` (the model goes
    to the CPU first and is quantized layer by layer onto the device, as ``load_model`` does)."""
    hf = random_model(shape, device, dtype)
    if quantize != "none":
        hf = hf.cpu()
        torch.cuda.empty_cache()
        to_device(hf, device, quantize)
    return wrap(hf, tokenizer_dir, shape, device, dtype, quantize)


def wrap(hf, tokenizer_dir: str, shape: str, device: torch.device, dtype: torch.dtype, quantize: str) -> LoadedModel:
    """A ``LoadedModel`` around a model already on ``device``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    stop = tuple(tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    return LoadedModel(hf=hf, tokenizer=tok, patches=PatchSpec(), stop_ids=stop,
                       silence_id=tok(" ...", add_special_tokens=False).input_ids[-1],
                       sampling={"temperature": 0.7, "top_k": 20, "top_p": 0.8}, name=f"random-{shape}",
                       device=device, dtype=dtype, attention="sdpa", quantize=quantize,
                       weight_bytes=weight_bytes(hf))


def set_past_split(parts: int) -> None:
    """The prefill's cuDNN attention over a row's past in ``parts`` parts (``runner.PAST_SPLIT``), in blocks of
    1024·parts keys; 1: one part in blocks of 2048 (the engine's default). Read when a prefill runs or is captured,
    so set it before the core that is measured is built."""
    from pipeline.engine import runner

    runner.PAST_SPLIT, runner.PAST_BLOCK = parts, (2048 if parts == 1 else 1024 * parts)


def synthetic_clips(seconds: int, height=1080, width=1920, pool_s: int = 60):
    """A moving 1080p test pattern at 2 fps: the opener (6 frames), then 2 frames per second.

    Past ``pool_s`` seconds the frames of earlier seconds are reused (with new timestamps), so long runs
    cost no extra frame synthesis."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    def frame(t):
        r = (np.sin(xx / 97 + t * 3) * 127 + 128)
        g = (np.cos(yy / 53 - t * 2) * 127 + 128)
        b = ((xx + yy + t * 400) % 256)
        return np.stack([r, g, b], axis=-1).astype(np.uint8)

    times = [i * 0.5 for i in range(6)]
    yield Clip(resize_frames(np.stack([frame(t) for t in times])), tuple(times))
    pool = []
    for s in range(3, seconds):
        times = (float(s), s + 0.5)
        if len(pool) < pool_s:
            pool.append(resize_frames(np.stack([frame(t) for t in times])))
        yield Clip(pool[(s - 3) % len(pool)], times)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def run_engine(model: LoadedModel, clips, fast: bool, greedy: bool = True, context: str = "none",
               compile: bool | None = None) -> dict:
    session = StreamingSession(model, EngineConfig(greedy=greedy, fast=fast, max_context=32768, context=context,
                                                   compile=compile))  # the default is compile on CUDA
    turns = []
    torch.cuda.reset_peak_memory_stats() if model.device.type == "cuda" else None
    for clip in clips:
        clip = Clip(clip.frames, clip.timestamps)  # ready now
        t0 = time.perf_counter()
        cap = session.step(clip)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        st = session.last_stats
        turns.append(dict(latency=dt, vision=st.vision_s, prefill=st.prefill_s, decode=st.decode_s,
                          tokens=st.new_tokens, context=st.context, token_ids=list(cap.token_ids), at=clip.stop,
                          mem=torch.cuda.memory_allocated() / 2**30 if model.device.type == "cuda" else 0.0))
    mem = torch.cuda.max_memory_allocated() / 2**30 if model.device.type == "cuda" else 0.0
    out = summarize(turns, mem)
    out["rollovers"], out["evicted_turns"] = session.rollovers, session.evicted_turns
    return out


def minute_table(r: dict) -> str:
    """Per-minute latency and memory of a long run: is it flat?"""
    lines = ["| minute | turns | p50 ms | p99 ms | max ms | GPU GiB (end) | context (max) |", "|---|---|---|---|---|---|---|"]
    by = {}
    for t in r["turns"][1:]:
        by.setdefault(int(t["at"] // 60), []).append(t)
    for m, ts in sorted(by.items()):
        lat = [t["latency"] * 1000 for t in ts]
        lines.append(f"| {m + 1} | {len(ts)} | {pct(lat, 50):.1f} | {pct(lat, 99):.1f} | {max(lat):.1f} | "
                     f"{ts[-1]['mem']:.2f} | {max(t['context'] for t in ts)} |")
    first, last = by[min(by)], by[max(by)]
    ratio = pct([t["latency"] for t in last], 99) / pct([t["latency"] for t in first], 99)
    lines.append(f"\np99 last minute / first minute: {ratio:.2f}; rollovers {r['rollovers']}, evicted turns "
                 f"{r['evicted_turns']}")
    return "\n".join(lines)


def summarize(turns, peak_gib) -> dict:
    later = turns[1:] or turns  # the opener (6 frames) is reported apart
    ms = lambda k, q: pct([t[k] for t in later], q) * 1000  # noqa: E731
    toks = sum(t["tokens"] for t in later)
    dec = sum(t["decode"] for t in later)
    return dict(turns=turns, n=len(turns), peak_gib=peak_gib, context_end=turns[-1]["context"],
                p50=ms("latency", 50), p95=ms("latency", 95), p99=ms("latency", 99),
                vision_p50=ms("vision", 50), prefill_p50=ms("prefill", 50), decode_p50=ms("decode", 50),
                ms_per_token=dec / max(toks - len(later), 1) * 1000,  # tokens fed = generated - 1 per turn
                tokens_per_s=toks / sum(t["latency"] for t in later), opener_ms=turns[0]["latency"] * 1000)


def agreement(a: dict, b: dict) -> float:
    same = sum(x["token_ids"] == y["token_ids"] for x, y in zip(a["turns"], b["turns"]))
    return same / max(len(a["turns"]), 1)


def run_reference(args) -> dict | None:
    if not args.livecc_repo:
        return None
    out = Path(args.out) / "reference.json"
    env = dict(os.environ, PYTHONPATH=args.reference_path or "")
    cmd = [sys.executable, str(Path(__file__).with_name("bench_reference.py")), "--livecc-repo", args.livecc_repo,
           "--seconds", str(args.reference_seconds or args.seconds), "--shape", args.shape, "--tokenizer",
           args.tokenizer, "--liger", args.reference_liger, "--out", str(out)]
    print("reference:", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0 or not out.exists():
        print(f"reference run failed (exit {r.returncode})", flush=True)
        return None
    full = json.loads(out.read_text())
    s = full["summary"]
    steady = s["steady_turns_2_on"]
    row = dict(n=s["turns"], p50=steady["wall_ms"]["p50"], p95=steady["wall_ms"]["p95"], p99=steady["wall_ms"]["p99"],
               ms_per_token=steady["ms_per_generated_token_total"], tokens_per_s=steady["tokens_per_s_wall"],
               peak_gib=(s.get("peak_mem_allocated_mib") or 0) / 1024, context_end=s.get("context_at_end"))
    return dict(row, raw=full)


def table(rows: list[tuple[str, dict]]) -> str:
    cols = [("p50 ms", "p50"), ("p95 ms", "p95"), ("p99 ms", "p99"), ("vision p50", "vision_p50"),
            ("prefill p50", "prefill_p50"), ("decode p50", "decode_p50"), ("ms/token", "ms_per_token"),
            ("tokens/s", "tokens_per_s"), ("peak GiB", "peak_gib"), ("context", "context_end")]
    head = "| path | turns | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for name, r in rows:
        vals = [f"{r.get(k, float('nan')):.1f}" if isinstance(r.get(k), float) else str(r.get(k, "-")) for _, k in cols]
        lines.append(f"| {name} | {r.get('n', '-')} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokenizer", required=True, help="folder with a Qwen2 tokenizer (e.g. the tiny qwen checkpoint)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain (no CUDA graph) path")
    ap.add_argument("--livecc-repo", help="a work tree of showlab/livecc: also time the reference loop")
    ap.add_argument("--reference-path", help="PYTHONPATH for the reference (transformers 4.57.6, livecc-utils)")
    ap.add_argument("--reference-seconds", type=int)
    ap.add_argument("--reference-liger", choices=["on", "off"], default="off")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--long", choices=["rollover", "window"], help="a long run under this context policy only")
    ap.add_argument("--compile", action="store_true", help="also time the default path (torch.compile'd decode step)")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, shape {args.shape}, {args.seconds} s of 1080p video", flush=True)
    t = time.perf_counter()
    model = loaded(args.shape, args.tokenizer, dev, dtype)
    clips = list(synthetic_clips(args.seconds))
    print(f"model + clips ready in {time.perf_counter() - t:.1f} s", flush=True)
    rows, results = [], {}
    run_engine(model, clips[:4], fast=dev.type == "cuda")  # warm-up (kernels, allocator)
    if args.long:
        r = run_engine(model, clips, fast=dev.type == "cuda", context=args.long)
        print(table([(f"engine, {args.long}, {args.seconds} s", r)]))
        print(minute_table(r))
        (Path(args.out) / f"long_{args.long}.json").write_text(json.dumps({k: v for k, v in r.items() if k != "turns"}))
        return 0
    if not args.no_plain and dev.type == "cuda":  # the plain path first: it gets no head start from the fast one
        results["plain"] = run_engine(model, clips, fast=False)
        rows.append(("engine, plain (no CUDA graphs)", results["plain"]))
    results["fast"] = run_engine(model, clips, fast=dev.type == "cuda", compile=False)
    rows.append(("engine, CUDA graphs, no compile" if dev.type == "cuda" else "engine", results["fast"]))
    if args.compile:
        t = time.perf_counter()
        run_engine(model, clips[:2], fast=True, compile=True)  # compile + capture
        print(f"torch.compile + capture: {time.perf_counter() - t:.1f} s", flush=True)
        results["compiled"] = run_engine(model, clips, fast=True, compile=True)
        rows.append(("engine default (CUDA graphs + torch.compile)", results["compiled"]))
        results["agreement_compiled"] = agreement(results["fast"], results["compiled"])
    if "plain" in results:
        results["agreement"] = agreement(results["fast"], results["plain"])
    ref = run_reference(args)
    if ref:
        results["reference"] = ref
        rows.append(("reference demo/infer.py", ref))
    print(table(rows))
    if "agreement_compiled" in results:
        print(f"compiled vs graphs: {results['agreement_compiled'] * 100:.0f}% of turns with identical tokens")
    if "agreement" in results:
        print(f"fast vs plain: {results['agreement'] * 100:.0f}% of turns with identical tokens (greedy, bf16)")
    if ref and ref.get("p50"):
        best = results.get("compiled", results["fast"])
        print(f"speed-up vs reference (p50 per turn): {ref['p50'] / best['p50']:.1f}x")
    (Path(args.out) / "engine.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
