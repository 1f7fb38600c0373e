"""A linear layer's weight in one of the engine's own low-bit formats (``int4.py``, ``fp8.py``), and how a product
over it runs: one row through the format's one-row Triton kernel, up to ``rows_a_call()`` rows (a batched decode
step) in one call of its several-rows kernel (``BATCH_KERNEL`` in ``int4.py`` and ``fp8.py``, on; off, up to
``GEMV_ROWS`` rows take the one-row kernel a row at a time); more rows (a prefill, a large batch) through
``F.linear`` over the weight dequantized to bfloat16 a block of rows at a time (cuBLAS), so a small card never
holds a whole bfloat16 matrix besides its low-bit one.

Both formats pack a row into int32 words in groups of 16 (one group: 128 int4 or 64 fp8 weights), which ``tile``
reorders so that what a kernel program reads in one iteration is contiguous; ``LowBitWeight.from_float`` builds
the buffers a block of rows at a time. ``model.linear`` calls ``LowBitWeight.linear`` for such a weight; the model code
is otherwise the same in every mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# rows a product takes through the one-row kernel, one at a time, before the dequantized weight and cuBLAS pay off:
# on an H200 a 7B decode step's products take 1.75 ms a row through the int4 kernel and 2.0 through the fp8 one
# (scripts/profile_gemv.py --int4 / --fp8), ≈ 8–9 ms through a dequantized bfloat16 copy (the low-bit weights read,
# 14 GB written, 14 GB read by cuBLAS at ≈ 3.5 TB/s)
GEMV_ROWS = 4
# weights dequantized at once for several rows: a block of rows of about this many weights (64 MiB in bfloat16; the
# scratch of dequantizing it: 1.5 bytes a weight for int4, 5 for fp8), so an 8-GB card never holds a whole bfloat16
# matrix (the lm_head: 1 GiB) besides its low-bit one
DEQUANT_WEIGHTS = 2**25


# programs a several-rows product aims at (two an SM of an H200's 132): the input is split in parts only as far as
# it takes to get them, so few parts' (M, N) float32 sums are written and read back (the one-row split, 7 parts of
# the lm_head at 64 rows, would move 272 MiB, half its fp8 weights)
BATCH_PROGRAMS = 256


def rows_config(config: tuple[int, int, int, int, int], n: int, groups: int) -> tuple[int, int, int, int, int]:
    """A one-row ``config`` (rows a program, groups an iteration, groups a program, warps, stages) of an (n,
    GROUP·groups) matrix, with the groups a program a several-rows kernel takes: the fewest parts (at most the
    one-row config's) that give ``BATCH_PROGRAMS`` programs, each a whole number of iterations."""
    block_n, per_iteration, per = config[:3]
    most = 1 if per == 0 else -(-groups // per)
    n_parts = max(1, min(most, -(-BATCH_PROGRAMS // -(-n // block_n))))
    per = -(-groups // n_parts)
    return (block_n, per_iteration, -(-per // per_iteration) * per_iteration) + tuple(config[3:])


def block_m(rows: int) -> int:
    """A several-rows kernel's rows of x a program for ``rows`` rows: a power of two from 16 (the smallest side of
    the matrix instruction ``tl.dot`` uses)."""
    return max(16, 1 << (rows - 1).bit_length())


def tile(packed: torch.Tensor, block_n: int, groups: int) -> torch.Tensor:
    """(N, W) packed words, W a multiple of 16 (groups of 16 words), reordered so that each block of ``block_n``
    rows x ``groups`` groups (the words a kernel program reads in one iteration) is contiguous: (N/block_n,
    W/16/groups, block_n, groups·16) int32. RuntimeError (from ``view``) if block_n does not divide N or groups
    does not divide W/16."""
    n, kw = packed.shape
    return packed.view(n // block_n, block_n, kw // 16 // groups, groups * 16).transpose(1, 2).contiguous()


def untile(tiled: torch.Tensor) -> torch.Tensor:
    """``tile``'s inverse: (N/block_n, G/groups, block_n, groups·16) -> (N, 16·G)."""
    nb, gb, block_n, width = tiled.shape
    return tiled.transpose(1, 2).reshape(nb * block_n, gb * width)


class LowBitWeight(nn.Module):
    """An (N, K) weight in a low-bit format, standing where the weight tensor stood. A format (a subclass) gives
    ``FORMAT`` (its name), ``GROUP`` (columns a group of 16 words holds), ``choose_layout`` and ``quantize_rows``
    (for ``from_float``), ``gemv`` and ``dequantize``; its constructor takes (packed, *per-row tensors, shape,
    config, tiled)."""

    FORMAT: str
    GROUP: int

    @staticmethod
    def choose_layout(n: int, groups: int) -> tuple[tuple[int, int, int, int, int], bool]:
        """(kernel config, tiled) for an (n, GROUP·groups) matrix."""
        raise NotImplementedError

    @staticmethod
    def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """rows (r, K) float -> (words (r, 16·K/GROUP) int32 in the format's layout, *per-row tensors)."""
        raise NotImplementedError

    @classmethod
    @torch.no_grad()
    def from_float(cls, w: torch.Tensor, rows_at_once: int = 4096) -> "LowBitWeight":
        """w (N, K) float (any dtype, on the device the result lives on) quantized ``rows_at_once`` rows (rounded to
        whole tiles) at a time with ``quantize_rows``, so the scratch stays at a block's; the words go straight into
        the final buffer, tiled when ``choose_layout`` says so. ValueError if K is not a multiple of ``GROUP``, or
        if a per-row tensor (scales, zero points) is not finite: the weight held a NaN or an infinity, which would
        make its rows' outputs NaN on every call."""
        n, k = w.shape
        if k % cls.GROUP:
            raise ValueError(f"{cls.FORMAT} groups of {cls.GROUP}: {k} inputs are not a multiple")
        config, tiled = cls.choose_layout(n, k // cls.GROUP)
        block_n, groups = config[:2]
        step = max(block_n, rows_at_once // block_n * block_n)
        words_a_row = 16 * (k // cls.GROUP)
        packed = torch.empty((n // block_n, words_a_row // 16 // groups, block_n, groups * 16) if tiled
                             else (n, words_a_row), dtype=torch.int32, device=w.device)
        rest = []
        for i in range(0, n, step):
            words, *per_row = cls.quantize_rows(w[i:i + step])
            if not all(bool(torch.isfinite(t).all()) for t in per_row):
                raise ValueError(f"a ({n}, {k}) weight holds NaN or infinite values in rows {i}..{min(i + step, n)}: "
                                 "the checkpoint is damaged")
            if tiled:
                packed[i // block_n:(i + step) // block_n] = tile(words, block_n, groups)
            else:
                packed[i:i + step] = words
            rest.append(per_row)
        return cls(packed, *(torch.cat(parts) for parts in zip(*rest)), (n, k), config, tiled)

    def __init__(self, packed: torch.Tensor, shape: tuple[int, int], config: tuple[int, int, int, int, int],
                 tiled: bool):
        """``packed``: (N, W) int32 words, or ``tile``'s layout when ``tiled``; ``shape`` (N, K); ``config``: the
        format's kernel configuration (rows a program, groups an iteration, groups a program, warps, stages)."""
        super().__init__()
        self.register_buffer("packed", packed)
        self.shape = torch.Size(shape)
        self.config, self.tiled = config, tiled
        self.block_n = config[0]

    def packed_rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The words of rows ``start``..``stop`` (whole tiles when tiled), (rows, W) int32, untiled."""
        stop = self.shape[0] if stop is None else stop
        if self.tiled:
            return untile(self.packed[start // self.block_n:-(-stop // self.block_n)])
        return self.packed[start:stop]

    def rows_a_call(self) -> int:
        """Rows ``gemv`` takes in one call: 1 (a format with a several-rows kernel says more)."""
        return 1

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K), M <= ``rows_a_call()`` -> (M, N) in x's dtype, through the format's kernel (CUDA)."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start``..``stop`` (whole blocks of ``block_n``, or the end) of the weight, (stop - start, K) in
        ``dtype`` (default bfloat16)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """bfloat16: the dtype of ``dequantize``'s default and of the products' outputs for bfloat16 inputs."""
        return torch.bfloat16

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N): on CUDA up to ``rows_a_call()`` rows in one call of ``gemv`` (one read of the
        weight), or up to ``GEMV_ROWS`` rows one at a time (a read each); more rows (or the CPU)
        through ``F.linear`` over the dequantized weight, a block of about ``DEQUANT_WEIGHTS`` weights (whole
        blocks of ``block_n`` rows) at a time."""
        n, k = self.shape
        rows = x.numel() // k
        if 0 < rows <= max(GEMV_ROWS, self.rows_a_call()) and x.is_cuda:
            flat = x.reshape(rows, k)
            if rows <= self.rows_a_call():  # no loop over a count that a dynamic-shape compile holds symbolic
                y = self.gemv(flat)
            else:
                y = torch.cat([self.gemv(flat[r:r + 1]) for r in range(rows)])
            y = y.reshape(*x.shape[:-1], n)
            return y if bias is None else y + bias
        step = max(self.block_n, DEQUANT_WEIGHTS // k // self.block_n * self.block_n)
        if step >= n:
            return F.linear(x, self.dequantize(x.dtype), bias)
        return torch.cat([F.linear(x, self.dequantize(x.dtype, i, min(i + step, n)),
                                   None if bias is None else bias[i:i + step]) for i in range(0, n, step)], dim=-1)


class LowBitLinear(nn.Module):
    """An ``nn.Linear`` whose weight is a ``LowBitWeight`` (the o, down and lm_head projections)."""

    def __init__(self, weight: LowBitWeight, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)
