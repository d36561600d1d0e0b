"""Multi-head Latent Attention (MLA): DeepSeek-V2 (arXiv:2405.04434, section 2.1, eqs. 9–19), used
unchanged by DeepSeek-V3 (arXiv:2412.19437, section 2.1.1, eqs. 1–11).

Standard multi-head attention caches a key and a value per head: ``2 · n_h · d_h`` values per
token per layer. MLA caches one small *latent* per token instead and rebuilds the heads' keys and
values from it (V2 eqs. 9–11):

    c_KV = W_DKV h                      the compressed latent, d_c wide      (cached)
    k_C  = W_UK c_KV,  v_C = W_UV c_KV  per-head keys (no position) and values, rebuilt

Queries may be compressed too (eqs. 12–13: ``c_Q = W_DQ h``, ``q_C = W_UQ c_Q``; V2-Lite uses a
plain projection). RoPE cannot be applied to ``k_C``: a rotation between ``W_UK`` and the query
would block folding ``W_UK`` into the query (below). So position goes through a separate,
*decoupled* part (eqs. 14–19): every head gets an extra ``d_h^R`` query dimensions ``q_R``, and one
``d_h^R``-wide key ``k_R = RoPE(W_KR h)`` is shared by all heads (and cached beside ``c_KV``):

    q_i = [q_C,i ; RoPE(q_R,i)],  k_i = [k_C,i ; k_R],  o_i = softmax(q_i·k_j / sqrt(d_h + d_h^R)) v_C,j
    u   = W_O [o_1 ; ... ; o_n_h]

Cache per token per layer: ``d_c + d_h^R`` values (DeepSeek-V3: 512 + 64 = 576, vs 2 · 128 · 128
= 32768 for full MHA of the same heads).

**Weight absorption** (V2 section 2.1.2, end): ``q_C,i · k_C,i = q_C,i · (W_UK,i c) = (W_UK,i^T q_C,i) · c``,
so the query can be mapped into the latent space once and attend directly over the cached latents,
and ``o_i = W_UV,i (Σ_j p_ij c_j)``: the weighted sum of latents is taken first and ``W_UV`` applied
once per query. The keys and values are never rebuilt — decoding becomes multi-query attention
with one ``(d_c + d_h^R)``-wide key head whose value is the latent itself. Both paths are here:
:meth:`MLA._attend_expanded` (readable: rebuild k, v) and :meth:`MLA._attend_absorbed`. Which runs
is a cost decision (:meth:`MLA.absorb_pays`): absorbing attends at width ``2·d_c + d_h^R`` instead
of ``d_h + d_h^R + d_v`` but never rebuilds the S cached keys and values, so it wins for a few new
tokens over a long cache (decoding) and loses for a prefill (without a cache, training, always the
readable path).

Layout (as Hugging Face and DeepSeek's reference code, so weights map one to one): ``kv_down``
makes ``[c_KV (d_c) ; k_R (d_h^R)]`` in one matmul (W_DKV and W_KR fused), ``kv_up`` makes each
head's ``[k_C (d_h) ; v_C (d_v)]`` (W_UK and W_UV fused), and each head's query is
``[q_C (d_h) ; q_R (d_h^R)]``. Our RoPE rotates halves (dimension i with i + d/2); DeepSeek's
checkpoints rotate interleaved pairs (2i, 2i+1): :mod:`scratchlm.models.hf.deepseek` permutes the
rope rows of the query and ``kv_down`` weights at import, which leaves every q·k unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import ConfigError, Rule, validate
from scratchlm.models.blocks.attention import attention_bias
from scratchlm.models.layers import RMSNorm, apply_rope

LATENT_NORM_EPS = 1e-6  # DeepSeek's latent RMSNorms use 1e-6 whatever the model's own norm eps


@dataclass
class MLAConfig:
    q_lora_rank: int | None = None  # query latent width d_c'; None: one plain query projection (V2-Lite)
    kv_lora_rank: int = 64  # key/value latent width d_c: what the cache keeps per token
    qk_nope_head_dim: int = 32  # per-head query/key width without position, d_h
    qk_rope_head_dim: int = 16  # decoupled RoPE width d_h^R (query per head; one key shared by all heads)
    v_head_dim: int = 32  # per-head value width d_v
    # with a cache: attend over the latent (W_UK, W_UV folded in) when cheaper; False: rebuild k, v
    absorb: bool = True

    def __post_init__(self):
        validate(
            self,
            "model.mla",
            {
                "q_lora_rank": Rule(min=1),
                "kv_lora_rank": Rule(min=1),
                "qk_nope_head_dim": Rule(min=1),
                "qk_rope_head_dim": Rule(min=2, why="an even width: RoPE rotates pairs"),
                "v_head_dim": Rule(min=1),
            },
        )
        if self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"model.mla.qk_rope_head_dim = {self.qk_rope_head_dim}: must be even (RoPE rotates pairs)"
            )


def mla_rope(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for MLA's decoupled RoPE width ``dim`` at ``positions`` ((T,) or (B, T)), in the
    rotate-half layout of :func:`~scratchlm.models.layers.rope_tables` (its frequencies, computed
    here because the model's own tables are sized for ``d_model / n_head``)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class MLA(nn.Module):
    """Multi-head latent attention: caches ``latent`` (B, S, d_c) and ``k_rope`` (B, S, d_h^R)."""

    kv_cache = False  # keeps the latent in cache.state(layer), not per-head k, v

    def __init__(self, config, layer: int):
        super().__init__()
        m = config.mla or MLAConfig()
        self.n_head, self.theta, self.impl = config.n_head, config.rope_theta, config.attention
        self.q_rank, self.d_c = m.q_lora_rank, m.kv_lora_rank
        self.d_nope, self.d_rope, self.d_v = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.absorb = m.absorb
        self.scale = 1.0 / math.sqrt(self.d_nope + self.d_rope)  # (YaRN's mscale would multiply here)
        self.dropout = config.dropout
        H, C, d_q = self.n_head, config.d_model, self.d_nope + self.d_rope
        if self.q_rank is None:  # V2-Lite: W_UQ and W_QR as one plain projection of h
            self.q = nn.Linear(C, H * d_q, bias=False)
        else:  # eqs. 12–14: h -> c_Q -> [q_C ; q_R] per head
            self.q_down = nn.Linear(C, self.q_rank, bias=config.bias)
            self.q_norm = RMSNorm(self.q_rank, LATENT_NORM_EPS)
            self.q_up = nn.Linear(self.q_rank, H * d_q, bias=False)
        self.kv_down = nn.Linear(C, self.d_c + self.d_rope, bias=config.bias)  # [W_DKV ; W_KR] (eqs. 9, 15)
        self.kv_norm = RMSNorm(self.d_c, LATENT_NORM_EPS)
        self.kv_up = nn.Linear(
            self.d_c, H * (self.d_nope + self.d_v), bias=False
        )  # [W_UK ; W_UV] per head (eqs. 10–11)
        self.proj = nn.Linear(H * self.d_v, C, bias=config.bias)  # W_O (eq. 19)

    def decode_context_flops(self, context: int) -> float:
        """The same for one decoding step, which attends over the latent with W_UK and W_UV folded
        in: scores at width d_c + d_rope, the weighted sum at width d_c, per head."""
        return 2 * self.n_head * (2 * self.d_c + self.d_rope) * context

    def context_flops(self, context: int) -> float:
        """Forward FLOPs per token over ``context`` keys: q·k at width d_nope + d_rope, then the
        weighted sum at width d_v, for every head (the plain path; absorption trades these for
        latent-width products at decode)."""
        return 2 * self.n_head * (self.d_nope + self.d_rope + self.d_v) * context

    def cache_values_per_token(self) -> int:
        """Values cached per token: the latent and the shared RoPE key, nothing per head."""
        return self.d_c + self.d_rope

    # --- the pieces ------------------------------------------------------------------------------
    def _queries(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope (B, H, T, d_h) and RoPE'd q_rope (B, H, T, d_h^R)."""
        B, T, _ = x.shape
        q = self.q(x) if self.q_rank is None else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(B, T, self.n_head, self.d_nope + self.d_rope).transpose(1, 2)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def _latents(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised latent c_KV (B, T, d_c) and the RoPE'd shared key k_R (B, T, d_h^R)."""
        latent, k_rope = self.kv_down(x).split([self.d_c, self.d_rope], dim=-1)
        k_rope = apply_rope(k_rope[:, None], cos, sin)[:, 0]  # one "head", shared by all
        return self.kv_norm(latent), k_rope

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, d_h, d_c) and W_UV (H, d_v, d_c), the per-head slices of ``kv_up``."""
        w = self.kv_up.weight.view(self.n_head, self.d_nope + self.d_v, self.d_c)
        return w[:, : self.d_nope], w[:, self.d_nope :]

    # --- the two ways to attend -------------------------------------------------------------
    def _attend_expanded(self, q_nope, q_rope, latent, k_rope, mask, causal: bool) -> torch.Tensor:
        """Readable path: rebuild every head's key and value from the latent, then attend (eqs. 10–11, 17–18)."""
        B, S, _ = latent.shape
        kv = self.kv_up(latent).view(B, S, self.n_head, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)  # (B, H, S, d_h), (B, H, S, d_v)
        k = torch.cat([k_nope, k_rope[:, None].expand(-1, self.n_head, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return self._attention(q, k, v, mask, causal)  # (B, H, T, d_v)

    def _attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask, causal: bool) -> torch.Tensor:
        """Absorbed path: W_UK folded into the query, W_UV applied after the weighted sum of latents.

        Attention then runs over the cached ``[c_KV ; k_R]`` directly, one key "head" of width
        d_c + d_h^R shared by all query heads, with the latent itself as the value.
        """
        w_uk, w_uv = self._up_weights()
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # W_UK,i^T q_C,i: (B, H, T, d_c)
        q = torch.cat([q_latent, q_rope], dim=-1)
        k = torch.cat([latent, k_rope], dim=-1)[:, None].expand(-1, self.n_head, -1, -1)
        v = latent[:, None].expand(-1, self.n_head, -1, -1)
        o_latent = self._attention(q, k, v, mask, causal)  # Σ_j p_ij c_j: (B, H, T, d_c)
        return torch.einsum("bhtc,hvc->bhtv", o_latent, w_uv)  # W_UV,i (Σ_j p_ij c_j): (B, H, T, d_v)

    def _attention(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        """softmax(q·k · scale + mask) v. ``causal``: the T queries are the last T of the S keys'
        positions and see the keys up to their own; else ``mask`` is a boolean or additive float
        (.., T, S) mask, or None when every query sees every key (a decoding step). "manual" spells
        it out; otherwise ("sdpa", and "tiled", which has no MLA variant) PyTorch's SDPA."""
        dropout = self.dropout if self.training else 0.0
        if self.impl == "manual":
            scores = (q @ k.transpose(-2, -1)) * self.scale
            T, S = scores.shape[-2:]
            if causal:
                mask = attention_bias(T, S, S - T, None, q.device, scores.dtype)
            if mask is not None:
                scores = (
                    scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
                )
            weights = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout, self.training)
            return weights @ v
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.scale
        )

    def absorb_pays(self, T: int, S: int) -> bool:
        """Whether the absorbed path costs fewer multiply-adds (per head) for T new queries over S keys:

            rebuild k, v:  S·d_c·(d_h + d_v)  +  T·S·(d_h + d_h^R + d_v)
            absorbed:      T·d_c·(d_h + d_v)  +  T·S·(2·d_c + d_h^R)

        (first term: W_UK, W_UV applied to the S latents, or to the T queries and outputs; second:
        scores and weighted sum.) A decoding step (T = 1) absorbs; a prefill from an empty cache
        (T = S) rebuilds; at DeepSeek-V3's shapes, absorbing pays for chunks up to ~170 new tokens."""
        dh, dv, dr, dc = self.d_nope, self.d_v, self.d_rope, self.d_c
        expanded = S * dc * (dh + dv) + T * S * (dh + dr + dv)
        absorbed = T * dc * (dh + dv) + T * S * (2 * dc + dr)
        return absorbed < expanded

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self, x, *, rope=None, alibi=None, cache=None, layer: int = 0, packed_mask=None, positions=None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        if alibi is not None:
            raise ValueError(
                "MLA carries position in its decoupled RoPE; model.position = 'alibi' does not apply"
            )
        if cache is not None and cache.paged:
            raise ValueError(
                "MLA keeps a latent per token; the engine's paged k/v cache does not hold it yet"
            )
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=x.device)
        # The model's ``rope`` tables are sized for d_model / n_head: MLA makes its own for d_h^R,
        # in each layer (a (T, d_h^R / 2) outer product and its cos, sin: small beside the matmuls).
        cos, sin = mla_rope(positions, self.d_rope, self.theta)
        if positions.dim() == 2:  # packed rows: (B, T, d) -> broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, k_rope = self._latents(x, cos, sin)

        mask, causal, absorbed = packed_mask, packed_mask is None, False
        if cache is not None:
            if packed_mask is not None:
                raise ValueError("MLA: packed rows are for training, not with a cache")
            start = cache.length
            latent, k_rope = self._remember(cache, layer, latent, k_rope, start)
            S = latent.shape[1]
            if T == 1:  # one new token sees every cached key: nothing to mask
                causal = False
            elif start > 0:  # a chunk after cached tokens: causal, offset by the cache
                mask, causal = attention_bias(T, S, start, None, x.device, x.dtype), False
            absorbed = self.absorb and self.absorb_pays(T, S)
        attend = self._attend_absorbed if absorbed else self._attend_expanded
        y = attend(q_nope, q_rope, latent, k_rope, mask, causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.d_v))

    def _remember(self, cache, layer: int, latent, k_rope, start: int):
        """Write the new positions' latent and RoPE key into ``cache.state(layer)`` (allocated to
        the cache's length on first use); return everything cached so far."""
        state = cache.state(layer)
        B, T, _ = latent.shape
        if "latent" not in state:
            state["latent"] = latent.new_zeros(B, cache.max_len, self.d_c)
            state["k_rope"] = k_rope.new_zeros(B, cache.max_len, self.d_rope)
        end = start + T
        if end > state["latent"].shape[1]:
            raise ValueError(f"MLA cache holds {state['latent'].shape[1]} positions; {end} were asked for")
        state["latent"][:, start:end] = latent
        state["k_rope"][:, start:end] = k_rope
        return state["latent"][:, :end], state["k_rope"][:, :end]
