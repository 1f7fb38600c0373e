"""The Triton kernels of ``engine.quantize=fp8`` (the layout, the configurations and the calls: ``fp8.py``).

Imported by ``fp8.py`` on first use, so that the engine imports without Triton; under ``TRITON_INTERPRET=1`` (set
before this module is imported) they run on the CPU with ``codes``' plain-Triton conversion (tests/test_fp8.py).
"""

import triton
import triton.language as tl


@triton.jit
def codes(w, ASM: tl.constexpr):
    """A tensor of int32 words -> its four bytes' E4M3 codes as float16 tensors of the same shape (byte 0
    first). ASM: two paired conversions a word (``cvt.rn.f16x2.e4m3x2``, Hopper and Ada); else plain Triton."""
    if ASM:
        f0, f1, f2, f3 = tl.inline_asm_elementwise(
            """{
            .reg .b16 lo, hi;
            .reg .b32 a, b;
            mov.b32 {lo, hi}, $4;
            cvt.rn.f16x2.e4m3x2 a, lo;
            cvt.rn.f16x2.e4m3x2 b, hi;
            mov.b32 {$0, $1}, a;
            mov.b32 {$2, $3}, b;
            }""", "=h,=h,=h,=h,r", [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
            is_pure=True, pack=1)
    else:
        f0 = (w & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        f1 = ((w >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        f2 = ((w >> 16) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        f3 = ((w >> 24) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return f0, f1, f2, f3


# one row (one stream's decode step): multiply-adds in float32, the input split in parts for enough programs
@triton.jit
def gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, KW, G, PER, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
         ASM: tl.constexpr, EVEN: tl.constexpr, TILED: tl.constexpr):
    # KW = K / 4 words a row, G = K / 64 groups, PER groups a program (part pk of K); EVEN: whole tiles only
    pn, pk = tl.program_id(0), tl.program_id(1)
    g_end = tl.minimum(pk * PER + PER, G)
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    gi = tl.arange(0, GROUPS)
    jj = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_N, GROUPS, 16], dtype=tl.float32)
    for g0 in tl.range(pk * PER, g_end, GROUPS):
        g = g0 + gi
        gm = g < g_end
        if TILED:  # ``lowbit.tile``'s layout: this iteration's BLOCK_N x GROUPS x 16 words are one contiguous block
            blk = (pn * (G // GROUPS) + g0 // GROUPS) * (BLOCK_N * GROUPS * 16)
            wp = w_ptr + blk + tl.arange(0, BLOCK_N)[:, None, None] * (GROUPS * 16) + gi[None, :, None] * 16 \
                + jj[None, None, :]
        else:
            wp = w_ptr + rows[:, None, None] * KW + g[None, :, None] * 16 + jj[None, None, :]
        xb = rows[:, None, None] * 0 + g[None, :, None] * 64 + jj[None, None, :]
        if EVEN:  # the activations in their own dtype (bfloat16 in the engine), to float32 as loaded
            w = tl.load(wp)
            x0 = tl.load(x_ptr + xb).to(tl.float32)
            x1 = tl.load(x_ptr + xb + 16).to(tl.float32)
            x2 = tl.load(x_ptr + xb + 32).to(tl.float32)
            x3 = tl.load(x_ptr + xb + 48).to(tl.float32)
        else:
            m3 = (live[:, None] & gm[None, :])[:, :, None]
            w = tl.load(wp, mask=m3, other=0)
            x0 = tl.load(x_ptr + xb, mask=gm[None, :, None], other=0).to(tl.float32)
            x1 = tl.load(x_ptr + xb + 16, mask=gm[None, :, None], other=0).to(tl.float32)
            x2 = tl.load(x_ptr + xb + 32, mask=gm[None, :, None], other=0).to(tl.float32)
            x3 = tl.load(x_ptr + xb + 48, mask=gm[None, :, None], other=0).to(tl.float32)
        f0, f1, f2, f3 = codes(w, ASM)  # float16, exact; to float32 in the multiply-adds (cvt.f32.f16)
        acc += x0 * f0.to(tl.float32)  # four multiply-adds a word, no separate products
        acc += x1 * f1.to(tl.float32)
        acc += x2 * f2.to(tl.float32)
        acc += x3 * f3.to(tl.float32)
    s = tl.load(s_ptr + rows, mask=live, other=0)
    tl.store(y_ptr + pk * N + rows, tl.sum(tl.sum(acc, 2), 1) * s, mask=live)  # cast to y's dtype


# several rows (a batched decode step): the weights converted once, then the matrix instruction (tl.dot)
@triton.jit
def gemm(x_ptr, w_ptr, s_ptr, y_ptr, M, N, KW, G, PER, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         GROUPS: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr, TILED: tl.constexpr):
    # M rows of x (M <= BLOCK_M); the weights' rows fill the matrix instruction's large side ("swap AB": a
    # program's (BLOCK_N, BLOCK_M) block of y transposed is W's BLOCK_N rows times x's rows), so a handful of
    # streams costs one read of the weights, not one a stream. Byte i of a group's 16 words meets the 16
    # consecutive columns 64·g + 16·i + j: four products a group, each over its bytes' columns.
    pn, pk = tl.program_id(0), tl.program_id(1)
    g_end = tl.minimum(pk * PER + PER, G)
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    mi = tl.arange(0, BLOCK_M)
    mm = mi < M
    c = tl.arange(0, GROUPS * 16)  # a word of this iteration: group c // 16, word c % 16 in it
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for g0 in tl.range(pk * PER, g_end, GROUPS):
        if TILED:
            blk = (pn * (G // GROUPS) + g0 // GROUPS) * (BLOCK_N * GROUPS * 16)
            wp = w_ptr + blk + tl.arange(0, BLOCK_N)[:, None] * (GROUPS * 16) + c[None, :]
        else:
            wp = w_ptr + rows[:, None] * KW + g0 * 16 + c[None, :]
        xp = x_ptr + mi[None, :] * (G * 64) + (g0 + c // 16)[:, None] * 64 + (c % 16)[:, None]  # (words, M)
        cm = (g0 + c // 16) < g_end
        xm = cm[:, None] & mm[None, :]
        if EVEN:
            w = tl.load(wp)
        else:
            w = tl.load(wp, mask=live[:, None] & cm[None, :], other=0)
        x0 = tl.load(xp, mask=xm, other=0)
        x1 = tl.load(xp + 16, mask=xm, other=0)
        x2 = tl.load(xp + 32, mask=xm, other=0)
        x3 = tl.load(xp + 48, mask=xm, other=0)
        f0, f1, f2, f3 = codes(w, ASM)  # float16, exact; in x's dtype (bfloat16 holds every E4M3 exactly)
        acc = tl.dot(f0.to(x_ptr.dtype.element_ty), x0, acc)
        acc = tl.dot(f1.to(x_ptr.dtype.element_ty), x1, acc)
        acc = tl.dot(f2.to(x_ptr.dtype.element_ty), x2, acc)
        acc = tl.dot(f3.to(x_ptr.dtype.element_ty), x3, acc)
    s = tl.load(s_ptr + rows, mask=live, other=0)
    tl.store(y_ptr + pk * M * N + mi[None, :] * N + rows[:, None], acc * s[:, None],
             mask=live[:, None] & mm[None, :])  # y (parts, M, N): cast to y's dtype
