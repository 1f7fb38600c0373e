"""The Triton kernels of the engine's own low-bit formats (``int4.py``, ``fp8.py``: their layouts, configurations and
calls; the formats' docs say how each kernel works and what it measured).

    fp8_gemv, int4_gemv   one row (one stream's decode step): multiply-adds in float32, the input split in parts
    fp8_gemm, int4_gemm   several rows (a batched decode step): the weights converted once, the matrix instruction
    word_pointers         an iteration's words in the tiled or the plain layout
    e4m3_codes            a word's four E4M3 codes as float16 (the hardware's paired conversion on CUDA)

Imported by ``int4.py``/``fp8.py`` on first use, so that the engine imports without Triton; under
``TRITON_INTERPRET=1`` (set before this module is imported) they run on the CPU with plain-Triton conversions
instead of the inline PTX (tests/test_int4.py, tests/test_fp8.py).
"""

import triton
import triton.language as tl


@triton.jit
def word_pointers(w_ptr, pn, g0, r, col, KW, G, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, TILED: tl.constexpr):
    """Pointers to the words of an iteration: rows pn·BLOCK_N + r of the matrix (r: 0..BLOCK_N-1, shaped to
    broadcast), words ``col`` counted from the iteration's first group g0 (group col // 16, word col % 16 in it). TILED:
    ``lowbit.tile``'s layout, where an iteration's BLOCK_N x GROUPS x 16 words are one contiguous block; else (N, KW)
    row-major."""
    if TILED:
        wp = w_ptr + (pn * (G // GROUPS) + g0 // GROUPS) * (BLOCK_N * GROUPS * 16) + r * (GROUPS * 16) + col
    else:
        wp = w_ptr + (pn * BLOCK_N + r) * KW + g0 * 16 + col
    return wp


@triton.jit
def e4m3_codes(w, ASM: tl.constexpr):
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


# fp8's one row (one stream's decode step): multiply-adds in float32, the input split in parts for enough programs
@triton.jit
def fp8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, N, KW, G, PER, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
             ASM: tl.constexpr, EVEN: tl.constexpr, TILED: tl.constexpr):
    # KW = K / 4 words a row, G = K / 64 groups, PER groups a program (part pk of K); EVEN: whole tiles only; each
    # program stores its part's sums at y[pk, rows], the parts added after the kernel
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
        wp = word_pointers(w_ptr, pn, g0, tl.arange(0, BLOCK_N)[:, None, None],
                           gi[None, :, None] * 16 + jj[None, None, :], KW, G, BLOCK_N, GROUPS, TILED)
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
        f0, f1, f2, f3 = e4m3_codes(w, ASM)  # float16, exact; to float32 in the multiply-adds (cvt.f32.f16)
        acc += x0 * f0.to(tl.float32)  # four multiply-adds a word, no separate products
        acc += x1 * f1.to(tl.float32)
        acc += x2 * f2.to(tl.float32)
        acc += x3 * f3.to(tl.float32)
    s = tl.load(s_ptr + rows, mask=live, other=0)
    tl.store(y_ptr + pk * N + rows, tl.sum(tl.sum(acc, 2), 1) * s, mask=live)  # cast to y's dtype


# fp8's several rows (a batched decode step): the weights converted once, then the matrix instruction (tl.dot)
@triton.jit
def fp8_gemm(x_ptr, w_ptr, s_ptr, y_ptr, M, N, KW, G, PER, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
        wp = word_pointers(w_ptr, pn, g0, tl.arange(0, BLOCK_N)[:, None], c[None, :], KW, G, BLOCK_N, GROUPS, TILED)
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
        # float16, exact; in x's dtype (bfloat16 holds every E4M3 exactly); "ieee": float32 activations multiply in
        # float32, not TF32 (bfloat16 ones take the matrix instruction all the same)
        f0, f1, f2, f3 = e4m3_codes(w, ASM)
        acc = tl.dot(f0.to(x_ptr.dtype.element_ty), x0, acc, input_precision="ieee")
        acc = tl.dot(f1.to(x_ptr.dtype.element_ty), x1, acc, input_precision="ieee")
        acc = tl.dot(f2.to(x_ptr.dtype.element_ty), x2, acc, input_precision="ieee")
        acc = tl.dot(f3.to(x_ptr.dtype.element_ty), x3, acc, input_precision="ieee")
    s = tl.load(s_ptr + rows, mask=live, other=0)
    tl.store(y_ptr + pk * M * N + mi[None, :] * N + rows[:, None], acc * s[:, None],
             mask=live[:, None] & mm[None, :])  # y (parts, M, N): cast to y's dtype


# int4's one row: codes into float32's mantissa, the zero points through the groups' sums of x (``int4.py``)
@triton.jit
def int4_gemv(x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, KW, G, PER, BLOCK_N: tl.constexpr,
              GROUPS: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr, TILED: tl.constexpr):
    # KW = K / 8 words a row (a multiple of 16), G = K / 128 groups, PER groups a program (part pk of K);
    # EVEN: every tile is whole (N % BLOCK_N == 0, G % PER == 0, PER % GROUPS == 0), so no load is masked
    pn, pk = tl.program_id(0), tl.program_id(1)
    g_end = tl.minimum(pk * PER + PER, G)
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    gi = tl.arange(0, GROUPS)
    jj = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_N, GROUPS, 16], dtype=tl.float32)  # sum over groups of scale * 16 * sum(x * f)
    off = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)  # sum over groups of scale * (16 + zero) * sum(x)
    for g0 in tl.range(pk * PER, g_end, GROUPS, num_stages=STAGES):
        g = g0 + gi
        gm = g < g_end
        m2 = live[:, None] & gm[None, :]
        wp = word_pointers(w_ptr, pn, g0, tl.arange(0, BLOCK_N)[:, None, None],
                           gi[None, :, None] * 16 + jj[None, None, :], KW, G, BLOCK_N, GROUPS, TILED)
        at = rows[:, None] * G + g[None, :]
        xb = rows[:, None, None] * 0 + g[None, :, None] * 128 + jj[None, None, :]
        if EVEN:
            w = tl.load(wp).to(tl.uint32, bitcast=True)
            s = tl.load(s_ptr + at).to(tl.float32)
            z = tl.load(z_ptr + at).to(tl.float32)
            xs = tl.load(xs_ptr + g)
        else:
            w = tl.load(wp, mask=m2[:, :, None], other=0).to(tl.uint32, bitcast=True)
            s = tl.load(s_ptr + at, mask=m2, other=0).to(tl.float32)
            z = tl.load(z_ptr + at, mask=m2, other=0).to(tl.float32)
            xs = tl.load(xs_ptr + g, mask=gm, other=0)
        t = tl.zeros([BLOCK_N, GROUPS, 16], dtype=tl.float32)
        for i in tl.static_range(8):
            # the activations each thread needs, loaded into the weights' own layout (no exchange through
            # shared memory; the rows of a program read the same addresses from L1), float32
            if EVEN:
                xi = tl.load(x_ptr + xb + 16 * i)
            else:
                xi = tl.load(x_ptr + xb + 16 * i, mask=gm[None, :, None], other=0)
            v = (w << (19 - 4 * i)) if i < 5 else (w >> (4 * i - 19))  # code i to bits 19..22
            if ASM:  # (v & mask) | one in ONE lop3 (the compiler spends two: it holds neither constant in a register)
                f = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x00780000, 0x3F800000, 0xEA;", "=r,r", [v],
                                              dtype=tl.float32, is_pure=True, pack=1)
            else:
                f = ((v & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)
            t += xi * f  # x * (1 + q / 16)
        acc += t * (16.0 * s)[:, :, None]
        off += s * (16.0 + z) * xs[None, :]
    tl.store(y_ptr + pk * N + rows, tl.sum(tl.sum(acc, 2), 1) - tl.sum(off, 1), mask=live)  # cast to y's dtype


# int4's several rows: codes into bfloat16's mantissa, the matrix instruction, each group's zero and scale after
@triton.jit
def int4_gemm(x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, KW, G, PER, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, ASM: tl.constexpr, EVEN: tl.constexpr,
              TILED: tl.constexpr):
    # Several rows (a batched decode step): x (M, K) in its dtype, xs (M, G) float32 its groups' sums. The
    # weights' rows fill the matrix instruction's large side, the streams its small one ("swap AB", as fp8's
    # gemm). A code q becomes the bfloat16 128 + q by OR-ing it into 0x4300's mantissa, two codes in one lop3
    # (nibbles i and i + 4 of a word sit 16 bits apart: Marlin's trick); a group's products sum x·(128 + q),
    # then lose (128 + zero)·sum x and take the group's scale: sum x·(q - zero)·scale.
    pn, pk = tl.program_id(0), tl.program_id(1)
    g_end = tl.minimum(pk * PER + PER, G)
    rows = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < N
    mi = tl.arange(0, BLOCK_M)
    mm = mi < M
    jj = tl.arange(0, 16)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for g0 in tl.range(pk * PER, g_end, GROUPS):
        for gl in tl.static_range(GROUPS):
            g = g0 + gl
            gv = g < g_end
            wp = word_pointers(w_ptr, pn, g0, tl.arange(0, BLOCK_N)[:, None], gl * 16 + jj[None, :], KW, G, BLOCK_N,
                               GROUPS, TILED)
            xp = x_ptr + mi[None, :] * (G * 128) + g * 128 + jj[:, None]  # (16, M): nibble 0's columns
            xm = mm[None, :] & gv
            if EVEN:
                w = tl.load(wp)
                s = tl.load(s_ptr + rows * G + g).to(tl.float32)
                z = tl.load(z_ptr + rows * G + g).to(tl.float32)
            else:
                w = tl.load(wp, mask=live[:, None] & gv, other=0)
                s = tl.load(s_ptr + rows * G + g, mask=live & gv, other=0).to(tl.float32)
                z = tl.load(z_ptr + rows * G + g, mask=live & gv, other=0).to(tl.float32)
            xs = tl.load(xs_ptr + mi * G + g, mask=mm & gv, other=0)
            part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for i in tl.static_range(4):
                v = w >> (4 * i)  # nibble i to bits 0..3, nibble i + 4 to bits 16..19
                if ASM:
                    lo, hi = tl.inline_asm_elementwise(
                        """{
                        .reg .b32 t;
                        lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xEA;
                        mov.b32 {$0, $1}, t;
                        }""", "=h,=h,r", [v], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
                else:
                    lo = ((v & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                    hi = (((v >> 16) & 0xF) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                xlo = tl.load(xp + 16 * i, mask=xm, other=0)  # ("ieee": float32 x in float32, not TF32)
                xhi = tl.load(xp + 16 * (i + 4), mask=xm, other=0)
                part = tl.dot(lo.to(x_ptr.dtype.element_ty), xlo, part, input_precision="ieee")
                part = tl.dot(hi.to(x_ptr.dtype.element_ty), xhi, part, input_precision="ieee")
            acc += s[:, None] * (part - (128.0 + z)[:, None] * xs[None, :])
    tl.store(y_ptr + pk * M * N + mi[None, :] * N + rows[:, None], acc, mask=live[:, None] & mm[None, :])
