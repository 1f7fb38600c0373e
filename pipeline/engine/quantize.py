"""Low-bit weights for the language model (``engine.quantize``): int8 through torchao, int4 and fp8 in the engine's
own formats (``int4.py``, ``fp8.py``).

    none  the checkpoint's dtype (bfloat16 on CUDA)
    int8  weight-only int8, one scale per output row (torchao ``Int8WeightOnlyConfig``); CUDA or CPU
    int4  weight-only int4, groups of 128 with a scale and zero each (``int4.Int4Weight``: the engine's own format
          and one-row Triton kernel, 2.2x cuBLAS bfloat16 on an H200 where torchao's tinygemm, FBGEMM's and
          GemLite's int4 kernels were no faster than bfloat16 at one row); CUDA compute capability >= 8.0
          (Ampere and later), bfloat16 activations
    fp8   weight-only FP8 E4M3, one float32 scale per output row (``fp8.Fp8Weight``: the engine's own layout and
          one-row Triton kernel, which reads the large matrices' 1-byte weights at 3.6–4.1 TB/s on an H200 where
          torchao's ``_scaled_mm`` read ≈ 2.2 and inductor's reduction over its weights ≈ 2.8); CUDA compute
          capability >= 8.9 (Ada, Hopper and later: the kernel's paired E4M3 conversion), bfloat16 activations

int4 and fp8 take 2..64 rows (a batched decode step) through their several-rows kernels, one read of the
weights, and more rows (a prefill) through their weight dequantized to bfloat16 a block of rows at a time and
cuBLAS (``lowbit.LowBitWeight.linear``). One row's int8 product in the compiled
decode step does not use torchao's kernel either: ``model.linear`` reads the 1-byte codes in one reduction and
scales the sum.

What is quantized: every decoder layer's fused q|k|v, o, fused gate|up and down projections, and the lm_head (it
is read once per decode step like the rest; 1 GiB in bf16 for the 7B) unless it is tied to the embeddings. What
stays in the model dtype: the embeddings, the norms, the q|k|v bias, the vision tower and the KV cache (an FP8 KV
cache is reported to corrupt Qwen2-VL output in another engine).

The int8 weights are torchao tensor subclasses: ``F.linear`` dispatches to their kernels; int4 and fp8 weights are
``lowbit.LowBitWeight`` modules that ``model.linear`` calls. The model code (``model.py``) is otherwise the same for
every mode, under CUDA graphs and torch.compile too. Quantizing happens matrix by matrix as the weights move to the
device (``to_device``), so the bfloat16 language model never sits on the GPU whole: int4 can load on an 8 GiB card.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import QUANTIZE_MODES as MODES
from .fp8 import Fp8Weight
from .int4 import Int4Weight
from .lowbit import LowBitLinear, LowBitWeight
from .model import fuse_projections, language_parts

log = logging.getLogger(__name__)


class QuantizeError(RuntimeError):
    """A quantization mode that cannot run here (the message is one line saying why and what to use)."""


def check(mode: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ``QuantizeError`` (one line) if ``mode`` cannot run on ``device`` with ``dtype``; before any loading."""
    if mode not in MODES:
        raise QuantizeError(f"quantize must be {', '.join(MODES)}, not {mode!r}")
    if mode == "none":
        return
    try:
        if mode in ("int4", "fp8"):
            import triton  # noqa: F401 - the one-row kernels (int4.py, fp8.py); ships with torch on Linux
        else:
            import torchao  # noqa: F401
    except ImportError:
        need = "triton (it ships with PyTorch's CUDA builds for Linux)" if mode in ("int4", "fp8") else \
            "torchao: pip install 'torchao>=0.18'"
        raise QuantizeError(f"quantize={mode} needs {need}") from None
    if mode == "int8" and device.type not in ("cuda", "cpu"):
        raise QuantizeError(f"quantize=int8 runs on CUDA or CPU, not {device.type}; use quantize=none")
    if mode in ("int4", "fp8"):
        if device.type != "cuda" or not torch.cuda.is_available():
            where = device.type if device.type != "cuda" else "cuda, but no CUDA GPU is available"
            raise QuantizeError(f"quantize={mode} needs a CUDA GPU (this engine runs on {where}); use int8 or none")
        if dtype != torch.bfloat16:
            raise QuantizeError(f"quantize={mode} runs in bfloat16, not {str(dtype).removeprefix('torch.')}; "
                                "use dtype auto or bfloat16")
    if mode in ("int4", "fp8"):
        # int4: bfloat16 (the Triton kernel's activations); fp8: the PTX conversion cvt.rn.f16x2.e4m3x2 (sm_89+)
        need, gpus, other = {"int4": ((8, 0), "Ampere", "int8"), "fp8": ((8, 9), "Ada, Hopper", "int8 or int4")}[mode]
        cap = torch.cuda.get_device_capability(device)
        if cap < need:
            raise QuantizeError(f"quantize={mode} needs CUDA compute capability {need[0]}.{need[1]} or newer ({gpus}); "
                                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}: use {other}")


# the engine's own formats: mode -> the LowBitWeight class that holds a matrix in it
OWN_FORMATS = {"int4": Int4Weight, "fp8": Fp8Weight}


def _config(mode: str):
    if mode in OWN_FORMATS:
        return mode  # this engine's own format (int4.py, fp8.py), not torchao's
    from torchao.quantization import Int8WeightOnlyConfig

    # set_inductor_config=False: keep the engine's own torch.compile settings in every mode
    return Int8WeightOnlyConfig(set_inductor_config=False)


def _quantize_linear(linear: nn.Linear, config) -> nn.Module:
    """``linear`` quantized in place (torchao), or a ``LowBitLinear`` in its place for int4 and fp8: the module to
    use."""
    if isinstance(config, str):
        return LowBitLinear(OWN_FORMATS[config].from_float(linear.weight), linear.bias)
    from torchao.quantization import quantize_

    quantize_(linear, config)
    return linear


def _quantized(weight: torch.Tensor, config) -> nn.Parameter | LowBitWeight:
    """``weight`` (out, in) as a quantized parameter (through a throw-away ``nn.Linear``), or a ``LowBitWeight``."""
    if isinstance(config, str):
        return OWN_FORMATS[config].from_float(weight)
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return _quantize_linear(lin, config).weight


class FusedAway(nn.Module):
    """Stands in for a q/k/v or gate/up projection whose weight now exists only fused and quantized in its layer
    (``layer.qkv_weight`` / ``layer.gate_up_weight``): the quantized language model runs through ``TextModel``."""

    def forward(self, x):
        raise RuntimeError("this projection's weight is fused and quantized: run the language model through "
                           "pipeline.engine.model.TextModel")


@torch.no_grad()
def _quantize_layer(layer, config) -> None:
    fuse_projections(layer)
    attn, mlp = layer.self_attn, layer.mlp
    layer.qkv_weight = _quantized(layer.qkv_weight, config)
    layer.gate_up_weight = _quantized(layer.gate_up_weight, config)
    attn.o_proj = _quantize_linear(attn.o_proj, config)
    mlp.down_proj = _quantize_linear(mlp.down_proj, config)
    for owner, names in ((attn, ("q_proj", "k_proj", "v_proj")), (mlp, ("gate_proj", "up_proj"))):
        for name in names:
            setattr(owner, name, FusedAway())


@torch.no_grad()
def to_device(hf_model: nn.Module, device: torch.device, mode: str = "none") -> None:
    """Move a loaded Qwen2-VL (on the CPU) to ``device``, quantizing the language model's linear weights on the
    way (see the module doc). Call ``check`` first.

    The token embeddings (1.02 GiB for the 7B: 152k x 3584 bfloat16) go to the device only if it still has
    ``EMBED_RESERVE`` free besides them once every other weight is there (``embeddings_fit``); otherwise they stay
    in host memory (unless tied to the lm_head), where a turn reads a few hundred rows and a decode step one per
    stream (``TextModel.embed_ids`` looks them up there and copies them over, 7 KiB a token): on an 8-GB card that
    GiB is the difference between fitting a 16k context and not. In host memory the lookup needs each step's
    token on the host, so the engine cannot launch a decode step before the previous one ends (``EngineCore``'s
    overlap): on an H200 that cost ≈ 0.5–0.8 ms a token.

    Order, for the smallest peak on the device: the lm_head first, while the device is empty (quantizing a
    152k x 3.6k matrix needs scratch besides it: torchao's padded copies and int32 codes (int8); int4 and fp8 a
    block of 4,096 rows' float32 copy and codes), then the layers
    one at a time (at most one bfloat16 layer besides the quantized ones), then the rest (vision tower,
    embeddings, norms) as it is."""
    if mode == "none":
        hf_model.to(device)
        return
    config = _config(mode)
    text, lm_head = language_parts(hf_model)
    layers = text.layers
    tied = lm_head.weight is text.embed_tokens.weight
    if not tied:
        lm_head.to(device)
        lm_head = hf_model.lm_head = _quantize_linear(lm_head, config)
    for layer in layers:
        layer.to(device)
        _quantize_layer(layer, config)
    text.layers = nn.ModuleList()  # quantized already: kept out of the move of the rest
    embed = text.embed_tokens
    if not tied:
        hf_model.lm_head = nn.Identity()
        text.embed_tokens = nn.Identity()  # kept out of the move: placed below
    try:
        hf_model.to(device)
    finally:
        text.layers = layers
        hf_model.lm_head = lm_head
        text.embed_tokens = embed
    where = "host memory"
    if not tied and embeddings_fit(embed.weight, device):
        embed.to(device)
        where = str(device)
    log.info("quantized the language model's linear weights to %s; token embeddings in %s", mode, where)


EMBED_RESERVE = 4 * 2**30  # device bytes left free besides the embeddings: a 32k KV cache of the 7B (1.75 GiB),
# the vision tower's and a prefill's scratch at 1080p and the CUDA graphs' pools (≈ 2 GiB measured on an H200)


def embeddings_fit(weight: torch.Tensor, device: torch.device) -> bool:
    """Whether the token embeddings ``weight`` (vocab, hidden) fit on ``device`` with ``EMBED_RESERVE`` bytes to
    spare: on CUDA, from the free memory (``torch.cuda.mem_get_info``) and the process's cap if one is set
    (``torch.cuda.set_per_process_memory_fraction``); never on other devices (the CPU holds them already)."""
    if device.type != "cuda":
        return False
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    free, total = torch.cuda.mem_get_info(device)
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None:
        free = min(free, int(get_fraction(device) * total) - torch.cuda.memory_reserved(device))
    return free - weight.numel() * weight.element_size() >= EMBED_RESERVE


def _leaves(t: torch.Tensor):
    """The plain tensors holding ``t``'s data (a torchao tensor subclass holds several)."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def weight_bytes(hf_model: nn.Module) -> int:
    """Bytes of device memory held by the model's weights (every parameter and buffer, plus the fused
    projections), each storage counted once; weights kept in host memory (the quantized modes' embeddings) are
    not counted when the model runs on a GPU."""
    tensors = list(hf_model.parameters()) + list(hf_model.buffers())
    text, _ = language_parts(hf_model)
    where = text.norm.weight.device
    for layer in text.layers:
        tensors += [getattr(layer, a) for a in ("qkv_weight", "qkv_bias", "gate_up_weight") if hasattr(layer, a)]
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, nn.Module):  # a LowBitWeight: its buffers are the model's buffers, counted already
            continue
        for leaf in _leaves(t):
            if leaf.device != where or leaf.numel() == 0:
                continue
            s = leaf.untyped_storage()
            seen[(str(leaf.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


@torch.inference_mode()
def decode_agreement(reference, candidate, prompt: list[int], steps: int) -> dict:
    """Compare two ``ModelRunner``s (one cache row each) over ``steps`` greedy decode steps on the same inputs.

    Both prefill ``prompt`` (token ids, text only), then both are fed the reference's argmax token at every
    step (teacher forcing, so one disagreement does not change the inputs after it). Returns
    ``{"steps", "cosine_min", "cosine_mean", "argmax_agree"}``: the cosine similarity of the two float32 logit
    vectors per step (min and mean) and the fraction of steps (and the prefill) whose argmax is the same."""
    n = len(prompt)
    pos = torch.arange(n).expand(3, n)
    slot_r, slot_c = reference.cache.alloc(), candidate.cache.alloc()
    try:
        lr = reference.prefill([(slot_r, prompt, pos, None)])
        lc = candidate.prefill([(slot_c, prompt, pos, None)])
        cos, same = [], []
        for i in range(steps + 1):
            cos.append(torch.nn.functional.cosine_similarity(lr.float(), lc.float().to(lr.device), dim=-1).item())
            tok = lr.argmax(-1)
            same.append(bool((tok.cpu() == lc.argmax(-1).cpu()).all()))
            if i == steps:
                break
            lr = reference.decode_logits([slot_r], tok.to(reference.device), [n + i])
            lc = candidate.decode_logits([slot_c], tok.to(candidate.device), [n + i])
    finally:
        reference.cache.free(slot_r)
        candidate.cache.free(slot_c)
    return {"steps": steps, "cosine_min": min(cos), "cosine_mean": sum(cos) / len(cos),
            "argmax_agree": sum(same) / len(same)}
