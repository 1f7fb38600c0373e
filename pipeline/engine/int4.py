"""4-bit weights for the language model (``engine.quantize=int4``), and the decode step's products over them.

At one row (one stream's decode step) a product is bound by reading its weight, so 4-bit weights could run 3.5x
faster than bfloat16's. The int4 kernels that install here do not get there: torchao's tinygemm, FBGEMM's CUTLASS
mixed-input GEMMs and GemLite read 4-bit weights at 0.4–1.6 TB/s at one row on an H200 (docs/performance.md,
tenth to thirteenth sessions), as did a Triton kernel that converted each code with ``.to(float32)``: an
integer-to-float conversion runs at 16 a clock per SM on Hopper against 128 float multiply-adds (CUDA C++
Programming Guide, "Arithmetic Instructions" throughput table), so 6.6 G conversions a step take ≈ 1.6 ms alone.

Here ``gemv`` converts no code: a 4-bit code q is moved to bits 19..22 and OR-ed into the float32 1.0
(``0x3F800000 | q << 19`` read as a float is 1 + q/16 exactly: one shift and one ``lop3``), multiplied into the
sum with the activation, and the 1 and the zero point are taken off once per group from the group's sum of
activations: sum x·(q - z) = 16·sum x·(1 + q/16) - (16 + z)·sum x. Three instructions a weight. Putting integer
codes into a float's mantissa is the trick of FasterTransformer's and Marlin's int4 → float16 conversions (Kim et
al., "Who Says Elephants Can't Run", 2022; Frantar et al., "MARLIN", 2024), here in float32. Measured on an H200
(``scripts/profile_gemv.py --int4``, the kernel alone): 4-bit weights read at 1.9–2.5 TB/s, a decode step's
products 1.75 ms against cuBLAS bfloat16's 3.83.

Layout (``pack``): codes q (N, K) in 0..15, groups of ``GROUP`` = 128 along K with a scale and a zero point each,
w = (q - zero) · scale (asymmetric, as HQQ and GemLite's A16W4). ``packed`` (N, K/8) int32: word j of a row belongs
to group g = j // 16 and holds in its nibble i (bits 4i..4i+3) the code of column 128·g + 16·i + j mod 16, so the
activations that meet nibble i of a group's 16 words are 16 consecutive columns; ``tile`` reorders the words so
that what a program reads in one iteration is contiguous (+10–40 % bandwidth). ``scale`` and ``zero`` (N, K/128)
bfloat16.

One row (one stream's decode step) takes the one-row kernel; 2..``BATCH_ROWS`` rows (a batched decode step) take
the several-rows kernel (``BATCH_KERNEL``, on), one read of the weights for every row: a code q
becomes the bfloat16 128 + q by OR-ing it into 0x4300 (two codes 16 bits apart in one ``lop3``, Marlin's trick for
bfloat16), the matrix instruction multiplies a group of 128 columns into every row, and the group's zero point
and scale come after: sum x·(q - z)·s = s·(sum x·(128 + q) - (128 + z)·sum x). More rows (a prefill) take
``Int4Weight.dequantize`` and cuBLAS (``lowbit.LowBitWeight.linear``). int4 is the mode for a small GPU and a few
streams; on a big GPU bfloat16 serves many streams faster (its prefill needs no dequantized copy;
docs/performance.md, seventeenth session).

The kernels (``lowbit_kernels.py``) are imported on first use; under ``TRITON_INTERPRET=1`` they run on the CPU
(tests/test_int4.py).
"""

from __future__ import annotations

import torch
from .lowbit import LowBitWeight, block_m, rows_config, tile, untile  # noqa: F401 - tile/untile: this layout's

GROUP = 128  # weights per scale and zero (torchao's, HQQ's and GemLite's default; LiveCC-7B's 3584 = 28 groups)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float, K a multiple of 128 (else ValueError) -> codes (N, K) uint8 in 0..15, scale and zero (N, K/128)
    float32 (the scale a bfloat16 value): per group of 128 along K, min-max asymmetric, zero an integer,
    w ≈ (codes - zero) · scale."""
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"int4 groups of {GROUP}: {k} inputs are not a multiple")
    wg = w.float().view(n, k // GROUP, GROUP)
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # the range holds 0: a zero weight stays exact
    scale = ((hi - lo) / 15).clamp(min=1e-10).to(torch.bfloat16).float()  # as stored: codes fit the kernel's scale
    zero = (-lo / scale).round().clamp(0, 15)
    codes = (wg / scale[..., None] + zero[..., None]).round().clamp(0, 15).to(torch.uint8).view(n, k)
    return codes, scale, zero


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) integers in 0..15 -> packed (N, K/8) int32 in this module's layout (see the module doc)."""
    n, k = codes.shape
    if k % GROUP:
        raise ValueError(f"int4 groups of {GROUP}: {k} inputs are not a multiple")
    q = codes.to(torch.int64).view(n, k // GROUP, 8, 16)  # [row, group, nibble, word in group]
    words = sum(q[:, :, i] << (4 * i) for i in range(8))  # (N, G, 16) in 0 .. 2^32 - 1
    return words.view(n, k // 8).contiguous().view(torch.int32)[:, ::2].contiguous()  # low halves (little-endian)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """``pack``'s inverse: packed (N, K/8) int32 -> codes (N, K) uint8 (scratch: one nibble's int32 at a time,
    half a byte a weight)."""
    n, kw = packed.shape
    words = packed.view(n, kw // 16, 16)
    codes = torch.empty(n, kw // 16, 8, 16, dtype=torch.uint8, device=packed.device)
    for i in range(8):
        codes[:, :, i] = ((words >> (4 * i)) & 15).to(torch.uint8)
    return codes.view(n, kw * 8)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """(N, K) ``dtype`` weights (q - zero) · scale of a packed (N, K/8) matrix, scale and zero (N, K/128)
    (q - zero is exact in bfloat16; one rounding, of the product, as in float32 then cast). Scratch besides the
    result: a byte and a half a weight (``unpack``)."""
    q = unpack(packed).to(dtype)
    n, k = q.shape
    g = q.view(n, k // GROUP, GROUP)
    g.sub_(zero.to(dtype)[..., None]).mul_(scale.to(dtype)[..., None])
    return q


# (rows a program, groups an iteration, groups a program, warps, pipeline stages) tried by
# scripts/profile_gemv.py --int4. A program's loop waits for each load before it computes (no pipelining of loads
# that feed no tensor-core op), so the bytes in flight come from many programs, each loading a wide tile an iteration.
CONFIGS = ((16, 4, 4, 4, 1), (32, 4, 4, 4, 1), (32, 2, 4, 4, 1), (64, 2, 4, 4, 1), (64, 2, 2, 4, 1), (64, 2, 4, 8, 1),
           (128, 2, 4, 8, 1), (32, 4, 8, 4, 1), (32, 4, 28, 4, 1), (32, 2, 2, 2, 1), (64, 4, 4, 8, 1))


def _kernels():
    """(triton, ``lowbit_kernels``), imported on first use."""
    import triton

    from . import lowbit_kernels
    return triton, lowbit_kernels


# the kernel's configuration for a matrix of N rows and G groups: (rows a program, groups an iteration, groups a
# program, warps, pipeline stages) and whether the words are tiled. TILED_CONFIG was the fastest of CONFIGS for
# every one of LiveCC-7B's matrices (N a multiple of 64, G of 4) on an H200 (docs/performance.md, fourteenth
# session: a step's products 1.75 ms); shapes it cannot tile (the tiny test checkpoints) take PLAIN_CONFIG
TILED_CONFIG = (64, 2, 4, 4, 1)
PLAIN_CONFIG = (16, 1, 4, 4, 1)
# rows the several-rows kernel takes in one call, and whether the engine uses it (as ``fp8.BATCH_ROWS`` and
# ``fp8.BATCH_KERNEL``; on an H200 a step's products of 2 rows 3.6 ms instead of 5.9 a row at a time, of 32 rows
# 6.5 ms instead of 122 through the weight dequantized, docs/performance.md, seventeenth session)
BATCH_ROWS = 64
BATCH_KERNEL = True


def choose(n: int, groups: int) -> tuple[tuple[int, int, int, int, int], bool]:
    """(config, tiled) for an (n, 128·groups) matrix: tiled with TILED_CONFIG when its rows a program divide n
    and its groups an iteration divide ``groups``, else PLAIN_CONFIG untiled."""
    block_n, per_iteration = TILED_CONFIG[:2]
    if n % block_n == 0 and groups % per_iteration == 0:
        return TILED_CONFIG, True
    return PLAIN_CONFIG, False


def launch(xf, xs, packed, scale, zero, y, config, tiled: bool = False) -> None:
    """The kernel alone: xf (M, K) activations, 1 <= M <= ``BATCH_ROWS`` (one row: float32, the one-row kernel;
    more: any float dtype, the several-rows kernel), xs (M, K/128) float32 (or (K/128,) for one row) their
    groups' sums, packed (N, K/8) int32 (or ``tile``'s layout with ``tiled``), scale and zero (N, K/128) bfloat16,
    y (parts, M, N) float32 out (or (parts, N) for one row): each part's sums (parts = ceil(G / groups a
    program)). ValueError for shapes, dtypes or a config that do not fit together (a tiled layout needs whole
    tiles: N % rows a program == 0, G % groups an iteration == 0, groups a program % groups an iteration == 0)."""
    triton, kernels = _kernels()
    block_n, groups, per, warps, stages = config
    n, G = scale.shape
    m = xf.shape[0]
    words = (n // block_n, G // groups, block_n, groups * 16) if tiled else (n, G * 16)
    if tiled and (n % block_n or G % groups or per % groups):
        raise ValueError(f"a tiled ({n}, {G * GROUP}) matrix needs whole tiles; config {config} does not fit it")
    parts = -(-G // per)
    if (tuple(packed.shape) != words or packed.dtype != torch.int32 or not packed.is_contiguous()
            or tuple(zero.shape) != (n, G) or xf.dim() != 2 or tuple(xf.shape) != (m, G * GROUP)
            or not 1 <= m <= BATCH_ROWS or not xf.is_contiguous()
            or not (xf.dtype == torch.float32 if m == 1 else xf.dtype.is_floating_point)
            or tuple(xs.shape) not in (((G,), (1, G)) if m == 1 else ((m, G),)) or xs.dtype != torch.float32
            or tuple(y.shape) not in ((parts, m, n), (parts, n) if m == 1 else ()) or y.dtype != torch.float32):
        raise ValueError(f"int4 kernel: packed {tuple(packed.shape)} {packed.dtype}, scale {tuple(scale.shape)}, "
                         f"zero {tuple(zero.shape)}, x {tuple(xf.shape)} {xf.dtype}, y {tuple(y.shape)} do not fit "
                         f"config {config} (tiled={tiled}, at most {BATCH_ROWS} rows)")
    even = n % block_n == 0 and G % per == 0 and per % groups == 0
    grid = (triton.cdiv(n, block_n), parts)
    if m == 1:
        kernels.int4_gemv[grid](xf, xs, packed, scale, zero, y, n, G * 16, G, per, BLOCK_N=block_n, GROUPS=groups,
                                STAGES=stages, ASM=xf.is_cuda, EVEN=even, TILED=tiled, num_warps=warps)
    else:
        kernels.int4_gemm[grid](xf, xs, packed, scale, zero, y, m, n, G * 16, G, per, BLOCK_M=block_m(m),
                                BLOCK_N=block_n, GROUPS=groups, ASM=xf.is_cuda, EVEN=even, TILED=tiled,
                                num_warps=warps)


@torch.library.custom_op("livecc::int4_product", mutates_args=())
def _product_parts(xf: torch.Tensor, xs: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                   block_n: int, groups: int, per: int, warps: int, stages: int, tiled: bool) -> torch.Tensor:
    """``launch`` as an operator torch.compile keeps whole (the casts and sums around it fuse with their
    neighbours): returns the parts' sums (parts, M, N) float32."""
    n, G = scale.shape
    y = torch.empty(-(-G // per), xf.shape[0], n, dtype=torch.float32, device=xf.device)
    launch(xf, xs, packed, scale, zero, y, (block_n, groups, per, warps, stages), tiled)
    return y


@_product_parts.register_fake
def _(xf, xs, packed, scale, zero, block_n, groups, per, warps, stages, tiled):
    n, G = scale.shape
    return xf.new_empty(-(-G // per), xf.shape[0], n, dtype=torch.float32)


def gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
         config: tuple[int, int, int, int, int] = PLAIN_CONFIG, tiled: bool = False) -> torch.Tensor:
    """A few rows times a 4-bit matrix: x (M, K), 1 <= M <= ``BATCH_ROWS``, bfloat16/float16/float32, packed (N,
    K/8) int32 (``tile``'s layout with ``tiled``), scale and zero (N, K/128) bfloat16 -> y (M, N) in x's dtype,
    x · dequantize(...)ᵀ summed in float32 (the parts' sums added after the kernel; several rows split the input
    less, ``lowbit.rows_config``).
    One row: activations in float32 (no conversion in the kernel's loop); more: in x's dtype (the matrix
    instruction's). ``config``: (rows a program, groups an iteration, groups a program, warps, pipeline stages).
    ValueError as ``launch``."""
    G = scale.shape[1]
    x2 = x.reshape(-1, G * GROUP)
    xf = x2.float() if x2.shape[0] == 1 else x2.contiguous()
    xs = xf.float().view(-1, G, GROUP).sum(-1)  # each row's groups' sums of activations (M, G)
    if x2.shape[0] > 1:  # fewer parts: each writes and reads back (M, N) float32 sums
        config = rows_config(config, scale.shape[0], G)
    return _product_parts(xf, xs, packed, scale, zero, *config, tiled).sum(0).to(x.dtype)


class Int4Weight(LowBitWeight):
    """A linear layer's (N, K) weight in 4 bits (this module's layout), standing where the weight tensor stood
    (``model.linear`` calls ``linear``: ``lowbit.LowBitWeight``). Buffers: ``packed`` int32, (N, K/8) or,
    ``tiled``, ``tile``'s (N/64, G/2, 64, 32); ``scale`` and ``zero`` (N, K/128) bfloat16. ``shape`` is (N, K).

    ``from_float(w)`` quantizes a float weight (K a multiple of 128, else ValueError) a block of rows at a time into
    the final buffers, so the scratch stays at a block's (≈ 10 bytes a weight of 4,096 rows) next to an 8-GB card's
    weights; more rows than ``rows_a_call()`` (or any on the CPU) dequantize a block of rows at a time too
    (``lowbit.DEQUANT_WEIGHTS``)."""

    FORMAT, GROUP = "int4", GROUP

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int],
                 config: tuple[int, int, int, int, int], tiled: bool):
        super().__init__(packed, shape, config, tiled)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    @staticmethod
    def choose_layout(n: int, groups: int) -> tuple[tuple[int, int, int, int, int], bool]:
        """``choose``."""
        return choose(n, groups)

    @staticmethod
    def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows (r, K) float -> (``pack``'s words (r, K/8) int32, scale and zero (r, K/128) bfloat16), by
        ``quantize``."""
        codes, scale, zero = quantize(rows)
        return pack(codes), scale.to(torch.bfloat16), zero.to(torch.bfloat16)

    def dequantize(self, dtype: torch.dtype | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The (N, K) weight, or its rows ``start``..``stop`` (whole tiles when tiled), in ``dtype`` (default
        bfloat16). Plain integers, not a slice: dynamo cannot trace ``slice.indices`` (the compiled prefill fell
        back to eager over it on an H200, 140 ms a turn)."""
        stop = self.shape[0] if stop is None else stop
        return dequantize(self.packed_rows(start, stop), self.scale[start:stop], self.zero[start:stop],
                          dtype or self.scale.dtype)

    def rows_a_call(self) -> int:
        """``BATCH_ROWS`` with ``BATCH_KERNEL``, else 1."""
        return BATCH_ROWS if BATCH_KERNEL else 1

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K), M <= ``rows_a_call()`` -> (M, N) through ``gemv`` (CUDA)."""
        return gemv(x, self.packed, self.scale, self.zero, self.config, self.tiled)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}, {self.shape[1]}, int4 groups of {GROUP}, config={self.config}, tiled={self.tiled}"
