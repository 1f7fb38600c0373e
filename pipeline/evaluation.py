"""LiveCC's evaluation protocol: the loop its LiveSports-3K commentary results were produced with.

Source: showlab/livecc ``demo/infer.py`` ``LiveCCDemoInfer.live_cc_once_for_evaluation`` and
``evaluation/livesports3kcc/distributed_generate_livecc.py`` (commit fdaa91e):

- the clip (``--start``..``--end`` of the file) is read at once, as ``capture/whole_video.py`` reads it
  (2 fps, at most 480 frames, the pixel budget spread over them);
- turn 1: frames 0-5 with ``Time=0.0-3.0s`` and the query; every later turn: the next 2 frames with the
  label moved on by 1 s (``Time=3.0-4.0s``, ...), counted from 0 whatever the clip's start; the query only
  in turn 1; a fresh context per clip; 32 new tokens per turn, repetition penalty 1.15 (the script's default);
- the query: a commentator persona, the event title and the previous commentary (``evaluation_query``);
- the prediction the judge reads: the turns' texts with ``' ...'`` removed, joined by spaces, plus ``'...'``.

The reference passes an attention mask that covers only the new turn; on CUDA with flash attention (how the
published results were made) it does not restrict attention, and this engine attends to the whole context
as that run did.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .engine.session import StreamingSession

MAX_NEW_TOKENS = 32
REPETITION_PENALTY = 1.15
OPENER_FRAMES = 6
TURN_FRAMES = 2
OPENER_S = 3.0
TURN_S = 1.0
PERSONA = ("You are an expert video commentator providing real-time, insightful, "
           "and engaging commentary on visual content.\n")


@dataclass(frozen=True)
class EvalTurn:
    start: float  # seconds in the file (clip start + label)
    stop: float
    text: str
    token_ids: tuple[int, ...]


def evaluation_query(title: str = "", previous: str = "") -> str:
    """The LiveSports-3K script's query for an instruct model: persona [+ title] [+ previous commentary]."""
    query = PERSONA
    if title:
        query += f'This is a video titled "{title}".\n'
    if previous:
        query += f"Here is previous commentary of the video:\n\n{previous}\n\nPlease continue to comment the video."
    return query


def turns(frames: np.ndarray) -> Iterator[tuple[float, float, np.ndarray]]:
    """(label start s, label stop s, frames) per turn: 6 frames for 0-3 s, then 2 frames per second."""
    yield 0.0, OPENER_S, frames[:OPENER_FRAMES]
    stop = OPENER_S
    for i in range(OPENER_FRAMES, len(frames), TURN_FRAMES):
        yield stop, stop + TURN_S, frames[i:i + TURN_FRAMES]
        stop += TURN_S


def run(session: StreamingSession, frames: np.ndarray, query: str, clip_start: float = 0.0,
        max_new: int = MAX_NEW_TOKENS) -> Iterator[EvalTurn]:
    """The loop on a fresh context; yields each turn as it is decoded.

    ``frames``: T x H x W x 3 uint8 (T even, from ``whole_video.read_frames``). Raises ContextFullError when
    the clip does not fit the session's context.
    """
    session.reset()
    for i, (start, stop, chunk) in enumerate(turns(frames)):
        content = [f"Time={start:.1f}-{stop:.1f}s", chunk] + ([query] if i == 0 else [])
        answer = session.turn(content, max_new, at=clip_start + stop)
        yield EvalTurn(clip_start + start, clip_start + stop, answer.text, answer.token_ids)


def prediction(texts: list[str]) -> str:
    """What the judge reads: the texts without ``' ...'``, the empty ones skipped, joined, then ``'...'``."""
    return " ".join(t.replace(" ...", "") for t in texts if t).strip() + "..."
