"""The KV cache: one row (slot) per stream, preallocated, each row with its own length.

Keys are stored rotated (mRoPE applied), values as computed. Storage per tensor:
``(layers, slots, kv_heads, capacity, head_dim)`` in the model dtype; a token costs
``layers · 2 · kv_heads · head_dim · itemsize`` bytes (LiveCC-7B in bfloat16: 28·2·4·128·2 = 56 KiB,
so 1.75 GiB per 32k-token slot). The cache is the only owner of the lengths: writers go through
``write`` (any tokens of any rows) / ``decode_index`` (where a decode step stores its own) and ``advance``;
``evict`` drops a span and moves the rest down. ``varlen`` views a layer as the packed key/value sequence of
FlashAttention's variable-length kernel, so one kernel call attends over many rows in place.
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
        # decode_index's constant parts: one 0-dim tensor per layer (separate allocations: torch.compile sees the
        # same input each layer, no recompilation) and the KV-head numbers
        self._layer_ids = [torch.tensor(i, device=device) for i in range(layers)]
        self._heads = torch.arange(kv_heads, device=device)[None]
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

    def retract(self, slot: int, n: int) -> None:
        """The last ``n`` tokens of ``slot`` are no longer in use (a decode step run ahead for a turn that had
        already ended: ``EngineCore``); their storage is overwritten by the slot's next write.
        Raises ValueError if the slot holds fewer than ``n``."""
        if not 0 <= n <= self.lengths[slot]:
            raise ValueError(f"slot {slot}: cannot retract {n} of {self.lengths[slot]} tokens")
        self.lengths[slot] -= n

    # -- writes and views --------------------------------------------------------------------------------
    def write(self, layer: int, rows: torch.Tensor, at: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Token ``n`` of ``k``/``v`` (N, kv_heads, head_dim) into slot ``rows[n]`` at position ``at[n]`` (device int64,
        (N,)): one scatter per tensor for every row of a prefill; no host sync."""
        self.k[layer].transpose(1, 2).index_put_((rows, at), k)  # (slots, capacity, kv_heads, d) view
        self.v[layer].transpose(1, 2).index_put_((rows, at), v)

    def row(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (1, kv_heads, end, head_dim) of one slot's first ``end`` positions."""
        return self.k[layer, slot:slot + 1, :, :end], self.v[layer, slot:slot + 1, :, :end]

    def decode_index(self, layer: int, rows: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Index tensors for ``self.k.index_put_(index, k)`` that put a decode step's key ``k`` (B, kv_heads,
        head_dim) of row b into slot ``rows[b]`` at position ``at[b]`` (device int64 (B,)): tensors only (views, no
        kernel), broadcast to (B, kv_heads), for ``model.store_kv``."""
        B = rows.shape[0]
        return self._layer_ids[layer].expand(B, 1), rows[:, None], self._heads, at[:, None]

    def varlen(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values as one packed sequence (L, kv_heads, head_dim) for FlashAttention's
        variable-length kernel: no copy, a strided view in which slot ``s`` position ``p`` is entry
        ``s * varlen_stride + p`` (token stride head_dim, head stride capacity·head_dim). A row is given to
        the kernel by its start ``slot * varlen_stride`` and its length (``seqused_k``)."""
        d, cap = self.k.shape[-1], self.capacity
        n = (self.slots - 1) * self.varlen_stride + cap  # the last slot's last position ends the layer's storage
        size, stride = (n, self.k.shape[2], d), (d, cap * d, 1)
        return self.k[layer].as_strided(size, stride), self.v[layer].as_strided(size, stride)

    @property
    def varlen_stride(self) -> int:
        """Entries of ``varlen`` between the starts of two consecutive slots (kv_heads · capacity)."""
        return self.k.shape[2] * self.capacity

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
