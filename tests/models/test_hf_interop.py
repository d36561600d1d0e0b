"""Hugging Face interchange: randomly initialised transformers models (built from a config, no
download) give the same logits after import, and our exports load back in transformers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scratchlm.models.config import GPTConfig  # noqa: E402
from scratchlm.models.gpt import GPT
from scratchlm.models.hf import export_hf, import_hf  # noqa: E402


def _gpt2_hf():
    config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                     initializer_range=0.5, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama_hf(tied: bool):
    config = transformers.LlamaConfig(vocab_size=103, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=40,
                                      initializer_range=0.5, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                                      rope_theta=10000.0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("make", [_gpt2_hf, lambda: _llama_hf(False), lambda: _llama_hf(True)], ids=["gpt2", "llama", "llama-tied"])
def test_import_matches_and_export_loads_back(tmp_path, make):
    hf = make()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = import_hf(tmp_path / "hf")
    x = torch.randint(0, hf.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = hf(x).logits
        got, _ = ours(x)
    assert expected.abs().max() > 1.0  # large initial weights: GELU/RoPE mistakes cannot hide
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    export_hf(ours, tmp_path / "exported")
    back = type(hf).from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, expected, atol=1e-4, rtol=1e-4)


def test_export_refuses_what_the_target_cannot_express(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, block_size=8, position="alibi"))
    with pytest.raises(ValueError, match="GPT-2 export needs"):
        export_hf(model, tmp_path / "x", "gpt2")
    with pytest.raises(ValueError, match="Llama export needs"):
        export_hf(model, tmp_path / "y", "llama")
