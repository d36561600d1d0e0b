"""Hugging Face interchange for Llama (``LlamaForCausalLM``), and the Llama pieces other families reuse.

Llama keeps q, k, v as three projections; we concatenate them into one fused projection
(:func:`qkv_from_hf`, :func:`qkv_to_hf`). Its RoPE uses the "rotate half" pairing (dimension i with
i + D/2), as ours does, so no permutation is needed. Everything else is a rename: :data:`NAMES`.

Its MLP is gated, ``down(act(gate(x)) * up(x))``, with ``hidden_act`` naming ``act``
(:data:`HIDDEN_ACT`): ``silu`` is our SwiGLU, ``gelu_pytorch_tanh`` our GeGLU, and ``relu`` with
``gate = up`` is *exactly* our ReLU² MLP, since relu(z)·z = relu(z)² for every z. So a ReLU² model
(the default recipe's) exports with its first matrix written twice, and imports back as ReLU² when
the two are equal (a ReLU-gated MLP with two different matrices has no equal here: refused).

Qwen2 (``Qwen2ForCausalLM``) is Llama with biases on q, k and v (our ``[model.attn] qkv_bias``);
Qwen3 (``Qwen3ForCausalLM``) is Llama with an RMSNorm on each query and key head before RoPE
(``qk_norm``) and a head width of its own (``head_dim``). Both are here: :data:`QWEN_NAMES`.

Mistral, Ministral, the MoE families, DiffLlama and Jamba's attention layers are Llama blocks with
something added; their modules build on :func:`config_from_hf`, :func:`from_hf` and :func:`to_hf`,
and :func:`block_problems` says what of a model the Llama block cannot hold.
"""

from __future__ import annotations

import torch

from scratchlm.models.blocks.attention import AttentionConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf.common import cpu_state, inverse, rename, rope_theta

# Hugging Face's tensor names -> ours; ``{}`` is the layer number. q, k, v: see qkv_from_hf.
NAMES = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "norm_f.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "blocks.{}.norm1.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blocks.{}.norm2.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blocks.{}.attn.proj.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blocks.{}.mlp.gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blocks.{}.mlp.up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blocks.{}.mlp.down.weight",
}
# Qwen3's q/k norms (Qwen2's q/k/v biases are fused with the weights by qkv_from_hf).
QWEN_NAMES = {
    **NAMES,
    **{
        f"model.layers.{{}}.self_attn.{n}.weight": f"blocks.{{}}.attn.{n}.weight"
        for n in ("q_norm", "k_norm")
    },
}
# Our gated MLPs -> the ``hidden_act`` of a Llama MLP that computes them (relu2: gate = up).
HIDDEN_ACT = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh", "relu2": "relu"}
# hidden_act on import (gelu_new is the same tanh approximation, written out).
MLP_FROM_ACT = {
    "silu": "swiglu",
    "swish": "swiglu",
    "gelu_pytorch_tanh": "geglu",
    "gelu_new": "geglu",
    "relu": "relu2",
}


def mlp_from_act(hf: dict) -> str:
    """Our MLP for a Llama-block config's ``hidden_act`` (see :data:`HIDDEN_ACT`)."""
    act = hf.get("hidden_act", "silu")
    if act not in MLP_FROM_ACT:
        raise ValueError(
            f"{hf.get('model_type', 'llama')}: hidden_act {act!r} is not supported; scratchlm reads "
            f"{', '.join(sorted(MLP_FROM_ACT))} (SwiGLU, GeGLU, and relu with gate_proj = up_proj: ReLU²)"
        )
    return MLP_FROM_ACT[act]


def config_from_hf(hf: dict) -> GPTConfig:
    """Our config for a Llama ``config.json``; the other Llama-block families start from it."""
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(
            f"{hf.get('model_type', 'llama')}: attention_bias or mlp_bias is not supported "
            "(biases on q, k and v alone are: that is Qwen2)"
        )
    theta = rope_theta(hf)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    own_width = head_dim * hf["num_attention_heads"] != hf["hidden_size"]  # heads wider or narrower
    return GPTConfig(
        attn=AttentionConfig(head_dim=head_dim if own_width else None),
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        block_size=hf["max_position_embeddings"],
        position="rope",
        rope_theta=theta,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp=mlp_from_act(hf),
        bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def qwen_config(hf: dict) -> GPTConfig:
    """Our config for a dense Qwen2 or Qwen3 ``config.json``: Llama's, with q/k/v biases (Qwen2) or
    q/k norms (Qwen3). A sliding window (``use_sliding_window``) is refused: Qwen applies it to only
    some layers, by rules of its own."""
    kind = hf["model_type"]
    if hf.get("use_sliding_window") or set(hf.get("layer_types") or []) - {"full_attention"}:
        raise ValueError(
            f"{kind}: use_sliding_window / sliding layer_types are not supported (only full attention)"
        )
    if kind == "qwen3" and hf.get("attention_bias"):
        raise ValueError("qwen3: attention_bias (on q, k, v and o) is not supported")
    fields = {k: v for k, v in hf.items() if k != "attention_bias"}
    if kind == "qwen3":  # Qwen3Config's head width is 128 unless given, whatever hidden_size / heads is
        fields.setdefault("head_dim", 128)
    base = config_from_hf(fields).to_dict()
    attn = base.get("attn") or {}
    base["attn"] = {**attn, **({"qkv_bias": True} if kind == "qwen2" else {"qk_norm": True})}
    return GPTConfig.from_dict(base)


def settle_config(c: GPTConfig, t: dict) -> GPTConfig:
    """What the weights decide: a ``relu`` MLP is ReLU² only where ``gate_proj`` = ``up_proj``."""
    if c.mlp != "relu2":
        return c
    for i in range(c.n_layer):
        prefix = f"model.layers.{i}.mlp."
        gate, up = t.get(prefix + "gate_proj.weight"), t.get(prefix + "up_proj.weight")
        if gate is not None and up is not None and not torch.equal(gate, up):
            raise ValueError(
                f"layer {i}: hidden_act 'relu' with gate_proj != up_proj is a ReLU-gated MLP (ReGLU), "
                "which scratchlm does not have; it reads relu only as ReLU² (gate_proj = up_proj)"
            )
    return c


def block_problems(c: GPTConfig, family: str, mixers: tuple[str, ...] = ("attention",)) -> list[str]:
    """What of ``c`` a Llama-block format (``family``) cannot hold: one line per property, naming
    its value and what the format needs; [] when the blocks fit. ``mixers``: the layers it has."""
    problems = []
    if c.position != "rope":
        problems.append(f"model.position = {c.position!r} ({family} needs 'rope')")
    if c.norm != "rmsnorm":
        problems.append(f"model.norm = {c.norm!r} ({family} needs 'rmsnorm')")
    if not c.prenorm:
        problems.append(f"model.prenorm = false ({family} needs pre-norm blocks)")
    if c.mlp not in HIDDEN_ACT:
        problems.append(f"model.mlp = {c.mlp!r} ({family} needs a gated MLP: swiglu, geglu, or relu2)")
    if c.bias:
        problems.append(
            f"model.bias = true ({family} has no biases; q/k/v biases alone are model.attn.qkv_bias)"
        )
    wanted = " or ".join(repr(m) for m in mixers)
    if any(mixer not in mixers or mlp != "dense" for mixer, mlp in c.layer_kinds()):
        problems.append(f"model.layers = {c.layers} ({family} needs every layer {wanted} with a dense MLP)")
    return problems


def problems(c: GPTConfig) -> list[str]:
    return block_problems(c, "llama")


def qwen_problems(c: GPTConfig, kind: str) -> list[str]:
    found = block_problems(c, kind)
    if kind == "qwen2" and not c.attn.qkv_bias:
        found.append("model.attn.qkv_bias unset (qwen2 has q/k/v biases; without them the model is llama)")
    if kind == "qwen3" and not c.attn.qk_norm:
        found.append("model.attn.qk_norm unset (qwen3 norms q and k; without that the model is llama)")
    return found


def qkv_from_hf(t: dict, c: GPTConfig) -> dict[str, torch.Tensor]:
    """Our fused ``blocks.{i}.attn.qkv`` weight (and bias, where q, k, v have biases) from Hugging
    Face's ``model.layers.{i}.self_attn.{q,k,v}_proj``, in every layer that has all three."""
    out = {}
    for i in range(c.n_layer):
        prefix = f"model.layers.{i}.self_attn."
        for part in ("weight", "bias"):
            names = [f"{prefix}{p}_proj.{part}" for p in "qkv"]
            if all(name in t for name in names):
                out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([t[name] for name in names], dim=0)
    return out


def qkv_to_hf(sd: dict, c: GPTConfig) -> dict[str, torch.Tensor]:
    """Hugging Face's q, k, v projections from our fused ones: the inverse of :func:`qkv_from_hf`."""
    D, H, Hkv = c.head_dim, c.n_head, c.kv_heads
    out = {}
    for i in range(c.n_layer):
        for part in ("weight", "bias"):
            fused = sd.get(f"blocks.{i}.attn.qkv.{part}")
            if fused is not None:
                parts = fused.split([H * D, Hkv * D, Hkv * D])
                out.update(
                    {
                        f"model.layers.{i}.self_attn.{p}_proj.{part}": w.contiguous()
                        for p, w in zip("qkv", parts)
                    }
                )
    return out


def from_hf(t: dict, c: GPTConfig, names: dict[str, str] = NAMES) -> dict:
    """Their tensors -> our state dict: the renames of ``names``, then q, k, v fused per layer
    (a ReLU² MLP keeps ``up``; its ``gate``, equal to it, is dropped)."""
    out = rename(t, names)
    if c.tie_embeddings:
        out.pop("lm_head.weight", None)
    if c.mlp == "relu2":
        out = {k: v for k, v in out.items() if not k.endswith(".mlp.gate.weight")}
    out.update(qkv_from_hf(t, c))
    return out


def to_hf(model: GPT, names: dict[str, str] = NAMES) -> tuple[dict, dict]:
    """Our model -> their tensors and config.json (export_hf has checked that the blocks are Llama's)."""
    c = model.config
    found = block_problems(c, "llama", tuple({mixer for mixer, _ in c.layer_kinds()}))  # any layers
    if found:
        raise ValueError("llama export cannot hold this model: " + "; ".join(found))
    sd = cpu_state(model)
    if c.tie_embeddings:
        sd.pop("lm_head.weight")
    if c.mlp == "relu2":  # relu(z)·z = relu(z)²: the gate is the up-projection, written twice
        sd.update({k.replace(".mlp.up.", ".mlp.gate."): v.clone() for k, v in sd.items() if ".mlp.up." in k})
    tensors = {**rename(sd, inverse(names)), **qkv_to_hf(sd, c)}
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ff_width,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.block_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": HIDDEN_ACT[c.mlp],
    }
    return tensors, hf


def qwen_to_hf(model: GPT, kind: str) -> tuple[dict, dict]:
    """Our model -> dense Qwen2's or Qwen3's (``kind``) tensors and config.json."""
    tensors, hf = to_hf(model, QWEN_NAMES)
    hf.pop("mlp_bias")
    hf.update(
        {
            "architectures": ["Qwen2ForCausalLM" if kind == "qwen2" else "Qwen3ForCausalLM"],
            "model_type": kind,
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_dropout": 0.0,
        }
    )
    if kind == "qwen2":
        hf.pop("attention_bias")
    return tensors, hf


def default_architecture(config: GPTConfig) -> str | None:
    """'qwen2' for a Llama-block model with q/k/v biases, 'qwen3' for one with q/k norms (dense
    attention layers only); None otherwise (another family decides)."""
    if any(kind != ("attention", "dense") for kind in config.layer_kinds()):
        return None
    if config.attn.qkv_bias and not config.attn.qk_norm:
        return "qwen2"
    if config.attn.qk_norm and not config.attn.qkv_bias:
        return "qwen3"
    return None
