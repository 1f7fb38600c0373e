#!/usr/bin/env python3
"""Streams spread over GPUs through Ray: N synthetic 1080p streams per GPU, paced in real time, each pinned to
one ``GpuWorker`` actor (``pipeline/cluster/worker.py``: one engine core per GPU), clips sent through Ray's
object store as ``livecc serve --cluster`` sends them.

As ``bench_streams.py`` (same random-weight model, same synthetic clips, same pacing: each stream's 3-s opener,
then a clip due every wall-clock second, stream i starting i/N s after stream 0, a 2-clip queue dropping the
oldest when the worker is behind), but the turns go ``worker.turn.remote(stream, clip)`` from one sender thread
per stream. Reports, per GPU count, latency from the clip being due to its caption back at the sender (p50/p99),
clips dropped and tokens per second in all: with ``--gpus 1 2`` the total should double.

    python3 scripts/bench_cluster.py --tokenizer .bench/tokenizer --gpus 1 2 --per-gpu 16 --warmup 20 --seconds 25
    python3 scripts/bench_cluster.py --tokenizer DIR --shape tiny --device cpu --gpus 1 2 --per-gpu 2 \\
        --warmup 3 --seconds 5                       # the same on CPU (workers take a ``gpu_slot`` each)

It starts a Ray instance of its own on this machine (``ray.init``: the GPUs it finds) unless ``--address``
names a running cluster.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")])

from pipeline.cluster.worker import GpuWorker  # noqa: E402
from pipeline.engine import EngineConfig  # noqa: E402


class BenchWorker(GpuWorker):
    """A ``GpuWorker`` on the random-weight model of ``bench_gpu.py`` (no checkpoint to load)."""

    def __init__(self, shape: str, tokenizer: str, device: str, slots: int, name: str):
        import torch
        from bench_gpu import loaded

        from pipeline.engine_worker import EngineWorker

        dev = torch.device(device)
        model = loaded(shape, tokenizer, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
        self.name = name
        self.engine = EngineWorker(EngineConfig(greedy=True, max_context=32768), model=model, slots=slots).start()
        self.streams = {}
        self.turns = 0
        self._lock = threading.Lock()


class Sender:
    """One stream: a 2-clip queue (oldest dropped) and a thread sending one turn at a time to its worker."""

    def __init__(self, sid: str, worker):
        self.sid, self.worker = sid, worker
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.dropped_at: list[float] = []
        self.done: list[tuple[float, float, int]] = []  # (due, latency, new tokens)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def put(self, clip) -> None:
        with self.cond:
            if len(self.queue) >= 2:
                self.dropped_at.append(self.queue.popleft().ready_at)
            self.queue.append(clip)
            self.cond.notify()

    def _loop(self) -> None:
        import ray

        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue or self.stopping)
                if self.stopping:
                    return
                clip = self.queue.popleft()
            cap, fig = ray.get(self.worker.turn.remote(self.sid, clip))
            self.done.append((clip.ready_at, time.monotonic() - clip.ready_at, fig["stats"].new_tokens))


def run(workers: list, per_gpu: int, warmup: float, seconds: float, pool: list) -> dict:
    import ray

    from bench_gpu import pct
    from bench_streams import pace

    n = per_gpu * len(workers)
    cfg = EngineConfig(greedy=True, max_context=32768)
    senders = []
    for i in range(n):
        w = workers[i % len(workers)]
        ray.get(w.open.remote(f"s{i}", cfg, []))
        senders.append(Sender(f"s{i}", w))
        senders[-1].thread.start()
    lo, hi = pace(n, warmup, seconds, pool, lambda i, clip: senders[i].put(clip))
    time.sleep(3.0)
    for s in senders:
        with s.cond:
            s.stopping = True
            s.cond.notify()
    for s in senders:
        s.thread.join(30)
        ray.get(s.worker.close.remote(s.sid))
    lat = [l for s in senders for (d, l, _) in s.done if lo <= d < hi]
    toks = sum(t for s in senders for (d, _, t) in s.done if lo <= d < hi)
    drops = sum(1 for s in senders for d in s.dropped_at if lo <= d < hi)
    return {"gpus": len(workers), "streams": n, "turns": len(lat), "due": n * int(seconds), "dropped": drops,
            "p50_ms": round(pct(lat, 50) * 1000, 1), "p99_ms": round(pct(lat, 99) * 1000, 1),
            "max_ms": round(max(lat) * 1000, 1) if lat else None, "tokens_per_s": round(toks / seconds, 1)}


def gone(workers: list, timeout: float = 60.0) -> None:
    """Wait until killed actors are dead (a call on them fails), at most ``timeout`` seconds."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    end = time.monotonic() + timeout
    for w in workers:
        while time.monotonic() < end:
            try:
                ray.get(w.ping.remote(), timeout=max(0.1, min(2.0, end - time.monotonic())))
            except RayActorError:
                break
            except GetTimeoutError:
                pass
            time.sleep(0.2)
    time.sleep(1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a folder with the Qwen2 tokenizer files")
    ap.add_argument("--shape", default="7b", choices=["7b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="worker counts to run, one after another")
    ap.add_argument("--per-gpu", type=int, default=16, help="streams per worker (16: bench_streams.py's figure)")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--address", help="a running Ray cluster (default: start one here)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)

    import ray

    from bench_gpu import synthetic_clips

    cuda = a.device.startswith("cuda")
    if a.address:
        ray.init(address=a.address)
    else:  # a private instance on loopback: no token file written to ~/.ray (Ray 2.60 makes one by default)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(resources=None if cuda else {"gpu_slot": max(a.gpus)}, include_dashboard=False)
    opts = {"num_gpus": 1} if cuda else {"resources": {"gpu_slot": 1}}
    have = ray.cluster_resources().get("GPU" if cuda else "gpu_slot", 0)
    if have < max(a.gpus):  # the workers would wait for a GPU forever
        print(f"Ray sees {have:g} GPU(s), --gpus asks for {max(a.gpus)}", file=sys.stderr)
        ray.shutdown()
        return 2
    Worker = ray.remote(max_restarts=0, max_concurrency=4 * a.per_gpu + 8)(BenchWorker)
    pool = list(synthetic_clips(64))
    rows = []
    for g in a.gpus:
        workers = [Worker.options(num_cpus=0, **opts).remote(a.shape, a.tokenizer, a.device, a.per_gpu, f"w{i}")
                   for i in range(g)]
        t = time.monotonic()
        ray.get([w.ping.remote() for w in workers])  # models loaded
        print(f"{g} worker(s) ready after {time.monotonic() - t:.1f} s", flush=True)
        rows.append(run(workers, a.per_gpu, a.warmup, a.seconds, pool))
        print(json.dumps(rows[-1]), flush=True)
        if a.json:  # row by row: a run cut short still leaves what it measured
            Path(a.json).write_text(json.dumps(rows, indent=1))
        for w in workers:
            ray.kill(w)
        gone(workers)  # their processes (and GPU memory) gone before the next row loads its models
    cols = ["gpus", "streams", "turns", "due", "dropped", "p50_ms", "p99_ms", "max_ms", "tokens_per_s"]
    print(f"### streams spread over GPUs through Ray ({a.shape}, {a.per_gpu} per GPU, warm-up {a.warmup:g} s, "
          f"{a.seconds:g} s measured)")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
