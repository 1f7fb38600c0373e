"""A linear layer's weight in one of the engine's own low-bit formats (``int4.py``, ``fp8.py``), and how a product
over it runs: up to ``GEMV_ROWS`` rows (a few streams' decode step) through the format's one-row Triton kernel, a
row at a time; more rows (a prefill, a large batch) through ``F.linear`` over the weight dequantized to bfloat16 a
block of rows at a time (cuBLAS), so a small card never holds a whole bfloat16 matrix besides its low-bit one.

``model.linear`` calls ``LowBitWeight.linear`` for such a weight; the model code is otherwise the same in every mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# rows a product takes through the one-row kernel, one at a time, before the dequantized weight and cuBLAS pay off:
# on an H200 a 7B decode step's products take 1.75 ms a row through the int4 kernel (scripts/profile_gemv.py --int4)
# and ≈ 9 ms through a dequantized bfloat16 copy (3.5 GB read, 14 GB written, 14 GB read by cuBLAS at ≈ 3.5 TB/s)
GEMV_ROWS = 4
# weights dequantized at once for several rows: a block of rows of about this many weights (64 MiB in bfloat16),
# so an 8-GB card never holds a whole bfloat16 matrix (the lm_head: 1 GiB) besides its low-bit one
DEQUANT_WEIGHTS = 2**25


class LowBitWeight(nn.Module):
    """An (N, K) weight in a low-bit format, standing where the weight tensor stood. Subclasses give ``shape`` (N, K),
    ``block_n`` (rows a block of ``dequantize`` is a multiple of: the layout's tile), ``gemv`` and ``dequantize``."""

    shape: torch.Size
    block_n: int

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """One row x (1, K) -> (1, N) in x's dtype, through the format's kernel (CUDA)."""
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
        """x (..., K) -> (..., N): up to ``GEMV_ROWS`` rows on CUDA through ``gemv``, one row at a time (each
        reads the weight); more rows (or the CPU) through ``F.linear`` over the dequantized weight, a block of
        about ``DEQUANT_WEIGHTS`` weights (whole blocks of ``block_n`` rows) at a time."""
        n, k = self.shape
        rows = x.numel() // k
        if 0 < rows <= GEMV_ROWS and x.is_cuda:
            flat = x.reshape(rows, k)
            y = torch.cat([self.gemv(flat[r:r + 1]) for r in range(rows)]).reshape(*x.shape[:-1], n)
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
