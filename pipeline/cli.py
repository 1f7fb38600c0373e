"""The ``livecc`` command: builds the parser and dispatches to ``pipeline.commands``.

Imports nothing heavy (no torch, no model code): ``livecc --help`` and a configuration error answer at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .commands import ask, caption, demo, drain, run, serve
from .errors import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livecc", description="Live video captioning with LiveCC.",
                                epilog="Try `livecc demo` (offline, no GPU, no download); "
                                       "`livecc COMMAND --help` for a command's options.")
    p.add_argument("--version", action="version", version=f"livecc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    caption.add_parser(sub)
    run.add_parser(sub)
    serve.add_parser(sub)
    drain.add_parser(sub)
    ask.add_parser(sub)
    demo.add_parser(sub)
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that a command whose positionals end in a list (``livecc ask VIDEO
    [QUESTION ...]``) also takes the ones written after or between its options: argparse fills such a list
    from the first run of positionals only and calls the rest "unrecognized arguments"."""
    args, extra = parser.parse_known_args(argv)
    field = getattr(args, "trailing_positionals", None)
    if extra and field and not any(e.startswith("-") for e in extra):
        getattr(args, field).extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    # torchao (where installed) registers enums with torch's pytree at import, and torch >= 2.14 logs a
    # deprecation line for each: noise on every command's stderr, which is for one-line errors and logs
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command is None:  # a bare `livecc`: what it can do, not an argparse complaint
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        print(f"livecc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
