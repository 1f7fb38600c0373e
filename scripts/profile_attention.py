#!/usr/bin/env python3
"""Attention kernels of a decode step and of a lone row's prefill, side by side, as CUDA graphs replay them.

No model: LiveCC-7B's attention shape (28 query heads, 4 KV heads, head_dim 128, bf16) over a ``KVCache`` of 28
layers filled with random keys/values, so every layer reads its own cache (as a real step does, not one layer's
keys held in L2). Each candidate runs for all 28 layers inside one CUDA graph; the table gives the GPU time of a
replay per layer (CUDA events over 50 replays) and its largest difference from float32 attention.

Decode, one query a row, each row at ``--context`` keys:
- ``FlashAttention-2 varlen``: one query per row, 28 query heads (the engine's decode step until the split-KV kernels);
- ``split N``: the same with ``num_splits=N`` forced (``--splits``: PyTorch builds whose kernel takes it; 2.11's
  does not);
- ``split-KV Triton C``: the engine's decode attention (``pipeline/engine/decode_attention.py``), C keys a program;
- ``chunks C``: each row's keys cut into chunks of C keys, every chunk a varlen "row" whose 7 query rows are the
  query heads sharing a KV head (each K/V byte read once), merged by log-sum-exp (compiled).

Prefill of one row: 386 new tokens after ``--context`` cached keys (the graph path of ``PrefillGraphs``):
- ``engine``: FlashAttention-2 varlen, causal over the whole row, key bound = capacity;
- ``past S``: the past cut into S chunks (non-causal, the 386 queries repeated per chunk) plus the new tokens
  (causal), one varlen call each, merged; ``grouped`` stacks the query heads of a KV head as rows;
- ``cudnn`` (``--cudnn-varlen``): cuDNN's variable-length attention over the past with the lengths in device
  tensors (one plan, key bound = capacity), plus the new tokens through FlashAttention, merged. On torch 2.11 with
  cuDNN 9.19 its capture fails and leaves the process unusable, so it is last and opt-in.

Every prefill candidate is checked again after the past's length changed, replayed from the same graph: one
captured graph must serve every context length.

    python3 scripts/profile_attention.py --context 4000 16000 --rows 1 8 32

Measured on an H200 (docs/performance.md, sixth pass): none of the alternatives beat the engine's calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.engine.kv_cache import KVCache  # noqa: E402

FA = torch.ops.aten._flash_attention_forward
LAYERS, H, KV, D, T = 28, 28, 4, 128, 386
G = H // KV


def graph_ms(fn, reps: int = 50, prep=None, copies: int = LAYERS):
    """(GPU ms of one replay of a CUDA graph of ``fn(i)`` for i < ``copies`` (every layer), per call; the graph;
    its first output). ``prep()``, if given, runs once before the calls (what a step computes once for all layers)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            if prep:
                prep()
            for i in range(copies):
                fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        if prep:
            prep()
        out0 = fn(0)
        for i in range(1, copies):
            fn(i)
    for _ in range(3):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps / copies, g, out0


def reference(q, k, v, causal_new: int = 0):
    """float32 attention of q (n, H, d) over k/v (L, KV, d); the last ``causal_new`` keys causal to the n queries."""
    qf, kf, vf = q.float(), k.float().repeat_interleave(G, 1), v.float().repeat_interleave(G, 1)
    s = torch.einsum("nhd,lhd->hnl", qf, kf) * D ** -0.5
    if causal_new:
        L, n = k.shape[0], q.shape[0]
        allowed = torch.arange(L, device=q.device)[None] <= (L - n + torch.arange(n, device=q.device))[:, None]
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", s.softmax(-1), vf)


def lse_nh(lse: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    """FlashAttention's log-sum-exp as (n, heads) float32, from (heads, n) or padded (rows, heads, n / rows)."""
    return lse.t().float() if lse.dim() == 2 else lse.transpose(1, 2).reshape(n, lse.shape[1]).float()


def merge_n(o, lse):
    """Partial attentions o (..., S, q, h, d) with log-sum-exps (..., S, q, h) over disjoint keys -> (..., q, h, d)."""
    m = lse.amax(-3, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m)
    return ((w[..., None] * o.float()).sum(-4) / w.sum(-3)[..., None]).to(o.dtype)


torch._dynamo.config.cache_size_limit = 256  # one compilation of the merge per shape
merge_c = torch.compile(merge_n, fullgraph=True, dynamic=False)


def decode_rows(args, dev):
    from pipeline.engine.decode_attention import decode_attention
    print("| decode attention | context | rows | FlashAttention-2 varlen us | "
          + " | ".join(f"split {n} us" for n in args.splits) + " | " + " | ".join(f"chunks {c} us" for c in args.chunks)
          + " | " + " | ".join(f"split-KV Triton {c} us" for c in args.split_kv)
          + " | KV read floor us at 4 TB/s | max diff |")
    print("|" + "---|" * (5 + len(args.splits) + len(args.chunks) + len(args.split_kv)) + "---|")
    for C in args.context:
        cap = C + 2048
        for B in args.rows:
            cache = KVCache(LAYERS, B, KV, D, cap, torch.bfloat16, dev)
            cache.k.normal_(), cache.v.normal_()
            window = (C // 2048 + 1) * 2048
            lens = torch.tensor([C - 37 * b for b in range(B)], dtype=torch.int32, device=dev)  # rows differ
            q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
            st = cache.varlen_stride
            cu_q = torch.arange(B + 1, dtype=torch.int32, device=dev)
            cu_k = (cu_q * st).clamp(max=(B - 1) * st + cap)
            diffs, times = [], []

            def engine(i, **kw):
                kf, vf = cache.varlen(i)
                return FA(q, kf, vf, cu_q, cu_k, 1, window, 0.0, False, False, seqused_k=lens, **kw)[0]

            def chunk_layout(Cc):  # once per step in an engine: which keys each chunk "row" reads
                S = window // Cc
                starts = torch.arange(S, device=dev, dtype=torch.int32) * Cc
                ck = (torch.arange(B, device=dev, dtype=torch.int32)[:, None] * st + starts).reshape(-1)
                ck = torch.cat([ck, ck[-1:] + Cc])
                used = (lens[:, None] - starts).clamp(0, Cc).reshape(-1)
                cq = torch.arange(B * S + 1, dtype=torch.int32, device=dev) * G
                return S, ck, used, cq
            layouts = {c: chunk_layout(c) for c in args.chunks}

            def chunked(i, Cc):
                S, ck, used, cq = layouts[Cc]
                kf, vf = cache.varlen(i)
                qe = q.view(B, KV, G, D).transpose(1, 2)[:, None].expand(B, S, G, KV, D).reshape(B * S * G, KV, D)
                o, lse = FA(qe, kf, vf, cq, ck, G, Cc, 0.0, False, False, seqused_k=used)[:2]
                lse = lse_nh(lse, B * S * G, B * S).view(B, S, G, KV)
                lse = torch.where((used > 0).view(B, S, 1, 1), lse, torch.full_like(lse, float("-inf")))
                return merge_c(o.view(B, S, G, KV, D), lse).transpose(1, 2).reshape(B, H, D)

            want = torch.stack([reference(q[b:b + 1], cache.k[0, b, :, :int(lens[b])].transpose(0, 1),
                                          cache.v[0, b, :, :int(lens[b])].transpose(0, 1))[0] for b in range(B)])
            cands = [("engine", lambda i: engine(i))]
            cands += [(f"split {n}", lambda i, n=n: engine(i, num_splits=n)) for n in args.splits]
            cands += [(f"chunks {c}", lambda i, c=c: chunked(i, c)) for c in args.chunks]
            cands += [(f"split-KV {c}", lambda i, c=c: decode_attention(q, cache.k[i], cache.v[i], lens, window,
                                                                         split=c)) for c in args.split_kv]
            for name, fn in cands:
                try:
                    with torch.inference_mode():
                        diffs.append(f"{name} {(fn(0).float() - want).abs().max().item():.2g}")
                        times.append(f"{graph_ms(fn)[0] * 1e3:.1f}")
                except Exception as e:  # noqa: BLE001 - a candidate this build cannot run: reported
                    times.append(f"failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            floor = int(lens.sum()) * KV * D * 2 * 2 / 4e12 * 1e6
            print(f"| | {C} | {B} | " + " | ".join(times) + f" | {floor:.1f} | {'; '.join(diffs)} |")
            del cache
            torch.cuda.empty_cache()
    print()


def prefill_rows(args, dev):
    cols = ["engine"] + [f"past {s}" for s in args.past_splits] + [f"past {s} grouped" for s in args.past_splits] \
        + (["cudnn", "cudnn grouped"] if args.cudnn_varlen else [])
    print("| prefill attention, one row, 386 new tokens | past | " + " | ".join(f"{c} us" for c in cols)
          + " | max diff |")
    print("|" + "---|" * (2 + len(cols)) + "---|")
    for C in args.context:
        cap = max(args.context) + 4096
        cache = KVCache(LAYERS, 1, KV, D, cap, torch.bfloat16, dev)
        cache.k.normal_(), cache.v.normal_()
        q = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
        past = torch.tensor([C], dtype=torch.int32, device=dev)  # device values: a graph replays any length
        i32 = dict(dtype=torch.int32, device=dev)
        cu_q = torch.tensor([0, T], **i32)
        cu_k = torch.tensor([0, cap], **i32)

        def engine(i):
            kf, vf = cache.varlen(i)
            return FA(q, kf, vf, cu_q, cu_k, T, cap, 0.0, True, False, seqused_k=past + T)[0]

        def new_part(i):
            kf, vf = cache.varlen(i)
            ck = torch.cat([past, past + T])
            o, lse = FA(q, kf, vf, cu_q, ck, T, T, 0.0, True, False, seqused_k=torch.full_like(past, T))[:2]
            return o, lse_nh(lse, T, 1)

        lay = {}

        def layout(S):  # once per prefill in an engine, on the device (the graph replays any past length)
            Cp = (past + S - 1) // S
            starts = torch.arange(S, **i32) * Cp
            lay[S] = torch.cat([starts, starts[-1:] + Cp]), (past - starts).clamp(min=0).minimum(Cp)

        def split(i, S, grouped):
            kf, vf = cache.varlen(i)
            ck, used = lay[S]
            if grouped:
                qe = q.view(T, KV, G, D).transpose(0, 1).reshape(KV, T * G, D).transpose(0, 1)  # (T*G, KV, d)
                qe = qe[None].expand(S, T * G, KV, D).reshape(S * T * G, KV, D)
                cq = torch.arange(S + 1, **i32) * T * G
                o, lse = FA(qe, kf, vf, cq, ck, T * G, cap, 0.0, False, False, seqused_k=used)[:2]
                o = o.view(S, T * G, KV, D).transpose(1, 2).reshape(S, KV, T, G, D).permute(0, 2, 1, 3, 4)
                lse = lse_nh(lse, S * T * G, S).view(S, T * G, KV).transpose(1, 2).reshape(S, KV, T, G)
                o, lse = o.reshape(S, T, H, D), lse.permute(0, 2, 1, 3).reshape(S, T, H)
            else:
                qe = q[None].expand(S, T, H, D).reshape(S * T, H, D)
                cq = torch.arange(S + 1, **i32) * T
                o, lse = FA(qe, kf, vf, cq, ck, T, cap, 0.0, False, False, seqused_k=used)[:2]
                o, lse = o.view(S, T, H, D), lse_nh(lse, S * T, S).view(S, T, H)
            lse = torch.where((used > 0).view(S, 1, 1), lse, torch.full_like(lse, float("-inf")))
            on, ln = new_part(i)
            return merge_c(torch.cat([o, on[None]]), torch.cat([lse, ln[None]]))

        qg = q.view(T, KV, G, D).transpose(0, 1).reshape(KV, T * G, D).transpose(0, 1).contiguous()  # (T*G, KV, d)
        cu_qg = cu_q * G

        def cudnn(i, grouped):
            kf, vf = cache.varlen(i)
            k, v = kf[:cap], vf[:cap]
            cq, qq, mq = (cu_qg, qg, T * G) if grouped else (cu_q, q, T)
            o, lse = torch.ops.aten._cudnn_attention_forward(
                qq, k, v, None, cq, torch.cat([cu_k[:1], past]), mq, cap, True, 0.0, False, False)[:2]
            lse = lse_nh(lse, mq, 1)
            if grouped:
                o = o.view(T, G, KV, D).transpose(1, 2).reshape(T, H, D)
                lse = lse.view(T, G, KV).transpose(1, 2).reshape(T, H)
            on, ln = new_part(i)
            return merge_c(torch.stack([o, on]), torch.stack([lse, ln]))

        cands = [("engine", engine, None)] \
            + [(f"past {s}", lambda i, s=s: split(i, s, False), lambda s=s: layout(s)) for s in args.past_splits] \
            + [(f"past {s} grouped", lambda i, s=s: split(i, s, True), lambda s=s: layout(s)) for s in args.past_splits] \
            + ([("cudnn", lambda i: cudnn(i, False), None), ("cudnn grouped", lambda i: cudnn(i, True), None)]
               if args.cudnn_varlen else [])
        times, diffs = [], []
        for name, fn, prep in cands:
            try:
                with torch.inference_mode():
                    want = reference(q, cache.k[0, 0, :, :C + T].transpose(0, 1),
                                     cache.v[0, 0, :, :C + T].transpose(0, 1), causal_new=T)
                    if prep:
                        prep()
                    d = (fn(0).float() - want).abs().max().item()
                    ms, g, out0 = graph_ms(fn, 20, prep)
                    times.append(f"{ms * 1e3:.1f}")
                    # the captured graph replayed at another length (one graph must serve every context)
                    past.fill_(C - 777)
                    g.replay()
                    want2 = reference(q, cache.k[0, 0, :, :C - 777 + T].transpose(0, 1),
                                      cache.v[0, 0, :, :C - 777 + T].transpose(0, 1), causal_new=T)
                    d2 = (out0.float() - want2).abs().max().item()
                    past.fill_(C)
                    diffs.append(f"{name} {d:.2g}/{d2:.2g}")
            except Exception as e:  # noqa: BLE001 - reported
                past.fill_(C)
                times.append(f"failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
        print(f"| | {C} | " + " | ".join(times) + f" | {'; '.join(diffs)} |")
        del cache
        torch.cuda.empty_cache()
    print()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, nargs="+", default=[4000, 16000])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--splits", type=int, nargs="*", default=[], help="num_splits values to force (torch > 2.11)")
    ap.add_argument("--chunks", type=int, nargs="*", default=[512, 1024, 2048])
    ap.add_argument("--split-kv", type=int, nargs="*", default=[256, 512, 1024],
                    help="keys a program reads in the engine's split-KV Triton kernels (decode_attention)")
    ap.add_argument("--past-splits", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--cudnn-varlen", action="store_true", help="also cuDNN's varlen attention (see the doc)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["decode", "prefill"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}\n")
    if "decode" not in args.skip:
        decode_rows(args, dev)
    if "prefill" not in args.skip:
        prefill_rows(args, dev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
