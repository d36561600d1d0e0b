"""Decoding speed with and without the KV cache: prompt 512 + 256 new tokens, greedy.

    python benchmarks/decode.py [--plot docs/images/decode_latency.png]

Without a cache every new token reruns the whole context (512 .. 767 positions); with it, the
prompt is prefilled once and each step processes one token against the cached keys and values.
The model is untrained (speed does not depend on the weights): 6 layers, 6 heads, width 384,
context 1024, character vocabulary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import save


def main() -> None:
    import torch

    from scratchlm.generate import SamplingConfig, stream
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=256)
    p.add_argument(
        "--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "decode_latency.png")
    )
    args = p.parse_args()
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=65,
        n_layer=6,
        n_head=6,
        d_model=384,
        block_size=1024,
        position="rope",
        norm="rmsnorm",
        mlp="gelu",
        bias=False,
    )
    model = GPT(config).eval()
    prompt = torch.randint(0, 65, (1, args.prompt))
    rows = {}
    for use_cache in (True, False):
        times, tokens = [], []
        start = last = time.perf_counter()
        for token in stream(model, prompt, args.new, SamplingConfig(temperature=0), use_cache=use_cache):
            now = time.perf_counter()
            times.append(now - last)
            tokens.append(int(token))
            last = now
        total = time.perf_counter() - start
        rows["cache" if use_cache else "no_cache"] = {
            "seconds": total,
            "tokens_per_second": args.new / total,
            "first_token_seconds": times[0],
            "per_token_seconds": times,
            "tokens": tokens,
        }
    assert rows["cache"]["tokens"] == rows["no_cache"]["tokens"], "cached and uncached greedy outputs differ"
    speedup = rows["cache"]["tokens_per_second"] / rows["no_cache"]["tokens_per_second"]
    from scratchlm.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    positions = list(range(args.prompt, args.prompt + args.new))
    for name, label in (
        ("no_cache", "no cache: rerun the whole context"),
        ("cache", "KV cache: one position per step"),
    ):
        ax.plot(positions[1:], [t * 1000 for t in rows[name]["per_token_seconds"][1:]], label=label)
    ax.set_xlabel("position of the generated token")
    ax.set_ylabel("milliseconds per token")
    ax.set_title(f"Decode latency, prompt {args.prompt} + {args.new} new tokens (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, args.plot)
    for r in rows.values():
        del r["tokens"]
    path = save(
        "decode",
        {
            "prompt_tokens": args.prompt,
            "new_tokens": args.new,
            "config": config.to_dict(),
            "rows": rows,
            "speedup": speedup,
            "plot": args.plot,
        },
    )
    print(f"prompt {args.prompt} + {args.new} new tokens, greedy, {config.n_layer}x{config.d_model} model")
    for name, r in rows.items():
        print(
            f"  {name:<9} {r['tokens_per_second']:8.1f} tokens/s   prefill+first token {r['first_token_seconds'] * 1000:7.1f} ms"
        )
    print(f"  KV cache speed-up: {speedup:.1f}x (identical greedy output)")
    print(f"  plot: {args.plot}\n-> {path}")


if __name__ == "__main__":
    main()
