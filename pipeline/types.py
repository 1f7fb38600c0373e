"""The dataclasses that travel between the stages: capture -> sampler -> engine -> sinks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One decoded video frame. ``image`` is HxWx3 uint8 RGB at the source's resolution."""

    image: np.ndarray
    pts: float  # stream time in seconds, 0 at the first frame of the stream
    arrival: float = field(default_factory=time.monotonic)  # monotonic wall clock at decode
    index: int = 0


@dataclass
class AudioChunk:
    """Decoded input audio (an ``av.AudioFrame``) with its stream time, for sinks that want audio.

    ``pts`` is in the same stream time as :attr:`Frame.pts` (seconds, 0 at the first video frame),
    ``arrival`` the monotonic wall clock at decode."""

    frame: Any
    pts: float
    arrival: float = field(default_factory=time.monotonic)

    @property
    def duration(self) -> float:
        rate = getattr(self.frame, "sample_rate", 0) or 0
        return self.frame.samples / rate if rate else 0.0


@dataclass(frozen=True)
class Clip:
    """Frames for one engine turn, already resized for the model.

    ``frames`` is T x H x W x 3 uint8 RGB with T even (``sampler.opener_frames`` for the opener,
    ``sampler.turn_frames`` after). ``timestamps`` are the sampling grid times (stream seconds)
    the frames stand for, ``interval`` seconds apart (1 / ``sampler.fps``). A clip built without
    ``interval`` takes the spacing of its last two timestamps (T >= 2); with neither, ValueError.
    """

    frames: np.ndarray
    timestamps: tuple[float, ...]
    ready_at: float = field(default_factory=time.monotonic)  # when the clip was complete
    interval: float | None = None  # seconds between frames (1 / fps); see the class docstring

    def __post_init__(self) -> None:
        if self.interval is None:
            if len(self.timestamps) < 2:
                raise ValueError("a clip of fewer than 2 timestamps needs its interval")
            object.__setattr__(self, "interval", self.timestamps[-1] - self.timestamps[-2])
        if not self.interval > 0:
            raise ValueError(f"clip interval must be > 0 s, not {self.interval}")

    @property
    def start(self) -> float:
        return self.timestamps[0]

    @property
    def stop(self) -> float:
        """The last frame's time + one frame interval: how the reference labels a clip (``Time=start-stop``)."""
        return self.timestamps[-1] + self.interval


@dataclass(frozen=True)
class Caption:
    """What the engine says about one turn (or the answer to a viewer's question)."""

    start: float
    stop: float
    text: str
    token_ids: tuple[int, ...] = ()
    kind: str = "caption"  # "caption" | "answer"
    query: str | None = None  # the question, for kind == "answer"
    turn: int = 0
    latency_s: float = 0.0  # clip ready -> text out
    created_at: float = field(default_factory=time.time)  # unix time

    SILENCE = "..."

    @property
    def is_silence(self) -> bool:
        """True when the model said nothing new (empty text or its streaming-EOS ' ...')."""
        return self.text.strip() in ("", self.SILENCE)

    def to_json(self, tokens: bool = True) -> dict:
        """The caption as JSON-ready values (times in seconds, rounded to ms); ``tokens``: include the ids."""
        out = {
            "start": round(self.start, 3),
            "stop": round(self.stop, 3),
            "text": self.text,
            "token_ids": list(self.token_ids),
            "kind": self.kind,
            "query": self.query,
            "turn": self.turn,
            "latency_s": round(self.latency_s, 4),
            "created_at": self.created_at,
        }
        if not tokens:
            del out["token_ids"]
        return out


@dataclass(frozen=True)
class StreamEvent:
    """Something that happened to the stream: source_lost, source_back, rollover, ..."""

    kind: str
    stream_time: float
    detail: str = ""
    created_at: float = field(default_factory=time.time)
