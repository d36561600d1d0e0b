"""Random ``transformers`` models of every family in ``scratchlm.models.hf.FAMILIES``, built from
small configs (no download), and the two checks the Hugging Face tests share.

``MODELS`` maps each family to a builder; ``test_hf_roundtrip.py`` runs every one, and the block
tests (``tests/models/blocks/``, ``test_gemma2.py``) build their variants through the same builders
with keyword arguments (tied embeddings, a window, the dense layers of DeepSeek, ...).
Every builder seeds torch with 0, makes the weights large (``initializer_range`` 0.3 to 0.5, and
:func:`randomise` where transformers starts a tensor at 0 or 1) and returns the model in eval mode.

:func:`round_trip` saves a model, imports it (logits equal), exports ours back and loads that in
``transformers`` (logits equal); :func:`assert_greedy_equal` compares greedy decoding through our
cache with ``generate``. Importable from every test under ``tests/models`` (its ``conftest.py``
puts this folder on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from scratchlm.generate.generate import generate
from scratchlm.generate.sampling import SamplingConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf import export_hf, import_hf

GREEDY = SamplingConfig(temperature=0)

LLAMA = {
    "vocab_size": 103,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 40,
    "initializer_range": 0.5,
    "rms_norm_eps": 1e-6,
}
SMALL = {"vocab_size": 101, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}
MOE = {**SMALL, "max_position_embeddings": 48, "initializer_range": 0.3}  # Mixtral's and Qwen's
QWEN_MOE = {**MOE, "intermediate_size": 56, "num_experts": 6, "moe_intermediate_size": 24}


def _transformers():
    """transformers, or the calling test skips."""
    return pytest.importorskip("transformers")


def randomise(hf, norms: str = "uniform", experts: float | None = None):
    """Biases and norm gains start at 0 / 1 in transformers, where a swapped or missing tensor would
    hide (Jamba's B and C norms, say): give each its own random values (``norms="normal"``: around 0,
    for Gemma's (1 + w) norms, whose w = 0 would hide the fold). ``experts``: the standard deviation
    for MoE experts' fused tensors, initialised as small as the rest. DeepSeek-V3's correction bias
    is left to its builder."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if experts is not None and "experts" in name:
                p.normal_(0.0, experts)
            elif name.endswith("bias") and "correction" not in name:
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5) if norms == "uniform" else p.normal_(0.0, 0.5)
    return hf


def _build(cls, config, seed: int = 0):
    torch.manual_seed(seed)
    return cls(config)


def gpt2():
    t = _transformers()
    config = t.GPT2Config(
        vocab_size=101,
        n_positions=32,
        n_embd=48,
        n_layer=3,
        n_head=4,
        initializer_range=0.5,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    return _build(t.GPT2LMHeadModel, config).eval()


def llama(tied: bool = False, **overrides):
    t = _transformers()
    config = t.LlamaConfig(**{**LLAMA, "tie_word_embeddings": tied, "rope_theta": 1e4, **overrides})
    return _build(t.LlamaForCausalLM, config).eval()


def qwen2(tied: bool = True, **overrides):
    """Dense Qwen2: Llama with q/k/v biases (randomised: at 0 a missing bias would hide), tied
    embeddings as in Qwen2's small models."""
    t = _transformers()
    config = t.Qwen2Config(**{**LLAMA, "tie_word_embeddings": tied, "rope_theta": 1e4, **overrides})
    return randomise(_build(t.Qwen2ForCausalLM, config)).eval()


def qwen3(tied: bool = False, **overrides):
    """Dense Qwen3: Llama with q/k RMSNorms per head (randomised) and a head width of its own (12,
    not hidden / heads = 8)."""
    t = _transformers()
    config = t.Qwen3Config(
        **{**LLAMA, "head_dim": 12, "tie_word_embeddings": tied, "rope_theta": 1e4, **overrides}
    )
    return randomise(_build(t.Qwen3ForCausalLM, config)).eval()


def mistral(kind: str = "mistral"):
    """Every layer sliding (``mistral``) or sliding and full layers alternating (``ministral``);
    a window of 4."""
    t = _transformers()
    common = {
        **LLAMA,
        "vocab_size": 101,
        "num_hidden_layers": 4,
        "head_dim": 8,
        "initializer_range": 0.4,
        "sliding_window": 4,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": 0,
    }
    if kind == "mistral":
        config, cls = t.MistralConfig(**common), t.MistralForCausalLM
    else:
        layer_types = ["sliding_attention", "full_attention"] * 2
        config, cls = t.MinistralConfig(**common, layer_types=layer_types), t.MinistralForCausalLM
    config._attn_implementation = "eager"
    return _build(cls, config).eval()


def gemma2(tied: bool = True, **overrides):
    """4 layers, window 4, head_dim 24 != hidden / heads = 16, query_pre_attn_scalar 20 != head_dim,
    both soft-caps on."""
    t = _transformers()
    config = t.Gemma2Config(
        **{
            "vocab_size": 101,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 24,
            "query_pre_attn_scalar": 20,
            "max_position_embeddings": 40,
            "sliding_window": 4,
            "attn_logit_softcapping": 10.0,
            "final_logit_softcapping": 5.0,
            "initializer_range": 0.4,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": tied,
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
            **overrides,
        }
    )
    config._attn_implementation = "eager"  # SDPA cannot soft-cap; HF's Gemma-2 refuses it too
    return randomise(_build(t.Gemma2ForCausalLM, config), norms="normal").eval()


def mixtral(window: int | None = None, **overrides):
    t = _transformers()
    config = t.MixtralConfig(
        **{
            **MOE,
            "intermediate_size": 40,
            "num_hidden_layers": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": window,
            "rope_theta": 10000.0,
            "attn_implementation": "eager",
            **overrides,
        }
    )
    return randomise(_build(t.MixtralForCausalLM, config), experts=0.3).eval()


def qwen2_moe(norm_topk_prob: bool = False):
    """3 layers, the middle one dense (``mlp_only_layers``); a gated shared expert; q/k/v biases."""
    t = _transformers()
    config = t.Qwen2MoeConfig(
        **QWEN_MOE,
        num_hidden_layers=3,
        num_experts_per_tok=3,
        shared_expert_intermediate_size=40,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        qkv_bias=True,
    )
    return randomise(_build(t.Qwen2MoeForCausalLM, config), experts=0.3).eval()


def qwen3_moe():
    """MoE every 2nd layer (``decoder_sparse_step``), q/k norms, tied embeddings."""
    t = _transformers()
    config = t.Qwen3MoeConfig(
        **QWEN_MOE,
        num_hidden_layers=2,
        head_dim=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=2,
        tie_word_embeddings=True,
    )
    return randomise(_build(t.Qwen3MoeForCausalLM, config), experts=0.3).eval()


def deepseek(version: int, dense_layers: int = 1, q_lora_rank: int | None = 24):
    """DeepSeek-V2 (group-limited softmax router) or V3 (sigmoid router with a random correction
    bias): 3 layers, the first ``dense_layers`` dense, a low-rank query unless ``q_lora_rank`` is None."""
    t = _transformers()
    common = {
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 48,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 2,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "n_group": 4,
        "topk_group": 2,
        "kv_lora_rank": 16,
        "q_lora_rank": q_lora_rank,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 12,
        "first_k_dense_replace": dense_layers,
        "max_position_embeddings": 64,
        "initializer_range": 0.3,
        "routed_scaling_factor": 2.5,
        "rms_norm_eps": 1e-5,
        "attn_implementation": "eager",
        "eos_token_id": None,
        "bos_token_id": None,
    }
    if version == 2:
        config = t.DeepseekV2Config(topk_method="group_limited_greedy", **common)
        return _build(t.DeepseekV2ForCausalLM, config).eval()
    model = _build(t.DeepseekV3ForCausalLM, t.DeepseekV3Config(norm_topk_prob=True, **common)).eval()
    with torch.no_grad():  # a random correction bias: it must change the choice, never the weights
        for layer in model.model.layers[dense_layers:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.rand(8) * 0.5)
    return model


def diffllama(heads: int = 8, kv_heads: int = 4, tied: bool = False):
    """3 layers; HF draws the λ vectors with std 0.1: here large and different in every layer."""
    t = _transformers()
    config = t.DiffLlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=48,
        initializer_range=0.3,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        attn_implementation="eager",
        dtype=torch.float32,
    )
    hf = _build(t.DiffLlamaForCausalLM, config).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(layer.self_attn, name).normal_(0, 0.5)
    return hf


def mamba(tied: bool = True, **switches):
    """HF's defaults but for the sizes (conv bias, no projection biases, automatic Δ rank, tied
    embeddings), changed by ``switches``."""
    t = _transformers()
    config = t.MambaConfig(
        vocab_size=101,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        initializer_range=0.5,
        use_mambapy=False,
        tie_word_embeddings=tied,
        **switches,
    )
    return randomise(_build(t.MambaForCausalLM, config)).eval()


def jamba(num_experts: int = 4):
    """4 layers: attention every 2nd from layer 1, MoE (``num_experts`` > 1) every 2nd from layer 0."""
    t = _transformers()
    config = t.JambaConfig(
        **SMALL,
        intermediate_size=48,
        num_hidden_layers=4,
        num_experts=num_experts,
        num_experts_per_tok=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=0,
        mamba_d_state=8,
        mamba_d_conv=4,
        max_position_embeddings=64,
        initializer_range=0.5,
        use_mambapy=False,
        attn_implementation="eager",
    )
    return randomise(_build(t.JambaForCausalLM, config)).eval()


MODELS = {
    "gpt2": gpt2,
    "llama": llama,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "mistral": mistral,
    "ministral": lambda: mistral("ministral"),
    "gemma2": gemma2,
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": qwen3_moe,
    "deepseek_v2": lambda: deepseek(2),
    "deepseek_v3": lambda: deepseek(3),
    "diffllama": diffllama,
    "mamba": lambda: mamba(use_bias=True, time_step_rank=3),
    "jamba": jamba,
}


class RoundTrip(NamedTuple):
    ours: GPT  # imported
    back: torch.nn.Module  # our export, loaded by transformers
    x: torch.Tensor  # the tokens compared on
    expected: torch.Tensor  # transformers' logits for x


def round_trip(
    hf,
    folder: Path,
    x: torch.Tensor | None = None,
    *,
    family: str | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    large: float = 1.0,
) -> RoundTrip:
    """Save ``hf`` to ``folder/hf`` and import it: our logits equal transformers' on ``x`` (by default
    2 random rows of 24 tokens), which exceed ``large`` (large weights: a wrong activation, norm,
    rotation or routing cannot hide). Export ours to ``folder/exported`` (as ``family``, or the
    architecture ``export_hf`` picks by itself): ``transformers`` loads it with the same logits."""
    hf.save_pretrained(folder / "hf", safe_serialization=True)
    ours = import_hf(folder / "hf")
    if x is None:
        x = torch.randint(0, hf.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = hf(x).logits
        got, _ = ours(x)
    assert expected.abs().max() > large
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)

    export_hf(ours, folder / "exported", family)
    back = type(hf).from_pretrained(folder / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, expected, atol=atol, rtol=rtol)
    return RoundTrip(ours, back, x, expected)


def assert_greedy_equal(hf, ours: GPT, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding of ``new_tokens`` after ``prompt`` (1, P) with our cache equals transformers'
    ``generate``, token for token; returns their tokens."""
    with torch.no_grad():
        theirs = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, prompt.shape[1] :].tolist()
    assert generate(ours, prompt, new_tokens, GREEDY, use_cache=True)[0] == theirs
    return theirs
