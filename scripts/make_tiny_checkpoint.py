#!/usr/bin/env python3
"""Build the tiny LiveCC-style test checkpoint (see pipeline/fixtures/tiny.py) and print its folder.

    python scripts/make_tiny_checkpoint.py                     # cached: $LIVECC_CACHE or ~/.cache/livecc
    python scripts/make_tiny_checkpoint.py --vocab small --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.fixtures.tiny import build_tiny_checkpoint, tiny_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", choices=("qwen", "small"), default="qwen",
                    help="qwen: the real Qwen2 vocabulary (151,657 tokens); small: its first 4,096 ranks + specials")
    ap.add_argument("--out", type=Path, default=None, help="build into this folder (default: the cache)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out is None:
        path = tiny_checkpoint(args.vocab, seed=args.seed)
    else:
        path = build_tiny_checkpoint(args.out, vocab=args.vocab, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
