"""Hugging Face round trip for every family in the import table (``scratchlm.models.hf.FAMILIES``).

Each family: a randomly initialised ``transformers`` model built from a small config (no download)
is saved, imported, and gives the same logits; our export of it (named by its ``model_type``)
loads back in ``transformers`` with the same logits. A family added to the table without a model
here fails ``test_every_family_has_a_round_trip``. Family-specific checks (greedy decoding equal to
``generate``, layer patterns, refusals) stay beside each block kind in ``tests/models/blocks/``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scratchlm.models.config import GPTConfig  # noqa: E402
from scratchlm.models.gpt import GPT  # noqa: E402
from scratchlm.models.hf import FAMILIES, export_hf, import_hf  # noqa: E402

_LLAMA = {
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


def _randomise(hf, norms: str = "uniform"):
    """Biases and norm gains start at 0 / 1 in transformers, where a swapped tensor would hide."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") and "correction" not in name:
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5) if norms == "uniform" else p.normal_(0.0, 0.5)
    return hf


def _gpt2():
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
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
    )


def _llama(tied: bool = False):
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**_LLAMA, tie_word_embeddings=tied, rope_theta=1e4)
    )


def _mistral():
    return transformers.MistralForCausalLM(
        transformers.MistralConfig(
            **{**_LLAMA, "num_hidden_layers": 4}, head_dim=8, sliding_window=4, attn_implementation="eager"
        )
    )


def _ministral():
    return transformers.MinistralForCausalLM(
        transformers.MinistralConfig(
            **{**_LLAMA, "num_hidden_layers": 4},
            head_dim=8,
            sliding_window=4,
            attn_implementation="eager",
            layer_types=["sliding_attention", "full_attention"] * 2,
        )
    )


def _gemma2():
    config = transformers.Gemma2Config(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        query_pre_attn_scalar=20,
        max_position_embeddings=40,
        sliding_window=4,
        attn_logit_softcapping=10.0,
        final_logit_softcapping=5.0,
        initializer_range=0.4,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    config._attn_implementation = "eager"  # SDPA cannot soft-cap
    return _randomise(
        transformers.Gemma2ForCausalLM(config), norms="normal"
    )  # (1 + w) norms: w = 0 hides the fold


def _mixtral():
    return transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            initializer_range=0.3,
            rope_theta=10000.0,
            attn_implementation="eager",
        )
    )


def _qwen2_moe():
    return _randomise(
        transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(
                vocab_size=101,
                hidden_size=32,
                intermediate_size=56,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=48,
                num_experts=6,
                num_experts_per_tok=3,
                moe_intermediate_size=24,
                shared_expert_intermediate_size=40,
                norm_topk_prob=False,
                decoder_sparse_step=1,
                mlp_only_layers=[1],
                initializer_range=0.3,
                qkv_bias=True,
            )
        )
    )


def _qwen3_moe():
    return _randomise(
        transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(
                vocab_size=101,
                hidden_size=32,
                intermediate_size=56,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=8,
                max_position_embeddings=48,
                num_experts=6,
                num_experts_per_tok=2,
                moe_intermediate_size=24,
                norm_topk_prob=True,
                decoder_sparse_step=2,
                initializer_range=0.3,
                tie_word_embeddings=True,
            )
        )
    )


def _deepseek(version: int):
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
        "q_lora_rank": 24,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 12,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 64,
        "initializer_range": 0.3,
        "routed_scaling_factor": 2.5,
        "rms_norm_eps": 1e-5,
        "attn_implementation": "eager",
        "eos_token_id": None,
        "bos_token_id": None,
    }
    if version == 2:
        config = transformers.DeepseekV2Config(topk_method="group_limited_greedy", **common)
        return transformers.DeepseekV2ForCausalLM(config)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(norm_topk_prob=True, **common))
    with torch.no_grad():  # a correction bias that changes which experts are chosen
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.rand(8) * 0.5)
    return model


def _diffllama():
    hf = transformers.DiffLlamaForCausalLM(
        transformers.DiffLlamaConfig(**{**_LLAMA, "num_key_value_heads": 4}, attn_implementation="eager")
    )
    with torch.no_grad():  # λ vectors large and different in every layer
        for layer in hf.model.layers:
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                getattr(layer.self_attn, name).normal_(0, 0.5)
    return hf


def _mamba():
    return _randomise(
        transformers.MambaForCausalLM(
            transformers.MambaConfig(
                vocab_size=101,
                hidden_size=32,
                state_size=8,
                num_hidden_layers=2,
                expand=2,
                initializer_range=0.5,
                use_mambapy=False,
                use_bias=True,
                time_step_rank=3,
            )
        )
    )


def _jamba():
    return _randomise(
        transformers.JambaForCausalLM(
            transformers.JambaConfig(
                vocab_size=101,
                hidden_size=32,
                intermediate_size=48,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_experts=4,
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
        )
    )


MODELS = {
    "gpt2": _gpt2,
    "llama": _llama,
    "mistral": _mistral,
    "ministral": _ministral,
    "gemma2": _gemma2,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v2": lambda: _deepseek(2),
    "deepseek_v3": lambda: _deepseek(3),
    "diffllama": _diffllama,
    "mamba": _mamba,
    "jamba": _jamba,
}
CASES = [(family, MODELS[family]) for family in MODELS] + [("llama", lambda: _llama(tied=True))]


def test_every_family_has_a_round_trip():
    assert set(MODELS) == set(FAMILIES)


@pytest.mark.parametrize("family,make", CASES, ids=[*MODELS, "llama-tied"])
def test_import_matches_and_export_loads_back(tmp_path, family, make):
    torch.manual_seed(0)
    hf = make().eval()
    assert hf.config.model_type == family
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = import_hf(tmp_path / "hf")
    x = torch.randint(0, hf.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = hf(x).logits
        got, _ = ours(x)
    assert expected.abs().max() > 1.0  # large weights: a wrong activation, norm or rotation cannot hide
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    export_hf(ours, tmp_path / "exported", family)
    back = type(hf).from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, expected, atol=1e-4, rtol=1e-4)


def test_export_refuses_what_the_target_cannot_express(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, block_size=8, position="alibi"))
    with pytest.raises(ValueError, match="GPT-2 export needs"):
        export_hf(model, tmp_path / "x", "gpt2")
    with pytest.raises(ValueError, match="Llama export needs"):
        export_hf(model, tmp_path / "y", "llama")


@pytest.mark.parametrize(
    "switch,value,can",
    [("softcap", 30.0, "gemma2"), ("qkv_bias", True, "qwen2_moe"), ("qk_norm", True, "qwen3_moe")],
)
def test_export_refuses_a_switch_its_format_cannot_hold(tmp_path, switch, value, can):
    model = GPT(
        GPTConfig(
            vocab_size=50,
            n_layer=1,
            n_head=2,
            d_model=16,
            block_size=8,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
            attn={switch: value},
        )
    )
    with pytest.raises(ValueError, match=f"cannot express model.attn.{switch}; formats that can: {can}"):
        export_hf(model, tmp_path / "x", "llama")


def test_an_export_that_would_drop_or_lack_a_tensor_is_refused(tmp_path):
    """GPT-2's format always has q/k/v biases: a model with biases but none on q, k, v cannot be
    written as GPT-2 (before, the folder was written and did not load back)."""
    config = GPTConfig(
        vocab_size=50,
        n_layer=1,
        n_head=2,
        d_model=16,
        block_size=16,
        position="learned",
        norm="layernorm",
        mlp="gelu_tanh",
        bias=True,
        attn={"qkv_bias": False},
    )
    with pytest.raises(
        ValueError,
        match=r"gpt2 export cannot hold this model \(tensors this model lacks: "
        r"blocks\.0\.attn\.qkv\.bias",
    ):
        export_hf(GPT(config), tmp_path / "out", "gpt2")
    assert not (tmp_path / "out").exists()  # refused before anything was written
