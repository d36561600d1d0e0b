"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step the scheduler fills a token budget (``max_num_batched_tokens``):

1. **running decodes first**: each running sequence with one token left to compute gets it, so a
   long prompt arriving never stalls the sequences already generating;
2. **running prefills** next, in admission order: a prompt longer than what is left of the
   budget is cut into chunks, one per step (**chunked prefill**);
3. **new requests** from the waiting queue, first come first served, while the budget, the
   ``max_num_seqs`` limit and the free blocks allow; each first takes what the prefix cache
   already holds (:meth:`BlockManager.match_prefix`). A request is admitted only when blocks for
   its *whole* prompt (and its first output token) are free, beyond a small reserve (1% of the
   pool) kept for the running sequences to grow into: admitting a long prompt whose later chunks
   cannot get blocks would only preempt someone else a few steps later.

A sequence leaves the batch the moment it finishes, and its blocks are free for the next step.

**Choices.** A request with ``n > 1`` waits as one sequence (choice 0) and is admitted only if all
its choices fit under ``max_num_seqs``; the others join the running list when choice 0's prompt is
computed (:meth:`Scheduler.fork`) and from then on are ordinary running sequences.

**Preemption.** When a running sequence needs a block and none is free, the most recently
admitted running sequence is *preempted by recompute*: its blocks are freed and it goes back to
the front of the waiting queue with its tokens so far; when readmitted it recomputes them (its
own freed blocks are often still in the prefix cache, so that is usually cheap). A request that
could not fit even alone in the whole pool is refused when it arrives, so this never deadlocks.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from scratchlm.serve.block_manager import BlockManager
from scratchlm.serve.sequence import Sequence, Status


@dataclass
class Step:
    """What one engine step computes: ``(sequence, new tokens)`` pairs, and who was preempted."""

    budget: int  # tokens that may still be added
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.chunks.append((seq, n))
        self.budget -= n

    def drop(self, seq: Sequence) -> None:
        """Take back ``seq``'s chunk (it was preempted after being scheduled)."""
        for i, (s, n) in enumerate(self.chunks):
            if s is seq:
                del self.chunks[i]
                self.budget += n
                return

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 512
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, "
                f"{max_num_batched_tokens}"
            )
        self.blocks = block_manager
        # Every running sequence's decode must fit in one step's budget, or the ones at the back
        # would never be scheduled: no more sequences run at once than the budget has tokens.
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.watermark = max(
            1, block_manager.num_blocks // 100
        )  # blocks admission leaves to running sequences

    def check_fits(self, seq: Sequence) -> None:
        """Refuse a sequence that could not fit even alone in the whole pool (it would wait forever)."""
        need = self.blocks.blocks_for(seq.num_prompt + seq.max_output)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"this request needs up to {need} KV blocks ({seq.num_prompt} prompt + "
                f"{seq.max_output} output tokens) but the cache has {self.blocks.num_blocks}: "
                "lower max_tokens or give the engine more KV cache memory"
            )

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        step = Step(budget=self.max_num_batched_tokens)
        decodes = [s for s in self.running if s.num_tokens - s.num_computed == 1]
        prefills = [s for s in self.running if s.num_tokens - s.num_computed > 1]
        for seq in decodes + prefills:
            if step.budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, step.budget)
            if not self._make_room(seq, seq.num_computed + n, step):
                continue  # seq itself was preempted
            self.blocks.allocate(seq, seq.num_computed + n)
            step.add(seq, n)
        # Admit new requests, unless this step had to preempt: memory is short already.
        while self.waiting and step.budget > 0 and not step.preempted:
            seq = self.waiting[0]
            if len(self.running) + 1 + len(seq.unforked) > self.max_num_seqs:  # its choices run too
                break
            cached = self.blocks.match_prefix(seq)
            seq.num_computed = cached
            n = min(seq.num_tokens - seq.num_computed, step.budget)
            reserve = self.watermark if self.running else 0
            if self.blocks.blocks_needed(seq, seq.num_tokens + 1) > self.blocks.num_free - reserve:
                self.blocks.free_sequence(seq)  # give back the prefix hits; try again next step
                seq.num_computed = 0
                break
            self.blocks.allocate(seq, seq.num_computed + n)
            self.waiting.popleft()
            if seq.timing.first_scheduled is None:  # first admission (not a readmission after preemption)
                seq.timing.first_scheduled = time.perf_counter()
                seq.num_cached = cached
                self.blocks.query_tokens += seq.num_prompt
                self.blocks.hit_tokens += cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            step.add(seq, n)
        return step

    def _make_room(self, seq: Sequence, num_tokens: int, step: Step) -> bool:
        """Preempt from the back of the running list until ``seq`` can have its blocks; False if
        ``seq`` itself had to go."""
        while self.blocks.blocks_needed(seq, num_tokens) > self.blocks.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            step.drop(victim)  # if it was scheduled earlier in this step
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child``, another choice of ``parent``'s request, starts running on ``parent``'s computed
        prompt (sharing its full blocks); it computes the rest of its prompt in the next steps."""
        self.blocks.fork(parent, child)
        child.status = Status.RUNNING
        child.timing.first_scheduled = parent.timing.first_scheduled
        child.num_cached = parent.num_cached
        self.running.append(child)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """``seq`` is done, aborted (``"abort"``) or failed (None): it leaves whichever queue holds it
        and frees its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
