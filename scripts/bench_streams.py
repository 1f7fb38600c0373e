#!/usr/bin/env python3
"""Many live streams on one GPU: N synthetic 1080p streams paced in real time through one engine core.

Each stream gets its 3-s opener, then a 2-frame clip every second of wall clock (stream i starts i/N s
after stream 0, so turns arrive spread over the second), through a per-stream queue of 2 clips that
drops the oldest when the engine is behind (as ``livecc run`` does). After ``--warmup`` seconds (CUDA
graphs captured, contexts grown) every turn due in the next ``--seconds`` is measured: latency from the
clip being due to its caption (p50/p99 over all streams' turns), clips dropped, tokens per second,
peak GPU memory. A random-weight model never emits EOS, so every turn decodes the full 16 tokens. ``--busy S``:
also the GPU's busy share over S seconds in the middle of the measured window (the union of its kernels and copies,
from torch.profiler's CUDA activity; the events are read after the run, so parsing them does not slow it).

    python3 scripts/bench_streams.py --tokenizer .bench/tokenizer --streams 1 8 16 32 48
    python3 scripts/bench_streams.py --tokenizer .bench/tokenizer --processes 6   # N one-stream processes
    python3 scripts/bench_streams.py --tokenizer .bench/tokenizer --quantize fp8 --streams 8 32 --batch-kernel off on
    python3 scripts/bench_streams.py --shape tiny --device cpu --streams 1 2 --warmup 3 --seconds 5
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import heapq
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import loaded, pct, set_past_split, synthetic_clips  # noqa: E402

from pipeline.engine import EngineConfig, StreamingSession, make_core  # noqa: E402
from pipeline.engine import fp8, int4  # noqa: E402
from pipeline.engine import runner as runner_mod  # noqa: E402
from pipeline.engine.context import stagger_fraction  # noqa: E402


class PacedStream:
    """A StreamPort fed by the pacer: a 2-clip queue dropping the oldest, one turn in flight."""

    def __init__(self, session: StreamingSession, clips: list):
        self.session, self.clips = session, clips
        self.queue: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.dropped_at: list[float] = []  # ready times of the clips dropped
        self.done: list[tuple[float, float, int]] = []  # (due, latency, new tokens)
        self.stats: list = []  # (due, TurnStats)

    def put(self, clip) -> None:
        with self.lock:
            if len(self.queue) >= 2:
                self.queue.popleft()
                self.dropped_at.append(clip.ready_at)
            self.queue.append(clip)

    def due(self):
        with self.lock:
            return self.queue[0].ready_at if self.queue else None

    def next_request(self):
        with self.lock:
            clip = self.queue.popleft() if self.queue else None
        if clip is None:
            return None
        req = self.session.video_request(clip)
        req.on_done = self.finish
        return req

    def finish(self, req, res) -> None:
        if isinstance(res, BaseException):  # (the engine stopping at the end of the run)
            return
        now = time.monotonic()
        self.session.finish(req, res)
        self.done.append((req.due, now - req.due, res.stats.new_tokens))
        self.stats.append((req.due, res.stats))


def pace(n: int, warmup: float, seconds: float, pool: list, put) -> tuple[float, float]:
    """Feed ``n`` streams in real time: ``put(i, clip)`` gives stream i its 3-s opener (``pool[0]``) at 3 s, then a
    2-frame clip every wall-clock second, stream i starting i/n s after stream 0; clips past the pool reuse it
    with new timestamps; ``ready_at`` is when it was put. Returns (lo, hi), the monotonic window of the
    ``seconds`` measured after ``warmup``; returns once the last clip due before hi + 1 s was put."""
    t0 = time.monotonic() + 0.5
    end = t0 + 3 + warmup + seconds + 1
    heap = [(t0 + 3 + i / n, i, 0) for i in range(n)]  # (due, stream, clip index): opener due at 3 s
    heapq.heapify(heap)
    while heap:
        due, i, k = heapq.heappop(heap)
        if due > end:
            break
        time.sleep(max(0.0, due - time.monotonic()))
        clip = pool[k] if k < len(pool) else pool[1 + (k - 1) % (len(pool) - 1)]
        stamp = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5) if k == 0 else (2.0 + k, 2.5 + k)
        put(i, dataclasses.replace(clip, timestamps=stamp, ready_at=time.monotonic()))
        heapq.heappush(heap, (due + 1.0, i, k + 1))
    return t0 + 3 + warmup, t0 + 3 + warmup + seconds


def busy_us(spans) -> float:
    """The length of the union of (start, end) spans (any order, µs): the time the GPU ran at least one of them."""
    busy, last = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > last:
            busy += b - max(a, last)
            last = b
    return busy


def busy_share(prof, seconds: float) -> float:
    """Percent of ``seconds`` the GPU ran a kernel or a copy, from a finished torch.profiler run (CUDA activity)."""
    cuda = torch.autograd.DeviceType.CUDA
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == cuda]
    return round(100 * busy_us(spans) / (seconds * 1e6), 1)


def run(model, n: int, warmup: float, seconds: float, slots: int | None, pool: list, prefill_batch: int = 0,
        steps_per_prefill: int = 0, prefill_compiled: str = "on", max_context: int = 32768,
        overlap: str = "on", prefill_graphs: str = "on", decode_attention: str = "split-kv",
        busy: float = 0.0, sample: bool = False, stagger: float = 0.0, past_split: int = runner_mod.PAST_SPLIT,
        batch_kernel: str = "on") -> dict:
    cfg = EngineConfig(greedy=not sample, max_context=max_context)
    t_start = time.perf_counter()
    runner_mod.SPLIT_KV_DECODE = decode_attention == "split-kv"  # read when the core's runner is built
    set_past_split(past_split)
    fp8.BATCH_KERNEL = int4.BATCH_KERNEL = batch_kernel == "on"  # read when the decode steps are compiled, captured
    core = make_core(model, cfg, slots=slots or n)
    start_s = time.perf_counter() - t_start  # incl. compiling and capturing every decode batch size
    if prefill_compiled == "off":
        core.runner.prefill_compiled = False  # compiled at start all the same; the prefill runs eager
    core.overlap = overlap == "on"
    if prefill_graphs == "off":
        core.runner.prefill_graphs = None
    elif prefill_graphs == "flash" and core.runner.prefill_graphs is not None:
        core.runner.prefill_graphs.cudnn = False  # the graphs' attention over the past through FlashAttention only
    core.prefill_batch = prefill_batch or core.prefill_batch
    core.decode_steps_per_prefill = steps_per_prefill or core.decode_steps_per_prefill
    streams = []
    for i in range(n):
        session = StreamingSession(model, cfg, core=core)
        session.rollover_early = stagger_fraction(session.slot, stagger)  # as EngineWorker.open_session does
        s = PacedStream(session, pool)
        streams.append(s)
        core.attach(s)
    torch.cuda.reset_peak_memory_stats() if model.device.type == "cuda" else None
    print(f"# {n} streams: engine ready in {start_s:.0f} s", file=sys.stderr, flush=True)
    core.start()
    beat = threading.Event()

    def heartbeat():  # progress on stderr every 10 s (what a run cut short by its time limit was doing)
        t0 = time.monotonic()
        while not beat.wait(10.0):
            done = sum(len(s.done) for s in streams)
            drops = sum(len(s.dropped_at) for s in streams)
            ctx = max(s.session.context_length for s in streams)
            print(f"#   {time.monotonic() - t0:.0f} s: {done} turns done, {drops} clips dropped, {core.steps} decode "
                  f"steps, longest context {ctx}", file=sys.stderr, flush=True)
    threading.Thread(target=heartbeat, daemon=True).start()

    def put(i, clip):
        streams[i].put(clip)
        core.wake()

    traced: list = []

    def trace(at: float):  # the GPU's activity over ``busy`` s from monotonic ``at``
        time.sleep(max(0.0, at - time.monotonic()))
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        prof.start()
        time.sleep(busy)
        prof.stop()
        traced.append(prof)
    if busy and model.device.type == "cuda":
        # the pacer's window starts 3.5 s (opener) + warm-up from now; the trace sits in the middle of the measured part
        threading.Thread(target=trace, args=(time.monotonic() + 3.5 + warmup + max(0.0, (seconds - busy) / 2),),
                         daemon=True).start()
    lo, hi = pace(n, warmup, seconds, pool, put)
    time.sleep(2.0)  # let the last turns finish
    beat.set()
    core.stop(30)
    lat = [l for s in streams for (d, l, _) in s.done if lo <= d < hi]
    toks = sum(t for s in streams for (d, _, t) in s.done if lo <= d < hi)
    drops = sum(1 for s in streams for d in s.dropped_at if lo <= d < hi)
    due_n = n * int(seconds)
    st = [x for s in streams for (d, x) in s.stats if lo <= d < hi]
    phase = {k: round(pct([getattr(x, k) for x in st], 50) * 1000, 1) for k in ("vision_s", "prefill_s", "decode_s")}
    return {"streams": n, "turns": len(lat), "due": due_n, "dropped": drops,
            "p50_ms": round(pct(lat, 50) * 1000, 1), "p99_ms": round(pct(lat, 99) * 1000, 1),
            "max_ms": round(max(lat) * 1000, 1) if lat else None, "tokens_per_s": round(toks / seconds, 1),
            "decode_steps": core.steps, "prefill_batch": core.prefill_batch,
            "steps_per_prefill": core.decode_steps_per_prefill, "prefill_compiled": prefill_compiled,
            "overlap": overlap, "prefill_graphs": prefill_graphs, "decode_attention": decode_attention,
            "past_split": past_split,
            "batch_kernel": batch_kernel,
            "max_context": max_context, "sampling": "sample" if sample else "greedy", "rollover_stagger": stagger,
            "start_s": round(start_s, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if model.device.type == "cuda" else None,
            "context_end": max(s.session.context_length for s in streams),
            "rollovers": sum(s.session.rollovers for s in streams),
            "vision_p50_ms": phase["vision_s"], "prefill_p50_ms": phase["prefill_s"], "decode_p50_ms": phase["decode_s"],
            **({"gpu_busy_pct": busy_share(traced[0], busy)} if traced else {})}


def probe(model, counts: list[int], contexts: list[int], pool) -> str:
    """Time one decode step (all rows at the same context) and one batched prefill of 1080p turns."""
    cfg = EngineConfig(greedy=True, max_context=32768)
    core = make_core(model, cfg, slots=max(counts))
    r, dev = core.runner, model.device
    out = ["### one decode step / one prefill of 1-s 1080p turns, all rows at the same context",
           "| rows | context | decode step ms | prefill ms (all rows) | prefill ms per row |", "|---|---|---|---|---|"]
    sess = StreamingSession(model, cfg, core=core)
    turn = sess.video_request(dataclasses.replace(pool[1], timestamps=(3.0, 3.5)))
    sess.close()
    vision = r.encode_videos([turn.frames])[0]
    for ctx in contexts:
        for n in counts:
            def fill():
                for s in range(n):
                    r.cache.lengths[s] = ctx
            ms = []
            for rep in range(8):
                fill()
                toks = torch.zeros(n, dtype=torch.long, device=dev)
                torch.cuda.synchronize()
                t = time.perf_counter()
                r.decode(list(range(n)), toks, [ctx] * n)
                torch.cuda.synchronize()
                ms.append((time.perf_counter() - t) * 1000)
            pre = []
            for rep in range(3):
                fill()
                torch.cuda.synchronize()
                t = time.perf_counter()
                r.prefill([(s, turn.ids, turn.positions + ctx, vision) for s in range(n)])
                torch.cuda.synchronize()
                pre.append((time.perf_counter() - t) * 1000)
            out.append(f"| {n} | {ctx} | {min(ms[2:]):.1f} | {min(pre[1:]):.1f} | {min(pre[1:]) / n:.1f} |")
    del core, r, sess, turn, vision
    gc.collect()
    torch.cuda.empty_cache()
    return "\n".join(out)


def table(rows: list[dict], title: str) -> str:
    cols = ["streams", "sampling", "max_context", "rollover_stagger", "prefill_batch", "steps_per_prefill", "prefill_compiled", "overlap", "prefill_graphs",
            "decode_attention", "past_split", "batch_kernel", "start_s", "turns", "due", "dropped", "p50_ms", "p99_ms", "max_ms", "tokens_per_s", "vision_p50_ms",
            "prefill_p50_ms", "decode_p50_ms", "peak_gib", "context_end", "rollovers"]
    cols += ["gpu_busy_pct"] if any("gpu_busy_pct" in r for r in rows) else []
    out = [f"### {title}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a folder with the Qwen2 tokenizer files")
    ap.add_argument("--shape", default="7b", choices=["7b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 16, 32, 48])
    ap.add_argument("--slots", type=int, default=None, help="KV-cache rows (default: the stream count)")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--processes", type=int, default=0, help="also run this many one-stream processes side by side")
    ap.add_argument("--probe", type=int, nargs="*", metavar="CONTEXT",
                    help="first time one decode step and one prefill for 1..N rows at these context lengths")
    ap.add_argument("--prefill-batch", type=int, nargs="+", default=[0],
                    help="turns prefilled together at most (EngineCore.prefill_batch; 0: the engine's default); "
                         "each value is a run")
    ap.add_argument("--steps-per-prefill", type=int, nargs="+", default=[0],
                    help="decode steps between two prefills while captions decode (EngineCore.decode_steps_per_prefill;"
                         " 0: the engine's default); each value is a run")
    ap.add_argument("--prefill-compiled", nargs="+", default=["on"], choices=["on", "off"],
                    help="the prefill's norms/rotary/SiLU compiled (on, the engine's default) or eager; each value is a run")
    ap.add_argument("--max-context", type=int, nargs="+", default=[32768],
                    help="engine.max_context (a stream rolls over when its context would pass it); each value is a run")
    ap.add_argument("--overlap", nargs="+", default=["on"], choices=["on", "off"],
                    help="launch each decode step before reading the last one's tokens (on, the engine's default) or "
                         "read them first (off); each value is a run")
    ap.add_argument("--prefill-graphs", nargs="+", default=["on"], choices=["on", "flash", "off"],
                    help="a lone row's prefill replayed from a CUDA graph (on, the engine's default: the past's "
                         "2048-key blocks through cuDNN on Hopper), the graphs with FlashAttention alone (flash), "
                         "or eager (off); each value is a run")
    ap.add_argument("--decode-attention", nargs="+", default=["split-kv"], choices=["split-kv", "flash"],
                    help="the decode step's attention: the split-KV Triton kernels (split-kv, the engine's default: "
                         "pipeline/engine/decode_attention.py) or FlashAttention-2's varlen call; each value is a run")
    ap.add_argument("--past-split", type=int, nargs="+", default=[runner_mod.PAST_SPLIT],
                    help="the prefill's cuDNN attention over a row's past in this many parts (runner.PAST_SPLIT; 1: "
                         "one part in 2048-key blocks, the default; 3: in 3072-key blocks); each value is a run")
    ap.add_argument("--batch-kernel", nargs="+", default=["on"], choices=["on", "off"],
                    help="with --quantize int4/fp8: 2..64 streams' decode step through the format's several-rows "
                         "kernel (on, the engine's default: int4/fp8.BATCH_KERNEL) or its one-row kernel a row at "
                         "a time up to 4 rows, the dequantized weight beyond (off); each value is a run")
    ap.add_argument("--sample", action="store_true",
                    help="sample as a stream does by default (the checkpoint's generation_config: temperature, top-k, "
                         "top-p; unseeded) instead of greedy (tokens_per_s shows any turn that ended before 16 tokens)")
    ap.add_argument("--stagger", type=float, nargs="+", default=[0.0],
                    help="engine.rollover_stagger: row k rolls over early by stagger_fraction(k, S) of its budget "
                         "(livecc serve's default 0.25; 0: every stream at the same budget); each value is a run")
    ap.add_argument("--busy", type=float, default=0.0, metavar="S",
                    help="also trace the GPU for S seconds mid-window and report its busy share (gpu_busy_pct)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--quantize", choices=["none", "int8", "int4", "fp8"], default="none",
                    help="the language model's weights (engine.quantize)")
    a = ap.parse_args(argv)
    if a.processes:
        return side_by_side(a)
    dev = torch.device(a.device)
    t_load = time.perf_counter()
    model = loaded(a.shape, a.tokenizer, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, a.quantize)
    # progress on stderr (a GPU call has a time limit: what took the time shows even when a run is cut short)
    print(f"# model loaded in {time.perf_counter() - t_load:.0f} s", file=sys.stderr, flush=True)
    pool = list(synthetic_clips(64))
    if a.probe:
        print(probe(model, a.streams, a.probe, pool), flush=True)
    rows = []
    for n, pb, k, pc, mc, ov, pg, da, sg, ps, bk in itertools.product(
            a.streams, a.prefill_batch, a.steps_per_prefill, a.prefill_compiled, a.max_context, a.overlap,
            a.prefill_graphs, a.decode_attention, a.stagger, a.past_split, a.batch_kernel):
        print(f"# {n} streams: starting (compiling every batch size, then {a.warmup:g} s of warm-up and "
              f"{a.seconds:g} s measured)", file=sys.stderr, flush=True)
        rows.append(run(model, n, a.warmup, a.seconds, a.slots, pool, pb, k, pc, mc, ov, pg, da, a.busy, a.sample, sg,
                        ps, bk))
        print(json.dumps(rows[-1]), flush=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(table(rows, f"one process, N streams batched ({gpu}, {a.shape}, warm-up {a.warmup:g} s, "
                      f"{a.seconds:g} s measured)"))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def side_by_side(a) -> int:
    """``--processes K``: K processes of one stream each, started together (today's alternative)."""
    procs = []
    for i in range(a.processes):
        out = f"/tmp/bench_streams_proc{i}.json"
        cmd = [sys.executable, __file__, "--tokenizer", a.tokenizer, "--shape", a.shape, "--device", a.device,
               "--streams", "1", "--warmup", str(a.warmup), "--seconds", str(a.seconds), "--json", out]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=os.environ), out))
    rows = []
    for p, out in procs:
        p.wait()
        rows += json.loads(Path(out).read_text()) if p.returncode == 0 and Path(out).exists() else [
            {"streams": 1, "turns": f"failed ({p.returncode})"}]
    print(table(rows, f"{a.processes} processes side by side, one stream each"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
