"""The layer pattern (issue 9, "Design first"): a model is a stack whose layers each pick a mixer and
an MLP; each block kind reads its own settings table. These tests prove the pattern expands and
validates as documented, that a block kind's table is built and checked like any config (a typo
fails naming the key), that presets' tables merge key by key with overrides, and that configs
written before the pattern existed read and write unchanged."""

from __future__ import annotations

import pytest

from scratchlm.config import ConfigError, apply_overrides, load_config
from scratchlm.models.gpt import GPTConfig, config_from_section
from scratchlm.models.moe import MoEConfig


def test_the_pattern_repeats_to_every_layer():
    c = GPTConfig(n_layer=4, layers=["sliding", "attention+moe"], sliding_window=8)
    assert c.layer_kinds() == [("sliding", "dense"), ("attention", "moe")] * 2
    assert GPTConfig(n_layer=3).layer_kinds() == [("attention", "dense")] * 3
    explicit = ["attention"] * 1 + ["attention+moe"] * 2
    assert GPTConfig(n_layer=3, layers=explicit).layer_kinds()[0] == ("attention", "dense")


@pytest.mark.parametrize("layers,message", [
    (["attention"] * 3, "must divide model.n_layer = 4"),
    (["attn"], "item 'attn': expected 'mixer' or 'mixer\\+mlp'"),
    (["attention+mixture"], "item 'attention\\+mixture'"),
    ([], "must be non-empty"),
])
def test_a_bad_pattern_is_refused_naming_what_is_allowed(layers, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(n_layer=4, layers=layers)


def test_sliding_layers_need_a_window():
    with pytest.raises(ConfigError, match="set model.sliding_window"):
        GPTConfig(n_layer=2, layers=["sliding"])


def test_a_kind_used_without_its_table_gets_the_defaults_and_unused_tables_stay_unset():
    c = GPTConfig(n_layer=2, layers=["attention+moe"])
    assert isinstance(c.moe, MoEConfig) and c.moe == MoEConfig()
    assert c.mla is None and "mla" not in c.to_dict()


def test_a_block_table_is_checked_like_any_config(tmp_path):
    path = tmp_path / "moe.toml"
    path.write_text('[model]\nn_layer = 2\nlayers = ["attention+moe"]\n[model.moe]\nn_experts = 4\ntop_k = 2\n')
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
    assert not {"layers", "sliding_window", "moe", "mla", "diff", "nsa", "mamba", "mtp"} & set(plain)
    assert GPTConfig.from_dict(plain) == GPTConfig()
