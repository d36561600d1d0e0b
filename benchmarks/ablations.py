"""Same budget, one switch changed: positions, norms, attention heads, on character Shakespeare.

    python benchmarks/ablations.py --study positions   # learned | sinusoidal | rope | alibi | none
    python benchmarks/ablations.py --study norms       # layernorm | rmsnorm, pre- and post-norm
    python benchmarks/ablations.py --study attention   # MHA (4 KV heads) | GQA (2) | MQA (1)

Each variant starts from configs/shakespeare-char.toml (4 layers, width 128, context 64, Muon),
changes one model switch, trains for ``--steps`` steps with the same seed and data order, and
is evaluated on the full val+test text (the last 10% of tinyshakespeare).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import save

STUDIES = {
    "positions": [{"position": p} for p in ("learned", "sinusoidal", "rope", "alibi", "none")],
    "norms": [{"norm": n, "prenorm": pre} for n in ("layernorm", "rmsnorm") for pre in (True, False)],
    "attention": [{"n_kv_head": kv} for kv in (4, 2, 1)],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--study", choices=sorted(STUDIES), required=True)
    p.add_argument("--steps", type=int, default=600)
    args = p.parse_args()

    from scratchlm.config import load_config
    from scratchlm.data import prepare_dataset, tokenize_dataset
    from scratchlm.eval import evaluate_checkpoint
    from scratchlm.models.config import GPTConfig
    from scratchlm.models.gpt import GPT
    from scratchlm.models.presets import preset
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.train import train

    config_path = Path(__file__).resolve().parents[1] / "configs" / "shakespeare-char.toml"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds, _ = prepare_dataset("shakespeare", tmp / "shakespeare")
        tok = CharTokenizer.train(ds.text("train")).save(tmp / "char.json")
        data = tokenize_dataset(ds, tok, tmp / "char")["path"]
        for i, change in enumerate(STUDIES[args.study]):
            sets = [
                f"train.data={json.dumps(data)}",
                f"train.out_dir={json.dumps(str(tmp / f'run{i}'))}",
                f"train.max_steps={args.steps}",
                f"train.eval_interval={args.steps}",
                "train.sample_tokens=0",
            ]
            sets += [f"model.{k}={json.dumps(v)}" for k, v in change.items()]
            config = load_config(config_path, sets)
            start = time.perf_counter()
            summary = train(config, progress=False)
            seconds = time.perf_counter() - start
            report = evaluate_checkpoint(tmp / f"run{i}" / "last", splits=["val+test"])["splits"]["val+test"]
            model_config = GPTConfig(**{**preset("shakespeare-char").to_dict(), **change})
            model = GPT(model_config)
            rows.append(
                {
                    "change": change,
                    "val_test_loss": report["loss"],
                    "bits_per_byte": report["bits_per_byte"],
                    "parameters": model.parameter_counts()["total"],
                    "kv_bytes_per_token_bf16": model.kv_cache_bytes_per_token(2),
                    "seconds": seconds,
                    "steps": summary["steps"],
                }
            )
            print(
                f"{json.dumps(change):<45} val+test {report['loss']:.4f}  params {rows[-1]['parameters']:,}  "
                f"KV {rows[-1]['kv_bytes_per_token_bf16']} B/token  {seconds:.0f}s",
                flush=True,
            )
    path = save(f"ablation_{args.study}", {"study": args.study, "steps": args.steps, "rows": rows})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
