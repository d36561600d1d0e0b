"""The ``scratchlm`` command line: a thin layer that parses arguments, calls the API, prints.

Every command that reports numbers takes ``--json`` and then prints exactly one JSON object on
stdout (progress bars go to stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from scratchlm import __version__


def _emit(args, payload: dict, text: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one report: rank 0's
        return
    if getattr(args, "json", False):
        print(json.dumps(_finite(payload), indent=1, default=str))
    else:
        print(text)


def _finite(obj):
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def resolve_tokenizer_path(spec: str) -> Path:
    """A tokenizer JSON path, or ``gpt2`` for GPT-2's tokenizer (built once from OpenAI's files)."""
    if spec == "gpt2":
        from scratchlm.data.sources import cache_dir
        from scratchlm.tokenizers import gpt2_tokenizer

        path = cache_dir() / "gpt2-tokenizer.json"
        if not path.exists():
            gpt2_tokenizer().save(path)
        return path
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {spec!r} does not exist (train one with `scratchlm tokenizer train`, or use 'gpt2')")
    return path


def _load_tokenizer(spec: str):
    from scratchlm.tokenizers import load_tokenizer

    return load_tokenizer(resolve_tokenizer_path(spec))


def _texts(args, split: str) -> list[str]:
    """Documents of a prepared dataset's split, or of a plain text file."""
    from scratchlm.data import Dataset

    if getattr(args, "input", None):
        return [Path(args.input).read_text(encoding="utf-8")]
    return Dataset.load(args.dataset).documents(split)


# --- data -----------------------------------------------------------------------------------
def cmd_data_prepare(args) -> None:
    from scratchlm.data import prepare_dataset

    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        raise ValueError(f"--fractions {args.fractions!r}: expected three numbers train,val,test, e.g. 0.9,0.05,0.05") from None
    name = args.source if not Path(args.source).exists() else Path(args.source).stem
    out = Path(args.out) if args.out else Path("data") / name
    start = time.perf_counter()
    ds, written = prepare_dataset(
        args.source, out, fractions=fractions, seed=args.seed, documents=args.documents, text_field=args.text_field,
        errors=args.errors, nfc=not args.no_nfc, clean_whitespace=args.clean_whitespace, max_bytes=args.max_bytes,
        force=args.force, download=not args.no_download,
    )
    m = ds.manifest
    payload = {"path": str(ds.path), "written": written, "seconds": time.perf_counter() - start, **m}
    lines = [f"{'prepared' if written else 'up to date (same input and options, checksums match)'}: {ds.path}",
             f"source: {m['source']['kind']} {m['source']['name']}  sha256 {m['source']['sha256'][:16]}...",
             f"normalization: {json.dumps({k: v for k, v in m['normalization'].items() if v})}",
             f"duplicates: {m['duplicates']['duplicate_copies']} duplicate copies; leakage check: "
             f"{m['leakage']['shared_documents']} shared documents"]
    for split, e in m["splits"].items():
        lines.append(f"  {split:<5} {e['documents']:>7,} docs {e['characters']:>11,} chars  sha256 {e['sha256'][:16]}...")
    _emit(args, payload, "\n".join(lines))


def cmd_data_tokenize(args) -> None:
    from scratchlm.data import tokenize_dataset

    summary = tokenize_dataset(args.dataset, resolve_tokenizer_path(args.tokenizer), args.out, args.workers,
                               progress=not args.json)
    lines = [f"shards in {summary['path']} (dtype {summary['dtype']}, tokenizer {summary['tokenizer_fingerprint'][:16]})"]
    for split, e in summary["splits"].items():
        lines.append(f"  {split:<5} {e['tokens']:>10,} tokens  {e['bytes_per_token']:.3f} bytes/token  "
                     f"{e['bytes'] / max(e['seconds'], 1e-9) / 1e6:.2f} MB/s")
    _emit(args, summary, "\n".join(lines))


def cmd_data_sources(args) -> None:
    from scratchlm.data import SOURCES

    payload = {name: {"file": s.filename, "url": s.url, "sha256": s.sha256, "description": s.description}
               for name, s in SOURCES.items()}
    text = "\n".join(f"{n:<13} {s.description}\n{'':<13} {s.url}\n{'':<13} sha256 {s.sha256}" for n, s in SOURCES.items())
    _emit(args, payload, text + "\nlocal: stdlib (this Python's standard library), or any file, folder or .jsonl path")


# --- tokenizers ---------------------------------------------------------------------------------
def cmd_tokenizer_train(args) -> None:
    from scratchlm.tokenizers import train_tokenizer

    texts = _texts(args, "train")
    start = time.perf_counter()
    tokenizer = train_tokenizer(args.kind, texts, vocab_size=args.vocab_size, pattern=args.pattern,
                                special_tokens=[] if args.no_special else args.special, unknown=args.unknown,
                                progress=not args.json)
    seconds = time.perf_counter() - start
    tokenizer.save(args.out)
    payload = {"path": args.out, "kind": args.kind, "vocab_size": tokenizer.vocab_size,
               "special_tokens": tokenizer.special_tokens, "fingerprint": tokenizer.fingerprint,
               "train_seconds": seconds, "train_characters": sum(len(t) for t in texts)}
    _emit(args, payload, f"{args.kind} tokenizer, vocabulary {tokenizer.vocab_size}, trained in {seconds:.2f}s -> {args.out}")


def cmd_tokenizer_encode(args) -> None:
    tokenizer = _load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else (Path(args.file).read_text(encoding="utf-8") if args.file else sys.stdin.read())
    ids = tokenizer.encode(text, allowed_special="all" if args.allow_special else frozenset())
    if args.json:
        _emit(args, {"ids": ids, "tokens": len(ids), "bytes": len(text.encode("utf-8"))}, "")
    else:
        print(" ".join(map(str, ids)))


def cmd_tokenizer_decode(args) -> None:
    tokenizer = _load_tokenizer(args.tokenizer)
    raw = args.ids if args.ids else sys.stdin.read().split()
    try:
        ids = [int(i) for i in raw]
    except ValueError:
        raise SystemExit("error: ids must be integers separated by spaces") from None
    text = tokenizer.decode(ids)
    if args.json:
        _emit(args, {"text": text}, "")
    else:
        sys.stdout.write(text + ("" if text.endswith("\n") else "\n"))


def cmd_tokenizer_compare(args) -> None:
    from scratchlm.tokenizers.compare import compare_tokenizers, format_table, plot_comparison

    sizes = [int(v) for v in args.vocab_sizes.split(",")]
    rows = compare_tokenizers(_texts(args, "train"), _texts(args, "val"),
                              bpe_vocab_sizes=sizes, pattern=args.pattern, d_model=args.d_model, progress=not args.json)
    plot = plot_comparison(rows, args.plot, title=f"Tokenizers on {args.dataset or args.input} (held-out split)")
    _emit(args, {"rows": rows, "plot": str(plot)}, format_table(rows) + f"\nplot: {plot}")


# --- bigram ---------------------------------------------------------------------------------------
def cmd_bigram(args) -> None:
    from scratchlm.models.bigram_run import run_bigram

    report = run_bigram(args.dataset, _load_tokenizer(args.tokenizer), models=args.model.split(","),
                        smoothing=args.smoothing, fit_split=args.fit_split, steps=args.steps, lr=args.lr,
                        n_samples=args.num_samples, max_tokens=args.max_new_tokens, seed=args.seed, progress=not args.json,
                        device=args.device)
    lines = []
    for name, r in report["models"].items():
        nll = "  ".join(f"{s} {v:.4f}" for s, v in r["nll"].items())
        lines.append(f"{name} bigram (fit on {report['fit_split']}): NLL nats/token  {nll}")
        lines.append("  perplexity: " + "  ".join(f"{s} {v:.2f}" for s, v in r["perplexity"].items()))
        lines.append("  samples: " + " | ".join(repr(s) for s in r["samples"]))
    _emit(args, report, "\n".join(lines))


# --- model, train, eval, sample ------------------------------------------------------------------
def cmd_model_info(args) -> None:
    from scratchlm.models.gpt import GPT
    from scratchlm.models.inspect import inference_costs

    config = _model_config(args)
    import torch

    with torch.device("meta"):  # shapes only: a 1.5B model costs no memory to describe
        model = GPT(config)
    counts = model.parameter_counts()
    flops = model.flops_per_token(args.context)
    costs = inference_costs(model, args.batch, args.context, bytes_per_value=2)
    kinds: dict[str, int] = {}
    for mixer, mlp in config.layer_kinds():
        kinds[f"{mixer}+{mlp}"] = kinds.get(f"{mixer}+{mlp}", 0) + 1
    cache_values = [block.mixer.cache_values_per_token() for block in model.blocks]
    payload = {"config": config.to_dict(), "layers": kinds, "parameters": counts, "flops_per_token": flops,
               "kv_cache_bytes_per_token": {"bf16": model.kv_cache_bytes_per_token(2), "fp32": model.kv_cache_bytes_per_token(4)},
               "kv_cache_values_per_token_per_layer": cache_values,
               "state_bytes_per_sequence": {"bf16": model.state_bytes_per_sequence(2), "fp32": model.state_bytes_per_sequence(4)},
               "inference_bf16": costs}
    lines = [f"{k:<11} {v:>15,}" + (f"  ({v / 1e9:,.2f}B)" if v >= 1e9 else "")
             for k, v in counts.items() if v or k not in ("ssm", "mtp")]
    lines += ["layers: " + ", ".join(f"{n} x {kind}" for kind, n in kinds.items()),
              f"FLOPs/token: training {flops['train']:,.0f}, forward {flops['forward']:,.0f} "
              f"(at context {args.context or config.block_size})",
              f"KV cache per token: {model.kv_cache_bytes_per_token(2):,} bytes (bf16) = "
              f"{sum(cache_values):,} values over {sum(v > 0 for v in cache_values)} layers "
              f"({', '.join(sorted({str(v) for v in cache_values if v}))} per layer)",
              *([f"recurrent state per sequence: {model.state_bytes_per_sequence(2):,} bytes (bf16), any length"]
                if model.state_bytes_per_sequence(2) else []),
              f"KV cache of {costs['batch']} sequence(s) x {costs['context']:,} positions: "
              f"{costs['kv_cache_bytes'] / 2**20:,.1f} MiB (bf16)",
              f"arithmetic intensity (FLOPs per byte moved, bf16): prefill {costs['prefill']['intensity']:,.0f}, "
              f"one decode step {costs['decode_step']['intensity']:,.1f}"]
    _emit(args, payload, "\n".join(lines))


def _model_config(args):
    """A model config from --preset or --config, with every --set model.key=value applied."""
    from scratchlm.config import load_config
    from scratchlm.models.gpt import config_from_section

    section = load_config(args.config, args.set).get("model", {})
    if args.preset:
        section["preset"] = args.preset
    return config_from_section(section)


def cmd_model_shapes(args) -> None:
    from scratchlm.models.inspect import format_shapes, trace_shapes

    config = _model_config(args)
    rows = trace_shapes(config, args.batch, args.seq)
    _emit(args, {"config": config.to_dict(), "batch": args.batch, "rows": rows}, format_shapes(rows, config))


def cmd_model_import(args) -> None:
    from scratchlm.models.hf import import_hf
    from scratchlm.models.checkpoint import save_model_only

    model = import_hf(args.hf)
    save_model_only(args.out, model, source=str(args.hf))
    counts = model.parameter_counts()
    _emit(args, {"out": args.out, "config": model.config.to_dict(), "parameters": counts},
          f"imported {args.hf} ({counts['total']:,} parameters) -> checkpoint {args.out}")


def cmd_model_export(args) -> None:
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint
    from scratchlm.models.hf import export_hf

    model, state = load_model_from_checkpoint(args.checkpoint)
    if args.tokenizer:
        tokenizer = _load_tokenizer(args.tokenizer)
    else:
        try:
            tokenizer = load_checkpoint_tokenizer(args.checkpoint, state)
        except (ValueError, FileNotFoundError):  # an imported model: its tokenizer is not ours to write
            tokenizer = None
    out = export_hf(model, args.out, args.arch, tokenizer=tokenizer)
    wrote = "config.json + model.safetensors" + (" + tokenizer.json + tokenizer_config.json" if tokenizer else
                                                 " (no tokenizer: pass --tokenizer to include one)")
    _emit(args, {"out": str(out), "tokenizer": tokenizer is not None}, f"exported {args.checkpoint} -> {out} ({wrote})")


def cmd_parallel_simulate(args) -> None:
    from scratchlm.train.pipeline_schedule import plot_timeline, simulate

    timeline = simulate(args.schedule, args.stages, args.chunks, args.forward, args.backward_input,
                        args.backward_weight, args.overlap)
    if args.plot:
        plot_timeline(timeline, args.plot)
    payload = timeline.to_dict(events=False) | {"plot": args.plot}
    lines = [f"{args.schedule}: {args.stages} stages, {args.chunks} micro-batches, total time {timeline.total_time:g}",
             f"{'rank':>4} {'busy':>8} {'bubble':>8} {'params':>6} {'activations':>11}"]
    lines += [f"{r:>4} {timeline.busy[r]:>8g} {timeline.bubble[r]:>8g} {timeline.parameter_memory[r]:>5}x "
              f"{timeline.activation_memory[r]:>11}" for r in range(args.stages)]
    caveat = "" if payload["table2_conditions_hold"] else " (its conditions do not hold here: see docs/pipeline-parallelism.md)"
    lines.append(f"bubble per rank (max): {payload['max_bubble']:g}; DeepSeek-V3 Table 2 formula: "
                 f"{payload['table2_bubble']:g}{caveat}" + (f"\ntimeline: {args.plot}" if args.plot else ""))
    _emit(args, payload, "\n".join(lines))


def cmd_train(args) -> None:
    from scratchlm.config import load_config
    from scratchlm.train import train

    summary = train(load_config(args.config, args.set), resume=args.resume, progress=not args.json,
                    overwrite=args.overwrite)
    _emit(args, summary, f"done: {summary['steps']} steps ({summary['stop_reason']}), best val loss "
                         f"{summary['best_val_loss']:.4f}, {summary['seconds']:.0f}s\ncheckpoints: {summary['out_dir']}/best, "
                         f"{summary['out_dir']}/last\nloss plot: {summary['loss_plot']}")


def _posttrain_sections(args, method: str) -> tuple[dict, dict]:
    """The method's section ([sft], [dpo], ...) and [train], from the flags and --set overrides."""
    from scratchlm.config import apply_overrides

    sections = apply_overrides({method: {}, "train": {}}, args.set)
    if set(sections) - {method, "train"}:
        raise ValueError(f"--set takes {method}.key=value or train.key=value, got sections "
                         f"{sorted(set(sections) - {method, 'train'})}")
    sections[method].update({"base": args.checkpoint, "data": args.data, "skip_invalid": args.skip_invalid,
                             **({"tokenizer": args.tokenizer} if args.tokenizer else {}),
                             **({"val_data": args.val_data} if args.val_data else {}),
                             **({"lora_rank": args.lora_rank} if args.lora_rank is not None else {})})
    sections["train"]["out_dir"] = args.out
    return sections[method], sections["train"]


def cmd_dpo(args) -> None:
    from scratchlm.posttrain.dpo import dpo
    from scratchlm.train.metrics import read_evaluations

    method, train = _posttrain_sections(args, "dpo")
    if args.beta is not None:
        method["beta"] = args.beta
    summary = dpo(method, train, resume=args.resume, progress=not args.json, overwrite=args.overwrite)
    evals = read_evaluations(args.out, "val_rewards/accuracies")
    summary["eval"] = evals
    text = f"done: {summary['steps']} steps ({summary['stop_reason']}), best held-out DPO loss {summary['best_val_loss']:.4f}"
    if evals:
        text += (f"\nheld-out preference accuracy: reference {evals[0]['val_reference_preference_accuracy']:.1%}, "
                 f"after {evals[-1]['val_preference_accuracy']:.1%} (step {evals[-1]['step']}); rewards/accuracies "
                 f"{evals[-1]['val_rewards/accuracies']:.1%}, margin {evals[-1]['val_rewards/margins']:.3f}")
    _emit(args, summary, text + f"\ncheckpoints: {args.out}/best, {args.out}/last")


def cmd_reward_model(args) -> None:
    from scratchlm.posttrain.reward import train_reward_model
    from scratchlm.train.metrics import read_evaluations

    method, train = _posttrain_sections(args, "reward_model")
    summary = train_reward_model(method, train, resume=args.resume, progress=not args.json, overwrite=args.overwrite)
    evals = read_evaluations(args.out, "val_accuracy")
    summary["eval"] = evals
    text = f"done: {summary['steps']} steps ({summary['stop_reason']}), best held-out loss {summary['best_val_loss']:.4f}"
    if evals:
        text += (f"\nheld-out pair accuracy {evals[0]['val_accuracy']:.1%} (step {evals[0]['step']}) -> "
                 f"{evals[-1]['val_accuracy']:.1%} (step {evals[-1]['step']}), margin {evals[-1]['val_margin']:.3f}")
    _emit(args, summary, text + f"\ncheckpoints: {args.out}/best, {args.out}/last (model + reward_head.safetensors)")


def cmd_rl(args) -> None:
    """``scratchlm ppo`` and ``scratchlm grpo``."""
    from scratchlm.posttrain.grpo import grpo
    from scratchlm.posttrain.ppo import ppo
    from scratchlm.train.metrics import read_evaluations

    method, train = _posttrain_sections(args, args.command)
    if getattr(args, "reward_model", None):
        method["reward_model"] = args.reward_model
    run = ppo if args.command == "ppo" else grpo
    summary = run(method, train, resume=args.resume, progress=not args.json, overwrite=args.overwrite)
    evals = read_evaluations(args.out, "val_reward")
    summary["eval"] = evals
    text = f"done: {summary['steps']} steps ({summary['stop_reason']}), {summary['seconds']:.0f}s"
    if evals:
        first, last = evals[0], evals[-1]
        text += f"\nheld-out reward (greedy) {first['val_reward']:.3f} (step {first['step']}) -> {last['val_reward']:.3f} (step {last['step']})"
        if "val_exact_match" in last:
            text += f", exact match {first['val_exact_match']:.1%} -> {last['val_exact_match']:.1%}"
    _emit(args, summary, text + f"\ncheckpoints: {args.out}/best (highest held-out reward), {args.out}/last")


def cmd_sft(args) -> None:
    from scratchlm.posttrain.sft import exact_match_before_after, sft

    method, train = _posttrain_sections(args, "sft")
    summary = sft(method, train, resume=args.resume, progress=not args.json, overwrite=args.overwrite)
    if args.eval_prompts:
        summary["exact_match"] = exact_match_before_after(args.checkpoint, Path(args.out) / "best", args.eval_prompts,
                                                           args.tokenizer)
    text = (f"done: {summary['steps']} steps ({summary['stop_reason']}), best held-out loss "
            f"{summary['best_val_loss']:.4f}, {summary['seconds']:.0f}s\ncheckpoints: {args.out}/best, {args.out}/last")
    if args.eval_prompts:
        em = summary["exact_match"]
        text += (f"\nexact match on {em['after']['n']} held-out prompts: {em['before']['exact_match']:.1%} before, "
                 f"{em['after']['exact_match']:.1%} after; replies ending with <|im_end|>: "
                 f"{em['after']['ended_with_end_of_turn']:.1%}")
    _emit(args, summary, text)


def cmd_eval(args) -> None:
    from scratchlm.eval import evaluate_checkpoint, format_report

    report = evaluate_checkpoint(args.checkpoint, args.data, splits=args.splits.split(","), device=args.device,
                                 batch_size=args.batch_size, progress=not args.json)
    _emit(args, report, format_report(report))


def cmd_sample(args) -> None:
    from scratchlm.device import pick_device
    from scratchlm.generate import GenerationStats, SamplingConfig, beam_search, generate_text
    from scratchlm.models.checkpoint import load_model_from_checkpoint

    model, state = load_model_from_checkpoint(args.checkpoint, pick_device(args.device))
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else _checkpoint_tokenizer(args.checkpoint, state)
    prompt = interpret_escapes(args.prompt) if args.escapes else args.prompt
    results = []
    start = time.perf_counter()
    if args.beam:
        ids = tokenizer.encode(prompt, allowed_special="all") if prompt else [tokenizer.eot_token or 0]
        for out, score in beam_search(model, ids, args.max_new_tokens, args.beam, length_penalty=args.length_penalty,
                                      eos_id=tokenizer.eot_token, use_cache=not args.no_cache):
            results.append({"text": tokenizer.decode(out), "score": score})
    else:
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
        streaming = not args.json and args.num_samples == 1
        for i in range(args.num_samples):
            if streaming:
                sys.stdout.write(prompt)
            stats = GenerationStats() if args.stats else None
            text = generate_text(model, tokenizer, prompt, args.max_new_tokens, sampling, stop=args.stop,
                                 on_text=(lambda t: (sys.stdout.write(t), sys.stdout.flush())) if streaming else None,
                                 use_cache=not args.no_cache, seed=None if args.seed is None else args.seed + i,
                                 stats=stats)
            results.append({"text": text, **({"stats": stats.summary()} if stats else {})})
            if streaming:
                print()
                if stats:
                    print(stats.format(), file=sys.stderr)
        if streaming:
            return
    seconds = time.perf_counter() - start
    _emit(args, {"prompt": prompt, "samples": results, "seconds": seconds},
          "\n---\n".join(prompt + r["text"] + (f"  [score {r['score']:.3f}]" if "score" in r else "") for r in results))


def cmd_generate(args) -> None:
    from scratchlm.serve import LLMEngine
    from scratchlm.serve.batch import run_batch

    engine = LLMEngine.from_checkpoint(
        args.checkpoint, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype, block_size=args.block_size,
        num_blocks=args.num_blocks, kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching)
    summary = run_batch(engine, args.input, args.output, progress=not args.json)
    _emit(args, summary, f"{summary['requests']} requests ({summary['errors']} with errors) -> {summary['output']}: "
          f"{summary['output_tokens']} tokens in {summary['seconds']:.1f} s "
          f"({summary['output_tokens_per_second'] or 0:,.1f} tokens/s), prefix-cache hit rate "
          f"{summary['prefix_cache_hit_rate']:.0%}, {summary['preemptions']} preemptions")
    if summary["errors"]:
        raise ValueError(f"{summary['errors']} of {summary['requests']} requests failed: see their \"error\" "
                         f"fields in {summary['output']}")


def cmd_tasks(args) -> None:
    from scratchlm.posttrain.data import write_task_data

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manifest = write_task_data(args.out, tasks, train=args.train, test=args.test, difficulty=args.difficulty,
                               seed=args.seed)
    files = ", ".join(f"{name} ({info['records']})" for name, info in manifest["files"].items())
    _emit(args, {"out": args.out, **manifest}, f"wrote {args.out}: {files}")


def cmd_critique_revise(args) -> None:
    from scratchlm.config import apply_overrides
    from scratchlm.posttrain.critique import RewardScorer, critique_revise, load_scorer

    sections = apply_overrides({args.method: {}, "train": {}}, args.set)
    if set(sections) - {args.method, "train"}:
        raise ValueError(f"--set takes {args.method}.key=value or train.key=value (with --method {args.method}), got "
                         f"sections {sorted(set(sections) - {args.method, 'train'})}")
    scorers = {}
    for item in args.scorer:
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--scorer takes NAME=MODULE:FUNCTION, got {item!r}")
        scorers[name] = load_scorer(spec)
    if args.reward_model:  # on --device, scoring each batch of replies at once
        scorers["reward_model"] = RewardScorer(args.reward_model, args.device)
    method = {**sections[args.method], **({"lora_rank": args.lora_rank} if args.lora_rank is not None else {})}
    results = critique_revise(args.checkpoint, args.prompts, args.principles, args.out, eval_prompts=args.eval_prompts,
                              scorers=scorers, tokenizer=args.tokenizer, device=args.device, resume=args.resume,
                              overwrite=args.overwrite, progress=not args.json, skip_invalid=args.skip_invalid,
                              rounds=args.rounds, samples=args.num_samples, method=args.method,
                              temperature=args.temperature, max_tokens=args.max_new_tokens, held_out=args.held_out,
                              seed=args.seed, epochs=args.epochs, method_config=method,
                              train_config={**({"device": args.device} if args.device else {}), **sections["train"]})
    def curve(key, name=None, digits=1):
        return " -> ".join(f"{(c[key][name] if name else c[key]):.{digits}%}" for c in results["compliance"])

    per = "; ".join(f"{name} {curve('per_principle', name, 0)}" for name in results["compliance"][0]["per_principle"])
    _emit(args, results, f"held-out compliance, every principle ({results['compliance'][0]['n']} prompts): greedy "
                         f"{curve('all')}; sampled {curve('sampled_all')}\nper principle (greedy): {per}; ended with "
                         f"<|im_end|> {curve('ended_with_end_of_turn', digits=0)}\nstopped: {results['stop_reason']}; "
                         f"final checkpoint: {results['final_checkpoint']}\nresults: {Path(args.out) / 'results.json'}")


def cmd_lora_merge(args) -> None:
    from scratchlm.posttrain.lora import merge_adapters

    meta = merge_adapters(args.checkpoint, args.adapters, args.out, args.tokenizer)
    _emit(args, {"out": args.out, "rank": int(meta["rank"]), "alpha": float(meta["alpha"])},
          f"merged {args.adapters} (rank {meta['rank']}) into {args.checkpoint} -> {args.out}")


_ESCAPE = re.compile(r"""\\(?:[\\'"abfnrtv]|[0-7]{1,3}|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|N\{[^}]*\}"""
                     r"""|(?P<bad>[xuUN]))""")


def interpret_escapes(text: str) -> str:
    """Python's backslash escapes in ``text`` (``\\n``, ``\\t``, ``\\u00e9``, ``\\N{BULLET}``...) become the
    characters; every other character, a backslash before anything else included, stays as it is."""
    import codecs

    def one(match: re.Match) -> str:
        if match.group("bad"):
            raise ValueError(f"--escapes: {text!r} has an incomplete escape {match.group(0)!r} at position "
                             f"{match.start()}; write a backslash itself as \\\\")
        try:
            return codecs.decode(match.group(0), "unicode_escape")
        except UnicodeDecodeError as e:
            raise ValueError(f"--escapes: {match.group(0)!r} in {text!r}: {e.reason}") from None

    return _ESCAPE.sub(one, text)


def _checkpoint_tokenizer(checkpoint: str, state: dict):
    """The checkpoint's tokenizer (its own, or the training data's), checked by fingerprint."""
    from scratchlm.models.checkpoint import load_checkpoint_tokenizer

    try:
        return load_checkpoint_tokenizer(checkpoint, state)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{e} (--tokenizer)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scratchlm", description="Build a GPT from scratch: data, tokenizers, models.")
    p.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def json_flag(q):
        q.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    data = sub.add_parser("data", help="prepare corpora and token shards").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data.add_parser("prepare", help="normalize, split 90/5/5, check leakage, write a manifest")
    q.add_argument("source", help="shakespeare | names | stdlib | a text file, folder, or .jsonl")
    q.add_argument("--out", help="output folder (default: data/<name>)")
    q.add_argument("--fractions", default="0.9,0.05,0.05", help="train,val,test fractions (default 0.9,0.05,0.05)")
    q.add_argument("--seed", type=int, default=1337, help="seed of the document shuffle")
    q.add_argument("--documents", choices=["whole", "lines"], help="a text file is one document, or one per line")
    q.add_argument("--text-field", default="text", help="field holding the text in a .jsonl file")
    q.add_argument("--errors", choices=["strict", "replace"], default="strict", help="invalid UTF-8: fail or replace")
    q.add_argument("--no-nfc", action="store_true", help="skip Unicode NFC normalization")
    q.add_argument("--clean-whitespace", action="store_true", help="strip trailing spaces, collapse blank-line runs")
    q.add_argument("--max-bytes", type=int, help="read at most about this many bytes (stdlib, folders)")
    q.add_argument("--force", action="store_true", help="prepare again even if the manifest says it is up to date")
    q.add_argument("--no-download", action="store_true", help="never download; use the cache or SCRATCHLM_LOCAL_DATA")
    json_flag(q)
    q.set_defaults(func=cmd_data_prepare)
    q = data.add_parser("tokenize", help="encode every split into .bin token shards, on all cores")
    q.add_argument("--dataset", required=True, help="a prepared dataset folder")
    q.add_argument("--tokenizer", required=True, help="tokenizer JSON file, or 'gpt2'")
    q.add_argument("--out", help="output folder (default: <dataset>/<tokenizer name>)")
    q.add_argument("--workers", type=int, help="parallel workers: threads for tiktoken-backed BPE, else processes (default: every core)")
    json_flag(q)
    q.set_defaults(func=cmd_data_tokenize)
    q = data.add_parser("sources", help="list the named sources, their addresses and checksums")
    json_flag(q)
    q.set_defaults(func=cmd_data_sources)

    tok = sub.add_parser("tokenizer", help="train, use and compare tokenizers").add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    q = tok.add_parser("train", help="train a char, byte or BPE tokenizer on a dataset's train split")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="prepared dataset folder (its train split is used)")
    src.add_argument("--input", help="a plain UTF-8 text file")
    q.add_argument("--kind", choices=["char", "byte", "bpe"], default="bpe")
    q.add_argument("--vocab-size", type=int, help="BPE: total vocabulary size, special tokens included")
    q.add_argument("--pattern", default="gpt2", help="BPE pre-tokenization: gpt2 | cl100k | o200k | a regex")
    specials = q.add_mutually_exclusive_group()
    specials.add_argument("--special", action="append", help="a special token (repeatable); replaces the default "
                          "'<|endoftext|>', which separates documents in token shards")
    specials.add_argument("--no-special", action="store_true", help="no special tokens at all (single-document data only)")
    q.add_argument("--unknown", choices=["error", "replace"], default="error", help="char: unseen characters fail, or map to <|unk|>")
    q.add_argument("--out", required=True, help="where to write the tokenizer JSON")
    json_flag(q)
    q.set_defaults(func=cmd_tokenizer_train)
    q = tok.add_parser("encode", help="text -> ids")
    q.add_argument("--tokenizer", required=True, help="tokenizer JSON file, or 'gpt2'")
    q.add_argument("--text", help="text to encode (default: --file or stdin)")
    q.add_argument("--file", help="file to encode")
    q.add_argument("--allow-special", action="store_true", help="encode special-token spellings as special ids")
    json_flag(q)
    q.set_defaults(func=cmd_tokenizer_encode)
    q = tok.add_parser("decode", help="ids -> text")
    q.add_argument("--tokenizer", required=True, help="tokenizer JSON file, or 'gpt2'")
    q.add_argument("ids", nargs="*", help="ids (default: read from stdin)")
    json_flag(q)
    q.set_defaults(func=cmd_tokenizer_decode)
    q = tok.add_parser("compare", help="char vs byte vs BPE: bytes/token, tokens, embedding cost, plot")
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="prepared dataset (train on train, measure on val)")
    src.add_argument("--input", help="a plain text file (train and measure on it)")
    q.add_argument("--vocab-sizes", default="512,1024,2048,4096", help="BPE vocabulary sizes, comma-separated")
    q.add_argument("--pattern", default="gpt2", help="BPE pre-tokenization pattern")
    q.add_argument("--d-model", type=int, default=384, help="model width for the embedding-cost column")
    q.add_argument("--plot", default="tokenizer_compare.png", help="where to save the PNG")
    json_flag(q)
    q.set_defaults(func=cmd_tokenizer_compare)

    q = sub.add_parser("bigram", help="count and neural bigram baselines (checkpoint A)")
    q.add_argument("--dataset", required=True, help="a prepared dataset folder")
    q.add_argument("--tokenizer", required=True, help="tokenizer JSON file, or 'gpt2'")
    q.add_argument("--model", default="count,neural", help="count, neural, or both (comma-separated)")
    q.add_argument("--smoothing", type=float, default=1.0, help="add-k smoothing of the count model (0 = maximum likelihood)")
    q.add_argument("--fit-split", choices=["train", "all"], default="train", help="fit on train, or on all splits")
    q.add_argument("--steps", type=int, default=300, help="neural bigram optimizer steps")
    q.add_argument("--lr", type=float, default=0.3, help="neural bigram learning rate (Adam)")
    q.add_argument("--num-samples", type=int, default=10, help="number of samples to draw")
    q.add_argument("--max-new-tokens", type=int, default=60, help="longest sample, in tokens")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", help="cuda | mps | cpu (default: the best available)")
    json_flag(q)
    q.set_defaults(func=cmd_bigram)

    model = sub.add_parser("model", help="describe models").add_subparsers(dest="model_command", required=True, metavar="ACTION")
    def model_source(q):
        src = q.add_mutually_exclusive_group(required=True)
        src.add_argument("--preset", help="a preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-tiny, ...)")
        src.add_argument("--config", help="a TOML config with a [model] table")
        q.add_argument("--set", action="append", default=[], help="override, e.g. model.n_kv_head=1 (repeatable)")
        json_flag(q)

    q = model.add_parser("info", help="parameter counts, FLOPs per token, KV-cache memory, prefill/decode intensity")
    model_source(q)
    q.add_argument("--batch", type=int, default=1, help="sequences, for the KV-cache memory and intensity (default 1)")
    q.add_argument("--context", type=int, help="positions per sequence (default: the model's context)")
    q.set_defaults(func=cmd_model_info)
    q = model.add_parser("shapes", help="trace one forward pass: every module's input and output shape")
    model_source(q)
    q.add_argument("--batch", type=int, default=2)
    q.add_argument("--seq", type=int, default=8)
    q.set_defaults(func=cmd_model_shapes)
    q = model.add_parser("import", help="a Hugging Face GPT-2 or Llama folder -> a scratchlm checkpoint")
    q.add_argument("--hf", required=True, help="folder with config.json + model.safetensors")
    q.add_argument("--out", required=True, help="checkpoint folder to write")
    json_flag(q)
    q.set_defaults(func=cmd_model_import)
    q = model.add_parser("export", help="a scratchlm checkpoint -> a Hugging Face folder (GPT2LMHeadModel / LlamaForCausalLM)")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--arch", choices=["gpt2", "llama"], help="default: llama for RoPE models, else gpt2")
    q.add_argument("--tokenizer", help="tokenizer to write in Hugging Face form (default: the checkpoint's)")
    json_flag(q)
    q.set_defaults(func=cmd_model_export)

    parallel = sub.add_parser("parallel", help="parallel training, simulated").add_subparsers(
        dest="parallel_command", required=True, metavar="ACTION")
    q = parallel.add_parser("simulate", help="time a pipeline schedule (1F1B, zero-bubble, DualPipe): bubbles, memory")
    q.add_argument("--schedule", required=True, choices=["1f1b", "zb1p", "dualpipe"])
    q.add_argument("--stages", type=int, required=True, help="pipeline stages P, one per rank (dualpipe: even)")
    q.add_argument("--chunks", type=int, required=True, help="micro-batches (dualpipe: even, at least 2 x stages)")
    q.add_argument("--forward", type=float, default=1.0, help="time F of one stage's forward (default 1)")
    q.add_argument("--backward-input", type=float, default=1.0, help="time B of the backward for inputs (default 1)")
    q.add_argument("--backward-weight", type=float, default=1.0, help="time W of the backward for weights (default 1)")
    q.add_argument("--overlap", type=float, help="dualpipe: time of an overlapped forward + full backward "
                   "(default F+B+W, no gain)")
    q.add_argument("--plot", help="save the timeline as a PNG here")
    json_flag(q)
    q.set_defaults(func=cmd_parallel_simulate)

    q = sub.add_parser("train", help="train a GPT from a TOML config (checkpoint D)")
    q.add_argument("--config", help="configs/<name>.toml")
    q.add_argument("--set", action="append", default=[], help="override a value: section.key=value (repeatable)")
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from <out_dir>/last exactly where it stopped")
    mode.add_argument("--overwrite", action="store_true",
                      help="start a fresh run in an out_dir that holds another run (deletes its checkpoints)")
    json_flag(q)
    q.set_defaults(func=cmd_train)

    q = sub.add_parser("eval", help="cross-entropy, perplexity, bits per byte, loss by position, probes")
    q.add_argument("--checkpoint", required=True, help="a checkpoint folder (e.g. runs/x/best)")
    q.add_argument("--data", help="shards folder (default: the one the checkpoint was trained on)")
    q.add_argument("--splits", default="val,test", help="comma-separated splits; 'val+test' evaluates them as one text")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--device", help="cuda | mps | cpu")
    json_flag(q)
    q.set_defaults(func=cmd_eval)

    q = sub.add_parser("sample", help="generate text from a checkpoint")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--tokenizer", help="tokenizer JSON (default: the one the checkpoint was trained with)")
    q.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    q.add_argument("--escapes", action="store_true", help="interpret backslash escapes in --prompt (\\n)")
    q.add_argument("--max-new-tokens", type=int, default=300)
    q.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    q.add_argument("--top-k", type=int)
    q.add_argument("--top-p", type=float)
    q.add_argument("--min-p", type=float)
    q.add_argument("--repetition-penalty", type=float, default=1.0)
    q.add_argument("--beam", type=int, help="beam search with this many beams (instead of sampling)")
    q.add_argument("--length-penalty", type=float, default=1.0)
    q.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    q.add_argument("--num-samples", type=int, default=1)
    q.add_argument("--seed", type=int)
    q.add_argument("--no-cache", action="store_true", help="recompute the whole context each step (slow; for comparison)")
    q.add_argument("--stats", action="store_true", help="report TTFT, inter-token latency, TPOT, prefill and decode tokens/s")
    q.add_argument("--device", help="cuda | mps | cpu")
    json_flag(q)
    q.set_defaults(func=cmd_sample)

    q = sub.add_parser("generate", help="offline batch generation with the engine: prompts.jsonl -> out.jsonl")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--input", required=True, help='JSONL, one request per line: {"prompt": "...", "max_tokens": 64, ...}')
    q.add_argument("--output", required=True, help="JSONL, one result per input line, in input order")
    q.add_argument("--tokenizer", help="tokenizer JSON or gpt2 (default: the one the checkpoint was trained with)")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and KV cache (bfloat16 halves the bytes each decode step reads)")
    q.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    q.add_argument("--num-blocks", type=int, help="KV cache blocks (default: from --kv-cache-gb)")
    q.add_argument("--kv-cache-gb", type=float, default=2.0, help="memory cap for the KV cache")
    q.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once at most")
    q.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (prefill chunks + decodes)")
    q.add_argument("--no-prefix-caching", action="store_true")
    q.add_argument("--device", help="cuda | mps | cpu")
    json_flag(q)
    q.set_defaults(func=cmd_generate)

    def posttrain_flags(q, method: str, checkpoint: str, data: str) -> None:
        """The flags every post-training command shares."""
        q.add_argument("--checkpoint", required=True, help=checkpoint)
        q.add_argument("--data", required=True, help=data)
        q.add_argument("--val-data", help="held-out JSONL (default: 5%% of --data, set aside by hash)")
        q.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, loss.png)")
        q.add_argument("--lora-rank", type=int, help="train rank-R LoRA adapters instead of every weight")
        q.add_argument("--tokenizer", help="the base's tokenizer (JSON or gpt2), for an imported base")
        q.add_argument("--skip-invalid", action="store_true", help="skip (and count) bad lines instead of stopping")
        q.add_argument("--set", action="append", default=[], help=f"{method}.key=value or train.key=value (repeatable)")
        mode = q.add_mutually_exclusive_group()
        mode.add_argument("--resume", action="store_true", help="continue the run in --out")
        mode.add_argument("--overwrite", action="store_true", help="start over in --out (deletes its checkpoints)")
        json_flag(q)

    q = sub.add_parser("dpo", help="Direct Preference Optimization on (prompt, chosen, rejected) pairs")
    posttrain_flags(q, "dpo", "the starting policy, also the frozen reference (an SFT model)",
                    'JSONL pairs: {"prompt", "chosen", "rejected"}')
    q.add_argument("--beta", type=float, help="strength of the pull towards the reference (default 0.1)")
    q.set_defaults(func=cmd_dpo)

    q = sub.add_parser("reward-model", help="a reward model (scalar head, Bradley-Terry loss) on preference pairs")
    posttrain_flags(q, "reward_model", "the starting model (usually the SFT model)",
                    'JSONL pairs: {"prompt", "chosen", "rejected"}')
    q.set_defaults(func=cmd_reward_model)

    q = sub.add_parser("ppo", help="PPO: sampled replies scored by a reward model (or the answers), KL to the start")
    posttrain_flags(q, "ppo", "the starting policy, also the frozen reference (an SFT model)",
                    'JSONL prompts: {"prompt", "answer"} (the answer may be left out with --reward-model)')
    q.add_argument("--reward-model", help="a `scratchlm reward-model` checkpoint (default: reward = exact answer)")
    q.set_defaults(func=cmd_rl)

    q = sub.add_parser("grpo", help="GRPO: groups of sampled replies, verifiable rewards, group-normalised advantages")
    posttrain_flags(q, "grpo", "the starting policy, also the frozen reference (an SFT model)",
                    'JSONL prompts with the exact answer: {"prompt", "answer"}')
    q.set_defaults(func=cmd_rl)

    q = sub.add_parser("sft", help="supervised fine-tuning on conversations (full or LoRA), masked to the replies")
    posttrain_flags(q, "sft", "the base (pretrained) checkpoint",
                    "JSONL conversations: chat messages, Alpaca or prompt/completion")
    q.add_argument("--eval-prompts", help="prompts JSONL with answers: exact match before and after")
    q.set_defaults(func=cmd_sft)

    q = sub.add_parser("tasks", help="synthetic tasks with exact answers: SFT, preference and RL data, held-out splits")
    q.add_argument("--tasks", default="addition", help="comma-separated: addition, subtraction, count, reverse, sort, "
                   "copy, lookup")
    q.add_argument("--train", type=int, default=2000, help="training problems per task")
    q.add_argument("--test", type=int, default=200, help="held-out problems per task")
    q.add_argument("--difficulty", type=int, default=2, help="digits / string length / keys grow with it")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="folder to write")
    json_flag(q)
    q.set_defaults(func=cmd_tasks)

    q = sub.add_parser("critique-revise", help="constitutional AI loop: critique replies against principles, revise, "
                       "train on the better revisions (SFT) or revision-over-original pairs (DPO)")
    q.add_argument("--checkpoint", required=True, help="the starting model (an SFT model); also the model critic")
    q.add_argument("--prompts", required=True, help='JSONL prompts: {"prompt": text or messages, "answer"?: text}')
    q.add_argument("--principles", required=True, help='JSON list of {"name", "text", "check": {"kind", ...}}')
    q.add_argument("--out", required=True, help="folder: results.json and round-N/ (critiques, data, training run)")
    q.add_argument("--eval-prompts", help="held-out prompts JSONL (default: --held-out of --prompts, set aside by hash)")
    q.add_argument("--held-out", type=float, default=0.2, help="fraction of --prompts kept for measuring (default 0.2)")
    q.add_argument("--rounds", type=int, default=1, help="rounds, each training from the previous round's model")
    q.add_argument("--num-samples", type=int, default=4, help="revision candidates per reply that breaks a principle")
    q.add_argument("--method", choices=("sft", "dpo"), default="sft", help="learn the revisions (sft) or revision "
                   "over original (dpo)")
    q.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the original replies, the "
                   "revision candidates and the sampled compliance measure (default 1.0)")
    q.add_argument("--epochs", type=float, default=3.0, help="passes over each round's data (sets train.max_steps "
                   "unless --set train.max_steps is given; default 3)")
    q.add_argument("--max-new-tokens", type=int, default=32, help="reply length at most, in tokens")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--scorer", action="append", default=[], help="NAME=MODULE:FUNCTION, a (prompt messages, reply) "
                   "-> float function for principles of kind scorer (repeatable)")
    q.add_argument("--reward-model", help="a `scratchlm reward-model` checkpoint, the scorer named reward_model")
    q.add_argument("--lora-rank", type=int, help="train rank-R LoRA adapters each round instead of every weight")
    q.add_argument("--tokenizer", help="the checkpoint's tokenizer (JSON or gpt2), for an imported model")
    q.add_argument("--device", help="auto (default), cpu, cuda, mps: for generation and training")
    q.add_argument("--skip-invalid", action="store_true", help="skip (and count) bad prompt lines instead of stopping")
    q.add_argument("--set", action="append", default=[], help="sft.key=value / dpo.key=value or train.key=value for "
                   "every round's training (repeatable), e.g. train.max_steps=200")
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="keep the finished rounds in --out and go on")
    mode.add_argument("--overwrite", action="store_true", help="start over in --out (deletes its rounds)")
    json_flag(q)
    q.set_defaults(func=cmd_critique_revise)

    lora = sub.add_parser("lora", help="LoRA adapters").add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    q = lora.add_parser("merge", help="fold adapters into the base weights: an ordinary checkpoint")
    q.add_argument("--checkpoint", required=True, help="the base checkpoint the adapters were trained on")
    q.add_argument("--adapters", required=True, help="adapters .safetensors (saved by save_adapters, or a LoRA "
                   "SFT run's checkpoint/adapters.safetensors)")
    q.add_argument("--tokenizer", help="the base's tokenizer, if the checkpoint does not carry one")
    q.add_argument("--out", required=True, help="checkpoint folder to write")
    json_flag(q)
    q.set_defaults(func=cmd_lora_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        # The project's own errors say what was expected and what to do: print them, no traceback.
        # Anything else (a KeyError, a TypeError...) is a bug and keeps its traceback.
        message = str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in message:
            message = f"{e.filename}: {message}"
        print(f"scratchlm: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
