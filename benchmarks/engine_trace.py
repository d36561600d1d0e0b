"""A step-by-step trace of the engine's scheduler on a small workload (docs/paged-attention.md).

    python benchmarks/engine_trace.py

A tiny random model (speed is not the point), blocks of 4 tokens, a pool of 12 blocks, at most 10
tokens per step. Four requests: A and B arrive at once, C (sharing A's first 8 tokens) at step 3,
D (long) at step 4. Each line shows what the step computed for each sequence (prefill chunk or
decode), who was preempted, the free blocks, and every running sequence's block table: chunked
prefill, continuous admission, preemption and a prefix hit, in 20-odd lines.
"""

from __future__ import annotations

import torch
from common import save  # noqa: F401  (puts the repository on sys.path)


def main() -> None:
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.serve import LLMEngine, SamplingParams

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, block_size=64)).eval()
    engine = LLMEngine(model, block_size=4, num_blocks=12, max_num_batched_tokens=10, check_invariants=True)
    a = list(range(1, 14))  # 13 tokens
    arrivals = {
        0: [("A", a, 6), ("B", list(range(20, 25)), 8)],
        3: [("C", a[:8] + [40, 41], 4)],
        4: [("D", list(range(30, 48)), 3)],
    }
    names = {}
    step = 0
    print(f"step | {'computed this step':58} | preempted | free | block tables")
    while step in arrivals or engine.has_unfinished() or any(s > step for s in arrivals):
        for name, prompt, n in arrivals.get(step, []):
            rid = engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0), name)
            names[rid] = name
        plan = engine.scheduler.schedule()
        # run the planned step through the engine's own machinery (what LLMEngine.step does)
        work = []
        for seq, n in plan.chunks:
            kind = (
                "decode"
                if n == 1 and seq.num_computed == seq.num_tokens - 1 and seq.output_ids
                else "prefill"
            )
            hit = (
                f" (cached {seq.num_cached})" if seq.num_cached and seq.num_computed == seq.num_cached else ""
            )
            work.append(f"{seq.request_id}:{kind} {seq.num_computed}-{seq.num_computed + n - 1}{hit}")
        engine._run(plan) if plan.chunks else None
        tables = " ".join(f"{s.request_id}{s.block_table}" for s in engine.scheduler.running)
        preempted = ",".join(s.request_id for s in plan.preempted) or "-"
        print(
            f"{step:4} | {', '.join(work) or '(idle)':58} | {preempted:9} | {engine.blocks.num_free:4} | {tables}"
        )
        step += 1
    s = engine.stats()
    print(
        f"\n{s['steps']} steps, {s['generated_tokens']} tokens, {s['preemptions']} preemption(s), "
        f"prefix-cache hit rate {s['prefix_cache_hit_rate']:.0%}; every block free again: "
        f"{engine.blocks.num_free == engine.blocks.num_blocks}"
    )


if __name__ == "__main__":
    main()
