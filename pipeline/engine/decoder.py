"""The language model half of Qwen2-VL as a small decoder over a preallocated KV cache.

It borrows the checkpoint's own modules (embeddings, norms, projections, MLPs, head: whatever
transformers loaded, with the Liger kernel when applied) and owns only what a streaming session
needs to own: the cache, the mRoPE rotation and the attention call. The same ``forward`` serves
prefill (many tokens) and decode (one token); ``graph.py`` captures the decode step on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Prefill attends with a mask whose width grows every turn. cuDNN's attention builds a new plan for every
# new shape (2.5 ms of CPU per layer per turn, measured on an H100); the memory-efficient kernel does not.
MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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


def pre_attention(x, ln_w, qkv_w, qkv_b, cos, sin, eps: float, n_heads: int, n_kv: int, head_dim: int):
    """A layer up to attention: norm -> q|k|v -> rotary. x (1, T, hidden) -> q (1, H, T, d), k, v (1, KV, T, d)."""
    T = x.shape[1]
    q, k, v = F.linear(rms_norm(x, ln_w, eps), qkv_w, qkv_b).split(
        [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(1, T, n_heads, head_dim).transpose(1, 2)
    k = k.view(1, T, n_kv, head_dim).transpose(1, 2)
    v = v.view(1, T, n_kv, head_dim).transpose(1, 2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v


def post_attention(x, o, o_w, ln_w, gate_up_w, down_w, eps: float):
    """A layer after attention: output projection + residual, norm -> SwiGLU MLP + residual."""
    x = x + F.linear(o, o_w)
    gate, up = F.linear(rms_norm(x, ln_w, eps), gate_up_w).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down_w)


@torch.no_grad()
def fuse_projections(layer) -> None:
    """One matrix for q|k|v and one for gate|up, each read in one pass per token.

    The module's own parameters become views into the fused tensors, so nothing is stored twice
    and transformers' modules (and the Liger kernel's) keep working on the same weights.
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


class KVCache(nn.Module):
    """Keys (rotated) and values of every layer, preallocated: (layers, kv_heads, capacity, head_dim)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        super().__init__()
        shape = (layers, 1, kv_heads, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.capacity = capacity
        self.length = 0  # tokens in use

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class TextDecoder(nn.Module):
    def __init__(self, hf_model, capacity: int):
        super().__init__()
        text, self.lm_head = language_parts(hf_model)
        tc = text_config(hf_model)
        self.embed = text.embed_tokens
        self.layers = text.layers
        self.norm = text.norm
        self.n_heads = tc.num_attention_heads
        self.n_kv = tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        theta, self.mrope_section = _rope_settings(tc)
        p = next(self.lm_head.parameters())
        self.dtype, self.device = p.dtype, p.device
        inv = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        self.register_buffer("inv_freq", inv.to(self.device), persistent=False)
        self.cache = KVCache(len(self.layers), self.n_kv, self.head_dim, capacity, self.dtype, self.device)
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        for layer in self.layers:
            fuse_projections(layer)
        norm = self.layers[0].input_layernorm
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self._weights = [(l.input_layernorm.weight, l.qkv_weight, l.qkv_bias, l.self_attn.o_proj.weight,
                          l.post_attention_layernorm.weight, l.gate_up_weight, l.mlp.down_proj.weight)
                         for l in self.layers]
        self._pre, self._post = pre_attention, post_attention  # the decode step's (one token)
        self._pre_t, self._post_t = pre_attention, post_attention  # prefill's (any length; eager)
        self.flash_prefill = self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)

    def uncompile(self) -> None:
        self._pre, self._post = pre_attention, post_attention

    def compile(self) -> None:
        """Fuse the decode step's small kernels around attention (norms, rotary, residuals, SiLU) with
        torch.compile. (Prefill is left eager: a dynamic-length compile measured slower, 41 vs 28 ms.)"""
        self._pre = torch.compile(pre_attention, fullgraph=True, dynamic=False)
        self._post = torch.compile(post_attention, fullgraph=True, dynamic=False)


    # -- rotary ---------------------------------------------------------------------------------
    def rotary(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T, head_dim) for positions (3, T): section i takes component i % 3."""
        freqs = pos.to(self.inv_freq.device)[..., None].float() * self.inv_freq  # 3, T, hd/2
        parts = freqs.split(self.mrope_section, dim=-1)
        f = torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)
        f = torch.cat((f, f), dim=-1)
        return f.cos().to(self.dtype), f.sin().to(self.dtype)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, pos: torch.Tensor, start: int, all_logits: bool = False) -> torch.Tensor:
        """Run (1, T, hidden) embeddings at cache slots start..start+T; returns float32 logits.

        Only the last position's logits unless ``all_logits``.
        """
        T = x.shape[1]
        end = start + T
        if end > self.cache.capacity:
            raise RuntimeError(f"context full: {end} tokens > capacity {self.cache.capacity}")
        cos, sin = self.rotary(pos)
        mask = None
        if T > 1:  # causal, offset by the cached tokens; one row per (query head in a group, token)
            q_idx = torch.arange(start, end, device=x.device)[:, None]
            allowed = torch.arange(end, device=x.device)[None, :] <= q_idx
            # additive, in the model's dtype, built once for all layers; rows padded to 8 for the fused kernels
            width = (end + 7) // 8 * 8
            mask = torch.full((T, width), float("-inf"), dtype=self.dtype, device=x.device)
            mask[:, :end].masked_fill_(allowed, 0.0)
            mask = mask.repeat(self.n_heads // self.n_kv, 1)[:, :end]
        for i, layer in enumerate(self.layers):
            x = self._layer(layer, i, x, cos, sin, start, end, mask)
        self.cache.length = end
        x = self.norm(x if all_logits else x[:, -1:])
        return self.lm_head(x).float()

    def _layer(self, layer, i, x, cos, sin, start, end, mask):
        T = x.shape[1]
        w = self._weights[i]
        q, k, v = self._pre_t(x, w[0], w[1], w[2], cos, sin, self.eps, self.n_heads, self.n_kv, self.head_dim)
        self.cache.k[i, :, :, start:end] = k
        self.cache.v[i, :, :, start:end] = v
        if self.flash_prefill and T > 1:
            o = self.attend_flash(q, k, v, self.cache.k[i, :, :, :start], self.cache.v[i, :, :, :start])
        else:
            o = self.attend(q, self.cache.k[i, :, :, :end], self.cache.v[i, :, :, :end], mask)
        return self._post_t(x, o.transpose(1, 2).reshape(1, T, -1), w[3], w[4], w[5], w[6], self.eps)

    def decode_static(self, tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, window: int) -> torch.Tensor:
        """One token with every shape fixed, for CUDA-graph capture: logits (V,) float32.

        ``tok`` (1,), ``pos`` (3, 1) and ``slot`` (1,) are device tensors (the graph's inputs); attention
        reads the first ``window`` cache slots and masks those after ``slot``. The work around attention is
        two pure functions (``pre_attention`` / ``post_attention``) that ``compile()`` can fuse.
        """
        x = self.embed(tok)[None]  # 1, 1, H
        cos, sin = self.rotary(pos)
        mask = (torch.arange(window, device=x.device) <= slot)[None, None, None, :]  # 1, 1, 1, window
        pre, post = self._pre, self._post
        for i, layer in enumerate(self.layers):
            w = self._weights[i]
            q, k, v = pre(x, w[0], w[1], w[2], cos, sin, self.eps, self.n_heads, self.n_kv, self.head_dim)
            self.cache.k[i].index_copy_(2, slot, k)
            self.cache.v[i].index_copy_(2, slot, v)
            o = self.attend_one(q, self.cache.k[i, :, :, :window], self.cache.v[i, :, :, :window], mask)
            x = post(x, o.reshape(1, 1, -1), w[3], w[4], w[5], w[6], self.eps)
        return self.lm_head(self.norm(x))[0, 0].float()

    @torch.no_grad()
    def evict(self, start: int, end: int, shift: int) -> None:
        """Drop cache slots [start, end) and move the later ones down, their keys re-rotated by -shift
        positions (a RoPE rotation composes: R(p - s) = R(-s) R(p), on every mRoPE section alike).
        Nothing is recomputed; one layer at a time, so the extra memory is one layer's tail."""
        length = self.cache.length
        n = end - start
        if n <= 0:
            return
        f = -shift * self.inv_freq.float()
        f = torch.cat((f, f))
        cos, sin = f.cos(), f.sin()
        for i in range(len(self.layers)):
            k_tail = self.cache.k[i, :, :, end:length].float()
            k_tail = k_tail * cos + rotate_half(k_tail) * sin
            self.cache.k[i, :, :, start:length - n] = k_tail.to(self.dtype)
            self.cache.v[i, :, :, start:length - n] = self.cache.v[i, :, :, end:length].clone()
        self.cache.length = length - n

    def attend_one(self, q, keys, values, mask):
        """One query token: two small matmuls per KV head group; K and V are read once."""
        qg = q.reshape(1, self.n_kv, self.n_heads // self.n_kv, self.head_dim)  # 1, kv, group, d
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.head_dim ** -0.5
        p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(values.dtype)
        return torch.matmul(p, values).reshape(1, self.n_heads, self.head_dim)  # 1, H, d

    def attend_flash(self, q, k_new, v_new, k_past, v_past):
        """Prefill on CUDA without a mask: flash attention over the cached past (every new token sees all of it,
        query heads grouped per KV head) and, causally, over the new tokens; the two merged by log-sum-exp."""
        _, H, T, D = q.shape
        g = H // self.n_kv
        flash = torch.ops.aten._scaled_dot_product_flash_attention
        new = flash(q, k_new.repeat_interleave(g, dim=1), v_new.repeat_interleave(g, dim=1), 0.0, True)
        o_new, lse_new = new[0], new[1]
        if k_past.shape[2] == 0:
            return o_new
        past = flash(q.reshape(1, self.n_kv, g * T, D), k_past, v_past, 0.0, False)
        o_past, lse_past = past[0].reshape(1, H, T, D), past[1].reshape(1, H, T)
        lse = torch.logaddexp(lse_new, lse_past)
        w_new = torch.exp(lse_new - lse).unsqueeze(-1)
        return (o_new.float() * w_new + o_past.float() * (1 - w_new)).to(q.dtype)

    def attend(self, q, keys, values, mask):
        """Grouped-query attention without copying K/V per query head: the query heads sharing a
        KV head are laid out as extra query rows of that head (mask rows repeat accordingly)."""
        _, H, T, D = q.shape
        qg = q.reshape(1, self.n_kv, (H // self.n_kv) * T, D)
        if q.device.type == "cuda":
            with sdpa_kernel(MASKED_BACKENDS):
                o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        else:
            o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        return o.reshape(1, H, T, D)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids.to(self.device))
