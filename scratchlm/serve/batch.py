"""Offline batch generation from a JSONL file (``scratchlm generate``).

Each input line is one request: ``{"prompt": "...", "max_tokens": 64, "temperature": 0, ...}`` with
the sampling fields named as in the OpenAI completions API (see
:class:`~scratchlm.serve.params.SamplingParams`); ``"prompt"`` may also be a list of token ids, and
an optional ``"id"`` is copied to the output; fields a line leaves out take the batch's
``defaults`` (the command line's --max-new-tokens and --temperature). Each input line gives one
output line, in input order: line ``n`` of the input is ``"index": n - 1`` of the output. It carries
``text``, ``finish_reason`` and token counts (a line asking for ``"n": k`` gets a list of ``k``
``choices`` instead of ``text`` and ``finish_reason``); a line that cannot be served (a blank line, bad JSON or
UTF-8, an unknown field, a prompt that fills the model's context...) gets an ``error`` field instead,
and the others still run. Blank lines after the last request are not requests (hand-edited files end
with them) and are ignored; a blank line before it is an error line, so that indexes stay line
numbers. ``{"prompt": ""}`` is a request: it starts where text starts
(:func:`~scratchlm.generate.generate.start_ids`), as ``scratchlm sample`` does. The output file is
written atomically once every request has finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from scratchlm.io import atomic_write
from scratchlm.serve.engine import LLMEngine
from scratchlm.serve.params import RequestOutputKind, SamplingParams


def read_requests(path: str | Path, defaults: dict | None = None) -> list[dict]:
    """One dict per line: ``{"line", "id", "prompt", "params"}`` or ``{"line", "error"}``."""
    requests = []
    with open(path, "rb") as f:
        data = f.read()
    lines = data.splitlines(keepends=True)
    while (
        lines and not lines[-1].strip()
    ):  # blank lines after the last request (an editor's trailing newlines)
        lines.pop()
    offset = 0
    for number, raw in enumerate(lines, 1):
        item: dict = {"line": number}
        try:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"invalid UTF-8 at byte offset {offset + e.start} of {path}") from None
            if not line.strip():
                raise ValueError('blank line: each line is one request, a JSON object with a "prompt"')
            fields = json.loads(line)
            if not isinstance(fields, dict) or "prompt" not in fields:
                raise ValueError('each line must be a JSON object with a "prompt"')
            fields = {**(defaults or {}), **fields}
            item["id"] = fields.pop("id", None)
            item["prompt"] = fields.pop("prompt")
            if not isinstance(item["prompt"], (str, list)):
                raise ValueError('"prompt" must be a string or a list of token ids')
            item["params"] = SamplingParams.from_dict(fields)
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            item["error"] = f"line {number}: {e}"
        requests.append(item)
        offset += len(raw)
    return requests


def _result(out) -> dict:
    """An output line's fields: one choice's flat (``n == 1``), or a list of ``choices``."""
    m = out.metrics
    choices = [
        {
            **({"index": c.index} if len(out.outputs) > 1 else {}),
            "text": c.text,
            "finish_reason": c.finish_reason,
            **({"token_ids": c.token_ids} if c.text is None else {}),
            **({"logprobs": c.logprobs} if c.logprobs is not None else {}),
        }
        for c in out.outputs
    ]
    counts = {
        "prompt_tokens": m["prompt_tokens"],
        "completion_tokens": m["output_tokens"],
        "cached_tokens": m["cached_tokens"],
    }
    if len(choices) == 1:
        first = choices[0]
        return {"text": first.pop("text"), "finish_reason": first.pop("finish_reason"), **counts, **first}
    return {"choices": choices, **counts}


def run_batch(
    engine: LLMEngine,
    input_path: str | Path,
    output_path: str | Path,
    *,
    defaults: dict | None = None,
    progress: bool = True,
) -> dict:
    """Serve every request of ``input_path``; write ``output_path``; return a summary."""
    requests = read_requests(input_path, defaults)
    ids: dict[str, int] = {}
    for i, item in enumerate(requests):
        if "error" in item:
            continue
        try:
            params = replace(item["params"], output_kind=RequestOutputKind.FINAL_ONLY)
            ids[engine.add_request(item["prompt"], params)] = i
        except ValueError as e:
            item["error"] = f"line {item['line']}: {e}"
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="generating", unit="req")
    results: dict[int, dict] = {}
    while len(results) < len(ids):
        for out in engine.step():
            if not out.finished:
                continue
            line = requests[ids[out.request_id]]["line"]
            if out.error is not None:
                results[ids[out.request_id]] = {"error": f"line {line}: {out.error}", "completion_tokens": 0}
            else:
                results[ids[out.request_id]] = _result(out)
            if bar is not None:
                bar.update(1)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    with atomic_write(output_path, "w") as f:
        for i, item in enumerate(requests):
            line = {"index": i, **({"id": item["id"]} if item.get("id") is not None else {})}
            line.update({"error": item["error"]} if "error" in item else results[i])
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    generated = sum(r["completion_tokens"] for r in results.values())
    errors = sum("error" in r for r in requests) + sum("error" in r for r in results.values())
    return {
        "requests": len(requests),
        "errors": errors,
        "seconds": seconds,
        "output_tokens": generated,
        "output_tokens_per_second": generated / seconds if seconds else None,
        "output": str(output_path),
        **{k: v for k, v in engine.stats().items() if k.startswith(("prefix", "preempt"))},
    }
