"""``scratchlm sample`` (one request, streamed: sampling or beam search) and ``scratchlm generate``
(offline batch generation with the engine: a JSONL of prompts in, a JSONL of results out)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from scratchlm.cli import flags
from scratchlm.cli.base import Command, check_writable, emit

_ESCAPE = re.compile(
    r"""\\(?:[\\'"abfnrtv]|[0-7]{1,3}|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|N\{[^}]*\}"""
    r"""|(?P<bad>[xuUN]))"""
)


def interpret_escapes(text: str) -> str:
    """Python's backslash escapes in ``text`` (``\\n``, ``\\t``, ``\\u00e9``, ``\\N{BULLET}``...) become the
    characters; every other character, a backslash before anything else included, stays as it is."""
    import codecs

    def one(match: re.Match) -> str:
        if match.group("bad"):
            raise ValueError(
                f"--escapes: {text!r} has an incomplete escape {match.group(0)!r} at position "
                f"{match.start()}; write a backslash itself as \\\\"
            )
        try:
            return codecs.decode(match.group(0), "unicode_escape")
        except UnicodeDecodeError as e:
            raise ValueError(f"--escapes: {match.group(0)!r} in {text!r}: {e.reason}") from None

    return _ESCAPE.sub(one, text)


# The flags `sample` spells each sampling value with, for the one sampling check's messages.
_FLAG_NAMES = {
    "max_new_tokens": "--max-new-tokens",
    "num_samples": "--num-samples",
    "beam_width": "--beam",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repetition_penalty": "--repetition-penalty",
    "length_penalty": "--length-penalty",
}


# What beam search (one deterministic search, by total log-probability) cannot honour.
_NOT_WITH_BEAM = (
    "--temperature",
    "--top-k",
    "--top-p",
    "--min-p",
    "--repetition-penalty",
    "--stop",
    "--num-samples",
    "--stats",
)


def _warn(message: str) -> None:
    print(f"scratchlm: warning: {message}", file=sys.stderr)


class Sample(Command):
    path = ("sample",)
    help = "generate text from a checkpoint"
    runs_model = True

    def register(self, q):
        flags.checkpoint(q)
        flags.tokenizer(q)
        q.add_argument(
            "--prompt",
            default="",
            help="text to continue (default: where text starts: <|endoftext|>, else a newline)",
        )
        q.add_argument("--escapes", action="store_true", help="interpret backslash escapes in --prompt (\\n)")
        flags.max_new_tokens(q)
        flags.temperature(q)
        flags.add(q, "--top-k", type=flags.integer, help="keep the k most likely tokens (0 = off)")
        flags.add(
            q, "--top-p", type=float, help="nucleus: keep the most likely tokens whose probability reaches p"
        )
        flags.add(
            q, "--min-p", type=float, help="keep tokens at least this fraction as likely as the top one"
        )
        flags.add(
            q,
            "--repetition-penalty",
            type=float,
            default=1.0,
            help="make tokens already generated less likely (1 = off)",
        )
        flags.add(
            q,
            "--beam",
            type=flags.integer,
            help="beam search with this many beams, instead of sampling (deterministic: takes no sampling flag)",
        )
        flags.add(
            q, "--length-penalty", type=float, default=1.0, help="beam search: > 1 favours longer outputs"
        )
        flags.add(q, "--stop", action="append", default=[], help="stop at this string (repeatable)")
        flags.num_samples(q, 1)
        flags.seed(q)
        q.add_argument(
            "--no-cache",
            action="store_true",
            help="recompute the whole context each step (slow; for comparison)",
        )
        flags.add(
            q,
            "--stats",
            action="store_true",
            help="report TTFT, inter-token latency, TPOT, prefill and decode tokens/s",
        )
        flags.device(q)
        flags.output(q, progress=False)

    def run(self, args):
        from scratchlm.device import pick_device
        from scratchlm.generate import GenerationStats, SamplingConfig, beam_search, generate_text
        from scratchlm.generate.generate import prompt_ids
        from scratchlm.generate.sampling import check_sampling
        from scratchlm.generate.tokenizer import checkpoint_tokenizer
        from scratchlm.models.checkpoint import load_model_from_checkpoint

        values = {name: getattr(args, name if name != "beam_width" else "beam") for name in _FLAG_NAMES}
        check_sampling({k: v for k, v in values.items() if v is not None}, _FLAG_NAMES)
        if args.beam is not None:
            ignored = [f for f in _NOT_WITH_BEAM if f in flags.given(args)]
            if ignored:
                raise ValueError(
                    f"--beam is beam search, which is deterministic: it cannot honour {', '.join(ignored)}; "
                    "leave them out, or leave --beam out to sample"
                )
        elif "--length-penalty" in flags.given(args):
            raise ValueError("--length-penalty is for beam search: add --beam N, or leave it out")
        prompt = interpret_escapes(args.prompt) if args.escapes else args.prompt
        model, state = load_model_from_checkpoint(args.checkpoint, pick_device(args.device))
        tokenizer = checkpoint_tokenizer(args.checkpoint, state, args.tokenizer)
        ids = prompt_ids(tokenizer, prompt)
        context = model.config.block_size
        if len(ids) > context:
            _warn(
                f"the prompt is {len(ids)} tokens and this model's context {context}: its first "
                f"{len(ids) - context} tokens are dropped (the model sees the last {context})"
            )
        results = []
        start = time.perf_counter()
        if args.beam is not None:
            for out, score in beam_search(
                model,
                ids,
                args.max_new_tokens,
                args.beam,
                length_penalty=args.length_penalty,
                eos_id=tokenizer.eot_token,
                use_cache=not args.no_cache,
                vocab_size=tokenizer.vocab_size,
            ):
                results.append({"text": tokenizer.decode(out), "score": score})
        else:
            sampling = SamplingConfig(
                args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty
            )
            streaming = not args.json and args.num_samples == 1
            for i in range(args.num_samples):
                if streaming:
                    sys.stdout.write(prompt)
                stats = GenerationStats() if args.stats else None
                on_text = (lambda t: (sys.stdout.write(t), sys.stdout.flush())) if streaming else None
                text = generate_text(
                    model,
                    tokenizer,
                    prompt,
                    args.max_new_tokens,
                    sampling,
                    stop=args.stop,
                    on_text=on_text,
                    use_cache=not args.no_cache,
                    seed=args.seed + i,
                    stats=stats,
                )
                results.append({"text": text, **({"stats": stats.summary()} if stats else {})})
                if streaming:
                    print()
                    if stats:
                        print(stats.format(), file=sys.stderr)
            if streaming:
                return
        seconds = time.perf_counter() - start
        emit(
            args,
            {"prompt": prompt, "samples": results, "seconds": seconds},
            "\n---\n".join(
                prompt + r["text"] + (f"  [score {r['score']:.3f}]" if "score" in r else "") for r in results
            ),
        )


class Generate(Command):
    path = ("generate",)
    help = "offline batch generation with the engine: prompts.jsonl -> out.jsonl"
    runs_model = True

    def register(self, q):
        flags.checkpoint(q)
        flags.prompts(q, '{"prompt": "...", "max_tokens": 64, ...}', old=("--input",))
        flags.out(q, "JSONL, one result per prompt line, in input order", old=("--output",))
        flags.tokenizer(q)
        flags.max_new_tokens(
            q, what='for a line without "max_tokens" (the model\'s context may stop it sooner)'
        )
        flags.temperature(q, what='for a line without "temperature"')
        flags.dtype(q)
        flags.add(
            q,
            "--kv-block-size",
            "--block-size",
            type=flags.positive_int,
            default=16,
            help="tokens per KV cache block (not model.block_size, the context)",
        )
        flags.add(
            q,
            "--kv-blocks",
            "--num-blocks",
            type=flags.positive_int,
            help="KV cache blocks (default: from --kv-cache-gb)",
        )
        q.add_argument(
            "--kv-cache-gb", type=flags.positive_float, default=2.0, help="memory cap for the KV cache"
        )
        q.add_argument(
            "--max-num-seqs", type=flags.positive_int, default=64, help="requests running at once at most"
        )
        q.add_argument(
            "--max-num-batched-tokens",
            type=flags.positive_int,
            default=512,
            help="tokens per step (prefill chunks + decodes)",
        )
        q.add_argument("--no-prefix-caching", action="store_true")
        flags.device(q)
        flags.output(q)

    def run(self, args):
        from scratchlm.generate.sampling import check_sampling
        from scratchlm.serve import LLMEngine
        from scratchlm.serve.batch import run_batch

        check_sampling({"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}, _FLAG_NAMES)
        if not Path(args.prompts).is_file():
            raise FileNotFoundError(f"--prompts {args.prompts}: no such file (JSONL, one request per line)")
        check_writable(args.out, "--out")
        engine = LLMEngine.from_checkpoint(
            args.checkpoint,
            tokenizer=args.tokenizer,
            device=args.device,
            dtype=args.dtype,
            block_size=args.kv_block_size,
            num_blocks=args.kv_blocks,
            kv_cache_gb=args.kv_cache_gb,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=not args.no_prefix_caching,
        )
        summary = run_batch(
            engine,
            args.prompts,
            args.out,
            defaults={"max_tokens": args.max_new_tokens, "temperature": args.temperature},
            progress=flags.show_progress(args),
        )
        emit(
            args,
            summary,
            f"{summary['requests']} requests ({summary['errors']} with errors) -> "
            f"{summary['output']}: {summary['output_tokens']} tokens in {summary['seconds']:.1f} s "
            f"({summary['output_tokens_per_second'] or 0:,.1f} tokens/s), prefix-cache hit rate "
            f"{summary['prefix_cache_hit_rate']:.0%}, {summary['preemptions']} preemptions",
        )
        if summary["errors"]:
            raise ValueError(
                f'{summary["errors"]} of {summary["requests"]} requests failed: see their "error" '
                f"fields in {summary['output']}"
            )
