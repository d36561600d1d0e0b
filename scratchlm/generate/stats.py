"""Latency of one generation, the way serving systems report it (checkpoint E: prefill vs decode).

* **TTFT** (time to first token): from the request to the first generated token. It is the
  *prefill*: the whole prompt goes through the model at once, then one token is sampled.
* **ITL** (inter-token latency): the gap between consecutive tokens; each is one *decode* step.
* **TPOT** (time per output token): ``(end-to-end - TTFT) / (tokens - 1)``, the mean ITL.
* **prefill tokens/s** = prompt tokens / TTFT; **decode tokens/s** = 1 / TPOT.

Prefill processes many positions per weight read and is compute-bound; decode processes one per
sequence and is bound by reading the weights and the cache, which is why its tokens/s is far
lower for a single sequence.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Timestamps of one request; :meth:`summary` turns them into the figures above."""

    prompt_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)

    def start(self, prompt_tokens: int) -> None:
        self.prompt_tokens, self.started, self.token_times = prompt_tokens, time.perf_counter(), []

    def token(self) -> None:
        """Call when a generated token is on the host (reading it waits for the device)."""
        self.token_times.append(time.perf_counter())

    def summary(self) -> dict:
        n = len(self.token_times)
        if n == 0:
            return {"prompt_tokens": self.prompt_tokens, "output_tokens": 0}
        ttft = self.token_times[0] - self.started
        e2e = self.token_times[-1] - self.started
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        tpot = (e2e - ttft) / (n - 1) if n > 1 else None
        return {
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": n,
            "ttft_s": ttft,
            "e2e_s": e2e,
            "tpot_s": tpot,
            "itl_median_s": statistics.median(gaps) if gaps else None,
            "itl_max_s": max(gaps) if gaps else None,
            "prefill_tokens_per_second": self.prompt_tokens / ttft if ttft > 0 else None,
            "decode_tokens_per_second": 1 / tpot if tpot else None,
        }

    def format(self) -> str:
        s = self.summary()
        if not s["output_tokens"]:
            return "no tokens generated"
        line = (
            f"{s['prompt_tokens']} prompt + {s['output_tokens']} generated tokens: TTFT {s['ttft_s'] * 1e3:.1f} ms "
            f"(prefill {s['prefill_tokens_per_second']:,.0f} tokens/s), end-to-end {s['e2e_s']:.2f} s"
        )
        if s["tpot_s"]:
            line += (
                f", TPOT {s['tpot_s'] * 1e3:.1f} ms (decode {s['decode_tokens_per_second']:,.1f} tokens/s), "
                f"ITL median {s['itl_median_s'] * 1e3:.1f} ms, max {s['itl_max_s'] * 1e3:.1f} ms"
            )
        return line
