"""Trace one forward pass and report the shape of every tensor a module hands on (checkpoint C).

Forward hooks on every submodule record what goes in and what comes out, in execution order,
so the table is generated from the code that runs, not written by hand.
"""

from __future__ import annotations

import torch
from torch import nn

from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT, context_flops


def trace_shapes(config: GPTConfig, batch: int = 2, seq: int | None = None, layers: int = 1) -> list[dict]:
    """Rows of (module, its class, input shape, output shape, parameter shapes) for one forward pass.

    Only the first ``layers`` blocks are listed (the others repeat them).
    """
    seq = seq or min(config.block_size, 8)
    model = GPT(config).eval()
    rows: list[dict] = []
    shown = {f"blocks.{i}" for i in range(layers)}

    def listed(name: str) -> bool:
        return not name.startswith("blocks.") or ".".join(name.split(".")[:2]) in shown

    def hook(name):
        def record(module: nn.Module, inputs, output):
            if not listed(name):
                return
            first = next((t for t in inputs if torch.is_tensor(t)), None)
            out = output[0] if isinstance(output, tuple) else output
            rows.append(
                {
                    "module": name,
                    "type": type(module).__name__,
                    "input": list(first.shape) if first is not None else None,
                    "output": list(out.shape) if torch.is_tensor(out) else None,
                    "parameters": {k: list(p.shape) for k, p in module.named_parameters(recurse=False)},
                }
            )

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if n and not isinstance(m, nn.ModuleList)
    ]
    with torch.no_grad():
        idx = torch.randint(0, config.vocab_size, (batch, seq))
        model(idx)
    for h in handles:
        h.remove()
    # Inside attention the fused projection is split and reshaped per head (Attention.forward);
    # those views are not modules, so they are listed from the same formulas, after qkv.
    H, Hkv, D = config.n_head, config.kv_heads, config.head_dim
    inside = [
        ("q", [batch, H, seq, D]),
        ("k, v", [batch, Hkv, seq, D]),
        ("scores q·kᵀ/√D", [batch, H, seq, seq]),
        ("softmax(scores)·v", [batch, H, seq, D]),
        ("heads joined", [batch, seq, H * D]),
    ]
    for i in range(layers):
        at = next(j for j, r in enumerate(rows) if r["module"] == f"blocks.{i}.attn.qkv") + 1
        rows[at:at] = [
            {
                "module": f"blocks.{i}.attn: {name}",
                "type": "(view)",
                "input": None,
                "output": shape,
                "parameters": {},
            }
            for name, shape in inside
        ]
    return rows


def format_shapes(rows: list[dict], config: GPTConfig) -> str:
    c = config
    lines = [
        f"B=batch, T=positions, C=d_model={c.d_model}, H={c.n_head} heads, Hkv={c.kv_heads}, "
        f"D=head width={c.head_dim}, F=MLP width={c.ff_width}, V=vocabulary={c.vocab_size}",
        f"{'module':<34} {'type':<12} {'input':<16} {'output':<16} parameters",
    ]
    for r in rows:
        params = ", ".join(f"{k} {tuple(v)}" for k, v in r["parameters"].items())
        lines.append(
            f"{r['module']:<34} {r['type']:<12} {str(tuple(r['input'] or ())):<16} "
            f"{str(tuple(r['output'] or ())):<16} {params}"
        )
    return "\n".join(lines)


def inference_costs(model: GPT, batch: int = 1, context: int | None = None, bytes_per_value: int = 2) -> dict:
    """Why prefill is compute-bound and decode memory-bound, in numbers (checkpoint E).

    For ``batch`` sequences at ``context`` positions, weights and cache stored with
    ``bytes_per_value`` bytes (2 for bf16):

    * **KV cache**: ``batch x context x`` the bytes per token of :meth:`GPT.kv_cache_bytes_per_token`.
    * **prefill** (all ``context`` prompt positions at once): FLOPs = ``batch x context x`` the
      forward FLOPs per token at the causal average context ``context / 2``; bytes moved = the
      weights once plus the KV cache written.
    * **one decode step** (one new token per sequence): FLOPs = ``batch x`` the forward FLOPs per
      token at ``context``; bytes = the weights once plus the whole KV cache read.

    Arithmetic intensity = FLOPs / bytes. A device does ``peak FLOP/s / bandwidth`` FLOPs per byte
    at its balance point (a few hundred on a GPU, tens on a CPU): far above it a phase is
    compute-bound (prefill, thousands), far below it memory-bound (decode: about ``batch``).
    Activations are left out of the bytes; they make decode even more memory-bound.
    """
    T = context or model.config.block_size
    if batch < 1 or T < 1:
        raise ValueError(f"batch and context must be >= 1, got batch {batch}, context {T}")
    counts = model.parameter_counts()
    weight_bytes = (counts["total"] - counts["positions"]) * bytes_per_value
    # An MoE layer reads only the experts its tokens chose: one sequence's decode step reads the
    # active weights, a large batch all of them (an approximation: tokens spread over experts).
    step_bytes = min(weight_bytes, batch * (counts["active"] - counts["positions"]) * bytes_per_value)
    kv = batch * T * model.kv_cache_bytes_per_token(bytes_per_value)
    prefill_flops = batch * T * model.flops_per_token(max(T // 2, 1))["forward"]
    # A decode step's mixers may work differently from prefill (MLA attends over its latent).
    decode_flops = batch * (
        model.flops_per_token(T)["forward"]
        + sum(
            block.mixer.decode_context_flops(T) - context_flops(block.mixer, T)
            for block in model.blocks
            if hasattr(block.mixer, "decode_context_flops")
        )
    )
    return {
        "batch": batch,
        "context": T,
        "bytes_per_value": bytes_per_value,
        "kv_cache_bytes": kv,
        "weight_bytes": weight_bytes,
        "prefill": {
            "flops": prefill_flops,
            "bytes": weight_bytes + kv,
            "intensity": prefill_flops / (weight_bytes + kv),
        },
        "decode_step": {
            "flops": decode_flops,
            "bytes": step_bytes + kv,
            "intensity": decode_flops / (step_bytes + kv),
        },
    }


def describe_model(config: GPTConfig, batch: int = 1, context: int | None = None) -> dict:
    """What ``scratchlm model info`` reports: parameter counts, layer kinds, FLOPs per token, the KV
    cache and recurrent state per token and per sequence, and :func:`inference_costs` in bf16.
    The model is built on the meta device: describing a 1.5B model costs no memory."""
    with torch.device("meta"):
        model = GPT(config)
    kinds: dict[str, int] = {}
    for mixer, mlp in config.layer_kinds():
        kinds[f"{mixer}+{mlp}"] = kinds.get(f"{mixer}+{mlp}", 0) + 1
    return {
        "config": config.to_dict(),
        "layers": kinds,
        "parameters": model.parameter_counts(),
        "flops_per_token": model.flops_per_token(context),
        "kv_cache_bytes_per_token": {
            "bf16": model.kv_cache_bytes_per_token(2),
            "fp32": model.kv_cache_bytes_per_token(4),
        },
        "kv_cache_values_per_token_per_layer": [
            block.mixer.cache_values_per_token() for block in model.blocks
        ],
        "state_bytes_per_sequence": {
            "bf16": model.state_bytes_per_sequence(2),
            "fp32": model.state_bytes_per_sequence(4),
        },
        "inference_bf16": inference_costs(model, batch, context, bytes_per_value=2),
    }
