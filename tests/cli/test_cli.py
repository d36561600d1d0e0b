"""The command line: a short end-to-end run of the foundation pipeline, with --json output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scratchlm.cli import main


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "scratchlm", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("data", "tokenizer", "bigram"):
        assert command in out


def test_pipeline_end_to_end(tmp_path, capsys):
    ds = tmp_path / "names"
    prepared = run_json(capsys, "data", "prepare", "names", "--out", str(ds))
    assert prepared["written"] and prepared["splits"]["train"]["documents"] > 28_000
    assert not run_json(capsys, "data", "prepare", "names", "--out", str(ds))["written"]
    tok = tmp_path / "char.json"
    trained = run_json(
        capsys,
        "tokenizer",
        "train",
        "--dataset",
        str(ds),
        "--kind",
        "char",
        "--special",
        "<|endoftext|>",
        "--out",
        str(tok),
    )
    assert trained["vocab_size"] == 27  # 26 letters + <|endoftext|>
    shards = run_json(
        capsys, "data", "tokenize", "--dataset", str(ds), "--tokenizer", str(tok), "--workers", "2"
    )
    assert shards["splits"]["train"]["tokens"] > 0
    report = run_json(
        capsys,
        "bigram",
        "--dataset",
        str(ds),
        "--tokenizer",
        str(tok),
        "--model",
        "count",
        "--smoothing",
        "0",
        "--fit-split",
        "all",
        "--num-samples",
        "3",
    )
    assert report["models"]["count"]["nll"]["all"] == pytest.approx(2.4540, abs=1e-3)
    assert len(report["models"]["count"]["samples"]) == 3
    encoded = run_json(capsys, "tokenizer", "encode", "--tokenizer", "gpt2", "--text", "Hello, I am")
    assert encoded["ids"] == [15496, 11, 314, 716]
    assert main(["tokenizer", "decode", "--tokenizer", "gpt2", "15496", "11", "314", "716"]) == 0
    assert capsys.readouterr().out == "Hello, I am\n"


def test_compare_writes_a_plot(tmp_path, capsys):
    ds = tmp_path / "shakespeare"
    run_json(capsys, "data", "prepare", "shakespeare", "--out", str(ds))
    plot = tmp_path / "compare.png"
    result = run_json(
        capsys, "tokenizer", "compare", "--dataset", str(ds), "--vocab-sizes", "300,600", "--plot", str(plot)
    )
    rows = {r["tokenizer"]: r for r in result["rows"]}
    assert set(rows) == {"char", "byte", "bpe-300", "bpe-600"}
    assert rows["byte"]["bytes_per_token"] == pytest.approx(1.0)
    assert rows["bpe-600"]["bytes_per_token"] > rows["bpe-300"]["bytes_per_token"] > 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path / "missing.txt")]) == 2
    assert "neither a named source" in capsys.readouterr().err
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "nope.json"), "--text", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_model_info_reports_kv_memory_and_arithmetic_intensity(capsys):
    """GPT-2 small, 8 sequences of 1,024 positions: 36,864 bytes per token of bf16 KV cache."""
    from scratchlm.cli import main

    assert (
        main(["model", "info", "--preset", "gpt2", "--batch-size", "8", "--context", "1024", "--json"]) == 0
    )
    costs = json.loads(capsys.readouterr().out)["inference_bf16"]
    assert costs["kv_cache_bytes"] == 8 * 1024 * 36_864
    # Prefill does thousands of FLOPs per byte (compute-bound); a decode step about one per sequence
    # per parameter byte pair (memory-bound): 2 FLOPs per weight per sequence over 2 bytes per weight.
    assert costs["prefill"]["intensity"] > 1000
    assert 2 < costs["decode_step"]["intensity"] < 8
    assert main(["model", "info", "--preset", "gpt2", "--batch-size", "0"]) == 2
