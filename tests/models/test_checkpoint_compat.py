"""Checkpoints written before the package was reorganised still load and give the same outputs.

``tests/fixtures/checkpoints`` holds three tiny checkpoints (a plain RoPE/RMSNorm/ReLU² model; a
sliding+MoE / MLA model with their settings tables; a Gemma-style model with every attention switch)
written by commit 8a83907's code, with the logits and greedy continuation that code computed. The
files are read as a user's old checkpoint would be: through the public loader, nothing rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_old_checkpoint_loads_and_computes_what_it_computed(name):
    from scratchlm.generate import generate
    from scratchlm.generate.sampling import SamplingConfig
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint

    model, state = load_model_from_checkpoint(FIXTURES / name)
    model.eval()
    tokenizer = load_checkpoint_tokenizer(FIXTURES / name, state)
    expected = EXPECTED[name]
    assert tokenizer.encode("Speak") == expected["prompt"]
    with torch.no_grad():
        logits, _ = model(torch.tensor([expected["prompt"]]))
    torch.testing.assert_close(logits[0, -1], torch.tensor(expected["last_logits"]), rtol=0, atol=1e-5)
    assert generate(model, [expected["prompt"]], 16, SamplingConfig(temperature=0))[0] == expected["greedy"]
    torch.manual_seed(1337)
    sampled = generate(model, [expected["prompt"]], 16, SamplingConfig(temperature=1.0, top_k=20))[0]
    assert sampled == expected["sampled_seed_1337_top_k_20"]
