"""Choosing the next token for many streams at once: the reference's logits processing, in its order.

Per row (stream), as transformers' generate() does it in LiveCC's reference loop (demo/infer.py):

1. repetition penalty (``RepetitionPenaltyLogitsProcessor``) over every id in that stream's context
   (prompt, video pads, past turns, this turn);
2. the streaming-EOS threshold (livecc-utils' ``ThresholdLogitsProcessor``): at generation step k, if
   p(' ...') <= base + step·k the token is forbidden;
3. greedy argmax, or temperature -> top-k -> top-p -> multinomial sampling.

State per slot: the context's token counts (slots, vocab) int32 and, when seeded, its own random
generator, so a stream draws the same tokens whether it runs alone or batched with others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    repetition_penalty: float = 1.05
    greedy: bool = False
    temperature: float | None = None  # None or <= 0: 1.0
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None: 1.0 (off)
    silence_id: int | None = None  # the ' ...' token of the streaming-EOS threshold
    eos_base: float | None = 0.0
    eos_step: float = 0.0


class TokenChooser:
    """Token choice for the rows of a decode batch. ``slots`` rows of state; not thread-safe."""

    def __init__(self, slots: int, vocab_size: int, device, settings: SamplingSettings):
        self.s = settings
        self.counts = torch.zeros(slots, vocab_size, dtype=torch.int32, device=device)
        self.device = torch.device(device)
        self.temperature = settings.temperature if settings.temperature and settings.temperature > 0 else 1.0
        self.top_k = settings.top_k or 0
        self.top_p = settings.top_p if settings.top_p is not None else 1.0
        self.generators: list[torch.Generator | None] = [None] * slots
        self._threshold = (settings.silence_id is not None and settings.eos_base is not None
                           and bool(settings.eos_base or settings.eos_step))  # (0, 0) forbids nothing: skipped

    # -- per-slot state -----------------------------------------------------------------------------------
    def seed(self, slot: int, seed: int | None) -> None:
        """Give ``slot`` its own generator (None: the process-wide one)."""
        if seed is None:
            self.generators[slot] = None
            return
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        self.generators[slot] = g

    def add(self, slot: int, ids: torch.Tensor) -> None:
        """Count ``ids`` (int64, any shape, any device) into ``slot``'s context multiset."""
        ids = ids.reshape(-1).to(self.counts.device, non_blocking=True)
        self.counts[slot].index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def add_ids(self, slots: list[int], ids: torch.Tensor) -> None:
        """One id per slot: ``ids[b]`` (int64 (B,) on the device) into slot ``slots[b]`` (distinct slots), without a
        host sync."""
        rows = torch.tensor(slots).to(self.counts.device, non_blocking=True)
        self.counts[rows, ids] += 1

    def remove(self, slot: int, ids: torch.Tensor) -> None:
        """Take ``ids`` (int64, any shape, any device) out of ``slot``'s context multiset."""
        ids = ids.reshape(-1).to(self.counts.device, non_blocking=True)
        self.counts[slot].index_add_(0, ids, -torch.ones_like(ids, dtype=torch.int32))

    def snapshot(self, slots: list[int]) -> list[torch.Tensor | None]:
        """Each slot's generator state (None for a slot on the process-wide generator), for ``restore``. Host
        only: a CUDA generator's state is its seed and offset, kept on the host."""
        return [None if self.generators[s] is None else self.generators[s].get_state() for s in slots]

    def restore(self, slot: int, state: torch.Tensor | None) -> None:
        """Undo the draws ``slot`` made since ``snapshot`` (a choice the engine ran ahead and threw away), so a
        seeded stream draws the same tokens as when nothing was run ahead."""
        if state is not None and self.generators[slot] is not None:
            self.generators[slot].set_state(state)

    def reset(self, slot: int) -> None:
        self.counts[slot].zero_()

    # -- choice ---------------------------------------------------------------------------------------------
    def process(self, logits: torch.Tensor, counts: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, V) -> processed logits (B, V), before sampling. ``counts`` (B, V) int32: each row's
        context counts (rows of ``self.counts``); ``steps`` (B,) int64: each row's generation step within the turn (0
        for the first new token)."""
        if self.s.repetition_penalty != 1.0:
            seen = counts > 0
            p = self.s.repetition_penalty
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        if self._threshold:
            sid = self.s.silence_id
            threshold = self.s.eos_base + self.s.eos_step * steps.to(logits.device, non_blocking=True).float()
            prob = torch.softmax(logits, dim=-1)[:, sid]
            logits = logits.clone()
            logits[:, sid] = torch.where(prob <= threshold, -float("inf"), logits[:, sid])
        return logits

    def choose(self, logits: torch.Tensor, slots: list[int], steps: list[int]) -> torch.Tensor:
        """Next token ids (B,) int64 on the device, for logits (B, V) of rows belonging to ``slots`` (a prefill's
        first tokens). Nothing is counted."""
        # host lists reach the device without a stream sync, so choosing does not wait for the step in flight
        slots_t = torch.tensor(slots, dtype=torch.long).to(logits.device, non_blocking=True)
        steps_t = torch.tensor(steps, dtype=torch.long)
        logits = self.process(logits, self.counts.index_select(0, slots_t), steps_t)
        return self.pick(logits, [self.generators[s] for s in slots])

    def choose_rows(self, logits: torch.Tensor, steps: torch.Tensor, live: torch.Tensor,
                    generators: list | None = None) -> torch.Tensor:
        """A decode step's choice for slots 0..nb-1 (the rows of ``ModelRunner.decode_step``), all on the device and
        without a host sync, so a CUDA graph holds it: logits (nb, V) float32, ``steps`` (nb,) int64, ``live`` (nb,)
        int64 1 for a row that takes part in the step (0: it sits out). Returns the ids (nb,) int64 and counts each
        live row's id into its slot. ``generators``: each row's own generator (None: the process-wide one), for
        seeded sampling (not capturable in a graph); by default every row draws from the process-wide one."""
        nb = logits.shape[0]
        logits = self.process(logits, self.counts[:nb], steps)
        chosen = self.pick(logits, generators or [None] * nb)
        # counted without a sort (an accumulating index_put_ sorts its indices): a scatter-add, 0 for a row sitting out
        self.counts[:nb].scatter_add_(1, chosen[:, None], live[:, None].to(torch.int32))
        return chosen

    def pick(self, logits: torch.Tensor, generators: list) -> torch.Tensor:
        """Processed logits (B, V) -> ids (B,) int64: greedy argmax, or temperature -> top-k -> top-p -> multinomial,
        row b drawing from ``generators[b]`` (None: the process-wide generator)."""
        if self.s.greedy:
            return torch.argmax(logits, dim=-1)
        logits = logits / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum <= (1 - self.top_p)
            drop[:, -1] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        probs = torch.softmax(logits, dim=-1)
        # a seeded row draws from its stream's own generator, so batching does not change what that stream samples;
        # when no row is seeded (the default) the rows draw together from the process-wide one: one call, not one a row
        if all(g is None for g in generators):
            # one draw a row as torch.multinomial makes it (the exponential race: argmax of p / E, E ~ Exp(1)),
            # written out: multinomial checks its input with host syncs in older PyTorch, which a CUDA graph forbids
            return probs.div(torch.empty_like(probs).exponential_()).argmax(-1)
        return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])

    def choose_one(self, logits: torch.Tensor, step: int, slot: int = 0) -> int:
        """One row: logits (V,) -> token id (a host int). For tests and tools."""
        return int(self.choose(logits[None], [slot], [step])[0])
