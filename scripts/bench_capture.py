#!/usr/bin/env python3
"""CPU cost of capture + sampling + resize for a 1080p30 H.264 RTMP feed via nginx-rtmp.

Starts nginx-rtmp on a free loopback port, publishes a pre-encoded 1080p30 H.264 file in a loop
with ``ffmpeg -re -c copy`` (the publisher costs next to nothing and is another process), then runs
CaptureThread + LiveSampler (+ a consumer that drains clips) in this process and reports
this process's CPU time over wall time, in cores, per thread and in total.

    python3 scripts/bench_capture.py                 # 60 s, decoder threads auto
    python3 scripts/bench_capture.py --seconds 30 --threads 0 1 2 --thread-type SLICE FRAME AUTO
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import servers  # noqa: E402  (tests/servers.py: nginx-rtmp, publisher)

from pipeline.capture import CaptureThread, ClipQueue, LiveSampler, RingBuffer, resolve  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of each of our threads, by native id."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            f = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(f[11]) + int(f[12])) / TICK
    return out


def process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(url: str, seconds: float, threads: int, thread_type: str) -> dict:
    ring, clips = RingBuffer(), ClipQueue(maxsize=4)
    src = resolve(url, decoder_threads=threads, thread_type=thread_type)
    cap = CaptureThread(src, ring, wait_for_source=True).start()
    sampler = LiveSampler(ring, clips).start()
    got = []
    consumer = threading.Thread(target=lambda: got.extend(clips), name="bench-consumer", daemon=True)
    consumer.start()
    try:
        if not cap.wait_ready(30):
            raise SystemExit("no frames from the feed")
        time.sleep(4)  # warm-up: opener clip, decoder threads started, caches warm
        f0, w0, c0, t0 = cap.stats["frames"], time.monotonic(), process_cpu(), thread_cpu()
        ticks0 = sampler.stats["ticks"]
        time.sleep(seconds)
        f1, w1, c1, t1 = cap.stats["frames"], time.monotonic(), process_cpu(), thread_cpu()
        ticks1 = sampler.stats["ticks"]
        names = {t.native_id: t.name for t in threading.enumerate()}
    finally:
        sampler.stop()
        cap.stop()
    wall = w1 - w0
    per = {}
    for tid, v in t1.items():
        name = names.get(tid, "other (decoder / torch pool)")
        if name.startswith("livecc-capture"):
            name = "capture (demux + decode + RGB)"
        elif name.startswith("livecc-sampler"):
            name = "sampler (+ resize)"
        elif name == "MainThread" or name.startswith("bench-"):
            name = "main + consumer"
        per[name] = per.get(name, 0.0) + (v - t0.get(tid, 0.0)) / wall
    shape = ring.latest().image.shape if ring.latest() else None
    return {"cores": (c1 - c0) / wall, "wall": wall, "fps_in": (f1 - f0) / wall,
            "samples_per_s": (ticks1 - ticks0) / wall, "per_thread": per, "shape": shape,
            "clip_shape": got[-1].frames.shape if got else None, "threads": threads, "thread_type": thread_type}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--bitrate", default="6M", help="publisher's H.264 bitrate (YouTube: 4.5-9 Mbps at 1080p30)")
    ap.add_argument("--threads", type=int, nargs="+", default=[0], help="decoder threads (0: FFmpeg picks)")
    ap.add_argument("--thread-type", nargs="+", default=["AUTO"])
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        feed = Path(tmp) / "feed.mp4"
        print(f"encoding a 10 s {args.size}@{args.fps} H.264 feed ({args.bitrate}, x264 veryfast, GOP 2 s) ...",
              flush=True)
        servers.make_video(feed, size=args.size, fps=args.fps, seconds=10, gop=2 * args.fps,
                           extra=["-preset:v", "veryfast", "-b:v", args.bitrate, "-maxrate", args.bitrate,
                                  "-bufsize", "12M", "-bf", "2"])
        with servers.NginxRtmp() as ngx, servers.Publisher(ngx.url("bench"), input_file=str(feed)):
            rows = [run(ngx.url("bench"), args.seconds, n, tt) for tt in args.thread_type for n in args.threads]
    print(f"\n{os.cpu_count()} CPUs; {args.size}@{args.fps} H.264 via nginx-rtmp; {args.seconds:.0f} s per row")
    print(f"{'decoder threads':>15} {'type':>6} {'fps in':>7} {'samples/s':>9} {'cores':>6}   per thread (cores)")
    for r in rows:
        per = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["per_thread"].items(), key=lambda kv: -kv[1]) if v >= 0.001)
        print(f"{r['threads'] or 'auto':>15} {r['thread_type']:>6} {r['fps_in']:7.2f} {r['samples_per_s']:9.3f} "
              f"{r['cores']:6.3f}   {per}")
    print(f"frames {rows[-1]['shape']} -> clips {rows[-1]['clip_shape']}")


if __name__ == "__main__":
    main()
