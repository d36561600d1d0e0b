"""Hugging Face interchange for DeepSeek-V2 and DeepSeek-V3: ``DeepseekV2ForCausalLM`` and
``DeepseekV3ForCausalLM``.

Both are a stack of multi-head latent attention layers (:mod:`scratchlm.models.blocks.mla`) whose first
``first_k_dense_replace`` layers have a dense SwiGLU MLP and the rest a DeepSeekMoE layer
(:mod:`scratchlm.models.blocks.moe`): our layer pattern ``["mla"] * k + ["mla+moe"] * (L - k)``.

How the two families differ, as ``transformers`` computes them (and so as we import them):

* V2 routes with a **softmax** over the experts, top-k "greedy" or "group_limited_greedy" (groups
  scored by their best expert), the chosen weights are **not** renormalised (transformers' V2
  ignores ``norm_topk_prob``; DeepSeek's original code honours it, so a V2 config with it on
  imports with a warning that the outputs follow transformers), then multiplied by
  ``routed_scaling_factor``.
* V3 routes with a **sigmoid**, adds the per-expert ``e_score_correction_bias`` to *choose* (never
  to weigh), always limits to the best ``topk_group`` of ``n_group`` groups scored by the sum of
  their best two biased scores, renormalises when ``norm_topk_prob``, and scales.

Three conventions worth knowing:

* **Interleaved RoPE.** DeepSeek's checkpoints rotate the decoupled RoPE dimensions in adjacent
  pairs (2i, 2i+1); ours rotate halves (i, i + d/2). Every query and key RoPE row is permuted by
  ``[0, 2, 4, ..., 1, 3, 5, ...]`` at import (and back at export): q·k is a sum over dimensions,
  so the same permutation of both sides leaves it unchanged, and pair i lands where our
  rotate-half RoPE turns it by the same angle. (V3's ``rope_interleave = false`` layout, which
  only transformers uses, is refused.)
* **Experts.** transformers fuses experts in memory but saves one key per expert
  (``mlp.experts.{e}.gate_proj.weight``); we stack them into ``experts_gate`` / ``experts_up`` /
  ``experts_down`` (E, F, C) / (E, C, F). A fused ``gate_up_proj`` is read too.

Every other tensor is a rename, by the map :data:`NAMES` (and :data:`V3_NAMES` with V3's router
bias); the export direction is its inverse.
* **Multi-token prediction.** V3 checkpoints hold ``num_nextn_predict_layers`` extra layers after
  the last one (``model.layers.{L}...``): skipped here with a warning (MTP is imported elsewhere).

Not supported (refused with a message): YaRN or other RoPE scaling, attention or MLP biases,
``moe_layer_freq`` other than 1, key/value head counts other than the query heads, and a V2
``topk_method`` other than ``greedy`` / ``group_limited_greedy``.

V2 and V3 share one module (just over 400 lines): they differ in the router and a few names,
and side by side the differences are what a reader sees.
"""

from __future__ import annotations

import re
import warnings

import torch

from scratchlm.models.blocks.mla import MLAConfig
from scratchlm.models.blocks.moe import MoEConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf.common import cpu_state, inverse, rename, renamed, stack_experts, unstack_experts

_FAMILY = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


# --- the RoPE permutation ------------------------------------------------------------------------
def _deinterleave(dim: int) -> torch.Tensor:
    """Row order that takes interleaved pairs (2i, 2i+1) to rotate-half pairs (i, i + dim/2)."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


def _permute_rope_rows(
    weight: torch.Tensor, heads: int, nope: int, rope: int, inverse: bool = False
) -> torch.Tensor:
    """Permute the last ``rope`` rows of each of ``heads`` row blocks of width ``nope + rope``."""
    order = _deinterleave(rope)
    if inverse:
        order = torch.argsort(order)
    w = weight.reshape(heads, nope + rope, -1).clone()
    w[:, nope:] = w[:, nope:][:, order]
    return w.reshape(weight.shape)


# --- config ----------------------------------------------------------------------------------------
def _check_supported(hf: dict) -> float:
    """Refuse what we cannot compute identically; return RoPE's theta."""
    name = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{name}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{name}: attention_bias / mlp_bias are not supported (DeepSeek models have none)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise ValueError(
            f"{name}: RoPE scaling {kind!r} is not supported (YaRN and the rest are out of scope); "
            "only the default RoPE imports"
        )
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(
            f"{name}: moe_layer_freq = {hf['moe_layer_freq']} is not supported (only 1: every layer "
            "after the first first_k_dense_replace is MoE)"
        )
    heads = hf["num_attention_heads"]
    if (hf.get("num_key_value_heads") or heads) != heads:
        raise ValueError(
            f"{name}: num_key_value_heads = {hf['num_key_value_heads']} must equal num_attention_heads "
            f"= {heads} (MLA rebuilds a key and value for every head)"
        )
    if name == "deepseek_v3" and not hf.get("rope_interleave", True):
        raise ValueError(
            "deepseek_v3: rope_interleave = false is not supported (DeepSeek's checkpoints rotate "
            "interleaved pairs; only that layout imports)"
        )
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _moe_config(hf: dict) -> MoEConfig:
    v3 = hf["model_type"] == "deepseek_v3"
    n_groups, topk_groups = hf.get("n_group") or 1, hf.get("topk_group") or 1
    if not v3:
        method = hf.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(
                f"deepseek_v2: topk_method {method!r} is not supported (only 'greedy' and "
                "'group_limited_greedy', the two transformers' DeepseekV2 computes)"
            )
        if method == "greedy":
            n_groups = topk_groups = 1  # V2's plain greedy top-k ignores the groups
        if hf.get("norm_topk_prob"):
            # DeepSeek's own V2 code renormalises the top-k weights (and then skips the routed scale)
            # when top_k > 1; transformers never does. We compute what transformers computes.
            warnings.warn(
                "deepseek_v2: norm_topk_prob = true is ignored, as transformers ignores it (DeepSeek's "
                "original code would renormalise the top-k weights and skip routed_scaling_factor): "
                "the imported model computes transformers' DeepseekV2, whose outputs differ",
                stacklevel=2,
            )
    shared = hf.get("n_shared_experts") or 0
    width = hf["moe_intermediate_size"]
    return MoEConfig(
        n_experts=hf["n_routed_experts"],
        top_k=hf["num_experts_per_tok"],
        d_expert=width,
        n_shared=shared,
        d_shared=shared * width if shared else None,
        router="sigmoid" if v3 else "softmax",
        normalize=bool(hf.get("norm_topk_prob")) if v3 else False,  # transformers' V2 never renormalises
        n_groups=n_groups,
        topk_groups=topk_groups,
        group_score="top2" if v3 else "max",
        routed_scale=float(hf.get("routed_scaling_factor", 1.0)),
        # How each was trained, for further training: V2 with an auxiliary loss (alpha_1 = 0.003),
        # V3 loss-free (bias speed 0.001, sequence-wise loss alpha = 1e-4).
        balance="bias" if v3 else "aux",
        aux_weight=0.003,
        bias_speed=0.001,
        seq_aux_weight=1e-4 if v3 else 0.0,
    )


def config_from_hf(hf: dict) -> GPTConfig:
    theta = _check_supported(hf)
    L = hf["num_hidden_layers"]
    k = min(hf.get("first_k_dense_replace") or 0, L)
    moe = _moe_config(hf) if k < L else None
    layers = ["mla"] if k == L else ["mla+moe"] if k == 0 else ["mla"] * k + ["mla+moe"] * (L - k)
    mla = MLAConfig(
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
    )
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=L,
        n_head=hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        block_size=hf["max_position_embeddings"],
        position="rope",
        rope_theta=theta,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        layers=layers,
        mla=mla,
        moe=moe,
    )


# --- tensors -----------------------------------------------------------------------------------
# MLA's projections: (ours under blocks.{i}.attn., theirs under model.layers.{i}.self_attn.)
_ATTN = [
    ("q", "q_proj"),
    ("q_down", "q_a_proj"),
    ("q_norm", "q_a_layernorm"),
    ("q_up", "q_b_proj"),
    ("kv_down", "kv_a_proj_with_mqa"),
    ("kv_norm", "kv_a_layernorm"),
    ("kv_up", "kv_b_proj"),
    ("proj", "o_proj"),
]
_EXPERTS = ("gate_proj", "up_proj", "down_proj")
# Hugging Face's names -> ours (``{}``: the layer). Irregular: the RoPE rows of q / q_up / kv_down
# (_rope_rows), the experts (stack_experts), the routers in float32 (_routers).
NAMES = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "norm_f.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "blocks.{}.norm1.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.norm2.weight",
    **{
        f"model.layers.{{}}.self_attn.{theirs}.weight": f"blocks.{{}}.attn.{ours}.weight"
        for ours, theirs in _ATTN
    },
    **{
        f"model.layers.{{}}.mlp.{p}_proj.weight": f"blocks.{{}}.mlp.{p}.weight"
        for p in ("gate", "up", "down")
    },
    "model.layers.{}.mlp.gate.weight": "blocks.{}.mlp.router.weight",
    **{
        f"model.layers.{{}}.mlp.shared_experts.{p}_proj.weight": f"blocks.{{}}.mlp.shared.{p}.weight"
        for p in ("gate", "up", "down")
    },
}
# V3's selection bias; V2 has none (its routers import with a zero one, and export refuses another).
V3_NAMES = {**NAMES, "model.layers.{}.mlp.gate.e_score_correction_bias": "blocks.{}.mlp.router_bias"}


def _rope_rows(sd: dict, c: GPTConfig, inverse: bool = False) -> dict:
    """q / q_up / kv_down (our names) with their RoPE rows permuted: interleaved pairs -> rotate-half
    pairs, or back with ``inverse``."""
    m, out = c.mla, {}
    nope, rope = m.qk_nope_head_dim, m.qk_rope_head_dim
    for i in range(c.n_layer):
        b = f"blocks.{i}.attn."
        for name in ("q.weight", "q_up.weight"):
            if b + name in sd:
                out[b + name] = _permute_rope_rows(sd[b + name], c.n_head, nope, rope, inverse)
        if b + "kv_down.weight" in sd:
            out[b + "kv_down.weight"] = _permute_rope_rows(
                sd[b + "kv_down.weight"], 1, m.kv_lora_rank, m.qk_rope_head_dim, inverse
            )
    return out


def _moe_layer_numbers(c: GPTConfig) -> list[int]:
    return [i for i, (_, mlp) in enumerate(c.layer_kinds()) if mlp == "moe"]


def _routers(out: dict, c: GPTConfig) -> dict:
    """Each MoE layer's router weight and selection bias in float32 (a V2 router: a zero bias)."""
    routers = {}
    for i in _moe_layer_numbers(c):
        b = f"blocks.{i}.mlp."
        routers[b + "router.weight"] = out[b + "router.weight"].float()
        bias = out.get(b + "router_bias")
        routers[b + "router_bias"] = bias.float() if bias is not None else torch.zeros(c.moe.n_experts)
    return routers


def is_mtp_tensor(name: str, c: GPTConfig) -> bool:
    """A tensor of a layer after the last: DeepSeek-V3's multi-token prediction module, which the
    import leaves out (with a warning)."""
    n = re.match(r"model\.layers\.(\d+)\.", name)
    return n is not None and int(n.group(1)) >= c.n_layer


def from_hf(t: dict, c: GPTConfig) -> dict:
    mtp = sorted(k for k in t if is_mtp_tensor(k, c))
    if mtp:
        warnings.warn(
            f"skipped {len(mtp)} tensors of layers >= {c.n_layer} (DeepSeek-V3's multi-token prediction "
            "modules; import them with the MTP importer)",
            stacklevel=3,
        )
    t = {k: v for k, v in t.items() if k not in set(mtp)}
    rest = sorted(k for k in t if renamed(k, V3_NAMES) is None and ".mlp.experts." not in k)
    if rest:
        raise ValueError(
            f"unexpected DeepSeek tensors (not imported): {rest[:5]}{' ...' if len(rest) > 5 else ''}"
        )
    out = rename(t, V3_NAMES)
    if c.tie_embeddings:
        out.pop("lm_head.weight", None)
    out.update(_rope_rows(out, c))
    out.update(_routers(out, c))
    for i in _moe_layer_numbers(c):
        out.update(stack_experts(t, f"model.layers.{i}.mlp.", f"blocks.{i}.mlp.", _EXPERTS, c.moe.n_experts))
    return out


def _split_pattern(c: GPTConfig) -> int:
    """k, the number of leading dense layers, if the layers are ``["mla"] * k + ["mla+moe"] * (L - k)``."""
    kinds = c.layer_kinds()
    k = sum(1 for kind in kinds if kind == ("mla", "dense"))
    if kinds != [("mla", "dense")] * k + [("mla", "moe")] * (len(kinds) - k):
        raise ValueError(
            "DeepSeek export needs layers = ['mla'] * k + ['mla+moe'] * (n_layer - k): first dense, then MoE"
        )
    return k


def to_hf(model: GPT, model_type: str) -> tuple[dict, dict]:
    """Our MLA model -> DeepSeek-V2's or V3's (``model_type``) tensors and config.json."""
    v3 = model_type == "deepseek_v3"
    c = model.config
    k = _split_pattern(c)
    if (c.norm, c.bias, c.mlp, c.prenorm) != ("rmsnorm", False, "swiglu", True) or c.position not in (
        "rope",
        "none",
    ):
        raise ValueError(
            "DeepSeek export needs pre-RMSNorm, SwiGLU, no biases and no learned/sinusoidal/ALiBi positions"
        )
    m, H = c.mla, c.n_head
    sd = cpu_state(model)
    hf = {
        "architectures": [_FAMILY[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ff_width,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "hidden_act": "silu",
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "first_k_dense_replace": k,
    }
    hf.update({"rope_interleave": True} if v3 else {"mlp_bias": False})
    if k < c.n_layer:
        hf.update(_moe_hf(model, k, v3))
    elif v3:
        hf.update(
            {
                "n_routed_experts": 1,
                "num_experts_per_tok": 1,
                "n_group": 1,
                "topk_group": 1,
                "n_shared_experts": 1,
                "moe_intermediate_size": 1,
            }
        )  # unused: no MoE layer
    else:
        hf.update(
            {
                "n_routed_experts": 1,
                "num_experts_per_tok": 1,
                "topk_method": "greedy",
                "n_shared_experts": 1,
                "moe_intermediate_size": 1,
            }
        )
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    sd.update(_rope_rows(sd, c, inverse=True))
    tensors = rename(sd, inverse(V3_NAMES if v3 else NAMES))
    for i in _moe_layer_numbers(c):
        tensors.update(unstack_experts(sd, f"blocks.{i}.mlp.", f"model.layers.{i}.mlp.", _EXPERTS))
    return tensors, hf


def _moe_hf(model: GPT, k: int, v3: bool) -> dict:
    """The MoE entries of a DeepSeek config.json, after checking that the family computes our routing."""
    moe = model.config.moe
    name = "DeepSeek-V3" if v3 else "DeepSeek-V2"
    width = model.blocks[k].mlp.experts_gate.shape[1]
    if not moe.n_shared or (moe.d_shared or moe.n_shared * width) != moe.n_shared * width or moe.shared_gate:
        raise ValueError(f"{name} export needs shared experts of width n_shared x d_expert, ungated")
    if v3 and (moe.router, moe.group_score) != ("sigmoid", "top2"):
        raise ValueError("DeepSeek-V3 export needs model.moe.router = 'sigmoid' and group_score = 'top2'")
    if not v3:
        if (moe.router, moe.group_score, moe.normalize) != ("softmax", "max", False):
            raise ValueError(
                "DeepSeek-V2 export needs model.moe.router = 'softmax', group_score = 'max', normalize = false"
            )
        if any(block.mlp.router_bias.abs().sum() > 0 for block in model.blocks[k:]):
            raise ValueError(
                "DeepSeek-V2 export: the routers have a selection bias, which V2 cannot express (use deepseek_v3)"
            )
    hf = {
        "n_routed_experts": moe.n_experts,
        "num_experts_per_tok": moe.top_k,
        "n_shared_experts": moe.n_shared,
        "moe_intermediate_size": width,
        "routed_scaling_factor": moe.routed_scale,
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
        "norm_topk_prob": moe.normalize,
    }
    if not v3:
        hf["topk_method"] = "group_limited_greedy" if moe.n_groups > 1 else "greedy"
    return hf


def default_architecture(config: GPTConfig) -> str | None:
    """DeepSeek-V3 for MLA models with a sigmoid router, V2 for the other MLA models."""
    kinds = config.layer_kinds()
    if not any(mixer == "mla" for mixer, _ in kinds):
        return None
    return "deepseek_v3" if config.moe is not None and config.moe.router == "sigmoid" else "deepseek_v2"
