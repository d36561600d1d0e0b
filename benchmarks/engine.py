"""The engine against Hugging Face ``generate``, side by side in one run.

    python benchmarks/engine.py [--quick] [--plot docs/images/engine_load.png]

Models: GPT-2 small's shape (124M) and a small Llama shape (the ``llama-tiny`` preset: 8 layers,
width 512, GQA 8/2, RoPE, SwiGLU), random weights (speed does not depend on them), exported with
``export_hf`` so the peer runs the very same weights. Every figure is the median of ``--repeats``.

1. **batch-1 decode** (prompt 128, 64 new tokens, greedy, fp32 and bf16): decode tokens/s of the
   engine and of ``generate``; the memory-bandwidth bound = measured GB/s / weight bytes per token.
2. **throughput**: 64 requests with prompts of 32-512 and outputs of 16-256 tokens arriving at
   once: output tokens/s of the engine, of ``generate`` one request at a time, and of ``generate``
   on padded static batches of 16.
3. **prefix caching**: 16 requests sharing a 512-token prefix; mean TTFT of requests 2-16 (sent
   together after request 1 finished) with prefix caching on and off.
4. **latency under load**: Poisson arrivals at three rates; TTFT / TPOT / ITL / E2E mean, median
   and p99 and throughput per rate, as vLLM's ``bench serve`` defines them; a plot of throughput
   against p99 TTFT.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import best_of, save


def median(xs):
    return statistics.median(xs) if xs else None


def p99(xs):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]


def measure_bandwidth() -> float:
    """Read bandwidth: summing 256 MiB (a decode step reads its weights; it writes almost nothing)."""
    import torch

    big = torch.rand(256 * 2**20 // 4)
    return big.numel() * 4 / best_of(lambda: big.sum(), repeats=10)


def weight_bytes_per_token(model) -> int:
    """Bytes a decode step reads: every matrix of the blocks and the output layer, once (the input
    embedding is one row per token; a tied output layer is the embedding matrix, counted once)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (name.startswith(("tok_emb", "pos_emb")) and not model.config.tie_embeddings):
            continue
        if name.startswith("pos_emb"):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def hf_generate(hf, prompts, max_new, pad_id=0):
    """Greedy HF generate of exactly ``max_new`` tokens for a batch of prompts (left-padded)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return out[:, width:].tolist()


def batch1(name, model, hf_dir, dtype, repeats, prompt_len=128, new=64) -> dict:
    import copy

    import torch
    import transformers

    from scratchlm.serve import LLM, SamplingParams

    torch_dtype = getattr(torch, dtype)
    ours = copy.deepcopy(model).to(torch_dtype)  # a copy: later sections must keep the float32 weights
    llm = LLM(ours, max_num_seqs=1, enable_prefix_caching=False, num_blocks=64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).eval()
    prompt = random.Random(0).choices(range(model.config.vocab_size), k=prompt_len)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0))  # warm up
    hf_generate(hf, [prompt], 4)
    ours_tps, hf_tps = [], []
    for _ in range(repeats):
        out = llm.generate([prompt], params)[0]
        ours_tps.append(1 / out.metrics["tpot_s"])
        t1 = best_of(lambda: hf_generate(hf, [prompt], 1), repeats=1)
        start = time.perf_counter()
        hf_tokens = hf_generate(hf, [prompt], new)[0]
        tn = time.perf_counter() - start
        hf_tps.append((new - 1) / (tn - t1))
    same = sum(a == b for a, b in zip(out.outputs[0].token_ids, hf_tokens))
    row = {
        "model": name,
        "dtype": dtype,
        "weight_format": llm.engine.stats()["weight_format"],
        "engine_decode_tokens_per_s": median(ours_tps),
        "hf_decode_tokens_per_s": median(hf_tps),
        "weight_bytes_per_token": weight_bytes_per_token(ours),
        "same_greedy_tokens": f"{same}/{new}",
    }
    row["ratio_vs_hf"] = row["engine_decode_tokens_per_s"] / row["hf_decode_tokens_per_s"]
    return row


def workload(vocab, n=64, prompt=(32, 512), output=(16, 256), seed=0):
    rng = random.Random(seed)
    return [(rng.choices(range(vocab), k=rng.randint(*prompt)), rng.randint(*output)) for _ in range(n)]


def throughput(model, hf_dir, repeats, peer_repeats, n) -> dict:
    import transformers

    from scratchlm.serve import LLM, SamplingParams

    requests = workload(model.config.vocab_size, n)
    total = sum(m for _, m in requests)
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, m in requests]
    prompts = [p for p, _ in requests]
    engine_s = []
    for _ in range(repeats):
        llm = LLM(model, max_num_seqs=64, max_num_batched_tokens=512)  # a cold prefix cache each time
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        engine_s.append(time.perf_counter() - start)
    assert sum(len(o.outputs[0].token_ids) for o in outs) == total
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    seq_s, static_s = [], []
    for _ in range(peer_repeats):
        start = time.perf_counter()
        for p, m in requests:
            hf_generate(hf, [p], m)
        seq_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, len(requests), 16):  # static batches: padded prompts, run to the longest output
            group = requests[i : i + 16]
            hf_generate(hf, [p for p, _ in group], max(m for _, m in group))
        static_s.append(time.perf_counter() - start)
    row = {
        "requests": len(requests),
        "output_tokens": total,
        "prompt_tokens": sum(len(p) for p in prompts),
        "engine_tokens_per_s": total / median(engine_s),
        "hf_sequential_tokens_per_s": total / median(seq_s),
        "hf_static16_tokens_per_s": total / median(static_s),
        "engine_preemptions": llm.engine.stats()["preemptions"],
    }
    row["ratio_vs_hf_sequential"] = row["engine_tokens_per_s"] / row["hf_sequential_tokens_per_s"]
    row["ratio_vs_hf_static16"] = row["engine_tokens_per_s"] / row["hf_static16_tokens_per_s"]
    return row


def prefix_caching(model, repeats, prefix_len=512, n=16) -> dict:
    from scratchlm.serve import LLMEngine, SamplingParams

    rng = random.Random(1)
    vocab = model.config.vocab_size
    prefix = rng.choices(range(vocab), k=prefix_len)
    prompts = [prefix + rng.choices(range(vocab), k=32) for _ in range(n)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    result = {}
    for caching in (True, False):
        ttfts, hit_rates = [], []
        for _ in range(repeats):
            engine = LLMEngine(model, enable_prefix_caching=caching, max_num_seqs=16)
            engine.add_request(prompts[0], params)
            while engine.has_unfinished():
                engine.step()
            ids = [engine.add_request(p, params) for p in prompts[1:]]
            first = {}
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        first[out.request_id] = out.metrics["ttft_s"]
            ttfts.append(statistics.mean(first[i] for i in ids))
            hit_rates.append(engine.stats()["prefix_cache_hit_rate"])
        result["on" if caching else "off"] = {"mean_ttft_s": median(ttfts), "hit_rate": median(hit_rates)}
    result["ttft_ratio_on_off"] = result["on"]["mean_ttft_s"] / result["off"]["mean_ttft_s"]
    return result


def under_load(model, rates, n, seed=2) -> list[dict]:
    """Poisson arrivals, driven in real time: a request enters the engine when its arrival time has
    passed; TTFT and E2E count from arrival (queueing included), as a server's clients see them."""
    from scratchlm.serve import LLMEngine, SamplingParams

    rows = []
    for rate in rates:
        rng = random.Random(seed)
        requests = workload(model.config.vocab_size, n, prompt=(32, 256), output=(32, 128), seed=seed)
        arrivals, t = [], 0.0
        for _ in requests:
            t += rng.expovariate(rate)
            arrivals.append(t)
        engine = LLMEngine(model, max_num_seqs=64, max_num_batched_tokens=512)
        pending = list(zip(arrivals, requests))
        done = []
        start = time.perf_counter()
        index = 0
        while pending or engine.has_unfinished():
            now = time.perf_counter() - start
            while pending and pending[0][0] <= now:
                arrival, (p, m) = pending.pop(0)
                rid = engine.add_request(
                    p, SamplingParams(max_tokens=m, temperature=0, ignore_eos=True), str(index)
                )
                index += 1
                engine.requests[rid].seqs[0].timing.arrival = start + arrival  # when the client sent it
            if not engine.has_unfinished():
                time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
                continue
            done += [o for o in engine.step() if o.finished]
        end = max(start + a for a in arrivals)
        last = max(
            o.metrics["e2e_s"] + start + a
            for o, a in zip(sorted(done, key=lambda o: int(o.request_id)), arrivals)
        )
        end = max(end, last)
        metrics = [o.metrics for o in done]
        ttft = [m["ttft_s"] for m in metrics]
        tpot = [m["tpot_s"] for m in metrics if m["tpot_s"] is not None]
        itl = [g for m in metrics for g in m["itl_s"]]
        e2e = [m["e2e_s"] for m in metrics]
        tokens = sum(m["output_tokens"] for m in metrics)
        row = {"rate_per_s": rate, "requests": len(done), "output_tokens_per_s": tokens / (end - start)}
        for label, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
            row[f"{label}_mean_s"], row[f"{label}_median_s"], row[f"{label}_p99_s"] = (
                statistics.mean(xs),
                median(xs),
                p99(xs),
            )
        rows.append(row)
        print(
            f"  rate {rate}/s: {row['output_tokens_per_s']:.1f} tokens/s, TTFT mean {row['ttft_mean_s']:.2f} s "
            f"p99 {row['ttft_p99_s']:.2f} s, TPOT median {row['tpot_median_s'] * 1e3:.0f} ms"
        )
    return rows


def main() -> None:
    import torch

    from scratchlm.models.gpt import GPT
    from scratchlm.models.hf import export_hf
    from scratchlm.models.presets import preset

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer-repeats", type=int, default=1, help="repeats of the slow HF throughput runs")
    p.add_argument(
        "--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "images" / "engine_load.png")
    )
    args = p.parse_args()
    torch.manual_seed(0)
    bandwidth = measure_bandwidth()
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s")
    tmp = Path(tempfile.mkdtemp())
    models = {"gpt2-124M": GPT(preset("gpt2")).eval(), "llama-tiny": GPT(preset("llama-tiny")).eval()}
    for name, model in models.items():
        export_hf(model, tmp / name)
    results = {"bandwidth_GBps": bandwidth / 1e9, "batch1": []}

    for name, model in models.items():
        for dtype in ("float32", "bfloat16"):
            row = batch1(name, model, tmp / name, dtype, args.repeats, new=16 if args.quick else 64)
            row["bound_tokens_per_s"] = bandwidth / row["weight_bytes_per_token"]
            row["fraction_of_bound"] = row["engine_decode_tokens_per_s"] / row["bound_tokens_per_s"]
            results["batch1"].append(row)
            print(
                f"batch-1 decode {name} {dtype}: engine {row['engine_decode_tokens_per_s']:.1f} tokens/s, HF "
                f"{row['hf_decode_tokens_per_s']:.1f} ({row['ratio_vs_hf']:.2f}x), bound "
                f"{row['bound_tokens_per_s']:.1f} ({row['fraction_of_bound']:.2f}), same tokens {row['same_greedy_tokens']}"
            )

    gpt2 = models["gpt2-124M"]
    n = 16 if args.quick else 64
    results["throughput"] = throughput(gpt2, tmp / "gpt2-124M", args.repeats, args.peer_repeats, n)
    t = results["throughput"]
    print(
        f"throughput, {t['requests']} mixed requests: engine {t['engine_tokens_per_s']:.1f} tokens/s, HF one at a "
        f"time {t['hf_sequential_tokens_per_s']:.1f} ({t['ratio_vs_hf_sequential']:.1f}x), HF static batches of 16 "
        f"{t['hf_static16_tokens_per_s']:.1f} ({t['ratio_vs_hf_static16']:.2f}x)"
    )

    results["prefix_caching"] = prefix_caching(gpt2, args.repeats, 128 if args.quick else 512)
    pc = results["prefix_caching"]
    print(
        f"prefix caching: mean TTFT of requests 2-16 {pc['on']['mean_ttft_s'] * 1e3:.0f} ms on vs "
        f"{pc['off']['mean_ttft_s'] * 1e3:.0f} ms off (ratio {pc['ttft_ratio_on_off']:.2f}), hit rate {pc['on']['hit_rate']:.0%}"
    )

    rates = [0.5, 1.0, 2.0] if args.quick else [2.0, 4.0, 8.0]
    results["load"] = under_load(gpt2, rates, 12 if args.quick else 48)
    path = save("engine", results)
    print(f"wrote {path}")
    if args.plot:
        from scratchlm.plots import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = results["load"]
        ax.plot([r["ttft_p99_s"] for r in rows], [r["output_tokens_per_s"] for r in rows], "o-")
        for r in rows:
            ax.annotate(
                f"{r['rate_per_s']:g} req/s",
                (r["ttft_p99_s"], r["output_tokens_per_s"]),
                textcoords="offset points",
                xytext=(5, -10),
            )
        ax.set_xlabel("p99 time to first token (s)")
        ax.set_ylabel("output tokens/s")
        ax.set_title("GPT-2 small on this CPU: throughput vs tail latency")
        ax.grid(alpha=0.3)
        print(f"wrote {save_figure(fig, args.plot)}")


if __name__ == "__main__":
    main()
