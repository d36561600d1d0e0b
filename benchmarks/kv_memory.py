"""KV cache memory: MHA vs GQA vs MQA, and a quantised cache, at growing context (docs/kv-cache-memory.md).

    python benchmarks/kv_memory.py [--plot docs/images/kv_memory.png]

Pure arithmetic from the model configuration (``GPT.kv_cache_bytes_per_token``), no timing: a
Llama-3-8B-shaped body (32 layers, 32 query heads of width 128) with 32 (MHA), 8 (GQA, what
Llama 3 ships) and 1 (MQA) key/value heads, each with the cache in fp16/bf16 (2 bytes), fp8/int8
(1 byte) and int4 (half a byte), for one sequence at 1k ... 128k positions and for a batch of 32
at 8k. The weights are 15 GiB in bf16, for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import save


def main() -> None:
    import torch

    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT

    p = argparse.ArgumentParser()
    p.add_argument(
        "--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "kv_memory.png")
    )
    args = p.parse_args()
    contexts = [1024, 4096, 16384, 32768, 131072]
    heads = {"MHA (32 KV heads)": 32, "GQA (8 KV heads)": 8, "MQA (1 KV head)": 1}
    formats = {"bf16": 2, "int8": 1, "int4": 0.5}
    rows = []
    for label, kv in heads.items():
        config = GPTConfig(
            vocab_size=128256,
            n_layer=32,
            n_head=32,
            n_kv_head=kv,
            d_model=4096,
            d_ff=14336,
            block_size=131072,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
            tie_embeddings=False,
        )
        with torch.device("meta"):
            model = GPT(config)
        for fmt, width in formats.items():
            per_token = model.kv_cache_bytes_per_token(2) * width / 2
            rows.append(
                {
                    "layout": label,
                    "format": fmt,
                    "bytes_per_token": per_token,
                    **{f"GiB_at_{c}": per_token * c / 2**30 for c in contexts},
                    "GiB_batch32_at_8192": 32 * 8192 * per_token / 2**30,
                }
            )
    print(
        f"{'layout':20} {'format':6} {'bytes/token':>12} "
        + " ".join(f"{c // 1024:>6}k" for c in contexts)
        + "  batch 32 x 8k"
    )
    for r in rows:
        print(
            f"{r['layout']:20} {r['format']:6} {r['bytes_per_token']:>12,.0f} "
            + " ".join(f"{r[f'GiB_at_{c}']:>7.2f}" for c in contexts)
            + f"  {r['GiB_batch32_at_8192']:>8.1f} GiB"
        )
    print(f"wrote {save('kv_memory', {'model': 'Llama-3-8B shape', 'contexts': contexts, 'rows': rows})}")
    if args.plot:
        from scratchlm.plots import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(8.5, 4))
        styles = {"bf16": "-", "int8": "--", "int4": ":"}
        colors = dict(zip(heads, ["tab:red", "tab:blue", "tab:green"]))
        for r in rows:
            ax.plot(
                contexts,
                [r[f"GiB_at_{c}"] for c in contexts],
                styles[r["format"]],
                color=colors[r["layout"]],
                marker="o",
                markersize=3,
                label=f"{r['layout']}, {r['format']}",
            )
        ax.axhline(15, color="gray", lw=0.8)
        ax.text(contexts[0], 16.5, "the weights themselves (8B in bf16: 15 GiB)", color="gray", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens), one sequence")
        ax.set_ylabel("KV cache (GiB)")
        ax.set_title("KV cache of a Llama-3-8B-shaped model")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(alpha=0.3, which="both")
        print(f"wrote {save_figure(fig, args.plot)}")


if __name__ == "__main__":
    main()
