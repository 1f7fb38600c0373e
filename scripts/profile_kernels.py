#!/usr/bin/env python3
"""Attention kernels side by side, the decode step as it really runs, and the vision tower compiled or not.

On LiveCC-7B's shape with random bf16 weights, every row at ``--context`` tokens:

1. the decode step replayed from its CUDA graph (the engine's default path, compiled): wall ms per step, its
   kernels by kind (GEMM, attention, other) and the top kernels; the weight read is the floor;
2. one layer of a decode step's attention, three ways: the engine's grouped two-matmul over a fixed window
   with a mask; FlashAttention-2 variable-length with one query per row reading the cache in place
   (``seqused_k``); the same with the query heads of a KV head packed as rows (one K/V read per KV head);
3. one layer of a prefill's attention over B rows of 386 new tokens: the engine's FlashAttention-2 varlen call
   (causal, 28 query heads); the past and the new tokens apart, the past with grouped query heads
   (non-causal) and the new tokens causal, merged by their log-sum-exp; and cuDNN's attention for the past;
4. the vision tower over one 1080p clip: CUDA graph of the eager blocks vs of the compiled ones.

    python3 scripts/profile_kernels.py --tokenizer .bench/tokenizer --rows 1 8 32 --context 16000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import loaded, synthetic_clips  # noqa: E402
from profile_turn import timed  # noqa: E402

from pipeline.engine import EngineConfig, make_core  # noqa: E402
from pipeline.engine.quantize import _leaves  # noqa: E402
from pipeline.engine.vision import patchify  # noqa: E402
from pipeline.engine.vision_tower import VisionTower  # noqa: E402

FA = torch.ops.aten._flash_attention_forward


def lse_rows(lse: torch.Tensor, total: int) -> torch.Tensor:
    """FlashAttention's log-sum-exp as (total_q, heads) float32, from (heads, total_q) (unpadded) or
    (B, heads, max_q) (padded, rows of equal length in this script)."""
    if lse.dim() == 2:
        return lse.t().float()
    return lse.transpose(1, 2).reshape(total, lse.shape[1]).float()


def merge(o1, l1, o2, l2):
    """Two partial attentions (N, H, d) over disjoint keys with log-sum-exps (N, H) -> the attention over both."""
    l1 = torch.where(torch.isinf(l1), torch.full_like(l1, float("-inf")), l1)
    w = torch.sigmoid(l1 - l2)[..., None]
    return (o2.float() + (o1.float() - o2.float()) * w).to(o1.dtype)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=16000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["step", "decode", "prefill", "vision"])
    ap.add_argument("--quantize", choices=["none", "int8", "int4", "fp8"], default="none",
                    help="the language model's weights (engine.quantize): the decode step's kernels in that mode")
    args = ap.parse_args()
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    model = loaded("7b", args.tokenizer, dev, torch.bfloat16, args.quantize)
    print(f"# model loaded in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)  # progress
    t0 = time.perf_counter()
    core = make_core(model, EngineConfig(greedy=True, max_context=32768, quantize=args.quantize), slots=max(args.rows))
    print(f"# engine compiled and captured in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    r, m, cache = core.runner, core.runner.model, core.runner.cache
    H, KV, D = m.n_heads, m.n_kv, m.head_dim
    g = H // KV
    C = args.context
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, 7B shape bf16, weights {args.quantize}, "
          f"context {C}\n")
    for s in range(max(args.rows)):
        cache.k[:, s, :, :C + 512].normal_()
        cache.v[:, s, :, :C + 512].normal_()
    # what one decode step must read: the layers' matrices and the lm_head (quantized ones by their stored parts)
    wbytes = sum(leaf.numel() * leaf.element_size() for w in m.layers for t in (w.qkv_w, w.o_w, w.gate_up_w, w.down_w)
                 for leaf in _leaves(t))
    wbytes += sum(leaf.numel() * leaf.element_size() for leaf in _leaves(m.lm_head.weight))

    if "step" not in args.skip:
        print("| decode step (graph, compiled) | rows | window | wall ms | kernels ms | GEMM | attention | other |"
              " weights GB | floor ms at 4.8 TB/s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        tops = []
        for B in args.rows:
            for s in range(B):
                cache.lengths[s] = C
            nb, window = r.decode_shape(list(range(B)))
            # one step sets the runner's state (each replay after it advances the rows by one key)
            r.decode(list(range(B)), torch.zeros(B, dtype=torch.long), [C] * B)
            with torch.inference_mode():
                step = lambda: r.graphs.run(nb, window)  # noqa: E731
                wall, kern, by, top = timed(step, reps=20)
            print(f"| | {B} | {window} | {wall:.2f} | {kern:.2f} | {by.get('gemm', 0):.2f} | "
                  f"{by.get('attention', 0):.2f} | {by.get('other', 0):.2f} | {wbytes / 1e9:.1f} | "
                  f"{wbytes / 4.8e12 * 1e3:.2f} |")
            tops.append((B, top))
        for B, top in tops:
            print(f"\n## decode step, {B} rows: top kernels (ms, calls)")
            for ms, n, name in top:
                print(f"  {ms:8.3f} {n:6d}  {name}")
        print()

    if "decode" not in args.skip:
        print("| decode attention, one layer | rows | engine (window + mask) ms | FA2 varlen ms | FA2 varlen, grouped ms"
              " | FA2 varlen, max_k = capacity ms | FlexAttention (GQA, block mask) ms | Flex + mask built ms"
              " | max diff varlen | max diff grouped | max diff flex |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
        kf, vf = cache.varlen(0)
        for B in args.rows:
            for s in range(B):
                cache.lengths[s] = C
            nb, window = r.decode_shape(list(range(B)))
            q = torch.randn(nb, H, D, device=dev, dtype=torch.bfloat16)
            at = torch.full((nb,), C, dtype=torch.long, device=dev)
            masked = (torch.arange(window, device=dev)[None, :] > at[:, None])[:, None, None, :]
            kw, vw = cache.window(0, nb, window)
            cu_q = torch.arange(nb + 1, dtype=torch.int32, device=dev)
            first = [s * cache.varlen_stride for s in range(nb)]
            cu_k = torch.tensor(first + [first[-1] + cache.capacity], dtype=torch.int32, device=dev)
            used = (at + 1).to(torch.int32)
            qg = q.view(nb, KV, g, D).transpose(1, 2).reshape(nb * g, KV, D)
            cu_qg = cu_q * g
            eng = lambda: m.attend_rows(q[:, :, None], kw, vw, masked)  # noqa: E731
            var = lambda: FA(q, kf, vf, cu_q, cu_k, 1, window, 0.0, False, False, seqused_k=used)[0]  # noqa: E731
            cap = lambda: FA(q, kf, vf, cu_q, cu_k, 1, cache.capacity, 0.0, False, False, seqused_k=used)[0]  # noqa: E731
            grp = lambda: FA(qg, kf, vf, cu_qg, cu_k, g, window, 0.0, False, False, seqused_k=used)[0]  # noqa: E731
            # FlexAttention's decoding kernel (split-KV, the query heads of a KV head packed): each row's keys
            # 0..at as full 128-key blocks plus one partial block masked by length; the block mask is built on the
            # device from the lengths (what a decode step would do every step)
            K, V, blk = cache.k[0, :nb], cache.v[0, :nb], 128
            nblk = cache.capacity // blk
            lens = at + 1
            ar = torch.arange(nblk, device=dev, dtype=torch.int32)

            def mm(b, h, q_idx, kv_idx):
                return kv_idx < lens[b]

            def bmask():
                full = (lens // blk).to(torch.int32).view(nb, 1, 1)
                part = (lens % blk != 0).to(torch.int32).view(nb, 1, 1)
                pidx = (full[..., None] + ar).clamp(max=nblk - 1)
                return BlockMask.from_kv_blocks(part, pidx, full, ar.expand(nb, 1, 1, nblk).contiguous(), BLOCK_SIZE=blk,
                                                mask_mod=mm, seq_lengths=(1, cache.capacity))
            bm = bmask()
            fl = lambda: flex(q[:, :, None], K, V, block_mask=bm, enable_gqa=True)  # noqa: E731
            flm = lambda: flex(q[:, :, None], K, V, block_mask=bmask(), enable_gqa=True)  # noqa: E731
            with torch.inference_mode():
                want = eng()[:, 0].float()
                d1 = (var().float() - want).abs().max().item()
                og = grp().view(nb, g, KV, D).transpose(1, 2).reshape(nb, H, D)
                d2 = (og.float() - want).abs().max().item()
                try:
                    d3 = f"{(fl()[:, :, 0].float() - want).abs().max().item():.3g}"
                    tf, tfm = f"{timed(fl, 20)[0]:.3f}", f"{timed(flm, 20)[0]:.3f}"
                except Exception as e:  # noqa: BLE001 - a candidate, reported
                    d3, tf, tfm = "–", f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", "–"
                print(f"| | {B} | {timed(eng, 20)[0]:.3f} | {timed(var, 20)[0]:.3f} | {timed(grp, 20)[0]:.3f} | "
                      f"{timed(cap, 20)[0]:.3f} | {tf} | {tfm} | "
                      f"{d1:.3g} | {d2:.3g} | {d3} |")
        print()

    if "prefill" not in args.skip:
        T = 386
        print(f"| prefill attention, one layer, {T} new tokens a row | rows | engine varlen ms | split, grouped past"
              " ms | of which past ms | cuDNN past ms | cuDNN past, new shape each call ms | max diff split |")
        print("|---|---|---|---|---|---|---|---|")
        kf, vf = cache.varlen(0)
        for B in args.rows:
            N = B * T
            q = torch.randn(N, H, D, device=dev, dtype=torch.bfloat16)
            cu_q = torch.arange(B + 1, dtype=torch.int32, device=dev) * T
            first = [s * cache.varlen_stride for s in range(B)]
            cu_k = torch.tensor(first + [first[-1] + cache.capacity], dtype=torch.int32, device=dev)
            cu_new = torch.tensor([f + C for f in first] + [first[-1] + cache.capacity], dtype=torch.int32,
                                  device=dev)
            used_all = torch.full((B,), C + T, dtype=torch.int32, device=dev)
            used_past = torch.full((B,), C, dtype=torch.int32, device=dev)
            used_new = torch.full((B,), T, dtype=torch.int32, device=dev)
            qg = q.view(N, KV, g, D).transpose(1, 2).reshape(N * g, KV, D)
            eng = lambda: FA(q, kf, vf, cu_q, cu_k, T, C + T, 0.0, True, False, seqused_k=used_all)[0]  # noqa: E731

            def past():
                o, lse = FA(qg, kf, vf, cu_q * g, cu_k, T * g, C, 0.0, False, False, seqused_k=used_past)[:2]
                o = o.view(N, g, KV, D).transpose(1, 2).reshape(N, H, D)
                lse = lse_rows(lse, N * g).view(N, g, KV).transpose(1, 2).reshape(N, H)
                return o, lse

            def split():
                o1, l1 = past()
                o2, l2 = FA(q, kf, vf, cu_q, cu_new, T, T, 0.0, True, False, seqused_k=used_new)[:2]
                return merge(o1, l1, o2, lse_rows(l2, N))

            with torch.inference_mode():
                diff = (split().float() - eng().float()).abs().max().item()
                t_eng, t_split, t_past = timed(eng, 10)[0], timed(split, 10)[0], timed(past, 10)[0]
                t_cud = t_new = float("nan")
                if B == 1:
                    kr, vr = cache.k[0, 0:1, :, :C], cache.v[0, 0:1, :, :C]
                    qc = q.view(T, KV, g, D).permute(1, 2, 0, 3).reshape(1, KV, g * T, D)
                    try:
                        cud = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(  # noqa: E731
                            qc, kr, vr, None, True, 0.0, False, False)[0]
                        t_cud = timed(cud, 10)[0]
                        shapes = iter(range(C - 4096, C, 128))

                        def cud_new():
                            n = next(shapes)
                            return torch.ops.aten._scaled_dot_product_cudnn_attention(
                                qc, kr[:, :, :n], vr[:, :, :n], None, True, 0.0, False, False)[0]
                        t_new = timed(cud_new, 10)[0]
                    except Exception as e:  # noqa: BLE001
                        print(f"  cuDNN attention: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            print(f"| | {B} | {t_eng:.3f} | {t_split:.3f} | {t_past:.3f} | {t_cud:.3f} | {t_new:.3f} | {diff:.3g} |")
        print()

    if "vision" not in args.skip:
        frames = next(iter(synthetic_clips(2))).frames[:2]
        pixels, grid = patchify(frames, model.patches, dev)
        eager = VisionTower(model.visual, use_graphs=True)
        fused = VisionTower(model.visual, use_graphs=True, compile=True)
        with torch.inference_mode():
            te = timed(lambda: eager(pixels, grid), 20)
            tf = timed(lambda: fused(pixels, grid), 20)
            diff = (eager(pixels, grid).float() - fused(pixels, grid).float()).abs().max().item()
        print("| vision tower, one 1080p clip (2 frames) | wall ms | kernels ms | other (non-GEMM, non-attention) ms |")
        print("|---|---|---|---|")
        print(f"| CUDA graph, eager blocks | {te[0]:.2f} | {te[1]:.2f} | {te[2].get('other', 0):.2f} |")
        print(f"| CUDA graph, compiled rotary + activation | {tf[0]:.2f} | {tf[1]:.2f} | {tf[2].get('other', 0):.2f} |")
        print(f"max diff {diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
