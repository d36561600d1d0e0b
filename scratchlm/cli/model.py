"""``scratchlm model`` (describe a model, import and export Hugging Face folders) and
``scratchlm bigram`` (the count and neural bigram baselines)."""

from __future__ import annotations

from scratchlm.cli import flags
from scratchlm.cli.base import Command, emit, load_tokenizer


def _export_architectures():
    from scratchlm.models.hf import EXPORT_FAMILIES

    return sorted(EXPORT_FAMILIES)


def _model_source(q) -> None:
    """``--preset`` or ``--config``, then ``--set model.key=value`` overrides."""
    src = q.add_mutually_exclusive_group(required=True)
    flags.preset(src)
    flags.config(src, "its [model] table")
    flags.overrides(q, "e.g. model.n_kv_head=1")
    flags.output(q, progress=False)


def _model_config(args):
    """A model config from --preset or --config, with every --set model.key=value applied."""
    from scratchlm.config import load_config
    from scratchlm.models.blocks.attention import LEGACY_PATHS
    from scratchlm.models.presets import config_from_section

    section = load_config(args.config, args.set, aliases=LEGACY_PATHS).get("model", {})
    if args.preset:
        section["preset"] = args.preset
    return config_from_section(section)


class Info(Command):
    path = ("model", "info")
    help = "parameter counts, FLOPs per token, KV-cache memory, prefill/decode intensity"

    def register(self, q):
        _model_source(q)
        flags.batch_size(q, 1, "for the KV-cache memory and intensity", old=("--batch",))
        flags.context(q, None)

    def run(self, args):
        from scratchlm.models.inspect import describe_model

        config = _model_config(args)
        r = describe_model(config, args.batch_size, args.context)
        counts, flops, costs = r["parameters"], r["flops_per_token"], r["inference_bf16"]
        values, state = r["kv_cache_values_per_token_per_layer"], r["state_bytes_per_sequence"]["bf16"]
        lines = [
            f"{k:<11} {v:>15,}" + (f"  ({v / 1e9:,.2f}B)" if v >= 1e9 else "")
            for k, v in counts.items()
            if v or k not in ("ssm", "mtp")
        ]
        lines += [
            "layers: " + ", ".join(f"{n} x {kind}" for kind, n in r["layers"].items()),
            f"FLOPs/token: training {flops['train']:,.0f}, forward {flops['forward']:,.0f} "
            f"(at context {args.context or config.block_size})",
            f"KV cache per token: {r['kv_cache_bytes_per_token']['bf16']:,} bytes (bf16) = "
            f"{sum(values):,} values over {sum(v > 0 for v in values)} layers "
            f"({', '.join(sorted({str(v) for v in values if v}))} per layer)",
            *([f"recurrent state per sequence: {state:,} bytes (bf16), any length"] if state else []),
            f"KV cache of {costs['batch']} sequence(s) x {costs['context']:,} positions: "
            f"{costs['kv_cache_bytes'] / 2**20:,.1f} MiB (bf16)",
            "arithmetic intensity (FLOPs per byte moved, bf16): "
            f"prefill {costs['prefill']['intensity']:,.0f}, "
            f"one decode step {costs['decode_step']['intensity']:,.1f}",
        ]
        emit(args, r, "\n".join(lines))


class Shapes(Command):
    path = ("model", "shapes")
    help = "trace one forward pass: every module's input and output shape"

    def register(self, q):
        _model_source(q)
        flags.batch_size(q, 2, old=("--batch",))
        flags.context(q, 8, old=("--seq",))

    def run(self, args):
        from scratchlm.models.inspect import format_shapes, trace_shapes

        config = _model_config(args)
        rows = trace_shapes(config, args.batch_size, args.context)
        emit(
            args,
            {"config": config.to_dict(), "batch": args.batch_size, "rows": rows},
            format_shapes(rows, config),
        )


def _import_families():
    from scratchlm.models.hf import FAMILIES

    return ", ".join(FAMILIES)


PASS_TOKENIZER = "pass --tokenizer to sample/generate (a scratchlm tokenizer JSON or gpt2)"
NO_TOKENIZER = f"the checkpoint has no tokenizer: {PASS_TOKENIZER}"


def _folder_tokenizer(folder, required: bool):
    """The folder's tokenizer.json as ours, read before the weights load. One we cannot reproduce
    exactly is left out with a warning (the weights are still worth having), or refused when
    ``required``."""
    import sys

    from scratchlm.tokenizers.hf import UnreadableTokenizer, read_hf_tokenizer

    try:
        return read_hf_tokenizer(folder)
    except UnreadableTokenizer as e:
        if required:
            raise ValueError(
                f"{e.path} cannot be read exactly: {e.reason}; import without --tokenizer-required to keep "
                f"the weights alone, then {PASS_TOKENIZER}"
            ) from None
        print(f"scratchlm: warning: {e.path} not imported: {e.reason}; {NO_TOKENIZER}", file=sys.stderr)
        return None


class Import(Command):
    path = ("model", "import")
    help = (
        "a Hugging Face folder (config.json + model.safetensors [+ tokenizer.json]) -> a scratchlm checkpoint"
    )

    def register(self, q):
        q.description = (
            "Import a Hugging Face model folder (model_type one of: "
            f"{_import_families()}) and its tokenizer.json, if it has one, into a checkpoint that "
            "`sample`, `chat` and `model export` use without --tokenizer. A tokenizer.json scratchlm "
            "cannot reproduce exactly is left out with a warning (--tokenizer-required refuses instead)."
        )
        q.add_argument("--hf", required=True, help="folder with config.json + model.safetensors")
        flags.out(q, "the checkpoint folder")
        which = q.add_mutually_exclusive_group()
        which.add_argument(
            "--no-tokenizer",
            action="store_true",
            help="import the weights only, leaving out the folder's tokenizer.json (default: import it)",
        )
        which.add_argument(
            "--tokenizer-required",
            action="store_true",
            help="refuse the import when the folder's tokenizer.json cannot be read exactly "
            "(default: import the weights and warn)",
        )
        flags.output(q, progress=False)

    def run(self, args):
        from pathlib import Path

        from scratchlm.models.checkpoint import save_model_only
        from scratchlm.models.hf import import_hf

        folder = Path(args.hf)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"--hf {args.hf}: no such folder (expected config.json + model.safetensors)"
            )
        has_tokenizer = (folder / "tokenizer.json").exists() and not args.no_tokenizer
        tokenizer = _folder_tokenizer(folder, args.tokenizer_required) if has_tokenizer else None
        model = import_hf(folder)
        if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"{folder}/tokenizer.json has {tokenizer.vocab_size} ids, the model {model.config.vocab_size}: "
                "not its tokenizer (import with --no-tokenizer)"
            )
        save_model_only(args.out, model, tokenizer=tokenizer, source=str(args.hf))
        counts = model.parameter_counts()
        kept = f" with its {tokenizer.kind} tokenizer" if tokenizer else ""
        emit(
            args,
            {
                "out": args.out,
                "config": model.config.to_dict(),
                "parameters": counts,
                "tokenizer": tokenizer.kind if tokenizer else None,
            },
            f"imported {args.hf} ({counts['total']:,} parameters){kept} -> checkpoint {args.out}"
            + ("" if tokenizer else f"; {NO_TOKENIZER}"),
        )


class Export(Command):
    path = ("model", "export")
    help = "a scratchlm checkpoint -> a Hugging Face folder (the families the exporter writes)"

    def register(self, q):
        flags.checkpoint(q)
        flags.out(q, "the Hugging Face folder")
        q.add_argument(
            "--arch",
            choices=flags.Registry(_export_architectures),
            metavar="ARCH",
            help="%(choices)s (default: picked from the model, llama for other RoPE models, else gpt2)",
        )
        flags.tokenizer(q)
        flags.output(q, progress=False)

    def run(self, args):
        from scratchlm.models.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint
        from scratchlm.models.hf import export_hf

        model, state = load_model_from_checkpoint(args.checkpoint)
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
        else:
            try:
                tokenizer = load_checkpoint_tokenizer(args.checkpoint, state)
            except (ValueError, FileNotFoundError):  # an imported model: its tokenizer is not ours to write
                tokenizer = None
        out = export_hf(model, args.out, args.arch, tokenizer=tokenizer)
        wrote = "config.json + model.safetensors" + (
            " + tokenizer.json + tokenizer_config.json"
            if tokenizer
            else " (no tokenizer: pass --tokenizer to include one)"
        )
        emit(
            args,
            {"out": str(out), "tokenizer": tokenizer is not None},
            f"exported {args.checkpoint} -> {out} ({wrote})",
        )


class Bigram(Command):
    path = ("bigram",)
    help = "count and neural bigram baselines (checkpoint A)"
    runs_model = True

    def register(self, q):
        flags.dataset(q)
        flags.tokenizer(q, required=True)
        q.add_argument("--model", default="count,neural", help="count, neural, or both (comma-separated)")
        q.add_argument(
            "--smoothing",
            type=float,
            default=1.0,
            help="add-k smoothing of the count model (0 = maximum likelihood)",
        )
        q.add_argument(
            "--fit-split", choices=["train", "all"], default="train", help="fit on train, or on all splits"
        )
        q.add_argument("--steps", type=flags.positive_int, default=300, help="neural bigram optimizer steps")
        q.add_argument("--lr", type=float, default=0.3, help="neural bigram learning rate (Adam)")
        flags.num_samples(q, 10)
        flags.max_new_tokens(q, 60)
        flags.seed(q)
        flags.device(q)
        flags.output(q)

    def run(self, args):
        from scratchlm.generate.sampling import check_sampling
        from scratchlm.models.bigram import run_bigram

        check_sampling(
            {"max_new_tokens": args.max_new_tokens, "num_samples": args.num_samples},
            {"max_new_tokens": "--max-new-tokens", "num_samples": "--num-samples"},
        )
        report = run_bigram(
            args.dataset,
            load_tokenizer(args.tokenizer),
            models=args.model.split(","),
            smoothing=args.smoothing,
            fit_split=args.fit_split,
            steps=args.steps,
            lr=args.lr,
            n_samples=args.num_samples,
            max_tokens=args.max_new_tokens,
            seed=args.seed,
            progress=flags.show_progress(args),
            device=args.device,
        )
        lines = []
        for name, r in report["models"].items():
            nll = "  ".join(f"{s} {v:.4f}" for s, v in r["nll"].items())
            lines.append(f"{name} bigram (fit on {report['fit_split']}): NLL nats/token  {nll}")
            lines.append("  perplexity: " + "  ".join(f"{s} {v:.2f}" for s, v in r["perplexity"].items()))
            lines.append("  samples: " + " | ".join(repr(s) for s in r["samples"]))
        emit(args, report, "\n".join(lines))
