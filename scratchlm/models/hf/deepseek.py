"""Hugging Face interchange for DeepSeek-V2 and DeepSeek-V3: ``DeepseekV2ForCausalLM`` and
``DeepseekV3ForCausalLM``.

Both are a stack of multi-head latent attention layers (:mod:`scratchlm.models.mla`) whose first
``first_k_dense_replace`` layers have a dense SwiGLU MLP and the rest a DeepSeekMoE layer
(:mod:`scratchlm.models.moe`): our layer pattern ``["mla"] * k + ["mla+moe"] * (L - k)``.

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
* **Multi-token prediction.** V3 checkpoints hold ``num_nextn_predict_layers`` extra layers after
  the last one (``model.layers.{L}...``): skipped here with a warning (MTP is imported elsewhere).

Not supported (refused with a message): YaRN or other RoPE scaling, attention or MLP biases,
``moe_layer_freq`` other than 1, key/value head counts other than the query heads, and a V2
``topk_method`` other than ``greedy`` / ``group_limited_greedy``.
"""

from __future__ import annotations

import re
import warnings

import torch

from scratchlm.models.blocks.mla import MLAConfig
from scratchlm.models.blocks.moe import MoEConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf.common import cpu_state

_FAMILY = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


# --- the RoPE permutation ------------------------------------------------------------------------
def _deinterleave(dim: int) -> torch.Tensor:
    """Row order that takes interleaved pairs (2i, 2i+1) to rotate-half pairs (i, i + dim/2)."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


def _permute_rope_rows(weight: torch.Tensor, heads: int, nope: int, rope: int, inverse: bool = False) -> torch.Tensor:
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
        raise ValueError(f"{name}: RoPE scaling {kind!r} is not supported (YaRN and the rest are out of scope); "
                         "only the default RoPE imports")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"{name}: moe_layer_freq = {hf['moe_layer_freq']} is not supported (only 1: every layer "
                         "after the first first_k_dense_replace is MoE)")
    heads = hf["num_attention_heads"]
    if (hf.get("num_key_value_heads") or heads) != heads:
        raise ValueError(f"{name}: num_key_value_heads = {hf['num_key_value_heads']} must equal num_attention_heads "
                         f"= {heads} (MLA rebuilds a key and value for every head)")
    if name == "deepseek_v3" and not hf.get("rope_interleave", True):
        raise ValueError("deepseek_v3: rope_interleave = false is not supported (DeepSeek's checkpoints rotate "
                         "interleaved pairs; only that layout imports)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _moe_config(hf: dict) -> MoEConfig:
    v3 = hf["model_type"] == "deepseek_v3"
    n_groups, topk_groups = hf.get("n_group") or 1, hf.get("topk_group") or 1
    if not v3:
        method = hf.get("topk_method") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"deepseek_v2: topk_method {method!r} is not supported (only 'greedy' and "
                             "'group_limited_greedy', the two transformers' DeepseekV2 computes)")
        if method == "greedy":
            n_groups = topk_groups = 1  # V2's plain greedy top-k ignores the groups
        if hf.get("norm_topk_prob"):
            # DeepSeek's own V2 code renormalises the top-k weights (and then skips the routed scale)
            # when top_k > 1; transformers never does. We compute what transformers computes.
            warnings.warn("deepseek_v2: norm_topk_prob = true is ignored, as transformers ignores it (DeepSeek's "
                          "original code would renormalise the top-k weights and skip routed_scaling_factor): "
                          "the imported model computes transformers' DeepseekV2, whose outputs differ",
                          stacklevel=2)
    shared = hf.get("n_shared_experts") or 0
    width = hf["moe_intermediate_size"]
    return MoEConfig(
        n_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"], d_expert=width, n_shared=shared,
        d_shared=shared * width if shared else None, router="sigmoid" if v3 else "softmax",
        normalize=bool(hf.get("norm_topk_prob")) if v3 else False,  # transformers' V2 never renormalises
        n_groups=n_groups, topk_groups=topk_groups, group_score="top2" if v3 else "max",
        routed_scale=float(hf.get("routed_scaling_factor", 1.0)),
        # How each was trained, for further training: V2 with an auxiliary loss (alpha_1 = 0.003),
        # V3 loss-free (bias speed 0.001, sequence-wise loss alpha = 1e-4).
        balance="bias" if v3 else "aux", aux_weight=0.003, bias_speed=0.001, seq_aux_weight=1e-4 if v3 else 0.0)


def config_from_hf(hf: dict) -> GPTConfig:
    theta = _check_supported(hf)
    L = hf["num_hidden_layers"]
    k = min(hf.get("first_k_dense_replace") or 0, L)
    moe = _moe_config(hf) if k < L else None
    layers = ["mla"] if k == L else ["mla+moe"] if k == 0 else ["mla"] * k + ["mla+moe"] * (L - k)
    mla = MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                    qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                    v_head_dim=hf["v_head_dim"])
    return GPTConfig(vocab_size=hf["vocab_size"], n_layer=L, n_head=hf["num_attention_heads"], d_model=hf["hidden_size"],
                     d_ff=hf["intermediate_size"], block_size=hf["max_position_embeddings"], position="rope",
                     rope_theta=theta, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", bias=False,
                     tie_embeddings=hf.get("tie_word_embeddings", False), layers=layers, mla=mla, moe=moe)


# --- tensors -----------------------------------------------------------------------------------
_ATTN = [("q", "q_proj"), ("q_down", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("q_up", "q_b_proj"),
         ("kv_down", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("kv_up", "kv_b_proj"), ("proj", "o_proj")]


def from_hf(t: dict, c: GPTConfig) -> dict:
    t = dict(t)
    m, H = c.mla, c.n_head
    out = {"tok_emb.weight": t.pop("model.embed_tokens.weight"), "norm_f.weight": t.pop("model.norm.weight")}
    if "lm_head.weight" in t:
        lm_head = t.pop("lm_head.weight")
        if not c.tie_embeddings:
            out["lm_head.weight"] = lm_head
    for i, (_, mlp) in enumerate(c.layer_kinds()):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        out[b + "norm1.weight"] = t.pop(h + "input_layernorm.weight")
        out[b + "norm2.weight"] = t.pop(h + "post_attention_layernorm.weight")
        for ours, theirs in _ATTN:
            key = h + f"self_attn.{theirs}.weight"
            if key in t:
                out[b + f"attn.{ours}.weight"] = t.pop(key)
        for q in ("q", "q_up"):  # rope rows: interleaved pairs -> rotate-half pairs
            if b + f"attn.{q}.weight" in out:
                out[b + f"attn.{q}.weight"] = _permute_rope_rows(out[b + f"attn.{q}.weight"], H, m.qk_nope_head_dim, m.qk_rope_head_dim)
        out[b + "attn.kv_down.weight"] = _permute_rope_rows(out[b + "attn.kv_down.weight"], 1, m.kv_lora_rank, m.qk_rope_head_dim)
        if mlp == "dense":
            for p in ("gate", "up", "down"):
                out[b + f"mlp.{p}.weight"] = t.pop(h + f"mlp.{p}_proj.weight")
            continue
        E = c.moe.n_experts
        out[b + "mlp.router.weight"] = t.pop(h + "mlp.gate.weight").float()
        bias = t.pop(h + "mlp.gate.e_score_correction_bias", None)  # V3 only
        out[b + "mlp.router_bias"] = bias.float() if bias is not None else torch.zeros(E)
        if h + "mlp.experts.gate_up_proj" in t:  # fused layout: (E, 2F, C), gate rows first
            gate, up = t.pop(h + "mlp.experts.gate_up_proj").chunk(2, dim=1)
            down = t.pop(h + "mlp.experts.down_proj")
        else:
            gate, up, down = (torch.stack([t.pop(h + f"mlp.experts.{e}.{p}_proj.weight") for e in range(E)])
                              for p in ("gate", "up", "down"))
        out[b + "mlp.experts_gate"], out[b + "mlp.experts_up"] = gate.contiguous(), up.contiguous()
        out[b + "mlp.experts_down"] = down
        for p in ("gate", "up", "down"):
            key = h + f"mlp.shared_experts.{p}_proj.weight"
            if key in t:
                out[b + f"mlp.shared.{p}.weight"] = t.pop(key)
    mtp = sorted(k for k in t if (n := re.match(r"model\.layers\.(\d+)\.", k)) and int(n.group(1)) >= c.n_layer)
    if mtp:
        warnings.warn(f"skipped {len(mtp)} tensors of layers >= {c.n_layer} (DeepSeek-V3's multi-token prediction "
                      "modules; import them with the MTP importer)", stacklevel=3)
    rest = sorted(set(t) - set(mtp))
    if rest:
        raise ValueError(f"unexpected DeepSeek tensors (not imported): {rest[:5]}{' ...' if len(rest) > 5 else ''}")
    return out


def _split_pattern(c: GPTConfig) -> int:
    """k, the number of leading dense layers, if the layers are ``["mla"] * k + ["mla+moe"] * (L - k)``."""
    kinds = c.layer_kinds()
    k = sum(1 for kind in kinds if kind == ("mla", "dense"))
    if kinds != [("mla", "dense")] * k + [("mla", "moe")] * (len(kinds) - k):
        raise ValueError("DeepSeek export needs layers = ['mla'] * k + ['mla+moe'] * (n_layer - k): first dense, then MoE")
    return k


def to_hf(model: GPT, model_type: str) -> tuple[dict, dict]:
    """Our MLA model -> DeepSeek-V2's or V3's (``model_type``) tensors and config.json."""
    v3 = model_type == "deepseek_v3"
    c = model.config
    k = _split_pattern(c)
    if (c.norm, c.bias, c.mlp, c.prenorm) != ("rmsnorm", False, "swiglu", True) or c.position not in ("rope", "none"):
        raise ValueError("DeepSeek export needs pre-RMSNorm, SwiGLU, no biases and no learned/sinusoidal/ALiBi positions")
    m, H = c.mla, c.n_head
    sd = cpu_state(model)
    hf = {"architectures": [_FAMILY[model_type]], "model_type": model_type, "vocab_size": c.vocab_size,
          "hidden_size": c.d_model, "intermediate_size": c.ff_width, "num_hidden_layers": c.n_layer,
          "num_attention_heads": H, "num_key_value_heads": H, "max_position_embeddings": c.block_size,
          "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
          "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
          "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "hidden_act": "silu",
          "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
          "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim, "first_k_dense_replace": k}
    hf.update({"rope_interleave": True} if v3 else {"mlp_bias": False})
    if k < c.n_layer:
        hf.update(_moe_hf(model, k, v3))
    elif v3:
        hf.update({"n_routed_experts": 1, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1,
                   "n_shared_experts": 1, "moe_intermediate_size": 1})  # unused: no MoE layer
    else:
        hf.update({"n_routed_experts": 1, "num_experts_per_tok": 1, "topk_method": "greedy", "n_shared_experts": 1,
                   "moe_intermediate_size": 1})
    tensors = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm_f.weight"]}
    if not c.tie_embeddings:
        tensors["lm_head.weight"] = sd["lm_head.weight"]
    for i, (_, mlp) in enumerate(c.layer_kinds()):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        tensors[h + "input_layernorm.weight"] = sd[b + "norm1.weight"]
        tensors[h + "post_attention_layernorm.weight"] = sd[b + "norm2.weight"]
        for ours, theirs in _ATTN:
            if b + f"attn.{ours}.weight" in sd:
                w = sd[b + f"attn.{ours}.weight"]
                if ours in ("q", "q_up"):
                    w = _permute_rope_rows(w, H, m.qk_nope_head_dim, m.qk_rope_head_dim, inverse=True)
                if ours == "kv_down":
                    w = _permute_rope_rows(w, 1, m.kv_lora_rank, m.qk_rope_head_dim, inverse=True)
                tensors[h + f"self_attn.{theirs}.weight"] = w
        if mlp == "dense":
            for p in ("gate", "up", "down"):
                tensors[h + f"mlp.{p}_proj.weight"] = sd[b + f"mlp.{p}.weight"]
            continue
        tensors[h + "mlp.gate.weight"] = sd[b + "mlp.router.weight"]
        if v3:
            tensors[h + "mlp.gate.e_score_correction_bias"] = sd[b + "mlp.router_bias"]
        for p in ("gate", "up", "down"):
            for e, w in enumerate(sd[b + f"mlp.experts_{p}"]):
                tensors[h + f"mlp.experts.{e}.{p}_proj.weight"] = w.contiguous()
            tensors[h + f"mlp.shared_experts.{p}_proj.weight"] = sd[b + f"mlp.shared.{p}.weight"]
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
            raise ValueError("DeepSeek-V2 export needs model.moe.router = 'softmax', group_score = 'max', normalize = false")
        if any(block.mlp.router_bias.abs().sum() > 0 for block in model.blocks[k:]):
            raise ValueError("DeepSeek-V2 export: the routers have a selection bias, which V2 cannot express (use deepseek_v3)")
    hf = {"n_routed_experts": moe.n_experts, "num_experts_per_tok": moe.top_k, "n_shared_experts": moe.n_shared,
          "moe_intermediate_size": width, "routed_scaling_factor": moe.routed_scale, "n_group": moe.n_groups,
          "topk_group": moe.topk_groups, "norm_topk_prob": moe.normalize}
    if not v3:
        hf["topk_method"] = "group_limited_greedy" if moe.n_groups > 1 else "greedy"
    return hf


def default_architecture(config: GPTConfig) -> str | None:
    """DeepSeek-V3 for MLA models with a sigmoid router, V2 for the other MLA models."""
    kinds = config.layer_kinds()
    if not any(mixer == "mla" for mixer, _ in kinds):
        return None
    return "deepseek_v3" if config.moe is not None and config.moe.router == "sigmoid" else "deepseek_v2"

