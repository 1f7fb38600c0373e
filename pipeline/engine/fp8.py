"""8-bit float weights for the language model (``engine.quantize=fp8``), and the decode step's products over them.

A weight is an OCP FP8 E4M3 number (``torch.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, largest 448) times
its output row's float32 scale, amax / 448 (the per-row ("rowwise") scaling of torchao's and vLLM's FP8 weights).

At one row (one stream's decode step) a product is bound by reading its weight. torchao's FP8 linear quantizes the
row's activations to FP8 and calls ``torch._scaled_mm``, whose 128-row tiles read a one-row product at ≈ 2.2 TB/s
on an H200, and inductor's reduction over the same bytes reached ≈ 2.8 TB/s (docs/performance.md, ninth and
thirteenth sessions): a step ≈ 1.4× bfloat16's. ``gemv`` here is a Triton kernel written like ``int4.gemv``: wide
tiles of whole words, the input split in parts, activations loaded straight into the weights' layout, each word's
four bytes turned into floats by the hardware's paired conversion (``cvt.rn.f16x2.e4m3x2``, Hopper and Ada) then
``cvt.f32.f16``: two and a half instructions a weight with its multiply-add. Measured on an H200
(``scripts/profile_gemv.py --fp8``, the kernel alone): the large matrices' 1-byte weights read at 3.6–4.1 TB/s, the
small ones' at 2.1–2.4, a decode step's products 2.00 ms against cuBLAS bfloat16's 3.86.

Layout (``pack``): codes (N, K) float8_e4m3fn; groups of ``GROUP`` = 64 columns; ``packed`` (N, K/4) int32: word j
of a row belongs to group g = j // 16 and holds in its byte i (bits 8i..8i+7) the code of column 64·g + 16·i + j mod
16, so the activations that meet byte i of a group's 16 words are 16 consecutive columns; ``lowbit.tile`` reorders
the words so that what a program reads in one iteration is contiguous. ``scale`` (N,) float32.

Several rows (2..``BATCH_ROWS``: a batched decode step of that many streams) take the several-rows kernel
(``BATCH_KERNEL``, on): each program converts its tile of weights once (the same paired conversion, then to the
activations' bfloat16, which holds every E4M3 value exactly) and multiplies it into every row with the matrix instruction
(``tl.dot``; on Hopper ``wgmma`` m64n16k16 with the weights as the register operand, checked in the SASS compiled
here), the weights' rows on the instruction's 64-wide side and the streams on its 16-wide one, so the weights are
read once a step whatever the number of streams (on an H200 a step's products of 8 rows 2.8 ms, against 78 through
the dequantized weight, the path before; docs/performance.md, seventeenth session). More rows (a prefill of more
than ``BATCH_ROWS`` tokens) take the dequantized weight and cuBLAS (≈ 5 bytes a weight). The one-row kernel splits the input in parts for enough programs; the parts are added
after it (a small kernel, or part of a neighbour's in the compiled step: adding them inside the kernel, the last
program of a block of rows, was slower, seventeenth session).

The kernels (``lowbit_kernels.py``) are imported on first use; under ``TRITON_INTERPRET=1`` they run on the CPU with a
plain-Triton conversion instead of the inline PTX (tests/test_fp8.py).
"""

from __future__ import annotations


import torch

from .lowbit import LowBitWeight, block_m, rows_config, tile, untile  # noqa: F401 - tile/untile: this layout's

GROUP = 64  # columns a group of 16 words holds (4 bytes a word)
E4M3_MAX = 448.0  # the largest float8_e4m3fn (OCP 8-bit floating point specification, 2023)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> codes (N, K) float8_e4m3fn and scale (N,) float32, w ≈ codes · scale[:, None]: per output
    row, amax / 448 (a row of zeros gets a tiny scale, not 0: its codes are 0, never 0/0). Scratch: a float32 copy
    of w. A row with a NaN or an infinity gets a NaN or infinite scale (``LowBitWeight.from_float`` refuses it)."""
    q = w.to(torch.float32, copy=True)  # a copy even of a float32 w: divided in place below
    scale = (q.abs().amax(-1) / E4M3_MAX).clamp_(min=1e-12)
    return q.div_(scale[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes (N, K) float8_e4m3fn (or their uint8 bits), K a multiple of 64 (else ValueError) -> packed (N, K/4)
    int32 in this module's layout (see the module doc)."""
    n, k = codes.shape
    if k % GROUP:
        raise ValueError(f"fp8 groups of {GROUP}: {k} inputs are not a multiple")
    q = codes.view(torch.uint8).view(n, k // GROUP, 4, 16)  # [row, group, byte, word in group]
    return q.permute(0, 1, 3, 2).reshape(n, k).view(torch.int32)  # little-endian: byte i is bits 8i..8i+7


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """``pack``'s inverse: packed (N, K/4) int32 -> codes (N, K) float8_e4m3fn."""
    n, kw = packed.shape
    q = packed.view(torch.uint8).view(n, kw // 16, 16, 4)
    return q.permute(0, 1, 3, 2).reshape(n, kw * 4).view(torch.float8_e4m3fn)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """(N, K) ``dtype`` weights codes · scale of a packed (N, K/4) matrix and its scale (N,) float32 (scratch
    besides the result: the codes' copy out of the layout and one float32 copy, 5 bytes a weight)."""
    return unpack(packed).to(torch.float32).mul_(scale[:, None]).to(dtype)


# (rows a program, groups an iteration, groups a program, warps, pipeline stages) tried by
# scripts/profile_gemv.py --fp8 (the int4 kernel's lessons: wide tiles, the input in parts; no load pipelining)
# (groups a program 0: the whole input, one part, written in the activations' dtype with no sum of parts after)
CONFIGS = ((64, 1, 4, 4, 1), (128, 1, 8, 4, 1), (64, 1, 8, 4, 1), (128, 1, 4, 4, 1), (64, 1, 2, 4, 1),
           (32, 1, 4, 4, 1), (128, 1, 0, 4, 1), (64, 1, 0, 4, 1), (256, 1, 0, 8, 1), (32, 1, 0, 4, 1),
           (128, 2, 0, 8, 1))


def _kernels():
    """(triton, ``lowbit_kernels``), imported on first use."""
    import triton

    from . import lowbit_kernels
    return triton, lowbit_kernels


# the kernel's configuration for a matrix of N rows and G = K/64 groups (see ``int4.choose``): on an H200 the
# fastest of CONFIGS, the kernel alone, were 128 rows x 1 group, 8 groups a program for the large matrices (gate|up
# 35.2 µs = 3.86 TB/s, down 18.8 µs, the lm_head 131.6 µs) and 64 x 1, 4 groups a program for the small ones (q|k|v
# 6.9 µs, o 6.2: docs/performance.md, fifteenth session); shapes that do not tile take PLAIN_CONFIG
LARGE_CONFIG = (128, 1, 8, 4, 1)
SMALL_CONFIG = (64, 1, 4, 4, 1)
LARGE = 2**25  # weights from which a matrix takes LARGE_CONFIG (the 7B's gate|up, down and lm_head; not q|k|v, o)
PLAIN_CONFIG = (16, 1, 4, 4, 1)
# rows the several-rows kernel takes in one call: a batched decode step of up to this many streams (more rows, a
# prefill, take the dequantized weight and cuBLAS); a program's accumulator is BLOCK_N x 64 float32 at most
BATCH_ROWS = 64
# whether the engine sends 2..BATCH_ROWS rows through the several-rows kernel (one read of the weights) instead of a
# row at a time through the one-row kernel up to ``lowbit.GEMV_ROWS`` rows (a read a row) and the dequantized weight
# beyond: on an H200, 8 streams p50 304 ms instead of 952 (``scripts/bench_streams.py --batch-kernel``, seventeenth
# session); off: for comparison
BATCH_KERNEL = True


def choose(n: int, groups: int) -> tuple[tuple[int, int, int, int, int], bool]:
    """(config, tiled) for an (n, 64·groups) matrix: LARGE_CONFIG (from ``LARGE`` weights) or SMALL_CONFIG, tiled,
    the first whose rows a program divide n and groups an iteration divide ``groups``; else PLAIN_CONFIG untiled."""
    for config in ((LARGE_CONFIG, SMALL_CONFIG) if n * groups * GROUP >= LARGE else (SMALL_CONFIG,)):
        if n % config[0] == 0 and groups % config[1] == 0:
            return config, True
    return PLAIN_CONFIG, False


def parts(config: tuple[int, int, int, int, int], k: int) -> int:
    """How many parts ``config``'s programs split an input of ``k`` columns in (groups a program 0: one)."""
    G, per = k // GROUP, config[2]
    return 1 if per == 0 else -(-G // per)


def launch(x, packed, scale, y, config, tiled: bool = False) -> None:
    """The kernel alone: x (M, K) activations, 1 <= M <= ``BATCH_ROWS`` (float32, bfloat16 or float16), packed (N,
    K/4) int32 (or ``lowbit.tile``'s layout with ``tiled``), scale (N,) float32, y (parts, M, N) out (or (parts, N)
    for one row): each part's scaled sums, float32 (``parts(config, K)``; with one part, any float dtype: the
    product itself). One row takes the one-row kernel (activations to float32 as loaded), more rows the several-rows
    kernel (weights to x's dtype, the matrix instruction). ValueError for shapes, dtypes or a config that do not
    fit together."""
    triton, kernels = _kernels()
    block_n, groups, per, warps, _ = config
    (m, k), n = x.shape, scale.shape[0]
    G = k // GROUP
    per = per or -(-G // groups) * groups
    words = (n // block_n, G // groups, block_n, groups * 16) if tiled else (n, G * 16)
    if tiled and (n % block_n or G % groups or per % groups):
        raise ValueError(f"a tiled ({n}, {G * GROUP}) matrix needs whole tiles; config {config} does not fit it")
    n_parts = -(-G // per)
    if (tuple(packed.shape) != words or packed.dtype != torch.int32 or not packed.is_contiguous()
            or tuple(scale.shape) != (n,) or scale.dtype != torch.float32 or k != G * GROUP
            or not 1 <= m <= BATCH_ROWS or not x.dtype.is_floating_point or not x.is_contiguous()
            or tuple(y.shape) not in ((n_parts, m, n), (n_parts, n) if m == 1 else ())
            or not y.is_contiguous() or (n_parts > 1 and y.dtype != torch.float32)):
        raise ValueError(f"fp8 kernel: packed {tuple(packed.shape)} {packed.dtype}, scale {tuple(scale.shape)} "
                         f"{scale.dtype}, x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)} {y.dtype} do not fit "
                         f"config {config} (tiled={tiled}, at most {BATCH_ROWS} rows)")
    even = n % block_n == 0 and G % per == 0 and per % groups == 0
    grid = (triton.cdiv(n, block_n), n_parts)
    if m == 1:
        kernels.fp8_gemv[grid](x, packed, scale, y, n, G * 16, G, per, BLOCK_N=block_n, GROUPS=groups, ASM=x.is_cuda,
                               EVEN=even, TILED=tiled, num_warps=warps)
    else:
        kernels.fp8_gemm[grid](x, packed, scale, y, m, n, G * 16, G, per, BLOCK_M=block_m(m), BLOCK_N=block_n,
                           GROUPS=groups, ASM=x.is_cuda, EVEN=even, TILED=tiled, num_warps=warps)


@torch.library.custom_op("livecc::fp8_product", mutates_args=())
def _product_parts(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, block_n: int, groups: int, per: int,
                   warps: int, stages: int, tiled: bool) -> torch.Tensor:
    """``launch`` as an operator torch.compile keeps whole: returns the parts' sums (parts, M, N) float32, or with
    one part the product (1, M, N) in x's dtype."""
    n_parts = parts((block_n, groups, per, warps, stages), x.shape[-1])
    y = torch.empty(n_parts, x.shape[0], scale.shape[0], dtype=x.dtype if n_parts == 1 else torch.float32,
                    device=x.device)
    launch(x, packed, scale, y, (block_n, groups, per, warps, stages), tiled)
    return y


@_product_parts.register_fake
def _(x, packed, scale, block_n, groups, per, warps, stages, tiled):
    n_parts = parts((block_n, groups, per, warps, stages), x.shape[-1])
    return x.new_empty(n_parts, x.shape[0], scale.shape[0], dtype=x.dtype if n_parts == 1 else torch.float32)


def gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
         config: tuple[int, int, int, int, int] = PLAIN_CONFIG, tiled: bool = False) -> torch.Tensor:
    """A few rows times an FP8 matrix: x (M, K), 1 <= M <= ``BATCH_ROWS``, bfloat16/float16/float32, packed (N, K/4)
    int32 (``lowbit.tile``'s layout with ``tiled``), scale (N,) float32 -> y (M, N) in x's dtype, summed in float32
    (the parts' sums added in float32 after the kernel when the config splits the input; several rows split it
    less, ``lowbit.rows_config``). ValueError as ``launch``."""
    x = x.reshape(-1, x.shape[-1]).contiguous()
    if x.shape[0] > 1:  # fewer parts: each writes and reads back (M, N) float32 sums
        config = rows_config(config, scale.shape[0], x.shape[-1] // GROUP)
    y = _product_parts(x, packed, scale, *config, tiled)
    return y[0] if y.shape[0] == 1 else y.sum(0).to(x.dtype)


class Fp8Weight(LowBitWeight):
    """A linear layer's (N, K) weight in FP8 E4M3 with a float32 scale per row (this module's layout), standing where
    the weight tensor stood (``model.linear`` calls ``linear``: ``lowbit.LowBitWeight``). Buffers: ``packed`` int32,
    (N, K/4) or, ``tiled``, ``lowbit.tile``'s (N/block, G/groups, block, groups·16); ``scale`` (N,) float32.

    ``from_float(w)`` quantizes a float weight (K a multiple of 64, else ValueError) a block of rows at a time into
    the final buffers; more rows than ``rows_a_call()`` (or any on the CPU) dequantize a block of rows at a time
    (``lowbit.DEQUANT_WEIGHTS``)."""

    FORMAT, GROUP = "fp8", GROUP

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                 config: tuple[int, int, int, int, int], tiled: bool):
        super().__init__(packed, shape, config, tiled)
        self.register_buffer("scale", scale)

    @staticmethod
    def choose_layout(n: int, groups: int) -> tuple[tuple[int, int, int, int, int], bool]:
        """``choose``."""
        return choose(n, groups)

    @staticmethod
    def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (r, K) float -> (``pack``'s words (r, K/4) int32, scale (r,) float32), by ``quantize``."""
        codes, scale = quantize(rows)
        return pack(codes), scale

    def dequantize(self, dtype: torch.dtype | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The (N, K) weight, or its rows ``start``..``stop`` (whole tiles when tiled), in ``dtype`` (default
        bfloat16)."""
        stop = self.shape[0] if stop is None else stop
        return dequantize(self.packed_rows(start, stop), self.scale[start:stop], dtype or torch.bfloat16)

    def rows_a_call(self) -> int:
        """``BATCH_ROWS`` with ``BATCH_KERNEL``, else 1."""
        return BATCH_ROWS if BATCH_KERNEL else 1

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K), M <= ``rows_a_call()`` -> (M, N) through ``gemv`` (CUDA, compute capability 8.9 or newer)."""
        return gemv(x, self.packed, self.scale, self.config, self.tiled)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}, {self.shape[1]}, fp8 e4m3 a scale a row, config={self.config}, tiled={self.tiled}"
