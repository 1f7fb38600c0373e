"""A streaming session: one stream's conversation with LiveCC on its own KV cache.

Each ``step(clip)`` appends one turn (``Time=a-b s`` + the clip's video tokens [+ the query when it
changed]) and decodes a caption; nothing before it is recomputed. The context policy
(``context.py``) keeps the session bounded on streams of any length.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..types import Caption, Clip
from ..errors import ContextFullError  # noqa: F401  (re-exported)
from .config import EngineConfig
from .context import History, Segment, rollover_query, window_cut
from .decoder import TextDecoder
from .graph import StaticDecode
from .loading import LoadedModel
from .positions import linear_positions, segment_positions
from .prompt import PromptBuilder
from .sampling import TokenChooser
from .vision import patchify
from .vision_tower import VisionTower



@dataclass
class TurnStats:
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    context: int = 0


class StreamingSession:
    def __init__(self, model: LoadedModel, config: EngineConfig | None = None):
        self.model = model
        self.cfg = config or EngineConfig()
        self.decoder = TextDecoder(model.hf, capacity=self.cfg.max_context)
        self.prompt = PromptBuilder(model.tokenizer)
        fast = self.cfg.fast if self.cfg.fast is not None else model.device.type == "cuda"
        on_cuda = model.device.type == "cuda"
        compile_ = self.cfg.compile if self.cfg.compile is not None else on_cuda
        self.static = StaticDecode(self.decoder, compile=compile_ and on_cuda) if fast else None  # CUDA graphs
        self.vision = VisionTower(model.visual, use_graphs=fast and model.device.type == "cuda")
        s = model.sampling
        self.chooser = TokenChooser(
            self.decoder.lm_head.weight.shape[0], model.device,
            repetition_penalty=self.cfg.repetition_penalty, greedy=self.cfg.greedy,
            temperature=self.cfg.temperature if self.cfg.temperature is not None else s.get("temperature"),
            top_k=self.cfg.top_k if self.cfg.top_k is not None else s.get("top_k"),
            top_p=self.cfg.top_p if self.cfg.top_p is not None else s.get("top_p"),
            silence_id=model.silence_id, eos_base=self.cfg.streaming_eos_base, eos_step=self.cfg.streaming_eos_step,
            seed=self.cfg.seed)
        self.stop_ids = set(model.stop_ids)
        self.query = self.cfg.query
        self.last_stats = TurnStats()
        self.history = History(self.cfg.history_chars)
        self.recent: deque[Clip] = deque(maxlen=3)  # the frames a rolled-over context opens with
        self.rollovers = 0
        self.evicted_turns = 0
        self.reset()

    # -- state -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the conversation (the next clip starts a fresh context)."""
        self.decoder.cache.length = 0
        self.chooser.reset()
        self.turns = 0
        self.next_pos = 0  # next free (1-D) position
        self.sent_query: str | None = None
        self.segments: list[Segment] = []  # one per turn in the cache, in order
        self.time_offset = 0.0  # stream time that the model's Time= labels count from

    @property
    def context_length(self) -> int:
        return self.decoder.cache.length

    def set_query(self, query: str) -> None:
        """The new commentary instruction goes out with the next turn."""
        self.query = query

    # -- turns -------------------------------------------------------------------------------------
    def step(self, clip: Clip) -> Caption:
        """Append one clip (6 frames for the first turn, 2 after) and decode its caption."""
        self.recent.append(clip)
        query = self.query if self.query != self.sent_query else None
        if self.turns and self._must_roll(clip):
            clip = self._rollover(clip)
            query = rollover_query(self.query, self.history.text())
        elif self.turns and self.cfg.context == "window":
            self._evict(clip)
        if self.turns == 0:
            self.first_prompt_query = query
        caption = self._video_turn(clip, query)
        if self.turns == 1:
            self.first_prompt_text = self.last_prompt_text
        if query is not None:
            self.sent_query = self.query
        self.history.add(caption.text)
        return caption

    def _video_turn(self, clip: Clip, query: str | None) -> Caption:
        t0 = time.perf_counter()
        pixels, (gt, gh, gw) = patchify(clip.frames, self.model.patches, self.model.device)
        vision = self.vision(pixels, (gt, gh, gw))
        m = self.model.patches.merge
        start, stop = clip.start - self.time_offset, clip.stop - self.time_offset
        text = self.prompt.video_turn(start, stop, query, first=self.turns == 0)
        ids = self.prompt.encode(text, [vision.shape[0]]).ids
        self.last_prompt_text = text
        stats = TurnStats(vision_s=self._elapsed(t0))
        out = self._turn(ids, [(gt, gh // m, gw // m)], vision, self.cfg.max_new_tokens, stats, clip.stop)
        return self._caption(clip.start, clip.stop, out, "caption", None, clip.ready_at, stats)

    # -- context policy ----------------------------------------------------------------------------
    def _must_roll(self, clip: Clip) -> bool:
        if self.cfg.context != "rollover":
            return False
        too_long = clip.stop - self.time_offset > self.cfg.rollover_seconds
        return too_long or self._tokens_needed(clip) > 0

    def _tokens_needed(self, clip: Clip) -> int:
        """Tokens to free so the next turn (and the headroom) fits."""
        per_frame = (clip.frames.shape[1] // 28) * (clip.frames.shape[2] // 28) // 2 + 32
        need = self.context_length + per_frame * len(clip.frames) + self.cfg.max_new_tokens + self.cfg.context_headroom
        return max(0, need - self.decoder.cache.capacity)

    def _rollover(self, clip: Clip) -> Clip:
        """A fresh context opening on the most recent 6 frames (3 s); model time restarts at 0."""
        clips = [c for c in self.recent if c.frames.shape[1:] == clip.frames.shape[1:]]
        frames = np.concatenate([c.frames for c in clips])[-6:]
        stamps = sum((c.timestamps for c in clips), ())[-6:]
        self.reset()
        self.rollovers += 1
        self.time_offset = stamps[0]
        return Clip(frames, tuple(stamps), clip.ready_at)

    def _evict(self, clip: Clip) -> None:
        """Window policy: drop the oldest turns after the first so the window (and the cache) hold."""
        k = window_cut(self.segments, clip.stop, self.cfg.window_seconds, self._tokens_needed(clip))
        if k == 0:
            return
        first, last = self.segments[1], self.segments[k]
        n, shift = last.end - first.start, last.pos_end - first.pos_start
        self.decoder.evict(first.start, last.end, shift)
        for seg in self.segments[1:k + 1]:
            self.chooser.remove(torch.tensor(seg.ids, dtype=torch.long))
        for seg in self.segments[k + 1:]:
            seg.start, seg.end, seg.pos_start, seg.pos_end = seg.start - n, seg.end - n, seg.pos_start - shift, seg.pos_end - shift
        del self.segments[1:k + 1]
        self.next_pos -= shift
        self.evicted_turns += k

    def ask(self, question: str, at: float = 0.0) -> Caption:
        """Answer a viewer's question about what has been seen so far, from the same cache."""
        t0 = time.perf_counter()
        text = self.prompt.question_turn(question, first=self.turns == 0)
        ids = self.prompt.encode(text, []).ids
        self.last_prompt_text = text
        out = self._turn(ids, [], None, self.cfg.answer_max_new_tokens, TurnStats(), at)
        self.sent_query = None  # commentary resumes with its instruction restated
        return self._caption(at, at, out, "answer", question, None, self.last_stats, t0=t0)

    def _turn(self, ids: list[int], grids, vision, max_new: int, stats: TurnStats, at: float) -> list[int]:
        dec = self.decoder
        start, pos_start = dec.cache.length, self.next_pos
        if start + len(ids) + max_new > dec.cache.capacity:
            raise ContextFullError(f"turn of {len(ids)} tokens does not fit: {start} of {dec.cache.capacity} "
                                   "context tokens in use")
        self.last_prompt_ids = ids
        t1 = time.perf_counter()
        ids_t = torch.tensor(ids, dtype=torch.long, device=dec.device)
        x = dec.embed_ids(ids_t)[None]
        if vision is not None:
            x[0, ids_t == self.model.video_token_id] = vision.to(x.dtype)
        if self.turns == 0 or self.cfg.positions == "exact":
            pos, self.next_pos = segment_positions(ids, self.model.video_token_id, grids, self.next_pos)
        else:
            pos, self.next_pos = linear_positions(len(ids), self.next_pos)
        logits = dec(x, pos.to(dec.device), start)[0, -1]
        self.chooser.add(ids_t)
        stats.prompt_tokens = len(ids)
        stats.prefill_s = self._elapsed(t1)
        t2 = time.perf_counter()
        out = self._decode(logits, max_new)
        stats.decode_s = self._elapsed(t2)
        stats.new_tokens = len(out)
        stats.context = dec.cache.length
        self.segments.append(Segment(start, dec.cache.length, pos_start, self.next_pos, at, ids + out[:-1], self.turns))
        self.turns += 1
        self.last_stats = stats
        return out

    def _decode(self, logits: torch.Tensor, max_new: int) -> list[int]:
        """The decode loop. The last token (EOS or the capped one) is never fed: it stays out of the context."""
        dec = self.decoder
        out: list[int] = []
        for k in range(max_new):
            tok = self.chooser.choose(logits, k)
            out.append(tok)
            if tok in self.stop_ids or k == max_new - 1:
                break
            tok_t = torch.tensor([tok], device=dec.device)
            self.chooser.add(tok_t)
            pos, self.next_pos = self.next_pos, self.next_pos + 1
            if self.static is not None:
                logits = self.static(tok, pos, dec.cache.length)
                dec.cache.length += 1
            else:
                logits = dec(dec.embed_ids(tok_t)[None], torch.full((3, 1), pos, device=dec.device),
                             dec.cache.length)[0, -1]
        return out

    def _caption(self, start, stop, out, kind, question, ready_at, stats, t0=None) -> Caption:
        text = self.model.tokenizer.decode(out, skip_special_tokens=True)
        now = time.monotonic()
        latency = now - ready_at if ready_at is not None else time.perf_counter() - (t0 or time.perf_counter())
        return Caption(start=start, stop=stop, text=text, token_ids=tuple(out), kind=kind, query=question,
                       turn=self.turns, latency_s=latency)

    def _elapsed(self, t0: float) -> float:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
