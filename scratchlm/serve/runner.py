"""The model runner: one engine step's tokens through the model, logits out.

It owns the model and the KV pool. :meth:`ModelRunner.forward` packs the scheduled chunks into one
row (no padding), runs the model with a :class:`~scratchlm.serve.paged_attention.PagedBatch`
as its cache, and takes logits only at the last token of each sequence whose chunk reaches the end
of its tokens (a prefill chunk that is not the last one produces no token). The engine samples
from them (:mod:`~scratchlm.serve.sampler`).
"""

from __future__ import annotations

import torch

from scratchlm.serve.paged_attention import KVPool, PagedBatch
from scratchlm.serve.sequence import Sequence
from scratchlm.serve.weights import for_inference, resolve


class ModelRunner:
    def __init__(
        self,
        model,
        num_blocks: int,
        block_size: int,
        weight_format: str = "auto",
        vocab_size: int | None = None,
    ):
        model.eval()
        self.vocab_size = vocab_size  # sample only ids below this (the tokenizer's; a model's may be padded)
        self.weight_format = resolve(weight_format, model)
        self.model = for_inference(model, self.weight_format)
        c = model.config
        mixers = sorted({mixer for mixer, _ in c.layer_kinds()} - {"attention"})
        if mixers:  # the paged cache stores full k, v per token; other mixers keep other state
            raise ValueError(
                f"the engine serves models whose mixers are all full attention; this one has {mixers} "
                "layers: generate with `scratchlm sample` (the one-request path with a KV cache)"
            )
        if c.attn.softcap is not None:  # fail when the engine is built, not at every request
            raise ValueError(
                "the engine's fused attention cannot soft-cap scores (model.attn.softcap): "
                "generate with `scratchlm sample` (the one-request path with a KV cache)"
            )
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.pool = KVPool(c.n_layer, num_blocks, block_size, c.kv_heads, c.head_dim, self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, chunks: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Compute ``chunks``; return the sequences whose chunk reached their last token and their
        next-token logits, one row each (only the tokenizer's ids)."""
        ids: list[int] = []
        for seq, n in chunks:
            ids.extend(seq.tokens(seq.num_computed, seq.num_computed + n))
        batch = PagedBatch(
            self.pool, [(seq.block_table, seq.num_computed, n) for seq, n in chunks], self.device
        )
        done = [i for i, (seq, n) in enumerate(chunks) if seq.num_computed + n == seq.num_tokens]
        # (No rows at all when every chunk is the middle of a long prompt: that only fills the cache.)
        logits, _ = self.model(
            torch.tensor([ids], device=self.device),
            cache=batch,
            positions=batch.positions,
            logits_at=batch.last_rows[torch.tensor(done, dtype=torch.long, device=self.device)],
        )
        return [chunks[i][0] for i in done], logits[0, :, : self.vocab_size]

    def scrub(self, block_ids: list[int]) -> None:
        """Zero these blocks' keys and values (newly allocated: see BlockManager.take_fresh)."""
        if block_ids:
            index = torch.tensor(block_ids, device=self.device)
            self.pool.k.index_fill_(2, index, 0)
            self.pool.v.index_fill_(2, index, 0)
