"""Mixture-of-Experts: the fast dropless dispatch equals the readable every-expert reference
(outputs and gradients, 1e-5); routing (softmax / sigmoid, bias for selection only, group limits)
equals transformers' Mixtral / DeepSeek-V2 / DeepSeek-V3 routers and a hand-worked case; the
auxiliary load-balancing loss equals a hand computation and transformers' ``load_balancing_loss_func``;
DeepSeek-V3's loss-free bias balances a collapsed router; and Mixtral, Qwen2-MoE and Qwen3-MoE
models built by transformers give the same logits (1e-4) and greedy tokens after import, and load
back in transformers after export."""

from __future__ import annotations

import pytest
import torch

from scratchlm.config import ConfigError
from scratchlm.models.gpt import GPT, GPTConfig
from scratchlm.models.moe import MoE, MoEConfig, expert_load


def _config(**moe) -> GPTConfig:
    return GPTConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, block_size=32, position="rope", norm="rmsnorm",
                     mlp="swiglu", bias=False, d_ff=48, layers=["attention", "attention+moe"], moe=moe)


def _moe(seed: int = 0, **moe) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(_config(**moe), layer=1)
    with torch.no_grad():  # large weights: a wrong weighting or a dropped token shows in the output
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    return layer


ROUTINGS = {
    "mixtral": dict(n_experts=4, top_k=2),
    "qwen2-shared-gate": dict(n_experts=6, top_k=3, normalize=False, n_shared=1, d_shared=40, shared_gate=True),
    "deepseek-v3": dict(n_experts=8, top_k=3, router="sigmoid", n_groups=4, topk_groups=2, group_score="top2",
                        routed_scale=2.5, n_shared=2, balance="bias", seq_aux_weight=0.01),
    "deepseek-v2": dict(n_experts=8, top_k=2, normalize=False, n_groups=4, topk_groups=2, routed_scale=1.5,
                        n_shared=1),
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
        (MixtralTopKRouter(transformers.MixtralConfig(hidden_size=32, num_local_experts=6, num_experts_per_tok=2)),
         dict(n_experts=6, top_k=2)),
        (DeepseekV2TopkRouter(transformers.DeepseekV2Config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=2,
                                                            n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                                            routed_scaling_factor=1.5)),
         dict(n_experts=8, top_k=2, normalize=False, n_groups=4, topk_groups=2, routed_scale=1.5)),
        (DeepseekV3TopkRouter(transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=8, num_experts_per_tok=3,
                                                            n_group=4, topk_group=2, routed_scaling_factor=2.5)),
         dict(n_experts=8, top_k=3, router="sigmoid", n_groups=4, topk_groups=2, group_score="top2", routed_scale=2.5)),
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
        assert torch.equal(chosen.gather(1, order), their_chosen.gather(1, their_order)), type(theirs).__name__
        torch.testing.assert_close(weights.gather(1, order), their_weights.gather(1, their_order), atol=1e-6, rtol=1e-6)


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
    torch.testing.assert_close(layer.aux_loss.detach(), 0.1 * theirs / 2)  # theirs counts f over tokens, not N·k
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
    layer = MoE(_config(n_experts=4, top_k=1, router="sigmoid", balance="bias", bias_speed=0.02), layer=1)
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
    torch.testing.assert_close(loss - plain, model.blocks[1].mlp.aux_loss, atol=1e-6, rtol=1e-5)
    loss.backward()
    assert model.blocks[1].mlp.experts_down.grad.abs().max() > 0
    metrics = model.after_optimizer_step()
    assert set(metrics) == {"moe/layer1/imbalance"}
    report = expert_load(model)
    assert list(report) == [1] and report[1]["assignments"] == 3 * 2 * 16 * 2  # three forwards, 32 tokens, k = 2
    assert abs(sum(report[1]["fraction"]) - 1) < 1e-6
    state = model.state_dict()
    assert "blocks.1.mlp.router_bias" in state and "blocks.1.mlp.load" not in state


@pytest.mark.parametrize("moe,message", [
    (dict(n_experts=4, top_k=5), "top_k = 5 exceeds"),
    (dict(n_experts=6, n_groups=4), "must divide"),
    (dict(n_experts=8, top_k=4, n_groups=4, topk_groups=1), "cannot hold top_k"),
    (dict(shared_gate=True), "need shared experts"),
    (dict(router="softplus"), "model.moe.router = 'softplus': must be one of"),
    (dict(balance="loss"), "model.moe.balance"),
])
def test_config_refuses_impossible_routing(moe, message):
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**moe)


# --- Hugging Face parity ---------------------------------------------------------------------------
def _mixtral(window: int | None = None):
    transformers = pytest.importorskip("transformers")
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=101, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=48, num_local_experts=4, num_experts_per_tok=2,
        initializer_range=0.3, sliding_window=window, rope_theta=10000.0, attn_implementation="eager"))


def _qwen2_moe(norm_topk_prob: bool):
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=101, hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=48, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=24, shared_expert_intermediate_size=40, norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=[1], initializer_range=0.3, qkv_bias=True))


def _qwen3_moe():
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=101, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=48, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=24, norm_topk_prob=True, decoder_sparse_step=2, initializer_range=0.3,
        tie_word_embeddings=True))


@pytest.mark.parametrize("make,layers", [
    (_mixtral, ["attention+moe"]),
    (lambda: _mixtral(window=6), ["sliding+moe"]),  # 20 positions, a window of 6: the window matters
    (lambda: _qwen2_moe(False), ["attention+moe", "attention", "attention+moe"]),
    (lambda: _qwen2_moe(True), ["attention+moe", "attention", "attention+moe"]),
    (_qwen3_moe, ["attention", "attention+moe"]),
], ids=["mixtral", "mixtral-sliding", "qwen2-moe", "qwen2-moe-norm-topk", "qwen3-moe"])
def test_hf_import_logits_greedy_decoding_and_export(tmp_path, make, layers):
    from scratchlm.generate.generate import generate
    from scratchlm.generate.sampling import SamplingConfig
    from scratchlm.models.hf import export_hf, import_hf

    torch.manual_seed(0)
    hf = make().eval()
    with torch.no_grad():  # the experts' fused tensors are initialised like the rest: make them large too
        for name, p in hf.named_parameters():
            if "experts" in name:
                p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = import_hf(tmp_path / "hf")
    assert ours.config.layers == layers
    x = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        expected = hf(x).logits
        got, _ = ours(x)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    prompt = x[:1, :6]
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
    assert generate(ours, prompt, 12, SamplingConfig(temperature=0.0), use_cache=True)[0] == theirs

    export_hf(ours, tmp_path / "exported")
    back = type(hf).from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, expected, atol=1e-4, rtol=1e-4)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    from scratchlm.models.hf import export_hf

    model = GPT(_config(n_experts=4, top_k=2, balance="bias"))
    model.blocks[1].mlp.router_bias[0] = 0.1
    with pytest.raises(ValueError, match="qwen2_moe export needs .*gated shared expert"):
        export_hf(model, tmp_path / "a", "qwen2_moe")
    with pytest.raises(ValueError, match="mixtral export needs every layer MoE; .*zero router_bias"):
        export_hf(model, tmp_path / "b", "mixtral")
