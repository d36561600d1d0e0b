"""Prefill is compute-bound, decode is memory-bound: measured against this machine's roofline.

    python benchmarks/roofline.py [--plot docs/images/roofline.png]

The benchmark measures the machine first: peak matmul FLOP/s (a large fp32 matrix multiply) and
memory bandwidth (copying a tensor much larger than the caches). A roofline says a computation of
arithmetic intensity I (FLOPs per byte moved) can run at most at ``min(peak, bandwidth x I)``.

Then it times a model (12 layers, width 768, context 1,024: GPT-2 small's body, vocabulary 8,192
to keep the run short; fp32) in the two phases of generation: a **prefill** of P prompt positions
(batch 1, P = 16 ... 1,024) and one **decode step** of B sequences at context 512 (B = 1 ... 64),
each with the KV cache. FLOPs and bytes come from ``scratchlm.models.inspect.inference_costs``
(weights read once, KV cache written or read). Prefill sits far right, near the compute roof;
decode sits far left, under the bandwidth slope, and climbs it as the batch grows.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import best_of, save


def median_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import torch

    from scratchlm.generate import KVCache
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.models.inspect import inference_costs
    from scratchlm.plots import pyplot, save_figure

    p = argparse.ArgumentParser()
    p.add_argument(
        "--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "roofline.png")
    )
    args = p.parse_args()
    torch.manual_seed(0)

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    # A roof is a best case: the fastest of 10 runs.
    peak_flops = 2 * n**3 / best_of(lambda: a @ b, repeats=10)
    big = torch.rand(256 * 2**20 // 4)  # 256 MiB of real pages (never-written pages all map one zero page)
    dst = torch.empty_like(big)
    bandwidth = 2 * big.numel() * 4 / best_of(lambda: dst.copy_(big), repeats=10)  # bytes read + written
    print(
        f"machine: peak matmul {peak_flops / 1e9:,.1f} GFLOP/s (fp32), memory bandwidth {bandwidth / 1e9:,.1f} GB/s, "
        f"balance point {peak_flops / bandwidth:,.1f} FLOPs/byte"
    )

    config = GPTConfig(
        vocab_size=8192,
        n_layer=12,
        n_head=12,
        d_model=768,
        block_size=1024,
        position="rope",
        norm="rmsnorm",
        mlp="gelu",
        bias=False,
    )
    model = GPT(config).eval()
    rows = []
    with torch.no_grad():
        for prompt in (16, 64, 256, 1024):
            ids = torch.randint(0, 8192, (1, prompt))
            seconds = median_time(
                lambda ids=ids, n=prompt: model(ids, cache=KVCache.for_model(model, 1, n), last_only=True), 3
            )
            costs = inference_costs(model, 1, prompt, bytes_per_value=4)["prefill"]
            rows.append({"phase": "prefill", "batch": 1, "tokens": prompt, "seconds": seconds, **costs})
        context = 512
        for batch in (1, 4, 16, 64):
            cache = KVCache.for_model(model, batch, context + 1)
            model(torch.randint(0, 8192, (batch, context)), cache=cache, last_only=True)
            step = torch.randint(0, 8192, (batch, 1))

            def decode_step(cache=cache, step=step):
                cache.length = context  # the same step again: overwrite the last position
                model(step, cache=cache, last_only=True)

            seconds = median_time(decode_step, 5)
            costs = inference_costs(model, batch, context, bytes_per_value=4)["decode_step"]
            rows.append({"phase": "decode", "batch": batch, "tokens": batch, "seconds": seconds, **costs})
    print(
        f"{'phase':<8} {'batch':>5} {'tokens':>6} {'FLOPs/byte':>10} {'GFLOP/s':>9} {'GB/s':>7} {'of roof':>8}"
    )
    for r in rows:
        r["flops_per_second"] = r["flops"] / r["seconds"]
        r["bytes_per_second"] = r["bytes"] / r["seconds"]
        r["roof"] = min(peak_flops, bandwidth * r["intensity"])
        print(
            f"{r['phase']:<8} {r['batch']:>5} {r['tokens']:>6} {r['intensity']:>10.1f} "
            f"{r['flops_per_second'] / 1e9:>9.1f} {r['bytes_per_second'] / 1e9:>7.1f} "
            f"{r['flops_per_second'] / r['roof']:>7.0%}"
        )

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ridge = peak_flops / bandwidth
    ax.loglog(
        [0.5, ridge, 20_000],
        [bandwidth * 0.5 / 1e9, peak_flops / 1e9, peak_flops / 1e9],
        "k-",
        lw=1.5,
        label=f"roofline: {bandwidth / 1e9:.0f} GB/s, {peak_flops / 1e9:.0f} GFLOP/s",
    )
    for phase, marker in (("prefill", "o"), ("decode", "s")):
        pts = [r for r in rows if r["phase"] == phase]
        ax.loglog(
            [r["intensity"] for r in pts],
            [r["flops_per_second"] / 1e9 for r in pts],
            marker,
            ms=7,
            label=f"{phase} ({'prompt' if phase == 'prefill' else 'batch'} "
            f"{', '.join(str(r['tokens'] if phase == 'prefill' else r['batch']) for r in pts)})",
        )
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("Prefill vs decode on this machine's roofline (12 x 768, fp32)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    plot = save_figure(fig, args.plot)
    print(f"plot: {plot}")
    path = save("roofline", {"peak_flops": peak_flops, "bandwidth_bytes_per_second": bandwidth, "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
