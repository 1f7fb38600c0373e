#!/usr/bin/env python3
"""Write the deterministic synthetic test video (see pipeline/fixtures/testvideo.py) and print its path.

    python scripts/make_test_video.py                          # cached: $LIVECC_CACHE or ~/.cache/livecc
    python scripts/make_test_video.py --out /tmp/t.mp4 --width 1920 --height 1080 --seconds 10 --audio
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.fixtures.testvideo import make_test_video, test_video  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write here (default: the cache)")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--fps", type=Fraction, default=Fraction(30), help="e.g. 30, 25 or 30000/1001")
    ap.add_argument("--audio", action="store_true", help="add a mono AAC 440 Hz sine track")
    args = ap.parse_args(argv)
    kw = dict(seconds=args.seconds, width=args.width, height=args.height, fps=args.fps, audio=args.audio)
    path = test_video(**kw) if args.out is None else make_test_video(args.out, **kw)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
