"""What a long stream keeps in context: the policies that bound a session.

LiveCC's context (32k tokens) fills in about 80 s of 1080p video, and its commentary degrades past its
4-minute training horizon. A session therefore never grows without bound:

- ``rollover`` (default): every ``rollover_seconds`` (or when the cache is about to fill), start a fresh
  context. Its first turn is an ordinary 3-second opener made of the most recent 6 frames, with the
  query plus the recent commentary in the prompt form LiveCC was evaluated with ("Here is previous
  commentary of the video: ... Please continue to comment the video."). Times shown to the model
  restart at 0 so they stay inside what it was trained on; captions keep stream time.
- ``window``: keep the first turn (system prompt, query, first 3 s: the attention sink) and the turns
  of the last ``window_seconds``; older turns leave the KV cache and the later ones move down, their
  keys re-rotated so positions stay contiguous (StreamingVLM's idea, without recomputation).
- ``none``: the reference behaviour, for comparison: the context grows until it is full (an error).

Streams that start together (``livecc serve`` with a list of feeds) would roll over in the same second, every
cycle: a burst of 3-second openers, each about three turns of work (on an H200, 32 streams with ``max_context``
16384: p99 1,980 ms against 788 ms below that context). So the rollover of the stream in cache row k comes early
by a fraction of its budget (``stagger_fraction``; row 0's, a lone stream's, never does).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

PREVIOUS = "Here is previous commentary of the video:\n\n{previous}\n\nPlease continue to comment the video."


@dataclass
class Segment:
    """One turn's tokens in the cache: slots [start, end), positions [pos_start, pos_end)."""

    start: int
    end: int
    pos_start: int
    pos_end: int
    time: float  # stream time the turn ends at
    ids: list[int] = field(repr=False, default_factory=list)
    turn: int = 0


class History:
    """The recent commentary, bounded in count and characters."""

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self.texts: deque[str] = deque(maxlen=64)

    def add(self, text: str) -> None:
        text = text.strip()
        if text and text != "...":
            self.texts.append(text.replace(" ...", "").strip())

    def text(self) -> str:
        out = " ".join(self.texts)
        if len(out) > self.max_chars:
            out = out[-self.max_chars:]
            out = out[out.find(" ") + 1:] if " " in out else out
        return out

    def clear(self) -> None:
        self.texts.clear()


def rollover_query(query: str, previous: str) -> str:
    return f"{query.rstrip()}\n{PREVIOUS.format(previous=previous)}" if previous else query


GOLDEN = 0.6180339887498949  # the golden ratio's fractional part: k·GOLDEN mod 1 spreads any count of k evenly


def stagger_fraction(k: int, stagger: float) -> float:
    """How early (a fraction of the time and token budget, in [0, ``stagger``)) the rollover of the stream in cache
    row ``k`` (0, 1, 2, ...) comes: ``stagger`` · (k · 0.618... mod 1), the golden-ratio sequence, so row 0 rolls over
    on time and any number of rows spread evenly over the range. ValueError for a ``stagger`` outside [0, 1)."""
    if not 0.0 <= stagger < 1.0:
        raise ValueError(f"rollover_stagger must be in [0, 1), not {stagger}")
    return stagger * ((k * GOLDEN) % 1.0)


SLACK = 0.25  # the window may overrun by this fraction before turns are evicted (fewer, larger moves)


def window_cut(segments: list[Segment], now: float, window_s: float, must_free: int) -> int:
    """How many turns after the first (the sink) to drop: those older than the window once the oldest
    has overrun it by SLACK, then more (oldest first) until ``must_free`` tokens are freed. Always keeps
    the latest turn."""
    if len(segments) < 3 or (now - segments[1].time <= window_s * (1 + SLACK) and must_free <= 0):
        return 0
    k, freed = 0, 0
    for seg in segments[1:-1]:
        if now - seg.time > window_s or freed < must_free:
            k += 1
            freed += seg.end - seg.start
        else:
            break
    return k
