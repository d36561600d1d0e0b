"""Hugging Face interchange for the state-space family: ``MambaForCausalLM`` and
``JambaForCausalLM``, onto the one model of :mod:`scratchlm.models.gpt` with the Mamba mixer of
:mod:`scratchlm.models.blocks.mamba`.

* Mamba: every block is norm → mixer → residual, with no MLP: our layer pattern ``["mamba+none"]``,
  RMSNorm, no position encoding (the recurrence itself knows the order).
* Jamba (Lieber et al. 2024): attention (no position encoding) in layer ``i`` when
  ``i % attn_layer_period == attn_layer_offset`` (8 and 4 in Jamba-v0.1), Mamba elsewhere; a
  mixture of experts when ``i % expert_layer_period == expert_layer_offset`` (2 and 1), a dense
  SwiGLU elsewhere (everywhere when ``num_experts == 1``). Its Mamba mixers put an RMSNorm on Δ_low,
  B and C (``dt_bc_norm``). Its router takes the softmax over all experts, keeps the top k, and does
  *not* renormalise their weights (``normalize = False``).

HF saves Jamba's experts one by one (``experts.{e}.gate_proj`` ...); in memory it fuses them. Both
layouts are read; ours are three stacked tensors (``experts_gate``, ``experts_up``, ``experts_down``).
Every other tensor is a rename by :data:`MAMBA_NAMES` / :data:`JAMBA_NAMES` (export: the inverse),
except Jamba's q, k, v, fused as Llama's are.
"""

from __future__ import annotations

import math

import torch

from scratchlm.models.blocks.mamba import MambaConfig
from scratchlm.models.blocks.moe import MoEConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.hf import llama
from scratchlm.models.hf.common import cpu_state, inverse, rename, stack_experts, unstack_experts
from scratchlm.models.hf.moe import aux_weight_from_hf, aux_weight_to_hf

# A pure Mamba model has no context limit (nothing is stored per position); block_size only caps
# what our forward accepts.
MAMBA_CONTEXT = 1 << 20

# Mixer tensors: (ours under "blocks.{i}.mamba.", theirs under the HF mixer's prefix). Optional ones
# (biases, Jamba's norms) are renamed when present.
_MIXER = [
    ("in_proj.weight", "in_proj.weight"),
    ("in_proj.bias", "in_proj.bias"),
    ("conv1d.weight", "conv1d.weight"),
    ("conv1d.bias", "conv1d.bias"),
    ("x_proj.weight", "x_proj.weight"),
    ("dt_proj.weight", "dt_proj.weight"),
    ("dt_bias", "dt_proj.bias"),
    ("A_log", "A_log"),
    ("D", "D"),
    ("out_proj.weight", "out_proj.weight"),
    ("out_proj.bias", "out_proj.bias"),
    ("dt_norm.weight", "dt_layernorm.weight"),
    ("b_norm.weight", "b_layernorm.weight"),
    ("c_norm.weight", "c_layernorm.weight"),
]


def _check_silu(hf: dict) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{hf.get('model_type')} with hidden_act {hf['hidden_act']!r} is not supported (only silu)"
        )


def _dt_rank(value, hidden: int) -> int:
    return math.ceil(hidden / 16) if value in (None, "auto") else int(value)


def _mixer_names(theirs: str) -> dict[str, str]:
    """The mixer's names, Hugging Face's under ``model.layers.{}.`` + ``theirs`` -> ours."""
    return {f"{theirs}{h}": f"blocks.{{}}.mamba.{o}" for o, h in _MIXER}


# Hugging Face's names -> ours (``{}``: the layer).
MAMBA_NAMES = {
    "backbone.embeddings.weight": "tok_emb.weight",
    "backbone.norm_f.weight": "norm_f.weight",
    "lm_head.weight": "lm_head.weight",
    "backbone.layers.{}.norm.weight": "blocks.{}.norm1.weight",
    **_mixer_names("backbone.layers.{}.mixer."),
}
_JAMBA_EXPERTS = ("gate_proj", "up_proj", "down_proj")
JAMBA_NAMES = {  # q, k, v: llama.qkv_from_hf; the experts: stack_experts
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.final_layernorm.weight": "norm_f.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "blocks.{}.norm1.weight",
    "model.layers.{}.pre_ff_layernorm.weight": "blocks.{}.norm2.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blocks.{}.attn.proj.weight",
    **_mixer_names("model.layers.{}.mamba."),
    **{
        f"model.layers.{{}}.feed_forward.{p}_proj.weight": f"blocks.{{}}.mlp.{p}.weight"
        for p in ("gate", "up", "down")
    },
    "model.layers.{}.feed_forward.router.weight": "blocks.{}.mlp.router.weight",
}


def _without_tied_head(tensors: dict, c: GPTConfig) -> dict:
    if c.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


# --- Mamba -------------------------------------------------------------------------------------
def mamba_config(hf: dict) -> GPTConfig:
    _check_silu(hf)
    hidden = hf["hidden_size"]
    mamba = MambaConfig(
        d_state=hf.get("state_size", 16),
        d_conv=hf.get("conv_kernel", 4),
        expand=hf.get("expand", 2),
        dt_rank=_dt_rank(hf.get("time_step_rank"), hidden),
        conv_bias=hf.get("use_conv_bias", True),
        proj_bias=hf.get("use_bias", False),
    )
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=1,
        d_model=hidden,
        block_size=MAMBA_CONTEXT,
        position="none",
        norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        layers=["mamba+none"],
        mamba=mamba,
    )


def mamba_from_hf(t: dict, c: GPTConfig) -> dict:
    t = {
        k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in t.items()
    }  # older checkpoints
    return _without_tied_head(rename(t, MAMBA_NAMES), c)


def mamba_to_hf(model) -> tuple[dict, dict]:
    c = model.config
    m = c.mamba
    if (
        any(kind != ("mamba", "none") for kind in c.layer_kinds())
        or c.norm != "rmsnorm"
        or not c.prenorm
        or c.position != "none"
        or m.dt_bc_norm
    ):
        raise ValueError(
            "Mamba export needs every layer to be 'mamba+none', pre-RMSNorm, no position encoding and "
            "no dt/B/C norms (that is Jamba's mixer)"
        )
    tensors = rename(_without_tied_head(cpu_state(model), c), inverse(MAMBA_NAMES))
    hf = {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layer,
        "state_size": m.d_state,
        "expand": m.expand,
        "conv_kernel": m.d_conv,
        "time_step_rank": m.dt_rank or math.ceil(c.d_model / 16),
        "use_bias": m.proj_bias,
        "use_conv_bias": m.conv_bias,
        "layer_norm_epsilon": c.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": c.tie_embeddings,
        "residual_in_fp32": True,
    }
    return tensors, hf


# --- Jamba -------------------------------------------------------------------------------------
def _jamba_layers(hf: dict) -> list[str]:
    """The layer pattern: each layer's mixer (+moe), shortened to its repeating unit."""
    n, experts = hf["num_hidden_layers"], hf.get("num_experts", 16)
    layers = []
    for i in range(n):
        mixer = (
            "attention" if i % hf.get("attn_layer_period", 8) == hf.get("attn_layer_offset", 4) else "mamba"
        )
        moe = experts > 1 and i % hf.get("expert_layer_period", 2) == hf.get("expert_layer_offset", 1)
        layers.append(mixer + ("+moe" if moe else ""))
    period = next(p for p in range(1, n + 1) if n % p == 0 and layers == layers[:p] * (n // p))
    return layers[:period]


def jamba_config(hf: dict) -> GPTConfig:
    _check_silu(hf)
    hidden = hf["hidden_size"]
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ValueError("Jamba models whose head_dim x heads != hidden_size are not supported")
    mamba = MambaConfig(
        d_state=hf.get("mamba_d_state", 16),
        d_conv=hf.get("mamba_d_conv", 4),
        expand=hf.get("mamba_expand", 2),
        dt_rank=_dt_rank(hf.get("mamba_dt_rank"), hidden),
        conv_bias=hf.get("mamba_conv_bias", True),
        proj_bias=hf.get("mamba_proj_bias", False),
        dt_bc_norm=True,
    )
    layers = _jamba_layers(hf)
    moe = None
    if any(item.endswith("+moe") for item in layers):
        moe = MoEConfig(
            n_experts=hf["num_experts"],
            top_k=hf.get("num_experts_per_tok", 2),
            d_expert=hf["intermediate_size"],
            router="softmax",
            normalize=False,
            aux_weight=aux_weight_from_hf(
                hf.get("router_aux_loss_coef", 0.001),
                hf.get("num_experts_per_tok", 2),
                sum(item.endswith("+moe") for item in layers) * hf["num_hidden_layers"] // len(layers),
            ),
        )
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads,
        d_model=hidden,
        d_ff=hf["intermediate_size"],
        block_size=hf.get("max_position_embeddings", 262144),
        position="none",
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        layers=layers,
        mamba=mamba,
        moe=moe,
    )


def jamba_from_hf(t: dict, c: GPTConfig) -> dict:
    out = _without_tied_head(rename(t, JAMBA_NAMES), c)
    out.update(llama.qkv_from_hf(t, c))
    for i in _moe_layer_numbers(c):
        out.update(
            stack_experts(
                t, f"model.layers.{i}.feed_forward.", f"blocks.{i}.mlp.", _JAMBA_EXPERTS, c.moe.n_experts
            )
        )
        out[f"blocks.{i}.mlp.router_bias"] = torch.zeros(c.moe.n_experts)  # Jamba's router: no selection bias
    return out


def _moe_layer_numbers(c: GPTConfig) -> list[int]:
    return [i for i, (_, mlp) in enumerate(c.layer_kinds()) if mlp == "moe"]


def _period(flags: list[bool]) -> tuple[int, int] | None:
    """(period, offset) with flags[i] == (i % period == offset) for every layer, or None."""
    n = len(flags)
    for period in range(1, n + 2):
        for offset in range(period):
            if all(flag == (i % period == offset) for i, flag in enumerate(flags)):
                return period, offset
    return None


def jamba_to_hf(model) -> tuple[dict, dict]:
    c = model.config
    kinds = c.layer_kinds()
    m = c.mamba
    if (
        any(mixer not in ("mamba", "attention") or mlp not in ("dense", "moe") for mixer, mlp in kinds)
        or (c.norm, c.position, c.prenorm, c.bias, c.mlp) != ("rmsnorm", "none", True, False, "swiglu")
        or m is None
        or not m.dt_bc_norm
    ):
        raise ValueError(
            "Jamba export needs mamba / attention mixers with dense / moe MLPs, pre-RMSNorm, no position "
            "encoding, no biases, SwiGLU, and Mamba's dt/B/C norms (model.mamba.dt_bc_norm)"
        )
    attention = _period([mixer == "attention" for mixer, _ in kinds])
    experts = _period([mlp == "moe" for _, mlp in kinds])
    if attention is None or experts is None:
        raise ValueError("Jamba export needs attention and MoE layers at a fixed period and offset each")
    moe = c.moe if any(mlp == "moe" for _, mlp in kinds) else None
    if moe is not None and (
        (moe.d_expert or c.ff_width) != c.ff_width
        or moe.router != "softmax"
        or moe.normalize
        or moe.n_shared
        or moe.n_groups > 1
        or moe.routed_scale != 1.0
    ):
        raise ValueError(
            "Jamba export needs its router: softmax, top-k, no renormalisation, no shared experts, no "
            "groups, routed_scale 1, and experts as wide as the dense MLP"
        )
    sd = _without_tied_head(cpu_state(model), c)
    for i in _moe_layer_numbers(c):
        if sd[f"blocks.{i}.mlp.router_bias"].any():
            raise ValueError(f"layer {i}: the router has a selection bias; Jamba's router has none")
    tensors = {**rename(sd, inverse(JAMBA_NAMES)), **llama.qkv_to_hf(sd, c)}
    for i in _moe_layer_numbers(c):
        theirs = f"model.layers.{i}.feed_forward."
        tensors.update(unstack_experts(sd, f"blocks.{i}.mlp.", theirs, _JAMBA_EXPERTS))
    H, Hkv = c.n_head, c.kv_heads
    hf = {
        "architectures": ["JambaForCausalLM"],
        "model_type": "jamba",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ff_width,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": c.tie_embeddings,
        "attn_layer_period": attention[0],
        "attn_layer_offset": attention[1],
        "expert_layer_period": experts[0],
        "expert_layer_offset": experts[1],
        "num_experts": moe.n_experts if moe else 1,
        "num_experts_per_tok": moe.top_k if moe else 1,
        "router_aux_loss_coef": aux_weight_to_hf(
            moe.aux_weight, moe.top_k, sum(k[1] == "moe" for k in c.layer_kinds())
        )
        if moe
        else 0.001,
        "mamba_d_state": m.d_state,
        "mamba_d_conv": m.d_conv,
        "mamba_expand": m.expand,
        "mamba_dt_rank": m.dt_rank or math.ceil(c.d_model / 16),
        "mamba_conv_bias": m.conv_bias,
        "mamba_proj_bias": m.proj_bias,
    }
    return tensors, hf


def default_architecture(config: GPTConfig) -> str | None:
    kinds = config.layer_kinds()
    if all(kind == ("mamba", "none") for kind in kinds):
        return "mamba"
    if any(mixer == "mamba" for mixer, _ in kinds):
        return "jamba"
    return None
