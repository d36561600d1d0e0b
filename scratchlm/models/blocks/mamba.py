"""A selective state-space mixer: Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces"), the mixer of Mamba and of Jamba's SSM layers.

A state-space model carries a hidden state ``h`` of ``N = d_state`` numbers per channel through
time. The continuous system (eq. 1a–1b) is ``h'(t) = A h(t) + B x(t)``, ``y(t) = C h(t)``. With a
step size Δ and the zero-order hold (eq. 4, with Mamba's simplified B̄) it becomes a recurrence:

    Ā = exp(Δ A)            B̄ = Δ B                                              (eq. 4)
    h_t = Ā_t h_{t-1} + B̄_t x_t          y_t = C_t h_t                          (eq. 2a–2b)

*Selectivity* (section 3.2, Algorithm 2): Δ, B and C are functions of the input token, so the
model decides per token how much of the past to keep (large Δ: reset and read the new token;
small Δ: keep the state). A is a fixed diagonal matrix per channel (kept as ``A = -exp(A_log)``
so that ``Ā = exp(ΔA)`` lies in (0, 1) and the recurrence cannot blow up).

The mixer, as in the reference block (Figure 3):

    x ─► in_proj ─► (u, z)
         u ─► causal depthwise conv1d (d_conv taps) ─► SiLU
           ─► x_proj ─► (Δ_low, B, C)   [Jamba: RMSNorm on each]
           ─► Δ = softplus(dt_proj(Δ_low) + dt_bias)
           ─► selective scan  h_t = Ā_t h_{t-1} + B̄_t u_t,  y_t = C_t h_t + D u_t
         y · SiLU(z) ─► out_proj

Two scans compute the same recurrence: :func:`selective_scan_sequential`, one step per token
(the readable reference, and what decoding runs), and :func:`selective_scan_chunked`, the fast
path: a parallel prefix scan inside chunks of positions, the state carried sequentially from
chunk to chunk. They agree within 1e-5 (forward and gradients; tests/models/blocks/test_mamba.py).

For decoding the "cache" is the recurrent state, O(1) per sequence whatever its length: the
last ``d_conv - 1`` conv inputs and ``h`` (``d_inner x d_state``), kept in ``cache.state(layer)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from scratchlm.config import Rule, validate
from scratchlm.models.layers import RMSNorm


@dataclass
class MambaConfig:
    d_state: int = 16  # N: state numbers per channel
    d_conv: int = 4  # taps of the causal depthwise convolution before the scan
    expand: int = 2  # d_inner = expand x d_model channels inside the mixer
    dt_rank: int | None = None  # width of Δ's low-rank projection; None: ceil(d_model / 16)
    conv_bias: bool = True  # bias on the convolution (HF use_conv_bias / mamba_conv_bias)
    proj_bias: bool = False  # bias on in_proj and out_proj (HF use_bias / mamba_proj_bias)
    dt_bc_norm: bool = False  # Jamba: RMSNorm on Δ_low, B and C before they are used
    scan: str = "auto"  # sequential (the readable reference) | chunked (parallel within chunks) | auto: chunked on GPUs
    chunk: int = 64  # positions per chunk of the chunked scan

    def __post_init__(self):
        validate(
            self,
            "model.mamba",
            {
                "d_state": Rule(min=1),
                "d_conv": Rule(min=1),
                "expand": Rule(min=1),
                "dt_rank": Rule(min=1),
                "scan": Rule(choices=("auto", "chunked", "sequential")),
                "chunk": Rule(min=1, why="positions per chunk"),
            },
        )


# --- the selective scan -----------------------------------------------------------------------
# Shapes: x, dt (batch, T, D) with D = d_inner channels; A (D, N); B, C (batch, T, N); state (batch, D, N).


def selective_scan_sequential(x, dt, A, B, C, state=None):
    """The recurrence of eq. 2a–2b, one position at a time. Returns y (batch, T, D) and the last state."""
    batch, T, D = x.shape
    h = x.new_zeros(batch, D, A.shape[1]) if state is None else state
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t, :, None] * A)  # Ā_t = exp(Δ_t A): (batch, D, N)
        drive = (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]  # B̄_t x_t = Δ_t B_t x_t
        h = decay * h + drive
        ys.append((h * C[:, t, None, :]).sum(-1))  # y_t = C_t h_t
    return torch.stack(ys, dim=1), h


def _prefix_scan(decay, drive):
    """All states of ``h_t = decay_t h_{t-1} + drive_t`` (h_{-1} = 0) along dim 1, in log2(L) rounds
    (Hillis & Steele 1986). Two steps compose into one: (a₂, b₂) after (a₁, b₁) = (a₂a₁, a₂b₁ + b₂),
    so after the round with offset k each position summarises its last 2k steps.

    Only products of decays (each in (0, 1]) are formed, never their inverses: no overflow, and no
    precision lost to differences of large cumulative log-decays."""
    L, k = decay.shape[1], 1
    while k < L:
        drive = torch.cat([drive[:, :k], drive[:, k:] + decay[:, k:] * drive[:, :-k]], dim=1)
        if 2 * k < L:  # the last round's composed decays would not be read
            decay = torch.cat([decay[:, :k], decay[:, k:] * decay[:, :-k]], dim=1)
        k *= 2
    return drive


def _scan_chunk(x, dt, A, B, C, h):
    """One chunk of the recurrence from state ``h``: its outputs (batch, L, D) and last state."""
    decay = torch.exp(dt[..., None] * A)  # (batch, L, D, N)
    drive = (dt * x)[..., None] * B[:, :, None, :]
    # the state carried in enters through the first step: h_0 = Ā_0 h_in + B̄_0 x_0
    drive = torch.cat([drive[:, :1] + decay[:, :1] * h[:, None], drive[:, 1:]], dim=1)
    states = _prefix_scan(decay, drive)  # (batch, L, D, N)
    # y_t = C_t h_t, elementwise (a matmul here would run in bf16 under autocast; the scan is float32)
    return (states * C[:, :, None, :]).sum(-1), states[:, -1]


def selective_scan_chunked(x, dt, A, B, C, state=None, chunk: int = 64):
    """The same recurrence, a chunk of positions at a time: inside a chunk every state comes from
    a parallel prefix scan; the last state carries into the next chunk. The parallel part
    materialises (batch, chunk, D, N) states, log2(chunk) times over; in training each chunk is
    recomputed in the backward pass (activation checkpointing), so what is kept for backward is
    the inputs and one state per chunk, not every position's state."""
    batch, T, D = x.shape
    h = x.new_zeros(batch, D, A.shape[1]) if state is None else state
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, h))
    ys = []
    for start in range(0, T, chunk):
        part = slice(start, start + chunk)
        args = (x[:, part], dt[:, part], A, B[:, part], C[:, part], h)
        if training:
            y, h = torch.utils.checkpoint.checkpoint(_scan_chunk, *args, use_reentrant=False)
        else:
            y, h = _scan_chunk(*args)
        ys.append(y)
    return torch.cat(ys, dim=1), h


# --- the mixer ---------------------------------------------------------------------------------
class Mamba(nn.Module):
    """The selective SSM mixer (Algorithm 2), with the mixer protocol of :mod:`scratchlm.models.gpt`."""

    kv_cache = False  # its cache is a recurrent state, kept in ``cache.state(layer)``
    # Not weight matrices: log-decay rates, the skip gain and Δ's bias. The optimizers leave them
    # out of weight decay and of Muon (decay would pull every A toward -1, erasing the 1..N spread).
    no_weight_decay = ("A_log", "D", "dt_bias")

    def __init__(self, config, layer: int):
        super().__init__()
        m: MambaConfig = config.mamba
        self.config = m
        self.d_inner = m.expand * config.d_model
        self.dt_rank = m.dt_rank or math.ceil(config.d_model / 16)
        D, N, R = self.d_inner, m.d_state, self.dt_rank
        self.in_proj = nn.Linear(config.d_model, 2 * D, bias=m.proj_bias)  # u and the gate z
        self.conv1d = nn.Conv1d(
            D, D, m.d_conv, groups=D, bias=m.conv_bias
        )  # depthwise: one filter per channel
        self.x_proj = nn.Linear(D, R + 2 * N, bias=False)  # the selection: Δ_low, B, C from each token
        self.dt_proj = nn.Linear(R, D, bias=False)
        # Δ's bias is its own parameter (HF: dt_proj.bias) so the model's generic Linear init, which
        # zeroes biases, leaves it alone: it sets the initial step sizes (below).
        self.dt_bias = nn.Parameter(torch.empty(D))
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(D, 1)
        )  # S4D-real: A = -(1..N)
        self.D = nn.Parameter(torch.ones(D))  # the skip connection y += D x
        self.out_proj = nn.Linear(D, config.d_model, bias=m.proj_bias)
        if m.dt_bc_norm:  # Jamba: keeps Δ, B, C in range in a deep hybrid stack
            self.dt_norm, self.b_norm, self.c_norm = (
                RMSNorm(R, config.norm_eps),
                RMSNorm(N, config.norm_eps),
                RMSNorm(N, config.norm_eps),
            )
        with (
            torch.no_grad()
        ):  # initial Δ log-uniform in [1e-3, 1e-1]: bias = softplus⁻¹(Δ) = Δ + log(1 - e^-Δ)
            dt = torch.exp(torch.rand(D) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(
        self, x, *, rope=None, alibi=None, cache=None, layer: int = 0, packed_mask=None, positions=None
    ) -> torch.Tensor:
        if packed_mask is not None:
            raise ValueError(
                "the Mamba mixer does not take packed rows (documents): its state would carry from one "
                "document into the next; train it on unpacked rows"
            )
        if cache is not None and cache.paged:
            raise ValueError(
                "the Mamba mixer keeps a recurrent state, not keys and values: the engine's paged cache "
                "cannot hold it; generate with scratchlm.generate (KVCache) instead"
            )
        m, K = self.config, self.config.d_conv
        batch, T, _ = x.shape
        store = cache.state(layer) if cache is not None else {}
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (batch, T, D) each

        # Causal depthwise convolution: each channel mixes its last K inputs. The K - 1 inputs
        # before this call come from the cache (zeros at the start of a sequence).
        u = u.transpose(1, 2)  # (batch, D, T): Conv1d's layout
        past = store.get("conv")
        if past is None:
            past = u.new_zeros(batch, self.d_inner, K - 1)
        u = torch.cat([past, u], dim=2)
        if cache is not None:
            store["conv"] = u[
                :, :, u.shape[2] - (K - 1) :
            ].clone()  # a copy: a view would keep all of u alive
        u = F.silu(F.conv1d(u, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)).transpose(1, 2)

        # Selection: Δ, B, C from each token (section 3.2)
        dt, B, C = self.x_proj(u).split([self.dt_rank, m.d_state, m.d_state], dim=-1)
        if m.dt_bc_norm:
            dt, B, C = self.dt_norm(dt), self.b_norm(B), self.c_norm(C)
        work = torch.promote_types(
            x.dtype, torch.float32
        )  # the scan runs in float32 at least (bf16 training)
        dt = F.softplus(self.dt_proj(dt).to(work) + self.dt_bias.to(work))  # Δ > 0: (batch, T, D)
        A = -torch.exp(self.A_log.to(work))  # (D, N), negative: Ā = exp(ΔA) in (0, 1)

        state = store.get("ssm")
        u_work, B, C = u.to(work), B.to(work), C.to(work)
        # A parallel scan does more work than the loop (log2(chunk) passes over (batch, chunk, D, N)
        # states) to need fewer sequential steps: that pays where many cores wait on each step (a
        # GPU), not on a CPU, where the loop over (batch, D, N) states measured 2-14x faster at
        # training shapes (docs/mamba-jamba.md). "auto" picks by device.
        chunked = m.scan == "chunked" or (m.scan == "auto" and x.device.type != "cpu")
        if not chunked or T == 1:
            y, state = selective_scan_sequential(u_work, dt, A, B, C, state)
        else:
            y, state = selective_scan_chunked(u_work, dt, A, B, C, state, m.chunk)
        if cache is not None:
            store["ssm"] = state.clone()  # (a view into the last chunk's states otherwise)
        y = (y + u_work * self.D.to(work)).to(x.dtype)  # y_t = C_t h_t + D x_t
        return self.out_proj(y * F.silu(z))  # the gate: y · SiLU(z)

    def context_flops(self, context: int) -> float:
        """Forward FLOPs per token beyond the weight matrices, whatever the context: the causal
        convolution (2 per tap per channel) and the scan's update and read-out of h (about 6 per
        state number: Ā·h, + B̄x, C·h)."""
        return 2 * self.d_inner * self.config.d_conv + 6 * self.d_inner * self.config.d_state

    def cache_values_per_token(self) -> int:
        """Nothing grows with the sequence: the state is a fixed size (see state_values_per_sequence)."""
        return 0

    def state_values_per_sequence(self) -> int:
        """Values kept per sequence for decoding: the last d_conv - 1 conv inputs and h."""
        return self.d_inner * (self.config.d_conv - 1) + self.d_inner * self.config.d_state
