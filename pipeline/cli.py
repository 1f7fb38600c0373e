"""The ``livecc`` command: ``caption`` a recorded video, ``run`` a live stream, ``demo`` offline."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .engine.config import DEFAULT_MODEL, DEFAULT_QUERY

log = logging.getLogger("livecc")


class UserError(RuntimeError):
    """An expected failure: printed as one line, exit status 2, no traceback."""


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"Hugging Face id or local folder (default {DEFAULT_MODEL})")
    g.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available)")
    g.add_argument("--dtype", default=None, help="auto (bf16 on GPU), bfloat16, float16, float32")
    g.add_argument("--query", default=None, help=f"commentary instruction (default {DEFAULT_QUERY!r})")
    g.add_argument("--greedy", action="store_true", default=None, help="greedy decoding instead of sampling")
    g.add_argument("--max-new-tokens", type=int, default=None, help="caption length cap per turn (default 16)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="default 1.05")
    g.add_argument("--positions", choices=["seed", "exact"], default=None,
                   help="seed: the reference's positions (default); exact: training-consistent 3-D positions")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--quantize", choices=["none", "int8", "int4", "fp8"], default=None,
                   help="language-model weights: none (default), int8, int4 (CUDA), fp8 (CUDA, compute capability "
                        "8.9+)")


def _engine_config(args, base=None):
    from dataclasses import replace

    from .engine import EngineConfig

    cfg = base or EngineConfig()
    over = {k: v for k, v in dict(model=args.model, device=args.device, dtype=args.dtype, query=args.query,
                                   greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                                   repetition_penalty=args.repetition_penalty, positions=args.positions,
                                   seed=args.seed, quantize=args.quantize).items() if v is not None}
    try:
        return replace(cfg, **over)
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_caption(args) -> int:
    from .commands import evaluation

    if evaluation.selected(args):
        return evaluation.main(args)
    from .engine import StreamingSession, load_model
    from .plugins import make_sink
    from .capture.files import file_clips, probe

    duration, _ = probe(args.video)  # a clear error before the model loads
    cfg = _engine_config(args)
    sinks = [make_sink({"kind": "jsonl", "path": args.jsonl, "include_events": False})] if args.jsonl else []
    if args.srt:
        sinks.append(make_sink({"kind": "srt", "path": args.srt}))
    if args.vtt:
        sinks.append(make_sink({"kind": "vtt", "path": args.vtt}))
    if not sinks:
        sinks.append(make_sink("console"))
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
    session = StreamingSession(model, cfg)
    for s in sinks:
        s.start()
    turns, t0 = 0, time.perf_counter()
    progress = _progress(duration, quiet=args.quiet)
    try:
        for clip in file_clips(args.video, max_pixels=cfg.max_pixels):
            caption = session.step(clip)
            turns += 1
            for s in sinks:
                s.on_caption(caption)
            progress(clip.stop, caption.text)
    finally:
        for s in sinks:
            s.stop()
        progress(None, None)
    took = time.perf_counter() - t0
    print(f"captioned {turns} turns ({duration:.1f} s of video) in {took:.1f} s "
          f"({took / max(turns, 1) * 1000:.0f} ms per turn)", file=sys.stderr)
    return 0


def _progress(duration: float, quiet: bool):
    """A rich progress bar over video time on a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        return lambda at, text: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                   TimeRemainingColumn(), transient=True)
    task = bar.add_task("captioning", total=max(duration, 1.0))
    bar.start()

    def update(at, text):
        if at is None:
            bar.stop()
        else:
            bar.update(task, completed=at, description=(text or "")[:40])
    return update


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livecc", description="Live video captioning with LiveCC")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("caption", help="caption a recorded video as fast as the hardware allows")
    c.add_argument("video")
    c.add_argument("--jsonl", help="write one JSON object per turn here")
    c.add_argument("--srt", help="also write SubRip subtitles here")
    c.add_argument("--vtt", help="also write WebVTT subtitles here")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    _engine_args(c)
    from .commands import evaluation

    evaluation.add_arguments(c)
    c.set_defaults(func=cmd_caption)
    for extra in _extra_commands:
        extra(sub)
    return p


_extra_commands: list = []  # subcommands added by other modules (run, demo)


def _live_commands(sub) -> None:
    from . import demo, run

    run.add_parser(sub)
    demo.add_parser(sub)


_extra_commands.append(_live_commands)


def _ask_command(sub) -> None:
    from .commands import ask

    ask.add_parser(sub)


_extra_commands.append(_ask_command)


def _serve_command(sub) -> None:
    from .commands import serve

    serve.add_parser(sub)


_extra_commands.append(_serve_command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .engine import ContextFullError, ModelLoadError
    from .plugins import PluginError
    from .capture.files import VideoFileError

    try:
        return args.func(args) or 0
    except (UserError, ModelLoadError, VideoFileError, ContextFullError, PluginError) as e:
        print(f"livecc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
