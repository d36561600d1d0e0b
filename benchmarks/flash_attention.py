"""FlashAttention as a memory-traffic story: peak memory and bytes moved, standard vs tiled.

    python benchmarks/flash_attention.py [--context 4096] [--plot docs/images/flash_attention_bytes.png]

1. Peak memory of one causal attention forward (batch 1, 8 heads, head width 64, fp32) at
   ``--context`` positions, each variant in its own process (``ru_maxrss`` above a baseline that
   already holds Q, K and V): the spelled-out version that materialises the T x T scores, the
   tiled online-softmax version (``scratchlm/models/blocks/flash_attention.py``), and PyTorch's SDPA.
2. The bytes each approach moves through main memory (``attention_bytes``), plotted against context.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import save

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, {repo!r})
from scratchlm.models.blocks.flash_attention import naive_attention, tiled_attention
torch.manual_seed(0)
T, variant = {context}, {variant!r}
q, k, v = (torch.randn(1, 8, T, 64) for _ in range(3))
fn = {{"materialised T x T": lambda: naive_attention(q, k, v),
       "tiled online softmax": lambda: tiled_attention(q, k, v, block_q=128, block_k=128),
       "PyTorch SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}}[variant]
with torch.no_grad():
    F.scaled_dot_product_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8], is_causal=True)  # warm up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
print(json.dumps({{"variant": variant, "peak_bytes": peak, "seconds": seconds,
                  "max_abs_diff_vs_sdpa": float((out - ref).abs().max())}}))
"""


def main() -> None:
    from scratchlm.models.blocks.flash_attention import attention_bytes
    from scratchlm.plots import pyplot, save_figure

    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=4096)
    p.add_argument(
        "--plot",
        default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "flash_attention_bytes.png"),
    )
    args = p.parse_args()
    repo = str(Path(__file__).resolve().parents[1])
    rows = []
    for variant in ("materialised T x T", "tiled online softmax", "PyTorch SDPA"):
        code = CHILD.format(repo=repo, context=args.context, variant=variant)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    scores_mb = 8 * args.context * args.context * 4 / 2**20
    print(
        f"causal attention, batch 1, 8 heads, head width 64, context {args.context:,}, fp32 "
        f"(one T x T score matrix: {scores_mb:,.0f} MiB)"
    )
    print(f"{'variant':<22} {'peak above Q,K,V':>17} {'seconds':>8} {'max |diff| vs SDPA':>19}")
    for r in rows:
        print(
            f"{r['variant']:<22} {r['peak_bytes'] / 2**20:>13,.0f} MiB {r['seconds']:>8.2f} {r['max_abs_diff_vs_sdpa']:>19.1e}"
        )

    contexts = [2**i for i in range(8, 16)]
    traffic = [attention_bytes(t, head_dim=64, heads=12, bytes_per_value=2, block_q=128) for t in contexts]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.loglog(
        contexts, [b["standard"] / 2**20 for b in traffic], "o-", label="standard (writes and re-reads T×T)"
    )
    ax.loglog(contexts, [b["tiled"] / 2**20 for b in traffic], "s-", label="tiled, query block 128")
    ax.set_xlabel("context length T")
    ax.set_ylabel("MiB moved per layer (12 heads, d=64, bf16)")
    ax.set_title("Attention memory traffic: standard vs FlashAttention tiling")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    plot = save_figure(fig, args.plot)
    print(f"plot: {plot}")
    path = save(
        "flash_attention",
        {
            "context": args.context,
            "rows": rows,
            "bytes_moved": [{"context": t, **b} for t, b in zip(contexts, traffic)],
        },
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
