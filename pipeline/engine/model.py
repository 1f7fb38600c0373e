"""The language-model half of Qwen2-VL as plain tensors and one layer function.

``TextModel`` holds weights only (one per process and device, shared by every stream); the KV cache
(``kv_cache.py``) and the batching (``runner.py``) live elsewhere. A layer is

    x -> pre_attention (norm, fused q|k|v, mRoPE) -> attend(q, k, v) -> post_attention (o, MLP)

and ``forward`` runs every layer with an ``attend`` callback that the caller chooses: prefill writes
its streams' new keys into their cache rows and attends over them; a decode step writes one key per
stream and attends over every row at once. Prefill and decode share the same layer code.

Weights come from the checkpoint's own modules (transformers' Qwen2-VL, with Liger applied if it
was), so nothing is copied; ``fuse_projections`` makes q|k|v and gate|up one matrix each (views, so
transformers' modules keep working on the same storage).
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .lowbit import LowBitWeight

log = logging.getLogger(__name__)

# Prefill attends with a mask whose width grows every turn. cuDNN's attention builds a new plan for every
# new shape (2.5 ms of CPU per layer per turn, measured on an H100); the memory-efficient kernel does not.
MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class LayerWeights(NamedTuple):
    """One decoder layer's weights (bf16/fp32 as loaded; with ``engine.quantize`` the four matrices are torchao
    tensors (int8), which ``F.linear`` dispatches, or ``lowbit.LowBitWeight`` modules (int4, fp8), which ``linear``
    calls). Shapes for the 7B: hidden 3584, q 3584, kv 512."""

    ln1: torch.Tensor  # (hidden,) input RMSNorm
    qkv_w: torch.Tensor  # (q + 2·kv, hidden) fused q|k|v projection
    qkv_b: torch.Tensor  # (q + 2·kv,)
    o_w: torch.Tensor  # (hidden, q) output projection
    ln2: torch.Tensor  # (hidden,) post-attention RMSNorm
    gate_up_w: torch.Tensor  # (2·ffn, hidden) fused gate|up
    down_w: torch.Tensor  # (hidden, ffn)


def language_parts(hf_model):
    """(text model with embed_tokens/layers/norm, lm_head) across transformers 4.4x-5.x layouts."""
    inner = hf_model.model
    text = getattr(inner, "language_model", None) or inner
    return text, hf_model.lm_head


def text_config(hf_model):
    cfg = hf_model.config
    return getattr(cfg, "text_config", None) or cfg


def _rope_settings(tc) -> tuple[float, list[int]]:
    params = getattr(tc, "rope_parameters", None) or {}
    scaling = getattr(tc, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(tc, "rope_theta", 1_000_000.0))
    section = params.get("mrope_section") or scaling.get("mrope_section") or [16, 24, 24]
    return float(theta), list(section)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm, same arithmetic as transformers' (float32 inside, weight applied in the model dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; inside torch.compile, for ONE row, written as multiply-and-sum so that inductor generates a
    Triton reduction that reads the weight once (coordinate-descent tuned: ``ModelRunner.one_row_compile_options``)
    instead of calling cuBLAS's matrix-vector kernel. H200, LiveCC-7B's products for one decode step: 3.61 ms
    against 3.95 (q|k|v 3.25 vs 2.99 TB/s, gate|up 4.34 vs 3.83, lm_head 4.52 vs 4.21; ``scripts/profile_gemv.py``).

    The same for torchao's int8 weights with one scale per output row (``engine.quantize=int8``: ``qdata`` (out, in)
    int8, ``scale`` (out, 1) float32): the reduction converts each weight as it reads it and scales the sum, so a
    step reads one byte a weight (``per_row_parts``). Several rows (cuBLAS is as fast there), eager code and other
    weights take ``F.linear``. ``engine.quantize`` int4's and fp8's weights (``lowbit.LowBitWeight``) take their own
    kernels. x (..., in), w (out, in), b (out,) -> (..., out)."""
    if isinstance(w, LowBitWeight):
        return w.linear(x, b)
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
        if type(w) in (torch.Tensor, nn.Parameter):
            y = (x.reshape(1, -1) * w).sum(-1, dtype=torch.float32)
        elif (parts := per_row_parts(w)) is not None:
            q, zero, scale = parts
            q = q.to(x.dtype) if zero is None else q.to(x.dtype) - zero.to(x.dtype)
            y = (x.reshape(1, -1) * q).sum(-1, dtype=torch.float32) * scale.reshape(-1)
        else:
            return F.linear(x, w, b)
        y = y.to(x.dtype)
        y = y if b is None else y + b
        return y.reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, b)


PER_ROW_DTYPES = (torch.int8,)


def per_row_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """(qdata (out, in) int8, zero_point (out, 1) or None, scale (out, 1) float32) of a torchao weight quantized with
    one scale per output row (``Int8Tensor`` of ``Int8WeightOnlyConfig``: zero points of 0), such that
    w = (qdata - zero_point) * scale; None for any other weight."""
    q, scale = getattr(w, "qdata", None), getattr(w, "scale", None)
    zero = getattr(w, "zero_point", None)
    if not isinstance(q, torch.Tensor) or not isinstance(scale, torch.Tensor) or q.dtype not in PER_ROW_DTYPES:
        return None
    rows = (q.shape[0], 1)
    if q.dim() != 2 or tuple(scale.shape) != rows or (zero is not None and tuple(zero.shape) != rows):
        return None
    return q, zero, scale


def pre_attention(x, ln_w, qkv_w, qkv_b, cos, sin, eps: float, n_heads: int, n_kv: int, head_dim: int):
    """Norm -> q|k|v -> rotary. x (B, T, hidden); cos/sin (B, 1, T, head_dim) ->
    q (B, n_heads, T, head_dim), k and v (B, n_kv, T, head_dim)."""
    B, T = x.shape[0], x.shape[1]
    q, k, v = linear(rms_norm(x, ln_w, eps), qkv_w, qkv_b).split(
        [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(B, T, n_heads, head_dim).transpose(1, 2)
    k = k.view(B, T, n_kv, head_dim).transpose(1, 2)
    v = v.view(B, T, n_kv, head_dim).transpose(1, 2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def pre_attention_store(x, ln_w, qkv_w, qkv_b, cos, sin, eps: float, n_heads: int, n_kv: int, head_dim: int,
                        k_cache, v_cache, index):
    """``pre_attention`` of a decode step (T = 1), then ``store_kv`` of each row's new key and value."""
    q, k, v = pre_attention(x, ln_w, qkv_w, qkv_b, cos, sin, eps, n_heads, n_kv, head_dim)
    store_kv(k_cache, v_cache, index, k, v)
    return q, k, v


def store_kv(k_cache, v_cache, index, k, v) -> None:
    """Store a decode step's new keys and values k, v (B, kv_heads, 1, head_dim) in the cache. ``k_cache``/``v_cache``:
    the whole cache storage; ``index``: a tuple of broadcastable int64 index tensors, one per cache dimension but the
    last (``KVCache.decode_index``); only index tensors, no slices, so torch.compile scatters in place instead of
    copying the layer (measured). Compiled, one kernel a layer for both (``TextModel.compile``) instead of two aten
    scatters (56 of them took 0.22 ms of a 5.4-ms step on an H200)."""
    k_cache.index_put_(index, k[:, :, 0])
    v_cache.index_put_(index, v[:, :, 0])


# The compiled store's inductor settings: no autotuning. Inductor benchmarks a kernel's candidate configurations
# on its real arguments and, for an argument the kernel writes, first saves it; where a copy on the GPU would raise
# the peak memory it copies it to pinned host memory and back for every candidate (``CachingAutotuner.
# copy_args_to_cpu_if_needed``). The argument here is the whole cache: 28 GiB for the keys of 32 slots x 32k
# tokens of the 7B, so on the H200 compiling the decode steps of 32 streams ran past 400 s (from 30 s) once the
# store sat inside the coordinate-descent-tuned one-row step.
STORE_COMPILE_OPTIONS = {"coordinate_descent_tuning": False, "triton.autotune_pointwise": False,
                         "max_autotune": False, "max_autotune_pointwise": False}


def pre_then_store(pre: Callable, store: Callable) -> Callable:
    """A function with ``pre_attention_store``'s signature running ``pre`` (``pre_attention``'s signature) and
    ``store`` (``store_kv``'s): compiled apart, so that the tuning of ``pre`` never benchmarks a kernel writing into
    the cache (``STORE_COMPILE_OPTIONS``)."""
    def pre_store(*args):
        *layer, k_cache, v_cache, index = args
        q, k, v = pre(*layer)
        store(k_cache, v_cache, index, k, v)
        return q, k, v
    return pre_store


def post_attention(x, o, o_w, ln_w, gate_up_w, down_w, eps: float):
    """Output projection + residual, norm -> SwiGLU MLP + residual. x (B, T, hidden), o (B, T, q)."""
    x, act = mlp_in(x, o, o_w, ln_w, gate_up_w, eps)
    return mlp_out(x, act, down_w)


def mlp_in(x, o, o_w, ln_w, gate_up_w, eps: float):
    """``post_attention`` up to the MLP's activation: (x after the output projection's residual (B, T, hidden),
    SiLU(gate) * up (B, T, intermediate))."""
    x = x + linear(o, o_w)
    gate, up = linear(rms_norm(x, ln_w, eps), gate_up_w).chunk(2, dim=-1)
    return x, F.silu(gate) * up


def mlp_out(x, act, down_w):
    """The MLP's down projection + residual: x (B, T, hidden), act (B, T, intermediate)."""
    return x + linear(act, down_w)


def post_in_two(first: Callable, second: Callable) -> Callable:
    """``post_attention`` as ``first`` (``mlp_in``) then ``second`` (``mlp_out``), compiled apart so that the
    activation is written once: compiled whole, the one-row step's down-projection reduction recomputed SiLU(gate) *
    up from both halves in every program (54 µs a layer on an H200 where the product alone takes 39.5:
    ``scripts/profile_decode.py --replay``)."""
    def post(x, o, o_w, ln_w, gate_up_w, down_w, eps):
        x, act = first(x, o, o_w, ln_w, gate_up_w, eps)
        return second(x, act, down_w)
    return post


@torch.no_grad()
def fuse_projections(layer) -> None:
    """One matrix for q|k|v and one for gate|up, each read in one pass per token.

    The module's own parameters become views into the fused tensors, so nothing is stored twice
    and transformers' modules (and the Liger kernel's) keep working on the same weights. Idempotent.
    """
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(layer, "_livecc_fused", False):
        return
    qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    nq, nk = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
    for lin, rows in ((attn.q_proj, slice(0, nq)), (attn.k_proj, slice(nq, nq + nk)), (attn.v_proj, slice(nq + nk, None))):
        lin.weight = nn.Parameter(qkv[rows], requires_grad=False)
        lin.bias = nn.Parameter(bias[rows], requires_grad=False)
    ni = mlp.gate_proj.weight.shape[0]
    mlp.gate_proj.weight = nn.Parameter(gate_up[:ni], requires_grad=False)
    mlp.up_proj.weight = nn.Parameter(gate_up[ni:], requires_grad=False)
    layer.qkv_weight, layer.qkv_bias, layer.gate_up_weight = qkv, bias, gate_up
    layer._livecc_fused = True


def _one_row_pre(*args):  # the one-row decode step's, under their own code objects (TextModel.compile)
    return pre_attention(*args)


def _one_row_mlp_in(*args):
    return mlp_in(*args)


def _one_row_mlp_out(*args):
    return mlp_out(*args)


def _prefill_pre(*args):  # pre_attention under another code object (TextModel.compile_prefill)
    return pre_attention(*args)


def _prefill_post(*args):
    return post_attention(*args)


def merge_attention(o1, lse1, o2, lse2):
    """The attention over two disjoint sets of keys from each one's output (N, H, d) and log-sum-exp (N, H)
    float32 (the softmax renormalised: o = (e^l1·o1 + e^l2·o2) / (e^l1 + e^l2), FlashAttention's split-KV
    combine). Returns (N, H, d) in o2's dtype."""
    w = torch.sigmoid(lse1 - lse2)[..., None]
    return (o2.float() + (o1.float() - o2.float()) * w).to(o2.dtype)


def merge_splits(o, lse):
    """The attention over the union of S disjoint sets of keys from each one's output (S, ..., d) and
    log-sum-exp (S, ...) float32: o = Σ e^(l_s - L)·o_s with L = log Σ e^(l_s) (FlashAttention's split-KV
    combine over S parts). Returns (o (..., d) in o's dtype, L (...) float32)."""
    total = torch.logsumexp(lse, 0)
    w = torch.exp(lse - total)[..., None]
    return (o.float() * w).sum(0).to(o.dtype), total


def unstack_heads(o, lse, g: int):
    """cuDNN's output for ``TextModel.attend_past``, the g query heads of each KV head stacked as rows: o
    (KV, g·n, d), lse (KV, g·n) -> o (n, KV·g, d), lse (n, KV·g) float32."""
    kv, d = o.shape[0], o.shape[-1]
    n = o.shape[1] // g
    return (o.reshape(kv, g, n, d).permute(2, 0, 1, 3).reshape(n, kv * g, d),
            lse.float().reshape(kv, g, n).permute(2, 0, 1).reshape(n, kv * g))


def merge_parts(o, lse, g: int):
    """``TextModel.attend_past``'s S parts, o (S, KV, g·n, d) and lse (S, KV, g·n) as cuDNN gives them, merged
    (``merge_splits``) and unstacked (``unstack_heads``) -> (n, KV·g, d), (n, KV·g) float32."""
    return unstack_heads(*merge_splits(o, lse.float()), g)


def fused(fn, options: dict | None = None):
    """``fn`` through torch.compile (one fused kernel; any token count, ``dynamic=True``), falling back to ``fn``
    itself for good, with a warning, if compiling or running the compiled code fails (a compiler problem must not
    stop captioning, nor be taken for a failure of the attention kernels around it). For the prefill's small
    elementwise merges (``TextModel.compile_prefill``): eager, their float32 passes took ≈ 30 µs a layer of a
    386-token turn on an H200 for ``merge_attention`` (the prefill graph's kernels other than GEMMs and attention
    2.96–2.99 ms a turn, 2.08–2.12 fused) and ≈ 65 µs for ``attend_past``'s 3 parts."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, options=options)
    use = [compiled]

    def run(*args):
        if use[0] is fn:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as e:  # noqa: BLE001 - reported, then eager
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            log.warning("torch.compile of %s failed (%s); it runs eager from now on", fn.__name__,
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            use[0] = fn
            return fn(*args)
    return run


# attend(layer index, q, k, v) -> o (B, T, n_heads*head_dim); it also stores k/v in the cache
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TextModel:
    """Weights of the language model and the math over them; no per-stream state.

    Built once per loaded checkpoint (``TextModel(loaded.hf)``). On first construction the checkpoint's
    q|k|v and gate|up projections are fused in place (``fuse_projections``).
    """

    def __init__(self, hf_model):
        text, self.lm_head = language_parts(hf_model)
        tc = text_config(hf_model)
        self.embed = text.embed_tokens
        self.norm = text.norm
        self.n_heads = tc.num_attention_heads
        self.n_kv = tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.hidden = tc.hidden_size
        theta, self.mrope_section = _rope_settings(tc)
        p = self.embed.weight  # never quantized (the lm_head may be); host memory on a small GPU (quantize.py)
        self.dtype, self.device = p.dtype, text.norm.weight.device
        self.vocab = self.lm_head.weight.shape[0]
        self.inv_freq = (1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
                         ).to(self.device)
        for layer in text.layers:
            fuse_projections(layer)
        norm = text.layers[0].input_layernorm
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.layers = [LayerWeights(l.input_layernorm.weight, l.qkv_weight, l.qkv_bias, l.self_attn.o_proj.weight,
                                    l.post_attention_layernorm.weight, l.gate_up_weight, l.mlp.down_proj.weight)
                       for l in text.layers]
        self.pre_store, self.post = pre_attention_store, post_attention  # the decode step's (compiled by ``compile``)
        self.prefill_pre, self.prefill_post = pre_attention, post_attention  # compiled by ``compile_prefill``
        self.merge, self.merge_parts = merge_attention, merge_parts  # likewise
        self.head = self.logits  # the decode step's logits (compiled with ``compile``)
        self.one_row = None  # the one-row decode step's (pre_store, post, head), compiled apart (``compile``)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def compile(self, options: dict | None = None, one_row_options: dict | None = None) -> None:
        """Fuse the small kernels around attention (norms, rotary, residuals, SiLU) with torch.compile, one
        static-shape graph per batch size. Used by the decode step (``step_fns``). ``options``: inductor settings
        for these compilations (``runner.compile_options``); ``one_row_options``: for the one-row step, compiled
        apart (its products are Triton reductions: ``linear``), so that their tuning does not lengthen the
        compilation of every other batch size."""
        import torch._dynamo

        # one recompilation per decode batch-size bucket (runner.BATCH_BUCKETS): above dynamo's default of 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

        def c(fn, opts):
            return torch.compile(fn, fullgraph=True, dynamic=False, options=opts)
        store = c(store_kv, STORE_COMPILE_OPTIONS)  # apart, never autotuned (STORE_COMPILE_OPTIONS says why)
        self.pre_store = pre_then_store(c(pre_attention, options), store)
        self.post, self.head = c(post_attention, options), c(self.logits, options)
        one = options if one_row_options is None else one_row_options
        # wrappers with their own code objects: dynamo keeps their graphs apart from the other batch sizes'
        self.one_row = (pre_then_store(c(_one_row_pre, one), store),
                        post_in_two(c(_one_row_mlp_in, one), c(_one_row_mlp_out, one)), c(self._one_row_logits, one))

    def uncompile(self) -> None:
        self.pre_store, self.post, self.head = pre_attention_store, post_attention, self.logits
        self.one_row = None

    def step_fns(self, rows: int):
        """(pre_store, post, head) of a decode step of ``rows`` rows: compiled ones after ``compile``."""
        if rows == 1 and self.one_row is not None:
            return self.one_row
        return self.pre_store, self.post, self.head

    def compile_prefill(self, options: dict | None = None) -> None:
        """The prefill's norms, rotary, residuals and SiLU fused by torch.compile with a dynamic token count
        (one compilation for every turn length; ``prefill_pre``/``prefill_post``). In eager mode these are
        ≈ 30 small kernels a layer that each read the whole (tokens, hidden) activation: 36 of 134 ms of GPU
        time for 8 rows of 386 tokens on an H200 (``scripts/profile_turn.py``). Wrappers with their own code
        objects, so dynamo keeps their graphs apart from the decode step's static ones."""
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.prefill_pre = torch.compile(_prefill_pre, fullgraph=True, dynamic=True, options=options)
        self.prefill_post = torch.compile(_prefill_post, fullgraph=True, dynamic=True, options=options)
        self.merge, self.merge_parts = fused(merge_attention, options), fused(merge_parts, options)

    def uncompile_prefill(self) -> None:
        """The prefill's eager layer functions again (after a compiler failure: ``ModelRunner.prefill``)."""
        self.prefill_pre, self.prefill_post = pre_attention, post_attention
        self.merge, self.merge_parts = merge_attention, merge_parts

    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, 1, T, head_dim) in the model dtype for mRoPE positions ``pos`` (3, B, T) int64:
        frequency section i takes position component i % 3 (time, height, width)."""
        freqs = pos.to(self.inv_freq.device)[..., None].float() * self.inv_freq  # 3, B, T, hd/2
        parts = freqs.split(self.mrope_section, dim=-1)
        f = torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)  # B, T, hd/2
        f = torch.cat((f, f), dim=-1)[:, None]
        return f.cos().to(self.dtype), f.sin().to(self.dtype)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, attend: Attend, pre=None, post=None,
                store=None) -> torch.Tensor:
        """Hidden states (B, T, hidden) after every layer, for embeddings ``x`` (B, T, hidden) at positions
        ``pos`` (3, B, T). ``attend`` stores each layer's new keys/values and attends (see module doc); with
        ``store`` = (k_cache, v_cache, index(layer) -> index tensors), ``pre`` has ``pre_attention_store``'s
        signature and stores them itself."""
        pre, post = pre or pre_attention, post or post_attention
        cos, sin = self.rotary(pos)
        B, T = x.shape[0], x.shape[1]
        for i, w in enumerate(self.layers):
            args = (x, w.ln1, w.qkv_w, w.qkv_b, cos, sin, self.eps, self.n_heads, self.n_kv, self.head_dim)
            q, k, v = pre(*args, store[0], store[1], store[2](i)) if store else pre(*args)
            o = attend(i, q, k, v)
            x = post(x, o.reshape(B, T, -1), w.o_w, w.ln2, w.gate_up_w, w.down_w, self.eps)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits (..., vocab) for final hidden states (..., hidden)."""
        return linear(self.norm(h), self.lm_head.weight, self.lm_head.bias).float()

    def _one_row_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.logits(h)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., hidden) on the model's device for token ids (...) int64 on any device: looked up where
        the table lives (the GPU, or host memory for quantized weights on a GPU without room for it:
        ``quantize.embeddings_fit``), then copied."""
        return self.embed(ids.to(self.embed.weight.device)).to(self.device, non_blocking=True)

    # -- attention kernels ---------------------------------------------------------------------------
    def attend_masked(self, q, keys, values, mask):
        """Grouped-query attention for one stream's prefill: q (1, H, T, d) over keys/values (1, KV, S, d)
        with an additive mask (g·T, S) whose rows repeat per query head of a group; no K/V copies."""
        _, H, T, D = q.shape
        qg = q.reshape(1, self.n_kv, (H // self.n_kv) * T, D)
        if q.device.type == "cuda":
            with sdpa_kernel(MASKED_BACKENDS):
                o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        return o.reshape(1, H, T, D).transpose(1, 2)

    def attend_causal(self, q, keys, values):
        """A row with no cached past: q (1, H, T, d) causally over its own keys/values (1, KV, T, d), grouped-query
        heads by SDPA itself and no mask tensor, so a long first turn (a whole recorded video for ``livecc ask``:
        22k tokens) costs no (T, T) mask: the masked path needed 3.8 GB there -> (1, T, H, d)."""
        o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
        return o.transpose(1, 2)

    def attend_varlen(self, q, keys, values, cu_q, cu_k, used, max_q: int, max_k: int):
        """Prefill attention on CUDA for many rows in one FlashAttention-2 variable-length call (PyTorch's own
        kernel, ``aten._flash_attention_forward``), grouped-query heads natively, no mask tensor.

        q (N, H, d): the rows' new tokens packed, row b at ``cu_q[b]:cu_q[b+1]`` (int32 (B+1,)); keys/values
        (L, KV, d), possibly strided (``KVCache.varlen``), row b starting at ``cu_k[b]`` with ``used[b]``
        (int32 (B,)) valid keys: its cached past followed by its new tokens. Causal, aligned bottom-right as in
        FlashAttention >= 2.1: new token t of a row sees keys 0 .. used - n + t. Returns (N, H, d)."""
        out = torch.ops.aten._flash_attention_forward(q, keys, values, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                      seqused_k=used)
        return out[0]

    def attend_varlen_lse(self, q, keys, values, cu_q, cu_k, used, max_q: int, max_k: int, tok_row, tok_pos):
        """``attend_varlen`` and its log-sum-exp per query and head (N, H) float32, for ``merge_attention``.
        FlashAttention gives it as (H, N), or padded as (B, H, max_q) in older builds: ``tok_row``/``tok_pos``
        (N,) device int64 say where token n sits there."""
        out = torch.ops.aten._flash_attention_forward(q, keys, values, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                      seqused_k=used)
        lse = out[1]
        lse = lse.t() if lse.dim() == 2 else lse[tok_row, :, tok_pos]
        return out[0], lse.float()

    def attend_past(self, q, keys, values, splits: int = 1):
        """New tokens of one row over a block of its past, no mask (every new token sees the whole block), with
        cuDNN's attention (Hopper: 2.4x PyTorch's FlashAttention-2 here: ``scripts/profile_kernels.py``). The
        query heads of a KV head are stacked as rows, so K and V are read once per KV head.

        ``splits`` > 1: the block's keys as that many equal parts, the batch of one cuDNN call, merged by their
        log-sum-exp (``merge_parts``; fused with the compiled prefill). The idea: a 386-token turn of LiveCC-7B
        stacks into 4 KV heads x 2,702 rows, few thread blocks for 132 SMs if cuDNN tiles 128 rows, each walking the
        whole block; in parts, more blocks walk less. Measured on an H200 (``runner.PAST_SPLIT``): 3 parts cut the
        attention by 0.4–2.0 ms a turn, the merge added 0.6; off by default.

        q (n, H, d); keys/values (1, KV, P, d), last dim contiguous (a ``KVCache.row`` view), P a multiple of
        ``splits`` (else ValueError) -> (o (n, H, d), log-sum-exp (n, H) float32). cuDNN plans once per shape
        (≈ 35 ms on an H200), so callers give P in few sizes (``runner.PAST_BLOCK`` multiples)."""
        n, H, D = q.shape
        kv, g = self.n_kv, H // self.n_kv
        qg = q.view(n, kv, g, D).permute(1, 2, 0, 3).reshape(1, kv, g * n, D)
        if splits > 1:  # (1, KV, P, d) -> (splits, KV, P / splits, d): views of the same keys
            if keys.shape[2] % splits:
                raise ValueError(f"{keys.shape[2]} keys do not split into {splits} equal parts")
            part = keys.shape[2] // splits
            keys = keys[0].unflatten(1, (splits, part)).transpose(0, 1)
            values = values[0].unflatten(1, (splits, part)).transpose(0, 1)
            qg = qg.expand(splits, -1, -1, -1).contiguous()
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(qg, keys, values, None, True, 0.0, False, False)
        o, lse = out[0], out[1].reshape(splits, kv, g * n)
        return unstack_heads(o[0], lse[0], g) if splits == 1 else self.merge_parts(o, lse, g)

    def attend_rows(self, q, keys, values, masked):
        """A decode step's attention, one new token per row: q (B, H, 1, d) over keys/values (B, KV, W, d);
        ``masked`` (B, 1, 1, W) bool is True where a row must not look -> (B, 1, H, d). Query heads sharing a
        KV head are the rows of one small matmul, so K and V are read once; the scores stay in the model
        dtype (softmax accumulates in float32 inside): the step is bound by reading K and V (measured on an
        H200: the two matmuls ran at the memory bandwidth, the float32 passes over the scores cost as much)."""
        B, D = q.shape[0], self.head_dim
        qg = (q * D ** -0.5).reshape(B, self.n_kv, self.n_heads // self.n_kv, D)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).masked_fill_(masked, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        return torch.matmul(p, values).reshape(B, 1, self.n_heads, D)
