"""One config-driven decoder-only Transformer (checkpoints C and D).

``GPTConfig`` switches cover GPT-2 and Llama-style models and the variants between them:
positions (learned, sinusoidal, RoPE, ALiBi, none), LayerNorm or RMSNorm, pre- or post-norm,
GELU / GELU-tanh / SwiGLU / ReLU² MLPs, biases, tied embeddings, dropout, grouped KV heads, and
fused (SDPA) or spelled-out attention. One model, not copies.

The forward pass, top to bottom:

    ids (B, T) ─► token embedding (B, T, C) [+ position embedding]
               ─► n_layer × Block: x = x + attn(norm(x)); x = x + mlp(norm(x))     (pre-norm)
               ─► final norm ─► lm_head (B, T, V) logits ─► cross-entropy with targets

Modern architectures change what a layer is made of, not the stack: each layer picks a *mixer*
(how positions exchange information: attention of some kind, or a state-space model) and an *MLP*
(dense, or a mixture of experts) from ``GPTConfig.layers``, a short pattern such as Jamba's
``["mamba", "mamba+moe", ...]`` or DeepSeek's ``["mla"] * 3 + ["mla+moe"] * 58``. Each block kind
lives in its own module under ``models/`` and owns its few settings in its own table
(``[model.moe]``, ``[model.mla]``, ...), so the config does not grow a flag for every switch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from scratchlm.config import ConfigError, Rule, validate
from scratchlm.models.diff_attention import DiffAttention, DiffConfig
from scratchlm.models.layers import MLP, Attention, alibi_slopes, make_norm, rope_tables, sinusoidal_table
from scratchlm.models.mamba import Mamba, MambaConfig
from scratchlm.models.mla import MLA, MLAConfig
from scratchlm.models.moe import MoE, MoEConfig
from scratchlm.models.mtp import MTP, MTPConfig
from scratchlm.models.sparse_attention import NativeSparseAttention, NSAConfig

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu", "geglu", "relu2")

# The block kinds a layer can pick (``GPTConfig.layers``): "mixer" or "mixer+mlp".
MIXERS = {
    "attention": lambda c, layer: Attention(c),  # full causal attention (MHA / GQA / MQA)
    "sliding": lambda c, layer: Attention(c, window=c.sliding_window),  # Mistral, Gemma-2's local layers
    "diff": DiffAttention,  # differential attention
    "mla": MLA,  # multi-head latent attention (DeepSeek-V2/V3)
    "nsa": NativeSparseAttention,  # native sparse attention
    "mamba": Mamba,  # selective state-space model
}
LAYER_MLPS = {"dense": lambda c, layer: MLP(c), "moe": MoE,
              "none": lambda c, layer: None}  # no MLP: the block is norm → mixer → residual (Mamba)
# The settings table each kind reads, created with its defaults when a layer uses the kind.
_KIND_TABLES = {"mla": ("mla", MLAConfig), "diff": ("diff", DiffConfig), "nsa": ("nsa", NSAConfig),
                "mamba": ("mamba", MambaConfig), "moe": ("moe", MoEConfig)}

_MODEL_RULES = {
    "vocab_size": Rule(min=1), "n_layer": Rule(min=1), "n_head": Rule(min=1), "n_kv_head": Rule(min=1),
    "d_model": Rule(min=1), "d_ff": Rule(min=1), "block_size": Rule(min=1, why="context length"),
    "position": Rule(choices=POSITIONS), "rope_theta": Rule(above=0), "norm": Rule(choices=NORMS),
    "norm_eps": Rule(above=0), "mlp": Rule(choices=MLPS), "dropout": Rule(min=0, below=1),
    "attention": Rule(choices=("sdpa", "manual", "tiled")), "init_std": Rule(above=0),
    "sliding_window": Rule(min=1, why="keys each query sees in a sliding layer, itself included"),
    "d_head": Rule(min=1, why="attention head width"), "attn_scale": Rule(above=0),
    "attn_softcap": Rule(above=0), "final_softcap": Rule(above=0),
}
# Fields added for the block kinds: left out of a config's dict while unset, so configs and
# checkpoints written before them read (and write) exactly as they did.
_LAYER_FIELDS = ("layers", "sliding_window", "moe", "mla", "diff", "nsa", "mamba", "mtp", "qkv_bias", "qk_norm",
                 "d_head", "attn_scale", "attn_softcap", "final_softcap", "sandwich_norm", "embed_scale")


@dataclass
class GPTConfig:
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: MQA; in between: GQA
    d_model: int = 128
    d_ff: int | None = None  # MLP width; None: 4·d_model, or ~8/3·d_model for SwiGLU
    block_size: int = 64  # context length
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    prenorm: bool = True
    mlp: str = "gelu"
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention: str = "sdpa"  # sdpa | manual | tiled (FlashAttention's online softmax, in PyTorch)
    init_std: float = 0.02
    # --- the layer pattern and the block kinds' own settings ---
    layers: list[str] | None = None  # e.g. ["sliding", "attention"], repeated to n_layer; None: all "attention"
    sliding_window: int | None = None  # for "sliding" layers
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    diff: DiffConfig | None = None
    nsa: NSAConfig | None = None
    mamba: MambaConfig | None = None
    mtp: MTPConfig | None = None  # multi-token prediction modules after the last layer
    qkv_bias: bool | None = None  # biases on q, k, v but not the output projection (Qwen2); None: as bias
    qk_norm: bool | None = None  # RMSNorm each query and key head before RoPE (Qwen3); None: off
    # --- Gemma-style switches (docs/sliding-window-attention.md, "Gemma-2") ---
    d_head: int | None = None  # attention head width, free of d_model (Gemma-2: 256); None: d_model / n_head
    attn_scale: float | None = None  # multiplies q·k before the softmax (Gemma-2: query_pre_attn_scalar^-1/2); None: head width^-1/2
    attn_softcap: float | None = None  # attention scores -> c·tanh(scores / c) before the mask (Gemma-2: 50); None: off
    final_softcap: float | None = None  # logits -> c·tanh(logits / c) (Gemma-2: 30); None: off
    sandwich_norm: bool | None = None  # also norm each mixer's and MLP's output before the residual add (Gemma-2/3)
    embed_scale: bool | None = None  # multiply token embeddings by sqrt(d_model) (Gemma), which a tied head cannot absorb

    def __post_init__(self):
        validate(self, "model", _MODEL_RULES)  # each value's type and range, naming the key
        kinds = self.layer_kinds()  # checks the pattern
        used = {k for pair in kinds for k in pair}
        for kind, (name, table) in _KIND_TABLES.items():
            if kind in used and getattr(self, name) is None:
                setattr(self, name, table())  # a kind used without its table gets the defaults
            elif kind not in used and getattr(self, name) is not None:  # e.g. [model.moe] but no "+moe" layer
                raise ConfigError(f"model.{name} is set but no layer uses '{kind}': add it to model.layers "
                                  f"(now {self.layers or ['attention']}), or remove model.{name}")
        if "sliding" in used and self.sliding_window is None:
            raise ConfigError("model.layers has 'sliding' layers: set model.sliding_window (keys each query sees)")
        if "sliding" not in used and self.sliding_window is not None:
            raise ConfigError(f"model.sliding_window = {self.sliding_window} but no layer is 'sliding': add 'sliding' to "
                              "model.layers (e.g. [\"sliding\"] or [\"sliding\", \"attention\"]), or remove it")
        if self.d_head is None and self.d_model % self.n_head:
            raise ConfigError(f"model.d_model = {self.d_model} must be divisible by model.n_head = {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"model.n_head = {self.n_head} must be divisible by model.n_kv_head = {self.kv_heads}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.position = 'rope' needs an even head width; it is {self.head_dim}")
        self._check_gemma_switches({mixer for mixer, _ in kinds})

    def layer_kinds(self) -> list[tuple[str, str]]:
        """(mixer, mlp) of every layer: ``layers`` repeated to ``n_layer`` (its length must divide
        ``n_layer``), each item "mixer" (dense MLP) or "mixer+mlp"."""
        return expand_layers(self.layers, self.n_layer)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def _check_gemma_switches(self, mixers: set[str]) -> None:
        """Refuse the Gemma switches where nothing would read them (so none is silently ignored)."""
        scoring = [f"model.{name}" for name in ("attn_scale", "attn_softcap") if getattr(self, name) is not None]
        if scoring and not mixers & {"attention", "sliding"}:
            raise ConfigError(f"{' and '.join(scoring)} apply to 'attention' and 'sliding' layers only; model.layers has none")
        if scoring and mixers - {"attention", "sliding", "mamba"}:
            raise ConfigError(f"{' and '.join(scoring)} apply to 'attention' and 'sliding' layers only; "
                              f"model.layers also has {sorted(mixers - {'attention', 'sliding', 'mamba'})}")
        if self.attn_softcap is not None and self.attention == "tiled":
            raise ConfigError("model.attn_softcap needs every score at once: use model.attention = 'manual' or 'sdpa' "
                              "(which then runs the manual path), not 'tiled'")
        projections = [f"model.{name}" for name in ("qkv_bias", "qk_norm") if getattr(self, name)]
        if projections and mixers - {"attention", "sliding", "mamba"}:  # the Qwen switches live in Attention
            raise ConfigError(f"{' and '.join(projections)} apply to 'attention' and 'sliding' layers only; "
                              f"model.layers also has {sorted(mixers - {'attention', 'sliding', 'mamba'})}")
        if self.d_head is not None and "mla" in mixers:
            raise ConfigError("model.d_head does not apply to 'mla' layers: set the head widths in [model.mla]")
        if self.sandwich_norm and not self.prenorm:
            raise ConfigError("model.sandwich_norm adds output norms to pre-norm blocks: it needs model.prenorm = true")

    @property
    def head_dim(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_head

    @property
    def ff_width(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp in ("swiglu", "geglu"):  # same parameter count as a 4x GELU MLP, rounded up to 64
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if not (k in _LAYER_FIELDS and v is None)}

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        from scratchlm.config import dataclass_from_dict

        return dataclass_from_dict(cls, d, "model")


class Block(nn.Module):
    """A mixer then an MLP, each wrapped in a residual connection and a norm.

    The mixer is ``self.attn`` for every kind of attention (so checkpoints of plain models keep
    their tensor names) and ``self.mamba`` for the state-space mixer; ``self.mlp`` is dense, MoE, or
    None (mlp kind "none": Mamba's blocks are a norm and a mixer only).
    """

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        mixer_kind, mlp_kind = config.layer_kinds()[layer]
        self.prenorm = config.prenorm
        self.norm1 = make_norm(config.norm, config.d_model, config.norm_eps, config.bias)
        self.mixer_name = "mamba" if mixer_kind == "mamba" else "attn"
        self.add_module(self.mixer_name, MIXERS[mixer_kind](config, layer))
        self.norm2 = make_norm(config.norm, config.d_model, config.norm_eps, config.bias) if mlp_kind != "none" else None
        self.mlp = LAYER_MLPS[mlp_kind](config, layer)
        # Gemma-2's "sandwich": each sublayer's output is normalized too before it joins the residual stream
        sandwich = bool(config.sandwich_norm)
        self.post_norm1 = make_norm(config.norm, config.d_model, config.norm_eps, config.bias) if sandwich else None
        self.post_norm2 = make_norm(config.norm, config.d_model, config.norm_eps, config.bias) \
            if sandwich and self.mlp is not None else None
        self.resid_dropout = nn.Dropout(config.dropout)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    def forward(self, x, **attn_kwargs):
        mixer = self.mixer
        if self.prenorm:  # GPT-2, Llama: the residual stream itself is never normalized
            h = mixer(self.norm1(x), **attn_kwargs)
            x = x + self.resid_dropout(h if self.post_norm1 is None else self.post_norm1(h))
            if self.mlp is None:
                return x
            h = self.mlp(self.norm2(x))
            return x + (h if self.post_norm2 is None else self.post_norm2(h))
        # post-norm (the original Transformer): normalize after adding
        x = self.norm1(x + self.resid_dropout(mixer(x, **attn_kwargs)))
        return x if self.mlp is None else self.norm2(x + self.mlp(x))


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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None, last_only: bool = False,
                positions: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
                return_hidden: bool = False, documents: torch.Tensor | None = None):
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
                raise ValueError("documents (packed rows) are for training: no cache and no positions with them")
            if T > self.config.block_size:
                raise ValueError(f"a packed row of {T} positions exceeds the context length {self.config.block_size}")
            positions, packed_mask = packing(documents, self.alibi if self.config.position == "alibi" else None)
        elif positions is None:
            start = cache.length if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} positions exceeds the context length {self.config.block_size}")
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
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, D) each, or (B, T, D) if packed
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
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            if self.training:  # auxiliary losses (MoE load balancing) train the model; evaluation reports plain CE
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
            raise ValueError(f"can only grow the vocabulary: it has {old} rows ({known} known ids), asked for {vocab_size}")
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
        parts = {"embeddings": 0, "positions": 0, "attention": 0, "ssm": 0, "mlp": 0, "norms": 0, "lm_head": 0, "mtp": 0}
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
        if not self.config.tie_embeddings:  # the input embedding is a lookup; a tied one is also the output matmul
            n -= self.tok_emb.weight.numel()
        mixing = sum(_context_flops(block.mixer, T) for block in self.blocks)
        flops = {"train": 6 * n + 3 * mixing, "forward": 2 * n + mixing}
        if self.mtp is not None:  # training also runs the MTP modules, each ending in the shared head
            blocks = [m for m in self.mtp.modules() if isinstance(m, Block)]
            mtp = counts["mtp"] - _idle_experts(blocks) + len(blocks) * self.lm_head.weight.numel()
            flops["train"] += 6 * mtp + 3 * sum(_context_flops(b.mixer, T) for b in blocks)
        return flops

    def state_bytes_per_sequence(self, bytes_per_value: int = 2) -> int:
        """Cache bytes a sequence holds whatever its length: a state-space layer's recurrent state."""
        return bytes_per_value * sum(getattr(block.mixer, "state_values_per_sequence", lambda: 0)() for block in self.blocks)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Cache bytes each token adds, summed over layers (each mixer says what it keeps: k and v,
        a compressed latent, or nothing per token for a state-space layer)."""
        return bytes_per_value * sum(block.mixer.cache_values_per_token() for block in self.blocks)


PRESETS: dict[str, dict] = {
    # GPT-2 family (Radford et al. 2019): learned positions, LayerNorm, GELU-tanh, biases, tied.
    **{
        name: dict(vocab_size=50257, block_size=1024, n_layer=L, n_head=H, d_model=C, position="learned",
                   norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True, norm_eps=1e-5)
        for name, (L, H, C) in {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
                                "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}.items()
    },
    # Llama-style: RMSNorm, SwiGLU, RoPE, GQA, no biases.
    "llama-tiny": dict(vocab_size=32000, block_size=2048, n_layer=8, n_head=8, n_kv_head=2, d_model=512, d_ff=1408,
                       position="rope", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", bias=False, tie_embeddings=False),
    "llama3-1b": dict(vocab_size=128256, block_size=8192, n_layer=16, n_head=32, n_kv_head=8, d_model=2048,
                      d_ff=8192, position="rope", rope_theta=500000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                      bias=False, tie_embeddings=True),
    # Modern open models at their published shapes (build them on the meta device: `scratchlm
    # model info --preset deepseek-v3` counts 671B parameters without allocating any).
    "mixtral-8x7b": dict(vocab_size=32000, block_size=32768, n_layer=32, n_head=32, n_kv_head=8, d_model=4096,
                         d_ff=14336, position="rope", rope_theta=1e6, norm="rmsnorm", mlp="swiglu", bias=False,
                         tie_embeddings=False, layers=["attention+moe"], moe=dict(n_experts=8, top_k=2)),
    **{
        name: dict(vocab_size=vocab, block_size=4096, n_layer=L, n_head=H, d_model=C, d_ff=F, position="rope",
                   norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", bias=False, tie_embeddings=False,
                   layers=["mla"] * dense + ["mla+moe"] * (L - dense),
                   mla=dict(q_lora_rank=q_rank, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
                   moe=moe, **extra)
        for name, (vocab, L, H, C, F, dense, q_rank, moe, extra) in {
            "deepseek-v2-lite": (102400, 27, 16, 2048, 10944, 1, None,
                                 dict(n_experts=64, top_k=6, d_expert=1408, n_shared=2, d_shared=2816, normalize=False), {}),
            "deepseek-v2": (102400, 60, 128, 5120, 12288, 1, 1536,
                            dict(n_experts=160, top_k=6, d_expert=1536, n_shared=2, d_shared=3072, normalize=False,
                                 n_groups=8, topk_groups=3, routed_scale=16.0), {}),
            "deepseek-v3": (129280, 61, 128, 7168, 18432, 3, 1536,
                            dict(n_experts=256, top_k=8, d_expert=2048, n_shared=1, d_shared=2048, router="sigmoid",
                                 n_groups=8, topk_groups=4, group_score="top2", routed_scale=2.5, balance="bias",
                                 seq_aux_weight=1e-4), dict(mtp=dict(depth=1))),
        }.items()
    },
    # Jamba v0.1: Mamba layers, attention (no positions) every 8th layer at offset 4, MoE every 2nd.
    "jamba-v0.1": dict(vocab_size=65536, block_size=4096, n_layer=32, n_head=32, n_kv_head=8, d_model=4096, d_ff=14336,
                       position="none", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", bias=False, tie_embeddings=False,
                       layers=["mamba", "mamba+moe", "mamba", "mamba+moe", "attention", "mamba+moe", "mamba", "mamba+moe"],
                       mamba=dict(d_state=16, d_conv=4, expand=2, dt_rank=256, dt_bc_norm=True),
                       moe=dict(n_experts=16, top_k=2, normalize=False)),
    # Tiny CPU models for character-level Shakespeare.
    "nanogpt-cpu": dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, d_model=128, position="learned",
                        norm="layernorm", mlp="gelu", bias=False, tie_embeddings=True),
    "shakespeare-char": dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, d_model=128, position="rope",
                             norm="rmsnorm", mlp="relu2", bias=False, tie_embeddings=True),
}


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


def expand_layers(layers: list[str] | None, n_layer: int) -> list[tuple[str, str]]:
    """The (mixer, mlp) of each of ``n_layer`` layers for a ``layers`` pattern (see GPTConfig.layers)."""
    pattern = layers if layers is not None else ["attention"]
    if not pattern or n_layer % len(pattern):
        raise ConfigError(f"model.layers has {len(pattern)} items; it must be non-empty and its length must divide "
                          f"model.n_layer = {n_layer} (it repeats), or list every layer")
    kinds = []
    for item in pattern:
        mixer, _, mlp = item.partition("+")
        mlp = mlp or "dense"
        if mixer not in MIXERS or mlp not in LAYER_MLPS:
            raise ConfigError(f"model.layers item {item!r}: expected 'mixer' or 'mixer+mlp' with mixer one of "
                              f"{', '.join(MIXERS)} and mlp one of {', '.join(LAYER_MLPS)}")
        kinds.append((mixer, mlp))
    return kinds * (n_layer // len(kinds))


def _idle_experts(blocks) -> int:
    """Parameters of the routed experts a token does not visit: (1 - top_k / E) of each MoE's experts."""
    idle = 0.0
    for block in blocks:
        if isinstance(block.mlp, MoE):
            m = block.mlp.config
            routed = sum(p.numel() for n, p in block.mlp.named_parameters() if n.startswith("experts_"))
            idle += routed * (1 - m.top_k / m.n_experts)
    return round(idle)


def _context_flops(mixer: nn.Module, context: int) -> float:
    """Forward FLOPs per token a mixer spends over the context (beyond its weight matrices)."""
    if hasattr(mixer, "context_flops"):
        return mixer.context_flops(context)
    seen = min(context, mixer.window) if getattr(mixer, "window", None) else context
    return 4 * mixer.n_head * mixer.head_dim * seen  # q·k for every key, then the weighted sum of values


def config_from_section(section: dict) -> GPTConfig:
    """A ``[model]`` table: an optional ``preset``, then the table's keys over the preset's. A block
    kind's own table (``[model.moe]``, ``--set model.moe.top_k=4``) updates the preset's table key
    by key rather than replacing it."""
    section = dict(section)
    name = section.pop("preset", None)
    merged = preset(name).to_dict() if name else {}
    for key, value in section.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both_tables else value
    if name and "layers" in section:  # a new pattern: the preset's settings for kinds it no longer uses go
        pattern = expand_layers(merged.get("layers"), merged.get("n_layer", GPTConfig.n_layer))
        used = {kind for pair in pattern for kind in pair}
        for kind, (table, _) in _KIND_TABLES.items():
            if kind not in used and table not in section:
                merged.pop(table, None)
        if "sliding" not in used and "sliding_window" not in section:
            merged.pop("sliding_window", None)
    return GPTConfig.from_dict(merged)


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
