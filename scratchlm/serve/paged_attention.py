"""Paged attention: keys and values live in a pool of blocks; each sequence reads its own through
its block table.

The pool holds, per layer, ``num_blocks * block_size`` *slots* of ``(n_kv_head, head_dim)``.
Token ``p`` of a sequence lives in slot ``block_table[p // block_size] * block_size + p % block_size``.

One engine step packs the scheduled tokens of every sequence into a single row of ``N`` tokens
(no padding): a decode contributes 1 token, a prefill chunk many. :class:`PagedBatch` is that step's
*attention metadata*, built once and used by every layer:

1. **store**: the new tokens' keys and values are written to their slots (``index_copy_``);
2. **attend**: each query reads the keys of its own sequence, positions ``0 ... its own``.
   Decodes (one query each) are batched into one call: their keys are *gathered* from the pool
   into a padded ``(batch, n_kv_head, longest, head_dim)`` tensor with a mask for the padding.
   Each prefill chunk is one call over its own gathered keys, with a causal mask offset by the
   tokens already cached.

The gather is what a first version on a CPU can do: it copies every key and value a step reads
(read, write, read again by attention), so attention moves about three times the bytes a fused
paged kernel (vLLM's, FlashAttention's ``block_table`` argument) would. The model's weights are read once per step whatever the batch,
so at large batches and long contexts this copy is what decode time grows with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchlm.models.blocks.attention import attention_bias


class KVPool:
    """The cache's memory: ``k`` and ``v`` of shape (n_layer, n_kv_head, num_blocks, block_size, head_dim).

    Heads come first, then blocks: gathering a sequence's blocks copies, per head, runs of
    ``block_size * head_dim`` contiguous values (4 KiB for 16 fp32 tokens of width 64), and the
    result is, per head, one contiguous run of keys, the layout attention kernels read fastest.
    ``workspace`` is a buffer the decode gather writes into, kept between steps (allocating ~100 MB
    afresh for every layer of every step costs more in page faults than the copy itself).

    One extra block, number ``num_blocks`` (:attr:`null_block`), is never handed out and stays
    zero: padded block tables point there. Masked keys get zero attention weight, but ``0 * NaN``
    is NaN, so padding must never read a block that another sequence may have filled with garbage.
    """

    def __init__(
        self,
        n_layer: int,
        num_blocks: int,
        block_size: int,
        n_kv_head: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        shape = (n_layer, n_kv_head, num_blocks + 1, block_size, head_dim)
        self.null_block = num_blocks
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self._workspace = torch.empty(0, device=device, dtype=dtype)

    def workspace(self, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two (n_kv_head, blocks, block_size, head_dim) buffers for gathered keys and values."""
        _, Hkv, _, bs, D = self.k.shape
        size = Hkv * blocks * bs * D
        if self._workspace.numel() < 2 * size:
            self._workspace = torch.empty(2 * size, device=self.k.device, dtype=self.k.dtype)
        buf = self._workspace[: 2 * size].view(2, Hkv, blocks, bs, D)
        return buf[0], buf[1]

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PagedBatch:
    """One step's packed tokens: positions, slots, and who attends to what.

    ``chunks`` lists, per scheduled sequence, ``(block_table, start, n)``: its tokens
    ``start ... start+n-1`` are computed this step, after ``start`` already in the cache.
    """

    paged = True

    def __init__(
        self, pool: KVPool, chunks: list[tuple[list[int], int, int]], device: torch.device | str = "cpu"
    ):
        # The metadata is built on the CPU and copied to the device once per tensor: on a GPU, small
        # tensors made one by one on the device would each cost a host-to-device transfer.
        self.pool = pool
        bs = pool.block_size
        positions, slots, ends, decodes = [], [], [], []
        self.prefills: list[
            tuple[int, int, int, torch.Tensor | None]
        ] = []  # (first row, n, start, its blocks)
        row = 0
        for table, start, n in chunks:
            pos = torch.arange(start, start + n)
            positions.append(pos)
            blocks = torch.tensor(table[: -(-(start + n) // bs)])
            slots.append(blocks[pos // bs] * bs + pos % bs)  # where each new token's k and v go
            if n == 1:
                decodes.append((row, table, start + 1))
            else:  # a prefill chunk that starts at 0 attends to its own new keys: nothing to gather
                self.prefills.append((row, n, start, blocks.to(device) if start else None))
            row += n
            ends.append(row - 1)
        self.num_tokens = row
        self.positions = torch.cat(positions).to(device)
        self.slot_mapping = torch.cat(slots).to(device)
        self.last_rows = torch.tensor(ends).to(device)  # each sequence's last token this step
        # Decodes are batched in groups of similar length: one padded gather per group, so a 40-token
        # sequence does not pay for the padding up to a 700-token one (within a group the longest
        # is at most 1.5x the shortest, or one block more).
        self.decode_groups: list[_DecodeGroup] = []
        group: list[tuple[int, list[int], int]] = []
        for item in sorted(decodes, key=lambda d: d[2]):
            if group and -(-item[2] // bs) > max(1.5 * -(-group[0][2] // bs), -(-group[0][2] // bs) + 1):
                self.decode_groups.append(_DecodeGroup(group, bs, pool.null_block, device))
                group = []
            group.append(item)
        if group:
            self.decode_groups.append(_DecodeGroup(group, bs, pool.null_block, device))
        self._masks: dict = {}  # the same masks serve every layer: built on first use

    def _mask(self, key, make, *args):
        if key not in self._masks:
            self._masks[key] = make(*args)
        return self._masks[key]

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        alibi=None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Store this step's k, v (1, Hkv, N, D) in the pool, then attend: q (1, H, N, D) -> (1, H, N, D).
        ``scale`` multiplies the scores (None: 1/sqrt(D))."""
        pool_k, pool_v = self.pool.k[layer], self.pool.v[layer]  # (Hkv, blocks, block_size, D)
        Hkv, _, bs, D = pool_k.shape
        pool_k.view(Hkv, -1, D).index_copy_(1, self.slot_mapping, k[0])
        pool_v.view(Hkv, -1, D).index_copy_(1, self.slot_mapping, v[0])
        gqa = q.shape[1] != k.shape[1]
        out = torch.empty_like(q)
        for row, n, start, blocks in self.prefills:
            qi = q[:, :, row : row + n]  # (1, H, n, D)
            if blocks is None:
                mask = (
                    None
                    if alibi is None
                    else self._mask(("prefill", row), attention_bias, n, n, 0, alibi, q.device, q.dtype)
                )
                y = F.scaled_dot_product_attention(
                    qi,
                    k[:, :, row : row + n],
                    v[:, :, row : row + n],
                    is_causal=alibi is None,
                    enable_gqa=gqa,
                    attn_mask=mask,
                    scale=scale,
                )
            else:  # after cached tokens: gather this sequence's blocks
                ki = pool_k.index_select(1, blocks).view(1, Hkv, -1, D)[
                    :, :, : start + n
                ]  # (1, Hkv, start + n, D)
                vi = pool_v.index_select(1, blocks).view(1, Hkv, -1, D)[:, :, : start + n]
                mask = self._mask(
                    ("prefill", row), attention_bias, n, start + n, start, alibi, q.device, q.dtype
                )
                y = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=gqa, scale=scale)
            out[:, :, row : row + n] = y
        for gi, g in enumerate(self.decode_groups):
            Bd, width = g.blocks.shape
            kd, vd = self.pool.workspace(Bd * width)  # the gather: (Hkv, Bd * width, bs, D)
            torch.index_select(pool_k, 1, g.blocks.flatten(), out=kd)
            torch.index_select(pool_v, 1, g.blocks.flatten(), out=vd)
            kd = kd.view(Hkv, Bd, width * bs, D).transpose(0, 1)  # (Bd, Hkv, keys, D), a view
            vd = vd.view(Hkv, Bd, width * bs, D).transpose(0, 1)
            qd = q[0][:, g.rows].transpose(0, 1)[:, :, None]  # (Bd, H, 1, D)
            if alibi is not None:
                mask = self._mask(("decode", gi), g.alibi_bias, alibi, q.dtype)
            elif g.padded:
                mask = g.valid[:, None, None, :]  # (Bd, 1, 1, keys), True = attend
            else:
                mask = None  # every sequence fills all its blocks: nothing to hide
            y = F.scaled_dot_product_attention(
                qd, kd, vd, attn_mask=mask, enable_gqa=gqa, scale=scale
            )  # (Bd, H, 1, D)
            out[0][:, g.rows] = y[:, :, 0].transpose(0, 1)
        return out


class _DecodeGroup:
    """Decodes attended together: their rows in the step, block tables padded to the longest."""

    def __init__(self, items: list[tuple[int, list[int], int]], bs: int, null: int, device):
        lengths = [length for _, _, length in items]
        width = -(-max(lengths) // bs)  # blocks of the longest sequence
        # Small lists go to the device in one copy each; the (Bd, keys) masks are made there.
        self.rows = torch.tensor([r for r, _, _ in items], dtype=torch.long).to(device)
        self.blocks = torch.tensor([t[:width] + [null] * (width - len(t[:width])) for _, t, _ in items]).to(
            device
        )  # (Bd, width), padded with the pool's zero block
        self.padded = any(n != width * bs for n in lengths)
        self.lengths = torch.tensor(lengths).to(device)
        self.key_pos = torch.arange(width * bs, device=device)
        self.valid = self.key_pos[None, :] < self.lengths[:, None]  # (Bd, width * bs): False past the end

    def alibi_bias(self, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(Bd, H, 1, keys): each head's distance penalty, -inf past each sequence's end."""
        distance = (self.lengths[:, None] - 1 - self.key_pos[None, :]).clamp_min(0)
        slopes = slopes.to(device=distance.device, dtype=dtype)
        bias = -slopes[None, :, None, None] * distance[:, None, None, :].to(dtype)
        return bias.masked_fill(~self.valid[:, None, None, :], float("-inf"))
