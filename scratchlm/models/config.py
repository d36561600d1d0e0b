"""The model's configuration: ``GPTConfig``, the rules its values obey, and the layer pattern.

``GPTConfig`` switches cover GPT-2 and Llama-style models and the variants between them:
positions (learned, sinusoidal, RoPE, ALiBi, none), LayerNorm or RMSNorm, pre- or post-norm,
GELU / GELU-tanh / SwiGLU / GeGLU / ReLU² MLPs, biases, tied embeddings, dropout, grouped KV heads,
and fused (SDPA), spelled-out or tiled attention. One model, not copies.

Modern architectures change what a layer is made of, not the stack: ``layers`` is a short pattern
of block kinds (see ``models/block.py``, the registry this module validates against), and each
kind owns its few settings in its own table (``[model.attn]``, ``[model.moe]``, ``[model.mla]``,
...), so the config does not grow a flag for every switch. Checks that involve several values run in
``__post_init__`` and name the keys to change. Presets and the ``[model]`` table reader are in
``models/presets.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from scratchlm.config import ConfigError, Rule, validate
from scratchlm.models.block import KIND_TABLES, LAYER_MLPS, MIXERS
from scratchlm.models.blocks.attention import AttentionConfig, move_legacy_keys
from scratchlm.models.blocks.diff_attention import DiffConfig
from scratchlm.models.blocks.mamba import MambaConfig
from scratchlm.models.blocks.mla import MLAConfig
from scratchlm.models.blocks.moe import MoEConfig
from scratchlm.models.blocks.mtp import MTPConfig
from scratchlm.models.blocks.sparse_attention import NSAConfig

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu", "geglu", "relu2")
_MODEL_RULES = {
    "vocab_size": Rule(min=1),
    "n_layer": Rule(min=1),
    "n_head": Rule(min=1),
    "n_kv_head": Rule(min=1),
    "d_model": Rule(min=1),
    "d_ff": Rule(min=1),
    "block_size": Rule(min=1, why="context length"),
    "position": Rule(choices=POSITIONS),
    "rope_theta": Rule(above=0),
    "norm": Rule(choices=NORMS),
    "norm_eps": Rule(above=0),
    "mlp": Rule(choices=MLPS),
    "dropout": Rule(min=0, below=1),
    "attention": Rule(choices=("sdpa", "manual", "tiled")),
    "init_std": Rule(above=0),
    "final_softcap": Rule(above=0),
}
# Fields added for the block kinds: left out of a config's dict while unset (``attn``: while every
# setting in it is), so configs and checkpoints written before them read (and write) as they did.
_LAYER_FIELDS = (
    "layers",
    "attn",
    "moe",
    "mla",
    "diff",
    "nsa",
    "mamba",
    "mtp",
    "final_softcap",
    "sandwich_norm",
    "embed_scale",
)


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
    # e.g. ["sliding", "attention"], repeated to n_layer; None: all "attention"
    layers: list[str] | None = None
    # [model.attn], read by "attention" and "sliding" layers: the window, head width, Qwen's q/k/v
    # biases and q/k norms, Gemma-2's score scale and soft cap. Named ``attn`` (the layers' module
    # name, ``blocks.{i}.attn``) because ``attention`` above already names the kernel.
    attn: AttentionConfig | None = field(default_factory=AttentionConfig)
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    diff: DiffConfig | None = None
    nsa: NSAConfig | None = None
    mamba: MambaConfig | None = None
    mtp: MTPConfig | None = None  # multi-token prediction modules after the last layer
    # --- Gemma-style switches of the stack (docs/sliding-window-attention.md, "Gemma-2") ---
    final_softcap: float | None = None  # logits -> c·tanh(logits / c) (Gemma-2: 30); None: off
    # also norm each mixer's and MLP's output before the residual add (Gemma-2/3)
    sandwich_norm: bool | None = None
    # multiply token embeddings by sqrt(d_model) (Gemma), which a tied head cannot absorb
    embed_scale: bool | None = None

    def __post_init__(self):
        validate(self, "model", _MODEL_RULES)  # each value's type and range, naming the key
        if self.attn is None:
            self.attn = AttentionConfig()
        kinds = self.layer_kinds()  # checks the pattern
        used = {k for pair in kinds for k in pair}
        for kind, (name, table) in KIND_TABLES.items():
            if kind in used and getattr(self, name) is None:
                setattr(self, name, table())  # a kind used without its table gets the defaults
            elif kind not in used and getattr(self, name) is not None:  # e.g. [model.moe] but no "+moe" layer
                raise ConfigError(
                    f"model.{name} is set but no layer uses '{kind}': add it to model.layers "
                    f"(now {self.layers or ['attention']}), or remove model.{name}"
                )
        if self.attn.head_dim is None and self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model = {self.d_model} must be divisible by model.n_head = {self.n_head}"
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"model.n_head = {self.n_head} must be divisible by model.n_kv_head = {self.kv_heads}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.position = 'rope' needs an even head width; it is {self.head_dim}")
        self.attn.check({mixer for mixer, _ in kinds}, self.attention)  # [model.attn]: read, and computable
        if self.sandwich_norm and not self.prenorm:
            raise ConfigError(
                "model.sandwich_norm adds output norms to pre-norm blocks: it needs model.prenorm = true"
            )

    def layer_kinds(self) -> list[tuple[str, str]]:
        """(mixer, mlp) of every layer: ``layers`` repeated to ``n_layer`` (its length must divide
        ``n_layer``), each item "mixer" (dense MLP) or "mixer+mlp"."""
        return expand_layers(self.layers, self.n_layer)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        """Each attention head's width: ``[model.attn] head_dim``, else d_model / n_head."""
        return self.attn.head_dim if self.attn.head_dim is not None else self.d_model // self.n_head

    @property
    def ff_width(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp in ("swiglu", "geglu"):  # same parameter count as a 4x GELU MLP, rounded up to 64
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.attn.is_default():
            d["attn"] = None
        return {k: v for k, v in d.items() if not (k in _LAYER_FIELDS and v is None)}

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """A config from its dict (a checkpoint's ``model``, a ``[model]`` table). Dicts written
        before ``[model.attn]`` existed carry its settings at the top level
        (``sliding_window``, ``d_head``, ...): they are moved into the table, silently (see
        ``presets.config_from_section`` for the notice a hand-written table gets)."""
        from scratchlm.config import dataclass_from_dict

        return dataclass_from_dict(cls, move_legacy_keys(d)[0], "model")


def expand_layers(layers: list[str] | None, n_layer: int) -> list[tuple[str, str]]:
    """The (mixer, mlp) of each of ``n_layer`` layers for a ``layers`` pattern (see GPTConfig.layers)."""
    pattern = layers if layers is not None else ["attention"]
    if not pattern or n_layer % len(pattern):
        raise ConfigError(
            f"model.layers has {len(pattern)} items; it must be non-empty and its length must divide "
            f"model.n_layer = {n_layer} (it repeats), or list every layer"
        )
    kinds = []
    for item in pattern:
        mixer, _, mlp = item.partition("+")
        mlp = mlp or "dense"
        if mixer not in MIXERS or mlp not in LAYER_MLPS:
            raise ConfigError(
                f"model.layers item {item!r}: expected 'mixer' or 'mixer+mlp' with mixer one of "
                f"{', '.join(MIXERS)} and mlp one of {', '.join(LAYER_MLPS)}"
            )
        kinds.append((mixer, mlp))
    return kinds * (n_layer // len(kinds))
