"""The model runner: vision, prefill and one decode step for many streams, on one device.

- ``encode_videos(clips)``: the vision tower over several clips (same-size clips in one call; a CUDA
  graph per shape on CUDA).
- ``prefill(turns)``: several streams' new turns, packed into one sequence, onto their cache rows in one
  pass over the weights; logits of each turn's last token. Attention over each row's past plus its new
  tokens: one FlashAttention variable-length call per layer for every row on CUDA (reading the rows in
  place in the cache; on Hopper the past's 2048-key blocks through cuDNN, merged by log-sum-exp), SDPA
  with a causal mask row by row elsewhere. A lone row's prefill is replayed from a CUDA graph once its (slot, turn
  length) has been seen twice (``cuda_graphs.PrefillGraphs``: the same attention, the cuDNN part keyed by its past).
- ``decode(slots, feed, positions, steps)``: one token for each of B streams in one pass over the weights, and the
  choice of each stream's next token (``TokenChooser.choose_rows``: the sampler is part of the step). The step always
  covers cache rows 0..nb-1 (nb = a batch-size bucket holding the highest slot), so its shapes depend only on (nb,
  attention window) and it is captured as a CUDA graph per pair (``cuda_graphs.py``). Its inputs live on the device
  (``state``: each row's id, position, cache position, generation step, and whether it takes part) and the step
  advances them itself, so the steps of a caption in progress replay with nothing copied in between. Rows not in
  the step compute a throw-away token: they write at their own first free position, which their next prefill or
  decode overwrites, and their output is ignored. Attention: split-KV Triton kernels (or one FlashAttention varlen
  call) per layer on CUDA (one query a row), grouped matmuls over a masked window elsewhere.

Only the engine thread calls a runner.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..errors import first_line
from .cuda_graphs import DecodeGraphs, PrefillGraphs
from .decode_attention import decode_attention
from .kv_cache import KVCache
from .model import TextModel
from .sampling import SamplingSettings, TokenChooser
from .vision import patchify
from .vision_tower import VisionTower

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
# attention windows of a decode step: every row reads this many cache positions, so the steps are fine
# (2048) rather than powers of two (at 32 rows and 16.4k tokens, a 32k window doubled the step's time)
WINDOWS = (1024,) + tuple(range(2048, 131072 + 1, 2048))


# the rows of ``ModelRunner.state``: per cache row, the id its next decode step feeds, its 1-D position, its cache
# position, its generation step in the turn (the streaming-EOS threshold's k) and 1 if it takes part in the step
STATE = ("token", "pos", "at", "step", "live")
TOKEN, POS, AT, STEP, LIVE = range(len(STATE))

# the prefill's attention over a row's past in blocks of this many keys goes to cuDNN (Hopper and later, turns of
# at least PAST_MIN_QUERIES tokens): cuDNN plans once per shape (≈ 35 ms), so the block sizes are few. With
# PAST_SPLIT > 1 the block's keys are that many equal parts of one cuDNN call (``TextModel.attend_past``; blocks of
# 1024·PAST_SPLIT keys then): 3 parts cut the attention's GPU time by 0.4–2.0 ms a 386-token turn at 7.7k–19.7k of
# context on an H200 but added 0.6 ms of merging, and the core's prefill time did not change: off by default
# (docs/performance.md, 2026-12-01; ``scripts/profile_prefill.py --contexts ... --past-split 1 3``)
PAST_SPLIT = 1
PAST_BLOCK = 2048
PAST_MIN_QUERIES = 64


# the decode step's attention through decode_attention's split-KV kernels (CUDA, bf16/fp16, Triton importable);
# False: FlashAttention-2's varlen call, as the prefill (scripts/bench_streams.py --decode-attention compares them)
SPLIT_KV_DECODE = True


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def past_block(start: int, n: int) -> int:
    """How many of a row's ``start`` cached keys its prefill of ``n`` new tokens reads through cuDNN: whole
    ``PAST_BLOCK``s, for turns of at least ``PAST_MIN_QUERIES`` tokens (0: FlashAttention reads the whole row)."""
    return start // PAST_BLOCK * PAST_BLOCK if n >= PAST_MIN_QUERIES else 0


def bucket(n: int, sizes: tuple[int, ...], cap: int) -> int:
    """The smallest size >= n (sizes above ``cap`` count as ``cap``)."""
    for s in sizes:
        if s >= n:
            return min(s, cap)
    return cap


class ModelRunner:
    """Weights (``TextModel``), the KV cache (``slots`` rows of ``capacity`` tokens), the vision tower, and
    the decode-step graphs of one loaded checkpoint on its device."""

    def __init__(self, loaded, slots: int, capacity: int, graphs: bool | None = None, compile: bool | None = None,
                 sampling: SamplingSettings | None = None):
        self.loaded = loaded
        self.device = loaded.device
        on_cuda = self.device.type == "cuda"
        if PAST_BLOCK % PAST_SPLIT:
            raise ValueError(f"runner.PAST_BLOCK ({PAST_BLOCK}) must be a multiple of PAST_SPLIT ({PAST_SPLIT})")
        self.model = TextModel(loaded.hf)
        m = self.model
        self.cache = KVCache(m.n_layers, slots, m.n_kv, m.head_dim, capacity, m.dtype, self.device)
        # a row sitting out a decode step writes at its length, which a turn always leaves < capacity
        self.capacity = capacity
        self.use_graphs = on_cuda if graphs is None else graphs and on_cuda
        compile_ = (compile if compile is not None else self.use_graphs) and on_cuda
        # int8 weights: inductor's coordinate-descent setting (torchao's recommendation) turns a one-row matmul
        # into a reduction that reads the int8 matrix and scales it in one kernel; without it inductor rewrites
        # the matmul to aten._weight_int8pack_mm, whose CUDA kernel made a decode step 10x slower than bf16
        # (H200: 63 ms a token, 0.51 ms a matrix, scripts/profile_kernels.py --quantize int8); for several rows
        # the pattern matcher is off so that rewrite cannot happen (the int8 matrix is converted, then cuBLAS)
        self.compile_options = {"coordinate_descent_tuning": True, "pattern_matcher": False} \
            if loaded.quantize == "int8" else None
        # the one-row decode step's: coordinate-descent tuning for its products' Triton reductions (model.linear)
        self.one_row_compile_options = self.compile_options or {"coordinate_descent_tuning": True}
        self.vision = VisionTower(loaded.visual, use_graphs=self.use_graphs, compile=compile_)
        # PyTorch's FlashAttention kernels need Ampere (8.0) or newer; older GPUs take the masked SDPA path
        self.flash = on_cuda and m.dtype in (torch.bfloat16, torch.float16) and \
            torch.cuda.get_device_capability(self.device) >= (8, 0)
        # the decode step's attention: split-KV Triton kernels over grouped heads (decode_attention), FlashAttention-2
        # varlen where Triton is missing or SPLIT_KV_DECODE is off
        self.split_kv = self.flash and SPLIT_KV_DECODE and _has_triton()
        self.cudnn_past = self.flash and torch.backends.cudnn.is_available() and \
            torch.cuda.get_device_capability(self.device) >= (9, 0)
        self.video_token_id = loaded.video_token_id
        # the token choice (the sampler), part of every decode step: greedy with no penalty unless told
        self.chooser = TokenChooser(slots, m.vocab, self.device,
                                    sampling or SamplingSettings(repetition_penalty=1.0, greedy=True))
        # the decode step's inputs per cache row, on the device, which the step itself advances (``decode``)
        self.state = torch.zeros(len(STATE), slots, dtype=torch.long, device=self.device)
        self._incoming = torch.zeros_like(self.state)  # the host's rewrite of ``state``, before it is merged in
        self.logits = torch.zeros(slots, m.vocab, dtype=torch.float32, device=self.device)  # the last step's
        # the embedding table on the step's device: the lookup is part of the step (else looked up before it, into x)
        self.embed_in_step = m.embed.weight.device == self.device
        self.x = None if self.embed_in_step else torch.zeros(slots, m.hidden, dtype=m.dtype, device=self.device)
        self._expect: tuple | None = None  # (slots, lengths, positions, steps) the state holds after the last step
        self.graphs = DecodeGraphs(self, compile=compile_) if self.use_graphs else None
        # a lone row's prefill from a CUDA graph (its FlashAttention call needs the flash path)
        self.prefill_graphs = PrefillGraphs(self, self.graphs.pool) if self.graphs is not None and self.flash else None
        self.prefill_compiled = compile_  # the prefill's norms/rotary/SiLU compiled (TextModel.compile_prefill)
        if compile_:
            m.compile_prefill(self.compile_options)
        self.windows = tuple(sorted({w for w in WINDOWS if w < capacity} | {capacity}))

    # -- vision ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_videos(self, clips: list[np.ndarray]) -> list[torch.Tensor]:
        """Visual tokens for each clip (T, H, W, 3) uint8 (T even, H and W multiples of 28): a list of
        (T/2·H/28·W/28, hidden) in the model dtype. Clips of one frame size go through the tower together
        (each temporal patch attends only within itself, so stacking clips along time changes nothing)."""
        out: list[torch.Tensor | None] = [None] * len(clips)
        groups: dict[tuple, list[int]] = {}
        for i, frames in enumerate(clips):
            groups.setdefault(frames.shape[1:], []).append(i)
        for idx in groups.values():
            frames = np.concatenate([clips[i] for i in idx]) if len(idx) > 1 else clips[idx[0]]
            pixels, grid = patchify(frames, self.loaded.patches, self.device)
            tokens = self.vision(pixels, grid)
            sizes = [len(clips[i]) // self.loaded.patches.temporal * grid[1] * grid[2]
                     // self.loaded.patches.merge ** 2 for i in idx]
            for i, part in zip(idx, tokens.split(sizes)):
                out[i] = part
        return out  # type: ignore[return-value]

    # -- prefill --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, turns: list[tuple[int, list[int], torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """New turns of several streams onto their cache rows, in one pass over the weights.

        Each turn is (slot, ids, positions (3, T), vision or None): ``ids`` with video pads expanded, which
        ``vision`` fills in order. The turns are packed into one sequence (no padding): the weights see every
        new token at once, and each layer writes all new keys/values with one scatter. Attention, per row over
        the row's cached past and causally over its new tokens: on CUDA in bf16/fp16 ONE FlashAttention
        variable-length call per layer reads every row in place in the cache (``KVCache.varlen``; ``seqused_k``
        = each row's length, causal alignment bottom-right); elsewhere SDPA with a causal mask, row by row.
        Returns float32 logits (B, V) of each turn's last token, in the order of ``turns``.

        Raises RuntimeError if a row would pass the cache capacity."""
        m, cache, dev = self.model, self.cache, self.device
        order = sorted(range(len(turns)), key=lambda b: turns[b][0])  # rows packed in storage order (varlen's need)
        turns = [turns[b] for b in order]
        starts, lens = [cache.length(t[0]) for t in turns], [len(t[1]) for t in turns]
        for start, n in zip(starts, lens):
            if start + n > self.capacity:
                raise RuntimeError(f"context full: {start + n} tokens > capacity {self.capacity}")
        offs = np.concatenate([[0], np.cumsum(lens)])
        ids = torch.tensor([i for t in turns for i in t[1]], dtype=torch.long)
        pos = torch.cat([t[2] for t in turns], dim=1)[:, None]  # 3, 1, total
        rows = torch.tensor(np.repeat([t[0] for t in turns], lens), device=dev)
        at = torch.tensor(np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)]), device=dev)
        x = m.embed_ids(ids)[None]  # 1, total, hidden
        vision = [t[3] for t in turns if t[3] is not None]
        if vision:
            where = (ids == self.video_token_id).nonzero()[:, 0]  # host tensor: no device sync
            x[0, where.to(dev)] = torch.cat(vision).to(x.dtype)
        attend = self._attend_varlen(turns, starts, lens, offs) if self.flash else \
            self._attend_rows(turns, starts, lens, offs)

        def attend_and_store(i, q, k, v):  # q (1, H, total, d), k/v (1, KV, total, d)
            cache.write(i, rows, at, k[0].transpose(0, 1), v[0].transpose(0, 1))
            return attend(i, q)

        pos = pos.to(dev)
        if len(turns) == 1 and self.prefill_graphs is not None:  # a lone row: replayed from its graph once seen twice
            graphs = self.prefill_graphs
            past = past_block(starts[0], lens[0]) if self.cudnn_past and graphs.cudnn else 0
            logits = graphs.run(turns[0][0], x[0], pos, at, starts[0] + lens[0], past)
            if logits is not None:
                cache.advance(turns[0][0], lens[0])
                return logits
        if self.prefill_compiled:
            try:
                h = m.forward(x, pos, attend_and_store, m.prefill_pre, m.prefill_post)
            except Exception as e:  # noqa: BLE001 - a compiler problem must not stop captioning
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                log.warning("torch.compile of the prefill failed (%s); prefill runs eager from now on", first_line(e))
                self.prefill_compiled = False
                m.uncompile_prefill()
                h = m.forward(x, pos, attend_and_store)  # rewrites the same keys at the same positions
        else:
            h = m.forward(x, pos, attend_and_store)
        for (slot, _, _, _), n in zip(turns, lens):
            cache.advance(slot, n)
        last = offs[1:] - 1 if order == sorted(order) else (offs[1:] - 1)[np.argsort(order)]  # the caller's order
        return m.logits(h[0, torch.tensor(last, device=dev)])

    def prefill_one(self, x, pos, at, used, rows, cu_q, cu_k, tok_pos, slot: int = 0, past: int = 0) -> torch.Tensor:
        """The prefill of one row as ``PrefillGraphs`` captures it: fixed shapes, every varying value in a tensor.
        x (T, hidden) embeddings, pos (3, 1, T) int64, at (T,) int64 cache positions, used (1,) int32 the row's length
        after the turn, rows (T,) int64 its slot, cu_q (2,) int32 [0, T], cu_k (2,) int32 where the row's keys after
        its first ``past`` start and where they end in ``KVCache.varlen``, tok_pos (T,) int64 0..T-1. One
        FlashAttention varlen call a layer over the row (key bound: the capacity); with ``past`` > 0 (a multiple of
        ``PAST_BLOCK``) the first ``past`` keys of ``slot`` through cuDNN (``TextModel.attend_past``), merged by
        log-sum-exp as in the eager prefill. Returns float32 logits (1, V) of the last token."""
        m, cache, T = self.model, self.cache, x.shape[0]
        if past:
            used_tail = used - past
            tok_row = rows.new_zeros(T)  # for attend_varlen_lse (a padded log-sum-exp layout in older builds)

        def attend(i, q, k, v):
            cache.write(i, rows, at, k[0].transpose(0, 1), v[0].transpose(0, 1))
            kf, vf = cache.varlen(i)
            qp = q[0].transpose(0, 1).contiguous()  # T, H, d
            if not past:
                return m.attend_varlen(qp, kf, vf, cu_q, cu_k, used, T, self.capacity)[None]
            o, lse = m.attend_varlen_lse(qp, kf, vf, cu_q, cu_k, used_tail, T, self.capacity - past,
                                         tok_row, tok_pos)
            kb, vb = cache.row(i, slot, past)
            ob, lb = m.attend_past(qp, kb, vb, PAST_SPLIT)
            return m.merge(ob, lb, o, lse)[None]

        h = m.forward(x[None], pos, attend, m.prefill_pre, m.prefill_post)
        return m.logits(h[0, -1:])

    def _attend_varlen(self, turns, starts, lens, offs):
        """attend(layer, q) for the packed turns (in slot order): one FlashAttention varlen call over the cache rows.

        With ``cudnn_past`` a row's past is split at a multiple of ``PAST_BLOCK``: the block before it goes to
        cuDNN (``TextModel.attend_past``, one call per row), the rest of the past and the new tokens to the one
        FlashAttention call, and the two are merged by their log-sum-exp."""
        m, cache, dev = self.model, self.cache, self.device
        cu_q = torch.tensor(offs, dtype=torch.int32, device=dev)
        first = [t[0] * cache.varlen_stride for t in turns]
        ends = [s + n for s, n in zip(starts, lens)]

        def keys_from(skip):  # FlashAttention's view of each row: keys skip[b] .. ends[b]
            cu_k = torch.tensor([f + k for f, k in zip(first, skip)] + [first[-1] + self.capacity],
                                dtype=torch.int32, device=dev)
            used = torch.tensor([e - k for e, k in zip(ends, skip)], dtype=torch.int32, device=dev)
            return cu_k, used, max(e - k for e, k in zip(ends, skip))
        plain = keys_from([0] * len(turns))
        max_q = max(lens)
        bulk = [past_block(s, n) if self.cudnn_past else 0 for s, n in zip(starts, lens)]
        if any(bulk):
            tail = keys_from(bulk)
            tok_row = torch.tensor(np.repeat(np.arange(len(turns)), lens), device=dev)
            tok_pos = torch.tensor(np.concatenate([np.arange(n) for n in lens]), device=dev)

        def attend(i, q):
            kf, vf = cache.varlen(i)
            qp = q[0].transpose(0, 1).contiguous()  # total, H, d
            if not any(bulk) or not self.cudnn_past:
                return m.attend_varlen(qp, kf, vf, cu_q, *plain[:2], max_q, plain[2])[None]  # 1, total, H, d
            o, lse = m.attend_varlen_lse(qp, kf, vf, cu_q, *tail[:2], max_q, tail[2], tok_row, tok_pos)
            try:
                for b, (slot, _, _, _) in enumerate(turns):
                    if bulk[b]:
                        rows = slice(offs[b], offs[b + 1])
                        kb, vb = cache.row(i, slot, bulk[b])
                        ob, lb = m.attend_past(qp[rows], kb, vb, PAST_SPLIT)
                        o[rows] = m.merge(ob, lb, o[rows], lse[rows])
            except RuntimeError as e:  # a cuDNN build or GPU without this attention: FlashAttention alone from now on
                log.warning("cuDNN attention failed (%s); prefill attention stays on FlashAttention", first_line(e))
                self.cudnn_past = False
                return attend(i, q)
            return o[None]
        return attend

    def _attend_rows(self, turns, starts, lens, offs):
        """attend(layer, q) for the packed turns, row by row: SDPA over the row's cache with a causal mask (none
        for a row with no past: SDPA's own causal kernel)."""
        m, cache = self.model, self.cache
        masks = [self._causal_mask(start, n) if start else None for start, n in zip(starts, lens)]

        def attend(i, q):
            outs = []
            for b, (slot, _, _, _) in enumerate(turns):
                kr, vr = cache.row(i, slot, starts[b] + lens[b])
                qb = q[:, :, offs[b]:offs[b + 1]]
                outs.append(m.attend_masked(qb, kr, vr, masks[b]) if starts[b] else m.attend_causal(qb, kr, vr))
            return torch.cat(outs, dim=1)  # 1, total, H, d
        return attend

    def _causal_mask(self, start: int, n: int) -> torch.Tensor | None:
        """Additive mask (g·n, start+n) for the masked kernel: causal, offset by the cached tokens, rows
        repeated per query head of a group."""
        if n <= 1:
            return None
        m, end = self.model, start + n
        allowed = torch.arange(end, device=self.device)[None, :] <= torch.arange(start, end, device=self.device)[:, None]
        width = (end + 7) // 8 * 8  # rows padded to 8 for the fused kernels, then cut back
        mask = torch.full((n, width), float("-inf"), dtype=m.dtype, device=self.device)
        mask[:, :end].masked_fill_(allowed, 0.0)
        return mask.repeat(m.n_heads // m.n_kv, 1)[:, :end]

    # -- decode ---------------------------------------------------------------------------------------------
    def decode_shape(self, slots: list[int]) -> tuple[int, int]:
        """(rows, window) of the step that serves ``slots``: the batch bucket holding the highest slot, and the
        attention window holding the longest of their contexts after this token."""
        nb = bucket(max(slots) + 1, BATCH_BUCKETS, self.cache.slots)
        longest = max(self.cache.length(s) for s in slots) + 1
        return nb, bucket(longest, self.windows, self.windows[-1])

    @torch.inference_mode()
    def decode(self, slots: list[int], feed: list[int | None] | torch.Tensor, positions: list[int],
               steps: list[int] | None = None) -> torch.Tensor:
        """One decode step: a token for each of B streams in one pass over the weights, and the next one chosen.

        Slot ``slots[b]`` feeds ``feed[b]`` (a host id, or None: the id its previous decode step chose, or
        ``feed_next`` gave it, still on the device; or all B as an int64 tensor on any device) at 1-D position
        ``positions[b]`` into its next cache position, at generation step ``steps[b]`` of its turn (default 0; the
        streaming-EOS threshold's k); the
        chooser (``self.chooser``) picks and counts each row's next id. Returns those ids (B,) int64 on the device, in
        the order of ``slots`` (a view the next step may overwrite: copy it before then); the step's raw float32
        logits are in ``step_logits``. Each row advances by one.

        The inputs live on the device (``self.state``) and the step advances them itself (``step``), so a step whose
        rows, lengths, positions and steps are what the previous step left (a caption in progress) writes nothing
        before it runs: on CUDA it is one graph replay (``DecodeGraphs``). Otherwise they are rewritten with one
        copy from the host. Nothing here waits for the GPU (with the embedding table in host memory, quantized weights
        on a GPU without room for it: ``quantize.embeddings_fit``, the lookup reads the ids on the host first)."""
        nb, window = self.decode_shape(slots)
        steps = steps if steps is not None else [0] * len(slots)
        lengths = tuple(self.cache.lengths[:nb])
        tensor = isinstance(feed, torch.Tensor)
        if tensor or any(f is not None for f in feed) or self._expect != (tuple(slots), lengths, tuple(positions),
                                                                           tuple(steps)):
            self._write_state(slots, nb, feed, positions, steps, lengths)
        seeded: list = [None] * nb  # each row's own generator when sampling with a seed (only rows in the step draw)
        if not self.chooser.s.greedy:
            for s in slots:
                seeded[s] = self.chooser.generators[s]
        if not self.embed_in_step:
            self.x[:nb].copy_(self.model.embed_ids(self.state[TOKEN, :nb]), non_blocking=True)
        if self.graphs is None:
            self.step(nb, window, seeded)
        elif not any(seeded):
            self.graphs.run(nb, window)
        else:  # a seeded stream draws from its own generator, which a graph cannot replay: the choice runs eagerly
            self.graphs.run(nb, window, choice=False)
            self.step_choice(nb, seeded)
        for s in slots:
            self.cache.advance(s, 1)
        self._expect = (tuple(slots), tuple(self.cache.lengths[:nb]), tuple(p + 1 for p in positions),
                        tuple(k + 1 for k in steps))
        if slots == list(range(nb)):
            return self.state[TOKEN, :nb]
        return self.state[TOKEN].index_select(0, torch.tensor(slots).to(self.device, non_blocking=True))

    def _write_state(self, slots, nb, feed, positions, steps, lengths) -> None:
        """``state`` of rows 0..nb-1 from the host: one copy, then the ids of rows fed None kept as they are."""
        host = torch.zeros(len(STATE), nb, dtype=torch.long)
        host[AT] = torch.tensor(lengths, dtype=torch.long)  # a row sitting out writes at its length
        host[TOKEN] = -1
        rows = torch.tensor(slots, dtype=torch.long)
        host[POS, rows] = torch.tensor(positions, dtype=torch.long)
        host[STEP, rows] = torch.tensor(steps, dtype=torch.long)
        host[LIVE, rows] = 1
        if isinstance(feed, torch.Tensor):
            host[TOKEN, rows] = feed.to("cpu")  # tools and tests: a host sync is fine there
        else:
            host[TOKEN, rows] = torch.tensor([-1 if f is None else f for f in feed], dtype=torch.long)
        incoming, state = self._incoming[:, :nb], self.state[:, :nb]
        incoming.copy_(host, non_blocking=True)
        state[TOKEN] = torch.where(incoming[TOKEN] >= 0, incoming[TOKEN], state[TOKEN])
        state[POS:].copy_(incoming[POS:])

    def feed_next(self, slots: list[int], ids: torch.Tensor) -> None:
        """Slot ``slots[b]``'s next decode step, fed None, feeds ``ids[b]`` (int64 (B,) on the device: a prefill's
        first tokens, before the host has read them)."""
        self.state[TOKEN].index_copy_(0, torch.tensor(slots).to(self.device, non_blocking=True), ids)

    def step_logits(self, slots: list[int]) -> torch.Tensor:
        """The last decode step's raw float32 logits (B, V) of ``slots`` (before the chooser's processing)."""
        return self.logits.index_select(0, torch.tensor(slots).to(self.device, non_blocking=True))

    def decode_logits(self, slots: list[int], tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """``decode`` fed ``tokens`` (int64 (B,)), returning its raw float32 logits (B, V): for tools and tests."""
        self.decode(slots, tokens, positions)
        return self.step_logits(slots)

    def step(self, nb: int, window: int, generators: list | None = None) -> None:
        """The fixed-shape decode step that ``DecodeGraphs`` captures, all on the device: ``step_model`` then
        ``step_choice``."""
        self.step_model(nb, window)
        self.step_choice(nb, generators)

    def step_model(self, nb: int, window: int) -> None:
        """Rows 0..nb-1 of ``state`` embedded (or ``x``) and through ``decode_step``; their logits into ``logits``."""
        state = self.state[:, :nb]
        x = self.model.embed_ids(state[TOKEN]) if self.embed_in_step else self.x[:nb]
        self.logits[:nb].copy_(self.decode_step(x, state[POS], state[AT], window))

    def step_choice(self, nb: int, generators: list | None = None) -> None:
        """The next ids of rows 0..nb-1 chosen from ``logits`` and counted (``TokenChooser.choose_rows``;
        ``generators``: seeded rows' own, which a graph cannot replay), and each live row's state advanced: its id
        becomes what it chose; its position, cache position and generation step + 1."""
        state = self.state[:, :nb]
        live = state[LIVE]
        chosen = self.chooser.choose_rows(self.logits[:nb], state[STEP], live, generators)
        state[TOKEN] = torch.where(live > 0, chosen, state[TOKEN])
        state[POS:LIVE] += live

    def decode_step(self, x: torch.Tensor, pos: torch.Tensor, at: torch.Tensor, window: int) -> torch.Tensor:
        """The model part of a decode step (``step``): rows 0..nb-1 (nb = x.shape[0]), one token each.
        x (nb, hidden) the tokens' embeddings, pos (nb,)
        1-D positions, at (nb,) cache positions; each row attends over its positions
        0..at: on CUDA in bf16/fp16 with the split-KV kernels of ``decode_attention`` (or one FlashAttention-2
        varlen call) per layer reading the rows in place (``window`` bounds the key length), elsewhere two grouped
        matmuls over the first ``window`` positions with a mask (``TextModel.attend_rows``). Returns float32
        logits (nb, V)."""
        m, cache = self.model, self.cache
        nb = x.shape[0]
        rows = torch.arange(nb, device=x.device)
        x = x[:, None]  # nb, 1, hidden
        if self.flash:  # each row's used keys read in place (no mask, no window)
            used = (at + 1).to(torch.int32)
            if self.split_kv:
                def attend(i, q, k, v):  # this row's key/value already stored by model.store_kv
                    return decode_attention(q[:, :, 0], cache.k[i], cache.v[i], used, window)[:, None]
            else:
                cu_q = rows.to(torch.int32)
                cu_q = torch.cat([cu_q, cu_q[-1:] + 1])
                cu_k = (cu_q * cache.varlen_stride).clamp_(max=(nb - 1) * cache.varlen_stride + self.capacity)

                def attend(i, q, k, v):
                    kf, vf = cache.varlen(i)
                    return m.attend_varlen(q[:, :, 0].contiguous(), kf, vf, cu_q, cu_k, used, 1, window)[:, None]
        else:
            masked = (torch.arange(window, device=x.device)[None, :] > at[:, None])[:, None, None, :]

            def attend(i, q, k, v):
                kw, vw = cache.window(i, nb, window)
                return m.attend_rows(q, kw, vw, masked)

        store = (cache.k, cache.v, lambda i: cache.decode_index(i, rows, at))
        pre, post, head = m.step_fns(nb)
        h = m.forward(x, pos.expand(3, nb)[:, :, None], attend, pre, post, store=store)
        return head(h[:, 0])

    def warm_up(self) -> None:
        """Compile the prefill and compile and capture every decode batch size this cache can run
        (``DecodeGraphs.warm_up``) while the cache is empty, so no stream waits for a compilation mid-run; a no-op
        without CUDA graphs or once a row holds tokens."""
        if self.graphs is None or any(self.cache.lengths):
            return
        with torch.cuda.device(self.device):  # captures and streams on the runner's GPU, whatever this thread's is
            self._warm_up()

    def _warm_up(self) -> None:
        t0 = time.perf_counter()
        graphs, self.prefill_graphs = self.prefill_graphs, None  # the warm-up turns: eager, not counted toward a graph
        try:
            self._warm_up_prefill()
        finally:
            self.prefill_graphs = graphs
        buckets = sorted({bucket(n, BATCH_BUCKETS, self.cache.slots) for n in range(1, self.cache.slots + 1)})
        self.graphs.warm_up(buckets)
        log.info("prefill and decode step (%s rows) compiled and captured in %.1f s", buckets,
                 time.perf_counter() - t0)

    def _warm_up_prefill(self) -> None:
        if self.prefill_compiled:  # the compiled prefill (dynamic token count): one text turn on row 0, then undone
            n = min(2 * PAST_MIN_QUERIES, self.capacity)
            self.prefill([(0, [0] * n, torch.arange(n).expand(3, n), None)])
            self.cache.reset(0)
        n = 2 * PAST_MIN_QUERIES
        if self.cudnn_past and self.capacity >= PAST_BLOCK + n:
            # a turn over a past block: cuDNN's first attention call (its handle and first plan) took 567 ms of a
            # stream's prefill on an H200 when it came mid-run, at the first turn past 2,048 keys
            # then two rows' turns together when there are two rows: the compiled merge (TextModel.merge) then also
            # knows a row that is a slice of the packed turns (another compilation, not mid-run either)
            rows = range(min(2, self.cache.slots))
            for r in rows:
                self.prefill([(r, [0] * PAST_BLOCK, torch.arange(PAST_BLOCK).expand(3, PAST_BLOCK), None)])
            self.prefill([(r, [0] * (n - r), torch.arange(PAST_BLOCK, PAST_BLOCK + n - r).expand(3, n - r), None)
                          for r in rows])
            for r in rows:
                self.cache.reset(r)

    # -- context edits ---------------------------------------------------------------------------------------
    def evict(self, slot: int, start: int, end: int, shift: int) -> None:
        self.cache.evict(slot, start, end, shift, self.model.inv_freq)

    def event(self) -> torch.cuda.Event | None:
        """A timing CUDA event recorded now on the current stream (None off CUDA): GPU work is timed between two of
        them (``Event.elapsed_time``, ms) once both have passed, without the host waiting in between."""
        if self.device.type != "cuda":
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
