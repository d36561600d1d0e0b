"""Multi-token prediction: extra modules after the last layer that predict tokens further ahead.

Two layouts, chosen by ``[model.mtp] kind``:

**sequential** (DeepSeek-V3 technical report, section 2.2, eq. 21–25). Depth ``k = 1 … D`` predicts
token ``t_{i+k+1}`` from position ``i``. It combines the previous depth's representation of
position ``i`` with the embedding of the token ``k`` places ahead, which is known while training:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]          (eq. 21; M_k: 2C -> C)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                   (eq. 22; one Transformer block)
    P^k_{i+k+1} = OutHead(h^k_i)                                        (eq. 23)
    L^k = CrossEntropy(P^k, t_{k+2 : T+1})                              (eq. 24)
    L_MTP = λ / D · Σ_k L^k                                             (eq. 25)

``h^0`` is the main model's output representation: its last hidden state *after* the final norm,
which is what Hugging Face's ``MtpModel`` is given (``hidden_states[-1]`` of a causal LM is the
normed ``last_hidden_state``). The embedding table and the output head are the main model's (shared,
so they are not parameters of this module); each depth owns its two input norms, ``M_k``, its block
and a final norm before the shared head (the checkpoint's ``shared_head.norm``, HF's
``post_norm``). Two layout details follow the released checkpoint and Hugging Face rather than the
paper's typography: the concatenation puts the *embedding first* (the paper writes ``[h ; Emb]``),
and depth ``k + 1`` reads depth ``k``'s state *after* that final norm, as ``h^0`` is after the main
model's (with D = 1, the depth DeepSeek-V3 ships, the second point does not arise). Eq. 24 divides
each depth's sum by T; we divide by the positions that have a target (the main loss's convention,
and Hugging Face's): the two differ by the factor (T − k) / T.

**parallel** (Gloeckle et al. 2024, "Better & Faster Large Language Models via Multi-token
Prediction", section 2): ``n`` independent heads on a shared trunk, ``P(t_{i+k+1} | t_{≤i}) =
softmax(f_u(f_{h_k}(z_i)))``, each head ``f_{h_k}`` one Transformer block, ``f_u`` the shared
unembedding. Here the whole main model is the trunk *and* the next-token head (so its loss and its
generations are unchanged); head ``k`` reads the main model's final representation ``z = h^0``
and predicts the token ``k + 1`` places ahead. No head sees a later token, so the heads' guesses
need no chain: this is what makes them cheap drafts.

In training (``GPT.forward`` with targets, in train mode) the module sets ``aux_loss = λ · L_MTP``;
``GPT.auxiliary_loss`` adds it to the loss once. Evaluation reports the plain next-token loss, and
generation never runs these modules. :func:`mtp_acceptance` measures how often the depth-1 guess
(the token after next) is what greedy decoding then produces: the figure self-speculative decoding
with MTP builds on (DeepSeek-V3 reports 85–90 %).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import ConfigError, Rule, validate
from scratchlm.models.block import KIND_TABLES, Block
from scratchlm.models.blocks.moe import MoE
from scratchlm.models.layers import make_norm

KINDS = ("sequential", "parallel")


@dataclass
class MTPConfig:
    depth: int = 1  # D: MTP modules (sequential depths or parallel heads); depth k predicts token t+k+1
    weight: float = 0.3  # λ: the MTP loss's weight in the training loss (DeepSeek-V3 eq. 25)
    kind: str = "sequential"  # "sequential" (DeepSeek-V3) or "parallel" (Gloeckle et al. 2024)
    # each module's layer kind ("attention", "mla+moe"); None: the main model's last layer's
    block: str | None = None

    def __post_init__(self):
        validate(
            self,
            "model.mtp",
            {
                "depth": Rule(min=1),
                "weight": Rule(min=0, why="λ, the MTP loss weight"),
                "kind": Rule(choices=KINDS),
            },
        )


class MTPModule(nn.Module):
    """One depth (sequential) or one head (parallel): [norms + projection], a block, a final norm."""

    def __init__(self, config, kind: str):
        super().__init__()
        c = config
        if kind == "sequential":
            self.embed_norm = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
            self.hidden_norm = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)
            self.proj = nn.Linear(2 * c.d_model, c.d_model, bias=False)  # M_k
        self.block = Block(c, 0)
        self.norm = make_norm(c.norm, c.d_model, c.norm_eps, c.bias)  # before the shared output head


class MTP(nn.Module):
    """D multi-token-prediction modules sharing the main model's embedding and output head.

    The shared matrices are not registered here (they would be counted and saved twice): every
    method takes the main ``model`` and reads ``model.tok_emb`` and ``model.lm_head`` from it.
    """

    def __init__(self, config):
        super().__init__()
        mtp = config.mtp
        self.kind, self.weight = mtp.kind, mtp.weight
        block = mtp.block or "+".join(k for k in config.layer_kinds()[-1] if k != "dense")
        try:  # the block's config: the main model's settings, one layer of the chosen kind
            kinds = set(block.split("+"))  # the block keeps only the settings tables its kinds read
            unused = {name: None for kind, (name, _) in KIND_TABLES.items() if kind not in kinds}
            attn = config.attn if "sliding" in kinds else dataclasses.replace(config.attn, window=None)
            block_config = dataclasses.replace(
                config, n_layer=1, layers=[block], mtp=None, attn=attn, **unused
            )
        except ConfigError as e:
            raise ConfigError(f"model.mtp.block = {block!r}: {e}") from None
        self.depths = nn.ModuleList(MTPModule(block_config, mtp.kind) for _ in range(mtp.depth))
        for k, module in enumerate(self.depths):
            if isinstance(module.block.mlp, MoE):  # built as layer 0 of a 1-layer model: renumbered after
                # the main layers, as DeepSeek-V3's checkpoint numbers its MTP layer (model.layers.{n_layer}),
                # so its metrics (moe/layer{i}/imbalance) and expert_load entry do not overwrite main layer 0's
                module.block.mlp.layer = config.n_layer + k
        self.aux_loss: torch.Tensor | None = None  # λ · L_MTP of the last training forward (GPT adds it)
        # (D,) each depth's cross-entropy, detached, for logging
        self.depth_losses: torch.Tensor | None = None

    # --- the modules, teacher-forced (training) --------------------------------------------
    def forward(self, model, hidden: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
        """Each depth's logits: ``out[k-1][:, i]`` predicts token ``i + k + 1`` (0-based).

        ``hidden`` (B, T, C) is the main model's final-normed state, ``idx`` (B, T) its input.
        A sequential depth ``k`` needs the token ``i + k``, so it has ``T - k`` positions; a
        parallel head has all ``T`` (its last ``k`` positions have no target in the batch).
        """
        T = idx.shape[1]
        out, h = [], hidden
        for k, module in enumerate(self.depths, start=1):
            if T - k < 1:
                break
            if self.kind == "sequential":
                h = self._sequential(model, module, h[:, : T - k], idx[:, k:], start=k)
            else:
                h = self._parallel(model, module, hidden)
            out.append(model.logits(h))
        return out

    def loss(
        self,
        model,
        hidden: torch.Tensor,
        idx: torch.Tensor,
        targets: torch.Tensor,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """λ · L_MTP (eq. 25): λ times the mean over depths of each depth's cross-entropy.

        ``targets[:, j]`` is token ``j + 1``, so depth ``k`` at position ``i`` is scored against
        ``targets[:, i + k]``; the last ``k`` positions have no target and -1 is ignored, as in the
        main loss. A depth with no target left contributes 0 (never the NaN of an empty mean).
        Sets ``depth_losses`` for logging.
        """
        if documents is not None:
            raise ValueError(
                "multi-token prediction does not take packed rows (documents): a depth would read "
                "and predict across document boundaries; train without packing or without model.mtp"
            )
        T = idx.shape[1]
        losses = []
        for k, logits in enumerate(self(model, hidden, idx), start=1):
            logits, wanted = logits[:, : T - k], targets[:, k:]
            per_token = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                wanted.reshape(-1),
                ignore_index=-1,
                reduction="sum",
            )
            losses.append(per_token / (wanted != -1).sum().clamp_min(1))
        losses += [hidden.new_zeros(())] * (
            len(self.depths) - len(losses)
        )  # T <= D: nothing to predict that far
        losses = torch.stack(losses)
        self.depth_losses = losses.detach()
        return self.weight * losses.mean()

    def metrics(self) -> dict[str, torch.Tensor]:
        """The last training forward's MTP losses (unweighted), named for the trainer's log."""
        if self.depth_losses is None:
            return {}
        named = {f"mtp/loss_depth_{k}": loss for k, loss in enumerate(self.depth_losses, start=1)}
        return {"mtp/loss": self.depth_losses.mean(), **named}

    # --- drafting (inference) ----------------------------------------------------------------
    @torch.no_grad()
    def draft(
        self, model, hidden: torch.Tensor, idx: torch.Tensor, next_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy guesses for the D tokens after ``next_ids`` — the main model's choice for
        position T — and their logits: (B, D) ids, (B, D, V).

        A sequential depth needs the token ``k`` places ahead, which at the last position is a
        guess: each depth's inputs are the previous depth's, shifted one place, with the
        previous depth's guess appended (Hugging Face's ``MtpModel.forward`` chains the same way).
        """
        B, _T = idx.shape
        tokens = torch.cat([idx[:, 1:], next_ids.view(B, 1)], dim=1)  # t_1 … t_T: one ahead of ``hidden``
        guesses, all_logits, h = [], [], hidden
        for k, module in enumerate(self.depths, start=1):
            if self.kind == "sequential":
                h = self._sequential(model, module, h, tokens, start=k)
            else:
                h = self._parallel(model, module, hidden)
            logits = model.logits(h[:, -1])  # (B, V)
            guess = logits.argmax(dim=-1)
            guesses.append(guess)
            all_logits.append(logits)
            tokens = torch.cat([tokens[:, 1:], guess[:, None]], dim=1)
        return torch.stack(guesses, dim=1), torch.stack(all_logits, dim=1)

    # --- one depth ----------------------------------------------------------------------------
    def _sequential(
        self, model, module: MTPModule, h: torch.Tensor, tokens: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Eq. 21–22 and the final norm: (B, L, C) states and the L tokens ``k`` places ahead."""
        combined = torch.cat([module.embed_norm(model.tok_emb(tokens)), module.hidden_norm(h)], dim=-1)
        x = module.proj(combined)
        # Positions are those of the input tokens (t_{i+k} sits at i + k), as in HF's drafting loop;
        # RoPE sees only differences, so the offset changes nothing there.
        return module.norm(module.block(x, layer=0, **_mixer_kwargs(model, start, tokens.shape[1], x.device)))

    def _parallel(self, model, module: MTPModule, hidden: torch.Tensor) -> torch.Tensor:
        return module.norm(
            module.block(hidden, layer=0, **_mixer_kwargs(model, 0, hidden.shape[1], hidden.device))
        )


def _mixer_kwargs(model, start: int, length: int, device) -> dict:
    """What a block's mixer is given (as in ``GPT.forward``) for positions ``start …`` without a cache."""
    c = model.config
    if start + length > c.block_size:
        raise ValueError(
            f"an MTP depth reaches position {start + length - 1}, past the context length {c.block_size}"
        )
    positions = torch.arange(start, start + length, device=device)
    kwargs = {"positions": positions}
    if c.position == "rope":
        kwargs["rope"] = (model.rope_cos[positions], model.rope_sin[positions])
    if c.position == "alibi":
        kwargs["alibi"] = model.alibi
    return kwargs


@torch.no_grad()
def mtp_acceptance(model, prompts, max_new_tokens: int) -> dict:
    """How often the MTP modules' guesses are what greedy decoding then produces.

    The main model decodes greedily, one full forward per token. After each step (the main model
    has just chosen token ``n``) the modules guess tokens ``n+1 … n+D`` (:meth:`MTP.draft`); the
    next steps show whether they were right. Depth ``k`` counts as accepted when guesses ``1 … k``
    all match, as a speculative decoder would accept them (a later guess built on a wrong one is
    useless). ``acceptance_rate`` is depth 1's: the 2nd-token guess. ``tokens_per_step`` is
    ``1 + Σ_k rate_k``: the tokens each main-model forward would yield if the guesses were verified
    in the same forward (self-speculative decoding), the speed-up's upper bound.

    ``prompts``: lists of ids (lengths may differ). A sequence stops at ``max_new_tokens`` or when
    the modules' positions would pass the context (``block_size - D`` tokens).
    """
    if model.mtp is None:
        raise ValueError("the model has no MTP modules (set [model.mtp])")
    was_training = model.training
    model.eval()
    D = len(model.mtp.depths)
    limit = model.config.block_size - D
    device = next(model.parameters()).device
    guesses, accepted, continuations = [0] * D, [0] * D, []
    for prompt in prompts:
        if not 1 <= len(prompt) <= limit:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens: expected 1 to {limit} "
                f"(block_size {model.config.block_size} minus {D} MTP positions)"
            )
        seq = torch.tensor([list(prompt)], device=device)
        drafts = []  # (index of the token the guesses follow, guesses)
        for _ in range(max_new_tokens):
            if seq.shape[1] > limit:
                break
            logits, _, hidden = model(seq, return_hidden=True)
            next_id = logits[:, -1].argmax(dim=-1)
            draft, _ = model.mtp.draft(model, hidden, seq, next_id)
            drafts.append((seq.shape[1], draft[0].tolist()))
            seq = torch.cat([seq, next_id[:, None]], dim=1)
        tokens = seq[0].tolist()
        for n, draft in drafts:
            for k in range(1, D + 1):
                if n + k >= len(tokens):
                    break  # decoding stopped before this token: not a guess that could be checked
                guesses[k - 1] += 1
                if all(draft[j - 1] == tokens[n + j] for j in range(1, k + 1)):
                    accepted[k - 1] += 1
        continuations.append(tokens[len(prompt) :])
    model.train(was_training)
    rates = [a / g if g else 0.0 for a, g in zip(accepted, guesses)]
    return {
        "acceptance_rate": rates[0],
        "guesses": guesses[0],
        "accepted": accepted[0],
        "per_depth": [
            {"depth": k + 1, "guesses": guesses[k], "accepted": accepted[k], "acceptance_rate": rates[k]}
            for k in range(D)
        ],
        "tokens_per_step": 1 + sum(rates),
        "tokens": continuations,
    }
