"""Commands no other test runs, through ``scratchlm.cli.main`` with ``--json``: ``model shapes``
(the shapes a hand count gives for a tiny GQA, SwiGLU model), ``model import`` (a random
``transformers`` Llama folder becomes a checkpoint with the same logits and the config in its
state.json) and ``data sources`` (every named source, with the address and sha256 of
``scratchlm.downloads.SOURCES``)."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.cli import main


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_model_shapes_of_a_tiny_gqa_model_are_the_hand_counted_ones(tmp_path, capsys):
    # C = 36, H = 6, Hkv = 2: D = 36 / 6 = 6, the fused qkv is (H + 2 Hkv) D = 60 wide (not 3C = 108);
    # SwiGLU with no d_ff: F = 8C/3 = 96 rounded up to a multiple of 64 = 128. B = 3, T = 5, V = 101.
    B, T, C, H, Hkv, D, F, V = 3, 5, 36, 6, 2, 6, 128, 101
    config = tmp_path / "tiny.toml"
    config.write_text(
        f"[model]\nvocab_size = {V}\nblock_size = 16\nn_layer = 2\nd_model = {C}\nn_head = {H}\n"
        f'n_kv_head = {Hkv}\nposition = "rope"\nnorm = "rmsnorm"\nmlp = "swiglu"\nbias = false\n'
    )
    report = run_json(
        capsys, "model", "shapes", "--config", str(config), "--batch-size", str(B), "--context", str(T)
    )
    assert report["batch"] == B
    assert {k: report["config"][k] for k in ("vocab_size", "d_model", "n_head", "n_kv_head", "n_layer")} == {
        "vocab_size": V,
        "d_model": C,
        "n_head": H,
        "n_kv_head": Hkv,
        "n_layer": 2,
    }
    rows = {r["module"]: r for r in report["rows"]}
    expected = {  # module: (input, output, parameter shapes)
        "tok_emb": ([B, T], [B, T, C], {"weight": [V, C]}),
        "blocks.0.norm1": ([B, T, C], [B, T, C], {"weight": [C]}),
        "blocks.0.attn.qkv": ([B, T, C], [B, T, (H + 2 * Hkv) * D], {"weight": [(H + 2 * Hkv) * D, C]}),
        "blocks.0.attn: q": (None, [B, H, T, D], {}),
        "blocks.0.attn: k, v": (None, [B, Hkv, T, D], {}),
        "blocks.0.attn: scores q·kᵀ/√D": (None, [B, H, T, T], {}),
        "blocks.0.attn: softmax(scores)·v": (None, [B, H, T, D], {}),
        "blocks.0.attn: heads joined": (None, [B, T, H * D], {}),
        "blocks.0.attn.proj": ([B, T, H * D], [B, T, C], {"weight": [C, H * D]}),
        "blocks.0.attn": ([B, T, C], [B, T, C], {}),
        "blocks.0.mlp.up": ([B, T, C], [B, T, F], {"weight": [F, C]}),
        "blocks.0.mlp.gate": ([B, T, C], [B, T, F], {"weight": [F, C]}),
        "blocks.0.mlp.down": ([B, T, F], [B, T, C], {"weight": [C, F]}),
        "blocks.0": ([B, T, C], [B, T, C], {}),
        "norm_f": ([B, T, C], [B, T, C], {"weight": [C]}),
        "lm_head": ([B, T, C], [B, T, V], {"weight": [V, C]}),  # the logits: (B, T, V)
    }
    for module, (inp, out, params) in expected.items():
        assert (rows[module]["input"], rows[module]["output"], rows[module]["parameters"]) == (
            inp,
            out,
            params,
        ), module
    assert not any(m.startswith("blocks.1") for m in rows)  # one block listed: the others repeat it
    assert report["rows"][-1]["module"] == "lm_head"  # the trace ends at the logits


def test_model_import_gives_the_hf_models_logits_and_records_its_config(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from scratchlm.models.checkpoint import load_model_from_checkpoint

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=103,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=40,
            initializer_range=0.5,
            rms_norm_eps=1e-6,
            rope_theta=1e4,
            tie_word_embeddings=False,
        )
    ).eval()
    with torch.no_grad():  # norm gains start at 1 in transformers, where a swapped tensor would hide
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)

    out = tmp_path / "ckpt"
    report = run_json(capsys, "model", "import", "--hf", str(tmp_path / "hf"), "--out", str(out))
    assert report["out"] == str(out)
    assert report["parameters"]["total"] == sum(p.numel() for p in hf.parameters())
    config = report["config"]
    assert {
        k: config[k]
        for k in ("vocab_size", "d_model", "d_ff", "n_layer", "n_head", "n_kv_head", "block_size")
    } == {
        "vocab_size": 103,
        "d_model": 64,
        "d_ff": 96,
        "n_layer": 2,
        "n_head": 8,
        "n_kv_head": 2,
        "block_size": 40,
    }
    assert (config["position"], config["norm"], config["mlp"], config["tie_embeddings"]) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
    )
    assert config["rope_theta"] == 1e4 and config["norm_eps"] == 1e-6

    state = json.loads((out / "state.json").read_text())
    assert state["model"] == config  # the checkpoint records the config the command reported
    assert state["source"] == str(tmp_path / "hf") and state["vocab_size"] == 103

    ours, _ = load_model_from_checkpoint(out)
    x = torch.randint(0, 103, (2, 24))
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)[0]
    assert expected.abs().max() > 1.0  # large weights: a wrong norm, rotation or head mapping cannot hide
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_data_sources_lists_every_named_source_with_its_checksum(capsys):
    from scratchlm.downloads import SOURCES

    listed = run_json(capsys, "data", "sources")
    assert list(listed) == list(SOURCES) and {"shakespeare", "names", "gpt2-encoder", "gpt2-vocab"} <= set(
        listed
    )
    for name, source in SOURCES.items():
        assert listed[name] == {
            "file": source.filename,
            "url": source.url,
            "sha256": source.sha256,
            "description": source.description,
        }, name
        assert len(listed[name]["sha256"]) == 64 and int(listed[name]["sha256"], 16) >= 0
    # Two checksums pinned here too: a change to the recorded bytes is a decision, not an accident.
    assert (
        listed["shakespeare"]["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    )
    assert listed["names"]["sha256"] == "0a30b5557f192f32ab962680889aac5f6fda0f4cecf40a6d0b5694f58ea8cc4d"

    assert main(["data", "sources"]) == 0  # the text listing names the same sources and checksums
    text = capsys.readouterr().out
    assert all(name in text and source.sha256 in text for name, source in SOURCES.items())
