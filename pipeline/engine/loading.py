"""Loading LiveCC (or any Qwen2-VL checkpoint) from the Hugging Face Hub or a local folder."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelLoadError  # noqa: F401  (re-exported)
from . import quantize as quantization
from .vision import PatchSpec

log = logging.getLogger(__name__)

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
SILENCE_TEXT = " ..."  # LiveCC's streaming EOS: "nothing new to say"



@dataclass
class LoadedModel:
    hf: torch.nn.Module
    tokenizer: object
    patches: PatchSpec
    stop_ids: tuple[int, ...]
    silence_id: int
    sampling: dict = field(default_factory=dict)  # temperature / top_k / top_p from generation_config
    name: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    attention: str = "sdpa"
    liger: bool = False
    quantize: str = "none"  # the language model's weights: none | int8 | int4 | fp8 (quantize.py)
    weight_bytes: int = 0  # device memory held by all the weights (quantize.weight_bytes)

    @property
    def visual(self):
        inner = self.hf.model
        return getattr(inner, "visual", None) or self.hf.visual

    @property
    def video_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids("<|video_pad|>")


def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r} (use auto, bfloat16, float16 or float32)") from None


def _check_local_folder(path: Path) -> None:
    """Raise ``ModelLoadError`` (one line) unless ``path`` is a folder with a readable ``config.json`` of a
    ``qwen2_vl`` checkpoint whose weights are not already quantized (``_check_not_prequantized``)."""
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} is not a folder")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{path} is not a Qwen2-VL checkpoint folder: it has no config.json")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg} is not a checkpoint config (a JSON object)")
    model_type = config.get("model_type")
    if model_type != "qwen2_vl":
        raise ModelLoadError(f"{path} holds a {model_type!r} checkpoint; LiveCC needs a qwen2_vl one")
    _check_not_prequantized(str(path), config)


# quant_method (transformers' QuantizationMethod values) -> how the message names it
_QUANT_NAMES = {"awq": "AWQ", "gptq": "GPTQ", "bitsandbytes": "bitsandbytes", "hqq": "HQQ", "eetq": "EETQ",
                "fp8": "FP8", "fbgemm_fp8": "FBGEMM FP8", "aqlm": "AQLM", "quanto": "Quanto", "torchao": "torchao",
                "vptq": "VPTQ", "higgs": "HIGGS", "spqr": "SpQR", "bitnet": "BitNet", "exl2": "EXL2",
                "compressed-tensors": "compressed-tensors"}
_FLOAT8_METHODS = ("fp8", "fbgemm_fp8")
_FOUR_BIT_METHODS = ("awq", "aqlm", "vptq", "higgs", "spqr", "bitnet")  # 4 bits or fewer whatever the config says


def _quantization_config(config: dict) -> dict | None:
    """The checkpoint's ``quantization_config`` (top level, else in ``text_config``), or None when its weights
    are plain."""
    text = config.get("text_config")
    for qc in (config.get("quantization_config"), text.get("quantization_config") if isinstance(text, dict) else None):
        if qc is not None and qc != {}:
            return qc if isinstance(qc, dict) else {"quant_method": str(qc)}
    return None


def _quantized_bits(method: str, qc: dict) -> tuple[int | None, bool]:
    """(bits per weight, float) as far as ``qc`` says: (None, False) when it does not say."""
    if method in _FLOAT8_METHODS:
        return 8, True
    if qc.get("load_in_4bit"):  # bitsandbytes
        return 4, False
    if qc.get("load_in_8bit"):
        return 8, False
    m = re.fullmatch(r"(int|float)(\d+)", str(qc.get("weights")))  # quanto: int8 | int4 | int2 | float8
    if m:
        return int(m[2]), m[1] == "float"
    for group in (qc.get("config_groups") or {}).values() if isinstance(qc.get("config_groups"), dict) else ():
        w = group.get("weights") if isinstance(group, dict) else None  # compressed-tensors
        if isinstance(w, dict) and isinstance(w.get("num_bits"), int):
            return w["num_bits"], w.get("type") == "float"
    hqq = qc.get("quant_config") if isinstance(qc.get("quant_config"), dict) else {}
    hqq = hqq.get("weight_quant_params") if isinstance(hqq.get("weight_quant_params"), dict) else {}
    for bits in (qc.get("bits"), qc.get("w_bit"), qc.get("nbits"), hqq.get("nbits")):
        if isinstance(bits, int) and not isinstance(bits, bool):
            return bits, False
    return (4, False) if method in _FOUR_BIT_METHODS else (None, False)


def _check_not_prequantized(where: str, config: dict) -> None:
    """Raise ``ModelLoadError`` (one line) when ``config`` (a checkpoint's config.json) has a
    ``quantization_config``: AWQ, GPTQ, bitsandbytes, compressed-tensors, FP8, HQQ, ... checkpoints.

    Why: the engine (``model.py``) reads each decoder layer's plain ``q_proj.weight``, ``k_proj.weight``, ...
    and quantizes them itself (``engine.quantize``, ``quantize.py``); pre-quantized layers have no plain
    ``.weight`` and their loaders (autoawq, gptqmodel, ...) are not dependencies, so such a checkpoint would
    fail deep inside transformers or the engine. The message names the method and the ``--quantize`` mode
    that gives the same footprint from the original bfloat16 weights: fp8 for float8 methods, int8 for
    8-bit ones, int4 for 4 bits or fewer (AWQ, GPTQ 4-bit, bitsandbytes 4-bit, ...)."""
    qc = _quantization_config(config)
    if qc is None:
        return
    method = str(qc.get("quant_method") or "an unknown method")
    name = _QUANT_NAMES.get(method.lower(), method)
    bits, is_float = _quantized_bits(method.lower(), qc)
    if is_float and bits == 8:
        mode, detail = "fp8", "" if "FP8" in name else "float8"
    elif bits is not None and bits <= 4:
        mode, detail = "int4", f"{bits}-bit"
    elif bits is not None:
        mode, detail = "int8", f"{bits}-bit"
    else:
        mode, detail = "int4 (or int8)", ""
    from .config import DEFAULT_MODEL

    raise ModelLoadError(
        f"{where} is already quantized ({name}{' ' + detail if detail else ''}, quantization_config in its "
        f"config.json); this engine does not load pre-quantized weights: it quantizes the original bfloat16 "
        f"weights itself. Pass the original checkpoint ({DEFAULT_MODEL}) with --quantize {mode}")


def _check_cached_hub_config(name: str) -> None:
    """For a hub id whose config.json is in the local Hugging Face cache (no network): the
    ``_check_not_prequantized`` rule. Nothing is checked when it is not cached (transformers fetches it)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id, or no huggingface_hub: transformers says why
        return
    if not isinstance(path, str):
        return
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return  # transformers reports a broken cached config itself
    if isinstance(config, dict):
        _check_not_prequantized(name, config)


def _offline_message(name: str, err: Exception) -> str:
    folder = name.rsplit("/", 1)[-1]
    return (f"could not load model {name!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}). If this machine is offline, download it "
            f"where there is internet (`hf download {name} --local-dir {folder}`), copy the folder here and "
            f"pass --model ./{folder}")


def load_model(name: str, device: str | None = None, dtype: str = "auto", attention: str | None = None,
               liger: bool | None = None, quantize: str = "none") -> LoadedModel:
    """``from_pretrained`` on a hub id or a local folder, with the fastest kernels available; the language
    model's linear weights in ``quantize`` (none | int8 | int4 | fp8, see ``quantize.py``).

    Raises ``ModelLoadError`` (one line) for a checkpoint that cannot load or a quantize mode this device cannot
    run; the latter before anything is downloaded or loaded. Also before loading: a checkpoint that is already
    quantized (its config.json has a ``quantization_config``: AWQ, GPTQ, bitsandbytes, compressed-tensors,
    FP8, HQQ, ...) is refused, with the method's name and the ``--quantize`` mode to use on the original
    bfloat16 checkpoint instead (the engine reads plain ``q_proj.weight``-style tensors and quantizes them
    itself; pre-quantized layers have none, and their loaders are not dependencies). Checked for a local
    folder, and for a hub id whose config.json is in the local Hugging Face cache."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        quantization.check(quantize, dev, torch_dtype)
    except quantization.QuantizeError as e:
        raise ModelLoadError(str(e)) from None
    local = Path(name).expanduser()
    is_local = local.exists() or name.startswith((".", "/", "~"))
    if is_local:
        _check_local_folder(local)
        name = str(local)
    else:
        _check_cached_hub_config(name)
    if attention is None:
        attention = "flash_attention_2" if dev.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    use_liger = dev.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None if liger is None else liger
    if use_liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_vl

        apply_liger_kernel_to_qwen2_vl()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        image_proc = AutoImageProcessor.from_pretrained(name)
        hf = Qwen2VLForConditionalGeneration.from_pretrained(name, dtype=torch_dtype, attn_implementation=attention)
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        if is_local:
            raise ModelLoadError(f"could not load the checkpoint in {name}: {type(e).__name__}: {e}") from None
        raise ModelLoadError(_offline_message(name, e)) from None
    hf.eval().requires_grad_(False)
    try:
        quantization.to_device(hf, dev, quantize)
    except torch.OutOfMemoryError:
        smaller = "int4" if quantize != "int4" else None
        raise ModelLoadError(f"the model does not fit in {dev}'s memory with quantize={quantize}"
                             + (f"; try --quantize {smaller}" if smaller else "")) from None
    except ValueError as e:  # a shape the format cannot hold, a weight with NaN or infinities (lowbit.py)
        raise ModelLoadError(f"quantize={quantize}: {e}") from None
    gen = hf.generation_config
    stop = set(tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS)
    eos = gen.eos_token_id
    stop.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    patches = PatchSpec(patch=image_proc.patch_size, merge=image_proc.merge_size,
                        temporal=image_proc.temporal_patch_size, mean=tuple(image_proc.image_mean),
                        std=tuple(image_proc.image_std))
    silence = tokenizer(SILENCE_TEXT, add_special_tokens=False).input_ids[-1]
    sampling = {k: getattr(gen, k, None) for k in ("temperature", "top_k", "top_p")}
    weights = quantization.weight_bytes(hf)
    log.info("loaded %s on %s (%s, quantize=%s, weights %.2f GiB, attention=%s, liger=%s)", name, dev, torch_dtype,
             quantize, weights / 2**30, attention, use_liger)
    return LoadedModel(hf=hf, tokenizer=tokenizer, patches=patches, stop_ids=tuple(sorted(stop)), silence_id=silence,
                       sampling=sampling, name=name, device=dev, dtype=torch_dtype, attention=attention,
                       liger=use_liger, quantize=quantize, weight_bytes=weights)

