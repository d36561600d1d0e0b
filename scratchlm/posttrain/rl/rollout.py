"""Rollouts: replies sampled from the policy through the inference engine, and the loader that
feeds them to the optimizer steps.

A rollout is one batch of sampled replies with everything the optimizer steps need
(:class:`Rollout`: ids, the reply mask, the old policy's and the reference's log-probabilities,
advantages, value targets). :class:`RolloutLoader` serves it in micro-batches, ``epochs``
shuffled passes over it (PPO's ``ppo_epochs``, GRPO's ``num_iterations``), then asks for the next
one; its generator draws the prompts, the samples' seeds and the shuffles, so its saved state
plus the saved rollout (``rollouts.safetensors``, :func:`rollout_file` and
:func:`read_rollout_file`) make resume exact. :func:`sample_replies` samples through the engine,
one seed per reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from scratchlm.models.checkpoint import load_tensors
from scratchlm.serve import chat

ROLLOUT_FILE = "rollouts.safetensors"


@dataclass
class Rollout:
    """One batch of sampled replies, everything the optimizer steps need, as (N, T) tensors."""

    x: torch.Tensor  # input ids (prompt + reply, right-padded)
    y: torch.Tensor  # next ids (-1 at padding)
    mask: torch.Tensor  # 1 at reply tokens (y is a token the policy sampled)
    old_logps: torch.Tensor
    ref_logps: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor  # PPO's value targets (zeros for GRPO)
    values: torch.Tensor  # PPO's value estimates at rollout time (zeros for GRPO)
    metrics: dict  # floats: reward, KL, lengths ... of this rollout

    FIELDS: ClassVar[tuple] = ("x", "y", "mask", "old_logps", "ref_logps", "advantages", "returns", "values")

    def rows(self, index: torch.Tensor) -> tuple:
        return tuple(getattr(self, f)[index] for f in self.FIELDS)


class RolloutLoader:
    """The trainer's ``train_loader``: micro-batches of the current rollout, ``epochs`` shuffled
    passes over it, then a fresh rollout from ``make_rollout()``. Its ``generator`` draws the
    prompts, the samples' seeds and the shuffles, so its saved state plus the saved rollout
    make resume exact."""

    def __init__(self, make_rollout, size: int, batch_size: int, epochs: int, seed: int, device):
        self.make_rollout, self.size, self.batch_size, self.epochs = make_rollout, size, batch_size, epochs
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.rollout: Rollout | None = None
        self.order = torch.zeros(0, dtype=torch.long)
        self.cursor = 0
        self.epoch = 0  # which pass over the current rollout the last micro-batch belonged to

    def get_batch(self):
        if self.rollout is None or self.cursor >= len(self.order):
            self.rollout = self.make_rollout(self.generator)
            self.order = torch.cat(
                [torch.randperm(self.size, generator=self.generator) for _ in range(self.epochs)]
            )
            self.cursor = 0
        index = self.order[self.cursor : self.cursor + self.batch_size]
        self.epoch = self.cursor // self.size
        self.cursor += self.batch_size
        return tuple(t.to(self.device) for t in self.rollout.rows(index))

    def state(self) -> dict[str, torch.Tensor] | None:
        if self.rollout is None:
            return None
        r = self.rollout
        tensors = {f: getattr(r, f).detach().cpu().contiguous() for f in Rollout.FIELDS}
        tensors["order"] = self.order.clone()
        tensors["position"] = torch.tensor([self.cursor])
        tensors["metric_values"] = torch.tensor(
            [r.metrics[k] for k in sorted(r.metrics)], dtype=torch.float64
        )
        return {"tensors": tensors, "metric_names": sorted(r.metrics)}

    def load(self, saved: dict) -> None:
        t = saved["tensors"]
        metrics = dict(zip(saved["metric_names"], t["metric_values"].tolist()))
        self.rollout = Rollout(**{f: t[f] for f in Rollout.FIELDS}, metrics=metrics)
        self.order = t["order"]
        self.cursor = int(t["position"][0])


def rollout_file(states: list[dict | None]) -> bytes | None:
    """Every rank's loader state (in rank order) as one ``rollouts.safetensors``; None before the
    first rollout."""
    from safetensors.torch import save

    if not all(s is not None for s in states):
        return None
    tensors = {f"rank{r}.{k}": v for r, s in enumerate(states) for k, v in s["tensors"].items()}
    meta = {
        "format": "scratchlm.rollouts",
        "version": "1",
        "world_size": str(len(states)),
        "metric_names": json.dumps(states[0]["metric_names"]),
    }
    return save(tensors, metadata=meta)


def read_rollout_file(folder: Path, rank: int, world_size: int, log) -> dict | None:
    """This rank's saved loader state from ``folder / rollouts.safetensors`` (for
    :meth:`RolloutLoader.load`), or None: none saved yet, or saved by another number of processes
    (then the rollout is dropped, with a warning, and a new one made)."""
    from safetensors import safe_open

    if not (folder / ROLLOUT_FILE).exists():
        return None  # saved before the first rollout: the next step makes one
    tensors = load_tensors(folder, ROLLOUT_FILE)
    with safe_open(str(folder / ROLLOUT_FILE), "pt") as f:
        meta = f.metadata()
    if int(meta["world_size"]) != world_size:
        log(
            f"warning: {folder} holds the rollouts of {meta['world_size']} process(es), this run has "
            f"{world_size}: the current rollout is dropped and a new one made"
        )
        return None
    prefix = f"rank{rank}."
    mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {"tensors": mine, "metric_names": json.loads(meta["metric_names"])}


def sample_replies(
    policy,
    tokenizer,
    prompts: list,
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
) -> tuple[list, list]:
    """``samples_per_prompt`` sampled replies per prompt (:class:`~scratchlm.posttrain.data.PromptWithAnswer`)
    through the inference engine, each with its own seed drawn from ``generator``:
    [(token ids, text, ended)], and the prompts' ids."""
    messages = [p.prompt for p in prompts for _ in range(samples_per_prompt)]
    seeds = torch.randint(2**62, (len(messages),), generator=generator).tolist()
    outs = chat.generate_replies(
        policy, tokenizer, messages, max_new_tokens, temperature=temperature, seeds=seeds
    )
    return [(o["token_ids"], o["text"], o["ended"]) for o in outs], [o["prompt_ids"] for o in outs]
