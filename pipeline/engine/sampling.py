"""Choosing the next token: the reference's logits processing, in its order, without generate().

1. repetition penalty over every id in the context (prompt, video pads, past turns, this turn);
2. the streaming-EOS threshold: at step k, if p(' ...') <= base + step*k the token is forbidden;
3. greedy argmax, or temperature -> top-k -> top-p -> multinomial sampling.
"""

from __future__ import annotations

import torch


class TokenChooser:
    def __init__(self, vocab_size: int, device, *, repetition_penalty: float, greedy: bool,
                 temperature: float | None, top_k: int | None, top_p: float | None,
                 silence_id: int | None, eos_base: float | None, eos_step: float, seed: int | None = None):
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        self.penalty = repetition_penalty
        self.greedy = greedy
        self.temperature = temperature if temperature and temperature > 0 else 1.0
        self.top_k = top_k or 0
        self.top_p = top_p if top_p is not None else 1.0
        self.silence_id = silence_id
        self.eos_base, self.eos_step = eos_base, eos_step
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)

    # the context's token multiset, for the repetition penalty
    def add(self, ids: torch.Tensor) -> None:
        self.counts.index_add_(0, ids.to(self.counts.device), torch.ones_like(ids, dtype=torch.int32,
                                                                               device=self.counts.device))

    def remove(self, ids: torch.Tensor) -> None:
        self.counts.index_add_(0, ids.to(self.counts.device), -torch.ones_like(ids, dtype=torch.int32,
                                                                                device=self.counts.device))

    def reset(self) -> None:
        self.counts.zero_()

    def process(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Float32 logits (V,) -> processed logits (V,), before any sampling warpers."""
        if self.penalty != 1.0:
            seen = self.counts > 0
            penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(seen, penalised, logits)
        if self.silence_id is not None and self.eos_base is not None and (self.eos_base or self.eos_step):
            # (base 0 and step 0, the reference's default, forbid nothing that could be chosen: skipped)
            threshold = self.eos_base + self.eos_step * step
            p = torch.softmax(logits, dim=-1)[self.silence_id]
            logits = logits.clone()
            logits[self.silence_id] = torch.where(p <= threshold, -float("inf"), logits[self.silence_id])
        return logits

    def choose(self, logits: torch.Tensor, step: int) -> int:
        logits = self.process(logits, step)
        if self.greedy:
            return int(torch.argmax(logits))
        logits = logits / self.temperature
        if self.top_k > 0:
            kth = torch.topk(logits, min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum <= (1 - self.top_p)
            drop[-1] = False
            logits = logits.masked_fill(drop.scatter(0, order, drop), -float("inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
