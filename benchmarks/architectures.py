"""Modern blocks, same data, same budget: character Shakespeare on a CPU.

    python benchmarks/architectures.py [--steps 500] [--studies mlp,attention,...] [--out DIR --reuse]
                                       [--plot docs/images/architectures.png]
                                       [--balance-plot docs/images/moe_balance.png]
        -> benchmarks/results/architectures.json

Every variant starts from configs/shakespeare-char.toml (4 layers, width 128, 4 heads, Muon,
batch 32 x context 64), changes the blocks a study is about, trains ``--steps`` steps with the
same seed and data order, and is evaluated on the whole val+test text. Studies:

* ``mlp``: a dense SwiGLU MLP vs mixtures of experts with the same *active* width per token;
* ``attention``: MHA vs GQA vs MLA (and the cache each keeps per token);
* ``diff``: standard vs differential attention (V1, V2);
* ``long``: context 256 (batch 8: the same tokens per step): full vs sliding window vs NSA;
* ``mtp``: with and without a multi-token-prediction module (val loss of the main head, and the
  MTP head's acceptance rate under greedy decoding);
* ``hybrid``: a Transformer vs a Jamba-style stack (Mamba layers, attention every other layer);
* ``balance``: an 8-expert MoE with the auxiliary loss vs the loss-free bias vs no balancing,
  the experts' load logged every step (plotted with ``--balance-plot``);
* ``seeds``: the baseline with three seeds: the noise a single-seed difference must beat.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from common import save

BASE = {"mlp": "swiglu"}  # every study's baseline: the shakespeare-char preset with a SwiGLU MLP
MOE = {"layers": ["attention+moe"]}
STUDIES = {
    "mlp": [
        ("dense SwiGLU, width 384", {}),
        (
            "MoE 4 experts, top-1, width 384",
            {**MOE, "moe": {"n_experts": 4, "top_k": 1, "d_expert": 384, "normalize": False}},
        ),
        ("MoE 8 experts, top-2, width 192", {**MOE, "moe": {"n_experts": 8, "top_k": 2, "d_expert": 192}}),
        (
            "MoE 8 top-2 (128) + shared (128), width 384",
            {**MOE, "moe": {"n_experts": 8, "top_k": 2, "d_expert": 128, "n_shared": 1, "d_shared": 128}},
        ),
    ],
    "attention": [
        ("MHA (4 KV heads)", {}),
        ("GQA (2 KV heads)", {"n_kv_head": 2}),
        ("MQA (1 KV head)", {"n_kv_head": 1}),
        (
            "MLA (latent 32 + RoPE key 16)",
            {
                "layers": ["mla"],
                "mla": {"kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32},
            },
        ),
    ],
    "diff": [
        ("standard attention", {}),
        ("differential V1", {"layers": ["diff"], "diff": {"version": 1}}),
        ("differential V2", {"layers": ["diff"], "diff": {"version": 2}}),
    ],
    "long": [
        ("full attention, context 256", {"block_size": 256}),
        (
            "sliding window 64, context 256",
            {"block_size": 256, "layers": ["sliding"], "attn": {"window": 64}},
        ),
        (
            "sliding 64 / full alternating, context 256",
            {"block_size": 256, "layers": ["sliding", "attention"], "attn": {"window": 64}},
        ),
        (
            "NSA (blocks 16/8, 4 selected of 32, window 64), context 256",
            {
                "block_size": 256,
                "layers": ["nsa"],
                "nsa": {
                    "compress_block": 16,
                    "compress_stride": 8,
                    "select_block": 32,
                    "select_count": 4,
                    "window": 64,
                },
            },
        ),
    ],
    "mtp": [
        ("no MTP", {}),
        ("MTP depth 1, weight 0.3", {"mtp": {"depth": 1, "weight": 0.3}}),
    ],
    "hybrid": [
        ("Transformer (RoPE)", {}),
        (
            "Jamba-style: Mamba / attention alternating, no positions",
            {"layers": ["mamba", "attention"], "position": "none"},
        ),
        ("Mamba only, no positions", {"layers": ["mamba"], "position": "none"}),
    ],
    "balance": [
        (
            f"MoE 8 top-2, balance={b}",
            {**MOE, "moe": {"n_experts": 8, "top_k": 2, "d_expert": 192, "balance": b}},
        )
        for b in ("aux", "bias", "none")
    ],
    "seeds": [(f"baseline, seed {s}", {"_seed": s}) for s in (1337, 1, 2)],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated, from {', '.join(STUDIES)}")
    p.add_argument("--out", help="work folder (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="with --out: keep finished runs found there")
    p.add_argument("--plot", help="bar chart of every study's val loss and tokens/s (PNG)")
    p.add_argument("--balance-plot", help="expert load imbalance over training, per balancing method (PNG)")
    args = p.parse_args()
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = sorted(set(studies) - set(STUDIES))
    if unknown:
        raise SystemExit(f"unknown studies {unknown}; choose from {', '.join(STUDIES)}")

    from scratchlm.config import load_config
    from scratchlm.data import prepare_dataset, tokenize_dataset
    from scratchlm.eval import evaluate_checkpoint
    from scratchlm.models.gpt import GPT
    from scratchlm.models.presets import config_from_section
    from scratchlm.tokenizers import CharTokenizer
    from scratchlm.train import train

    config_path = Path(__file__).resolve().parents[1] / "configs" / "shakespeare-char.toml"
    work = Path(args.out or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    ds, _ = prepare_dataset("shakespeare", work / "shakespeare")
    tok_path = work / "char.json"
    if not tok_path.exists():
        CharTokenizer.train(ds.text("train")).save(tok_path)
    data = tokenize_dataset(ds, tok_path, work / "char")["path"]

    rows = []
    for study in studies:
        for i, (label, change) in enumerate(STUDIES[study]):
            change = copy.deepcopy(change)
            seed = change.pop("_seed", None)
            run = work / f"{study}-{i}"
            config = load_config(
                config_path,
                [
                    f"train.data={json.dumps(str(data))}",
                    f"train.out_dir={json.dumps(str(run))}",
                    f"train.max_steps={args.steps}",
                    f"train.eval_interval={args.steps}",
                    "train.sample_tokens=0",
                    "train.log_interval=10",
                ],
            )
            model_section = {**config["model"], **BASE, **change}
            config["model"] = model_section
            if seed is not None:
                config["train"]["seed"] = seed
            if model_section.get("block_size", 64) != 64:  # same tokens per step at a longer context
                config["train"]["batch_size"] = 32 * 64 // model_section["block_size"]
            if not (args.reuse and (run / "last").exists()):
                train(config, progress=False)
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            steps = [r for r in records if "loss" in r and "val_loss" not in r]
            speeds = sorted(r["tokens_per_second"] for r in steps if r.get("tokens_per_second"))
            report = evaluate_checkpoint(run / "last", splits=["val+test"])["splits"]["val+test"]
            model_config = config_from_section({**model_section, "vocab_size": 65})
            model = GPT(model_config)
            counts = model.parameter_counts()
            row = {
                "study": study,
                "variant": label,
                "change": change,
                "seed": seed,
                "model_section": {**model_section, "vocab_size": 65},
                "val_test_loss": report["loss"],
                "bits_per_byte": report["bits_per_byte"],
                "parameters": counts["total"],
                "active_parameters": counts["active"],
                "kv_values_per_token": sum(b.mixer.cache_values_per_token() for b in model.blocks),
                "state_values_per_sequence": model.state_bytes_per_sequence(1),
                "tokens_per_second": speeds[len(speeds) // 2] if speeds else None,
                "load": [
                    {k: v for k, v in r.items() if k.startswith("moe/")} | {"step": r["step"]}
                    for r in steps
                    if any(k.startswith("moe/") for k in r)
                ],
            }
            if study == "mtp" and model_config.mtp is not None:
                row["mtp_acceptance"] = _mtp_acceptance(run, ds)
            rows.append(row)
            print(
                f"{study:<9} {label:<55} val+test {row['val_test_loss']:.4f}  "
                f"params {row['parameters']:>9,} (active {row['active_parameters']:,})  "
                f"KV {row['kv_values_per_token']} values/token  {row['tokens_per_second'] or 0:,.0f} tok/s",
                flush=True,
            )
    # Speed, measured apart from training (which may share the machine with other work): each
    # variant's training step (forward, backward, AdamW) on the same batch shape, one after another.
    for row in rows:
        row["tokens_per_second_in_training"] = row.pop("tokens_per_second")
        row["tokens_per_second"] = _step_speed(row["model_section"])
        print(
            f"{row['study']:<9} {row['variant']:<55} {row['tokens_per_second']:,.0f} tokens/s (timed apart)",
            flush=True,
        )
    result = {
        "steps": args.steps,
        "base": "configs/shakespeare-char.toml with mlp=swiglu",
        "rows": rows,
        "threads": torch.get_num_threads(),
        "tokens_per_second": "median of 10 timed training steps (batch x context = 2048 tokens), after 3 warm-up "
        "steps, each variant alone on the machine's threads",
    }
    path = save(
        "architectures" if set(studies) == set(STUDIES) else "architectures_" + "_".join(studies), result
    )
    print(f"-> {path}")
    if args.plot:
        _plot(rows, Path(args.plot))
    if args.balance_plot:
        _plot_balance([r for r in rows if r["study"] == "balance"], Path(args.balance_plot))


def _step_speed(model_section: dict, tokens: int = 2048, steps: int = 10) -> float:
    """Training tokens per second of one variant: the median of ``steps`` timed steps."""
    import statistics

    from scratchlm.models.gpt import GPT
    from scratchlm.models.presets import config_from_section

    torch.manual_seed(0)
    model = GPT(config_from_section(model_section)).train()
    block = model.config.block_size
    x = torch.randint(0, 65, (tokens // block, block))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(3 + steps):
        start = time.perf_counter()
        loss = model(x, x)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return tokens / statistics.median(times)


def _mtp_acceptance(run: Path, ds) -> dict:
    """How often the MTP head's guess of the token after next is what greedy decoding then picks."""
    import torch

    from scratchlm.models.blocks.mtp import mtp_acceptance
    from scratchlm.models.checkpoint import load_model_from_checkpoint
    from scratchlm.tokenizers import load_tokenizer

    model, _ = load_model_from_checkpoint(run / "last", torch.device("cpu"))
    tok = load_tokenizer(run.parent / "char.json")
    text = ds.text("val")
    prompts = [tok.encode(text[i : i + 32]) for i in range(0, 20 * 997, 997)]
    report = mtp_acceptance(model, prompts, max_new_tokens=32)
    return {k: v for k, v in report.items() if k != "tokens"}  # the rates, not the generated ids


def _plot(rows: list[dict], path: Path) -> None:
    from scratchlm.plots import pyplot, save_figure

    plt = pyplot()
    studies = list(dict.fromkeys(r["study"] for r in rows if r["study"] != "seeds"))
    fig, axes = plt.subplots(len(studies), 1, figsize=(9, 1.2 + 0.55 * len(rows)), squeeze=False)
    for ax, study in zip(axes[:, 0], studies):
        mine = [r for r in rows if r["study"] == study]
        ax.barh([r["variant"] for r in mine], [r["val_test_loss"] for r in mine], color="#4c72b0")
        low = min(r["val_test_loss"] for r in mine)
        ax.set_xlim(low - 0.15, max(r["val_test_loss"] for r in mine) + 0.05)
        for y, r in enumerate(mine):
            ax.text(
                r["val_test_loss"],
                y,
                f" {r['val_test_loss']:.3f}  ({r['tokens_per_second'] or 0:,.0f} tok/s)",
                va="center",
                fontsize=8,
            )
        ax.invert_yaxis()
        ax.set_title(study, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("val+test loss (nats per character), same steps and data")
    save_figure(fig, path)


def _plot_balance(rows: list[dict], path: Path) -> None:
    from scratchlm.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in rows:
        points = []
        for p in r["load"]:  # the busiest expert's load over the mean load, averaged over MoE layers
            layers = [v for k, v in p.items() if k.endswith("/imbalance")]
            if layers:
                points.append((p["step"], sum(layers) / len(layers)))
        if points:
            ax.plot(*zip(*points), label=r["variant"].split(", ")[-1])
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("busiest expert's load / mean load")
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
