"""``livecc demo``: the whole live pipeline, offline, in under a minute on a CPU.

Source: the built-in test video (colour bars, moving shapes, a frame counter) played at real time
through the same capture thread a live stream uses. Model: the tiny random-weight checkpoint in
LiveCC's format (built on first use, no download). Sinks: SubRip subtitles, a JSONL log, the video
with captions burned in (MP4) and the OBS overlay page.
"""

from __future__ import annotations

import shlex
import socket
import sys
from pathlib import Path

DEMO_SECONDS = 20.0
BANNER = """\
livecc demo: the whole live pipeline on this machine, offline ({seconds:g} s of video, played in real time).
  The model is a TINY RANDOM-WEIGHT stand-in for LiveCC (no GPU, no download): its words are random
  on purpose. Everything around it is the real thing: capture, 2 fps sampling, the streaming engine,
  the sinks. To caption for real (needs a GPU; about 16 GB for the 7B model in bfloat16):
      livecc run rtmp://your-server/live/stream --model chenjoya/LiveCC-7B-Instruct --sink overlay
"""


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline offline on a tiny random model (no GPU, no download)")
    p.add_argument("--out", default="livecc-demo", help="folder for the outputs (default ./livecc-demo)")
    p.add_argument("--seconds", type=float, default=DEMO_SECONDS, help=f"test video length (default {DEMO_SECONDS:g})")
    p.add_argument("--vocab", choices=["qwen", "small"], default="qwen",
                   help="tiny model's vocabulary: qwen (Qwen2's real 151k-token tokenizer, as LiveCC; default) "
                        "or small (its first 4k tokens: a few times faster per turn on a busy CPU)")
    p.add_argument("--port", type=int, default=8765, help="overlay / control server port (default 8765, "
                   "or a free one if taken)")
    p.add_argument("--status", choices=["auto", "rich", "plain", "off"], default="auto")
    p.set_defaults(func=cmd_demo)


def _port(preferred: int) -> int:
    """``preferred`` if it is free on 127.0.0.1, else a free one."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


def demo_config(out: Path, model: str, port: int, status: str = "auto") -> dict:
    return {
        "engine": {"model": model, "device": "cpu", "dtype": "float32", "seed": 0},
        "sinks": [
            # the demo's own folder: each demo replaces the previous one's files (the message names them)
            {"kind": "srt", "path": str(out / "captions.srt"), "existing": "overwrite"},
            {"kind": "jsonl", "path": str(out / "captions.jsonl"), "existing": "overwrite"},
            {"kind": "burnin", "output": str(out / "burnin.mp4"), "ttl_s": 3.0, "existing": "overwrite"},
            {"kind": "overlay"},
            {"kind": "console", "stream": "stdout"},
        ],
        "server": {"host": "127.0.0.1", "port": port},
        "status": {"mode": status, "interval_s": 5.0},
        "log": {"level": "warning"},
        "shutdown": {"turn_timeout_s": 10.0, "sinks_timeout_s": 20.0},
    }


def cmd_demo(args) -> int:
    from .. import config
    from ..fixtures.testvideo import test_video
    from ..fixtures.tiny import tiny_checkpoint
    from .run import execute

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(BANNER.format(seconds=args.seconds), file=sys.stderr, flush=True)
    said: list[str] = []

    def preparing() -> None:  # only when the cache lacks them: the first run (or a new --seconds / --vocab)
        if not said:
            said.append("yes")
            print("preparing the test video and the tiny model (first run only) ...", file=sys.stderr, flush=True)

    video = test_video(seconds=args.seconds, on_build=preparing)
    ckpt = tiny_checkpoint(args.vocab, on_build=preparing)
    port = _port(args.port)
    cfg = config.validate(demo_config(out, str(ckpt), port, args.status), "demo")
    cfg.capture.source = str(video)

    def started(pipeline) -> None:
        print(f"running: open http://127.0.0.1:{port}/overlay in a browser (or an OBS Browser Source) "
              f"while it runs; status at http://127.0.0.1:{port}/api/status\n", file=sys.stderr, flush=True)

    code = execute(cfg, on_started=started)
    srt = out / "captions.srt"
    print(f"""
done. Look at:
  {out / 'burnin.mp4'}      the test video with the captions burned in (any player)
  {srt}    SubRip subtitles (load next to the video: e.g. mpv {video} --sub-file={srt})
  {out / 'captions.jsonl'}  one JSON object per turn (start, stop, text, latency_s, ...)
The words are random: the tiny model has random weights. It stays in {ckpt}: the other commands
take it on this machine too, e.g.
  livecc caption {shlex.quote(str(video))} --model {shlex.quote(str(ckpt))} --device cpu --srt captions.srt
For real captions, on a GPU machine:
  LIVECC_EXTRAS=gpu bash scripts/install.sh
  livecc run YOUR_STREAM_URL --model chenjoya/LiveCC-7B-Instruct --config configs/sports.yaml --sink overlay
""", file=sys.stderr, flush=True)
    return code
