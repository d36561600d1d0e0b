"""Beam search against Hugging Face ``generate(num_beams=...)`` on the same weights.

A randomly initialised ``LlamaForCausalLM`` (no download) is imported; both searches keep the
``2 · beams`` best candidates of every live beam and score a hypothesis by its summed
log-probability over ``length ** length_penalty``. Without an end token every hypothesis runs to
``max_new_tokens``, so the two must return the same beams in the same order with the same scores.
With one, the rules for finished hypotheses must agree too: an end token counts only among the
``beams`` best candidates, the ``beams`` best finished are kept, and the search stops once the
worst of them beats the best live beam (Hugging Face's ``early_stopping=False``).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scratchlm.generate import beam_search  # noqa: E402
from scratchlm.models.hf import import_hf  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    return hf, import_hf(folder).eval()


def compare(hf, ours, beams: int, length_penalty: float, eos: int | None) -> int:
    """Both searches from the same prompt: same beams, same order, scores within 1e-4. Returns how
    many of Hugging Face's beams ended with ``eos`` (ours leave the end token out of the ids)."""
    prompt, new = [5, 17, 3, 42], 10
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            num_beams=beams,
            num_return_sequences=beams,
            do_sample=False,
            max_new_tokens=new,
            length_penalty=length_penalty,
            early_stopping=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0 if eos is None else eos,
            eos_token_id=eos,
        )
    theirs = [row[len(prompt) :].tolist() for row in out.sequences]
    ended = sum(eos in row for row in theirs)
    theirs = [row[: row.index(eos)] if eos in row else row for row in theirs]
    mine = beam_search(ours, prompt, new, beam_width=beams, length_penalty=length_penalty, eos_id=eos)
    assert [ids for ids, _ in mine] == theirs, eos
    torch.testing.assert_close(
        torch.tensor([score for _, score in mine]), out.sequences_scores.float(), rtol=0, atol=1e-4
    )
    return ended


@pytest.mark.parametrize("beams,length_penalty", [(2, 1.0), (4, 1.0), (4, 0.5), (3, 2.0)])
def test_beam_search_equals_hugging_face(models, beams, length_penalty):
    compare(*models, beams, length_penalty, eos=None)


# End tokens that this model reaches within 10 steps from the prompt, early or late.
END_TOKENS = (4, 8, 15, 18, 19, 25, 28, 37, 39, 45, 51, 57, 58)


@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("beams", [2, 4])
def test_beam_search_with_an_end_token_equals_hugging_face(models, beams, length_penalty):
    ended = sum(compare(*models, beams, length_penalty, eos) for eos in END_TOKENS)
    assert ended >= 3  # end tokens did end returned hypotheses (4-8 per case): the rules were exercised
