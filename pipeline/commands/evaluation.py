"""``livecc caption VIDEO --protocol evaluation``: LiveCC's LiveSports-3K evaluation loop on one clip.

The loop and the query are ``pipeline/evaluation.py``'s. Console (and ``--srt``/``--vtt``) get every turn;
``--jsonl`` gets the record ``evaluation/livesports3kcc/llm_judge.py`` reads:
``{"video_id", "event_id", "begin", "end", "pred"}`` (video_id: the file name without extension).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROTOCOLS = ("live", "evaluation")
_ONLY_EVALUATION = ("start", "end", "title", "previous", "event_id")


def add_arguments(p) -> None:
    """The caption command's ``--protocol`` and the evaluation's own options."""
    g = p.add_argument_group("evaluation protocol (--protocol evaluation)")
    g.add_argument("--protocol", choices=PROTOCOLS, default="live",
                   help="live: the live loop, turn by turn as the video plays (default); evaluation: LiveCC's "
                        "LiveSports-3K loop (the clip read at once, 32 tokens per turn, penalty 1.15; --jsonl "
                        "then gets the record its judge reads)")
    g.add_argument("--start", type=float, default=None, help="clip start in seconds (default: the video's start)")
    g.add_argument("--end", type=float, default=None, help="clip end in seconds (default: the video's end)")
    g.add_argument("--title", default=None, help="event title, put in the query")
    g.add_argument("--previous", default=None, help="previous commentary, put in the query")
    g.add_argument("--event-id", default=None, help="event id written in the --jsonl record (default 0)")


def selected(args) -> bool:
    """Whether the evaluation protocol runs; UserError for its options without it."""
    from ..errors import UserError

    if args.protocol == "evaluation":
        return True
    given = [f"--{k.replace('_', '-')}" for k in _ONLY_EVALUATION if getattr(args, k) is not None]
    if given:
        raise UserError(f"{', '.join(given)}: only with --protocol evaluation")
    return False


def main(args) -> int:
    from .. import evaluation
    from ..capture.whole_video import plan, read_frames
    import dataclasses

    from ..errors import UserError
    from .options import engine_overrides, quiet_progress_bars
    from ..engine import EngineConfig, StreamingSession, load_model
    from ..plugins import make_sink
    from ..types import Caption

    if args.query and (args.title or args.previous):
        raise UserError("--query replaces the evaluation's query: give it or --title/--previous, not both")
    if args.start is not None and args.end is not None and args.end <= args.start:
        raise UserError(f"--end {args.end:g} is not after --start {args.start:g}")
    base = EngineConfig(max_new_tokens=evaluation.MAX_NEW_TOKENS, repetition_penalty=evaluation.REPETITION_PENALTY,
                        context="none")
    try:
        cfg = dataclasses.replace(base, **engine_overrides(args))
    except ValueError as e:
        raise UserError(str(e)) from None
    query = args.query or evaluation.evaluation_query(args.title or "", args.previous or "")
    p = plan(args.video, args.start or 0.0, args.end)  # start 0 = the first frame, as the reference
    turns = 1 + max(0, len(p.indices) - evaluation.OPENER_FRAMES) // evaluation.TURN_FRAMES
    if p.video_tokens + turns * cfg.max_new_tokens > cfg.max_context:
        raise UserError(f"{args.video}: the clip is too long for the context: {len(p.indices)} frames make "
                        f"{p.video_tokens} video tokens, plus {cfg.max_new_tokens} per turn for {turns} turns, over "
                        f"{cfg.max_context} tokens; use a shorter --start/--end range")
    frames = read_frames(args.video, p)
    if args.quiet or not sys.stderr.isatty():
        quiet_progress_bars()  # as the live protocol: no weight-loading bar in a pipe, a log or with --quiet
    sinks = [make_sink({"kind": "srt", "path": args.srt})] if args.srt else []
    if args.vtt:
        sinks.append(make_sink({"kind": "vtt", "path": args.vtt}))
    if not sinks:
        sinks.append(make_sink("console"))
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
    session = StreamingSession(model, cfg)
    texts = []
    for s in sinks:
        s.start()
    try:
        for t in evaluation.run(session, frames, query, args.start or 0.0, cfg.max_new_tokens):
            texts.append(t.text)
            for s in sinks:
                s.on_caption(Caption(start=t.start, stop=t.stop, text=t.text, token_ids=t.token_ids,
                                     turn=len(texts)))
    finally:
        for s in sinks:
            s.stop()
    pred = evaluation.prediction(texts)
    if args.jsonl:
        record = {"video_id": Path(args.video).stem, "event_id": args.event_id if args.event_id is not None else 0,
                  "begin": args.start or 0.0, "end": args.end, "pred": pred}
        with open(args.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"evaluation protocol: {len(texts)} turns", file=sys.stderr)
    return 0
