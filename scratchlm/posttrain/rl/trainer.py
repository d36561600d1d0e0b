"""Reinforcement learning on a language model: the loop PPO and GRPO share.

Both repeat one loop (:mod:`scratchlm.posttrain.rl.ppo`, :mod:`scratchlm.posttrain.rl.grpo` fill
in the two method-specific steps; the pure losses are in :mod:`scratchlm.posttrain.rl.losses`,
the rollouts and their loader in :mod:`scratchlm.posttrain.rl.rollout`):

1. **Roll out.** Draw prompts, let the current policy *sample* replies (temperature 1, through the
   inference engine's batched generation), and score each reply: a verifier (1 for the exact
   answer, 0 otherwise) or a reward model.
2. **Remember the old policy.** One no-grad forward pass gives each reply token's log-probability
   under the policy that sampled it (``old_logps``) and under the frozen reference, the model
   as training started (``ref_logps``): the KL penalty keeps the policy near it.
3. **Advantages** (method-specific): how much better than expected each token turned out.
4. **Several optimizer steps on that one rollout** (``epochs`` passes over it in ``batch_size``
   micro-batches), maximising the clipped surrogate of PPO (Schulman et al., 2017)::

       ratio = π(token) / π_old(token)          # 1 on the first step: policy = old policy
       objective = min(ratio · A, clip(ratio, 1 − ε, 1 + ε) · A)

   The clip removes the incentive to move a token's probability further than a factor 1 ± ε
   (ε = 0.2) from the policy that sampled it: the rollout stays a fair sample of the policy it
   is trained on, and one lucky batch cannot throw the policy far.

On the trainer, one *step* is one optimizer step on ``grad_accum`` micro-batches of the current
rollout; a new rollout is made whenever the current one has been used ``epochs`` times. A
checkpoint keeps the rollout being trained on (``rollouts.safetensors``) with the loader's random
state, so a resumed run continues with the same rollout and the same next one: exact resume.
The "validation loss" that picks ``best`` is minus the mean reward of *greedy* replies to
held-out prompts (so ``best`` is the most rewarded checkpoint).

The module is about 400 lines because the loop carries FSDP's share of RL with it: the engine
samples from a plain copy of the sharded policy, and a failure on one rank during a rollout is
agreed on by all before the next collective.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from scratchlm.config import Rule
from scratchlm.posttrain.base import CHAT_RULES, ChatConfig, ChatTrainer, collate
from scratchlm.posttrain.data import load_prompts
from scratchlm.posttrain.rl.losses import sampling_logits, token_logps
from scratchlm.posttrain.rl.rollout import (
    ROLLOUT_FILE,
    Rollout,
    RolloutLoader,
    read_rollout_file,
    rollout_file,
    sample_replies,
)
from scratchlm.serve import chat

RL_RULES = {
    **CHAT_RULES,
    "prompts_per_rollout": Rule(min=1),
    "samples_per_prompt": Rule(min=1),
    "max_new_tokens": Rule(min=1),
    "temperature": Rule(min=1e-5, why="RL must sample (the engine is greedy below 1e-5)"),
    "epochs": Rule(min=1),
    "clip": Rule(above=0, below=1),
    "kl_coef": Rule(min=0),
    "missing_end_penalty": Rule(min=0),
}


@dataclass
class RLConfig(ChatConfig):
    """The settings PPO and GRPO share; each method's config sets its section and defaults."""

    prompts_per_rollout: int = 16  # prompts drawn per rollout (per process)
    samples_per_prompt: int = 1  # replies sampled per prompt (GRPO's group size)
    max_new_tokens: int = 16  # reply length at most (also for the held-out evaluation)
    temperature: float = 1.0  # sampling temperature of the rollouts
    epochs: int = 1  # passes over each rollout (PPO's ppo_epochs, GRPO's num_iterations)
    clip: float = 0.2  # ε of the clipped ratio
    kl_coef: float = 0.05  # weight of the KL penalty to the reference (0: no reference kept)
    missing_end_penalty: float = 0.0  # subtracted from the reward of a reply cut off by max_new_tokens
    disable_dropout: bool = True  # dropout would make ratios != 1 where the policy did not change

    SECTION: ClassVar[str] = "rl"  # PPO and GRPO set their own
    RULES: ClassVar[dict] = RL_RULES
    DATA: ClassVar[str] = 'a JSONL file of prompts, {"prompt", "answer"}'

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_rollout * self.samples_per_prompt


def _shard_frozen(model) -> None:
    """FSDP units for a frozen model (RL's reference), the trained model's units
    (:func:`~scratchlm.train.distributed.block_units`, then the root). Every unit, the root included,
    frees its gathered weights after each forward: FSDP keeps a root's whole after its forward, for
    the backward that comes next, and a frozen model never runs one (its embeddings and head would
    otherwise stay whole on every rank from its first forward on)."""
    from torch.distributed.fsdp import fully_shard

    from scratchlm.train.distributed import block_units

    for block in block_units(model):
        fully_shard(block, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)


class RLTrainer(ChatTrainer):
    """The shared loop; subclasses define ``_advantages`` (from rewards to per-token advantages)
    and ``_objective`` (the loss of one micro-batch)."""

    has_value_head = False  # PPO trains a value head (model.value_head) on the policy's trunk
    reply_reserve = 0  # context positions kept free after the longest reply

    @property
    def needs_answers(self) -> bool:
        """Whether every prompt must carry an answer: yes for the verifier, the default reward."""
        return self.reward_fn is None

    def __init__(self, config: RLConfig, train_config, *, reward_fn=None, **kwargs):
        """``reward_fn(prompt, text) -> float`` replaces the verifier (``prompt`` a
        :class:`~scratchlm.posttrain.data.PromptWithAnswer`, ``text`` the reply): any programmatic
        reward, as TRL's ``reward_funcs``."""
        self.reward_fn = reward_fn
        super().__init__(config, train_config, **kwargs)

    # --- data -------------------------------------------------------------------------------
    def _prepare_data(self, model_section: dict) -> None:
        self._prepare_tokenizer()
        rl, cfg = self.settings, self.cfg
        if rl.packing:
            raise ValueError(f"{rl.SECTION}.packing is an SFT option")
        if (rl.rollout_size % (cfg.batch_size * cfg.grad_accum)) != 0:
            raise ValueError(
                f"a rollout of {rl.prompts_per_rollout} prompts x {rl.samples_per_prompt} samples = "
                f"{rl.rollout_size} replies must split into optimizer steps of batch_size x grad_accum "
                f"= {cfg.batch_size * cfg.grad_accum}: change one of them"
            )
        need = self.needs_answers
        train, val = self._load_items(
            lambda path, skip: load_prompts(path, skip, require_answer=need), lambda p: p.prompt
        )
        context = self.model_config.block_size
        self.eval_max_tokens = rl.max_new_tokens
        if rl.max_new_tokens >= context:
            raise ValueError(f"max_new_tokens ({rl.max_new_tokens}) must be below the context ({context})")
        self.train_prompts = [p for p in train if self._fits(p)]
        self.val_prompts = [p for p in val if self._fits(p)][: cfg.eval_windows]
        if len(self.train_prompts) < len(train):
            self.log(
                f"dropped {len(train) - len(self.train_prompts)} prompts that leave fewer than max_new_tokens "
                f"({rl.max_new_tokens}) positions of the context ({context}) for a reply"
            )
        if not self.train_prompts or not self.val_prompts:
            raise ValueError(
                "no training or no held-out prompt fits the context with max_new_tokens: give "
                f"{rl.SECTION}.val_data, shorter prompts, or a smaller max_new_tokens"
            )
        self.val_conversations = [
            p.prompt + [{"role": "assistant", "content": p.answer or ""}] for p in self.val_prompts
        ]

    def _fits(self, prompt) -> bool:
        """Whether a prompt leaves max_new_tokens positions of the context; one the template refuses
        (a character the tokenizer lacks, a special token in its text) raises with its file and
        line, or is skipped with skip_invalid."""
        try:
            n = len(self.template.prompt_ids(prompt.prompt))
        except ValueError as e:
            self._refused(prompt.where, e)
            return False
        return n + self.settings.max_new_tokens + self.reply_reserve <= self.model_config.block_size

    def _step_lines(self) -> list[str]:
        rl, B, T = self.settings, self.cfg.batch_size, self.model_config.block_size
        steps = rl.rollout_size // (B * self.cfg.grad_accum) * rl.epochs
        each = " per process" if self.world_size > 1 else ""
        return [
            f"tokens per step: up to {self._per_step(B * T):,} = {B} replies (prompt + reply) x up to {T} "
            f"tokens{self._per_step_factors()}",
            f"rollouts: {rl.prompts_per_rollout} prompts x {rl.samples_per_prompt} samples = {rl.rollout_size} "
            f"replies of up to {rl.max_new_tokens} new tokens{each}, trained on for {steps} step{'s' if steps > 1 else ''} "
            f"({rl.epochs} epoch{'s' if rl.epochs > 1 else ''})",
        ]

    # --- model ------------------------------------------------------------------------------
    def _initial_model(self):
        from scratchlm.posttrain.reward import add_scalar_head

        if self.settings.lora_rank:
            raise ValueError(f"{self.method} trains the whole policy here (lora_rank must be 0)")
        sharded = self.world_size > 1 and self.cfg.strategy == "fsdp"
        model = self._load_base_model().to(self.device)
        if self.settings.disable_dropout:
            model.set_dropout(0.0)
        self.reference = None
        if self.settings.kl_coef > 0:  # the model as training starts, frozen
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
            if sharded:  # sharded like the policy; its forwards run in lockstep on every rank
                _shard_frozen(self.reference)
        # Under FSDP the engine cannot run on the sharded policy (each rank samples replies of its
        # own lengths, one token at a time: the ranks' all-gathers would not line up). It samples
        # from a plain copy, allocated once here; its weights are gathered from the shards before
        # each rollout and each evaluation (see _gather_policy).
        self.rollout_policy = copy.deepcopy(model).eval().requires_grad_(False) if sharded else None
        if self.has_value_head:
            add_scalar_head(model, "value_head", zero=True)
        self.train_loader = RolloutLoader(
            self._make_rollout,
            self.settings.rollout_size,
            self.cfg.batch_size,
            self.settings.epochs,
            self.cfg.seed + self.rank,
            self.device,
        )
        return model

    def _check_resumable(self) -> dict:
        state = super()._check_resumable()
        # the reference and the KL anchor come from the base
        self._require_same_base(state, "the reference would change under the run; ")
        return state

    def _fsdp_units(self) -> list:
        # PPO's value head runs on the hidden states the model returns, outside its forward: a unit
        # of its own gathers its weights when called and reduces its gradients itself.
        return [self.model.value_head] if self.has_value_head else []

    @property
    def engine_policy(self):
        """The module the engine samples from: the policy itself, or its plain copy under FSDP."""
        return self.model if self.rollout_policy is None else self.rollout_policy

    @torch.no_grad()
    def _gather_policy(self) -> None:
        """Under FSDP, copy the policy's current weights into the plain copy the engine samples
        from: one parameter at a time (``DTensor.full_tensor()``, an all-gather: every rank calls
        this, at the same point), so at most one whole parameter is in flight beyond the copy.
        Every parameter and buffer of the copy is written (PPO's value head, which the engine has
        no use for, is the only thing of the policy's left out): a copy that drifted from the
        policy's structure fails here, naming what differs, instead of sampling stale weights."""
        if self.rollout_policy is None:
            return
        targets = {
            **dict(self.rollout_policy.named_parameters()),
            **dict(self.rollout_policy.named_buffers()),
        }
        # Buffers are never sharded; some change in training (MoE's balancing bias).
        sources = [*self.model.named_parameters(), *self.model.named_buffers()]
        written, unknown = set(), []
        for name, value in sources:
            if name.startswith("value_head."):
                continue
            if name not in targets:
                unknown.append(name)
                continue
            targets[name].copy_(value.full_tensor() if hasattr(value, "full_tensor") else value)
            written.add(name)
        missing = sorted(set(targets) - written)
        if missing or unknown:
            raise RuntimeError(
                f"the policy and its copy for the engine differ: the copy's {missing[:5]} were not "
                f"written, the policy's {unknown[:5]} have no place in the copy"
            )

    def _logits(self, model, x: torch.Tensor, hidden: bool = False):
        """The sampling distribution's logits (and the final hidden states)."""
        logits, _, h = model(x, return_hidden=True)
        z = sampling_logits(logits, self.settings.temperature, self.tokenizer.vocab_size)
        return (z, h) if hidden else z

    # --- rollouts ---------------------------------------------------------------------------
    def _make_rollout(self, generator: torch.Generator) -> Rollout:
        """Sample and score replies, then take the policy's and the reference's log-probabilities
        of them, then the advantages.

        Under FSDP only the collective-free parts are protected: sampling, rewards and collating
        (on each rank alone), and the advantages. A failure there on one rank (the engine, a reward
        function) is agreed on by every rank before anyone enters the next collective, so all stop
        with the reason. The log-probability forwards in between are NOT protected: they run the
        sharded models, whose all-gathers are collectives, and a failure inside one on one rank (an
        out-of-memory, say) leaves the others waiting in an all-gather the failed rank never joins.
        As in any FSDP program that is fatal to the job: the failed rank exits with its error and
        the launcher ends the others (or the process group's timeout does). The ranks' rollouts are
        padded to their own longest row, so their memory use differs (padding them all to one
        length would change the results' rounding)."""
        self._gather_policy()
        batch = self._on_every_rank_then_agree(
            lambda: self._collate_rollout(*self._sample_and_score(generator)), "a rollout failed"
        )
        logps = self._rollout_logps(*batch[:3])
        return self._on_every_rank_then_agree(
            lambda: self._finish_rollout(*batch, *logps), "a rollout failed"
        )

    @torch.no_grad()
    def _sample_and_score(self, generator: torch.Generator):
        """(prompts' ids, sampled replies, rewards): ``samples_per_prompt`` replies to each of
        ``prompts_per_rollout`` prompts drawn with ``generator``, and their rewards."""
        rl = self.settings
        picks = torch.randint(
            len(self.train_prompts), (rl.prompts_per_rollout,), generator=generator
        ).tolist()
        prompts = [self.train_prompts[i] for i in picks]
        replies, prompt_ids = sample_replies(
            self.engine_policy,
            self.tokenizer,
            prompts,
            rl.samples_per_prompt,
            rl.max_new_tokens,
            rl.temperature,
            generator,
        )
        expanded = [p for p in prompts for _ in range(rl.samples_per_prompt)]
        rewards = self._rewards(
            expanded, [t for _, t, _ in replies], [p + r for p, (r, _, _) in zip(prompt_ids, replies)]
        )
        if not torch.isfinite(rewards).all():
            bad = int((~torch.isfinite(rewards)).nonzero()[0, 0])
            raise ValueError(
                f"the reward of a reply is {rewards[bad].item()} (prompt {expanded[bad].where}, reply "
                f"{replies[bad][1]!r}): rewards must be finite numbers"
            )
        return prompt_ids, replies, rewards

    def _collate_rollout(self, prompt_ids: list, replies: list, rewards: torch.Tensor) -> tuple:
        """(x, y, mask, rewards, ended): the rollout's rows, right-padded to the longest, and each
        reply's reward less the missing-end penalty of one cut off by max_new_tokens."""
        ended = torch.tensor([e for _, _, e in replies], dtype=torch.float32)
        rewards = rewards - self.settings.missing_end_penalty * (1 - ended)
        rows = [(p + r, [0] * len(p) + [1] * len(r)) for p, (r, _, _) in zip(prompt_ids, replies)]
        x, y, mask = collate(rows, self.template.pad_id, self.device)
        return x, y, mask, rewards, ended

    @torch.no_grad()
    def _rollout_logps(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple:
        """(old_logps, ref_logps, values) of the rollout's rows, a micro-batch at a time (logits
        are big): every rank has a rollout of the same size, so every rank runs the same number of
        forwards, which under FSDP gather the shards together."""
        was_training = self.model.training
        self.model.eval()
        try:
            old_logps, ref_logps, values = [], [], []
            for start in range(0, len(x), self.cfg.batch_size):
                part = slice(start, start + self.cfg.batch_size)
                with self.autocast:
                    z, hidden = self._logits(self.model, x[part], hidden=True)
                    old_logps.append(token_logps(z, y[part]) * mask[part])
                    if self.reference is not None:
                        ref_logps.append(
                            token_logps(self._logits(self.reference, x[part]), y[part]) * mask[part]
                        )
                    if self.has_value_head:
                        values.append(self._value(hidden) * mask[part])
        finally:
            self.model.train(was_training)
        old_logps = torch.cat(old_logps)
        ref_logps = torch.cat(ref_logps) if ref_logps else old_logps.clone()
        values = torch.cat(values) if values else torch.zeros_like(old_logps)
        return old_logps, ref_logps, values

    @torch.no_grad()
    def _finish_rollout(self, x, y, mask, rewards, ended, old_logps, ref_logps, values) -> Rollout:
        """The advantages (method-specific) and the rollout's metrics; the rollout on the CPU."""
        advantages, returns, metrics = self._advantages(
            rewards.to(self.device), mask, old_logps, ref_logps, values
        )
        metrics.update(
            {
                "completions/mean_length": mask.sum(-1).mean().item(),
                "completions/clipped_ratio": 1 - ended.mean().item(),
            }
        )
        cpu = lambda t: t.detach().float().cpu()  # noqa: E731
        return Rollout(
            x.cpu(),
            y.cpu(),
            mask.cpu(),
            cpu(old_logps),
            cpu(ref_logps),
            cpu(advantages),
            cpu(returns),
            cpu(values),
            metrics,
        )

    def _rewards(self, prompts: list, texts: list[str], ids: list[list[int]]) -> torch.Tensor:
        """Each reply's reward: ``reward_fn``'s, else the verifier's (1 exact, 0 not). ``ids`` are
        the rendered prompt and the sampled reply, for a reward model."""
        score = self.reward_fn or (lambda p, t: p.reward(t))
        return torch.tensor([float(score(p, t)) for p, t in zip(prompts, texts)], dtype=torch.float32)

    def _advantages(
        self, rewards, mask, old_logps, ref_logps, values
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(advantages, returns, rollout metrics) from (N,) rewards and (N, T) per-token tensors."""
        raise NotImplementedError

    def _objective(self, logits, hidden, batch) -> tuple[torch.Tensor, dict]:
        """(B, T) per-token losses of one micro-batch (0 outside the replies), and its metrics."""
        raise NotImplementedError

    def _value(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head's estimate at every position, in float32 (outside autocast: the
        rollout's values and the training step's must be computed alike)."""
        with torch.autocast(hidden.device.type, enabled=False):
            # Rows in, rows out: a head sharded by FSDP must not return a view (of a 3-d matmul's
            # output), which an in-place op could detach from its backward hook (FSDP warns).
            h = hidden.float()
            return self.model.value_head(h.reshape(-1, h.shape[-1])).view(h.shape[:-1])

    # --- a step -----------------------------------------------------------------------------
    def _begin_step(self, batches: list) -> None:
        self._count_step_tokens(batches)  # each reply token weighs the same, however the rollout is split

    def _loss(self, batch) -> torch.Tensor:
        z, hidden = self._logits(self.step_model, batch[0], hidden=True)
        token_losses, stats = self._objective(z, hidden, batch)
        rollout = self.train_loader.rollout
        device = z.device
        self.step_extras = {
            **stats,
            **{k: torch.tensor(v, device=device) for k, v in rollout.metrics.items()},
            "epoch": torch.tensor(float(self.train_loader.epoch), device=device),
        }
        return self._per_token_mean(token_losses.sum())

    # --- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Greedy replies to the held-out prompts: minus their mean reward (lower is better, as a
        loss), with the reward, the exact-match rate and the end-of-turn rate in the log. Rank 0
        evaluates (once, not once per rank); a failure there stops every rank, none waits."""
        names = ["val_reward", "val_ended_with_end_of_turn"]
        if all(p.answer is not None for p in self.val_prompts):
            names.append("val_exact_match")
        values = [0.0] * (len(names) + 1)

        self._gather_policy()  # every rank (a collective under FSDP); rank 0 then generates alone

        def work():
            replies = chat.generate_replies(
                self.engine_policy, self.tokenizer, [p.prompt for p in self.val_prompts], self.eval_max_tokens
            )
            texts = [r["text"] for r in replies]
            rewards = self._rewards(
                self.val_prompts, texts, [r["prompt_ids"] + r["token_ids"] for r in replies]
            )
            values[:3] = [
                -rewards.mean().item(),
                rewards.mean().item(),
                sum(r["ended"] for r in replies) / len(replies),
            ]
            if "val_exact_match" in names:
                values[3] = sum(p.reward(t) for p, t in zip(self.val_prompts, texts)) / len(texts)

        self._on_rank0_then_all(work, "the evaluation failed")
        shared = self._shared(values, op="rank0")
        self.eval_extras = dict(zip(names, shared[1:]))
        return shared[0]

    # --- checkpoints ------------------------------------------------------------------------
    def _checkpoint_weights(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in super()._checkpoint_weights().items() if not k.startswith("value_head.")}

    def _checkpoint_extras(self) -> dict:
        from safetensors.torch import save

        from scratchlm.posttrain.reward import head_state

        extras = super()._checkpoint_extras()
        if self.has_value_head:  # whole tensors (gathered under FSDP: every rank is here)
            extras["files"]["value_head.safetensors"] = save(
                head_state(self.model.value_head), metadata={"format": "scratchlm.value-head", "version": "1"}
            )
        rollouts = rollout_file(
            self._gather(self.train_loader.state())
        )  # every rank's rollout, in rank order
        if rollouts is not None:
            extras["files"][ROLLOUT_FILE] = rollouts
        return extras

    def _load_resume_weights(self, folder: Path) -> None:
        from scratchlm.models.checkpoint import load_weights
        from scratchlm.posttrain.reward import _load_with_head

        if self.has_value_head:
            _load_with_head(
                folder, self.model, "value_head", "value_head.safetensors", "scratchlm.value-head"
            )
        else:
            load_weights(folder, self.model)

    def _resume(self, state: dict) -> None:
        super()._resume(state)
        saved = read_rollout_file(self.out / "last", self.rank, self.world_size, self.log)
        if saved is not None:
            self.train_loader.load(saved)


# The [train] defaults for RL where they differ from SFT's: no warmup (the policy starts trained),
# a constant learning rate (min_lr = lr unless given), and an evaluation every 25 steps.
RL_TRAIN_DEFAULTS = {
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "eval_windows": 64,
    "sample_tokens": 1,
    "max_steps": 200,
    "eval_interval": 25,
    "batch_size": 16,
    "lr": 2e-5,
    "grad_clip": 1.0,
}


def rl_train_config(train_config: dict):
    from scratchlm.train.config import TrainConfig

    merged = {**RL_TRAIN_DEFAULTS, **train_config}
    merged.setdefault("min_lr", merged["lr"])
    return TrainConfig.from_dict(merged)
