"""``livecc ask VIDEO "question" ["follow-up" ...]``: questions about a whole recorded video.

LiveCC's ``video_qa`` (showlab/livecc ``demo/infer.py``, commit fdaa91e): the video goes once, in the first
turn before the first question, read as ``capture/whole_video.py`` reads it (2 fps, at most 480 frames, a total
pixel budget of 24,576·28² spread over them); every question is one more turn on the same KV cache (the
history is kept); greedy, at most 512 new tokens, repetition penalty 1.05 (the reference's defaults).
With no question on the command line, questions are read from standard input (a prompt on a terminal) until
end of input (Ctrl-D).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .options import add_engine_args, check_model, engine_overrides, quiet_progress_bars, set_cpu_threads

MAX_QUESTION_CHARS = 2000  # the control API's default limit for a question (server.max_text_chars)
MAX_NEW_TOKENS = 512  # video_qa's max_new_tokens
PROMPT = "? "


def add_parser(sub) -> None:
    p = sub.add_parser("ask", help="answer questions about a whole recorded video (LiveCC's video_qa)")
    p.add_argument("video")
    p.add_argument("questions", nargs="*", metavar="QUESTION",
                   help="questions, asked in order on one context; none: read them from standard input")
    p.add_argument("--jsonl", help='append {"question", "answer", "token_ids"} per answer to this file')
    p.add_argument("--max-context", type=int, default=32768,
                   help="KV cache size in tokens (default 32768, LiveCC's window); the video and every "
                        "question and answer must fit")
    # the engine flags of run and caption, greedy and 512 tokens per answer as video_qa
    add_engine_args(p, query=False, greedy=True, max_new_tokens=MAX_NEW_TOKENS)
    p.set_defaults(func=main, trailing_positionals="questions")  # questions may follow options (cli.parse_args)


def check_question(question: str) -> str:
    """The question stripped; UserError when it is empty or over MAX_QUESTION_CHARS characters."""
    from ..errors import UserError

    q = question.strip()
    if not q:
        raise UserError("the question is empty")
    if len(q) > MAX_QUESTION_CHARS:
        raise UserError(f"the question is {len(q)} characters long, over the limit of {MAX_QUESTION_CHARS}")
    return q


class Conversation:
    """The video's conversation: the first question carries the frames, each answer stays in the context."""

    def __init__(self, session, frames, max_new: int, jsonl):
        self.session, self.frames, self.max_new, self.jsonl = session, frames, max_new, jsonl

    def ask(self, question: str) -> str:
        content = [question] if self.frames is None else [self.frames, question]
        answer = self.session.turn(content, self.max_new)
        self.frames = None  # in the context now
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"question": question, "answer": answer.text,
                                         "token_ids": list(answer.token_ids)}, ensure_ascii=False) + "\n")
            self.jsonl.flush()
        return answer.text


def open_appending(path: str):
    """``path`` opened for appending UTF-8 text, its missing folders made (as the sinks make theirs)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    return open(target, "a", encoding="utf-8")


def main(args) -> int:
    from ..capture.whole_video import plan, read_frames
    from ..config import output_path_problem
    from ..errors import UserError
    from ..engine import ContextFullError, EngineConfig, StreamingSession, load_model

    questions = [check_question(q) for q in args.questions]
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    try:
        cfg = EngineConfig(**engine_overrides(args), max_context=args.max_context, context="none")
    except ValueError as e:
        raise UserError(str(e)) from None
    p = plan(args.video)
    if p.video_tokens + cfg.max_new_tokens > cfg.max_context:
        raise UserError(f"{args.video}: too long for the context: its {len(p.indices)} frames make {p.video_tokens} "
                        f"video tokens, which with {cfg.max_new_tokens} answer tokens is over the "
                        f"{cfg.max_context}-token context (--max-context)")
    if args.jsonl and (problem := output_path_problem(args.jsonl)):
        raise UserError(f"--jsonl {problem}")  # before the model loads, as every output of run and caption
    frames = read_frames(args.video, p)
    check_model(cfg.model)
    set_cpu_threads(args.threads)
    if not sys.stderr.isatty():
        quiet_progress_bars()  # stderr: the model line and one-line errors only
    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
    size = model.weight_bytes / 2**30
    size = f"{size:.2f} GiB" if size >= 1 else f"{size * 1024:.1f} MiB"
    print(f"model {model.name} on {model.device} ({str(model.dtype).removeprefix('torch.')}), "
          f"weights {model.quantize} ({size})", file=sys.stderr, flush=True)  # what answers, before the first one
    session = StreamingSession(model, cfg)
    try:
        jsonl = open_appending(args.jsonl) if args.jsonl else None
    except OSError as e:  # changed since the check (removed, filled up, ...)
        raise UserError(f"--jsonl {args.jsonl}: {e.strerror or e}") from None
    try:
        chat = Conversation(session, frames, cfg.max_new_tokens, jsonl)
        for q in questions:
            print(chat.ask(q).strip(), flush=True)
        if not questions:
            _interactive(chat, UserError, ContextFullError)
    finally:
        if jsonl is not None:
            jsonl.close()
    return 0


def _interactive(chat: Conversation, *recoverable) -> None:
    """Questions from standard input, one per line, until end of input; a bad one is reported and skipped."""
    tty = sys.stdin.isatty()
    if tty:
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            line = input(PROMPT) if tty else sys.stdin.readline()
        except EOFError:
            break
        if not tty and not line:
            break
        if not line.strip():
            continue
        try:
            print(chat.ask(check_question(line)).strip(), flush=True)
        except recoverable as e:
            print(f"livecc: error: {e}", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
