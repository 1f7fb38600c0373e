#!/usr/bin/env python3
"""Time the ORIGINAL LiveCC streaming loop on a LiveCC-7B-shaped Qwen2-VL with random weights.

This is the reference side of the GPU benchmark (our engine's side is ``scripts/bench_gpu.py``). It imports
``LiveCCDemoInfer`` from ``<livecc-repo>/demo/infer.py`` (a work tree of showlab/livecc; nothing of it is copied
here) and ``livecc_utils`` (PyPI ``livecc-utils==0.0.2``), and drives ``live_cc`` the way ``demo/cli.py`` does::

    for t in 0..N: state['video_timestamp'] = t; for ... in infer.live_cc(message=query, state=state,
        max_pixels=384*28*28, repetition_penalty=1.05, streaming_eos_base_threshold=0.0,
        streaming_eos_threshold_step=0)

(do_sample is left at live_cc's default, True; temperature / top-k / top-p come from the generation_config.json of
the --tokenizer folder, as they would from the checkpoint's). Nothing of our own ``pipeline`` package is imported:
the process runs under transformers 4.57.6, which the reference needs.

What is replaced at run time (also written to the JSON under "deviations"):
  * weights: ``demo.infer.Qwen2VLForConditionalGeneration`` (the name infer.py looks up) is swapped for a loader
    whose ``from_pretrained`` builds a Qwen2-VL with LiveCC-7B's architecture and random bf16 weights directly on
    the device (weight init skipped, then normal(0, 0.02) per matrix, norms 1, biases 0), plus the
    generation_config.json of the --tokenizer folder. ``LiveCCDemoInfer.__init__`` itself runs unmodified with
    model_path = the --tokenizer folder, so the processor, the streaming-EOS token, the system-prompt offset and
    the prepare_inputs_for_generation patch are the reference's own.
  * attention: infer.py asks for flash_attention_2 on cuda; flash-attn is not installed, so sdpa is used.
  * decord: a stub module in sys.modules whose ``VideoReader`` synthesises 1080p RGB frames (30 fps, moving
    gradients and a moving square, generated on demand) for a path ``synthetic:WxH@FPS:Ns``. livecc_utils'
    ``get_smart_resized_video_reader`` and ``get_smart_resized_clip`` run unmodified on it (smart_resize and the
    torchvision bicubic+antialias resize to 392x728 are the reference's own CPU cost; frame *decoding* is not:
    its place is taken by synthesis, timed separately as synth_ms).
  * liger: ``--liger on`` lets infer.py import and apply the real ``apply_liger_kernel_to_qwen2_vl`` (GPU only);
    ``--liger off`` installs a no-op stub module (the reference_parity.py approach).

Device usage. Carried (ignored) folders: ``.whl/`` = transformers-4.57.6, tokenizers-0.22.2, huggingface_hub-0.36.2,
livecc_utils-0.0.2, qwen_vl_utils-0.0.11, liger_kernel-0.8.4 wheels (liger 0.8.5+ refuses transformers < 5);
``.bench/tokenizer/`` = the tiny 'qwen' checkpoint without model.safetensors (tokenizer.json may be left out too:
use_fast=False loads the slow tokenizer from vocab.json + merges.txt); ``.bench/livecc/demo/infer.py`` plus
``.bench/livecc/.livecc_commit``. Only the reference process gets PYTHONPATH=/tmp/ref457::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ref457 .whl/*.whl
    PYTHONPATH=/tmp/ref457 python3 scripts/bench_reference.py --livecc-repo .bench/livecc \
        --tokenizer .bench/tokenizer --seconds 100 --liger off --out $OUT/reference.json

CPU dry run::

    /tmp/refenv/bin/python scripts/bench_reference.py --livecc-repo /tmp/livecc --tokenizer <tiny qwen ckpt> \
        --shape tiny --liger off --seconds 12 --out /tmp/ref_tiny.json
    /tmp/refenv/bin/python scripts/bench_reference.py --construct-only --shape 7b
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import importlib.machinery
import importlib.metadata as md
import json
import math
import platform
import re
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_parity's helpers, shared

QUERY = "Please describe the video."
MAX_PIXELS = 384 * 28 * 28

# chenjoya/LiveCC-7B-Instruct's config.json (a Qwen2-VL-7B): flat text keys + vision_config, as on the Hub.
_COMMON = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 152064,
}
SHAPES = {
    "7b": {
        **_COMMON,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_window_layers": 28,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {
            "depth": 32, "embed_dim": 1280, "hidden_act": "quick_gelu", "hidden_size": 3584, "in_channels": 3,
            "in_chans": 3, "mlp_ratio": 4, "model_type": "qwen2_vl", "num_heads": 16, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
        },
    },
    # the sizes of the tiny "qwen" test checkpoint (pipeline/fixtures/tiny.py), for a CPU dry run
    "tiny": {
        **_COMMON,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_window_layers": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "vision_config": {
            "depth": 2, "embed_dim": 64, "hidden_act": "quick_gelu", "hidden_size": 128, "in_channels": 3,
            "in_chans": 3, "mlp_ratio": 4, "model_type": "qwen2_vl", "num_heads": 4, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
        },
    },
}
# what a 7b-shaped build must have, checked by --construct-only (8.29 B parameters per docs/gpu-baseline)
EXPECT_7B = {"params_total": 8_291_375_616}


def version(dist: str):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def sha256_file(p: Path):
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
        return None


def livecc_commit(repo: Path, given: str | None):
    from reference_parity import livecc_commit as impl  # the CPU parity run's helper

    return impl(repo, given)


# --------------------------------------------------------------------------------------------------------------
# synthetic video through a decord stub
# --------------------------------------------------------------------------------------------------------------
SYNTH_RE = re.compile(r"^synthetic:(\d+)x(\d+)@(\d+(?:\.\d+)?):(\d+(?:\.\d+)?)s$")
SYNTH_STATS = {"frames": 0, "seconds": 0.0}


def synthetic_path(width: int, height: int, fps: float, seconds: float) -> str:
    return f"synthetic:{width}x{height}@{fps:g}:{seconds:g}s"


class _NDArray:
    """What decord returns: an object with .asnumpy() (and .shape)."""

    def __init__(self, a):
        self._a = a
        self.shape = a.shape

    def asnumpy(self):
        return self._a


class SyntheticVideoReader:
    """Stands in for decord.VideoReader: the members livecc_utils 0.0.2 uses (``__len__``, ``next()``,
    ``get_frame_timestamp``, ``_frame_pts``, ``get_batch(idxs).asnumpy()``, ``get_avg_fps``).

    Frame i (H x W x 3 uint8, RGB) is computed on demand: red = horizontal gradient moving right 4 levels/frame,
    green = vertical gradient moving 2 levels/frame, blue = 64 plus a 200x200 white-ish square moving across.
    ``_frame_pts[i] = [i/fps, (i+1)/fps]`` (decord's column 1 is the frame's END time; live_cc reads column 1)."""

    def __init__(self, uri, ctx=None, width=-1, height=-1, num_threads=0, fault_tol=-1):
        import numpy as np

        m = SYNTH_RE.match(str(uri))
        if not m:
            raise RuntimeError(f"decord stub: only synthetic:WxH@FPS:Ns paths are supported, got {uri!r}")
        self.W, self.H, self.fps, secs = int(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4))
        self.n = int(round(secs * self.fps))
        i = np.arange(self.n, dtype=np.float64)
        self._frame_pts = np.stack([i / self.fps, (i + 1) / self.fps], axis=1)
        self._xr = (np.arange(self.W) * 256 // self.W).astype(np.uint8)
        self._yr = (np.arange(self.H) * 256 // self.H).astype(np.uint8)
        self._pos = 0

    def __len__(self):
        return self.n

    def get_avg_fps(self):
        return self.fps

    def get_frame_timestamp(self, idx):
        return self._frame_pts[idx]

    def _frame(self, k: int):
        import numpy as np

        t0 = time.perf_counter()
        f = np.empty((self.H, self.W, 3), dtype=np.uint8)
        f[:, :, 0] = (self._xr + np.uint8((4 * k) & 255))[None, :]
        f[:, :, 1] = (self._yr + np.uint8((2 * k) & 255))[:, None]
        f[:, :, 2] = 64
        s = min(200, self.H, self.W)
        x0 = (7 * k) % max(1, self.W - s)
        y0 = (3 * k) % max(1, self.H - s)
        f[y0:y0 + s, x0:x0 + s, :] = 230
        SYNTH_STATS["frames"] += 1
        SYNTH_STATS["seconds"] += time.perf_counter() - t0
        return f

    def next(self):
        if self._pos >= self.n:
            raise StopIteration
        self._pos += 1
        return _NDArray(self._frame(self._pos - 1))

    def get_batch(self, idxs):
        import numpy as np

        idxs = [int(i) for i in idxs]
        if not idxs:
            return _NDArray(np.empty((0, self.H, self.W, 3), dtype=np.uint8))
        return _NDArray(np.stack([self._frame(k) for k in idxs]))


def install_decord_stub(deviations: list):
    mod = types.ModuleType("decord")
    mod.__spec__ = importlib.machinery.ModuleSpec("decord", None)
    mod.__version__ = "0.0.0+synthetic-stub"
    mod.VideoReader = SyntheticVideoReader
    mod.cpu = lambda *a, **k: None
    mod.gpu = lambda *a, **k: None
    mod.bridge = types.SimpleNamespace(set_bridge=lambda *a, **k: None)
    sys.modules["decord"] = mod
    deviations.append(
        "decord replaced by a stub module whose VideoReader synthesises RGB frames on demand (moving gradients + a "
        "moving square) for a 'synthetic:WxH@FPS:Ns' path; livecc_utils' get_smart_resized_video_reader / "
        "get_smart_resized_clip (smart_resize, torchvision bicubic antialias resize) run unmodified on it. Frame "
        "decoding cost is replaced by synthesis cost (reported separately as synth_ms)."
    )


def install_liger_stub(deviations: list):
    """demo/infer.py imports and calls apply_liger_kernel_to_qwen2_vl() at import; --liger off makes it a no-op
    (the same stub the CPU parity run uses)."""
    from reference_parity import install_liger_stub as stub

    return stub(deviations)


# --------------------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------------------
def build_model(shape: str, device: str, dtype, attn: str, seed: int = 0, init_std: float = 0.02):
    """Qwen2-VL with the given shape, random weights, built directly on `device` (weight init skipped, then
    normal(0, init_std) per matrix / embedding, norms 1, biases 0, using a generator on that device)."""
    import torch
    from transformers import Qwen2VLConfig
    from transformers.modeling_utils import no_init_weights
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    # modeling_qwen2_vl.Qwen2VLForConditionalGeneration: liger (when on) patches that module's globals, and the
    # class picks the patched modules up at construction time.
    cls = modeling_qwen2_vl.Qwen2VLForConditionalGeneration
    cfg = Qwen2VLConfig(**copy.deepcopy(SHAPES[shape]))  # the config edits rope_scaling in place
    t0 = time.perf_counter()
    with torch.device(device), no_init_weights():
        model = cls._from_config(cfg, dtype=dtype, attn_implementation=attn)
    t_alloc = time.perf_counter() - t0
    t1 = time.perf_counter()
    if device != "meta":
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.zero_()
                elif p.dim() == 1:  # RMSNorm / LayerNorm weights
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, init_std, generator=g)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    t_init = time.perf_counter() - t1
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    n_vis = sum(p.numel() for p in model.model.visual.parameters())
    info = {
        "shape": shape,
        "params_total": int(n_params),
        "params_visual": int(n_vis),
        "params_llm": int(n_params - n_vis),
        "dtype": str(dtype).replace("torch.", ""),
        "device": device,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "build_s": round(t_alloc, 3),
        "init_s": round(t_init, 3),
        "init": f"no_init_weights + normal(0,{init_std}) on matrices/embeddings, 1 on norm weights, 0 on biases, "
                f"torch.Generator({device}) seed {seed}",
        "module_classes": sorted({type(m).__name__ for m in model.modules()
                                  if "Norm" in type(m).__name__ or "MLP" in type(m).__name__}),
        "config": {k: SHAPES[shape][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                  "rope_scaling", "rope_theta", "max_position_embeddings")}
        | {"vision_config": SHAPES[shape]["vision_config"]},
    }
    return model, info


# --------------------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------------------
def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats(xs):
    if not xs:
        return None
    return {"n": len(xs), "mean": round(sum(xs) / len(xs), 3), "p50": round(pct(xs, 50), 3),
            "p95": round(pct(xs, 95), 3), "p99": round(pct(xs, 99), 3), "min": round(min(xs), 3),
            "max": round(max(xs), 3)}


# --------------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--livecc-repo", type=Path, help="work tree of showlab/livecc (demo/infer.py is imported)")
    ap.add_argument("--livecc-commit", default=None, help="commit of that work tree (default: git rev-parse or DIR/.livecc_commit)")
    ap.add_argument("--tokenizer", type=Path, help="folder with tokenizer, processor/preprocessor config, chat "
                    "template and generation_config.json (the tiny 'qwen' checkpoint's non-weight files)")
    ap.add_argument("--seconds", type=int, default=100, help="video length N; the driver calls live_cc for t=0..N")
    ap.add_argument("--liger", choices=["on", "off"], default="off")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu (LiveCCDemoInfer's own choice)")
    ap.add_argument("--attn", default="sdpa", help="attention used instead of flash_attention_2 (default sdpa)")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--query", default=QUERY)
    ap.add_argument("--greedy", action="store_true", help="pass do_sample=False (default: live_cc's do_sample=True)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--phase-timing", action="store_true",
                    help="also time prefill vs decode forwards (adds a cuda synchronize around each forward)")
    ap.add_argument("--construct-only", action="store_true",
                    help="build the model on the meta device, print its size and exit (no tokenizer/livecc needed)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    deviations: list[str] = []

    import numpy as np
    import torch
    import transformers  # before any stub: transformers probes liger_kernel's spec at import

    if args.threads:
        torch.set_num_threads(args.threads)

    if args.construct_only:
        model, info = build_model(args.shape, "meta", torch.bfloat16, args.attn)
        print(json.dumps(info, indent=1))
        if args.shape == "7b" and info["params_total"] != EXPECT_7B["params_total"]:
            print(f"ERROR: 7b parameter count {info['params_total']} != {EXPECT_7B['params_total']}", file=sys.stderr)
            sys.exit(1)
        print(f"OK: {args.shape} Qwen2-VL constructs on meta, {info['params_total'] / 1e9:.3f} B parameters "
              f"(LLM {info['params_llm'] / 1e9:.3f} B, vision {info['params_visual'] / 1e9:.3f} B), "
              f"transformers {transformers.__version__}", file=sys.stderr)
        return

    if args.livecc_repo is None or args.tokenizer is None or args.out is None:
        ap.error("--livecc-repo, --tokenizer and --out are required (except with --construct-only)")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(args.seed)

    install_decord_stub(deviations)
    if args.liger == "off":
        liger_calls = install_liger_stub(deviations)
    else:
        if not cuda:
            print("WARNING: --liger on without a GPU: Liger's Triton kernels will fail", file=sys.stderr)
        liger_calls = None

    repo = args.livecc_repo.resolve()
    sys.path.insert(0, str(repo))  # demo/cli.py runs from the repo root: `from demo.infer import LiveCCDemoInfer`
    t_imp = time.perf_counter()
    import demo.infer as infer_mod  # noqa: E402  (applies liger at import when --liger on)
    from demo.infer import LiveCCDemoInfer  # noqa: E402
    import livecc_utils  # noqa: E402,F401
    t_imp = time.perf_counter() - t_imp

    tokdir = args.tokenizer.resolve()

    # ---------------- weights: replace the name infer.py calls from_pretrained on ----------------
    load_info: dict = {}

    class RandomWeightsQwen2VL:
        """demo.infer.Qwen2VLForConditionalGeneration during __init__: from_pretrained builds random weights."""

        @staticmethod
        def from_pretrained(model_path, **kwargs):
            from transformers import GenerationConfig

            load_info["from_pretrained_args"] = {"model_path": str(model_path), **{k: repr(v) for k, v in kwargs.items()}}
            req_attn = kwargs.get("attn_implementation")
            model, info = build_model(args.shape, device, torch.bfloat16, args.attn, seed=args.seed)
            load_info["model"] = info
            gpath = Path(model_path) / "generation_config.json"
            if gpath.exists():
                model.generation_config = GenerationConfig.from_pretrained(str(model_path))
            load_info["requested_attn_implementation"] = req_attn
            return model

    orig_cls = infer_mod.Qwen2VLForConditionalGeneration
    infer_mod.Qwen2VLForConditionalGeneration = RandomWeightsQwen2VL

    # ---------------- timing wrappers (no values changed) ----------------
    cur: dict = {}

    orig_clip = infer_mod.get_smart_resized_clip

    @functools.wraps(orig_clip)
    def clip_wrapper(*a, **k):
        s0 = SYNTH_STATS["seconds"]
        t0 = time.perf_counter()
        out = orig_clip(*a, **k)
        cur["frames_ms"] = cur.get("frames_ms", 0.0) + (time.perf_counter() - t0) * 1e3
        cur["synth_ms"] = cur.get("synth_ms", 0.0) + (SYNTH_STATS["seconds"] - s0) * 1e3
        cur["clip_frames"] = int(len(out[2]))
        return out

    infer_mod.get_smart_resized_clip = clip_wrapper

    t_init = time.perf_counter()
    infer = LiveCCDemoInfer(model_path=str(tokdir), device=None if args.device is None else device)
    sync()
    t_init = time.perf_counter() - t_init
    infer_mod.Qwen2VLForConditionalGeneration = orig_cls
    model, processor = infer.model, infer.processor
    if load_info.get("requested_attn_implementation") == "flash_attention_2":
        deviations.append(f"attn_implementation: infer.py requests 'flash_attention_2' on {device}; flash-attn is not "
                          f"installed, so '{args.attn}' is used")
    deviations.append(
        "weights: demo.infer.Qwen2VLForConditionalGeneration replaced during LiveCCDemoInfer.__init__ by a loader "
        f"whose from_pretrained builds a {args.shape}-shaped Qwen2-VL with random bf16 weights on {device} and the "
        "generation_config.json of the --tokenizer folder; __init__ otherwise runs unmodified with "
        "model_path=<tokenizer folder> (processor, streaming EOS id, system prompt offset, prepare_inputs patch are "
        "the reference's)"
    )

    # A random model samples ids in the vocabulary padding (151,657..152,063), which the slow tokenizer cannot
    # decode (a real checkpoint never emits them): decode drops them. Costs nothing measurable.
    n_tok = len(processor.tokenizer)
    orig_decode = processor.decode

    def decode_known(ids, *a, **k):
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids) if int(i) < n_tok]
        return orig_decode(ids, *a, **k)

    processor.decode = decode_known
    deviations.append("decode: ids past the tokenizer (vocabulary padding, sampled by random weights) are dropped")

    proc_cls = type(processor)
    orig_apply = proc_cls.apply_chat_template
    orig_call = proc_cls.__call__

    def apply_wrapper(self, *a, **k):
        t0 = time.perf_counter()
        out = orig_apply(self, *a, **k)
        cur["template_ms"] = cur.get("template_ms", 0.0) + (time.perf_counter() - t0) * 1e3
        return out

    def call_wrapper(self, *a, **k):
        t0 = time.perf_counter()
        out = orig_call(self, *a, **k)
        cur["processor_ms"] = cur.get("processor_ms", 0.0) + (time.perf_counter() - t0) * 1e3
        cur["new_input_len"] = int(out["input_ids"].shape[1])
        if "video_grid_thw" in out:
            g = out["video_grid_thw"]
            cur["video_tokens"] = int(g.prod(-1).sum()) // 4
            cur["video_grid_thw"] = g.tolist()
        return out

    proc_cls.apply_chat_template = apply_wrapper
    proc_cls.__call__ = call_wrapper

    orig_generate = model.generate

    def generate_wrapper(*a, **k):
        pkv = k.get("past_key_values")
        cur["past_len"] = int(pkv.get_seq_length()) if pkv is not None else 0
        cur["input_len"] = int(k["input_ids"].shape[1])
        cur["forwards"] = []
        sync()
        t0 = time.perf_counter()
        out = orig_generate(*a, **k)
        sync()
        cur["generate_ms"] = (time.perf_counter() - t0) * 1e3
        cur["gen_tokens"] = int(out.sequences.shape[1]) - cur["input_len"]
        cur["last_token"] = int(out.sequences[0, -1])
        cur["context_after"] = int(out.past_key_values.get_seq_length())
        return out

    model.generate = generate_wrapper

    if args.phase_timing:
        def pre(mod, a, k):
            sync()
            cur["_fw0"] = time.perf_counter()

        def post(mod, a, k, out):
            sync()
            cur.setdefault("forwards", []).append((time.perf_counter() - cur["_fw0"]) * 1e3)

        model.register_forward_pre_hook(pre, with_kwargs=True)
        model.register_forward_hook(post, with_kwargs=True)

    gc = model.generation_config
    eos_ids = gc.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])

    # ---------------- drive live_cc like demo/cli.py ----------------
    video_uri = synthetic_path(args.width, args.height, args.fps, args.seconds)
    state = {"video_path": video_uri}
    live_kwargs = dict(max_pixels=MAX_PIXELS, repetition_penalty=1.05,
                       streaming_eos_base_threshold=0.0, streaming_eos_threshold_step=0)
    if args.greedy:
        live_kwargs["do_sample"] = False
        deviations.append("do_sample=False (--greedy) instead of live_cc's default do_sample=True")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    mem_start = torch.cuda.memory_allocated() if cuda else None

    turns = []
    calls = []
    t_run = time.perf_counter()
    for t in range(args.seconds + 1):
        state["video_timestamp"] = t
        gen = infer.live_cc(message=args.query, state=state, **live_kwargs)
        call_t0 = time.perf_counter()
        n_in_call = 0
        while True:
            cur.clear()
            sync()
            a0 = time.perf_counter()
            try:
                (start_t, stop_t), response, state = next(gen)
            except StopIteration:
                break
            sync()
            wall = (time.perf_counter() - a0) * 1e3
            n_in_call += 1
            rec = {
                "turn": len(turns) + 1,
                "video_time": t,
                "start": round(float(start_t), 3),
                "stop": round(float(stop_t), 3),
                "wall_ms": round(wall, 3),
                "frames_ms": round(cur.get("frames_ms", 0.0), 3),
                "synth_ms": round(cur.get("synth_ms", 0.0), 3),
                "template_ms": round(cur.get("template_ms", 0.0), 3),
                "processor_ms": round(cur.get("processor_ms", 0.0), 3),
                "generate_ms": round(cur["generate_ms"], 3),
                "clip_frames": cur.get("clip_frames"),
                "video_tokens": cur.get("video_tokens"),
                "new_input_len": cur.get("new_input_len"),
                "past_len": cur["past_len"],
                "input_len": cur["input_len"],
                "gen_tokens": cur["gen_tokens"],
                "ended_with": "eos" if cur["last_token"] in eos_ids else ("cap" if cur["gen_tokens"] >= 16 else "other"),
                "context_after": cur["context_after"],
                "mem_allocated_mib": round(torch.cuda.memory_allocated() / 2**20, 1) if cuda else None,
                "max_mem_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                "text": response,
            }
            rec["other_ms"] = round(rec["wall_ms"] - rec["frames_ms"] - rec["template_ms"] - rec["processor_ms"]
                                    - rec["generate_ms"], 3)
            rec["ms_per_token"] = round(rec["generate_ms"] / max(1, rec["gen_tokens"]), 3)
            rec["wall_ms_excl_synth"] = round(rec["wall_ms"] - rec["synth_ms"], 3)
            fw = cur.get("forwards") or []
            if args.phase_timing and fw:
                rec["prefill_ms"] = round(fw[0], 3)
                rec["decode_step_ms"] = round(sum(fw[1:]) / max(1, len(fw) - 1), 3) if len(fw) > 1 else None
                rec["forwards"] = len(fw)
            turns.append(rec)
            print(f"turn {rec['turn']:3d} t={t:4d} {rec['start']:.1f}-{rec['stop']:.1f}s ctx={rec['context_after']:6d} "
                  f"wall={rec['wall_ms']:8.1f} gen={rec['generate_ms']:8.1f} proc={rec['processor_ms']:6.1f} "
                  f"frames={rec['frames_ms']:6.1f} tok={rec['gen_tokens']:2d} {rec['ended_with']}",
                  file=sys.stderr, flush=True)
        calls.append({"t": t, "turns": n_in_call, "ms": round((time.perf_counter() - call_t0) * 1e3, 3)})
        if state.get("video_end", False):
            break
    run_s = time.perf_counter() - t_run

    # ---------------- summary ----------------
    steady = turns[1:]  # turn 1 is the 3-second opener (6 frames, system prompt, first CUDA/cuBLAS calls)

    def col(rs, key):
        return [r[key] for r in rs if r.get(key) is not None]

    tot_tok = sum(col(turns, "gen_tokens"))
    tot_gen_ms = sum(col(turns, "generate_ms"))
    tot_wall_ms = sum(col(turns, "wall_ms"))
    st_tok = sum(col(steady, "gen_tokens"))
    st_gen_ms = sum(col(steady, "generate_ms"))
    st_wall_ms = sum(col(steady, "wall_ms"))
    summary = {
        "turns": len(turns),
        "eos_turns": sum(r["ended_with"] == "eos" for r in turns),
        "cap_turns": sum(r["ended_with"] == "cap" for r in turns),
        "turn1_opener": {k: turns[0][k] for k in ("wall_ms", "generate_ms", "processor_ms", "frames_ms",
                                                  "input_len", "gen_tokens")} if turns else None,
        "steady_turns_2_on": {
            "wall_ms": stats(col(steady, "wall_ms")),
            "wall_ms_excl_synth": stats(col(steady, "wall_ms_excl_synth")),
            "generate_ms": stats(col(steady, "generate_ms")),
            "processor_ms": stats(col(steady, "processor_ms")),
            "template_ms": stats(col(steady, "template_ms")),
            "frames_ms": stats(col(steady, "frames_ms")),
            "synth_ms": stats(col(steady, "synth_ms")),
            "other_ms": stats(col(steady, "other_ms")),
            "ms_per_token": stats(col(steady, "ms_per_token")),
            "prefill_ms": stats(col(steady, "prefill_ms")),
            "decode_step_ms": stats(col(steady, "decode_step_ms")),
            "ms_per_generated_token_total": round(st_gen_ms / st_tok, 3) if st_tok else None,
            "tokens_per_s_generate": round(st_tok / (st_gen_ms / 1e3), 3) if st_gen_ms else None,
            "tokens_per_s_wall": round(st_tok / (st_wall_ms / 1e3), 3) if st_wall_ms else None,
            "generate_share_of_wall": round(st_gen_ms / st_wall_ms, 4) if st_wall_ms else None,
            "realtime_factor_p50": round(pct(col(steady, "wall_ms"), 50) / 1e3, 4) if steady else None,
        },
        "all_turns": {
            "wall_ms": stats(col(turns, "wall_ms")),
            "generate_ms": stats(col(turns, "generate_ms")),
            "ms_per_generated_token_total": round(tot_gen_ms / tot_tok, 3) if tot_tok else None,
            "tokens_per_s_generate": round(tot_tok / (tot_gen_ms / 1e3), 3) if tot_gen_ms else None,
            "tokens_per_s_wall": round(tot_tok / (tot_wall_ms / 1e3), 3) if tot_wall_ms else None,
            "generated_tokens": tot_tok,
        },
        "context_at_end": turns[-1]["context_after"] if turns else None,
        "first_turn_past_32k": next((r["turn"] for r in turns if r["context_after"] > 32768), None),
        "peak_mem_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "mem_allocated_start_mib": round(mem_start / 2**20, 1) if cuda else None,
        "mem_allocated_end_mib": round(torch.cuda.memory_allocated() / 2**20, 1) if cuda else None,
        "run_s": round(run_s, 3),
        "init_s": round(t_init, 3),
        "import_s": round(t_imp, 3),
        "synthetic_frames": SYNTH_STATS["frames"],
    }
    gpu = None
    if cuda:
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "total_mem_mib": round(p.total_memory / 2**20), "capability": list(torch.cuda.get_device_capability(0))}
    result = {
        "format": "livecc-reference-bench/1",
        "what": "original LiveCC live_cc loop (demo/infer.py) driven like demo/cli.py, random-weight model",
        "settings": {
            "seconds": args.seconds, "shape": args.shape, "liger": args.liger, "device": device, "attn": args.attn,
            "video": {"uri": video_uri, "width": args.width, "height": args.height, "fps": args.fps},
            "query": args.query, "live_cc_kwargs": live_kwargs, "do_sample": not args.greedy,
            "max_new_tokens": 16, "seed": args.seed, "torch_threads": torch.get_num_threads(),
            "phase_timing": args.phase_timing,
            "generation_config": {k: getattr(gc, k, None) for k in ("do_sample", "temperature", "top_k", "top_p",
                                                                    "repetition_penalty", "eos_token_id", "pad_token_id")},
            "streaming_eos_token_id": int(infer.streaming_eos_token_id),
            "system_prompt_offset": infer.system_prompt_offset,
            "processor_classes": {"processor": type(processor).__name__, "tokenizer": type(processor.tokenizer).__name__,
                                  "video_processor": type(processor.video_processor).__name__},
            "tokenizer_dir": str(tokdir),
        },
        "model": load_info.get("model"),
        "from_pretrained_call": load_info.get("from_pretrained_args"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "transformers_file": transformers.__file__,
            "tokenizers": version("tokenizers"),
            "huggingface_hub": version("huggingface-hub"),
            "accelerate": version("accelerate"),
            "torchvision": version("torchvision"),
            "numpy": np.__version__,
            "livecc-utils": version("livecc-utils"),
            "qwen-vl-utils": version("qwen-vl-utils"),
            "liger-kernel": version("liger-kernel") if args.liger == "on" else "stub (off)",
            "triton": version("triton"),
            "livecc_commit": livecc_commit(repo, args.livecc_commit),
            "demo_infer_py_sha256": sha256_file(repo / "demo" / "infer.py"),
            "gpu": gpu,
        },
        "deviations": deviations,
        "liger_stub_calls": liger_calls,
        "summary": summary,
        "calls": calls,
        "turns": turns,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")

    # ---------------- table ----------------
    S = summary["steady_turns_2_on"]

    def fmt(s, key="p50"):
        return "-" if not s else f"{s[key]:.1f}"

    print(f"\nreference live_cc, {args.shape}, liger {args.liger}, {device}"
          f"{' ' + gpu['name'] if gpu else ''}, transformers {transformers.__version__}, {len(turns)} turns "
          f"over {args.seconds} s of {args.width}x{args.height}@{args.fps:g} video")
    print(f"{'per turn, turns 2..':28s} {'p50':>9s} {'p95':>9s} {'p99':>9s} {'mean':>9s}")
    for name, key in (("wall ms", "wall_ms"), ("wall ms excl. synthesis", "wall_ms_excl_synth"),
                      ("generate() ms", "generate_ms"), ("processor ms", "processor_ms"),
                      ("chat template ms", "template_ms"), ("frames+resize ms", "frames_ms"),
                      ("other ms", "other_ms"), ("generate ms / token", "ms_per_token"),
                      ("prefill forward ms", "prefill_ms"), ("decode step ms", "decode_step_ms")):
        s = S.get(key)
        if s:
            print(f"{name:28s} {fmt(s, 'p50'):>9s} {fmt(s, 'p95'):>9s} {fmt(s, 'p99'):>9s} {fmt(s, 'mean'):>9s}")
    t1 = summary["turn1_opener"]
    if t1:
        print(f"turn 1 (opener): wall {t1['wall_ms']:.1f} ms, generate {t1['generate_ms']:.1f} ms, "
              f"input {t1['input_len']} tokens")
    print(f"tokens/s: generate {S['tokens_per_s_generate']}, wall {S['tokens_per_s_wall']}; "
          f"{S['ms_per_generated_token_total']} ms per generated token; generate share {S['generate_share_of_wall']}")
    print(f"context at end {summary['context_at_end']} (past 32k at turn {summary['first_turn_past_32k']}); "
          f"eos {summary['eos_turns']} cap {summary['cap_turns']}; peak mem "
          f"{summary['peak_mem_allocated_mib']} MiB (start {summary['mem_allocated_start_mib']}, end "
          f"{summary['mem_allocated_end_mib']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
