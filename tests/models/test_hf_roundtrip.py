"""Hugging Face round trip for every family in the import table (``scratchlm.models.hf.FAMILIES``).

Each family: a randomly initialised ``transformers`` model built from a small config (no download;
the builders are ``hf_models.MODELS``, shared with the block tests) is saved, imported, and gives the
same logits; our export of it (named by its ``model_type``) loads back in ``transformers`` with the
same logits. A family added to the table without a builder fails ``test_every_family_has_a_round_trip``.
Family-specific checks (greedy decoding equal to ``generate``, layer patterns, variants such as tied
embeddings or dense layers, refusals) stay beside each block kind in ``tests/models/blocks/`` and
``test_gemma2.py``, and build their models through the same ``hf_models`` builders.
"""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

import hf_models  # noqa: E402
from hf_models import MODELS, round_trip  # noqa: E402

from scratchlm.models.config import GPTConfig  # noqa: E402
from scratchlm.models.gpt import GPT  # noqa: E402
from scratchlm.models.hf import FAMILIES, export_hf  # noqa: E402

CASES = [(family, MODELS[family]) for family in MODELS] + [("llama", lambda: hf_models.llama(tied=True))]


def test_every_family_has_a_round_trip():
    assert set(MODELS) == set(FAMILIES)


@pytest.mark.parametrize("family,make", CASES, ids=[*MODELS, "llama-tied"])
def test_import_matches_and_export_loads_back(tmp_path, family, make):
    hf = make()
    assert hf.config.model_type == family
    round_trip(hf, tmp_path, family=family)  # exported under the family's own name


def test_export_refuses_what_the_target_cannot_express(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, block_size=8, position="alibi"))
    with pytest.raises(
        ValueError,
        match=r"gpt2 export cannot hold this model: model.position = 'alibi' \(gpt2 needs 'learned'\)",
    ):
        export_hf(model, tmp_path / "x", "gpt2")
    with pytest.raises(
        ValueError,
        match=r"llama export cannot hold this model: model.position = 'alibi' \(llama needs 'rope'\)",
    ):
        export_hf(model, tmp_path / "y", "llama")


@pytest.mark.parametrize(
    "switch,value,can",
    [
        ("softcap", 30.0, "gemma2"),
        ("qkv_bias", True, "qwen2, qwen2_moe"),
        ("qk_norm", True, "qwen3, qwen3_moe"),
    ],
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
    with pytest.raises(
        ValueError,
        match=f"model.attn.{switch} = {value!r} \\(llama cannot express it; formats that can: {can}",
    ):
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
        match=r"gpt2 export cannot hold this model: tensors this model lacks: blocks\.0\.attn\.qkv\.bias",
    ):
        export_hf(GPT(config), tmp_path / "out", "gpt2")
    assert not (tmp_path / "out").exists()  # refused before anything was written
