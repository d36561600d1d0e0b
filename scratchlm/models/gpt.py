"""The GPT: one config-driven decoder-only Transformer, read top to bottom (checkpoints C and D).

The forward pass:

    ids (B, T) ─► token embedding (B, T, C) [+ position embedding]
               ─► n_layer × Block: x = x + mixer(norm(x)); x = x + mlp(norm(x))    (pre-norm)
               ─► final norm ─► lm_head (B, T, V) logits ─► cross-entropy with targets

Where the rest lives: the configuration and its rules in ``config.py``; named shapes in
``presets.py``; one layer (``Block``) and the registry of layer kinds in ``block.py``; the kinds
themselves (attention and its variants, MLA, MoE, Mamba, multi-token prediction) in ``blocks/``;
norms, position tables and the dense MLP in ``layers.py``. This module builds the stack, runs it,
and accounts for it (parameters, FLOPs, cache bytes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from scratchlm.models.block import Block
from scratchlm.models.blocks.moe import MoE
from scratchlm.models.blocks.mtp import MTP
from scratchlm.models.config import GPTConfig
from scratchlm.models.layers import alibi_slopes, make_norm, rope_tables, sinusoidal_table


class GPT(nn.Module):
    activation_checkpointing = False  # recompute each block's activations in backward to save memory

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.block_size, c.d_model) if c.position == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c, layer) for layer in range(c.n_layer))
        self.norm_f = make_norm(c.norm, c.d_model, c.norm_eps, c.bias) if c.prenorm else nn.Identity()
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one matrix reads tokens in and writes them out
        self.mtp = MTP(c) if c.mtp is not None else None
        if c.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(c.block_size, c.d_model), persistent=False)
        if c.position == "rope":
            cos, sin = rope_tables(c.block_size, c.head_dim, c.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if c.position == "alibi":
            self.register_buffer("alibi", alibi_slopes(c.n_head), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight", "mamba.out_proj.weight")):
                # Each block adds to the residual stream twice: keep its variance from growing with depth.
                nn.init.normal_(p, 0.0, c.init_std / math.sqrt(2 * c.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, self.config.init_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache=None,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        return_hidden: bool = False,
        documents: torch.Tensor | None = None,
    ):
        """Logits (B, T, V) for ids (B, T), and the mean cross-entropy if ``targets`` are given.

        With a :class:`~scratchlm.generate.kv_cache.KVCache` the ids are the *new* positions, after
        ``cache.length`` cached ones. ``last_only`` computes logits for the final position only.
        Targets equal to -1 are ignored by the loss.

        The inference engine packs several sequences into one row: it passes each token's own
        ``positions`` (T,), a paged ``cache`` that knows which tokens belong together, and
        ``logits_at``, the indices of the tokens whose next-token logits it needs.

        ``return_hidden`` adds a third result: the final hidden states (B, T, C), after the last
        norm, for every position (the input of the reward model's and the value head's scalar).

        ``documents`` (B, T) packs several short sequences into each row (SFT's packing): a token
        attends only to earlier tokens of its own document, and positions restart at 0 at each
        document, so every document is computed exactly as if it were alone in its row.
        """
        B, T = idx.shape
        packed_mask = None
        if documents is not None:
            if cache is not None or positions is not None:
                raise ValueError(
                    "documents (packed rows) are for training: no cache and no positions with them"
                )
            if self.config.block_size < T:
                raise ValueError(
                    f"a packed row of {T} positions exceeds the context length {self.config.block_size}"
                )
            positions, packed_mask = packing(
                documents, self.alibi if self.config.position == "alibi" else None
            )
        elif positions is None:
            start = cache.length if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(
                    f"sequence of {start + T} positions exceeds the context length {self.config.block_size}"
                )
            positions = torch.arange(start, start + T, device=idx.device)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.config.embed_scale:  # Gemma: rows of unit-ish size; the tied head reads the unscaled matrix
            x = x * x.new_tensor(self.config.d_model**0.5)  # rounded to x's dtype, as Hugging Face does
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif self.config.position == "sinusoidal":
            x = x + self.sinusoid[positions]
        x = self.drop(x)
        attn_kwargs = {"cache": cache, "positions": positions}  # positions: (T,) or (B, T) if packed
        if packed_mask is not None:
            attn_kwargs["packed_mask"] = packed_mask  # built once, used by every layer
        if self.config.position == "rope":
            cos, sin = (
                self.rope_cos[positions],
                self.rope_sin[positions],
            )  # (T, D) each, or (B, T, D) if packed
            attn_kwargs["rope"] = (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])
        if self.config.position == "alibi":
            attn_kwargs["alibi"] = self.alibi
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, layer=i, **attn_kwargs)
            else:
                x = block(x, layer=i, **attn_kwargs)
        if cache is not None and not cache.paged:
            cache.advance(T)
        x = hidden = self.norm_f(x)
        if last_only:
            x = x[:, -1:, :]
        elif logits_at is not None:
            x = x[:, logits_at, :]
        logits = self.logits(x)  # (B, T, V)
        if self.mtp is not None:  # multi-token prediction: λ·L_MTP, an aux_loss while training with targets
            training = self.training and targets is not None
            self.mtp.aux_loss = self.mtp.loss(self, hidden, idx, targets, documents) if training else None
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
            # auxiliary losses (MoE load balancing) train the model; evaluation reports plain CE
            if self.training:
                loss = loss + self.auxiliary_loss()
        return (logits, loss, hidden) if return_hidden else (logits, loss)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final hidden states: the output head (and Gemma-2's soft cap,
        which keeps logits within (-c, c), smoothly). Every head that shares lm_head goes through here."""
        logits = self.lm_head(hidden)
        if self.config.final_softcap is not None:
            logits = self.config.final_softcap * torch.tanh(logits / self.config.final_softcap)
        return logits

    def auxiliary_loss(self) -> torch.Tensor | float:
        """The sum of the ``aux_loss`` that blocks (MoE routers, MTP) left from the last forward,
        taken: each is cleared once read (a loss is counted once, and a model holding no graph
        tensors can be copied, e.g. for a reference model)."""
        total = 0.0
        for module in self.modules():
            aux = getattr(module, "aux_loss", None)
            if module is not self and torch.is_tensor(aux):
                total = total + aux
                module.aux_loss = None
        return total

    def after_optimizer_step(self) -> dict[str, torch.Tensor]:
        """Let blocks update state that is not trained by gradients (e.g. DeepSeek-V3's
        loss-free balancing bias); the trainer calls this after every optimizer step and logs
        the metrics (scalar tensors) the blocks return, e.g. how balanced the experts were."""
        metrics = {}
        for module in self.modules():
            if module is not self and hasattr(module, "after_optimizer_step"):
                metrics.update(module.after_optimizer_step() or {})
        if self.mtp is not None:  # the multi-token-prediction losses of the step's last forward
            metrics.update({k: v.detach() for k, v in self.mtp.metrics().items()})
        return metrics

    def set_dropout(self, p: float) -> None:
        """Set every dropout of the model to ``p``: the ``nn.Dropout`` layers and the attention
        weights' dropout. Preference learning and RL train with ``p = 0``: the log-probabilities
        they compare (policy vs reference, new vs old) must not differ by a random mask."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            if isinstance(getattr(module, "dropout", None), float):  # a mixer's attention-weight dropout
                module.dropout = p

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int, known: int | None = None) -> None:
        """Rows for new token ids (chat special tokens, say): grow the embedding (and output) matrix
        to ``vocab_size`` rows, and initialise rows ``known ... vocab_size-1`` afresh.

        ``known`` is how many ids carry meaning (default: the current row count; smaller when the
        table was padded, as GPT-2's 50257 ids in 50304 rows: new ids then land in untrained padding
        rows, which are re-initialised too). Rows below ``known`` keep their values, so every id the
        model learned keeps its meaning. A new row starts at the *mean* of the known rows (as
        ``transformers``' ``resize_token_embeddings`` does: a random row can have a large dot
        product with the final hidden state and make an untrained token likely; the mean scores
        like an average token), plus a little noise (1% of each dimension's spread, from a fixed
        seed): identical rows would give two new tokens identical logits forever wherever the
        rows themselves do not train (LoRA), and greedy decoding would always pick the lower id.
        The matrices are new parameters: grow before building an optimizer, never after.
        """
        old = self.config.vocab_size
        known = old if known is None else known
        if vocab_size < old or not 0 < known <= old:
            raise ValueError(
                f"can only grow the vocabulary: it has {old} rows ({known} known ids), asked for {vocab_size}"
            )
        if vocab_size == known:
            return
        generator = torch.Generator().manual_seed(vocab_size * 7919 + known)

        def grown(weight: torch.Tensor) -> nn.Parameter:
            base = weight[:known].float()
            noise = torch.randn(vocab_size - known, weight.shape[1], generator=generator).to(base.device)
            noise = noise * base.std(dim=0) * 0.01
            new = (base.mean(dim=0, keepdim=True) + noise).to(weight.dtype).to(weight.device)
            return nn.Parameter(torch.cat([weight[:known], new]), requires_grad=weight.requires_grad)

        self.tok_emb.weight = grown(self.tok_emb.weight)
        self.tok_emb.num_embeddings = vocab_size
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        else:
            self.lm_head.weight = grown(self.lm_head.weight)
        self.lm_head.out_features = vocab_size
        self.config = GPTConfig.from_dict({**self.config.to_dict(), "vocab_size": vocab_size})

    # --- accounting ---------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part (a tied lm_head is counted once, under embeddings).

        ``total`` is the model that generates: multi-token-prediction modules (``mtp``, used in
        training) are listed but not in it, as DeepSeek-V3's 671B leaves out its MTP module.
        ``active`` is what one token passes through: an MoE layer counts only ``top_k`` of its
        routed experts (and all of its shared experts and router).
        """
        parts = {
            "embeddings": 0,
            "positions": 0,
            "attention": 0,
            "ssm": 0,
            "mlp": 0,
            "norms": 0,
            "lm_head": 0,
            "mtp": 0,
        }
        seen = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if name.startswith("tok_emb"):
                parts["embeddings"] += p.numel()
            elif name.startswith("pos_emb"):
                parts["positions"] += p.numel()
            elif name.startswith("mtp."):
                parts["mtp"] += p.numel()
            elif ".mamba." in name:
                parts["ssm"] += p.numel()
            elif ".attn." in name:
                parts["attention"] += p.numel()
            elif ".mlp." in name:
                parts["mlp"] += p.numel()
            elif "norm" in name:
                parts["norms"] += p.numel()
            elif name.startswith("lm_head"):
                parts["lm_head"] += p.numel()
        parts["total"] = sum(v for k, v in parts.items() if k != "mtp")
        parts["active"] = parts["total"] - _idle_experts(self.blocks)
        return parts

    def flops_per_token(self, context: int | None = None) -> dict[str, float]:
        """Approximate FLOPs per token at ``context`` (default: full context).

        Matrix multiplies cost 2 FLOPs per weight per token forward (4 more backward), so a
        training step costs ``6 N`` per token plus 3x the mixers' own work over the context, and
        inference ``2 N`` plus that work once (the PaLM appendix estimate). ``N`` counts the
        *active* weights (an MoE token visits top_k experts), without position tables and an
        untied input embedding (looked up or added, not multiplied). Full attention's own work is ``4 · heads · head width · context`` per
        layer (scores and the weighted sum); each mixer kind says its own (``context_flops``):
        a sliding window caps the context, MLA has its own head widths, an SSM has no context term.
        """
        T = context or self.config.block_size
        counts = self.parameter_counts()
        n = counts["active"] - counts["positions"]
        # the input embedding is a lookup; a tied one is also the output matmul
        if not self.config.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        mixing = sum(context_flops(block.mixer, T) for block in self.blocks)
        flops = {"train": 6 * n + 3 * mixing, "forward": 2 * n + mixing}
        if self.mtp is not None:  # training also runs the MTP modules, each ending in the shared head
            blocks = [m for m in self.mtp.modules() if isinstance(m, Block)]
            mtp = counts["mtp"] - _idle_experts(blocks) + len(blocks) * self.lm_head.weight.numel()
            flops["train"] += 6 * mtp + 3 * sum(context_flops(b.mixer, T) for b in blocks)
        return flops

    def state_bytes_per_sequence(self, bytes_per_value: int = 2) -> int:
        """Cache bytes a sequence holds whatever its length: a state-space layer's recurrent state."""
        return bytes_per_value * sum(
            getattr(block.mixer, "state_values_per_sequence", lambda: 0)() for block in self.blocks
        )

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Cache bytes each token adds, summed over layers (each mixer says what it keeps: k and v,
        a compressed latent, or nothing per token for a state-space layer)."""
        return bytes_per_value * sum(block.mixer.cache_values_per_token() for block in self.blocks)


def packing(documents: torch.Tensor, alibi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention mask of packed rows: (B, T) document ids -> each token's position
    within its document (0 at each document's first token), and the (B, 1, T, T) mask that lets a
    token see earlier tokens of its own document only — boolean, or with ALiBi an additive float
    (B, H, T, T) bias. A document is a run of equal ids: an id that comes back later starts a new
    document."""
    B, T = documents.shape
    index = torch.arange(T, device=documents.device).expand(B, T)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    segments = starts.long().cumsum(dim=1)  # contiguous runs, whatever the ids
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # each token's run start
    same = segments[:, None, :, None] == segments[:, None, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    mask = same & causal  # (B, 1, T, T); a token always sees itself: no row is empty
    if alibi is not None:
        distance = (index[:, :, None] - index[:, None, :]).clamp_min(0)[:, None].float()  # (B, 1, T, T)
        mask = torch.where(mask, -alibi.float()[None, :, None, None] * distance, float("-inf"))
    return index - first, mask


def _idle_experts(blocks) -> int:
    """Parameters of the routed experts a token does not visit: (1 - top_k / E) of each MoE's experts."""
    idle = 0.0
    for block in blocks:
        if isinstance(block.mlp, MoE):
            m = block.mlp.config
            routed = sum(p.numel() for n, p in block.mlp.named_parameters() if n.startswith("experts_"))
            idle += routed * (1 - m.top_k / m.n_experts)
    return round(idle)


def context_flops(mixer: nn.Module, context: int) -> float:
    """Forward FLOPs per token a mixer spends over the context (beyond its weight matrices)."""
    if hasattr(mixer, "context_flops"):
        return mixer.context_flops(context)
    seen = min(context, mixer.window) if getattr(mixer, "window", None) else context
    return 4 * mixer.n_head * mixer.head_dim * seen  # q·k for every key, then the weighted sum of values
