"""An empty prompt in the engine starts where ``scratchlm sample`` starts one (``start_ids``), and a
batch file's trailing blank lines are not requests."""

from __future__ import annotations

import pytest
import torch

from scratchlm.generate import SamplingConfig, generate_text
from scratchlm.generate.generate import start_ids
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.serve import LLM, SamplingParams
from scratchlm.serve.batch import read_requests
from scratchlm.tokenizers import CharTokenizer


@pytest.mark.parametrize("special", [(), ("<|endoftext|>",)])
def test_an_empty_prompt_generates_what_sample_generates(special):
    tokenizer = CharTokenizer.train(["To be, or not to be:\nthat is the question.\n"], special)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=32, block_size=64))
    expected = generate_text(model, tokenizer, "", 12, SamplingConfig(temperature=0))
    llm = LLM(model, tokenizer)
    for empty in ("", []):
        [out] = llm.generate([empty], SamplingParams(max_tokens=12, temperature=0))
        assert out.prompt_token_ids == start_ids(tokenizer)
        assert out.outputs[0].text == expected


def test_an_empty_prompt_without_a_start_is_refused_naming_the_tokenizer():
    tokenizer = CharTokenizer.train(["abc"])
    model = GPT(GPTConfig(vocab_size=3, n_layer=1, n_head=2, d_model=32, block_size=16))
    with pytest.raises(ValueError, match=r"\(char, 3 ids\) has neither: give a prompt"):
        LLM(model, tokenizer).engine.add_request("", SamplingParams(max_tokens=2))


def test_trailing_blank_lines_are_not_requests_and_a_blank_line_before_one_is(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": ""}\n \n\r\n\t\n')
    requests = read_requests(path)
    assert [r["line"] for r in requests] == [1, 2, 3]
    assert "error" not in requests[0] and requests[1]["error"].startswith("line 2: blank line")
    assert requests[2]["prompt"] == ""
    path.write_text("\n\n")
    assert read_requests(path) == []
