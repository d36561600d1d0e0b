"""Beam search with and without the KV cache, before and after sizing the cache to the generation.

    python benchmarks/beam.py [--beams 4] [--new 64] [--repeats 3]

Beam search reorders the cache every step (each surviving beam inherits its parent's keys and
values). Before the fix the cache was always allocated at ``block_size`` and the whole of it was
copied at every reorder: with a 4096-position model, 4096 positions per layer per step, however
short the text. After it, the cache holds prompt + new tokens and a reorder copies only the
filled positions. "Before" is reproduced here by a cache that behaves as the old one did
(allocated at ``block_size``, ``index_select`` of everything), plugged into the same generation
code, so the two differ in the cache alone. Untrained model (speed does not depend on the
weights): 8 layers, width 256 (head width 32), context 4096, vocabulary 256.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import save


def main() -> None:
    import sys

    import torch

    from scratchlm.generate import KVCache, beam_search
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    class BlockSizedCache(KVCache):
        """The cache as it was: always ``block_size`` long, reordered whole."""

        @classmethod
        def for_model(cls, model, batch, max_len=None):
            return super().for_model.__func__(cls, model, batch, None)

        def reorder(self, index):
            self.k = self.k.index_select(1, index)
            self.v = self.v.index_select(1, index)

    p = argparse.ArgumentParser()
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--prompts", default="32,512")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            vocab_size=256,
            n_layer=args.layers,
            n_head=args.width // 32,
            d_model=args.width,
            block_size=4096,
            position="rope",
            norm="rmsnorm",
            mlp="relu2",
            bias=False,
        )
    ).eval()

    def timed(prompt, use_cache, cache_cls):
        generation.KVCache = cache_cls
        try:
            times, out = [], None
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = beam_search(model, prompt, args.new, args.beams, use_cache=use_cache)
                times.append(time.perf_counter() - start)
            return statistics.median(times), out
        finally:
            generation.KVCache = KVCache

    generation = sys.modules[
        "scratchlm.generate.generate"
    ]  # the module (the package's `generate` is the function)
    rows = []
    for n in (int(v) for v in args.prompts.split(",")):
        prompt = torch.randint(0, 256, (n,)).tolist()
        uncached, reference = timed(prompt, False, KVCache)
        before, out_before = timed(prompt, True, BlockSizedCache)
        after, out_after = timed(prompt, True, KVCache)
        same = (
            [ids for ids, _ in out_before] == [ids for ids, _ in out_after] == [ids for ids, _ in reference]
        )
        rows.append(
            {
                "prompt": n,
                "new_tokens": args.new,
                "beams": args.beams,
                "uncached_s": uncached,
                "cached_before_s": before,
                "cached_after_s": after,
                "same_beams": same,
                "before_cached_over_uncached": before / uncached,
                "after_cached_over_uncached": after / uncached,
            }
        )
    print(
        f"beam search, {args.beams} beams, {args.new} new tokens, {args.layers} layers x width {args.width}, "
        f"context 4096; median of {args.repeats}"
    )
    print(
        f"{'prompt':>6} {'uncached':>9} {'cached before':>14} {'cached after':>13} {'before/uncached':>16} "
        f"{'after/uncached':>15} {'same beams':>10}"
    )
    for r in rows:
        print(
            f"{r['prompt']:>6} {r['uncached_s']:>8.2f}s {r['cached_before_s']:>13.2f}s {r['cached_after_s']:>12.2f}s "
            f"{r['before_cached_over_uncached']:>15.2f}x {r['after_cached_over_uncached']:>14.2f}x {str(r['same_beams']):>10}"
        )
    print(f"results: {save('beam', {'layers': args.layers, 'width': args.width, 'rows': rows})}")


if __name__ == "__main__":
    main()
