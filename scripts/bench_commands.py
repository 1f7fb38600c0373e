"""``livecc caption`` and ``livecc run`` on the same file with the same tiny model: engine time per turn.

    python3 scripts/bench_commands.py [--seconds 8] [--threads 1 2]

Runs each command as a user would (a subprocess), on the built-in test video (640x360, 30 fps) and the tiny
random-weight checkpoint (Qwen2's 151,936-token vocabulary, as LiveCC), float32 on the CPU, seed 0, and
prints one Markdown table row per (command, threads):

- caption: wall time of the captioning loop / turns (the command's own "ms per turn" line; it is engine-bound);
- run: median ``latency_s`` of the JSONL captions (clip ready -> caption out; the file is played in real time,
  so a turn waits for no queue unless the engine is slower than 1 turn per second of video).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIVECC = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def caption(video: Path, model: Path, threads: int, out: Path) -> tuple[int, float]:
    r = subprocess.run([*LIVECC, "caption", str(video), "--model", str(model), "--dtype", "float32", "--seed", "0",
                        "--quiet", "--jsonl", str(out), "--threads", str(threads)],
                       capture_output=True, text=True, check=True)
    m = re.search(r"captioned (\d+) turns .* \((\d+) ms per turn\)", r.stderr)
    return int(m.group(1)), float(m.group(2))


def run(video: Path, model: Path, threads: int, out: Path) -> tuple[int, float]:
    subprocess.run([*LIVECC, "run", str(video), "--model", str(model), "--dtype", "float32", "--seed", "0",
                    "--sink", f"jsonl:{out}", "--status", "off", "--port", "0", "--log-level", "warning",
                    "--threads", str(threads)], capture_output=True, text=True, check=True)
    lat = [rec["latency_s"] for rec in map(json.loads, out.read_text().splitlines()) if "latency_s" in rec]
    return len(lat), statistics.median(lat) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="test video length")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipeline.fixtures.testvideo import test_video
    from pipeline.fixtures.tiny import tiny_checkpoint

    video, model = test_video(seconds=args.seconds), tiny_checkpoint("qwen")
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print("| command | torch threads | turns | ms per turn |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for threads in args.threads:
            for name, fn in (("caption", caption), ("run", run)):
                out = Path(tmp) / f"{name}-{threads}-{time.monotonic_ns()}.jsonl"
                turns, ms = fn(video, model, threads, out)
                print(f"| livecc {name} | {threads} | {turns} | {ms:.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
