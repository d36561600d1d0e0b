"""Differential attention: the mixer kind ``"diff"`` (learning path: modern architectures).

**V1** — Ye et al. 2024, "Differential Transformer" (arXiv:2410.05258), eq. (1)–(3) and section 2.1.
A differential head splits its query and key into two halves, makes two softmax maps and
subtracts them, so attention that both maps give to irrelevant context ("noise") cancels:

    A1 = softmax(Q1 K1ᵀ / √d),  A2 = softmax(Q2 K2ᵀ / √d)
    DiffAttn(X) = (A1 − λ A2) V                                               (eq. 1)
    λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init                                   (eq. 2)
    λ_init = 0.8 − 0.6 · exp(−0.3 · (l − 1)),  l = 1 … L                        (eq. 3)
    head_i = (1 − λ_init) · RMSNorm(DiffAttn_i(X)),  out = concat(head_i) W_O   (section 2.1, "GroupNorm")

λ is one scalar per layer, re-parameterised through four learned d-vectors so its learning
dynamics match the attention weights'; ``l − 1`` is our 0-based ``layer`` index (as in Hugging
Face's DiffLlama and the official code). The RMSNorm (no gain) normalises each head's 2d outputs
on its own, because the subtracted maps make the heads' statistics differ; the fixed
(1 − λ_init) scale brings the gradient flow back to a plain Transformer's.

Head bookkeeping: ``n_head`` and ``n_kv_head`` are the *baseline* Transformer's. V1 pairs its
``n_head`` softmax maps of width ``D = d_model / n_head`` into ``n_head / 2`` differential heads
whose value (and output) is ``2D`` wide — the same parameters and the same KV cache as the
baseline. Which heads pair is a storage choice (``DiffConfig.layout``): Hugging Face pairs head
``i`` with head ``i + n/2`` ("halves"), the official code pairs ``2i`` with ``2i + 1``
("adjacent"); :func:`permute_heads` converts weights between them.

**V2** — Ye, Dong, Sun, Wei 2026, "Differential Transformer V2" (Hugging Face blog and
``Diff-Transformer-V2/multihead_flashdiffv2.py`` in microsoft/unilm). Three changes:

* the query projection doubles (``2 · n_head`` query heads of width ``D``) while keys, values and
  the output projection stay the baseline's, so decoding reads the same KV cache as a plain
  Transformer, and the two subtracted maps share one key/value head (they sit in one GQA group);
* λ is per token and per head: ``σ(x W_λ)`` (a ``d_model → n_head`` projection), replacing the
  exponential re-parameterisation and λ_init;
* no per-head RMSNorm and no (1 − λ_init) factor (the norm hurt stability late in large runs):

    head_i = softmax(Q2i Kᵀ/√D) V − σ(x W_λ)_i · softmax(Q2i+1 Kᵀ/√D) V

Both versions have a spelled-out path (``model.attention = "manual"``: the two maps made and
subtracted as in eq. 1) and a fused one (``"sdpa"``: one ``scaled_dot_product_attention`` call on
the stacked halves, subtracting the outputs afterwards — equal because ``(A1 − λA2)V = A1V −
λA2V``); the tests check they agree. There is no attention dropout inside the mixer (the paper
defines none for the subtracted maps; Hugging Face refuses it too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import Rule, validate
from scratchlm.models.blocks.attention import attention_bias
from scratchlm.models.layers import apply_rope

LAYOUTS = ("halves", "adjacent")


@dataclass
class DiffConfig:
    version: int = 1  # 1: the paper (re-parameterised λ, per-head RMSNorm, ×(1−λ_init)); 2: DIFF V2 (σ(xW) λ per token, no norm)
    layout: str = "halves"  # paired heads in the weights: "halves" (i with i + n/2, Hugging Face) or "adjacent" (2i with 2i+1, official code)
    # V1: standard deviation of the normal init of λq1, λk1, λq2, λk2 (HF lambda_std_dev)
    lambda_std: float = 0.1

    def __post_init__(self):
        validate(
            self,
            "model.diff",
            {
                "version": Rule(choices=(1, 2)),
                "layout": Rule(choices=LAYOUTS),
                "lambda_std": Rule(min=0, why="init spread of V1's λ vectors"),
            },
        )


def lambda_init(layer: int) -> float:
    """Eq. (3) with ``layer`` = l − 1 (0-based): 0.2 at the first layer, rising toward 0.8."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


# --- head orders ------------------------------------------------------------------------------
# Two ways to store n paired heads a_j, b_j (j < n/2) along one axis:
#   halves:   a_0 a_1 … a_{n/2-1} b_0 b_1 … b_{n/2-1}    (Hugging Face DiffLlama)
#   adjacent: a_0 b_0 a_1 b_1 …                          (the official code)
def adjacent_to_halves(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Reorder the ``n`` heads along ``dim`` from adjacent pairs to halves."""
    return t.unflatten(dim, (n // 2, 2)).transpose(dim, dim + 1).flatten(dim, dim + 1)


def halves_to_adjacent(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Reorder the ``n`` heads along ``dim`` from halves to adjacent pairs."""
    return t.unflatten(dim, (2, n // 2)).transpose(dim, dim + 1).flatten(dim, dim + 1)


class DiffAttention(nn.Module):
    """Causal differential attention, V1 or V2 (see the module docstring), with GQA."""

    kv_cache = True  # stores the baseline's k, v (n_kv_head heads of width D) through cache.update

    def __init__(self, config, layer: int):
        super().__init__()
        settings = config.diff or DiffConfig()
        self.version, self.layout = settings.version, settings.layout
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        if config.attention not in ("manual", "sdpa"):
            raise ValueError(
                f"differential attention has 'manual' and 'sdpa' paths; model.attention = "
                f"{config.attention!r} is not one of them"
            )
        if self.version == 1 and (H % 2 or Hkv % 2):
            raise ValueError(
                f"differential attention V1 pairs heads: model.n_head = {H} and model.n_kv_head = {Hkv} "
                "must both be even"
            )
        self.impl = config.attention
        self.n_query = H if self.version == 1 else 2 * H  # V2 adds a second query per output head
        self.qkv = nn.Linear(config.d_model, (self.n_query + 2 * Hkv) * D, bias=config.bias)
        self.proj = nn.Linear(H * D, config.d_model, bias=config.bias)
        if self.version == 1:
            self.lambda_init = lambda_init(layer)
            self.norm_eps = config.norm_eps
            # One λ per layer, shared by all heads (eq. 2); random at start so the two exp terms differ.
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                self.register_parameter(name, nn.Parameter(torch.randn(D) * settings.lambda_std))
        else:
            self.lambda_proj = nn.Linear(config.d_model, H, bias=False)  # λ per token and output head

    def cache_values_per_token(self) -> int:
        """Values kept per token: the baseline's k and v (``n_kv_head`` heads of width D each)."""
        return 2 * self.n_kv_head * self.head_dim

    def context_flops(self, context: int) -> float:
        """Forward FLOPs per token spent over ``context`` keys: q·k (2·D) for every softmax map and
        the weighted sum of its values. V1's n_head maps of D, summed into n_head/2 values of 2D,
        cost a baseline's 4·n_head·D per key (eq. 1 combines the maps before touching V); V2's
        2·n_head maps cost twice that."""
        return 4 * self.n_query * self.head_dim * context

    def lambda_full(self) -> torch.Tensor:
        """V1's λ (eq. 2), a scalar, computed in float32."""
        lambda_1 = torch.exp((self.lambda_q1.float() * self.lambda_k1.float()).sum())
        lambda_2 = torch.exp((self.lambda_q2.float() * self.lambda_k2.float()).sum())
        return lambda_1 - lambda_2 + self.lambda_init

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self, x, *, rope=None, alibi=None, cache=None, layer: int = 0, packed_mask=None, positions=None
    ) -> torch.Tensor:
        if alibi is not None:
            raise ValueError(
                "differential attention takes RoPE or no positions inside attention; ALiBi is not supported"
            )
        if cache is not None and cache.paged:
            raise ValueError(
                "differential attention does not run on the engine's paged cache; use generate() "
                "with the contiguous KVCache"
            )
        B, T, _ = x.shape
        q, k, v = self._project(x)  # (B, heads, T, D), heads in the order the attention below reads
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D): every position so far
        y = (
            self._v1(q, k, v, start, packed_mask)
            if self.version == 1
            else self._v2(x, q, k, v, start, packed_mask)
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _project(self, x):
        """q, k, v as (B, heads, T, D). V1 reads its heads in halves (q = [Q1 heads; Q2 heads],
        k = [K1 heads; K2 heads], v = [first D of each 2D value; second D]): stacked that way, one
        GQA attention call sends query head j to the right key head in both halves. V2 reads its
        query heads in adjacent pairs, so the two queries of a pair fall in one GQA group and share
        a key. Weights stored in the other layout are reordered here (a view, no copy of weights)."""
        B, T, _ = x.shape
        Hkv, D, Hq = self.n_kv_head, self.head_dim, self.n_query
        q, k, v = self.qkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, T, Hq, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        if self.version == 1 and self.layout == "adjacent":
            q, k, v = (
                adjacent_to_halves(q, Hq, 2),
                adjacent_to_halves(k, Hkv, 2),
                adjacent_to_halves(v, Hkv, 2),
            )
        if self.version == 2 and self.layout == "halves":
            q = halves_to_adjacent(q, Hq, 2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _v1(self, q, k, v, start, packed_mask):
        """(B, H/2, T, 2D): eq. (1) per differential head, then the per-head RMSNorm and (1 − λ_init)."""
        lam = self.lambda_full().to(q.dtype)
        values = torch.cat(
            v.chunk(2, dim=1), dim=-1
        )  # (B, Hkv/2, S, 2D): a differential head's value is 2D wide
        if self.impl == "manual":
            q1, q2 = q.chunk(2, dim=1)  # (B, H/2, T, D)
            k1, k2 = k.chunk(2, dim=1)  # (B, Hkv/2, S, D)
            a1 = self._softmax_map(q1, k1, start, packed_mask)  # (B, H/2, T, S)
            a2 = self._softmax_map(q2, k2, start, packed_mask)
            y = (a1 - lam * a2) @ self._expand(values, q1.shape[1])
        else:
            # Both halves of the query heads read the same 2D values: stack them twice along the KV heads.
            out = _sdpa(q, k, torch.cat([values, values], dim=1), start, packed_mask)  # (B, H, T, 2D)
            out1, out2 = out.chunk(2, dim=1)
            y = out1 - lam * out2
        # Per-head RMSNorm over the 2D outputs (no gain), in float32 as our RMSNorm does.
        normed = y.float() * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return (1 - self.lambda_init) * normed.to(y.dtype)

    def _v2(self, x, q, k, v, start, packed_mask):
        """(B, H, T, D): head i = A_2i V − σ(λ_i(x)) A_2i+1 V, both maps over the same k, v."""
        lam = torch.sigmoid(self.lambda_proj(x)).transpose(1, 2)[..., None]  # (B, H, T, 1)
        if self.impl == "manual":
            a1 = self._softmax_map(q[:, 0::2], k, start, packed_mask)  # (B, H, T, S)
            a2 = self._softmax_map(q[:, 1::2], k, start, packed_mask)
            return (a1 - lam * a2) @ self._expand(v, self.n_head)
        out = _sdpa(q, k, v, start, packed_mask)  # (B, 2H, T, D)
        return out[:, 0::2] - lam * out[:, 1::2]

    def _expand(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """Repeat KV heads so each of ``heads`` query heads has its own (GQA spelled out)."""
        return t.repeat_interleave(heads // t.shape[1], dim=1)

    def _softmax_map(self, q, k, start, packed_mask):
        """One attention map softmax(q kᵀ / √D) under the causal (or packed-row) mask: (B, h, T, S)."""
        k = self._expand(k, q.shape[1])
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if packed_mask is not None:
            scores = scores.masked_fill(~packed_mask, float("-inf"))
        else:
            scores = scores + attention_bias(q.shape[2], k.shape[2], start, None, q.device, scores.dtype)
        return torch.softmax(scores.float(), dim=-1).to(q.dtype)


def _sdpa(q, k, v, start: int, packed_mask) -> torch.Tensor:
    """PyTorch's fused attention, causal from position ``start`` (or under a packed-row mask),
    with ``q``'s heads grouped over ``k``'s (GQA); ``v`` may be wider than ``q`` and ``k``."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if packed_mask is not None:  # GQA with a mask: expand k, v (see Attention._packed)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=packed_mask)
    if start == 0 and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if T == 1:  # one new token sees everything cached
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = attention_bias(T, S, start, None, q.device, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def permute_heads(state_dict: dict, config, layout: str) -> dict:
    """A model's weights with every ``"diff"`` layer's heads reordered from ``config.diff.layout``
    to ``layout`` ("halves" or "adjacent"); load them into a model whose ``diff.layout`` is
    ``layout`` and it computes the same function.

    Only the rows of the fused q/k/v projection move (whole heads of D rows each): V1 reorders
    the query heads, the key heads and the value halves alike (the official code's 2D-wide value
    head g is Hugging Face's value heads g and g + n_kv_head/2, stacked); V2 reorders its 2·n_head
    query heads only (its keys and values are a plain Transformer's). The output projection, λ
    and everything else stay as they are: the differential heads come out in the same order.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    source = (config.diff or DiffConfig()).layout
    if layout == source:
        return dict(state_dict)
    reorder = halves_to_adjacent if layout == "adjacent" else adjacent_to_halves
    version = (config.diff or DiffConfig()).version
    H, Hkv, D = config.n_head, config.kv_heads, config.head_dim
    Hq = H if version == 1 else 2 * H
    out = dict(state_dict)
    for i, (mixer, _) in enumerate(config.layer_kinds()):
        if mixer != "diff":
            continue
        for suffix in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{suffix}"
            if key not in out:
                continue
            q, k, v = out[key].split([Hq * D, Hkv * D, Hkv * D], dim=0)
            q = reorder(q.unflatten(0, (Hq, D)), Hq, 0).flatten(0, 1)
            if version == 1:
                k = reorder(k.unflatten(0, (Hkv, D)), Hkv, 0).flatten(0, 1)
                v = reorder(v.unflatten(0, (Hkv, D)), Hkv, 0).flatten(0, 1)
            out[key] = torch.cat([q, k, v], dim=0)
    return out
