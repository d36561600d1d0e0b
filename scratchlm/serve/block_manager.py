"""The paged KV cache's bookkeeping: which fixed-size block holds which tokens of which sequence.

The cache is one pool of ``num_blocks`` blocks of ``block_size`` token slots (the tensors live in
:mod:`scratchlm.serve.runner`; this file only hands out block numbers). Each sequence has a
*block table*: its i-th block holds its tokens ``i*block_size ... (i+1)*block_size - 1``. Blocks
need not be contiguous, so memory is never reserved for text not yet generated and never
fragments: a finished sequence's blocks go straight back to the free list.

**Prefix caching.** A full block is identified by a *chain hash*: a cryptographic digest (BLAKE2b,
128 bits) of its parent block's digest and its own token ids, so equal digests mean equal whole
prefixes, not just equal blocks (Python's ``hash`` would be faster, but its 64 bits can be made to
collide on purpose, and a collision would hand one user's cached text to another). A new sequence
walks its prompt block by block, and every block already in the cache (the hit is also confirmed
by comparing the block's token ids) is shared instead of recomputed:
its reference count goes up. A block whose count drops to 0 keeps its hash and contents on the
free list, so a later request can still hit it, until it is reused; reuse takes the least recently
freed block first (LRU eviction). The last prompt token is always recomputed, so the model
produces the logits the first output token is sampled from.

**Forks.** The choices of one request (``n > 1``) share their prompt the same way: when choice 0
has computed the prompt, every other choice takes its *full* blocks (:meth:`BlockManager.fork`,
reference counts up, whether or not prefix caching is on) and computes only the tokens of the
last, partly filled block itself (fewer than ``block_size``), into a block of its own. A block is
therefore shared only once it is full, and is never written again while shared.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from scratchlm.serve.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set once the block is full and computed, if caching
        self.token_ids: tuple[int, ...] | None = None


def chain_hash(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """The digest of a block given its parent's: it stands for every token from the start."""
    return hashlib.blake2b((parent or b"") + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self.cached: dict[bytes, int] = {}  # chain hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.fresh: list[int] = []  # blocks handed out since the runner last zeroed them (take_fresh)
        self.query_tokens = 0  # prompt tokens of admitted requests (the scheduler counts)
        self.hit_tokens = 0  # of which found in the prefix cache

    # --- sizes ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks ``seq`` needs for its first ``num_tokens`` tokens to have slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    # --- admission: reuse cached blocks -------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Share every cached full block at the start of ``seq``; return the tokens found.

        Only blocks that end before the sequence's last token are looked up: that token is always
        computed, to produce logits.
        """
        assert not seq.block_table, "match_prefix is for a sequence that holds no blocks"
        seq.block_hashes = []
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.tokens(i * bs, (i + 1) * bs))
            h = self._digest(seq, i)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break  # a miss ends the chain: every later block has a different prefix
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]  # revived from the free list
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        return len(seq.block_table) * bs

    def _digest(self, seq: Sequence, i: int) -> bytes:
        """The chain hash of ``seq``'s block ``i``, computed once per sequence (a request waiting at
        the head of the queue tries admission every step; its prompt is not hashed every time)."""
        digests, bs = seq.digests, self.block_size
        while len(digests) <= i:
            k = len(digests)
            digests.append(
                chain_hash(digests[-1] if digests else None, tuple(seq.tokens(k * bs, (k + 1) * bs)))
            )
        return digests[i]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` (another choice of ``parent``'s prompt) shares ``parent``'s full computed blocks."""
        assert not child.block_table, "fork is for a sequence that holds no blocks"
        full = parent.num_computed // self.block_size
        child.block_table = parent.block_table[:full]
        child.block_hashes = parent.block_hashes[:full]
        child.digests = parent.digests[:full]
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1
        child.num_computed = full * self.block_size

    # --- growth ---------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` the blocks its first ``num_tokens`` tokens need (caller checked there are enough)."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.num_free:
            raise RuntimeError(f"{need} blocks needed, {self.num_free} free: the scheduler must check first")
        for _ in range(need):
            block_id, _ = self.free.popitem(last=False)  # least recently freed
            block = self.blocks[block_id]
            if block.hash is not None:  # evict its cached contents
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, None
            block.ref_count = 1
            seq.block_table.append(block_id)
            self.fresh.append(block_id)

    def take_fresh(self) -> list[int]:
        """Blocks allocated since the last call: the runner zeroes them before the step writes.

        A reused block still holds its previous owner's keys and values in the slots past the new
        owner's length. Attention masks those slots, but a masked weight is 0 and ``0 * NaN`` is
        NaN: had the previous owner produced NaN (an overflow), the new owner would inherit it."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def register(self, seq: Sequence) -> None:
        """After a step: every block of ``seq`` that is now full and computed joins the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        hashes = seq.block_hashes
        while (len(hashes) + 1) * bs <= seq.num_computed:
            i = len(hashes)
            tokens = tuple(seq.tokens(i * bs, (i + 1) * bs))
            h = self._digest(seq, i)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached:  # an identical block computed by another sequence stays unlisted
                self.cached[h] = block.block_id
                block.hash, block.token_ids = h, tokens

    def free_sequence(self, seq: Sequence) -> None:
        """Return ``seq``'s blocks. Cached ones keep their contents for later hits; the sequence's
        last blocks are freed first so its first (most shareable) blocks are evicted last."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than it was taken"
            if block.ref_count == 0:
                self.free[block_id] = None  # most recently used end
                if block.hash is None:  # holds nothing reusable: hand it out first
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []

    # --- invariants (tests call this after every step) ---------------------------------------------
    def check_writable(self, chunks: list[tuple[Sequence, int]]) -> None:
        """Every block a step writes keys and values into is its sequence's alone and not cached."""
        bs = self.block_size
        for seq, n in chunks:
            for i in range(seq.num_computed // bs, self.blocks_for(seq.num_computed + n)):
                block = self.blocks[seq.block_table[i]]
                assert block.ref_count == 1 and block.hash is None, (
                    f"{seq} writes into block {block.block_id} (ref_count {block.ref_count}, hash {block.hash})"
                )

    def check(self, sequences: list[Sequence]) -> None:
        owners: dict[int, int] = {}
        unfilled: set[int] = set()  # blocks that hold a sequence's next tokens: written, so not shared
        for seq in sequences:
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq} lists a block twice"
            assert len(seq.block_table) * self.block_size >= seq.num_computed, (
                f"{seq} computed past its blocks"
            )
            unfilled.update(seq.block_table[seq.num_computed // self.block_size :])
            for block_id in seq.block_table:
                owners[block_id] = owners.get(block_id, 0) + 1
        for block in self.blocks:
            n = owners.get(block.block_id, 0)
            assert block.ref_count == n, f"block {block.block_id}: ref_count {block.ref_count}, in {n} tables"
            assert (n == 0) == (block.block_id in self.free), f"block {block.block_id}: free list disagrees"
            if n > 1:
                assert block.block_id not in unfilled, (
                    f"block {block.block_id} is shared by {n} sequences but not full in every one"
                )
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h, (
                f"cache entry {h} points at block {block_id} with another hash"
            )
        assert len(self.free) + len(owners) == self.num_blocks
