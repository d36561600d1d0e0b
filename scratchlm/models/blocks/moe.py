"""Mixture-of-Experts MLP: top-k routing, shared experts, load balancing.

A dense MLP runs every token through one wide feed-forward network. A Mixture-of-Experts layer
keeps ``E`` narrower SwiGLU networks (the *experts*) and a *router* that sends each token to ``k``
of them, so the parameters grow with ``E`` while the compute per token grows only with ``k``.

Tensor names (fixed: the DeepSeek and Jamba importers map checkpoints onto them)::

    router.weight   (E, C)      the router's logits  u_t · e_i
    router_bias     (E,)        a persistent buffer, always float32: DeepSeek-V3's e_score_correction_bias b_i
    experts_gate    (E, F, C)   each expert's SwiGLU gate projection
    experts_up      (E, F, C)   ... its up projection
    experts_down    (E, C, F)   ... its down projection
    shared.gate / shared.up / shared.down    the always-on shared experts (one SwiGLU of width d_shared)
    shared_gate.weight (1, C)   Qwen2-MoE's sigmoid gate on the shared output

Routing, for a token with hidden state ``u`` (DeepSeek-V3 report, arXiv 2412.19437, eq. 12–16;
Mixtral, arXiv 2401.04088, eq. 1–2; DeepSeekMoE, arXiv 2401.06066, for shared experts)::

    s_i    = softmax_i(u · e_i)      (Mixtral, Qwen, DeepSeek-V2)  or  sigmoid(u · e_i)  (V3, eq. 15)
    chosen = TopK(s_i + b_i, k)      over the experts of the best ``topk_groups`` groups only (V2/V3)
    g_i    = s_i for chosen i        (the bias b chooses, it never weighs: V3 eq. 16)
    g_i    = g_i / Σ_chosen g_j      if ``normalize``   (V3 eq. 13; Mixtral's softmax over the top-k)
    y      = Σ_shared FFN_s(u) + routed_scale · Σ_chosen g_i · FFN_i(u)   (V3 eq. 12; the scale is V3's config)

Dispatch is *dropless*: no capacity factor, every token reaches every expert it chose. The fast
path groups the (token, expert) assignments by expert and runs one matrix multiply per expert on
exactly the tokens that chose it; the readable reference runs every expert on every token and
weights them with a dense (tokens, E) gate matrix that is zero where an expert was not chosen.
They agree to 1e-5 (tests/models/blocks/test_moe.py).

Routing (logits, scores, choice, weights, balance losses) runs in float32 with autocast switched
off: under bfloat16 autocast a near-tie between two experts would be decided by rounding.

Load balancing (without it a router collapses onto a few experts):

* ``balance = "aux"``: the Switch Transformer / Mixtral auxiliary loss (Switch, arXiv 2101.03961,
  eq. 4–6; DeepSeek-V2's expert-level balance loss), ``L = α · E · Σ_i f_i · P_i`` with ``f_i``
  the fraction of the N·k assignments that went to expert i and ``P_i`` the mean router
  probability of i. Without α it is 1 for a uniform router and E/k when every token picks the
  same k experts with all the probability.
* ``balance = "bias"``: DeepSeek-V3's auxiliary-loss-free balancing (report section 2.1.2, eq. 16): after
  each optimizer step, ``b_i += γ · sign(mean load − load_i)`` (an underloaded expert becomes
  easier to choose), with the loads counted over every training forward since the last step (all
  micro-batches of a gradient-accumulation step, all-reduced across DDP ranks).
* ``seq_aux_weight``: V3's complementary sequence-wise balance loss (eq. 17–20): the same
  ``E · Σ f_i P_i`` computed within each sequence (with P from the scores normalised to sum to 1)
  and averaged over the batch, times a tiny α.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import ConfigError, Rule, validate


@dataclass
class MoEConfig:
    n_experts: int = 8  # routed experts E
    top_k: int = 2  # experts each token is sent to
    d_expert: int | None = None  # each routed expert's hidden width; None: the model's MLP width
    n_shared: int = 0  # shared experts every token goes through (DeepSeekMoE, Qwen2-MoE)
    d_shared: int | None = None  # total hidden width of the shared experts; None: n_shared × d_expert
    shared_gate: bool = False  # Qwen2-MoE: scale the shared output by sigmoid(w · u)
    router: str = "softmax"  # how logits become scores: softmax (Mixtral, Qwen, V2) or sigmoid (V3)
    normalize: bool = True  # rescale the chosen experts' weights to sum to 1
    n_groups: int = 1  # expert groups for group-limited routing (DeepSeek-V2/V3); 1: no limit
    topk_groups: int = 1  # groups a token may pick its experts from
    group_score: str = "max"  # a group's score: its best expert (V2) or its best two summed (V3, "top2")
    routed_scale: float = 1.0  # multiplies the routed experts' output (DeepSeek's routed_scaling_factor)
    balance: str = "aux"  # load balancing: aux (Switch/Mixtral loss), bias (V3 loss-free), none
    aux_weight: float = 0.01  # α of the auxiliary load-balancing loss (balance = "aux")
    bias_speed: float = 0.001  # γ, the bias step of loss-free balancing (balance = "bias")
    seq_aux_weight: float = 0.0  # α of V3's sequence-wise balance loss (any balance; V3 used 1e-4)

    def __post_init__(self):
        validate(
            self,
            "model.moe",
            {
                "n_experts": Rule(min=1),
                "top_k": Rule(min=1),
                "d_expert": Rule(min=1),
                "n_shared": Rule(min=0),
                "d_shared": Rule(min=1),
                "router": Rule(choices=("softmax", "sigmoid")),
                "n_groups": Rule(min=1),
                "topk_groups": Rule(min=1),
                "group_score": Rule(choices=("max", "top2")),
                "routed_scale": Rule(above=0),
                "balance": Rule(choices=("aux", "bias", "none")),
                "aux_weight": Rule(min=0),
                "bias_speed": Rule(min=0),
                "seq_aux_weight": Rule(min=0),
            },
        )
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"model.moe.top_k = {self.top_k} exceeds model.moe.n_experts = {self.n_experts}"
            )
        if self.n_experts % self.n_groups:
            raise ConfigError(
                f"model.moe.n_groups = {self.n_groups} must divide model.moe.n_experts = {self.n_experts}"
            )
        per_group = self.n_experts // self.n_groups
        if self.topk_groups > self.n_groups or self.top_k > self.topk_groups * per_group:
            raise ConfigError(
                f"model.moe.topk_groups = {self.topk_groups} of {self.n_groups} groups of {per_group} "
                f"experts cannot hold top_k = {self.top_k} experts"
            )
        if self.group_score == "top2" and self.n_groups > 1 and per_group < 2:
            raise ConfigError("model.moe.group_score = 'top2' needs at least 2 experts per group")
        if (self.shared_gate or self.d_shared) and not self.n_shared:
            raise ConfigError(
                "model.moe.shared_gate / d_shared need shared experts: set model.moe.n_shared >= 1"
            )
        # With one expert per token, renormalising makes its weight exactly 1 whatever the router
        # says, so the language-model loss sends the router no gradient. transformers' Mixtral and
        # Qwen do compute that (an imported model must too), and there a balancing loss is still a
        # gradient; without one the router could never learn: refused.
        if (
            self.top_k == 1
            and self.normalize
            and self.seq_aux_weight == 0
            and not (self.balance == "aux" and self.aux_weight > 0)
        ):
            raise ConfigError(
                "model.moe.top_k = 1 with normalize = true weighs the chosen expert 1 whatever the "
                "router says, and no balancing loss is on (balance = 'aux' with aux_weight > 0, or "
                "seq_aux_weight > 0): the router would get no gradient at all. Set normalize = false "
                "(the Switch Transformer's top-1 gate: the output scaled by the router's probability)"
            )


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with no biases: the shared experts (all of them fused in one
    wider network, which computes exactly their sum)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MoE(nn.Module):
    """A Mixture-of-Experts MLP: ``forward(x) -> (B, T, C)``, ``aux_loss``, ``after_optimizer_step()``."""

    use_reference = False  # True: run every expert on every token (the readable, slow dispatch)

    def __init__(self, config, layer: int):
        super().__init__()
        m: MoEConfig = config.moe
        # ``layer`` names this layer's metrics and its entry in expert_load (MTP's blocks renumber theirs).
        self.config, self.layer = m, layer
        C, E = config.d_model, m.n_experts
        F_ = m.d_expert or config.ff_width
        self.router = nn.Linear(C, E, bias=False)
        self.register_buffer("router_bias", torch.zeros(E), persistent=True)
        std = config.init_std
        self.experts_gate = nn.Parameter(torch.randn(E, F_, C) * std)
        self.experts_up = nn.Parameter(torch.randn(E, F_, C) * std)
        # Like the dense MLP's down projection: scaled so the residual stream's variance does not grow with depth.
        self.experts_down = nn.Parameter(torch.randn(E, C, F_) * std / (2 * config.n_layer) ** 0.5)
        self.shared = SwiGLU(C, m.d_shared or m.n_shared * F_) if m.n_shared else None
        self.shared_gate = nn.Linear(C, 1, bias=False) if m.shared_gate else None
        self.dropout = nn.Dropout(config.dropout)
        # Tokens per expert: ``load`` since the last ``reset_load()`` (for logging), ``_step_load``
        # over the training forwards since the last optimizer step (for the balancing bias). Plain
        # tensors, not buffers: DDP broadcasts rank 0's buffers at every synchronising forward, which
        # would overwrite each rank's own counts. ``_apply`` moves them with the module.
        self.load = torch.zeros(E, dtype=torch.long)
        self._step_load = torch.zeros(E, dtype=torch.long)
        self._counted = False  # a training forward since the last optimizer step (host-side: no sync to ask)
        self.aux_loss: torch.Tensor | None = None

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.bfloat16()`` ... with two exceptions to the usual rules: the
        balancing bias stays float32 (in bfloat16 a step of γ = 0.001 is lost near |b| = 1, whose
        spacing is 2^-7; DeepSeek-V3 and transformers keep it float32 too), and the load counters,
        which are not buffers, move with the module."""
        bias = self.router_bias
        super()._apply(fn, recurse)
        if self.router_bias.dtype != torch.float32:
            self.router_bias = bias.to(self.router_bias.device)  # from the float32 original: no rounding
        fresh = self.load.is_meta  # built on the meta device: the counts start at zero on the real one
        self.load, self._step_load = (fn(t).long() for t in (self.load, self._step_load))
        if fresh and not self.load.is_meta:
            self.load.zero_()
            self._step_load.zero_()
        return self

    # --- routing --------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (N, E), chosen experts (N, k) and their weights (N, k), all float32, for tokens (N, C)."""
        m = self.config
        # float32 inputs *and* autocast off (autocast would run this matmul in bfloat16 anyway):
        # near-ties between experts must not flip with rounding.
        with _without_autocast(x.device):
            logits = F.linear(x.float(), self.router.weight.float())
            scores = logits.softmax(dim=-1) if m.router == "softmax" else logits.sigmoid()
            with (
                torch.no_grad()
            ):  # selection is discrete: no gradient flows through which experts were picked
                choice = scores + self.router_bias.float()
                if m.n_groups > 1:
                    choice = self._limit_groups(choice)
                chosen = choice.topk(m.top_k, dim=-1).indices
            weights = scores.gather(1, chosen)  # unbiased scores: the bias only ever chooses
            if m.normalize:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return scores, chosen, weights * m.routed_scale

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep only the experts of each token's best ``topk_groups`` groups (the rest get -inf):
        DeepSeek-V2's device-limited routing (group score = best expert) and V3's node-limited
        routing (group score = sum of the best two biased scores)."""
        m = self.config
        grouped = choice.view(choice.shape[0], m.n_groups, -1)  # (N, G, E/G)
        if m.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best = group_scores.topk(m.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)

    # --- dispatch -----------------------------------------------------------------------------------
    def experts_fast(
        self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Dropless dispatch: sort the N·k (token, expert) assignments by expert, run each expert
        once on the rows that chose it, scale by the weights and add back into the tokens' rows.
        ``counts`` (E,): assignments per expert."""
        k = chosen.shape[1]
        order = chosen.reshape(-1).argsort(stable=True)  # assignments grouped by expert
        token = order // k  # assignment j of the flat (N, k) list belongs to token j // k
        # The layer's one host sync: the size of each expert's slice must be known to cut it.
        rows = x[token].split(counts.tolist())
        # One view per expert, taken once: indexing the stack per expert (experts_gate[e]) would
        # make each expert's backward build a zero gradient of the whole (E, F, C) stack, E of
        # them per stack, O(E²·F·C); unbind's backward stacks the E gradients once.
        gate, up, down = self.experts_gate.unbind(0), self.experts_up.unbind(0), self.experts_down.unbind(0)
        outputs = [
            F.linear(F.silu(F.linear(r, gate[e])) * F.linear(r, up[e]), down[e])
            for e, r in enumerate(rows)
            if r.shape[0]
        ]  # an expert no token chose costs nothing
        y = torch.cat(outputs) if outputs else x[:0]
        y = y * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, y)

    def experts_reference(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighted by a dense (N, E) gate matrix with zeros for the
        experts a token did not choose. E/k times the compute: for reading and testing only."""
        gates = torch.zeros(x.shape[0], self.config.n_experts, dtype=x.dtype, device=x.device)
        gates = gates.scatter(1, chosen, weights)
        gate = torch.einsum("nc,efc->enf", x, self.experts_gate)
        hidden = F.silu(gate) * torch.einsum("nc,efc->enf", x, self.experts_up)
        outputs = torch.einsum("enf,ecf->enc", hidden, self.experts_down)  # (E, N, C)
        return torch.einsum("ne,enc->nc", gates, outputs)

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        tokens = x.reshape(-1, C)
        scores, chosen, weights = self.route(tokens)
        counts = torch.bincount(chosen.reshape(-1), minlength=self.config.n_experts)
        if self.use_reference:
            out = self.experts_reference(tokens, chosen, weights.to(x.dtype))
        else:
            out = self.experts_fast(tokens, chosen, weights.to(x.dtype), counts)
        if self.shared is not None:
            shared = self.shared(tokens)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(tokens)) * shared
            out = out + shared
        self._count(counts)
        self.aux_loss = (
            self._balance_losses(scores.view(B, T, -1), chosen.view(B, T, -1)) if self.training else None
        )
        return self.dropout(out.view(B, T, C))

    # --- load balancing ------------------------------------------------------------------------------
    @torch.no_grad()
    def _count(self, counts: torch.Tensor) -> None:
        self.load += counts
        if self.training:
            self._step_load += counts
            self._counted = True

    def _balance_losses(self, scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor | None:
        """α·E·Σ f_i·P_i over the batch (balance = "aux") plus, if seq_aux_weight > 0, the same sum
        within each sequence averaged over sequences (V3 eq. 17–20). ``scores`` (B, T, E), ``chosen`` (B, T, k)."""
        with _without_autocast(scores.device):
            return self._balance_losses_float32(scores, chosen)

    def _balance_losses_float32(self, scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor | None:
        m = self.config
        E, k = m.n_experts, m.top_k
        picked = torch.zeros_like(scores).scatter_(-1, chosen, 1.0)  # (B, T, E): 1 where expert chosen
        # P: router probabilities; the sigmoid's scores are normalised to sum to 1 first (V3 eq. 19).
        probs = scores if m.router == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        total = None
        if m.balance == "aux" and m.aux_weight > 0:
            f = picked.sum(dim=(0, 1)) / (picked.shape[0] * picked.shape[1] * k)
            P = probs.mean(dim=(0, 1))
            total = m.aux_weight * E * (f * P).sum()
        if m.seq_aux_weight > 0:
            f = picked.sum(dim=1) / (picked.shape[1] * k)  # (B, E), per sequence
            P = probs.mean(dim=1)
            seq = m.seq_aux_weight * E * (f * P).sum(dim=-1).mean()
            total = seq if total is None else total + seq
        return total

    @torch.no_grad()
    def after_optimizer_step(self) -> dict[str, torch.Tensor]:
        """Loss-free balancing (balance = "bias"): b_i += γ·sign(mean load − load_i), the loads
        counted since the last step (summed over DDP ranks). Returns the step's imbalance
        (max load / mean load; 1 is perfect) for the trainer's log, as a tensor: nothing here
        waits for the device."""
        load = self._step_load.float()
        self._step_load.zero_()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # On every rank at every step, whatever it counted: a rank that skipped would hang the others.
            torch.distributed.all_reduce(load)  # every rank must nudge its bias identically
        if self.config.balance == "bias":
            # With nothing counted, mean − load is 0 everywhere and sign(0) = 0 leaves the bias alone.
            self.router_bias += self.config.bias_speed * torch.sign(load.mean() - load)
        counted, self._counted = self._counted, False
        if not counted:  # no training forward since the last step: no imbalance to report
            return {}
        return {f"moe/layer{self.layer}/imbalance": load.max() / load.mean()}

    def reset_load(self) -> None:
        self.load.zero_()


def _without_autocast(device: torch.device):
    """Switch autocast off on ``device`` (where autocast exists: not on the meta device)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def expert_load(model: nn.Module, reset: bool = False) -> dict[int, dict]:
    """For each MoE layer (by layer index): the fraction of assignments each expert received since
    the last reset, and the imbalance max/mean (1 is perfectly balanced, E is total collapse)."""
    report = {}
    for module in model.modules():
        if isinstance(module, MoE):
            load = module.load.float()
            total = load.sum().item()
            fraction = (load / total).tolist() if total else [0.0] * load.numel()
            imbalance = (load.max() / load.mean()).item() if total else float("nan")
            report[module.layer] = {"fraction": fraction, "imbalance": imbalance, "assignments": int(total)}
            if reset:
                module.reset_load()
    return report
