"""Peak memory of evaluation at GPT-2's shape: a full float32 log-softmax vs chunked per-token NLL.

    python benchmarks/eval_memory.py [--batch 8] [--layers 1]

Evaluation needs ``-log p(next token)`` at every position. The straightforward way,
``log_softmax(logits.float()).gather(...)``, builds a second (B, T, V) float32 tensor beside the
logits: at V = 50,257 and T = 1,024 that is 206 MB per sequence (6.6 GB at batch 32).
``scratchlm.models.loss.token_nll`` computes ``logsumexp(z) - z[y]`` a thousand positions at a
time instead. Each variant runs in its own process and reports its peak resident memory
(``ru_maxrss``) above a baseline that has loaded the model and the data, so the figure is what the
evaluation itself added. The model is GPT-2 small's shape (width 768, 12 heads, context 1,024,
vocabulary 50,257) with fewer layers (``--layers``) so that it runs on a 2-core CPU; the layers do
not change the size of the logits, which is what is measured.
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
import numpy as np, torch
sys.path.insert(0, {repo!r})
from scratchlm.eval.perplexity import evaluate_ids
from scratchlm.models.loss import token_nll
from scratchlm.models.gpt import GPT
from scratchlm.models.presets import preset
from scratchlm.tokenizers import ByteTokenizer

variant, batch, layers = {variant!r}, {batch}, {layers}
torch.manual_seed(0)
config = preset("gpt2")
config.n_layer = layers
model = GPT(config).eval()
T, V = config.block_size, config.vocab_size
ids = np.random.default_rng(0).integers(0, 256, size=batch * T + 1)
tokenizer = ByteTokenizer.train([""], [])
x = torch.from_numpy(np.stack([ids[r * T : r * T + T + 1] for r in range(batch)]).astype(np.int64))
with torch.no_grad():
    model(x[:1, :8])  # warm up allocator and kernels
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start_rss = rss()
t0 = time.perf_counter()
with torch.no_grad():
    logits, _ = model(x[:, :-1])
    after_logits = rss()
    if variant == "full log_softmax":  # the code before the fix, spelled out
        nll = -torch.log_softmax(logits.float(), dim=-1).gather(-1, x[:, 1:, None])[..., 0]
    else:
        nll = token_nll(logits, x[:, 1:])
seconds = time.perf_counter() - t0
print(json.dumps({{"variant": variant, "peak_bytes": rss() - start_rss, "logits_bytes": after_logits - start_rss,
                  "mean_nll": float(nll.mean()), "seconds": seconds}}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=1)
    args = p.parse_args()
    repo = str(Path(__file__).resolve().parents[1])
    rows = []
    for variant in ("full log_softmax", "chunked token_nll"):
        code = CHILD.format(repo=repo, variant=variant, batch=args.batch, layers=args.layers)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    logits_gb = args.batch * 1024 * 50257 * 4 / 1e9
    print(
        f"GPT-2 shape (V 50,257, T 1,024, width 768, {args.layers} layer(s)), batch {args.batch}; "
        f"the float32 logits alone are {logits_gb:.2f} GB"
    )
    print(
        f"{'variant':<20} {'peak above baseline':>20} {'of which logits':>16} {'mean NLL':>10} {'seconds':>8}"
    )
    for r in rows:
        print(
            f"{r['variant']:<20} {r['peak_bytes'] / 1e9:>17.2f} GB {r['logits_bytes'] / 1e9:>13.2f} GB "
            f"{r['mean_nll']:>10.5f} {r['seconds']:>8.2f}"
        )
    before, after = rows[0]["peak_bytes"], rows[1]["peak_bytes"]
    print(
        f"evaluation peak memory: {before / 1e9:.2f} GB -> {after / 1e9:.2f} GB ({before / after:.2f}x less); "
        f"same NLL: {abs(rows[0]['mean_nll'] - rows[1]['mean_nll']) < 1e-4}"
    )
    path = save(
        "eval_memory",
        {"batch": args.batch, "layers": args.layers, "rows": rows, "ratio_before_over_after": before / after},
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
