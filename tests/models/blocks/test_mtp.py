"""Multi-token prediction (scratchlm/models/blocks/mtp.py): the sequential (DeepSeek-V3) modules give the
same logits as Hugging Face's ``MtpModel`` — teacher-forced and in its drafting loop; the training
loss is the plain cross-entropy plus λ times the mean of each depth's cross-entropy (checked against
a spelled-out depth), only in training; gradients reach the modules and the shared embedding and
head; parameters are counted once; generation ignores the modules; and the acceptance rate of the
2nd-token guess is counted right (an exact hand-made case, a teacher-forced recount) and is high
after training on a periodic sequence, low before."""

from __future__ import annotations

import dataclasses

import hf_models
import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ConfigError
from scratchlm.generate import generate
from scratchlm.generate.sampling import SamplingConfig
from scratchlm.models.block import Block
from scratchlm.models.blocks.mtp import MTPConfig, mtp_acceptance
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT


def _config(kind="sequential", depth=2, weight=0.3, **overrides) -> GPTConfig:
    base = {
        "vocab_size": 50,
        "n_layer": 2,
        "n_head": 4,
        "n_kv_head": 2,
        "d_model": 32,
        "d_ff": 64,
        "block_size": 32,
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "bias": False,
        "tie_embeddings": False,
        "dropout": 0.0,
        "mtp": MTPConfig(depth=depth, weight=weight, kind=kind),
    }
    return GPTConfig(**{**base, **overrides})


def _model(seed=0, **kwargs) -> GPT:
    torch.manual_seed(seed)
    return GPT(_config(**kwargs))


def test_config_is_checked_and_round_trips():
    with pytest.raises(ConfigError, match=r"model\.mtp\.depth"):
        MTPConfig(depth=0)
    with pytest.raises(ConfigError, match=r"model\.mtp\.weight"):
        MTPConfig(weight=-0.1)
    with pytest.raises(ConfigError, match=r"model\.mtp\.kind .*'sequential', 'parallel'"):
        MTPConfig(kind="tree")
    with pytest.raises(ConfigError, match=r"model\.mtp\.block = 'transformer'"):
        GPT(_config(mtp=MTPConfig(block="transformer")))
    c = _config(kind="parallel", depth=3, weight=0.5)
    assert c.to_dict()["mtp"] == {"depth": 3, "weight": 0.5, "kind": "parallel", "block": None}
    assert GPTConfig.from_dict(c.to_dict()) == c
    assert "mtp" not in _config(mtp=None).to_dict()  # configs without MTP read and write as before


def test_block_kind_defaults_to_the_last_layer():
    sliding = {"layers": ["attention", "sliding"], "attn": {"window": 4}}
    assert (
        _model(**sliding).mtp.depths[0].block.attn.window == 4
    )  # as HF's MtpModel copies the last layer's class
    assert _model(**sliding, mtp=MTPConfig(block="attention")).mtp.depths[0].block.attn.window is None


def _randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Large random weights, norm gains included (all 1 at init: a swapped norm would hide)."""
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.3 * noise if p.dim() == 1 else 0.2 * noise)


def test_sequential_modules_match_hugging_face_mtp_model(tmp_path):
    """HF's generic ``MtpModel`` (the class DeepSeek-V3, GLM-4-MoE and Mellum draft with) around a
    Llama main model: its layers are Llama decoder layers, i.e. our attention + SwiGLU Block."""
    pytest.importorskip("transformers")
    from transformers.modeling_layers import MtpModel

    from scratchlm.models.hf import import_hf

    D, V, T = 2, 97, 12
    hf = hf_models.llama(
        vocab_size=V,
        max_position_embeddings=32,
        initializer_range=0.4,
        num_mtp_layers=D,
        attn_implementation="eager",
    )
    hf_mtp = MtpModel(hf, D).float().eval()
    assert hf_mtp.shared_head is hf.lm_head and hf_mtp.embed_tokens is hf.model.embed_tokens
    _randomize_(hf_mtp.layers, torch.Generator().manual_seed(1))

    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    main = import_hf(tmp_path / "hf")
    ours = GPT(dataclasses.replace(main.config, mtp=MTPConfig(depth=D))).eval()
    state = dict(main.state_dict())
    for k, layer in enumerate(hf_mtp.layers):
        t, o = {n: p.detach() for n, p in layer.named_parameters()}, f"mtp.depths.{k}."
        state |= {
            o + "embed_norm.weight": t["enorm.weight"],
            o + "hidden_norm.weight": t["hnorm.weight"],
            o + "proj.weight": t["eh_proj.weight"],
            o + "norm.weight": t["post_norm.weight"],
            o + "block.norm1.weight": t["mtp_block.input_layernorm.weight"],
            o + "block.norm2.weight": t["mtp_block.post_attention_layernorm.weight"],
            o + "block.attn.qkv.weight": torch.cat(
                [t[f"mtp_block.self_attn.{p}_proj.weight"] for p in "qkv"]
            ),
            o + "block.attn.proj.weight": t["mtp_block.self_attn.o_proj.weight"],
        }
        state |= {
            o + f"block.mlp.{p}.weight": t[f"mtp_block.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")
        }
    ours.load_state_dict(state)

    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(T)[None].expand(2, T)
    with torch.no_grad():
        hidden_hf = hf(ids, output_hidden_states=True).hidden_states[-1]  # the normed last_hidden_state
        main_logits, _, hidden = ours(ids, return_hidden=True)
        torch.testing.assert_close(main_logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
        # Teacher-forced (training): depth k reads depth k-1's states and the tokens k places ahead.
        expected, h = [], hidden_hf
        for k in range(1, D + 1):
            h = hf_mtp.forward_layer(k - 1, h[:, : T - k], positions[:, k:], None, input_ids=ids[:, k:])
            expected.append(hf_mtp._project_to_logits(h))
        got = ours.mtp(ours, hidden, ids)
        assert [g.shape for g in got] == [(2, T - 1, V), (2, T - 2, V)]
        for g, e in zip(got, expected):
            assert e.abs().max() > 1.0  # large weights: nothing hides behind tiny logits
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
        # Drafting: HF's loop feeds each depth its own guess as the next depth's last token.
        next_ids = main_logits[:, -1].argmax(-1)
        hf_ids, hf_logits, _ = hf_mtp(
            torch.cat([ids[:, 1:], next_ids[:, None]], 1), hidden_hf, None, positions + 1, None
        )
        our_ids, our_logits = ours.mtp.draft(ours, hidden, ids, next_ids)
        same_input = ours.mtp.draft(ours, hidden_hf, ids, next_ids)[1]  # the modules alone, on HF's h^0
    assert torch.equal(our_ids, hf_ids)
    torch.testing.assert_close(our_logits, hf_logits, atol=1e-4, rtol=1e-4)  # measured 3e-5 (logits up to 13)
    torch.testing.assert_close(same_input, hf_logits, atol=1e-5, rtol=1e-5)


def test_training_loss_adds_weighted_mtp_cross_entropy_and_eval_reports_plain():
    model = _model(depth=1, weight=0.3)
    ids = torch.randint(0, 50, (3, 16))
    targets = torch.randint(0, 50, (3, 16))
    targets[0, 5] = targets[2, -4:] = -1  # ignored, as in the main loss
    model.train()
    logits, loss = model(ids, targets)
    metrics = model.mtp.metrics()
    assert model.mtp.aux_loss is None and model.auxiliary_loss() == 0.0  # taken by the forward: counted once
    # Depth 1 spelled out (eq. 21-24): [norm(Emb(t_{i+1})) ; norm(h_i)] -> M -> block -> norm -> head,
    # scored against t_{i+2} = targets[:, i+1] where it exists.
    d = model.mtp.depths[0]
    _, _, hidden = model(ids, return_hidden=True)
    x = d.proj(torch.cat([d.embed_norm(model.tok_emb(ids[:, 1:])), d.hidden_norm(hidden[:, :-1])], -1))
    rope = (model.rope_cos[1:16], model.rope_sin[1:16])
    mtp_logits = model.lm_head(d.norm(d.block(x, rope=rope)))
    mtp_ce = F.cross_entropy(mtp_logits.reshape(-1, 50), targets[:, 1:].reshape(-1), ignore_index=-1)
    plain = F.cross_entropy(logits.reshape(-1, 50), targets.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(loss, plain + 0.3 * mtp_ce)
    torch.testing.assert_close(metrics["mtp/loss"], mtp_ce.detach())

    model.eval()
    _, eval_loss = model(ids, targets)
    assert torch.equal(eval_loss, plain) and model.mtp.aux_loss is None

    zero = _model(depth=2, weight=0.0).train()
    _, zero_loss = zero(ids, targets)
    assert torch.equal(zero_loss, zero.eval()(ids, targets)[1])  # λ = 0: exactly the plain loss


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_gradients_reach_the_modules_and_the_shared_matrices(kind):
    model = _model(kind=kind, depth=2).train()
    ids = torch.randint(0, 50, (2, 12))
    _, _, hidden = model(ids, return_hidden=True)
    model.mtp.loss(model, hidden, ids, torch.roll(ids, -1, 1), None).backward()  # the MTP term alone
    for name, p in model.mtp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.lm_head.weight.grad.abs().sum() > 0  # the shared output head
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # and the trunk, through h^0
    if kind == "sequential":  # the shared embedding also reads the tokens k places ahead
        rows = model.tok_emb.weight.grad.abs().sum(-1) > 0
        assert rows[ids[:, 1:].unique()].all()


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_parameters_are_counted_once(kind):
    model = _model(kind=kind, depth=2)
    counts = model.parameter_counts()
    C = 32
    block = sum(p.numel() for p in Block(dataclasses.replace(model.config, mtp=None), 0).parameters())
    per_depth = (
        block + C + (2 * C + 2 * C * C if kind == "sequential" else 0)
    )  # + final norm (+ 2 norms and M)
    assert counts["mtp"] == 2 * per_depth
    assert counts["total"] + counts["mtp"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == GPT(dataclasses.replace(model.config, mtp=None)).parameter_counts()["total"]
    assert not [
        n for n, _ in model.named_parameters() if n.startswith("mtp.") and ("tok_emb" in n or "lm_head" in n)
    ]


def test_packed_rows_are_refused_in_training():
    model = _model().train()
    ids = torch.randint(0, 50, (1, 8))
    with pytest.raises(ValueError, match="does not take packed rows"):
        model(ids, ids, documents=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))


def test_generation_ignores_the_modules():
    model = _model(depth=2).eval()
    plain = GPT(dataclasses.replace(model.config, mtp=None)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")})
    prompt = [[3, 1, 4, 1, 5]]
    greedy = SamplingConfig(temperature=0)
    tokens = generate(model, prompt, 10, greedy, use_cache=True)
    assert tokens == generate(plain, prompt, 10, greedy, use_cache=True)
    assert mtp_acceptance(model, prompt, 10)["tokens"] == tokens  # the same greedy decoding


PERIOD = [0, 7, 3, 0, 12, 9, 5]  # token 0 twice; every other token once: deterministic given 2 tokens


def _periodic_batch(batch: int, T: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    stream = torch.tensor(PERIOD * (T // len(PERIOD) + 3))
    starts = torch.randint(0, len(PERIOD), (batch,), generator=generator)
    rows = torch.stack([stream[s : s + T + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def _train(model: GPT, steps: int) -> GPT:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        x, y = _periodic_batch(8, 16, generator)
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


PROMPTS = [[0, 7, 3], [12, 9, 5, 0], [3, 0, 12]]


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_acceptance_is_high_after_training_on_a_periodic_sequence(kind):
    untrained = mtp_acceptance(_model(kind=kind, depth=2, seed=1), PROMPTS, 12)
    trained = mtp_acceptance(_train(_model(kind=kind, depth=2, seed=1), 150), PROMPTS, 12)
    assert trained["guesses"] == 3 * 11  # 12 new tokens: the last guess is never checked
    assert trained["acceptance_rate"] == 1.0 and trained["per_depth"][1]["acceptance_rate"] == 1.0
    assert trained["tokens_per_step"] == 3.0
    assert untrained["acceptance_rate"] < 0.25


def test_acceptance_counts_are_exact():
    model = _train(_model(depth=2, seed=1), 150)
    result = mtp_acceptance(model, PROMPTS, 12)
    # Recount teacher-forced over each final sequence: the depth-1 guess made after token n is the
    # depth-1 logits at position n-1; depth 2's chained guess equals the teacher-forced one whenever
    # depth 1 was right (then its input token is the true one).
    with torch.no_grad():
        recount = [0, 0]
        for prompt, new in zip(PROMPTS, result["tokens"]):
            seq = torch.tensor([prompt + new])
            _, _, hidden = model(seq, return_hidden=True)
            depth1, depth2 = (logits[0].argmax(-1) for logits in model.mtp(model, hidden, seq))
            for n in range(len(prompt), seq.shape[1] - 1):
                first = int(depth1[n - 1]) == int(seq[0, n + 1])
                recount[0] += first
                recount[1] += first and n + 2 < seq.shape[1] and int(depth2[n - 1]) == int(seq[0, n + 2])
    assert [d["accepted"] for d in result["per_depth"]] == recount
    # A hand-made case: M_k = 0 makes a depth's input, block output and logits all 0, so its guess
    # is always token 0 (argmax takes the first of equal values): the rate is the share of 0s.
    with torch.no_grad():
        model.mtp.depths[0].proj.weight.zero_()
    zeros = mtp_acceptance(model, PROMPTS, 12)
    checked = [
        tok for new in zeros["tokens"] for tok in new[1:]
    ]  # the tokens a depth-1 guess was checked against
    assert zeros["guesses"] == len(checked) and zeros["accepted"] == checked.count(0)
    assert zeros["acceptance_rate"] == pytest.approx(2 / 7, abs=0.05)  # PERIOD has two 0s in 7


def test_the_trainer_adds_the_mtp_term_and_evaluates_plain(char_shards, tmp_path):
    """Frozen weights (lr 0), the same initialisation with λ = 0.3 and λ = 0: the logged training
    losses differ by λ · L_MTP (about 0.3 · ln 65 at initialisation), the validation losses not at all."""
    import json

    from scratchlm.models.checkpoint import load_model_from_checkpoint
    from scratchlm.train import train

    def run(weight: float) -> tuple[list[float], list[float]]:
        model = {
            "n_layer": 1,
            "n_head": 2,
            "d_model": 32,
            "block_size": 16,
            "position": "rope",
            "norm": "rmsnorm",
            "mlp": "relu2",
            "bias": False,
            "mtp": {"depth": 2, "weight": weight},
        }
        out = tmp_path / f"run{weight}"
        train(
            {
                "model": model,
                "train": {
                    "data": str(char_shards),
                    "out_dir": str(out),
                    "batch_size": 4,
                    "max_steps": 4,
                    "eval_interval": 4,
                    "eval_windows": 4,
                    "warmup_steps": 1,
                    "sample_tokens": 0,
                    "lr": 0.0,
                    "min_lr": 0.0,
                    "log_interval": 1,
                },
            },
            progress=False,
        )
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        loaded, _ = load_model_from_checkpoint(out / "last")
        assert loaded.config.mtp == MTPConfig(depth=2, weight=weight) and loaded.mtp is not None
        return [r["loss"] for r in records if "loss" in r], [
            r["val_loss"] for r in records if "val_loss" in r
        ]

    (with_mtp, val), (plain, plain_val) = run(0.3), run(0.0)
    assert val == plain_val
    assert all(0.8 < a - b < 1.6 for a, b in zip(with_mtp, plain, strict=True))
