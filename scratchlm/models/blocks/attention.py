"""Causal self-attention: multi-head with grouped key/value heads (MHA, GQA, MQA), sliding windows.

The one attention mixer of the plain stack ("attention" and "sliding" layers): a fused q, k, v
projection, RoPE or ALiBi positions, the KV cache (a ring buffer for a sliding window), and three
implementations of the same product (spelled out, PyTorch's fused SDPA, and FlashAttention's tiled
online softmax in ``flash_attention.py``). Its settings are the ``[model.attn]`` table,
:class:`AttentionConfig` (``GPTConfig.attn``): the sliding window, the head width, q/k/v biases
(Qwen2), q/k norms (Qwen3), the score scale and soft cap (Gemma-2). Configs and checkpoints written
before the table kept these six at the top of ``[model]`` (``sliding_window``, ``d_head``,
``qkv_bias``, ``qk_norm``, ``attn_scale``, ``attn_softcap``); :func:`move_legacy_keys` reads them.

Shapes used throughout: ``B`` batch, ``T`` new positions, ``S`` positions attended to (``T`` plus
whatever the KV cache already holds), ``H`` query heads, ``Hkv`` key/value heads, ``D`` head width,
``C = d_model``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import ConfigError, Rule, validate
from scratchlm.models.blocks.flash_attention import tiled_attention
from scratchlm.models.layers import RMSNorm, apply_rope

# The mixers that read [model.attn]: ``Attention`` is the mixer of both ("mamba" layers read
# nothing of it, and a Jamba-style stack mixes them with attention layers, so they are let be).
READERS = {"attention", "sliding"}
_INDIFFERENT = {"mamba"}


@dataclass
class AttentionConfig:
    """``[model.attn]``: the settings of "attention" and "sliding" layers. Every one unset (the
    default) is plain causal attention with ``d_model / n_head`` wide heads scaled by
    ``1/sqrt(head width)``; a config with nothing set here writes no table at all."""

    window: int | None = None  # keys each query of a "sliding" layer sees, its own included (Mistral: 4096)
    head_dim: int | None = None  # head width, free of d_model (Gemma-2: 256); None: d_model / n_head
    qkv_bias: bool | None = None  # biases on q, k, v, not the output projection (Qwen2); None: as model.bias
    qk_norm: bool | None = None  # RMSNorm each query and key head before RoPE (Qwen3, OLMo-2); None: off
    scale: float | None = None  # multiplies q·k (Gemma-2: query_pre_attn_scalar^-1/2); None: head width^-1/2
    softcap: float | None = None  # scores -> c·tanh(scores / c) before the mask (Gemma-2: 50); None: off

    def __post_init__(self):
        validate(
            self,
            "model.attn",
            {
                "window": Rule(min=1, why="keys each query sees in a sliding layer, itself included"),
                "head_dim": Rule(min=1, why="attention head width"),
                "scale": Rule(above=0),
                "softcap": Rule(above=0),
            },
        )

    def is_default(self) -> bool:
        return self == AttentionConfig()

    def check(self, mixers: set[str], kernel: str) -> None:
        """Refuse a setting that no layer of ``mixers`` would read (so none is silently ignored),
        and ones the attention ``kernel`` (``GPTConfig.attention``) cannot compute."""
        if "sliding" in mixers and self.window is None:
            raise ConfigError(
                "model.layers has 'sliding' layers: set model.attn.window (keys each query sees)"
            )
        if "sliding" not in mixers and self.window is not None:
            raise ConfigError(
                f"model.attn.window = {self.window} but no layer is 'sliding': add 'sliding' "
                'to model.layers (e.g. ["sliding"] or ["sliding", "attention"]), '
                "or remove it"
            )
        others = sorted(mixers - READERS - _INDIFFERENT)
        scoring = [f"model.attn.{name}" for name in ("scale", "softcap") if getattr(self, name) is not None]
        if scoring and not mixers & READERS:
            raise ConfigError(
                f"{' and '.join(scoring)} apply to 'attention' and 'sliding' layers only; "
                "model.layers has none"
            )
        if scoring and others:
            raise ConfigError(
                f"{' and '.join(scoring)} apply to 'attention' and 'sliding' layers only; "
                f"model.layers also has {others}"
            )
        if self.softcap is not None and kernel == "tiled":
            raise ConfigError(
                "model.attn.softcap needs every score at once: use model.attention = "
                "'manual' or 'sdpa' (which then runs the manual path), not 'tiled'"
            )
        projections = [f"model.attn.{name}" for name in ("qkv_bias", "qk_norm") if getattr(self, name)]
        if projections and others:
            raise ConfigError(
                f"{' and '.join(projections)} apply to 'attention' and 'sliding' layers only; "
                f"model.layers also has {others}"
            )
        if self.head_dim is not None and "mla" in mixers:
            raise ConfigError(
                "model.attn.head_dim does not apply to 'mla' layers: set the head widths in [model.mla]"
            )


# The top-level [model] keys these settings had before the table, and their names in it.
LEGACY_KEYS = {
    "sliding_window": "window",
    "d_head": "head_dim",
    "qkv_bias": "qkv_bias",
    "qk_norm": "qk_norm",
    "attn_scale": "scale",
    "attn_softcap": "softcap",
}
# The same renames as dotted config paths, for reading config files and --set overrides.
LEGACY_PATHS = {f"model.{old}": f"model.attn.{new}" for old, new in LEGACY_KEYS.items()}


def move_legacy_keys(model: dict) -> tuple[dict, list[str]]:
    """A ``[model]`` dict with the old top-level attention keys moved into its ``attn`` table, and
    the old keys it had. Giving one setting under both spellings is refused (which would win?)."""
    found = [key for key in LEGACY_KEYS if key in model]
    if not found:
        return model, []
    model = dict(model)
    table = model.get("attn")
    table = asdict(table) if isinstance(table, AttentionConfig) else dict(table or {})
    for key in found:
        new = LEGACY_KEYS[key]
        value = model.pop(key)
        if new in table:
            raise ConfigError(
                f"model.{key} is the old spelling of model.attn.{new}, and both are set: keep "
                f"model.attn.{new}"
            )
        table[new] = value
    model["attn"] = table
    return model, found


class Attention(nn.Module):
    """Causal multi-head self-attention with grouped key/value heads (MHA, GQA, MQA).

    One fused projection makes ``H`` query heads and ``Hkv`` key and value heads; each group of
    ``H / Hkv`` query heads shares one key/value head, which divides the KV cache by that factor.
    ``impl="manual"`` spells attention out (scores, mask, softmax, weighted sum) for reading;
    ``impl="sdpa"`` calls PyTorch's fused kernel (FlashAttention on GPUs that support it). The two
    agree to 1e-5, which the tests check.

    With ``window = W`` it is sliding-window attention (Mistral; Gemma-2's local layers;
    Longformer's band, Beltagy et al. 2020): the query at position ``i`` sees keys ``j`` with
    ``i - W < j <= i`` — ``W`` keys, itself included (query 10 with W = 4 sees 7, 8, 9, 10). Such a
    layer does not need the KV cache's growing rows: it keeps the last ``W - 1`` positions' k, v in
    a ring buffer in ``cache.state(layer)`` (the ``W``-th key is the new token's own), so its memory
    stops growing at ``W - 1`` positions (docs/sliding-window-attention.md).
    """

    kv_cache = True  # keeps k, v of every past position in the KV cache (a sliding layer: see __init__)

    def __init__(self, config, window: int | None = None):
        super().__init__()
        if window is not None and window < 1:
            raise ValueError(f"a sliding window must hold at least 1 key (the query's own), got {window}")
        # sliding-window attention: each query sees its last ``window`` keys, itself included
        self.window = window
        if window is not None:
            self.kv_cache = False  # KVCache.for_model gives it no rows: it keeps a ring buffer in cache.state
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        settings = config.attn
        self.head_dim = config.head_dim  # d_model / n_head unless [model.attn] sets its own (Gemma: 256)
        self.impl = config.attention
        self.scale = settings.scale  # None: 1/sqrt(head_dim)
        self.softcap = settings.softcap  # Gemma-2's tanh cap on the scores; None: off
        qkv_bias = config.bias if settings.qkv_bias is None else settings.qkv_bias
        self.qkv = nn.Linear(
            config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=qkv_bias
        )
        # Qwen3 / OLMo-2: each head's query and key rescaled to unit RMS, so q·k cannot grow without bound.
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if settings.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if settings.qk_norm else None
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(
        self, x, *, rope=None, alibi=None, cache=None, layer: int = 0, packed_mask=None, positions=None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # the engine's paged cache stores k, v in its blocks and attends
        if cache is not None and cache.paged:
            if self.window is not None:
                raise ValueError(
                    "sliding-window layers do not run on the engine's paged cache; "
                    "generate with scratchlm.generate (a ring buffer per sliding layer)"
                )
            if self.softcap is not None:
                raise ValueError(
                    "the engine's paged cache attends with fused kernels, which cannot soft-cap scores; "
                    "generate with scratchlm.generate for models with model.attn.softcap"
                )
            y = cache.attend(
                layer, q, k, v, alibi=alibi, scale=self.scale
            )  # (1, H, N, D) for N packed tokens
            return self.proj(y.transpose(1, 2).reshape(B, T, H * D))
        start = 0  # the first new query's position, counted from the first key in k, v
        if cache is not None and (self.window is None or self._has_rows(cache, layer)):
            start = cache.length
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D): everything so far
        elif (
            cache is not None
        ):  # a sliding layer's bounded cache: the last W - 1 positions, then the new ones
            k, v, start = self._ring_update(cache.state(layer), cache.length, k, v)
        dropout = self.dropout if self.training else 0.0
        if packed_mask is not None:  # packed rows: causal *within* each document only
            if self.impl == "tiled":
                raise ValueError("attention = 'tiled' does not take packed rows; use 'sdpa' or 'manual'")
            if self.window is not None:
                packed_mask = _window_packed(packed_mask, self.window)
            return self.proj(self._packed(q, k, v, packed_mask, dropout).transpose(1, 2).reshape(B, T, H * D))
        if self.impl == "manual" or (
            self.impl == "sdpa" and self.softcap is not None
        ):  # SDPA cannot cap scores
            y = self._manual(q, k, v, start, alibi, dropout)
        elif self.impl == "tiled":  # FlashAttention's algorithm, spelled out (blocks/flash_attention.py)
            if dropout:
                raise ValueError("attention = 'tiled' has no dropout; set model.dropout = 0 or use 'sdpa'")
            if self.softcap is not None:
                raise ValueError("attention = 'tiled' does not soft-cap scores; use 'manual' or 'sdpa'")
            if self.scale is not None:  # the kernel divides by sqrt(D): pre-scale q so the product is scale
                q = q * (self.scale * math.sqrt(D))
            y = tiled_attention(q, k, v, start=start, alibi=alibi, window=self.window)
        else:
            y = self._sdpa(q, k, v, start, alibi, dropout)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.proj(y)

    def cache_values_per_token(self) -> int:
        """Values this layer keeps in the KV cache per token: k and v of every KV head. A sliding
        layer pays this only while its window fills: see :meth:`max_cache_positions`."""
        return 2 * self.n_kv_head * self.head_dim

    def max_cache_positions(self) -> int | None:
        """Most positions this layer ever holds in a cache: ``W - 1`` for a sliding layer (the
        ``W``-th key a query sees is its own), None for full attention (it grows with the text).
        Bytes of a sliding layer's cache: ``cache_values_per_token() · min(length, W - 1) · batch ·
        bytes per value``."""
        return None if self.window is None else self.window - 1

    @staticmethod
    def _has_rows(cache, layer: int) -> bool:
        """Whether ``cache`` holds growing k, v rows for ``layer``. ``KVCache.for_model`` gives none
        to a sliding layer (``kv_cache = False``): it then uses the ring buffer. A cache built
        with rows for every layer (``KVCache(n_layer, ...)``) makes it keep all positions and
        mask with the window instead: the same result, unbounded memory (the tests compare them)."""
        slot = getattr(cache, "slot", None)
        return slot is None or layer in slot

    def _ring_update(self, state: dict, length: int, k, v):
        """The keys and values the new queries see: the ring's positions, then the new ones; and
        the newest new ones stored in the ring for later steps.

        The ring has ``W - 1`` slots per batch row and KV head; position ``p`` lives in slot
        ``p % (W - 1)``, so writing a new position overwrites the one that just left every future
        query's window. Returns k, v over the positions ``length - held ... length + T - 1``
        (oldest first) and where the first new query sits among them.
        """
        slots = self.window - 1
        T = k.shape[2]
        if slots == 0:  # W = 1: each query sees only itself; nothing is kept
            return k, v, 0
        if "k" not in state:
            B, Hkv, _, D = k.shape
            state["k"], state["v"] = k.new_zeros(B, Hkv, slots, D), v.new_zeros(B, Hkv, slots, D)
        held = min(length, slots)
        order = (
            torch.arange(length - held, length, device=k.device) % slots
        )  # the held positions' slots, oldest first
        keys = torch.cat([state["k"][:, :, order], k], dim=2)
        values = torch.cat([state["v"][:, :, order], v], dim=2)
        kept = min(T, slots)  # of the new positions only the newest W - 1 can be seen again
        written = torch.arange(length + T - kept, length + T, device=k.device) % slots
        state["k"][:, :, written] = k[:, :, T - kept :]
        state["v"][:, :, written] = v[:, :, T - kept :]
        return keys, values, held

    def _scores(self, q, k):
        """q·kᵀ scaled by 1/sqrt(D) (or ``[model.attn] scale``), and with ``softcap = c`` squashed to
        c·tanh(scores / c) — Gemma-2's soft cap, applied before the mask as Hugging Face does: close
        to the identity for small scores, it keeps any one score from exceeding ±c."""
        scores = q @ k.transpose(-2, -1)
        scores = scores / math.sqrt(self.head_dim) if self.scale is None else scores * self.scale
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        return scores

    def _manual(self, q, k, v, start, alibi, dropout):
        groups = self.n_head // self.n_kv_head
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, D): query head h reads kv head h // groups
        v = v.repeat_interleave(groups, dim=1)
        scores = self._scores(q, k)  # (B, H, T, S)
        scores = scores + attention_bias(
            q.shape[2], k.shape[2], start, alibi, q.device, scores.dtype, self.window
        )
        weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        weights = F.dropout(weights, dropout, self.training)
        return weights @ v  # (B, H, T, D)

    def _packed(self, q, k, v, mask, dropout):
        """Attention over packed rows with the mask of :func:`scratchlm.models.gpt.packing`
        (boolean, or ALiBi's additive bias). K and V are expanded to every query head: PyTorch's
        GQA support covers only kernels that take no mask, and the memory-efficient kernel takes
        one."""
        groups = self.n_head // self.n_kv_head
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if self.impl == "manual" or self.softcap is not None:
            scores = self._scores(q, k)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            weights = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout, self.training)
            return weights @ v
        if mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)

    def _sdpa(self, q, k, v, start, alibi, dropout):
        T, S = q.shape[2], k.shape[2]
        gqa = self.n_kv_head != self.n_head
        if alibi is None and start == 0 and T == S and (self.window is None or self.window >= T):
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa, scale=self.scale
            )
        if alibi is None and T == 1 and (self.window is None or self.window >= S):
            # one new token sees everything cached (a sliding layer's ring holds exactly its window): no mask
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, enable_gqa=gqa, scale=self.scale
            )
        mask = attention_bias(T, S, start, alibi, q.device, q.dtype, self.window)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa, scale=self.scale
        )


def attention_bias(
    T: int, S: int, start: int, alibi, device, dtype, window: int | None = None
) -> torch.Tensor:
    """Additive (H or 1, T, S) bias for T queries at positions ``start...start+T-1`` over S keys at
    positions 0...S-1: -inf above the causal diagonal, ALiBi's distance penalty, and with a sliding
    ``window`` -inf for keys ``window`` or more positions back (a query sees ``window`` keys, itself
    included: key j is visible from query i when ``i - window < j <= i``, Hugging Face's rule).
    Only differences of positions matter, so keys may be counted from any origin."""
    query_pos = torch.arange(start, start + T, device=device)[:, None]
    key_pos = torch.arange(S, device=device)[None, :]
    hidden = key_pos > query_pos
    if window is not None:
        hidden = hidden | (key_pos <= query_pos - window)
    bias = torch.zeros(T, S, device=device, dtype=dtype).masked_fill(hidden, float("-inf"))
    if alibi is not None:
        distance = (query_pos - key_pos).clamp_min(0).to(dtype)
        bias = bias - alibi.to(device=device, dtype=dtype)[:, None, None] * distance
    return bias


def _window_packed(mask: torch.Tensor, window: int) -> torch.Tensor:
    """A packed rows' mask (boolean, or ALiBi's float bias; see ``gpt.packing``) intersected with
    the sliding window. Within a document, distance in the row is distance in positions."""
    T = mask.shape[-1]
    index = torch.arange(T, device=mask.device)
    band = index[None, :] > index[:, None] - window  # (T, T): key j within the window of query i
    if mask.dtype == torch.bool:
        return mask & band
    return mask.masked_fill(~band, float("-inf"))
