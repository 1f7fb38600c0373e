"""``livecc caption VIDEO``: caption a recorded video as fast as the hardware allows (no real-time pacing)."""

from __future__ import annotations

import logging
import sys
import time

from .options import add_engine_args, check_model, engine_overrides, quiet_progress_bars, set_cpu_threads

log = logging.getLogger("livecc.caption")

DESCRIPTION = """\
Caption a recorded video file as fast as the hardware allows: the file is decoded, sampled at 2 frames
per second and captioned turn by turn by the same streaming engine `livecc run` uses, without waiting
for real time. Captions go to the console, or to the files given with --jsonl / --srt / --vtt."""

EPILOG = """\
examples:
  livecc caption match.mp4 --srt match.srt
  livecc caption lecture.mkv --jsonl lecture.jsonl --query "Summarise what the speaker shows."
"""


def add_parser(sub) -> None:
    import argparse

    c = sub.add_parser("caption", help="caption a recorded video as fast as the hardware allows",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("video", help="a video file FFmpeg can read (MP4, MKV, TS, WebM, ...)")
    c.add_argument("--jsonl", help="write one JSON object per turn here")
    c.add_argument("--srt", help="also write SubRip subtitles here")
    c.add_argument("--vtt", help="also write WebVTT subtitles here")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(c)
    from . import evaluation

    evaluation.add_arguments(c)
    c.set_defaults(func=cmd_caption)


def cmd_caption(args) -> int:
    from . import evaluation

    if evaluation.selected(args):
        return evaluation.main(args)
    from .. import config
    from ..capture.files import file_clips, probe
    from ..plugins import make_sink
    from ..status import setup_logging

    setup_logging("text", "debug" if args.verbose else "warning")  # the format of `livecc run`
    blocks = [{"kind": "jsonl", "path": args.jsonl, "include_events": False}] if args.jsonl else []
    blocks += [{"kind": kind, "path": path} for kind, path in (("srt", args.srt), ("vtt", args.vtt)) if path]
    # the same checks as `livecc run` (value ranges, sink targets), before the model loads
    cfg = config.validate({"engine": engine_overrides(args), "sinks": blocks or ["console"]}, "command line")
    engine_cfg = cfg.engine_config()
    duration, _ = probe(args.video)  # a clear error before the model loads
    check_model(engine_cfg.model)
    sinks = [make_sink(dict(b)) for b in cfg.sinks]

    set_cpu_threads(args.threads)
    if args.quiet or not sys.stderr.isatty():
        quiet_progress_bars()  # as `livecc run`: stderr holds log records and the result line only
    from ..engine import StreamingSession, load_model

    log.info("loading %s", engine_cfg.model)
    model = load_model(engine_cfg.model, device=engine_cfg.device, dtype=engine_cfg.dtype, quantize=engine_cfg.quantize)
    session = StreamingSession(model, engine_cfg)
    for s in sinks:
        s.start()
    turns, t0, covered = 0, time.perf_counter(), 0.0
    progress = _progress(duration, quiet=args.quiet)
    try:
        for clip in file_clips(args.video, max_pixels=engine_cfg.max_pixels):
            caption = session.step(clip)
            turns += 1
            for s in sinks:
                s.on_caption(caption)
            progress(clip.stop, caption.text)
            covered = clip.stop  # video time captioned (the probed duration may be unknown or span a timestamp jump)
    finally:
        for s in sinks:
            s.stop()
        progress(None, None)
    took = time.perf_counter() - t0
    print(f"captioned {turns} turns ({covered:.1f} s of video) in {took:.1f} s "
          f"({took / max(turns, 1) * 1000:.0f} ms per turn)", file=sys.stderr)  # the result, not a log record
    return 0


def _progress(duration: float, quiet: bool):
    """A rich progress bar over video time on a terminal; nothing otherwise."""
    if quiet or not sys.stderr.isatty():
        return lambda at, text: None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if duration > 0:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
                       TimeRemainingColumn(), transient=True)
    else:  # the length is unknown (a raw .h264 stream has none): the seconds done, no bar
        bar = Progress(TextColumn("{task.description}"), TextColumn("{task.completed:.0f} s"), transient=True)
    task = bar.add_task("captioning", total=duration if duration > 0 else None)
    bar.start()

    def update(at, text):
        if at is None:
            bar.stop()
        else:
            bar.update(task, completed=at, description=" ".join((text or "").split())[:40])
    return update
