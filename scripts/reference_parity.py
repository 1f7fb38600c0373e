#!/usr/bin/env python3
"""Golden outputs from the ORIGINAL LiveCC streaming loop, for parity tests of our engine.

Runs in a separate "reference" virtualenv (not our project's), e.g.::

    /tmp/refenv/bin/python scripts/reference_parity.py --livecc-repo /tmp/livecc \
        --checkpoint ~/.cache/livecc/<tiny-ckpt> --video ~/.cache/livecc/<video>.mp4 \
        --out tests/golden/reference_qwen.json

It imports ``LiveCCDemoInfer`` from ``<livecc-repo>/demo/infer.py`` (a work tree of
showlab/livecc; nothing of it is copied here) and drives ``live_cc`` the way ``demo/cli.py`` does:
one call per whole second of video time, greedy decoding. Everything recorded per turn is
captured by wrapping functions/hooks at run time; the reference files are not edited.

Run-time deviations from an unmodified run are listed in the output JSON under "deviations".
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import subprocess
import sys
import types
from pathlib import Path

QUERY_1 = "Please describe the video."
QUERY_2 = "Describe the colours and the moving shapes."
TIME_RE = re.compile(r"Time=(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)s")


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_hash(d: Path) -> tuple[str, dict]:
    """sha256 over '<relpath>\\0<file sha256>\\n' for every file, sorted by relpath."""
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            files[p.relative_to(d).as_posix()] = sha256_file(p)
    h = hashlib.sha256()
    for rel, fh in sorted(files.items()):
        h.update(f"{rel}\0{fh}\n".encode())
    return h.hexdigest(), files


def version(dist: str):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def livecc_commit(repo: Path, given: str | None):
    """The reference's commit: given, else a `.livecc_commit` marker, else git — only when `repo` is the top of
    its own checkout (a copy inside another repository would report that repository's HEAD)."""
    if given:
        return given
    marker = repo / ".livecc_commit"
    if marker.exists():
        return marker.read_text().strip()
    try:
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        lines = top.stdout.split()
        if top.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == repo.resolve():
            return lines[1]
    except Exception:
        pass
    return None


def install_liger_stub(deviations: list):
    """demo/infer.py does `from liger_kernel.transformers import apply_liger_kernel_to_qwen2_vl` and calls it at
    import. Liger's Triton kernels need a GPU; on CPU we replace it with a no-op (the model keeps transformers'
    own RMSNorm / SwiGLU / RoPE / cross-entropy, which liger would only re-implement)."""
    liger = types.ModuleType("liger_kernel")
    liger_tf = types.ModuleType("liger_kernel.transformers")
    calls = []

    def apply_liger_kernel_to_qwen2_vl(*args, **kwargs):
        calls.append({"args": [repr(a) for a in args], "kwargs": {k: repr(v) for k, v in kwargs.items()}})

    liger_tf.apply_liger_kernel_to_qwen2_vl = apply_liger_kernel_to_qwen2_vl
    liger.transformers = liger_tf
    sys.modules["liger_kernel"] = liger
    sys.modules["liger_kernel.transformers"] = liger_tf
    deviations.append(
        "liger_kernel replaced by a no-op stub module before importing demo/infer.py "
        "(apply_liger_kernel_to_qwen2_vl() is called at import; its Triton kernels need a GPU). "
        "Liger only swaps in fused kernels for RMSNorm/SwiGLU/mRoPE/loss, same maths, so on CPU the model "
        "runs transformers' own modules."
    )
    return calls


def summarize(v):
    """Small JSON description of a generate()/forward() argument."""
    import torch

    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        d = {"tensor": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
        if v.numel() <= 16:
            d["value"] = v.tolist()
        return d
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [type(x).__name__ for x in v]
    if hasattr(v, "get_seq_length"):
        return {"cache": type(v).__name__, "seq_length": int(v.get_seq_length())}
    return type(v).__name__


def pos_cols(pos, idx):
    """pos: (3, L) tensor; idx: list of column indices -> [[t...],[h...],[w...]]"""
    return [[int(pos[c, i]) for i in idx] for c in range(3)]


def frame_check(video_reader, clip_idxs, clip, video_path):
    """How the reference's frames relate to (a) PyAV rgb24 decoding and (b) a float bicubic+antialias resize."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    raw = torch.from_numpy(video_reader.get_batch(list(clip_idxs)).asnumpy())  # T H W C uint8 (decord)
    r = {"raw_shape_thwc": list(raw.shape), "raw_sha256_thwc": sha256_bytes(raw.contiguous().numpy().tobytes())}
    x = raw.permute(0, 3, 1, 2).float()
    H, W = clip.shape[-2:]
    y = F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False, antialias=True)
    for name, z in (("round", y.clamp(0, 255).round()), ("trunc", y.clamp(0, 255).floor())):
        d = (z - clip.float()).abs()
        r[f"resize_vs_float_interp_{name}"] = {"max_abs": float(d.max()), "n_diff": int((d > 0).sum())}
    try:
        import av

        want = {int(i) for i in clip_idxs}
        got = {}
        with av.open(video_path) as c:
            for i, fr in enumerate(c.decode(video=0)):
                if i in want:
                    got[i] = fr.to_ndarray(format="rgb24")
                if i >= max(want):
                    break
        pa = torch.from_numpy(np.stack([got[int(i)] for i in clip_idxs]))
        d = (pa.int() - raw.int()).abs()
        r["pyav_rgb24_vs_decord"] = {"max_abs": int(d.max()), "n_diff": int((d > 0).sum()), "pyav": av.__version__}
    except Exception as e:  # pragma: no cover - informational only
        r["pyav_rgb24_vs_decord"] = f"not checked: {e!r}"
    return r


def check_pixel_values(processor, clip, pv, grid_thw):
    """Recompute pixel_values_videos from the uint8 TCHW frames without any resize, to see what the processor did."""
    import torch

    vp = processor.video_processor
    x = clip.to(torch.float32)
    mean = torch.tensor(vp.image_mean)
    std = torch.tensor(vp.image_std)
    fused = (x - (mean * 255.0).view(1, 3, 1, 1)) / (std * 255.0).view(1, 3, 1, 1)
    slow = (x * (1 / 255.0) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)

    def patchify(v):
        T, C, H, W = v.shape
        ps, tp, ms = vp.patch_size, vp.temporal_patch_size, vp.merge_size
        gt, gh, gw = T // tp, H // ps, W // ps
        v = v.view(1, gt, tp, C, gh // ms, ms, ps, gw // ms, ms, ps).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        return v.reshape(gt * gh * gw, C * tp * ps * ps)

    r = {"video_processor": type(vp).__name__,
         "video_processor_size": dict(vp.size) if vp.size is not None else None,
         "image_mean": list(vp.image_mean), "image_std": list(vp.image_std),
         "rescale_factor": vp.rescale_factor}
    for name, v in (("fused_mean255_std255", fused), ("x_div255_then_norm", slow)):
        p = patchify(v)
        r[f"max_abs_diff_vs_{name}"] = float((p - pv).abs().max()) if p.shape == pv.shape else f"shape {list(p.shape)}"
    return r



def evaluation_query(title: str, previous: str) -> str:
    """The query evaluation/livesports3kcc/distributed_generate_livecc.py builds for an instruct model."""
    query = ("You are an expert video commentator providing real-time, insightful, "
             "and engaging commentary on visual content.\n")
    if title:
        query += f'This is a video titled "{title}".\n'
    if previous:
        query += f"Here is previous commentary of the video:\n\n{previous}\n\nPlease continue to comment the video."
    return query


def whole_video_main(args, repo: Path, infer_mod, deviations: list, liger_calls: list):
    """``--mode qa`` (LiveCCDemoInfer.video_qa, one call per question on the same state) or ``--mode evaluation``
    (live_cc_once_for_evaluation with the LiveSports-3K script's arguments). Records per generate() call the frames
    the processor got (uint8 THWC sha256), pixel_values_videos (sha256), the prompt ids around the video pads and
    the new token ids."""
    import decord
    import numpy as np
    import torch
    import transformers

    from demo.infer import LiveCCDemoInfer

    torch.set_num_threads(args.threads)
    ckpt, video = args.checkpoint.resolve(), args.video.resolve()
    fetched: list[list[int]] = []  # the frame indices of every decord get_batch call, in order
    orig_batch = decord.VideoReader.get_batch

    def get_batch(self, indices):
        fetched.append([int(i) for i in indices])
        return orig_batch(self, indices)

    decord.VideoReader.get_batch = get_batch
    infer = LiveCCDemoInfer(model_path=str(ckpt), device=args.device)
    model, processor = infer.model, infer.processor
    video_token_id = int(model.config.video_token_id)
    eos_ids = model.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    cur: dict = {}
    turns: list[dict] = []

    proc_cls = type(processor)
    orig_call = proc_cls.__call__

    def call_wrapper(self, *a, **k):
        out = orig_call(self, *a, **k)
        cur.clear()
        cur["new_ids"] = out["input_ids"][0].tolist()
        cur["processor_attention_mask"] = "attention_mask" in out
        vids = k.get("videos")
        if vids:
            v = vids[0]
            u8 = v.to(torch.uint8)
            assert torch.equal(u8.to(v.dtype), v), "frames fed to the processor are not whole numbers in 0..255"
            cur["frames"] = {"fed_as": str(v.dtype).replace("torch.", "") + " TCHW",
                             "shape_thwc": [v.shape[0], v.shape[2], v.shape[3], v.shape[1]],
                             "sha256_thwc_uint8": sha256_bytes(u8.permute(0, 2, 3, 1).contiguous().numpy().tobytes())}
            pv = out["pixel_values_videos"]
            cur["pixel_values_videos"] = {"shape": list(pv.shape), "dtype": str(pv.dtype).replace("torch.", ""),
                                          "sha256": sha256_bytes(pv.contiguous().numpy().tobytes())}
            cur["video_grid_thw"] = out["video_grid_thw"].tolist()
        return out

    proc_cls.__call__ = call_wrapper
    orig_generate = model.generate

    def generate_wrapper(*a, **k):
        ids = k["input_ids"]
        mask = k.get("attention_mask")
        rec = {"past_len": int(ids.shape[1] - len(cur["new_ids"])), "input_len": int(ids.shape[1]),
               "mask_given": None if mask is None else int(mask.shape[1])}
        if mask is not None and mask.shape[1] != ids.shape[1]:
            k["attention_mask"] = torch.ones_like(ids)  # the full mask: what flash attention on CUDA amounts to
            rec["mask_widened_to"] = int(ids.shape[1])
        k["output_scores"] = True  # read back only: the processed scores of every step
        out = orig_generate(*a, **k)
        margins = [float(v[0] - v[1]) for v in (torch.topk(sc[0].float(), 2).values for sc in out.scores)]
        step = min(range(len(margins)), key=margins.__getitem__)
        rec["min_margin"], rec["min_margin_step"] = round(margins[step], 6), step
        new = cur["new_ids"]
        pads = [i for i, x in enumerate(new) if x == video_token_id]
        rec["prompt_ids_head"] = new[:pads[0]] if pads else new
        rec["num_video_tokens"] = len(pads)
        rec["prompt_ids_tail"] = new[pads[-1] + 1:] if pads else []
        for key in ("frames", "pixel_values_videos", "video_grid_thw"):
            if key in cur:
                rec[key] = cur[key]
        rec["token_ids"] = out.sequences[0, ids.shape[1]:].tolist()
        last = rec["token_ids"][-1]
        rec["ended_with"] = "eos" if last in eos_ids else "cap"
        turns.append(rec)
        return out

    model.generate = generate_wrapper
    settings = {"device": args.device, "torch_threads": args.threads,
                "model_dtype": str(model.dtype).replace("torch.", ""),
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "checkpoint_generation_config": model.generation_config.to_dict()}
    deviations.append("device passed explicitly as 'cpu', so attn_implementation=None (sdpa) instead of "
                      "flash_attention_2")
    deviations.append("generate(output_scores=True) to record each turn's smallest top-1/top-2 gap of the processed "
                      "scores (min_margin); nothing generated changes")
    if args.mode == "qa":
        settings.update(call="video_qa(message=q, history=[], state=state) per question, its defaults: "
                             "do_sample=False, repetition_penalty=1.05, max_new_tokens=512 (hard-coded)",
                        questions=args.question)
        state = {"video_path": str(video)}
        for q in args.question:
            n = len(turns)
            response, state = infer.video_qa(message=q, history=[], state=state)
            assert len(turns) == n + 1
            turns[-1].update(question=q, text=response)
            print(f"qa {len(turns)}: in={turns[-1]['input_len']} new={len(turns[-1]['token_ids'])} "
                  f"{turns[-1]['ended_with']}: {response[:60]!r}", file=sys.stderr, flush=True)
        extra = {}
    else:
        query = evaluation_query(args.title, args.previous)
        settings.update(call="live_cc_once_for_evaluation(query, video, video_start, video_end, max_new_tokens=32, "
                             "repetition_penalty=1.15), as evaluation/livesports3kcc/distributed_generate_livecc.py "
                             "calls it (its default --repetition_penalty); sampling per the checkpoint's "
                             "generation_config (the call passes no do_sample)",
                        query=query, title=args.title, previous=args.previous, video_start=args.start,
                        video_end=args.end, seed=args.seed)
        deviations.append(
            "attention_mask widened to the full sequence (torch.ones_like(input_ids)) in every generate() call whose "
            "mask covered only the new turn: on CPU/SDPA the reference's short mask is left-padded with zeros, so a "
            "later turn would attend to almost none of the past; flash attention on CUDA (how the published results "
            "were made) attends to all of it")
        deviations.append(f"torch.manual_seed({args.seed}) right before the call (it samples with the global RNG)")
        torch.manual_seed(args.seed)
        responses = infer.live_cc_once_for_evaluation(
            query=query, video=str(video), video_start=args.start, video_end=args.end,
            max_new_tokens=32, repetition_penalty=1.15)
        assert len(responses) == len(turns)
        for rec, (start, stop, text) in zip(turns, responses):
            rec.update(start=float(start), stop=float(stop), text=text)
        pred = " ".join(cc.replace(" ...", "") for _, _, cc in responses if cc).strip() + "..."
        extra = {"pred": pred}
        print(f"evaluation: {len(turns)} turns, pred {pred[:80]!r}", file=sys.stderr)
    vr = decord.VideoReader(str(video))
    ckpt_hash, ckpt_files = checkpoint_hash(ckpt)
    result = {
        "format": f"livecc-reference-golden-{args.mode}/1",
        "checkpoint": {"name": args.name or ckpt.name, "sha256": ckpt_hash},
        "video": {"name": video.name, "sha256": sha256_file(video), "num_frames": len(vr),
                  "avg_fps": float(vr.get_avg_fps()), "frame_indices": fetched[0] if fetched else None},
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                     "livecc-utils": version("livecc-utils"), "qwen-vl-utils": version("qwen-vl-utils"),
                     "decord": version("decord"), "livecc_commit": livecc_commit(repo, args.livecc_commit),
                     "demo_infer_py_sha256": sha256_file(repo / "demo" / "infer.py")},
        "generation": settings,
        "deviations": deviations,
        "liger_stub_calls": len(liger_calls),
        "turns": turns,
        **extra,
    }
    write_golden(args.out, result)
    print(f"wrote {args.out}: {len(turns)} turns, {os.path.getsize(args.out)} bytes", file=sys.stderr)


def write_golden(path: Path, result: dict) -> None:
    """Indented JSON with one compact line per turn (token id lists would otherwise take a line per id)."""
    head = json.dumps({k: v for k, v in result.items() if k != "turns"}, indent=1, ensure_ascii=False)
    head = re.sub(r"\[\s*(-?[\d.]+(?:,\s*-?[\d.]+)*)\s*\]", lambda m: "[" + re.sub(r",\s*", ", ", m.group(1)) + "]", head)
    turns = ",\n".join("  " + json.dumps(t, ensure_ascii=False) for t in result["turns"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head[:-2] + ',\n "turns": [\n' + turns + "\n ]\n}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--livecc-repo", required=True, type=Path, help="work tree of showlab/livecc")
    ap.add_argument("--livecc-commit", default=None, help="commit of that work tree (default: git rev-parse, or DIR/.livecc_commit)")
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--name", default=None, help="checkpoint name recorded in the JSON (default: folder name)")
    ap.add_argument("--video", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--turns", type=int, default=24, help="minimum number of turns (fails if fewer)")
    ap.add_argument("--max-seconds", type=int, default=30,
                    help="last whole second passed as video_timestamp (demo/cli.py: range(31) -> 30)")
    ap.add_argument("--query-change-turn", type=int, default=10, help="1-based turn at which the query changes")
    ap.add_argument("--query", default=QUERY_1)
    ap.add_argument("--query2", default=QUERY_2)
    ap.add_argument("--repetition-penalty", type=float, default=1.05, help="live_cc's default and cli.py's value: 1.05")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt-text-turns", type=int, default=1000, help="keep prompt_text only for the first N turns")
    ap.add_argument("--verbose", action="store_true", help="print the debug facts of the first 3 turns")
    ap.add_argument("--mode", choices=["live", "qa", "evaluation"], default="live",
                    help="live: live_cc as demo/cli.py drives it (default); qa: video_qa, one call per --question; "
                         "evaluation: live_cc_once_for_evaluation as the LiveSports-3K script calls it")
    ap.add_argument("--question", action="append", default=[], help="qa: a question (repeat for follow-ups)")
    ap.add_argument("--start", type=float, default=0.0, help="evaluation: video_start (s)")
    ap.add_argument("--end", type=float, default=None, help="evaluation: video_end (s)")
    ap.add_argument("--title", default="", help="evaluation: the event title")
    ap.add_argument("--previous", default="", help="evaluation: the previous commentary (preasr_text)")
    ap.add_argument("--seed", type=int, default=0, help="evaluation: torch.manual_seed before the call (it samples)")
    args = ap.parse_args()

    deviations: list[str] = []

    import numpy as np
    import torch
    import transformers  # before the stub: transformers probes liger_kernel's spec at import

    liger_calls = install_liger_stub(deviations)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    repo = args.livecc_repo.resolve()
    sys.path.insert(0, str(repo))  # demo/cli.py runs from the repo root: `from demo.infer import LiveCCDemoInfer`
    import demo.infer as infer_mod  # noqa: E402
    from demo.infer import LiveCCDemoInfer  # noqa: E402

    if args.mode != "live":
        return whole_video_main(args, repo, infer_mod, deviations, liger_calls)

    ckpt = args.checkpoint.resolve()
    video = args.video.resolve()

    # ---------------- capture plumbing ----------------
    cur: dict = {}  # data of the turn being produced
    call_clip: dict = {}  # data of the current live_cc call's frame fetch
    log = {"rope_index_calls": 0}

    orig_clip = infer_mod.get_smart_resized_clip

    @functools.wraps(orig_clip)
    def clip_wrapper(video_reader, resized_height, resized_width, timestamps, video_pts, video_pts_index_from=0):
        clip, clip_timestamps, clip_idxs = orig_clip(
            video_reader, resized_height, resized_width, timestamps, video_pts, video_pts_index_from
        )
        call_clip.clear()
        call_clip.update(
            requested_timestamps=[round(float(x), 6) for x in timestamps],
            grid_timestamps=[round(float(x), 6) for x in clip_timestamps],
            idxs=[int(i) for i in clip_idxs],
            pts=[float(video_pts[i]) for i in clip_idxs],
            index_from=int(video_pts_index_from),
            resized_hw=[int(resized_height), int(resized_width)],
            consumed=0,
        )
        if log.setdefault("frame_checks_done", 0) < 2 and len(clip_idxs):
            log["frame_checks_done"] += 1
            call_clip["frame_check"] = frame_check(video_reader, clip_idxs, clip, str(video))
        return clip, clip_timestamps, clip_idxs

    infer_mod.get_smart_resized_clip = clip_wrapper

    infer = LiveCCDemoInfer(model_path=str(ckpt), device=args.device)
    model, processor = infer.model, infer.processor
    tok = processor.tokenizer
    video_token_id = int(model.config.video_token_id)

    proc_cls = type(processor)
    orig_apply = proc_cls.apply_chat_template
    orig_call = proc_cls.__call__

    def apply_wrapper(self, conversation, *a, **k):
        out = orig_apply(self, conversation, *a, **k)
        if isinstance(conversation, list) and conversation and conversation[0].get("role") == "user":
            content = conversation[0]["content"]
            texts = [c.get("text") for c in content if c.get("type") == "text"]
            cur["conversation_texts"] = texts
            cur["query_sent"] = texts[1] if len(texts) > 1 else None
            cur["chat_template_text"] = out
        return out

    def call_wrapper(self, *a, **k):
        out = orig_call(self, *a, **k)
        vids = k.get("videos")
        if vids is not None:
            clip = vids[0]
            arr = clip.contiguous().numpy() if isinstance(clip, torch.Tensor) else np.ascontiguousarray(clip)
            cur["frames_dtype"] = str(arr.dtype)
            cur["frames_shape_tchw"] = list(arr.shape)
            cur["frames_sha256"] = sha256_bytes(np.ascontiguousarray(arr).tobytes())
            cur["frames_sha256_thwc"] = sha256_bytes(np.ascontiguousarray(arr.transpose(0, 2, 3, 1)).tobytes())
        cur["processor_text"] = k.get("text")
        cur["new_ids"] = out["input_ids"][0].tolist()
        if "pixel_values_videos" in out:
            pv = out["pixel_values_videos"]
            cur["pixel_values_videos"] = {
                "shape": list(pv.shape),
                "dtype": str(pv.dtype).replace("torch.", ""),
                "sha256": sha256_bytes(pv.contiguous().numpy().tobytes()),
                "sum": float(pv.double().sum()),
                "first8": [float(x) for x in pv.flatten()[:8]],
            }
            cur["video_grid_thw"] = out["video_grid_thw"].tolist()
            if vids is not None:
                cur["pixel_values_check"] = check_pixel_values(self, vids[0], pv, out["video_grid_thw"])
        return out

    proc_cls.apply_chat_template = apply_wrapper
    proc_cls.__call__ = call_wrapper

    orig_generate = model.generate

    def generate_wrapper(*a, **k):
        pkv = k.get("past_key_values")
        cur["generate_kwargs"] = {key: summarize(v) for key, v in k.items()}
        cur["generate_kwargs"]["logits_processor"] = (
            None if k.get("logits_processor") is None else
            [{"class": type(p).__name__, **{kk: vv for kk, vv in vars(p).items() if isinstance(vv, (int, float))}}
             for p in k["logits_processor"]]
        )
        cur["past_len_before"] = int(pkv.get_seq_length()) if pkv is not None else 0
        cur["rope_deltas_before"] = None if model.model.rope_deltas is None else model.model.rope_deltas.tolist()
        cur["forward_calls"] = []
        out = orig_generate(*a, **k)
        cur["sequences_len"] = int(out.sequences.shape[1])
        cur["all_ids"] = out.sequences[0].tolist()
        cur["rope_deltas_after"] = None if model.model.rope_deltas is None else model.model.rope_deltas.tolist()
        cur["past_len_after"] = int(out.past_key_values.get_seq_length())
        return out

    model.generate = generate_wrapper

    eos_ids = model.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    orig_glp = model._get_logits_processor

    def glp_wrapper(*a, **k):
        lp = orig_glp(*a, **k)
        desc = []
        for p in lp:
            d = {"class": type(p).__name__}
            for kk, vv in vars(p).items():
                if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                    d[kk] = vv
                elif isinstance(vv, bool):
                    d[kk] = vv
            desc.append(d)
        cur["logits_processors"] = desc

        def record_scores(input_ids, scores):  # identity; appended last, sees the fully processed scores
            top2 = torch.topk(scores[0].float(), 2)
            cur.setdefault("margins", []).append(round(float(top2.values[0] - top2.values[1]), 4))
            cur.setdefault("eos_gap", []).append(round(float(scores[0, eos_ids[0]] - top2.values[0]), 4))
            return scores

        lp.append(record_scores)
        gc = a[0] if a else k.get("generation_config")
        if gc is not None:
            cur["effective_generation_config"] = {
                kk: getattr(gc, kk, None) for kk in (
                    "do_sample", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
                    "max_new_tokens", "eos_token_id", "pad_token_id", "bos_token_id")
            }
        return lp

    model._get_logits_processor = glp_wrapper

    orig_gri = model.model.get_rope_index

    def gri_wrapper(*a, **k):
        log["rope_index_calls"] += 1
        cur["rope_index_calls"] = cur.get("rope_index_calls", 0) + 1
        return orig_gri(*a, **k)

    model.model.get_rope_index = gri_wrapper

    def vl_pre_hook(mod, a, k):  # Qwen2VLModel.forward
        ids = k.get("input_ids")
        cp = k.get("cache_position")
        cur.setdefault("forward_calls", []).append({
            "input_len": None if ids is None else int(ids.shape[1]),
            "cache_position": None if cp is None else [int(cp[0]), int(cp[-1])],
            "position_ids_passed": k.get("position_ids") is not None,
            "pixel_values_videos": summarize(k.get("pixel_values_videos")),
            "video_grid_thw": None if k.get("video_grid_thw") is None else k["video_grid_thw"].tolist(),
            "attention_mask": summarize(k.get("attention_mask")),
            "n_video_tokens_in_input": None if ids is None else int((ids == video_token_id).sum()),
            "_ids": None if ids is None else ids[0].tolist(),
        })

    def lm_pre_hook(mod, a, k):  # language model (text decoder) forward: the positions actually used
        pos = k.get("position_ids")
        calls = cur.get("forward_calls")
        if calls:
            calls[-1]["_pos"] = None if pos is None else pos[:, 0, :].clone()  # (3, L)
            calls[-1]["position_ids_shape"] = None if pos is None else list(pos.shape)

    model.model.register_forward_pre_hook(vl_pre_hook, with_kwargs=True)
    model.model.language_model.register_forward_pre_hook(lm_pre_hook, with_kwargs=True)

    # ---------------- drive live_cc like demo/cli.py ----------------
    settings = {
        "driver": "demo/cli.py style: for t in 0,1,2,...: state['video_timestamp']=t; "
                  f"for ... in infer.live_cc(message=query, state=state, max_pixels=384*28*28, repetition_penalty={args.repetition_penalty}, "
                  "streaming_eos_base_threshold=0.0, streaming_eos_threshold_step=0, do_sample=False); stop on state['video_end']",
        "do_sample": False,
        "max_new_tokens": 16,
        "repetition_penalty": args.repetition_penalty,
        "streaming_eos_base_threshold": 0.0,
        "streaming_eos_threshold_step": 0,
        "max_pixels": 384 * 28 * 28,
        "query_1": args.query,
        "query_2": args.query2,
        "query_change_turn": args.query_change_turn,
        "device": args.device,
        "torch_threads": args.threads,
        "model_dtype": str(model.dtype).replace("torch.", ""),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "pad_token_id_passed": model.config.eos_token_id,
        "generation_config_eos_token_id": eos_ids,
        "streaming_eos_token_id": int(infer.streaming_eos_token_id),
        "streaming_eos_token": tok.convert_ids_to_tokens(int(infer.streaming_eos_token_id)),
        "system_prompt_offset": infer.system_prompt_offset,
        "processor_classes": {"processor": type(processor).__name__, "tokenizer": type(tok).__name__,
                              "video_processor": type(processor.video_processor).__name__},
        "checkpoint_generation_config": model.generation_config.to_dict(),
    }
    if args.device != "cpu":
        deviations.append(f"device={args.device}")
    deviations.append(
        "device passed explicitly as 'cpu' (cli.py passes none; LiveCCDemoInfer would auto-detect cpu here anyway), "
        "so attn_implementation=None (sdpa) instead of flash_attention_2"
    )
    deviations.append("do_sample=False (greedy) instead of the live_cc default do_sample=True")
    deviations.append(
        f"query changed to {args.query2!r} from turn {args.query_change_turn} on (cli.py keeps one query); "
        "model path and video path are ours (cli.py hard-codes chenjoya/LiveCC-7B-Instruct and a demo video)"
    )

    state = {"video_path": str(video)}
    turns = []
    debug_turns = []
    debug_positions = {}
    ended = False
    for t in range(args.max_seconds + 1):
        state["video_timestamp"] = t
        query = args.query if len(turns) + 1 < args.query_change_turn else args.query2
        cur.clear()
        for (start_t, stop_t), response, state in infer.live_cc(
            message=query, state=state,
            max_pixels=384 * 28 * 28, repetition_penalty=args.repetition_penalty,
            streaming_eos_base_threshold=0.0, streaming_eos_threshold_step=0,
            do_sample=False,
        ):
            n = len(turns) + 1
            new_ids = cur["new_ids"]
            all_ids = cur["all_ids"]
            gen_kwargs = cur["generate_kwargs"]
            input_len = gen_kwargs["input_ids"]["tensor"][1]
            token_ids = all_ids[input_len:]
            # frames of this turn within the call's fetch
            nfr = cur["frames_shape_tchw"][0]
            c0 = call_clip["consumed"]
            call_clip["consumed"] = c0 + nfr
            vid_pos = [i for i, x in enumerate(new_ids) if x == video_token_id]
            head, tail = new_ids[: vid_pos[0]], new_ids[vid_pos[-1] + 1:]
            assert vid_pos == list(range(vid_pos[0], vid_pos[-1] + 1)), "video pads not contiguous"
            prompt_text = (
                tok.decode(head, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                + f"<|video_pad|>×{len(vid_pos)}"
                + tok.decode(tail, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            )
            m = TIME_RE.search(cur["processor_text"])
            last = token_ids[-1] if token_ids else None
            rec = {
                "turn": n,
                "video_time": t,
                "start": float(m.group(1)),
                "stop": float(m.group(2)),
                "yielded_start_stop": [float(start_t), float(stop_t)],
                "query_sent": cur.get("query_sent"),
                "prompt_text": prompt_text if n <= args.prompt_text_turns else None,
                "prompt_ids_head": head,
                "prompt_ids_tail": tail,
                "grid_timestamps": call_clip["grid_timestamps"][c0:c0 + nfr],
                "frame_indices": call_clip["idxs"][c0:c0 + nfr],
                "frame_pts": call_clip["pts"][c0:c0 + nfr],
                "frame_check": call_clip.pop("frame_check", None) if c0 == 0 else None,
                "frames_shape": cur["frames_shape_tchw"],
                "frames_layout": "TCHW uint8 (as fed to the processor)",
                "frames_sha256": cur["frames_sha256"],
                "frames_sha256_thwc": cur["frames_sha256_thwc"],
                "pixel_values_videos": cur.get("pixel_values_videos"),
                "pixel_values_check": cur.get("pixel_values_check") if n <= 3 else None,
                "video_grid_thw": cur.get("video_grid_thw"),
                "num_video_tokens": len(vid_pos),
                "new_input_len": len(new_ids),
                "past_len": cur["past_len_before"],
                "input_len": input_len,
                "token_ids": token_ids,
                "top1_margin": cur.get("margins"),
                "eos_logit_minus_top1": cur.get("eos_gap"),
                "ended_with": "eos" if last in eos_ids else ("cap" if len(token_ids) >= 16 else "other"),
                "text": response,
            }
            turns.append(rec)
            calls = cur.get("forward_calls", [])
            if n <= 3:
                dbg = {
                    "turn": n,
                    "processor_text": cur["processor_text"],
                    "generate_kwargs": gen_kwargs,
                    "logits_processors_in_order": cur.get("logits_processors"),
                    "effective_generation_config": cur.get("effective_generation_config"),
                    "past_len_before": cur["past_len_before"],
                    "past_len_after": cur["past_len_after"],
                    "sequences_len": cur["sequences_len"],
                    "rope_deltas_before": cur["rope_deltas_before"],
                    "rope_deltas_after": cur["rope_deltas_after"],
                    "get_rope_index_calls": cur.get("rope_index_calls", 0),
                    "forward_calls": [
                        {kk: vv for kk, vv in c.items() if not kk.startswith("_")}
                        | ({"position_ids_first": pos_cols(c["_pos"], range(min(4, c["_pos"].shape[1])))}
                           if c.get("_pos") is not None else {})
                        for c in calls[:4]
                    ] + ([{"...": f"{len(calls) - 4} more decode calls"}] if len(calls) > 4 else []),
                }
                debug_turns.append(dbg)
                if args.verbose:
                    print(json.dumps(dbg, indent=1, default=str), file=sys.stderr)
            if n <= 2 and calls and calls[0].get("_pos") is not None:
                pos = calls[0]["_pos"]
                ids = calls[0]["_ids"]
                L = pos.shape[1]
                vp = [i for i, x in enumerate(ids) if x == video_token_id]
                dp = {
                    "prefill_input_len": L,
                    "cache_position": calls[0]["cache_position"],
                    "rope_delta": cur["rope_deltas_after"],
                    "first8": pos_cols(pos, range(min(8, L))),
                    "first8_ids": ids[:8],
                    "last8": pos_cols(pos, range(max(0, L - 8), L)),
                    "last8_ids": ids[-8:],
                    "video_token_span": [vp[0], vp[-1]] if vp else None,
                    "video_first8": pos_cols(pos, vp[:8]),
                    "video_last8": pos_cols(pos, vp[-8:]),
                    "after_video_first4": pos_cols(pos, range(vp[-1] + 1, min(L, vp[-1] + 5))) if vp else None,
                    "decode_steps": [
                        {"cache_position": c["cache_position"], "position_ids": pos_cols(c["_pos"], range(c["_pos"].shape[1]))}
                        for c in calls[1:4] if c.get("_pos") is not None
                    ],
                    "note": "columns are [t, h, w] rows of the position_ids (3 x L) the text decoder received; "
                            "indices are relative to this call's input (turn 2: the new tokens only, cache_position gives "
                            "their absolute index)",
                }
                debug_positions[f"turn{n}"] = dp
            print(f"turn {n:2d} t={t:3d} {rec['start']:.1f}-{rec['stop']:.1f}s in={input_len} "
                  f"vid={len(vid_pos)} new={len(token_ids)} {rec['ended_with']}: {response!r}", file=sys.stderr, flush=True)
            cur.clear()
        if state.get("video_end", False):
            ended = True
            break

    n_eos = sum(r["ended_with"] == "eos" for r in turns)
    n_cap = sum(r["ended_with"] == "cap" for r in turns)
    ckpt_hash, ckpt_files = checkpoint_hash(ckpt)
    vp = state.get("video_pts")
    result = {
        "format": "livecc-reference-golden/1",
        "checkpoint": {"name": args.name or ckpt.name, "sha256": ckpt_hash, "hash_spec":
                       "sha256 over '<relpath>\\0<sha256 of file>\\n' for all files sorted by relpath", "files": ckpt_files},
        "video": {"name": video.name, "sha256": sha256_file(video),
                  "decoder": "decord.VideoReader (livecc_utils.get_smart_resized_video_reader)",
                  "num_frames": None if vp is None else int(len(vp)),
                  "first_pts": None if vp is None else [float(x) for x in vp[:4]],
                  "last_pts": None if vp is None else float(vp[-1]),
                  "resized_hw": call_clip.get("resized_hw")},
        "versions": {
            "python": platform.python_version(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "livecc-utils": version("livecc-utils"),
            "qwen-vl-utils": version("qwen-vl-utils"),
            "decord": version("decord"),
            "numpy": np.__version__,
            "livecc_commit": livecc_commit(repo, args.livecc_commit),
            "demo_infer_py_sha256": sha256_file(repo / "demo" / "infer.py"),
        },
        "generation": settings,
        "deviations": deviations,
        "liger_stub_calls": liger_calls,
        "summary": {"turns": len(turns), "eos": n_eos, "cap": n_cap, "video_end_reached": ended,
                    "get_rope_index_calls_total": log["rope_index_calls"]},
        "debug_positions": debug_positions,
        "debug_turns": debug_turns,
        "turns": turns,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}: {len(turns)} turns, {n_eos} eos, {n_cap} cap, {os.path.getsize(args.out)} bytes", file=sys.stderr)
    if len(turns) < args.turns:
        print(f"ERROR: only {len(turns)} turns (< {args.turns})", file=sys.stderr)
        sys.exit(1)
    if n_eos == 0 or n_cap == 0:
        print("WARNING: turns do not exercise both EOS and cap endings", file=sys.stderr)


if __name__ == "__main__":
    main()
