"""Mixture-of-Experts: the fast dropless dispatch equals the readable every-expert reference
(outputs and gradients, 1e-5) and its backward builds each expert stack's gradient once (not once
per expert); routing (softmax / sigmoid, bias for selection only, group limits) equals
transformers' Mixtral / DeepSeek-V2 / DeepSeek-V3 routers and a hand-worked case, and stays float32
under bfloat16 autocast and after ``model.to(bfloat16)`` (the bias too); the auxiliary
load-balancing loss equals a hand computation and transformers' ``load_balancing_loss_func``, whose
coefficient the importers convert (α = coef·k/L) and the exporters convert back; DeepSeek-V3's
loss-free bias balances a collapsed router, reads no value back to the host, and counts each DDP
rank's own tokens (2 gloo ranks); MTP's MoE reports under its own layer number; a top-1 router that
could get no gradient is refused; and Mixtral, Qwen2-MoE and Qwen3-MoE models built by
transformers give the same logits (1e-4) and greedy tokens after import, and load back in
transformers after export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import hf_models
import pytest
import torch
from processes import torchrun

from scratchlm.config import ConfigError
from scratchlm.models.blocks.moe import MoE, MoEConfig, expert_load
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT


def _config(**moe) -> GPTConfig:
    return GPTConfig(
        vocab_size=97,
        n_layer=2,
        n_head=4,
        d_model=32,
        block_size=32,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        d_ff=48,
        layers=["attention", "attention+moe"],
        moe=moe,
    )


def _moe(seed: int = 0, **moe) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(_config(**moe), layer=1)
    with torch.no_grad():  # large weights: a wrong weighting or a dropped token shows in the output
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


ROUTINGS = {
    "mixtral": dict(n_experts=4, top_k=2),
    "qwen2-shared-gate": dict(
        n_experts=6, top_k=3, normalize=False, n_shared=1, d_shared=40, shared_gate=True
    ),
    "deepseek-v3": dict(
        n_experts=8,
        top_k=3,
        router="sigmoid",
        n_groups=4,
        topk_groups=2,
        group_score="top2",
        routed_scale=2.5,
        n_shared=2,
        balance="bias",
        seq_aux_weight=0.01,
    ),
    "deepseek-v2": dict(
        n_experts=8, top_k=2, normalize=False, n_groups=4, topk_groups=2, routed_scale=1.5, n_shared=1
    ),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_fast_dispatch_equals_the_every_expert_reference(routing):
    layer = _moe(**ROUTINGS[routing])
    if layer.config.balance == "bias":
        layer.router_bias.copy_(torch.randn(layer.config.n_experts) * 0.3)
    layer.train()
    x = torch.randn(3, 11, 32)
    grads = []
    for reference in (False, True):
        layer.use_reference = reference
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + layer.aux_loss
        layer.zero_grad()
        loss.backward()
        grads.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    (y_fast, gx_fast, gp_fast), (y_ref, gx_ref, gp_ref) = grads
    assert y_fast.abs().max() > 1.0
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    gp_fast["input"], gp_ref["input"] = gx_fast, gx_ref
    for name in gp_fast:  # gradients reach ~1e2 here: within 1e-5 of the largest entry
        scale = gp_ref[name].abs().max()
        torch.testing.assert_close(gp_fast[name] / scale, gp_ref[name] / scale, atol=1e-5, rtol=0, msg=name)
    assert gp_fast["router.weight"].abs().max() > 0  # the router learns through the weights it gives


def test_routing_by_hand_bias_chooses_but_never_weighs():
    layer = _moe(n_experts=4, top_k=2, router="sigmoid", normalize=False, balance="bias")
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    with torch.no_grad():  # a router that reads the logits straight off the first 4 dimensions
        layer.router.weight.zero_()
        layer.router.weight[:, :4] = torch.eye(4)
    x = torch.zeros(1, 32)
    x[0, :4] = logits
    s = logits.sigmoid()[0]
    _, chosen, weights = layer.route(x)
    assert sorted(chosen[0].tolist()) == [0, 1]
    torch.testing.assert_close(weights[0].sort(descending=True).values, s[:2])
    layer.router_bias.copy_(torch.tensor([0.0, -1.0, 0.0, 1.0]))  # expert 3 favoured, 1 disfavoured
    _, chosen, weights = layer.route(x)
    order = chosen[0].argsort()
    assert chosen[0][order].tolist() == [0, 3]
    torch.testing.assert_close(weights[0][order], torch.stack([s[0], s[3]]))  # unbiased scores: 0.881, 0.269
    layer.config.normalize = True
    _, _, weights = layer.route(x)
    torch.testing.assert_close(weights[0][order], torch.stack([s[0], s[3]]) / (s[0] + s[3]))


def test_routers_equal_transformers_mixtral_deepseek_v2_and_v3():
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
        DeepseekV2TopkRouter,
    )
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3TopkRouter,
    )
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    x = torch.randn(40, 32)
    cases = [
        (
            MixtralTopKRouter(
                transformers.MixtralConfig(hidden_size=32, num_local_experts=6, num_experts_per_tok=2)
            ),
            dict(n_experts=6, top_k=2),
        ),
        (
            DeepseekV2TopkRouter(
                transformers.DeepseekV2Config(
                    hidden_size=32,
                    n_routed_experts=8,
                    num_experts_per_tok=2,
                    n_group=4,
                    topk_group=2,
                    topk_method="group_limited_greedy",
                    routed_scaling_factor=1.5,
                )
            ),
            dict(n_experts=8, top_k=2, normalize=False, n_groups=4, topk_groups=2, routed_scale=1.5),
        ),
        (
            DeepseekV3TopkRouter(
                transformers.DeepseekV3Config(
                    hidden_size=32,
                    n_routed_experts=8,
                    num_experts_per_tok=3,
                    n_group=4,
                    topk_group=2,
                    routed_scaling_factor=2.5,
                )
            ),
            dict(
                n_experts=8,
                top_k=3,
                router="sigmoid",
                n_groups=4,
                topk_groups=2,
                group_score="top2",
                routed_scale=2.5,
            ),
        ),
    ]
    for theirs, moe in cases:
        ours = _moe(**moe)
        with torch.no_grad():
            theirs.weight.copy_(ours.router.weight)
            if hasattr(theirs, "e_score_correction_bias"):  # random: the selection-only path is exercised
                ours.router_bias.copy_(torch.randn(8) * 0.2)
                theirs.e_score_correction_bias.copy_(ours.router_bias)
            _, their_weights, their_chosen = theirs(x)
            _, chosen, weights = ours.route(x)
        order, their_order = chosen.argsort(dim=-1), their_chosen.argsort(dim=-1)
        assert torch.equal(chosen.gather(1, order), their_chosen.gather(1, their_order)), type(
            theirs
        ).__name__
        torch.testing.assert_close(
            weights.gather(1, order), their_weights.gather(1, their_order), atol=1e-6, rtol=1e-6
        )


def test_aux_loss_by_hand_and_equal_to_transformers():
    layer = _moe(n_experts=4, top_k=2, aux_weight=0.1)
    layer.train()
    x = torch.randn(2, 5, 32)
    layer(x)
    with torch.no_grad():
        probs = layer.router(x.view(-1, 32)).softmax(-1)  # (10, 4)
    chosen = probs.topk(2, dim=-1).indices
    f = torch.stack([(chosen == i).sum() for i in range(4)]).float() / (10 * 2)  # share of the 20 assignments
    P = probs.mean(0)
    expected = 0.1 * 4 * (f * P).sum()
    torch.testing.assert_close(layer.aux_loss.detach(), expected)
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    theirs = load_balancing_loss_func((layer.router(x.view(-1, 32)).detach(),), 4, 2)
    torch.testing.assert_close(
        layer.aux_loss.detach(), 0.1 * theirs / 2
    )  # theirs counts f over tokens, not N·k
    layer.eval()
    layer(x)
    assert layer.aux_loss is None  # evaluation reports plain cross-entropy


def test_sequence_wise_balance_loss_by_hand():
    layer = _moe(n_experts=4, top_k=1, router="sigmoid", balance="none", seq_aux_weight=0.5)
    layer.train()
    x = torch.randn(3, 6, 32)
    layer(x)
    with torch.no_grad():
        s = layer.router(x.view(-1, 32)).sigmoid().view(3, 6, 4)
    total = 0.0
    for b in range(3):
        top = s[b].argmax(-1)
        f = torch.stack([(top == i).sum() for i in range(4)]).float() * 4 / (1 * 6)  # V3 eq. 18
        P = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)  # eq. 19–20
        total += (f * P).sum()
    torch.testing.assert_close(layer.aux_loss.detach(), 0.5 * total / 3)


def test_loss_free_bias_balances_a_collapsed_router_and_counts_every_micro_batch():
    torch.manual_seed(0)
    layer = MoE(
        _config(n_experts=4, top_k=1, router="sigmoid", normalize=False, balance="bias", bias_speed=0.02),
        layer=1,
    )
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.1)
        layer.router.weight[0] += 0.5  # inputs have a positive mean along every dimension: expert 0 wins
    layer.train()

    def batch():
        return torch.randn(4, 16, 32) * 0.5 + 0.2

    def imbalance() -> float:
        with torch.no_grad():
            layer.reset_load()
            layer.eval()
            for _ in range(5):
                layer(batch())
            layer.train()
            return expert_load(torch.nn.ModuleList([layer]), reset=True)[1]["imbalance"]

    before = imbalance()
    assert before > 3.0  # nearly everything on one of 4 experts
    for _ in range(60):
        with torch.no_grad():
            layer(batch())  # two micro-batches of one step: both counted
            layer(batch())
        assert int(layer._step_load.sum()) == 2 * 64
        metrics = layer.after_optimizer_step()
        assert int(layer._step_load.sum()) == 0 and "moe/layer1/imbalance" in metrics
    after = imbalance()
    assert after < 1.5 < before
    assert layer.router_bias[0] < 0 < layer.router_bias[1:].max()  # the favoured expert was pushed down

    weights_only = _moe(n_experts=4, top_k=2, balance="aux")  # the aux mode never moves the bias
    weights_only.train()
    weights_only(torch.randn(2, 8, 32))
    weights_only.after_optimizer_step()
    assert weights_only.router_bias.abs().max() == 0


def test_gpt_with_moe_layers_trains_with_aux_loss_and_reports_expert_load():
    torch.manual_seed(0)
    model = GPT(_config(n_experts=4, top_k=2, n_shared=1, seq_aux_weight=0.001))
    assert [type(b.mlp).__name__ for b in model.blocks] == ["MLP", "MoE"]
    x = torch.randint(0, 97, (2, 16))
    model.train()
    _, loss = model(x, x)
    model.eval()
    _, plain = model(x, x)
    aux = model.blocks[1].mlp.aux_loss
    assert aux is None
    model.train()
    _, loss = model(x, x)
    assert model.blocks[1].mlp.aux_loss is None  # taken by the forward that had targets: counted once
    model(x)  # without targets the caller takes it (SFT, DPO, RL build their loss from logits)
    torch.testing.assert_close(loss - plain, model.auxiliary_loss(), atol=1e-6, rtol=1e-5)
    loss.backward()
    assert model.blocks[1].mlp.experts_down.grad.abs().max() > 0
    metrics = model.after_optimizer_step()
    assert set(metrics) == {"moe/layer1/imbalance"}
    report = expert_load(model)
    assert (
        list(report) == [1] and report[1]["assignments"] == 4 * 2 * 16 * 2
    )  # four forwards, 32 tokens, k = 2
    assert abs(sum(report[1]["fraction"]) - 1) < 1e-6
    state = model.state_dict()
    assert "blocks.1.mlp.router_bias" in state and "blocks.1.mlp.load" not in state


@pytest.mark.parametrize(
    "moe,message",
    [
        (dict(n_experts=4, top_k=5), "top_k = 5 exceeds"),
        (dict(n_experts=6, n_groups=4), "must divide"),
        (dict(n_experts=8, top_k=4, n_groups=4, topk_groups=1), "cannot hold top_k"),
        (dict(shared_gate=True), "need shared experts"),
        (dict(router="softplus"), "model.moe.router = 'softplus': must be one of"),
        (dict(balance="loss"), "model.moe.balance"),
    ],
)
def test_config_refuses_impossible_routing(moe, message):
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**moe)


# --- Hugging Face parity ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,layers",
    [
        (lambda: hf_models.mixtral(), ["attention+moe"]),
        (lambda: hf_models.mixtral(window=6), ["sliding+moe"]),  # 24 positions, a window of 6: it matters
        (lambda: hf_models.qwen2_moe(False), ["attention+moe", "attention", "attention+moe"]),
        (lambda: hf_models.qwen2_moe(True), ["attention+moe", "attention", "attention+moe"]),
        (lambda: hf_models.qwen3_moe(), ["attention", "attention+moe"]),
    ],
    ids=["mixtral", "mixtral-sliding", "qwen2-moe", "qwen2-moe-norm-topk", "qwen3-moe"],
)
def test_hf_import_logits_greedy_decoding_and_export(tmp_path, make, layers):
    hf = make()
    ours, _, x, _ = hf_models.round_trip(hf, tmp_path)  # exported as the architecture export picks
    assert ours.config.layers == layers
    hf_models.assert_greedy_equal(hf, ours, x[:1, :6], 12)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    from scratchlm.models.hf import export_hf

    model = GPT(_config(n_experts=4, top_k=2, balance="bias"))
    model.blocks[1].mlp.router_bias[0] = 0.1
    with pytest.raises(ValueError, match="qwen2_moe export cannot hold this model: .*gated shared expert"):
        export_hf(model, tmp_path / "a", "qwen2_moe")
    with pytest.raises(
        ValueError,
        match=r"mixtral export cannot hold this model: .*\(mixtral needs every layer MoE\); .*zero router_bias",
    ):
        export_hf(model, tmp_path / "b", "mixtral")


# --- review fixes: cost, precision, coefficients, distributed counts ---------------------------------
def _backward_writes(layer: MoE, x: torch.Tensor) -> tuple[int, int]:
    """Run a forward, then count what its backward writes: (results shaped like a whole expert stack,
    values written in all). Views are not counted: they write nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    stacks = {tuple(layer.experts_gate.shape), tuple(layer.experts_down.shape)}

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.stacks, self.values = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        self.values += t.numel()
                        self.stacks += tuple(t.shape) in stacks
            return out

    y = layer(x)
    count = Count()
    with count:
        (y**2).sum().backward()
    return count.stacks, count.values


def test_fast_dispatch_backward_builds_each_stack_gradient_once():
    """Indexing a stack per expert (experts_gate[e]) made each expert's backward build a zero
    gradient of the whole (E, F, C) stack: 3·E of them, O(E²·F·C) values. Counted, not timed."""
    E, F_, C = 32, 4, 32
    layer = _moe(n_experts=E, top_k=2, d_expert=F_).train()
    x = torch.randn(2, 16, C)
    stacks, values = _backward_writes(layer, x)
    assert stacks == 3  # gate, up, down: each stack's gradient assembled once
    parameters = 3 * E * F_ * C
    assert values < 4 * parameters  # measured 3.1x here (the per-expert form: 51x, and growing with E)
    torch.testing.assert_close(
        layer.experts_gate.grad.abs().sum(dim=(1, 2)) > 0,  # experts no token chose
        torch.bincount(layer.route(x.view(-1, C))[1].view(-1), minlength=E) > 0,
    )


def test_routing_is_float32_under_bfloat16_autocast():
    layer = _moe(n_experts=8, top_k=2, router="sigmoid", balance="bias", seq_aux_weight=1e-4).train()
    x = torch.randn(2, 8, 32)
    expected_scores, expected_chosen, expected_weights = layer.route(x.view(-1, 32))
    seen = {}
    route = layer.route

    def spy(tokens):
        seen["route"] = route(tokens)
        return seen["route"]

    layer.route = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    scores, chosen, weights = seen["route"]
    assert scores.dtype == weights.dtype == layer.aux_loss.dtype == torch.float32
    torch.testing.assert_close(scores, expected_scores, atol=0, rtol=0)  # not one bfloat16 rounding
    assert torch.equal(chosen, expected_chosen)
    torch.testing.assert_close(weights, expected_weights, atol=0, rtol=0)


def test_the_bias_stays_float32_in_a_bfloat16_model_and_still_moves():
    torch.manual_seed(0)
    model = GPT(_config(n_experts=4, top_k=2, router="sigmoid", balance="bias", bias_speed=0.001))
    layer = model.blocks[1].mlp
    layer.router_bias.copy_(torch.tensor([1.0, 1.0 / 3, -1.0, 0.123456789]))
    before = layer.router_bias.clone()
    model.to(torch.bfloat16)
    assert model.blocks[1].mlp.router.weight.dtype == torch.bfloat16
    assert layer.router_bias.dtype == torch.float32 and torch.equal(
        layer.router_bias, before
    )  # no rounding on the way
    assert layer.load.dtype == layer._step_load.dtype == torch.long  # the counters went along as integers
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 16)))
    load = layer._step_load.float()
    layer.after_optimizer_step()
    step = 0.001 * torch.sign(load.mean() - load)
    assert step.abs().sum() > 0
    torch.testing.assert_close(layer.router_bias, before + step, atol=0, rtol=0)  # |b| = 1 moved by 0.001
    model.load_state_dict(model.state_dict())
    assert layer.router_bias.dtype == torch.float32

    with torch.device("meta"):  # shapes only, then real (uninitialised) memory: the counters start at zero
        empty = MoE(_config(n_experts=4, top_k=2), layer=1)
    empty.to_empty(device="cpu")
    assert empty.load.tolist() == [0] * 4 and empty._step_load.tolist() == [0] * 4


def test_after_optimizer_step_reads_nothing_back_to_the_host(monkeypatch):
    layer = _moe(n_experts=4, top_k=2, router="sigmoid", balance="bias").train()
    with torch.no_grad():
        layer(torch.randn(2, 8, 32))

    def refuse(*args, **kwargs):
        raise AssertionError("a device-to-host read in after_optimizer_step")

    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    metrics = layer.after_optimizer_step()
    quiet = layer.after_optimizer_step()  # no forward since: no metric, and the bias does not move
    monkeypatch.undo()
    assert set(metrics) == {"moe/layer1/imbalance"} and quiet == {}
    moved = layer.router_bias.clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 8, 32))  # evaluation counts for expert_load, not for the bias
    assert layer.after_optimizer_step() == {} and torch.equal(layer.router_bias, moved)


def test_the_mtp_blocks_moe_reports_under_its_own_layer_number():
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=97,
        n_layer=2,
        n_head=4,
        d_model=32,
        block_size=32,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        d_ff=48,
        layers=["attention+moe"],
        moe={"n_experts": 4, "top_k": 2, "balance": "bias"},
        mtp={"depth": 1},
    )
    model = GPT(config).train()
    assert [m.layer for m in model.modules() if isinstance(m, MoE)] == [
        0,
        1,
        2,
    ]  # MTP's: after the main layers
    x = torch.randint(0, 97, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    report = expert_load(model)
    assert {layer: r["assignments"] for layer, r in report.items()} == {
        0: 64,
        1: 64,
        2: 30 * 2,
    }  # MTP: 15 positions
    metrics = model.after_optimizer_step()
    assert {k for k in metrics if k.startswith("moe/")} == {f"moe/layer{i}/imbalance" for i in range(3)}


@pytest.mark.parametrize(
    "moe,refused",
    [
        ({"top_k": 1, "balance": "bias"}, True),
        ({"top_k": 1, "balance": "none"}, True),
        ({"top_k": 1, "balance": "aux", "aux_weight": 0.0}, True),
        (
            {"top_k": 1, "balance": "bias", "normalize": False},
            False,
        ),  # Switch's top-1: weighted by the probability
        (
            {"top_k": 1, "balance": "aux"},
            False,
        ),  # transformers' Mixtral / Qwen with k = 1: learns through the aux loss
        (
            {"top_k": 1, "balance": "bias", "seq_aux_weight": 1e-4},
            False,
        ),  # DeepSeek-V3's: the sequence-wise loss
        ({"top_k": 2, "balance": "bias"}, False),
    ],
)
def test_a_top1_router_that_could_never_learn_is_refused(moe, refused):
    if refused:
        with pytest.raises(ConfigError, match="top_k = 1 with normalize = true .* no gradient at all"):
            MoEConfig(**moe)
        return
    layer = _moe(n_experts=4, **moe).train()
    y = layer(torch.randn(2, 8, 32))
    loss = (y**2).sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
    loss.backward()
    assert layer.router.weight.grad.abs().max() > 1e-6


def test_aux_coefficient_converts_to_and_from_transformers():
    """Ours: α·E·Σ_i c_i/(N·k)·P_i per layer, summed. Theirs: coef·E·Σ_i f_i·P_i over all L layers'
    logits concatenated, f counted over tokens. With α = coef·k/L they are equal when the layers
    route alike (here: L copies of one layer's logits; L = 1 is the special case)."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from scratchlm.models.hf import FAMILIES, config_from_hf
    from scratchlm.models.hf.moe import aux_weight_from_hf

    coef, k, E = 0.02, 2, 4
    x = torch.randn(2, 10, 32)
    for L in (1, 3):
        layer = _moe(n_experts=E, top_k=k, aux_weight=aux_weight_from_hf(coef, k, L)).train()
        layer(x)
        logits = layer.router(x.view(-1, 32)).detach()
        theirs = coef * load_balancing_loss_func((logits,) * L, E, k)
        torch.testing.assert_close(L * layer.aux_loss.detach(), theirs, atol=1e-7, rtol=1e-6)

    mixtral = {
        "model_type": "mixtral",
        "vocab_size": 101,
        "hidden_size": 32,
        "intermediate_size": 40,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 48,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }
    qwen2 = {
        **mixtral,
        "model_type": "qwen2_moe",
        "num_experts": 6,
        "moe_intermediate_size": 24,
        "qkv_bias": False,
        "shared_expert_intermediate_size": 40,
        "mlp_only_layers": [1],
        "num_hidden_layers": 3,
        "num_experts_per_tok": 3,
    }
    for hf, moe_layers in ((mixtral, 4), (qwen2, 2)):
        config = config_from_hf(hf)
        assert config.moe.aux_weight == pytest.approx(0.02 * hf["num_experts_per_tok"] / moe_layers)
        _, exported = FAMILIES[hf["model_type"]].to_hf(GPT(config))
        assert exported["router_aux_loss_coef"] == pytest.approx(0.02)


def test_mixtral_with_one_expert_per_token_imports_as_transformers_computes_it(tmp_path):
    """transformers renormalises even a single weight (to 1): kept, not refused (the aux loss trains its router)."""
    hf = hf_models.mixtral(num_hidden_layers=1, num_experts_per_tok=1)
    ours = hf_models.round_trip(hf, tmp_path).ours
    assert (ours.config.moe.top_k, ours.config.moe.normalize, ours.config.moe.balance) == (1, True, "aux")


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, block_size=32, position="rope", norm="rmsnorm",
                      mlp="swiglu", bias=False, d_ff=48, layers=["attention", "attention+moe"],
                      moe=dict(n_experts=4, top_k=2, router="sigmoid", balance="bias", bias_speed=0.01)))
moe = model.blocks[1].mlp
truth = torch.zeros(4, dtype=torch.long)  # this rank's own assignments, counted beside the layer

def count(module, args):
    with torch.no_grad():
        truth.add_(torch.bincount(module.route(args[0].reshape(-1, 32))[1].reshape(-1), minlength=4))

moe.register_forward_pre_hook(count)
ddp = DistributedDataParallel(model)  # broadcast_buffers=True: rank 0's buffers go out at every synchronising forward
g = torch.Generator().manual_seed(1 + rank)  # each rank its own data
for micro in range(2):  # two synchronising forwards: the second would carry rank 0's counts to rank 1
    x = torch.randint(0, 97, (2, 16), generator=g)
    _, loss = ddp(x, x)
    loss.backward()
load = moe.load.tolist()
metrics = model.after_optimizer_step()
with open(os.path.join({folder!r}, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"truth": truth.tolist(), "load": load, "bias": moe.router_bias.tolist(),
               "imbalance": float(metrics["moe/layer1/imbalance"])}}, f)
# Leave together, with DDP's reducer freed first (as scratchlm.train does): gloo torn down by one
# rank while the other still holds it, or at interpreter shutdown, can abort the process.
import gc
del ddp
gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow  # ~5 s (12 s on busy cores): a two-rank launch
def test_ddp_ranks_count_their_own_tokens_and_move_the_bias_alike(tmp_path):
    """The counters used to be buffers, which DDP overwrites with rank 0's at each synchronising forward."""
    repo = Path(__file__).resolve().parents[3]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(repo), folder=str(tmp_path)))
    result = torchrun(script, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["truth"] != ranks[1]["truth"]  # different data: different counts
    for r in ranks:
        assert r["load"] == r["truth"]  # each rank's log counter holds its own tokens
    total = torch.tensor(ranks[0]["truth"], dtype=torch.float) + torch.tensor(
        ranks[1]["truth"], dtype=torch.float
    )
    assert sum(ranks[0]["truth"]) == 2 * 32 * 2  # two micro-batches of 32 tokens, k = 2
    expected_bias = (0.01 * torch.sign(total.mean() - total)).tolist()
    for r in ranks:
        assert r["bias"] == pytest.approx(expected_bias, abs=1e-7)  # from the sum of both ranks' true counts
        assert r["imbalance"] == pytest.approx(float(total.max() / total.mean()), rel=1e-6)
