"""Training speed on character-level Shakespeare: nanoGPT's CPU configuration vs our default recipe.

    python benchmarks/train_speed.py

Both runs use the same data (train split: first 90% of tinyshakespeare), the same context (64),
and the *same evaluation*: the same 256 fixed windows of the val split, every 50 steps. Reported:
tokens per second, and the wall time until validation loss first reaches each threshold.

* baseline = configs/nanogpt-cpu.toml: 4 layers, 4 heads, width 128, context 64, batch 12, 2000
  steps, learned positions, LayerNorm, GELU, AdamW 1e-3 with warmup 100 and cosine to 1e-4.
* ours = configs/shakespeare-char.toml: the same size and context, with RoPE, RMSNorm, ReLU²,
  no biases, Muon for hidden matrices, batch 32; stopped once it reaches 1.88.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common import save

THRESHOLDS = (2.0, 1.95, 1.9, 1.88)


def run(config_path: Path, data: str, out: Path, **overrides) -> dict:
    from scratchlm.config import load_config
    from scratchlm.train import train

    sets = [
        f"train.data={json.dumps(data)}",
        f"train.out_dir={json.dumps(str(out))}",
        "train.eval_interval=50",
        "train.eval_windows=256",
        "train.sample_tokens=0",
    ] + [f"train.{k}={json.dumps(v)}" for k, v in overrides.items()]
    summary = train(load_config(config_path, sets), progress=False)
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    reach = {}
    for t in THRESHOLDS:
        hit = next((r for r in evals if r["val_loss"] <= t), None)
        reach[str(t)] = None if hit is None else {"seconds": hit["seconds"], "step": hit["step"]}
    return {
        "config": str(config_path),
        "steps": summary["steps"],
        "seconds": summary["seconds"],
        "tokens_per_second": sum(r["tokens_per_second"] for r in steps[5:]) / max(len(steps) - 5, 1),
        "final_val_loss": evals[-1]["val_loss"],
        "best_val_loss": summary["best_val_loss"],
        "time_to": reach,
    }


def main() -> None:
    from scratchlm.data import prepare_dataset, tokenize_dataset
    from scratchlm.tokenizers import CharTokenizer

    configs = Path(__file__).resolve().parents[1] / "configs"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds, _ = prepare_dataset("shakespeare", tmp / "shakespeare")
        tok = CharTokenizer.train(ds.text("train")).save(tmp / "char.json")
        data = tokenize_dataset(ds, tok, tmp / "char")["path"]
        baseline = run(configs / "nanogpt-cpu.toml", data, tmp / "baseline")
        ours = run(configs / "shakespeare-char.toml", data, tmp / "ours", target_loss=1.88)
    result = {"baseline": baseline, "ours": ours, "thresholds": THRESHOLDS}
    path = save("train_speed", result)
    print(
        f"{'':<24} {'tokens/s':>9} "
        + " ".join(f"{'to ' + str(t):>10}" for t in THRESHOLDS)
        + f" {'final val':>10}"
    )
    for name, r in (("nanoGPT CPU config", baseline), ("scratchlm default", ours)):
        cells = " ".join(
            f"{(str(round(r['time_to'][str(t)]['seconds'], 1)) + 's') if r['time_to'][str(t)] else 'never':>10}"
            for t in THRESHOLDS
        )
        print(f"{name:<24} {r['tokens_per_second']:>9,.0f} {cells} {r['final_val_loss']:>10.4f}")
    for t in THRESHOLDS:
        b, o = baseline["time_to"][str(t)], ours["time_to"][str(t)]
        if b and o:
            print(f"time to {t}: ours / baseline = {o['seconds'] / b['seconds']:.2f}")
        elif o:
            print(
                f"time to {t}: baseline never reached it in {baseline['seconds']:.0f}s; ours took {o['seconds']:.1f}s "
                f"(ratio < {o['seconds'] / baseline['seconds']:.2f})"
            )
    print(f"-> {path}")


if __name__ == "__main__":
    main()
