"""The KV cache: one row (slot) per stream, preallocated, each row with its own length.

Keys are stored rotated (mRoPE applied), values as computed. Storage per tensor:
``(layers, slots, kv_heads, capacity, head_dim)`` in the model dtype; a token costs
``layers · 2 · kv_heads · head_dim · itemsize`` bytes (LiveCC-7B in bfloat16: 28·2·4·128·2 = 56 KiB,
so 1.75 GiB per 32k-token slot). The cache is the only owner of the lengths: writers go through
``prefill_write`` / ``decode_write`` and ``advance``; ``evict`` drops a span and moves the rest down.
"""

from __future__ import annotations

import torch

from .model import rotate_half


class KVCache:
    """Per-stream rows of keys and values. Not thread-safe: only the engine thread touches it."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (layers, slots, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.capacity = capacity
        self.lengths = [0] * slots  # tokens in use per slot
        self._free = list(range(slots))

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype) -> int:
        return layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    # -- slots ------------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int:
        """The lowest free slot (rows stay packed at the front, so decode batches stay small).

        Raises RuntimeError when every slot is taken."""
        if not self._free:
            raise RuntimeError(f"all {self.slots} KV-cache slots are in use")
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
        if slot not in self._free:
            self._free.append(slot)

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def reset(self, slot: int) -> None:
        """Forget the slot's context (its storage is simply overwritten later)."""
        self.lengths[slot] = 0

    def advance(self, slot: int, n: int) -> None:
        """``n`` more tokens of ``slot`` are in use (after their keys/values were written)."""
        if self.lengths[slot] + n > self.capacity:
            raise RuntimeError(f"slot {slot}: {self.lengths[slot] + n} tokens > capacity {self.capacity}")
        self.lengths[slot] += n

    # -- writes and views --------------------------------------------------------------------------------
    def prefill_write(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one stream's new keys/values (1, kv_heads, T, head_dim) at positions start..start+T."""
        end = start + k.shape[2]
        self.k[layer, slot:slot + 1, :, start:end] = k
        self.v[layer, slot:slot + 1, :, start:end] = v

    def row(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (1, kv_heads, end, head_dim) of one slot's first ``end`` positions."""
        return self.k[layer, slot:slot + 1, :, :end], self.v[layer, slot:slot + 1, :, :end]

    def decode_write(self, layer: int, rows: torch.Tensor, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """One token per row: ``k``/``v`` (B, kv_heads, 1, head_dim) into slot ``rows[b]`` at position ``at[b]``
        (device int64 tensors, (B,)); no host sync, so it can be captured in a CUDA graph."""
        self.k[layer].transpose(1, 2).index_put_((rows, at), k[:, :, 0])  # (slots, capacity, kv_heads, d) view
        self.v[layer].transpose(1, 2).index_put_((rows, at), v[:, :, 0])

    def window(self, layer: int, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (rows, kv_heads, width, head_dim) of slots 0..rows-1, positions 0..width-1."""
        return self.k[layer, :rows, :, :width], self.v[layer, :rows, :, :width]

    @torch.no_grad()
    def evict(self, slot: int, start: int, end: int, shift: int, inv_freq: torch.Tensor) -> None:
        """Drop positions [start, end) of ``slot`` and move the later ones down, their keys re-rotated by
        ``-shift`` positions (a RoPE rotation composes: R(p - s) = R(-s) R(p), on every mRoPE section alike).
        Nothing is recomputed; one layer at a time, so the extra memory is one layer's tail."""
        length = self.lengths[slot]
        n = end - start
        if n <= 0:
            return
        f = -shift * inv_freq.float()
        f = torch.cat((f, f))
        cos, sin = f.cos(), f.sin()
        for i in range(self.k.shape[0]):
            k_tail = self.k[i, slot, :, end:length].float()
            k_tail = k_tail * cos + rotate_half(k_tail) * sin
            self.k[i, slot, :, start:length - n] = k_tail.to(self.k.dtype)
            self.v[i, slot, :, start:length - n] = self.v[i, slot, :, end:length].clone()
        self.lengths[slot] = length - n
