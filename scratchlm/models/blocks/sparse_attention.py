"""Native Sparse Attention: three cheap views of the past, gated (sparse attention for long context).

Yuan et al. 2025 (DeepSeek), "Native Sparse Attention: Hardware-Aligned and Natively Trainable
Sparse Attention". Each query ``q_t`` reads the past through three branches and mixes them with
gates computed from the token itself (eq. 5):

    o_t = g_cmp · Attn(q_t, K̃cmp, Ṽcmp) + g_slc · Attn(q_t, K̃slc, Ṽslc) + g_win · Attn(q_t, K̃win, Ṽwin)

* **compressed** (eq. 7): every block of ``l`` keys, taken with stride ``d``, becomes one key
  ``φ(k_{id+1 .. id+l})``; φ is a small MLP over the block's keys plus a learned intra-block
  position encoding (and ψ the same for values). The query attends over the compressed keys of
  the blocks that are complete at or before its position.
* **selected** (eq. 8-12): the compressed branch's attention probabilities (eq. 8) score the
  selection blocks of ``l'`` tokens (eq. 9, read as the paper's text describes it: a compressed
  block votes for every selection block it overlaps, in proportion to the overlap; the printed
  double sum gives the same weights shifted by ``l' − d`` tokens, a slip corrected here — see
  :func:`overlap_matrix` and docs/sparse-attention.md); the scores are summed over the query heads
  of a GQA group (eq. 10) so the whole group shares one selection and a kernel loads each selected
  block once; the top ``n`` blocks (eq. 11), always including the initial block(s) and the local
  ones, are attended token by token (eq. 12), the query's own block causally.
* **sliding window**: the last ``w`` keys, the query itself included.

Following the paper, each branch has its own keys and values (shared ones let the branches learn
shortcuts through each other); the queries are shared.

Two implementations of the same function live here, and the tests hold them equal:

* :meth:`NativeSparseAttention.reference` spells every branch out as dense masked attention over
  all ``T`` keys (``T × T`` masks built from the selection) — slow, obviously right;
* :meth:`NativeSparseAttention.forward` never forms a ``T × T`` score: for each chunk of
  neighbouring queries and each KV group it loads once the blocks any of them selected (as the
  paper's kernel loads a block once for all heads of a group) and masks each query to its own
  ``n`` — or, when that union grows past ``_UNION_LIMIT · n`` blocks, gathers each query's own
  ``n`` — and it reads the window as one band of ``chunk + w - 1`` keys. Outside the compressed
  branch (``T / d`` keys per query), its work per query is bounded by ``n · l'`` and ``w``, not ``T``.

Eq. 9 is computed in ``O(N)`` per query (:func:`selection_scores`, a sliding sum in units of
``d``), not as a product with the ``N × S`` overlap matrix, which :func:`overlap_matrix` keeps as
the readable definition the tests compare against.

For decoding, a layer keeps its own store in ``cache.state(layer)`` (``kv_cache = False``): the
selected branch's k, v of every position, the window branch's last ``w - 1``, the compressed
keys and values of every complete block (each computed once, when its last token arrives) and
the compressed branch's raw k, v of the block still filling. Reusing the standard k, v rows is
impossible here: the three branches have three different k, v sets, and the compressed keys
would otherwise be recomputed from scratch at every step. The two stores that grow with the
sequence (selected k, v and compressed k, v) are preallocated for ``cache.max_len`` — the
selected one in whole blocks of ``l'`` — and written in place, so a decoding step reads them as
views and copies no history.

The mixer counts its blocks from the first token of the sequence it is given: with a cache, new
token ``i`` is at ``cache.length + i``; without one, at ``i`` (an MTP depth, whose ``positions``
start at ``k``, is a sequence of its own; RoPE already carries the offset). So ``positions`` must
be contiguous, and start at ``cache.length`` with a cache; anything else is refused.

The module runs past 400 lines because NSA is three attentions in one (compressed, selected,
sliding) with their gates, and each needs its spelled-out reference beside the efficient path
and its own decoding cache; split, a reader would lose the one place where they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import ConfigError, Rule, validate
from scratchlm.models.layers import apply_rope

BRANCHES = ("compressed", "selected", "window")
# queries handled together in the efficient path: they share one load of their selected blocks
_QUERY_CHUNK = 64
# A chunk reads the union of its queries' blocks while it holds at most this many times n blocks; beyond, each
# query gathers its own n (on a CPU a copied key costs ~50 multiply-adds, so the union wins up to several n).
_UNION_LIMIT = 8


@dataclass
class NSAConfig:
    compress_block: int = 32  # l: tokens summarised by one compressed key (eq. 7)
    # d: tokens between the starts of consecutive compressed blocks (d < l: overlap)
    compress_stride: int = 16
    select_block: int = 64  # l': tokens per selection block (eq. 11-12)
    select_count: int = 16  # n: selection blocks each GQA group reads, forced ones included (eq. 11)
    window: int = 512  # w: keys of the sliding branch, the query itself included
    initial_blocks: int = 1  # always-selected blocks at the start of the sequence
    local_blocks: int = 2  # always-selected most recent blocks, the query's own block included
    gate: str = "sigmoid"  # sigmoid: each branch gated on its own (eq. 5); softmax: the three gates sum to 1

    def __post_init__(self):
        validate(
            self,
            "model.nsa",
            {
                "compress_block": Rule(min=1),
                "compress_stride": Rule(min=1),
                "select_block": Rule(min=1),
                "select_count": Rule(min=1),
                "window": Rule(min=1, why="keys the sliding branch sees, itself included"),
                "initial_blocks": Rule(min=0),
                "local_blocks": Rule(min=0),
                "gate": Rule(choices=("sigmoid", "softmax")),
            },
        )
        l, d, ls = self.compress_block, self.compress_stride, self.select_block
        if l % d or ls % d:
            raise ConfigError(
                f"model.nsa.compress_stride = {d} must divide compress_block = {l} and select_block = "
                f"{ls} (the paper's condition for mapping compressed scores onto selection blocks, eq. 9)"
            )
        if self.initial_blocks + self.local_blocks > self.select_count:
            raise ConfigError(
                f"model.nsa.initial_blocks + local_blocks = {self.initial_blocks + self.local_blocks} "
                f"exceeds select_count = {self.select_count}: the forced blocks must fit in the selection"
            )


class Compressor(nn.Module):
    """φ of eq. 7: a block of ``l`` keys (or values), each plus a learned intra-block position
    vector, flattened (``l·D``) and mapped by a two-layer MLP of hidden width ``D`` to one vector
    (the paper does not give φ's shape; this is the smallest that sees every token of the block).
    Shared by all KV heads."""

    def __init__(self, block: int, head_dim: int):
        super().__init__()
        self.position = nn.Parameter(torch.randn(block, head_dim) * 0.02)  # intra-block position encoding
        self.up = nn.Linear(block * head_dim, head_dim)
        self.down = nn.Linear(head_dim, head_dim)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        """(..., N, l, D) blocks -> (..., N, D) compressed vectors."""
        return self.down(F.gelu(self.up((blocks + self.position).flatten(-2))))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where ``mask`` is true; a row with nothing visible gives zeros
    (the compressed branch before its first complete block), not NaN, and no NaN gradient."""
    work = torch.promote_types(scores.dtype, torch.float32)  # half precision is summed in float32
    filled = scores.to(work).masked_fill(~mask, torch.finfo(work).min)
    return (torch.softmax(filled, dim=-1) * mask).to(scores.dtype)


def overlap_matrix(
    n_compressed: int, n_selection: int, l: int, d: int, l_sel: int, device=None
) -> torch.Tensor:
    """Eq. 9 as a matrix, the readable definition: (N, S) tokens compressed block ``i``
    ([i·d, i·d + l)) shares with selection block ``j`` ([j·l', (j+1)·l')), in units of ``d``, so
    that ``p_slc = p_cmp @ M``; with ``l = l' = d`` it is the identity (p_slc = p_cmp).

    This is the overlap the paper's text describes; its printed double sum gives the same weights
    to blocks ``l' − d`` tokens earlier (docs/sparse-attention.md works an example). The forward
    pass uses :func:`selection_scores`, which needs no ``N × S`` matrix."""
    c0 = torch.arange(n_compressed, device=device)[:, None] * d
    s0 = torch.arange(n_selection, device=device)[None, :] * l_sel
    shared = (torch.minimum(c0 + l, s0 + l_sel) - torch.maximum(c0, s0)).clamp_min(0)
    return shared.float() / d


def selection_scores(p_cmp: torch.Tensor, n_selection: int, l: int, d: int, l_sel: int) -> torch.Tensor:
    """Eq. 9 in O(N) per query: (..., N) compressed probabilities -> (..., S) selection scores,
    equal to ``p_cmp @ overlap_matrix(N, S, l, d, l')`` (up to float rounding).

    Count in units of ``d`` tokens (``d`` divides ``l`` and ``l'``): compressed block ``i`` covers
    units ``i … i + l/d − 1`` and selection block ``j`` units ``j·l'/d … (j+1)·l'/d − 1``, so the
    overlap of the two, in units, is the number of units they share. Hence each unit ``u``
    collects the probabilities of the ``l/d`` compressed blocks that cover it (a sliding sum,
    ``p[u − l/d + 1] + … + p[u]``), and each selection block adds up its ``l'/d`` units."""
    per_block, per_selection = l // d, l_sel // d
    N, units = p_cmp.shape[-1], n_selection * per_selection
    covering = p_cmp.new_zeros(*p_cmp.shape[:-1], units)  # (..., units)
    for shift in range(per_block):  # unit u lies in blocks u, u − 1, …, u − l/d + 1 (those that exist)
        upto = min(units, N + shift)
        covering[..., shift:upto] += p_cmp[..., : upto - shift]
    return covering.unflatten(-1, (n_selection, per_selection)).sum(-1)


def as_blocks(k: torch.Tensor, n_blocks: int, block: int) -> torch.Tensor:
    """(B, Hkv, L, D) keys (or values) of positions 0 … L − 1 as (B, Hkv, n_blocks, block, D).
    A view when ``L`` holds the whole blocks (the decode store is preallocated in whole blocks);
    otherwise padded with zeros, which copies (a prefill's freshly projected keys, once)."""
    need = n_blocks * block
    if k.shape[2] < need:
        k = F.pad(k, (0, 0, 0, need - k.shape[2]))
    return k[:, :, :need].unflatten(2, (n_blocks, block))


class NativeSparseAttention(nn.Module):
    """The ``"nsa"`` mixer: compressed, selected and sliding-window attention with per-head gates."""

    kv_cache = False  # keeps its three branches' keys in cache.state(layer): see the module docstring

    def __init__(self, config, layer: int = 0):
        super().__init__()
        c = config.nsa if config.nsa is not None else NSAConfig()
        useless = {
            "compress_block": "no compressed block could ever be complete, so the compressed branch and "
            "the selection it scores would never act",
            "select_block": "the first selection block would hold the whole context, so nothing would "
            "ever be selected (the branch would be plain causal attention)",
        }
        for name, why in useless.items():
            if getattr(c, name) > config.block_size:
                raise ConfigError(
                    f"model.nsa.{name} = {getattr(c, name)} exceeds model.block_size = "
                    f"{config.block_size}: {why}; make it at most block_size"
                )
        self.nsa = c
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_dim = config.head_dim
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        # One projection: the shared queries, then k and v for each of the three branches.
        self.qkv = nn.Linear(config.d_model, (H + 6 * Hkv) * D, bias=config.bias)
        self.compress_k = Compressor(c.compress_block, D)
        self.compress_v = Compressor(c.compress_block, D)
        # Eq. 5 derives the gates with an MLP; one linear layer here (a simplification): a score per branch and head.
        self.gate = nn.Linear(config.d_model, 3 * H, bias=config.bias)
        self.proj = nn.Linear(H * D, config.d_model, bias=config.bias)

    # --- accounting ---------------------------------------------------------------------------
    def context_flops(self, context: int) -> float:
        """Forward FLOPs per token over ``context`` keys: q·k and the weighted sum (4·H·D per key)
        for the keys each branch reads — the compressed keys of the finished blocks, the n
        selected blocks, the window — beyond the weight matrices (counted in the parameters)."""
        n = self.nsa
        keys = (
            self._complete_blocks(context)
            + min(context, n.select_count * n.select_block)
            + min(context, n.window)
        )
        return 4 * self.n_head * self.head_dim * keys

    def cache_values_per_token(self) -> int:
        """Values kept per token: the selected branch's k and v (it may pick any past block),
        plus the compressed keys and values, one pair per ``d`` tokens. An int by the mixers'
        protocol, so the compressed share is rounded up: it overstates that share when it is not
        whole (at most by one value per token: 0.5 -> 1 in a tiny model); the exact figure is
        :meth:`compressed_values_per_token`."""
        return 2 * self.n_kv_head * self.head_dim + math.ceil(self.compressed_values_per_token())

    def compressed_values_per_token(self) -> float:
        """The compressed keys' and values' share of :meth:`cache_values_per_token`: 2·Hkv·D / d."""
        return 2 * self.n_kv_head * self.head_dim / self.nsa.compress_stride

    def state_values_per_sequence(self) -> int:
        """Bounded per-sequence store: the window branch's last w − 1 k, v and the compressed
        branch's raw k, v of the block still filling (at most l − 1 tokens)."""
        return 2 * self.n_kv_head * self.head_dim * (self.nsa.window - 1 + self.nsa.compress_block - 1)

    def _complete_blocks(self, length: int) -> int:
        """Compressed blocks complete within the first ``length`` tokens: block i ends at i·d + l − 1."""
        l, d = self.nsa.compress_block, self.nsa.compress_stride
        return max(0, (length - l) // d + 1)

    # --- shared pieces ------------------------------------------------------------------------
    def _project(self, x, rope):
        """Queries (B, H, T, D), each branch's (k, v) (B, Hkv, T, D), gates (B, H, T, 3)."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, *kvs = self.qkv(x).split([H * D] + [Hkv * D] * 6, dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        kvs = [t.view(B, T, Hkv, D).transpose(1, 2) for t in kvs]
        if rope is not None:
            cos, sin = rope
            q = apply_rope(q, cos, sin)
            kvs[0::2] = [apply_rope(k, cos, sin) for k in kvs[0::2]]
        branch_kv = dict(zip(BRANCHES, zip(kvs[0::2], kvs[1::2])))
        gates = self.gate(x).view(B, T, H, 3)
        gates = torch.sigmoid(gates) if self.nsa.gate == "sigmoid" else torch.softmax(gates, dim=-1)
        return q, branch_kv, gates.permute(0, 2, 1, 3)

    def _compress_all(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed k, v (B, Hkv, N, D) of every complete block of (B, Hkv, L, D) keys whose
        first block starts at index 0: blocks start at 0, d, 2d, ... and need all ``l`` tokens."""
        l, d = self.nsa.compress_block, self.nsa.compress_stride
        B, Hkv, L, D = k.shape
        if l > L:
            return k.new_zeros(B, Hkv, 0, D), v.new_zeros(B, Hkv, 0, D)
        # unfold: (B, Hkv, N, D, l) windows of l tokens, stride d -> (B, Hkv, N, l, D)
        return (
            self.compress_k(k.unfold(2, l, d).transpose(-1, -2)),
            self.compress_v(v.unfold(2, l, d).transpose(-1, -2)),
        )

    def _refuse(self, alibi, packed_mask, cache, positions, start: int, T: int):
        if packed_mask is not None:
            raise ValueError(
                "nsa layers do not take packed rows (documents): their blocks are positions of one "
                "sequence; train without packing"
            )
        if cache is not None and getattr(cache, "paged", False):
            raise ValueError(
                "nsa layers do not run on the engine's paged cache; generate with "
                "scratchlm.generate (a contiguous KVCache) instead"
            )
        if alibi is not None:
            raise ValueError("nsa layers take rope or no position in attention, not alibi")
        # the blocks are counted from the sequence's first token: see the module docstring
        if positions is not None:
            first = (
                start if cache is not None else positions.reshape(-1)[:1]
            )  # without a cache, any first position
            if positions.dim() != 1 or not torch.equal(
                positions, first + torch.arange(T, device=positions.device)
            ):
                expected = f"starting at cache.length = {start}" if cache is not None else "(any first one)"
                raise ValueError(
                    f"nsa layers count their blocks from the first token of the sequence, so they take "
                    f"{T} contiguous positions {expected}; got positions of shape "
                    f"{tuple(positions.shape)} beginning {positions.reshape(-1)[:4].tolist()}"
                )

    def _gated(self, outputs: dict, gates: torch.Tensor) -> torch.Tensor:
        """Eq. 5: Σ_c g_c · o_c per head, then the output projection. outputs: (B, H, T, D) each."""
        y = sum(gates[..., i, None] * outputs[name] for i, name in enumerate(BRANCHES))
        B, H, T, D = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    # --- the efficient path -------------------------------------------------------------------
    def forward(
        self, x, *, rope=None, alibi=None, cache=None, layer: int = 0, packed_mask=None, positions=None
    ) -> torch.Tensor:
        return self.branches(
            x, rope=rope, alibi=alibi, cache=cache, layer=layer, packed_mask=packed_mask, positions=positions
        )["output"]

    def branches(
        self, x, *, rope=None, alibi=None, cache=None, layer: int = 0, packed_mask=None, positions=None
    ) -> dict:
        """The efficient path's output and its parts: each branch (B, H, T, D), the gates
        (B, H, T, 3), and the selection: ``blocks`` (B, Hkv, T, n) indices, ``chosen`` whether each
        index is a real pick (false where fewer than n blocks exist yet)."""
        start = cache.length if cache is not None else 0
        self._refuse(alibi, packed_mask, cache, positions, start, x.shape[1])
        q, kv, gates = self._project(x, rope)
        if cache is None:
            k_cmp, v_cmp = self._compress_all(*kv["compressed"])
            (k_slc, v_slc), (k_win, v_win), window_start = kv["selected"], kv["window"], 0
        else:
            k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, window_start = self._remember(cache, layer, kv, start)
        out = self._sparse(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, start, window_start)
        out["gates"] = gates
        out["output"] = self._gated(out, gates)
        return out

    def _remember(self, cache, layer, kv, start):
        """Add the new positions to this layer's store; return what the new queries may read.

        The stores that grow with the sequence are preallocated for ``cache.max_len`` (batch first,
        as ``cache.reorder`` needs) and written in place: the selected branch's k, v in whole
        blocks of ``l'`` (so the blocks are a view), the compressed k, v one row per block that can
        complete. Only the bounded window and raw-tail stores are rebuilt at each call."""
        state = cache.state(layer)
        c = self.nsa
        k_new, v_new = kv["selected"]
        B, Hkv, T, D = k_new.shape
        end = start + T
        if "k_slc" not in state:  # any past block may be selected: keep every position
            whole_blocks = (
                math.ceil(cache.max_len / c.select_block) * c.select_block
            )  # max_len rounded up to l'
            compressed = self._complete_blocks(cache.max_len)
            for name, length in (
                ("k_slc", whole_blocks),
                ("v_slc", whole_blocks),
                ("k_cmp", compressed),
                ("v_cmp", compressed),
            ):
                state[name] = k_new.new_zeros(B, Hkv, length, D)
            for name in ("k_win", "v_win", "k_raw", "v_raw"):
                state[name] = k_new.new_zeros(B, Hkv, 0, D)
        if end > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions; {end} were asked for")
        state["k_slc"][:, :, start:end] = k_new
        state["v_slc"][:, :, start:end] = v_new
        # The window branch: the last w - 1 positions are all a future query can still see.
        k_win = torch.cat([state["k_win"], kv["window"][0]], dim=2)
        v_win = torch.cat([state["v_win"], kv["window"][1]], dim=2)
        window_start = end - k_win.shape[2]
        keep = max(0, k_win.shape[2] - (c.window - 1))
        state["k_win"], state["v_win"] = k_win[:, :, keep:], v_win[:, :, keep:]
        # The compressed branch: raw k, v from the first incomplete block's start on; compress the
        # blocks completed now (each exactly once) and drop the raw tokens no block needs any more.
        done = self._complete_blocks(start)
        k_raw = torch.cat([state["k_raw"], kv["compressed"][0]], dim=2)  # positions done·d ... end - 1
        v_raw = torch.cat([state["v_raw"], kv["compressed"][1]], dim=2)
        k_more, v_more = self._compress_all(k_raw, v_raw)
        now = done + k_more.shape[2]
        state["k_cmp"][:, :, done:now] = k_more
        state["v_cmp"][:, :, done:now] = v_more
        drop = k_more.shape[2] * c.compress_stride  # the next incomplete block starts here
        state["k_raw"], state["v_raw"] = k_raw[:, :, drop:], v_raw[:, :, drop:]
        assert (
            now == self._complete_blocks(end)
            and done * c.compress_stride + drop + state["k_raw"].shape[2] == end
        )
        # Views, no copies: the selected store is read up to the last whole block (``_sparse`` masks past ``end``).
        return (
            state["k_cmp"][:, :, :now],
            state["v_cmp"][:, :, :now],
            state["k_slc"],
            state["v_slc"],
            k_win,
            v_win,
            window_start,
        )

    def _sparse(self, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, start: int, window_start: int) -> dict:
        """The three branches for queries at positions ``start ... start + T - 1``; keys of the
        selected branch from position 0 (at least up to ``start + T``; any beyond are never
        visible), of the window branch from ``window_start``."""
        c = self.nsa
        B, H, T, D = q.shape
        Hkv = self.n_kv_head
        G = H // Hkv
        l, d, ls = c.compress_block, c.compress_stride, c.select_block
        scale = 1 / math.sqrt(D)
        qg = q.view(B, Hkv, G, T, D)  # query head h = g·G + i reads KV head g
        query_pos = torch.arange(start, start + T, device=q.device)
        end = start + T

        # Compressed branch (eq. 7-8): block i is usable once its last token i·d + l - 1 is visible.
        N = k_cmp.shape[2]
        usable = (torch.arange(N, device=q.device) * d + l - 1)[None, :] <= query_pos[:, None]  # (T, N)
        p_cmp = masked_softmax(torch.einsum("bgitd,bgnd->bgitn", qg, k_cmp) * scale, usable)
        o_cmp = torch.einsum("bgitn,bgnd->bgitd", p_cmp, v_cmp)

        # Selection scores (eq. 9-10): compressed probabilities -> selection blocks, summed over the group.
        S = math.ceil(end / ls)
        scores = selection_scores(
            p_cmp.detach().sum(dim=2), S, l, d, ls
        )  # (B, Hkv, T, S); a pick has no gradient
        blocks, chosen = self._top_blocks(scores, query_pos)

        # The selected branch reads whole blocks: its keys as (B, Hkv, S, l', D).
        k_blocks, v_blocks = as_blocks(k_slc, S, ls), as_blocks(v_slc, S, ls)
        picked = torch.zeros(B, Hkv, T, S, dtype=torch.bool, device=q.device).scatter(-1, blocks, chosen)
        o_slc = torch.empty_like(qg)
        o_win = torch.empty_like(qg)
        for a in range(0, T, _QUERY_CHUNK):  # a chunk of neighbouring queries at a time
            b = min(T, a + _QUERY_CHUNK)
            pos = query_pos[a:b]
            # Selected branch (eq. 12): only blocks some query of the chunk picked are ever read.
            used = picked[:, :, a:b].any(dim=2)  # (B, Hkv, S)
            width = min(
                S, (b - a) * c.select_count
            )  # a bound that needs no look at the picks (no host sync) ...
            if width > c.select_count:  # ... but past n blocks (several queries), count the true union
                width = int(used.sum(-1).max())
            if width <= _UNION_LIMIT * c.select_count:
                o_slc[:, :, :, a:b] = self._selected_union(
                    qg[:, :, :, a:b], pos, picked[:, :, a:b], used, width, k_blocks, v_blocks
                )
            else:
                o_slc[:, :, :, a:b] = self._selected_per_query(
                    qg[:, :, :, a:b], pos, blocks[:, :, a:b], chosen[:, :, a:b], k_blocks, v_blocks
                )
            # Window branch: the keys t - w + 1 ... t of this chunk's queries, one dense band.
            lo = max(window_start, start + a - c.window + 1)
            key_pos = torch.arange(lo, start + b, device=q.device)
            band = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - c.window)
            held = slice(
                lo - window_start, start + b - window_start
            )  # the window store begins at window_start
            s = torch.einsum("bgitd,bgsd->bgits", qg[:, :, :, a:b], k_win[:, :, held]) * scale
            o_win[:, :, :, a:b] = torch.einsum(
                "bgits,bgsd->bgitd", masked_softmax(s, band), v_win[:, :, held]
            )
        return {
            "compressed": o_cmp.reshape(B, H, T, D),
            "selected": o_slc.reshape(B, H, T, D),
            "window": o_win.reshape(B, H, T, D),
            "blocks": blocks,
            "chosen": chosen,
        }

    def _selected_union(self, q, pos, mine, used, width, k_blocks, v_blocks):
        """Selected attention for a chunk of queries q (B, Hkv, G, c, D) at ``pos``: load once the
        union U of the blocks any of them picked (as the paper's kernel loads a block once for all
        heads of a GQA group; neighbours mostly pick the same blocks), score every query of the
        chunk against all of U in one matrix product, and mask each to its own picks ``mine``
        (B, Hkv, c, S). Work (G · c) x (|U| · l'): cheapest while neighbours agree."""
        B, Hkv, _, ls, D = k_blocks.shape
        union = torch.sort(used.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
        batch = torch.arange(B, device=q.device)[:, None, None]
        group = torch.arange(Hkv, device=q.device)[None, :, None]
        k_sel = k_blocks[batch, group, union].flatten(2, 3)  # (B, Hkv, |U|·l', D)
        v_sel = v_blocks[batch, group, union].flatten(2, 3)
        token = (union[..., None] * ls + torch.arange(ls, device=q.device)).flatten(-2)  # (B, Hkv, |U|·l')
        # a group whose union is narrower than the widest is padded with blocks none of its queries picked
        mine = mine.gather(-1, union[:, :, None].expand(-1, -1, q.shape[3], -1))
        visible = mine.repeat_interleave(ls, dim=-1) & (
            token[:, :, None] <= pos[:, None]
        )  # (B, Hkv, c, |U|·l')
        s = torch.einsum("bgitd,bgmd->bgitm", q, k_sel) / math.sqrt(D)
        # einsum folds the G heads into the rows of one product (a broadcast matmul would copy v_sel G times)
        return torch.einsum("bgitm,bgmd->bgitd", masked_softmax(s, visible[:, :, None]), v_sel)

    def _selected_per_query(self, q, pos, blocks, chosen, k_blocks, v_blocks):
        """The same for queries whose picks barely overlap: gather each query's own n blocks
        (B, Hkv, c, n·l', D). Work per query n·l' whatever T is, but every query copies its keys."""
        B, Hkv, _, ls, D = k_blocks.shape
        batch = torch.arange(B, device=q.device)[:, None, None, None]
        group = torch.arange(Hkv, device=q.device)[None, :, None, None]
        k_sel = k_blocks[batch, group, blocks].flatten(3, 4)
        v_sel = v_blocks[batch, group, blocks].flatten(3, 4)
        token = (blocks[..., None] * ls + torch.arange(ls, device=q.device)).flatten(-2)  # (B, Hkv, c, n·l')
        visible = chosen.repeat_interleave(ls, dim=-1) & (token <= pos[:, None])
        s = torch.einsum("bgitd,bgtmd->bgitm", q, k_sel) / math.sqrt(D)
        return torch.einsum("bgitm,bgtmd->bgitd", masked_softmax(s, visible[:, :, None]), v_sel)

    def _top_blocks(self, scores: torch.Tensor, query_pos: torch.Tensor):
        """Eq. 11: the top ``n`` selection blocks of each query (rank by score, ties to the lower
        index), with the initial and local blocks forced in and future blocks out."""
        c = self.nsa
        S = scores.shape[-1]
        j = torch.arange(S, device=scores.device)[None, :]
        current = (query_pos // c.select_block)[:, None]  # (T, 1): the query's own block
        valid = j <= current  # a block that starts after the query holds no visible token
        forced = valid & ((j < c.initial_blocks) | (j > current - c.local_blocks))
        ranked = scores.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[
            ..., : min(c.select_count, S)
        ]
        chosen = valid.expand_as(ranked).gather(-1, order)
        return order, chosen

    # --- the spelled-out reference ------------------------------------------------------------
    def reference(self, x, *, rope=None) -> dict:
        """The same function with every branch as dense masked attention over all keys; for tests
        and for reading. Also returns ``selected_blocks`` (B, Hkv, T, S), the selection as a mask."""
        c = self.nsa
        q, kv, gates = self._project(x, rope)
        B, H, T, D = q.shape
        G = H // self.n_kv_head
        l, d, ls = c.compress_block, c.compress_stride, c.select_block
        pos = torch.arange(T, device=x.device)

        def attend(k, v, mask):  # plain per-head attention; k, v (B, Hkv, L, D); mask (B|1, Hkv|1, T, L)
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
            mask = mask.repeat_interleave(G, dim=1) if mask.shape[1] > 1 else mask
            p = masked_softmax(q @ k.transpose(-1, -2) / math.sqrt(D), mask)
            return p, p @ v

        # Compressed branch, one block at a time (eq. 7), usable once complete (eq. 8).
        k_raw, v_raw = kv["compressed"]
        starts = list(range(0, T - l + 1, d))
        k_cmp = (
            torch.stack([self.compress_k(k_raw[:, :, i : i + l]) for i in starts], dim=2)
            if starts
            else k_raw[:, :, :0]
        )
        v_cmp = (
            torch.stack([self.compress_v(v_raw[:, :, i : i + l]) for i in starts], dim=2)
            if starts
            else v_raw[:, :, :0]
        )
        usable = torch.tensor(
            [[i + l - 1 <= t for i in starts] for t in range(T)], dtype=torch.bool, device=x.device
        ).reshape(1, 1, T, len(starts))
        p_cmp, o_cmp = attend(k_cmp, v_cmp, usable)

        # Selection scores (eq. 9): every token of compressed block i passes p_cmp[i] / d to its selection block.
        S = math.ceil(T / ls)
        score = p_cmp.new_zeros(B, H, T, S)
        for n, i in enumerate(starts):
            for token in range(i, i + l):
                score[..., token // ls] += p_cmp[..., n].detach() / d
        score = score.view(B, self.n_kv_head, G, T, S).sum(dim=2)  # eq. 10: one selection per GQA group
        # Eq. 11 by counting: block j's rank = blocks scoring higher, or equal with a lower index.
        j = torch.arange(S, device=x.device)
        valid = j[None, :] <= (pos // ls)[:, None]
        forced = valid & (
            (j[None, :] < c.initial_blocks) | (j[None, :] > (pos // ls)[:, None] - c.local_blocks)
        )
        ranked = score.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
        above = (ranked[..., None, :] > ranked[..., :, None]) | (
            (ranked[..., None, :] == ranked[..., :, None]) & (j[None, :] < j[:, None])
        )
        selected = (above.sum(-1) < c.select_count) & valid  # (B, Hkv, T, S)

        # Selected branch (eq. 12): the T x T mask of the chosen blocks' tokens, causal.
        causal = pos[None, :] <= pos[:, None]
        slc_mask = selected[..., pos // ls] & causal  # (B, Hkv, T, T): key s allowed if its block is chosen
        _, o_slc = attend(*kv["selected"], slc_mask)
        # Window branch: keys t - w < s <= t.
        _, o_win = attend(*kv["window"], (causal & (pos[None, :] > pos[:, None] - c.window)).view(1, 1, T, T))
        out = {
            "compressed": o_cmp,
            "selected": o_slc,
            "window": o_win,
            "gates": gates,
            "selected_blocks": selected,
        }
        out["output"] = self._gated(out, gates)
        return out
