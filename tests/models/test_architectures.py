"""The layer pattern: a model is a stack whose layers each pick a mixer and
an MLP; each block kind reads its own settings table. These tests prove the pattern expands and
validates as documented, that a block kind's table is built and checked like any config (a typo
fails naming the key), that presets' tables merge key by key with overrides, and that configs
written before the pattern existed read and write unchanged."""

from __future__ import annotations

import pytest

from scratchlm.config import ConfigError, apply_overrides, load_config
from scratchlm.models.blocks.moe import MoEConfig
from scratchlm.models.config import GPTConfig
from scratchlm.models.presets import config_from_section


def test_the_pattern_repeats_to_every_layer():
    c = GPTConfig(n_layer=4, layers=["sliding", "attention+moe"], attn={"window": 8})
    assert c.layer_kinds() == [("sliding", "dense"), ("attention", "moe")] * 2
    assert GPTConfig(n_layer=3).layer_kinds() == [("attention", "dense")] * 3
    explicit = ["attention"] * 1 + ["attention+moe"] * 2
    assert GPTConfig(n_layer=3, layers=explicit).layer_kinds()[0] == ("attention", "dense")


@pytest.mark.parametrize(
    "layers,message",
    [
        (["attention"] * 3, "must divide model.n_layer = 4"),
        (["attn"], "item 'attn': expected 'mixer' or 'mixer\\+mlp'"),
        (["attention+mixture"], "item 'attention\\+mixture'"),
        ([], "must be non-empty"),
    ],
)
def test_a_bad_pattern_is_refused_naming_what_is_allowed(layers, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(n_layer=4, layers=layers)


def test_sliding_layers_need_a_window():
    with pytest.raises(ConfigError, match="set model.attn.window"):
        GPTConfig(n_layer=2, layers=["sliding"])


def test_a_kind_used_without_its_table_gets_the_defaults_and_unused_tables_stay_unset():
    c = GPTConfig(n_layer=2, layers=["attention+moe"])
    assert isinstance(c.moe, MoEConfig) and c.moe == MoEConfig()
    assert c.mla is None and "mla" not in c.to_dict()


def test_a_block_table_is_checked_like_any_config(tmp_path):
    path = tmp_path / "moe.toml"
    path.write_text(
        '[model]\nn_layer = 2\nlayers = ["attention+moe"]\n[model.moe]\nn_experts = 4\ntop_k = 2\n'
    )
    c = config_from_section(load_config(path)["model"])
    assert c.moe.n_experts == 4 and c.moe.top_k == 2
    path.write_text('[model]\nlayers = ["attention+moe"]\n[model.moe]\nn_expert = 4\n')
    with pytest.raises(ConfigError, match=r"unknown \[model.moe\] keys \['n_expert'\]"):
        config_from_section(load_config(path)["model"])
    with pytest.raises(ConfigError, match=r"model.moe.top_k = 0: must be >= 1"):
        GPTConfig(layers=["attention+moe"], moe={"top_k": 0})
    with pytest.raises(ConfigError, match=r"model.moe = 3: expected a table"):
        GPTConfig(moe=3)


def test_overrides_update_a_table_key_by_key():
    section = {"n_layer": 2, "layers": ["attention+moe"], "moe": {"n_experts": 4, "top_k": 2}}
    section = apply_overrides({"model": section}, ["model.moe.top_k=1"])["model"]
    c = config_from_section(section)
    assert (c.moe.n_experts, c.moe.top_k) == (4, 1)


def test_the_config_round_trips_through_its_dict_and_old_dicts_read_unchanged():
    c = GPTConfig(n_layer=2, layers=["attention+moe"], moe={"n_experts": 4})
    assert GPTConfig.from_dict(c.to_dict()) == c
    plain = GPTConfig().to_dict()
    assert not {"layers", "attn", "moe", "mla", "diff", "nsa", "mamba", "mtp"} & set(plain)
    assert GPTConfig.from_dict(plain) == GPTConfig()


# Published sizes, in billions: total, active, and how close the figure is given ("46.7B": 0.05;
# "236B": 0.5). Sources: Mixtral of Experts (Jiang et al. 2024): 46.7B / 12.9B; DeepSeek-V2 (2024):
# 236B / 21B and V2-Lite 15.7B / 2.4B; DeepSeek-V3 report: 671B / 37B; Jamba (Lieber et al. 2024):
# 52B / 12B. DeepSeek-V2-Lite's 2.4B active leaves out the input embedding (a lookup, no
# multiply), as V3's 36.6B does; the others count it.
PUBLISHED = {
    "mixtral-8x7b": (46.7, 12.9, 0.05, True),
    "deepseek-v2-lite": (15.7, 2.4, 0.06, False),
    "deepseek-v2": (236, 21, 0.5, True),
    "deepseek-v3": (671, 37, 0.6, True),
    "jamba-v0.1": (52, 12, 0.5, True),
}


def _meta_model(name):
    import torch

    from scratchlm.models.gpt import GPT
    from scratchlm.models.presets import preset

    with torch.device("meta"):
        return GPT(preset(name))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_at_published_shape_have_the_published_parameter_counts(name):
    total, active, within, with_embedding = PUBLISHED[name]
    model = _meta_model(name)
    counts = model.parameter_counts()
    embedding = 0 if with_embedding else model.tok_emb.weight.numel()
    assert abs(counts["total"] / 1e9 - total) <= within, counts
    assert abs((counts["active"] - embedding) / 1e9 - active) <= within, counts


def test_deepseek_v3_details_match_the_report():
    model = _meta_model("deepseek-v3")
    counts = model.parameter_counts()
    embedding = model.tok_emb.weight.numel()
    assert abs((counts["active"] - embedding) / 1e9 - 36.6) <= 0.05  # "36.6B without the input embedding"
    # The MTP module's own weights (2C -> C projection, two norms, one MLA + 256-expert MoE block),
    # sharing the embedding and output head: 11.6B, the "~11.5B".
    assert abs(counts["mtp"] / 1e9 - 11.5) <= 0.15
    # MLA caches the latent and the shared RoPE key: 512 + 64 = 576 values per token per layer.
    assert [block.mixer.cache_values_per_token() for block in model.blocks] == [576] * 61
    assert model.kv_cache_bytes_per_token(2) == 2 * 576 * 61


def test_settings_no_layer_reads_are_refused_not_ignored():
    """A [model.moe] table without a '+moe' layer, or a sliding window without a 'sliding' layer,
    would silently build a plain model: refused, naming what to add."""
    with pytest.raises(ConfigError, match=r"model.moe is set but no layer uses 'moe'"):
        GPTConfig(n_layer=2, moe={"n_experts": 4})
    with pytest.raises(ConfigError, match=r"model.attn.window = 4 but no layer is 'sliding'"):
        GPTConfig(n_layer=2, attn={"window": 4})
    with pytest.raises(ConfigError, match=r"model.mamba is set but no layer uses 'mamba'"):
        GPTConfig(n_layer=2, layers=["attention"], mamba={"d_state": 8})


def test_set_dropout_reaches_every_mixer_kind():
    """DPO and RL compare log-probabilities of the same model: set_dropout(0) must turn off the
    attention-weight dropout every mixer keeps, not only the standard attention's."""
    import torch

    from scratchlm.models.gpt import GPT

    for layers, extra in (
        (["mla"], {}),
        (["diff"], {}),
        (
            ["nsa"],
            {
                "nsa": {
                    "compress_block": 4,
                    "compress_stride": 2,
                    "select_block": 4,
                    "select_count": 3,
                    "window": 4,
                }
            },
        ),
    ):
        torch.manual_seed(0)
        model = GPT(
            GPTConfig(
                vocab_size=40,
                n_layer=2,
                n_head=4,
                d_model=32,
                block_size=16,
                position="rope",
                dropout=0.2,
                layers=layers,
                **extra,
            )
        ).train()
        model.set_dropout(0.0)
        x = torch.randint(0, 40, (2, 16))
        assert torch.equal(model(x)[0], model(x)[0]), layers


def test_training_flops_count_the_mtp_modules():
    from scratchlm.models.gpt import GPT

    base = dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, block_size=16)
    plain, with_mtp = GPT(GPTConfig(**base)), GPT(GPTConfig(**base, mtp={"depth": 1}))
    mtp_weights = with_mtp.parameter_counts()["mtp"] + with_mtp.lm_head.weight.numel()
    assert with_mtp.flops_per_token()["forward"] == plain.flops_per_token()["forward"]
    extra = with_mtp.flops_per_token()["train"] - plain.flops_per_token()["train"]
    assert (
        extra == 6 * mtp_weights + 3 * 4 * 32 * 16
    )  # its block's attention over the context, x3 for training


@pytest.mark.parametrize("switch", ["qkv_bias", "qk_norm", "softcap", "scale"])
def test_attention_switches_are_refused_on_mixers_that_do_not_read_them(switch):
    value = 5.0 if switch in ("softcap", "scale") else True
    with pytest.raises(ConfigError, match=f"model.attn.{switch} appl"):
        GPTConfig(n_layer=2, layers=["attention", "mla"], attn={switch: value})
    GPTConfig(n_layer=2, layers=["attention", "sliding"], attn={"window": 4, switch: value})  # read by both
    with pytest.raises(ConfigError, match="model.attn.head_dim does not apply to 'mla' layers"):
        GPTConfig(n_layer=2, layers=["attention", "mla"], attn={"head_dim": 16})


def test_a_preset_can_change_its_layer_pattern():
    """Changing a preset's layers drops the preset's settings of kinds no layer uses any more (the
    user cannot delete a table from the command line); a table the user wrote is still checked."""
    c = config_from_section({"preset": "mixtral-8x7b", "n_layer": 2, "layers": ["attention"]})
    assert c.moe is None and c.layer_kinds() == [("attention", "dense")] * 2
    c = config_from_section(
        {"preset": "jamba-v0.1", "n_layer": 2, "layers": ["attention"], "position": "rope"}
    )
    assert c.mamba is None and c.moe is None
    with pytest.raises(ConfigError, match="model.moe is set but no layer uses 'moe'"):
        config_from_section({"preset": "mixtral-8x7b", "layers": ["attention"], "moe": {"top_k": 1}})


def test_auxiliary_losses_are_taken_once_and_a_trained_model_can_be_copied():
    import copy

    import torch

    from scratchlm.models.gpt import GPT

    model = GPT(
        GPTConfig(
            vocab_size=40,
            n_layer=2,
            n_head=2,
            d_model=32,
            block_size=16,
            layers=["attention+moe"],
            moe={"n_experts": 4, "top_k": 2},
            mtp={"depth": 1},
        )
    ).train()
    x = torch.randint(0, 40, (2, 16))
    model(x)[0].sum().backward()  # a forward without targets leaves the MoE losses for the trainer
    aux = model.auxiliary_loss()
    assert torch.is_tensor(aux) and aux > 0 and model.auxiliary_loss() == 0.0
    model(x, x)[1].backward()  # with targets the model takes them itself
    copy.deepcopy(model)  # no graph tensor left behind


def test_a_preset_can_become_sliding():
    c = config_from_section({"preset": "shakespeare-char", "layers": ["sliding"], "attn": {"window": 16}})
    assert c.attn.window == 16 and c.layer_kinds()[0] == ("sliding", "dense")


# The figures README.md's "Measured" table and docs/open-models.md print, to the 0.01B they print:
# (total, active, active without the input embedding or None, MTP or None).
PRINTED = {
    "mixtral-8x7b": (46.70, 12.88, None, None),
    "deepseek-v2-lite": (15.71, 2.66, 2.45, None),
    "deepseek-v2": (235.74, 21.38, None, None),
    "deepseek-v3": (671.03, 37.55, 36.63, 11.61),
    "jamba-v0.1": (51.57, 12.11, None, None),
}


@pytest.mark.parametrize("name", sorted(PRINTED))
def test_presets_have_the_parameter_counts_the_docs_print(name):
    total, active, without_embedding, mtp = PRINTED[name]
    model = _meta_model(name)
    counts = model.parameter_counts()
    assert round(counts["total"] / 1e9, 2) == total and round(counts["active"] / 1e9, 2) == active, counts
    if without_embedding is not None:
        assert round((counts["active"] - model.tok_emb.weight.numel()) / 1e9, 2) == without_embedding
    if mtp is not None:
        assert round(counts["mtp"] / 1e9, 2) == mtp
