"""A streaming session: one stream's side of the conversation with LiveCC (the protocol, no tensors on the GPU).

It turns clips and questions into ``TurnRequest``s exactly as LiveCC's reference loop builds its turns
(``Time=a-b s`` + the clip's video tokens [+ the query when it changed]; positions ``seed``/``exact``),
keeps the context policy (``context.py``: rollover or window), and turns each ``TurnResult`` into a
``Caption``. The engine core (``core.py``) serves the requests, batched with other streams'.

``step(clip)`` / ``ask(question)`` are the synchronous form for one stream: they build the request,
have the core serve it in the calling thread, and return the caption. A session made without a core
gets its own runner and core with one cache row: one stream is a batch of one.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..types import Caption, Clip
from ..errors import ContextFullError  # noqa: F401  (re-exported)
from .config import EngineConfig
from .context import History, Segment, rollover_query, window_cut
from .core import EngineCore, TurnRequest, TurnResult, TurnStats
from .detokenize import caption_text
from .loading import LoadedModel
from .positions import linear_positions, segment_positions
from .prompt import PromptBuilder
from .runner import ModelRunner
from .sampling import SamplingSettings

__all__ = ["ContextFullError", "StreamingSession", "Turn", "TurnStats", "make_core"]

TEXT_SLACK_PER_FRAME = 32  # tokens budgeted per frame for the turn's text when checking what fits



@dataclass
class Turn(TurnRequest):
    """A request plus what the session needs back to make its caption."""

    kind: str = "caption"  # caption | answer
    query: str | None = None  # the query sent with the turn (caption) or the question (answer)
    start: float = 0.0  # stream seconds the turn covers
    stop: float = 0.0
    text: str = ""  # the prompt text
    pos_start: int = 0  # first position and cache slot of the turn
    ctx_start: int = 0


def sampling_settings(model: LoadedModel, cfg: EngineConfig) -> SamplingSettings:
    s = model.sampling
    return SamplingSettings(
        repetition_penalty=cfg.repetition_penalty, greedy=cfg.greedy,
        temperature=cfg.temperature if cfg.temperature is not None else s.get("temperature"),
        top_k=cfg.top_k if cfg.top_k is not None else s.get("top_k"),
        top_p=cfg.top_p if cfg.top_p is not None else s.get("top_p"),
        silence_id=model.silence_id, eos_base=cfg.streaming_eos_base, eos_step=cfg.streaming_eos_step)


def make_core(model: LoadedModel, cfg: EngineConfig, slots: int = 1) -> EngineCore:
    """A runner (weights, ``slots`` cache rows of ``cfg.max_context`` tokens, graphs) and its core."""
    runner = ModelRunner(model, slots=slots, capacity=cfg.max_context, graphs=cfg.fast, compile=cfg.compile,
                         sampling=sampling_settings(model, cfg))
    core = EngineCore(runner)
    core.prefill_batch = cfg.prefill_batch
    core.decode_steps_per_prefill = cfg.decode_steps_per_prefill
    runner.warm_up()
    return core


class StreamingSession:
    """One stream's LiveCC protocol state: prompts, positions, context policy, history, counters.

    Holds a slot (cache row) of ``core`` for its lifetime; ``close()`` gives it back."""

    def __init__(self, model: LoadedModel, config: EngineConfig | None = None, core: EngineCore | None = None,
                 seed: int | None = None, rollover_early: float = 0.0):
        self.model = model
        self.cfg = config or EngineConfig()
        self.core = core or make_core(model, self.cfg)
        self.slot = self.core.open_slot(self.cfg.seed if seed is None else seed)
        # rollover: the fraction of the time and token budget this stream rolls over early (context.stagger_fraction)
        self.rollover_early = rollover_early
        self.prompt = PromptBuilder(model.tokenizer)
        self.video_token_id = model.video_token_id
        self.query = self.prompt.check_text(self.cfg.query)
        self.last_stats = TurnStats()
        self.history = History(self.cfg.history_chars)
        self.recent: deque[Clip] = deque(maxlen=8)  # the frames a rolled-over context opens with
        self.rollovers = 0
        self.evicted_turns = 0
        self.total_turns = 0  # stream-wide, across rollovers (captions and answers)
        self._pending_reset = False
        self._opener_frames = 6  # frames of the stream's first turn (the sampler's opener); a rollover reuses it
        self._clear()

    def _clear(self) -> None:
        self.turns = 0  # turns in the current context
        self.next_pos = 0  # next free (1-D) position
        self.sent_query: str | None = None
        self.segments: list[Segment] = []  # one per turn in the cache, in order
        self.time_offset = 0.0  # stream time that the model's Time= labels count from

    def reset(self) -> None:
        """Forget the conversation: the next turn starts a fresh context."""
        self._clear()
        self._pending_reset = True

    def close(self) -> None:
        self.core.close_slot(self.slot)

    @property
    def context_length(self) -> int:
        return self.core.context_length(self.slot)

    def set_query(self, query: str) -> None:
        """The new commentary instruction goes out with the next turn. ValueError for text that is not
        valid Unicode (e.g. a lone surrogate)."""
        self.query = self.prompt.check_text(query)

    # -- building turns ------------------------------------------------------------------------------------
    def video_request(self, clip: Clip) -> Turn:
        """The request for one clip (the opener's 6 frames, or 2 after), with any rollover/eviction it needs.

        Raises ContextFullError when the turn cannot fit even in a fresh context."""
        self.recent.append(clip)
        if self.total_turns == 0:
            self._opener_frames = len(clip.frames)
        query = self.query if self.query != self.sent_query else None
        evict = None
        if self.turns and self._must_roll(clip):
            clip = self._rollover(clip)
            query = rollover_query(self.query, self.history.text())
        elif self.turns and self.cfg.context == "window":
            evict = self._evict(clip.stop, self._tokens_needed(clip))
        req = self._clip_request(clip, query, self.cfg.max_new_tokens, clip.ready_at)
        if evict is not None:
            req.evict, req.evict_ids = evict
        req.kind, req.query, req.start, req.stop = "caption", query, clip.start, clip.stop
        return req

    def _clip_request(self, clip: Clip, text_after: str | None, max_new: int, due: float) -> Turn:
        """A turn of ``clip``'s frames under its Time= label (model time), then ``text_after`` if any."""
        gt = len(clip.frames) // self.model.patches.temporal
        m = self.model.patches.patch * self.model.patches.merge
        grid = (gt, clip.frames.shape[1] // m, clip.frames.shape[2] // m)
        text = self.prompt.video_turn(clip.start - self.time_offset, clip.stop - self.time_offset, text_after,
                                      first=self.turns == 0)
        return self._request(text, [grid[0] * grid[1] * grid[2]], [grid], max_new, clip.frames, due)

    def question_request(self, question: str, at: float = 0.0) -> Turn:
        """The request for a viewer's question about what has been seen so far (answered from the same cache).

        When the question and its answer (``answer_max_new_tokens``) do not fit in what the context has left, the
        context policy makes room as it does for a clip: ``window`` evicts the oldest turns after the first (if
        that frees enough), otherwise (``rollover``, or a window that cannot free enough) the question opens a
        fresh context: the most recent opener's worth of frames (3 s) with the question after them, as a rollover
        opens with the query (``rollovers`` counts it). Only ``context: none`` raises ContextFullError then."""
        question = self.prompt.check_text(question)
        evict = None
        if self.turns and self.cfg.context != "none":
            # (a text is encoded once: ``prompt.plain`` queues the caller's text for that one encoding)
            n = len(self.prompt.encode(self.prompt.question_turn(question, first=False), []).ids)
            need = self.context_length + n + self.cfg.answer_max_new_tokens - self.core.runner.capacity
            if need > 0:
                now = self.segments[-1].time if self.segments else at
                if self.cfg.context == "window" and self._can_free(now, need):
                    evict = self._evict(now, need)
                elif self.recent:
                    clip = self._rollover(self.recent[-1])
                    req = self._clip_request(clip, question, self.cfg.answer_max_new_tokens, time.monotonic())
                    req.kind, req.query, req.start, req.stop = "answer", question, at, at
                    return req
                else:
                    self.reset()
        text = self.prompt.question_turn(question, first=self.turns == 0)
        req = self._request(text, [], [], self.cfg.answer_max_new_tokens, None, time.monotonic())
        if evict is not None:
            req.evict, req.evict_ids = evict
        req.kind, req.query, req.start, req.stop = "answer", question, at, at
        return req

    def _request(self, text, video_tokens, grids, max_new, frames, due) -> Turn:
        ids = self.prompt.encode(text, video_tokens).ids
        start = 0 if self._pending_reset else self.context_length - self._evicting
        if start + len(ids) + max_new > self.core.runner.capacity:
            self._evicting = 0
            raise ContextFullError(f"turn of {len(ids)} tokens does not fit: {start} of "
                                   f"{self.core.runner.capacity} context tokens in use")
        if self.turns == 0 or self.cfg.positions == "exact":
            pos, next_pos = segment_positions(ids, self.video_token_id, grids, self.next_pos)
        else:
            pos, next_pos = linear_positions(len(ids), self.next_pos)
        req = Turn(self.slot, ids, pos, next_pos, max_new, frames=frames, due=due, reset=self._pending_reset,
                   text=text, pos_start=self.next_pos, ctx_start=start)
        self._pending_reset = False
        self._evicting = 0
        return req

    def content_request(self, content: list, max_new: int, at: float = 0.0) -> Turn:
        """A user turn of text and video items in the given order (``livecc ask``, the evaluation protocol).

        ``content`` items: ``str`` (text, always tokenized as plain text) or ``np.ndarray`` (a video item:
        T x H x W x 3 uint8 RGB, T even, H and W multiples of 28). The session's first turn carries the system
        prompt and gets 3-D mRoPE positions; a later one opens with ``<|im_end|>\\n`` and continues per
        ``positions``. Raises ContextFullError, before any vision work, when the turn plus ``max_new`` does
        not fit. Its caption is kind "answer" with the last text item as ``query``."""
        spec = self.model.patches
        cell = spec.patch * spec.merge
        items, grids, counts, videos = [], [], [], []
        for part in content:
            if isinstance(part, str):
                items.append({"type": "text", "text": self.prompt.plain(self.prompt.check_text(part))})
                continue
            t, h, w, _ = part.shape
            grids.append((t // spec.temporal, h // cell, w // cell))
            counts.append(grids[-1][0] * grids[-1][1] * grids[-1][2])
            items.append({"type": "video"})
            videos.append(part)
        text = self.prompt.user_text(items, first=self.turns == 0)
        req = self._request(text, counts, grids, max_new, videos or None, time.monotonic())
        question = next((part for part in reversed(content) if isinstance(part, str)), None)
        req.kind, req.query, req.start, req.stop = "answer", question, at, at
        return req

    # -- finishing turns -----------------------------------------------------------------------------------
    def finish(self, req: Turn, result: TurnResult) -> Caption:
        """Record a served turn and return its caption (or answer)."""
        out = result.tokens
        self.segments.append(Segment(req.ctx_start, result.stats.context, req.pos_start, req.next_pos + len(out) - 1,
                                     req.stop, req.ids + out[:-1], self.turns))
        self.next_pos = req.next_pos + len(out) - 1
        self.last_stats = result.stats
        self.turns += 1
        self.total_turns += 1
        text = caption_text(self.model.tokenizer, out)
        if req.kind == "answer":
            self.sent_query = None  # commentary resumes with its instruction restated
            latency = result.stats.vision_s + result.stats.prefill_s + result.stats.decode_s
        else:
            if req.query is not None:
                self.sent_query = self.query
            self.history.add(text)
            latency = time.monotonic() - req.due
        return Caption(start=req.start, stop=req.stop, text=text, token_ids=tuple(out), kind=req.kind,
                       query=req.query if req.kind == "answer" else None, turn=self.total_turns, latency_s=latency)

    # -- the synchronous form --------------------------------------------------------------------------------
    def step(self, clip: Clip) -> Caption:
        """Append one clip and decode its caption (served by the core in this thread)."""
        req = self.video_request(clip)
        return self.finish(req, self.core.run([req])[0])

    def ask(self, question: str, at: float = 0.0) -> Caption:
        """Answer a question about what has been seen so far, from the same cache."""
        req = self.question_request(question, at)
        return self.finish(req, self.core.run([req])[0])

    def turn(self, content: list, max_new: int, at: float = 0.0) -> Caption:
        """A turn of text and video items (see ``content_request``), answered from the same cache."""
        req = self.content_request(content, max_new, at)
        return self.finish(req, self.core.run([req])[0])

    # -- context policy --------------------------------------------------------------------------------------
    _evicting = 0  # tokens the pending eviction frees (counted before the core applies it)

    def _must_roll(self, clip: Clip) -> bool:
        if self.cfg.context != "rollover":
            return False
        early = self.rollover_early  # staggered: a fraction of the time, and of the room the first turn left
        too_long = clip.stop - self.time_offset > self.cfg.rollover_seconds * (1 - early)
        room = self.core.runner.capacity - (self.segments[0].end if self.segments else 0)
        return too_long or self._overflow(clip) + int(early * max(0, room)) > 0

    def _tokens_needed(self, clip: Clip) -> int:
        """Tokens to free so the next turn (and the headroom) fits."""
        return max(0, self._overflow(clip))

    def _overflow(self, clip: Clip) -> int:
        """Tokens the cache would hold after the next turn (and the headroom) beyond its capacity (< 0: room left)."""
        p = self.model.patches
        m = p.patch * p.merge  # 28 pixels per visual token side
        per_frame = (clip.frames.shape[1] // m) * (clip.frames.shape[2] // m) // p.temporal + TEXT_SLACK_PER_FRAME
        need = self.context_length + per_frame * len(clip.frames) + self.cfg.max_new_tokens + self.cfg.context_headroom
        return need - self.core.runner.capacity

    def _rollover(self, clip: Clip) -> Clip:
        """A fresh context opening on the most recent opener's worth of frames (``sampler.opener_frames``, 6 at
        2 fps = 3 s); model time restarts at 0, captions keep stream time."""
        n = self._opener_frames
        clips = [c for c in self.recent if c.frames.shape[1:] == clip.frames.shape[1:]]
        frames = np.concatenate([c.frames for c in clips])[-n:]
        stamps = sum((c.timestamps for c in clips), ())[-n:]
        if len(frames) % 2:  # the temporal patch takes frames in pairs
            frames, stamps = frames[1:], stamps[1:]
        self.reset()
        self.rollovers += 1
        self.time_offset = stamps[0]
        return _like(clip, frames, tuple(stamps))

    def _can_free(self, now: float, need: int) -> bool:
        """Whether the window policy's cut at stream time ``now`` frees at least ``need`` tokens."""
        k = window_cut(self.segments, now, self.cfg.window_seconds, need)
        return sum(seg.end - seg.start for seg in self.segments[1:k + 1]) >= need

    def _evict(self, now: float, need: int) -> tuple[tuple[int, int, int], list[int]] | None:
        """Window policy: drop the oldest turns after the first so the window (at stream time ``now``) and the
        cache (``need`` more tokens) hold."""
        k = window_cut(self.segments, now, self.cfg.window_seconds, need)
        if k == 0:
            return None
        first, last = self.segments[1], self.segments[k]
        n, shift = last.end - first.start, last.pos_end - first.pos_start
        gone = [i for seg in self.segments[1:k + 1] for i in seg.ids]
        for seg in self.segments[k + 1:]:
            seg.start, seg.end, seg.pos_start, seg.pos_end = (seg.start - n, seg.end - n, seg.pos_start - shift,
                                                              seg.pos_end - shift)
        edit = (first.start, last.end, shift)
        del self.segments[1:k + 1]
        self.next_pos -= shift
        self.evicted_turns += k
        self._evicting = n
        return edit, gone


def _like(clip: Clip, frames: np.ndarray, stamps: tuple[float, ...]) -> Clip:
    """A clip with other frames and times but the same frame interval and readiness as ``clip``."""
    import dataclasses

    return dataclasses.replace(clip, frames=frames, timestamps=stamps)
