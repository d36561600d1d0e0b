"""Bad input to ``model import`` / ``model export``: the real command exits 2 with one line
``scratchlm: error: ...`` that names what is wrong and what to do, writes nothing, and shows no
traceback. One case per row: a config of 2 layers with weights for 4; a truncated safetensors file;
with --tokenizer-required, a tokenizer.json of a kind scratchlm cannot read; the export of a model no
format holds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _llama_folder(folder, layers: int = 2):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def layer_count_mismatch(tmp_path):
    folder = _llama_folder(tmp_path / "hf", layers=4)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    return ["model", "import", "--hf", str(folder), "--out", str(tmp_path / "out")], [
        "config.json's 2 layers have no place for: model.layers.2.",
        "the config and the weights must come from the same model",
    ]


def truncated_safetensors(tmp_path):
    folder = _llama_folder(tmp_path / "hf")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    return ["model", "import", "--hf", str(folder), "--out", str(tmp_path / "out")], [
        f"{path} is truncated or corrupt",
        "download or copy it again",
    ]


def unreadable_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    folder = _llama_folder(tmp_path / "hf")
    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    # Without --tokenizer-required the weights import with a warning (test_hf_export_import.py).
    argv = ["model", "import", "--hf", str(folder), "--out", str(tmp_path / "out"), "--tokenizer-required"]
    return argv, [
        f"{folder / 'tokenizer.json'} cannot be read exactly: a WordPiece tokenizer (model.type) cannot be read",
        "import without --tokenizer-required to keep the weights alone, then pass --tokenizer to "
        "sample/generate (a scratchlm tokenizer JSON or gpt2)",
    ]


def export_no_format_holds(tmp_path):
    from scratchlm.models.checkpoint import save_model_only
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    config = GPTConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, block_size=8, position="alibi")
    save_model_only(tmp_path / "ckpt", GPT(config))
    return ["model", "export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")], [
        "gpt2 export cannot hold this model: model.position = 'alibi' (gpt2 needs 'learned')",
        "Fix: no Hugging Face format holds it: set what the format needs",
    ]


ROWS = [layer_count_mismatch, truncated_safetensors, unreadable_tokenizer, export_no_format_holds]


@pytest.mark.parametrize("row", ROWS, ids=[row.__name__.replace("_", "-") for row in ROWS])
def test_bad_input_is_refused_with_one_clear_line(tmp_path, row):
    argv, expected = row(tmp_path)
    done = subprocess.run([sys.executable, "-m", "scratchlm", *argv], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error: "), done.stderr
    for part in expected:
        assert part in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written
