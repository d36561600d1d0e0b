"""The training loop (checkpoint D): batches in, AdamW or Muon steps, evaluation, checkpoints.

One step:

1. set the learning rate from the schedule (warmup, then cosine to a floor);
2. for each of ``grad_accum`` micro-batches: forward, cross-entropy, backward (gradients add up);
3. clip the gradient norm (logged), step the optimizer(s), zero the gradients.

Every ``eval_interval`` steps: loss on fixed validation batches, a short sample, the best and the
last checkpoint, early stopping.

The host never waits for the device inside a step: losses and gradient norms stay on the device
and are read in one transfer every ``log_interval`` steps (and before any evaluation or save). A
non-finite loss or gradient is found there, and the run stops *before* any checkpoint is written,
naming the first bad step, so no good checkpoint is ever overwritten with a broken model.

Data parallel: launched with ``torchrun --nproc_per_node N -m scratchlm train ...``, each process
trains on its slice of the global batch and DDP averages the gradients (gloo on CPU, NCCL on GPU);
only rank 0 writes logs and checkpoints. Every decision to stop (time limit, SIGTERM, early
stopping, target loss, non-finite loss) is taken from values all ranks share, so every rank stops
at the same step and none is left waiting in a collective (:mod:`scratchlm.train.distributed`).

Resuming (``resume=True``) restores weights, optimizer state, step, every rank's RNG states and the
loader's position, so the resumed run produces the same per-step losses as one never interrupted.
The run's checkpoint records its whole resolved config, so a run can be continued from its folder
alone (``from_run``), from ``last`` or ``best`` (``resume_from``); each value given now that differs
from the run's is reported in one line (a note for ``max_steps`` and the like, a warning for ``lr``) and applied, or refused where it cannot be honoured
(the model's shape, the optimizer). SIGTERM (a scheduler's "please stop") and Ctrl-C (SIGINT) finish the current step, save
``last`` and return; a second Ctrl-C aborts at once.

The log is :mod:`scratchlm.train.metrics`, the run's checkpoints :mod:`scratchlm.train.checkpoint`.
This file stays over 400 lines on purpose: :class:`Trainer` is the one set of hooks that every
post-training method overrides (data, model, loss, evaluation, checkpoint contents, resume), and
a reader finds them, and the loop that calls them, in one place.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from scratchlm.data.loader import BatchLoader
from scratchlm.data.shards import open_shard, verify_shards
from scratchlm.generate.generate import start_ids
from scratchlm.io import FormatError
from scratchlm.models.checkpoint import load_weights, model_state, read_state
from scratchlm.models.config import GPTConfig
from scratchlm.models.gpt import GPT
from scratchlm.models.hf import export_note
from scratchlm.models.loss import token_nll
from scratchlm.models.presets import config_from_section
from scratchlm.tokenizers import load_tokenizer
from scratchlm.train.checkpoint import CheckpointStore, RunLock, load_optimizers, optimizer_states
from scratchlm.train.config import TrainConfig, changed_keys
from scratchlm.train.distributed import (
    Ranks,
    block_units,
    init_distributed,
    rng_state,
    rng_states_by_rank,
    sample_in_lockstep,
    set_rng_state,
)
from scratchlm.train.metrics import (
    CROSS_ENTROPY,
    MetricsLog,
    StepMetrics,
    kept_metrics,
    peak_tflops,
    plot_losses,
    truncate_metrics,
)
from scratchlm.train.optim import build_optimizers
from scratchlm.train.schedule import lr_at


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class _Progress:
    step: int = 0
    best_val: float = float("inf")  # the best validation loss seen (the ``best`` checkpoint's)
    # Early stopping counts the *scheduled* evaluations only, against the best of those: an extra
    # evaluation (at a time limit) must not change when an uninterrupted run would stop.
    patience_best: float = float("inf")
    evals_without_improvement: int = 0
    # stopped by a signal on a scheduled-eval step: the resumed run evaluates first
    eval_pending: bool = False

    def add_evaluation(self, val: float, scheduled: bool) -> bool:
        """Count one validation loss; True when it is the best so far."""
        improved = val < self.best_val
        if improved:
            self.best_val = val
        if scheduled:
            if val < self.patience_best:
                self.patience_best, self.evals_without_improvement = val, 0
            else:
                self.evals_without_improvement += 1
        self.eval_pending = False
        return improved


def build_model_config(model_section: dict, vocab_size: int) -> GPTConfig:
    section = dict(model_section)
    if "vocab_size" in section and section["vocab_size"] != vocab_size:
        raise ValueError(
            f"model.vocab_size = {section['vocab_size']} but the tokenizer of the data has {vocab_size} ids; "
            "remove model.vocab_size (it defaults to the tokenizer's) or tokenize the data with a matching tokenizer"
        )
    return config_from_section({**section, "vocab_size": vocab_size})


# Which checkpoint of a run a resume starts from. Only these two are kept: every other step
# folder is deleted once no pointer names it.
RESUME_FROM = ("last", "best")


def check_resume_from(name: str) -> str:
    if name not in RESUME_FROM:
        raise ValueError(
            f"resume_from must be one of {list(RESUME_FROM)} (a run keeps only those two checkpoints), got {name!r}"
        )
    return name


def run_config(out_dir: str | Path, resume_from: str = "last") -> dict:
    """The resolved config a run's checkpoint recorded: ``{"model": ..., "train": ...}``, what a
    resumed run starts from (each value given again replaces the recorded one)."""
    folder = Path(out_dir) / check_resume_from(resume_from)
    if not folder.exists() and not folder.is_symlink():
        raise FileNotFoundError(
            f"{folder}: no checkpoint to resume from (is {out_dir} a training run's folder? "
            "none was saved yet?); start without --resume"
        )
    try:
        state = read_state(folder)
    except (OSError, FormatError):
        # A kill can leave the pointer dangling (start-up recovery repoints it) and a damaged one is
        # reported when resuming; every checkpoint of a run records the same config.
        complete = CheckpointStore(out_dir).complete_folders()
        if not complete:
            raise
        state = read_state(complete[-1])
    if not state.get("train"):
        raise ValueError(f"{folder} was imported, not trained here: there is no run to resume")
    # Where the run lives is where it was found; where it runs (device) is chosen afresh.
    train = {k: v for k, v in state["train"].items() if k in TrainConfig.__dataclass_fields__}
    train.pop("device", None)
    return {
        "model": GPTConfig.from_dict(state["model"]).to_dict(),
        "train": {**train, "out_dir": str(out_dir)},
    }


# What a second Ctrl-C says (the command line prints it as ``scratchlm: ...``, exit 130).
SECOND_CTRL_C = "aborted by a second Ctrl-C: nothing saved since the last checkpoint, which is kept"

# [train] values a resumed run is expected to change (how long it goes, what it reports): a changed
# one is a note; any other (lr, batch size...) changes what the steps compute, and is a warning.
EXPECTED_ON_RESUME = frozenset(
    {"max_steps", "max_minutes", "target_loss", "patience", "eval_interval", "log_interval", "sample_tokens",
     "tensorboard", "peak_tflops"}
)  # fmt: skip

# Why a run stopped early; the code travels between ranks in the per-step control message.
STOP_REASONS = ("", "max_minutes", "signal", "early_stopping", "target_loss")


class Trainer:
    """Pretraining on a shards folder; post-training methods subclass it and override its hooks:
    ``_prepare_data``, ``_initial_model``, ``_load_resume_weights``, ``_begin_step``, ``_fsdp_units``,
    ``_loss``, ``evaluate``, ``sample``, ``_checkpoint_weights``, ``_checkpoint_extras``,
    ``_state_dict``, ``_check_resumable``, ``_resume``. :meth:`train` runs the loop."""

    plot_panels = CROSS_ENTROPY  # what loss.png shows: a method plots its own metrics

    def __init__(
        self,
        model_section: dict,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        progress: bool = True,
        log=None,
        overwrite: bool = False,
        resume_from: str = "last",
    ):
        cfg.data = str(Path(cfg.data).resolve())  # checkpoints then find their data from any directory
        self.cfg, self.progress_bar = cfg, progress
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.rank, self.world_size, self.device = init_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.ranks = Ranks(self.rank, self.world_size, self.device)
        self.out = Path(cfg.out_dir)
        self.resume_folder = self.out / check_resume_from(resume_from)
        warning = cfg.warmup_warning()
        if warning and self.is_main:
            self.log(warning)
        self.store = CheckpointStore(self.out)
        self.lock = None
        self._prepare_data(model_section)
        try:
            self._on_rank0_then_all(
                lambda: self._claim_run(resume, overwrite), "the output folder cannot be used"
            )
            self._build(resume)
        except BaseException:
            if self.lock:
                self.lock.release()
            raise

    # --- what a kind of training decides (pretraining here; post-training subclasses override) ---
    def _prepare_data(self, model_section: dict) -> None:
        """Set ``tokenizer``, ``model_config``, ``train_loader`` (``get_batch()`` and a ``generator``
        whose state a checkpoint keeps) and the validation data."""
        data = Path(self.cfg.data)
        if not (data / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{data}: not a shards folder (no tokenizer.json); run `scratchlm data tokenize` first"
            )
        self.tokenizer = load_tokenizer(data / "tokenizer.json")
        # Each machine's first process reads every shard once (complete, made by this tokenizer, no
        # flipped bit): machines do not share a disk, so each checks its own copy; all agree on the outcome.
        local_first = int(os.environ.get("LOCAL_RANK", self.rank)) == 0
        self._on_every_rank_then_agree(
            lambda: verify_shards(data, self.tokenizer) if local_first else None, "the shards are unusable"
        )
        self.model_config = build_model_config(model_section, self.tokenizer.vocab_size)
        # Shards are checked against the tokenizer (fingerprint) before any training happens.
        self.train_loader = BatchLoader(
            data / "train.bin",
            self.model_config.block_size,
            self.cfg.batch_size,
            tokenizer=self.tokenizer,
            seed=self.cfg.seed,
            device=self.device,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.val_ids = open_shard(data / "val.bin", self.tokenizer)
        self.val_windows = self._fixed_val_windows()

    def _initial_model(self) -> GPT:
        """The model before training (the caller has seeded the random generator)."""
        return GPT(self.model_config)

    def _load_resume_weights(self, folder: Path) -> None:
        load_weights(folder, self.model)  # into the whole model, before it is sharded

    def _begin_step(self, batches: list) -> None:
        """Called with every micro-batch of a step (on each rank) before the first forward pass."""

    def _fsdp_units(self) -> list[torch.nn.Module]:
        """Submodules sharded as FSDP units of their own, besides the blocks: a head a method calls
        outside the model's forward (a reward model's ``score``, PPO's ``value_head``) gathers its
        weights when called and reduces its gradients itself."""
        return []

    # GPT.forward adds the blocks' auxiliary losses (MoE balancing, MTP) when it is given targets;
    # a method that builds its loss from the logits (SFT, DPO, RL) gets them added by the loop.
    model_adds_auxiliary = True

    def _loss(self, batch) -> torch.Tensor:
        """One micro-batch's loss, through ``step_model`` (DDP, compiled). The trainer divides it
        by ``grad_accum`` and DDP averages it over ranks."""
        x, y = batch
        return self.step_model(x, y)[1]

    # Extra numbers a method logs: per step (tensors, set by _loss: the last micro-batch's) and
    # per evaluation (floats, set by evaluate). Names as TRL names them, e.g. "rewards/margins".
    step_extras: dict = {}
    eval_extras: dict = {}

    def _checkpoint_weights(self) -> dict[str, torch.Tensor]:
        return model_state(self.model, self.sharded)

    def _checkpoint_extras(self) -> dict:
        """Extra files for a checkpoint folder (name -> bytes) and the tokenizer it carries (so that
        sampling from it never depends on where the training data lives)."""
        return {"tokenizer": self.tokenizer, "files": {}}

    # --- several processes agree (see scratchlm.train.distributed) ------------------------------
    def _on_rank0_then_all(self, work, what: str) -> None:
        """Run ``work`` on rank 0; if it fails, every rank raises (rank 0 with the original error)."""
        self.ranks.rank0_then_all(work, what)

    def _on_every_rank_then_agree(self, work, what: str):
        """Run ``work`` on every rank; if it fails on any, every rank raises. Returns its result."""
        return self.ranks.every_rank_then_agree(work, what)

    def _shared(self, values: list[float], op: str = "max") -> list[float]:
        """Values every rank agrees on: the max over ranks, or rank 0's (``op="rank0"``)."""
        return self.ranks.shared(values, op)

    def _gather(self, obj):
        """Every rank's ``obj``, in rank order (on every rank)."""
        return self.ranks.gather(obj)

    # --- the run folder and the model -------------------------------------------------------------
    def _claim_run(self, resume: bool, overwrite: bool) -> None:
        """On rank 0: one run per out_dir at a time (the lock); then clean up what an interrupted
        save left, and a fresh run makes sure it replaces no other run's checkpoints by accident."""
        self.lock = RunLock(self.out).acquire()
        self.store.recover(self.log)
        if not resume:
            self._claim_out_dir(overwrite)

    def _claim_out_dir(self, overwrite: bool) -> None:
        """A fresh run must not silently replace another run's checkpoints (``best`` above all)."""
        previous = self.store.run_summary()
        if previous is None:
            return
        if not overwrite:
            raise FileExistsError(
                f"{self.out} already holds a run ({previous}); pass --resume to continue it, "
                "--overwrite to start over in this folder (its checkpoints are deleted), or choose "
                "another train.out_dir"
            )
        self.store.clear()
        removed = "checkpoints"
        if (self.out / "tensorboard").is_dir() and not (self.out / "tensorboard").is_symlink():
            shutil.rmtree(self.out / "tensorboard")  # its curves would mix with the new run's
            removed += " and TensorBoard logs"
        self.log(f"--overwrite: deleted the previous run's {removed} in {self.out} ({previous})")

    def _build(self, resume: bool) -> None:
        """The model, optimizers and (when resuming) their state; the run lock is held."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = self._initial_model().to(self.device)
        # From here on each rank draws its own dropout masks (identical masks on every rank would
        # make data parallelism see the same noise pattern N times).
        torch.manual_seed(cfg.seed + self.rank)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(cfg.seed + self.rank)
        self.model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"train.strategy must be 'ddp' or 'fsdp', got {cfg.strategy!r}")
        self.sharded = self.world_size > 1 and cfg.strategy == "fsdp"
        if self.sharded and cfg.optimizer != "adamw":
            raise ValueError(
                "train.strategy = 'fsdp' supports optimizer = 'adamw' (Muon needs whole matrices)"
            )
        # Every rank reads the files itself; if one cannot, all stop here, not in a later collective.
        read = self._read_resume_checkpoint if resume else lambda: None
        resume_state = self._on_every_rank_then_agree(read, "the checkpoint cannot be read")
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            for block in block_units(self.model) + self._fsdp_units():
                fully_shard(block)
            fully_shard(self.model)
        self.optimizers = build_optimizers(self.model, cfg, self.device)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]
        self.state = _Progress()
        self._held_metrics: list[str] | None = None  # see _resume
        if resume:
            self._resume(resume_state)
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        if self.world_size > 1 and not self.sharded:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_model = DistributedDataParallel(self.step_model, device_ids=ids)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.flops_per_token = self.model.flops_per_token()["train"]
        self.peak = peak_tflops(self.device, cfg.peak_tflops)
        self._signalled = threading.Event()
        self._signal_name: str | None = None  # "SIGTERM" or "Ctrl-C", once one arrived

    def _read_resume_checkpoint(self) -> dict:
        """The resumed checkpoint's state, checked against this run, and its weights loaded (on every rank)."""
        state = self._check_resumable()
        self._load_resume_weights(self.resume_folder)
        return state

    # --- state ------------------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        """This rank's random streams: CPU (dropout on CPU), its own GPU's, and the loader's."""
        return rng_state(self.device, self.train_loader.generator)

    def _state_dict(self, rng_by_rank: list[dict]) -> dict:
        return {
            "model": self.model_config.to_dict(),
            "train": asdict(self.cfg),
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "vocab_size": self.tokenizer.vocab_size,
            "step": self.state.step,
            "best_val": self.state.best_val if math.isfinite(self.state.best_val) else None,
            "patience_best_val": self.state.patience_best
            if math.isfinite(self.state.patience_best)
            else None,
            "evals_without_improvement": self.state.evals_without_improvement,
            "eval_pending": self.state.eval_pending,
            "world_size": self.world_size,
            "rng": {"ranks": rng_by_rank},
        }

    def _check_resumable(self) -> dict:
        last = self.resume_folder
        if not last.exists():
            raise FileNotFoundError(
                f"{last}: no checkpoint to resume from (none was saved yet, or out_dir is wrong); "
                "start without --resume"
            )
        try:
            state = read_state(last, resumable=True)
        except (FormatError, OSError) as e:
            complete = self.store.complete_folders()
            hint = (
                f" Complete checkpoints of this run: {', '.join(f.name for f in complete)}; to resume from the newest, "
                f"point last at it: ln -sfn checkpoints/{complete[-1].name} {last}"
                if complete
                else " No complete checkpoint is left in this run; start without --resume (and --overwrite)."
            )
            raise FormatError(f"cannot resume: {e}.{hint}") from None
        if state["tokenizer_fingerprint"] != self.tokenizer.fingerprint:
            raise ValueError(
                f"{last} was trained with another tokenizer ({state['tokenizer_fingerprint'][:16]}); "
                f"the data's is {self.tokenizer.fingerprint[:16]}"
            )
        # compared as configs, not as dicts: an older checkpoint may spell a setting the old way
        changed = changed_keys(GPTConfig.from_dict(state["model"]).to_dict(), self.model_config.to_dict())
        if changed:
            raise ValueError(
                f"cannot resume {last}: a resumed run keeps its model, and "
                + "; ".join(f"model.{k} = {new!r} here, {old!r} in the run" for k, old, new in changed)
                + ": drop the change, or start a new run (--overwrite, or another output folder)"
            )
        if self.is_main:
            for line in self._changed_settings(last, state.get("train") or {}, state["step"]):
                self.log(line)
        return state

    def _changed_settings(self, folder: Path, saved: dict, step: int) -> list[str]:
        """One line per ``[train]`` value that differs from the resumed run's (applied from the
        resumed step on): a note for how long the run goes and what it reports (``max_steps``...,
        :data:`EXPECTED_ON_RESUME`), a warning for a value that changes what the steps compute
        (``lr``...); a change that cannot be honoured is refused."""
        now = asdict(self.cfg)
        if saved.get("data"):
            saved = {**saved, "data": str(Path(saved["data"]).resolve())}
        lines = []
        for key, old, new in changed_keys({k: saved[k] for k in now if k in saved}, now):
            if key in ("out_dir", "device"):  # where the run lives and runs, not what it computes
                continue
            if key == "optimizer":
                raise ValueError(
                    f"cannot resume {folder}: train.optimizer = {new!r} here, {old!r} in the run; its saved "
                    f"state is {old}'s: resume with {old}, or start a new run"
                )
            effect = (
                "it has no effect on a resumed run (the run's random state is restored)"
                if key == "seed"
                else f"applied from step {step} on"
            )
            kind = "note" if key in EXPECTED_ON_RESUME else "warning"
            lines.append(f"{kind}: train.{key} = {new!r} (the run had {old!r}): {effect}")
        return lines

    def _resume(self, state: dict) -> None:
        last = self.resume_folder
        # Optimizer *state* comes from the checkpoint; its hyperparameters from this run's config.
        hyper = [
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            for opt in self.optimizers
        ]
        load_optimizers(last, self.model, self.optimizers, state, self.sharded)
        for opt, groups in zip(self.optimizers, hyper):
            for group, settings in zip(opt.param_groups, groups):
                group.update(settings)
        self.state.step = state["step"]
        self.state.best_val = state["best_val"] if state["best_val"] is not None else float("inf")
        self.state.evals_without_improvement = state["evals_without_improvement"]
        patience_best = state.get("patience_best_val", state["best_val"])  # older checkpoints: one best
        self.state.patience_best = patience_best if patience_best is not None else float("inf")
        self.state.eval_pending = bool(state.get("eval_pending", False))
        ranks = rng_states_by_rank(state["rng"], self.device)
        if "ranks" not in state["rng"] and self.world_size > 1:
            self.log(
                f"warning: {last} was saved by an older scratchlm that kept only rank 0's random state; every "
                "process continues from that one state, so the batches and losses will not match an "
                "uninterrupted run (resuming on one process does)."
            )
        elif len(ranks) != self.world_size:
            self.log(
                f"warning: {last} was saved by {len(ranks)} process(es) and this run has {self.world_size}. "
                "Training continues from the same weights and optimizer state, but each process's data stream "
                "and dropout masks now start from another process's saved state, so the batches and losses "
                "will not match an uninterrupted run. Resume with the same number of processes to continue "
                "exactly."
            )
        set_rng_state(ranks[self.rank % len(ranks)], self.device, self.train_loader.generator)
        if self.is_main:
            metrics = self.out / "metrics.jsonl"
            if last.name == "last":
                truncate_metrics(metrics, self.state.step, self.log)
            else:  # `last` is another branch until this run saves: its rows stay until then
                self._held_metrics = kept_metrics(metrics, self.state.step, self.log)
        self.log(f"resumed from {last} ({os.path.realpath(last)}) at step {self.state.step}")

    def _fixed_val_windows(self) -> torch.Tensor:
        """The same validation windows at every evaluation, so successive losses compare."""
        T = self.model_config.block_size
        n = self.cfg.eval_windows
        last = len(self.val_ids) - T - 1
        if last < 0:
            raise ValueError(
                f"validation split has {len(self.val_ids)} tokens, fewer than one context of {T + 1}"
            )
        starts = np.linspace(0, last, num=min(n, last + 1)).astype(np.int64)
        return torch.from_numpy(np.stack([self.val_ids[s : s + T + 1] for s in starts]).astype(np.int64))

    # --- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss on the fixed validation windows, identical on every rank (rank 0's value)."""
        self.model.eval()
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for chunk in self.val_windows.split(self.cfg.batch_size):
            chunk = chunk.to(self.device)
            with self.autocast:
                logits, _ = self.model(chunk[:, :-1])
            total += token_nll(logits, chunk[:, 1:]).double().mean(1).sum()  # no (B, T, V) float32 copy
            del logits
        self.model.train()
        return self._shared([total.item() / len(self.val_windows)], op="rank0")[0]

    def sample(self) -> str:
        """A short sample, on rank 0 (other ranks return ""). Under FSDP every rank must take part
        in every forward (each gathers the shards), in lockstep: see
        :func:`~scratchlm.train.distributed.sample_in_lockstep`."""
        try:
            start = start_ids(self.tokenizer)
        except ValueError:  # said once, in the header
            return ""
        if self.sharded:
            return sample_in_lockstep(
                self.model,
                self.tokenizer,
                start,
                self.model_config.block_size,
                self.cfg.sample_tokens,
                self.device,
            )
        if not self.is_main:
            return ""
        from scratchlm.generate import SamplingConfig, generate_text

        return generate_text(
            self.model,
            self.tokenizer,
            self.tokenizer.decode(start),  # encodes back to ``start`` (special tokens allowed)
            self.cfg.sample_tokens,
            SamplingConfig(temperature=0.8, top_k=50),
            seed=0,
        )

    # --- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict:
        try:
            return self._train()
        finally:
            if self.lock:
                self.lock.release()

    def _train(self) -> dict:
        """Open the log and the progress bar, take over SIGTERM, run the steps; the run's summary."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._metrics = MetricsLog(
            self.out,
            fresh=self.state.step == 0,
            tensorboard=cfg.tensorboard,
            enabled=self.is_main,
            held=self._held_metrics,
        )
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=cfg.max_steps,
            initial=self.state.step,
            desc="training",
            unit="step",
            disable=not (self.progress_bar and self.is_main),
        )
        self._started = time.perf_counter()
        self._trained = [p for p in self.model.parameters() if p.requires_grad]
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model_config.block_size * self.world_size
        self._step_metrics = StepMetrics(
            self._metrics, self.device, tokens_per_step, self.flops_per_token, self.peak
        )
        if self.is_main:
            for line in self.header():
                self._bar.write(line, file=sys.stderr) if self.progress_bar else self.log(line)
        previous_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                # A signal the process inherited as ignored (a background `&` job ignores Ctrl-C,
                # `nohup`, a launcher's choice) stays ignored.
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self.model.train()
        try:
            stop_reason = self._run()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            self._bar.close()
            unwritten = self._metrics.close()
            if unwritten:
                self.log(
                    f"{self.out / 'metrics.jsonl'}: {unwritten} records of this run not written: no "
                    f"checkpoint was saved after resuming from {self.resume_folder}, and last still "
                    "continues the run's previous branch"
                )
        plot = (
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png", self.plot_panels)
            if self.is_main
            else None
        )
        return {
            "out_dir": str(self.out),
            "steps": self.state.step,
            "stop_reason": stop_reason,
            "best_val_loss": self.state.best_val,
            "seconds": time.perf_counter() - self._started,
            "loss_plot": str(plot),
            "parameters": self.model.parameter_counts()["total"],
            "device": str(self.device),
            "world_size": self.world_size,
        }

    def _run(self) -> str:
        """Steps until ``max_steps`` or a reason to stop, which it returns."""
        cfg = self.cfg
        if self.state.eval_pending:  # the evaluation a signal skipped, before anything else
            decided = self._evaluate_and_save(True, None)
            if decided:
                return decided
        while self.state.step < cfg.max_steps:
            self._step()
            stop = self._stop_requested()
            final = self.state.step == cfg.max_steps or stop != ""
            scheduled = self.state.step % cfg.eval_interval == 0
            if stop == "signal":
                self._save_on_signal(scheduled)
                return "signal"
            # A final evaluation off the schedule (time limit, max_steps) reports the end state
            # and may update best, but early stopping never sees it.
            evaluate_now = scheduled or final
            loss_now = None
            if self.state.step % cfg.log_interval == 0 or evaluate_now:
                loss_now = self._flush()  # raises NonFiniteLoss before anything is saved
            if evaluate_now:
                decided = self._evaluate_and_save(scheduled, loss_now)
                if decided:
                    return decided
            if stop:
                return stop
        return "max_steps"

    def _step(self) -> None:
        """One optimizer step over ``grad_accum`` micro-batches; its numbers stay on the device."""
        step = self.state.step
        lr = self._set_lr(step)
        batches = [self.train_loader.get_batch() for _ in range(self.cfg.grad_accum)]
        self._begin_step(batches)
        loss = self._forward_backward(batches)
        grad_norm = self._optimizer_step()
        self.state.step = step + 1
        self._step_metrics.add(
            self.state.step, lr, time.perf_counter() - self._started, loss, grad_norm, self.step_extras
        )
        self._bar.update(1)

    def _forward_backward(self, batches: list) -> torch.Tensor:
        """Gradients of the step's mean loss over its micro-batches (and over ranks); that loss."""
        accum = self.cfg.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        for micro, batch in enumerate(batches):
            # DDP/FSDP average gradients across processes on the last micro-batch only.
            sync = self.world_size == 1 or micro == accum - 1
            if self.sharded:
                self.model.set_requires_gradient_sync(sync)
            no_sync = self.step_model.no_sync() if not (sync or self.sharded) else contextlib.nullcontext()
            with self.autocast, no_sync:
                loss = self._loss(batch)
                if not self.model_adds_auxiliary:  # the last forward's MoE balancing losses
                    loss = loss + self.model.auxiliary_loss()
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        if self.world_size > 1:
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
        return loss_sum

    def _optimizer_step(self) -> torch.Tensor:
        """Clip (or only measure) the gradient norm, step every optimizer, zero the gradients; the norm."""
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._trained, self.cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self._trained if p.grad is not None])
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded scalar
            grad_norm = grad_norm.full_tensor()
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        after_step = getattr(self.model, "after_optimizer_step", None)
        if after_step is not None:  # state trained without gradients (MoE's balancing bias)
            self.step_extras = {**self.step_extras, **(after_step() or {})}
        return grad_norm

    def _stop_requested(self) -> str:
        """Why every rank stops after this step ("" to go on). One small message per step carries
        every rank's request: rank 0's clock decides the time limit, and a SIGTERM on any rank
        stops them all at this step."""
        cfg = self.cfg
        out_of_time = (
            self.is_main
            and cfg.max_minutes is not None
            and (time.perf_counter() - self._started) / 60 >= cfg.max_minutes
        )
        request = 2.0 if self._signalled.is_set() else 1.0 if out_of_time else 0.0
        return STOP_REASONS[int(self._shared([request])[0])]

    def _save_on_signal(self, scheduled: bool) -> None:
        """Stop fast (a scheduler's grace period is short): save, no evaluation. If this step's
        evaluation was scheduled, the resumed run runs it before its first step, so it sees exactly
        the evaluations an uninterrupted run would."""
        self._flush()  # raises NonFiniteLoss before anything is saved
        self.state.eval_pending = scheduled or self.state.step == self.cfg.max_steps
        self._save(["last"])
        self.log(
            f"stopped by {self._signal_name or 'a signal'} at step {self.state.step}; saved "
            f"{self.out / 'last'}: continue with `scratchlm train --resume --out {self.out}`"
        )

    def _flush(self) -> float | None:
        """Log the pending steps (see :class:`~scratchlm.train.metrics.StepMetrics`); the last loss."""
        last = self._step_metrics.flush(self._diagnose)
        if last is None:
            return None
        self._bar.set_postfix(
            loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{last['tokens_per_second']:,.0f}"
        )
        return last["loss"]

    def _evaluate_and_save(self, scheduled: bool, loss_now: float | None) -> str | None:
        """Evaluate, log, save ``last`` (and ``best`` if it improved); return a reason to stop, if any.
        ``val`` is rank 0's value on every rank, so every rank takes the same decision."""
        cfg, st = self.cfg, self.state
        val = self.evaluate()
        improved = st.add_evaluation(val, scheduled)
        self._metrics.record(
            {
                "step": st.step,
                "val_loss": val,
                "best_val_loss": st.best_val,
                **self.eval_extras,
                "seconds": time.perf_counter() - self._started,
            }
        )
        self._save(["best", "last"] if improved else ["last"])
        train_part = f"train {loss_now:.4f}  " if loss_now is not None else ""
        message = f"step {st.step}: {train_part}val {val:.4f}{'  (best)' if improved else ''}"
        if cfg.sample_tokens:
            text = self.sample().strip()[:400]  # every rank samples: FSDP gathers shards
            message += "\n" + text if text else ""
        if self.is_main:
            self._bar.write(message) if self.progress_bar else self.log(message)
        if scheduled and cfg.patience is not None and st.evals_without_improvement >= cfg.patience:
            return "early_stopping"
        if cfg.target_loss is not None and val <= cfg.target_loss:
            return "target_loss"
        return None

    def _set_lr(self, step: int) -> float:
        cfg = self.cfg
        lr = lr_at(
            step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps
        )
        factor = lr / cfg.lr if cfg.lr else 0.0  # every optimizer group follows the same schedule shape
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        return lr

    def _save(self, names: list[str]) -> None:
        """Every rank takes part (FSDP gathers shards; RNG states come from every rank); rank 0 writes."""
        weights = self._checkpoint_weights()
        optimizer = optimizer_states(self.model, self.optimizers, self.sharded)
        rng_by_rank = self._gather(self._rng_state())
        extras = self._checkpoint_extras()
        # Rank 0 writes; its outcome reaches every rank (a full disk stops them all, none waits).
        self._on_rank0_then_all(
            lambda: self.store.save(
                names,
                weights,
                optimizer,
                self._state_dict(rng_by_rank),
                tokenizer=extras["tokenizer"],
                extra_files=extras["files"],
            ),
            "the checkpoint could not be saved",
        )
        self._metrics.publish()  # a log held since resuming from best now follows the new last

    def _diagnose(self, step: int, lr: float, loss: float, grad_norm: float) -> NonFiniteLoss:
        last = self.out / "last"
        return NonFiniteLoss(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'} at step {step} "
            f"(loss {loss}, lr {lr:.3g}, grad norm {grad_norm}); the run stopped before writing any checkpoint. "
            f"Last good checkpoint: {last if last.exists() else 'none yet'}. "
            "Try a lower train.lr, a longer warmup, or train.grad_clip."
        )

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM or Ctrl-C: stop after this step and save. A second Ctrl-C aborts at once (nothing
        more is saved; a save it interrupts leaves the previous checkpoint whole)."""
        if signum == signal.SIGINT and self._signal_name == "Ctrl-C":
            raise KeyboardInterrupt(SECOND_CTRL_C)
        if self._signal_name is None:
            self._signal_name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            if signum == signal.SIGINT and self.is_main:
                self.log(
                    "Ctrl-C: stopping after this step and saving last (press Ctrl-C again to abort without saving)"
                )
        self._signalled.set()

    def header(self) -> list[str]:
        """What the run is about to do, printed before the first step."""
        cfg, counts = self.cfg, self.model.parameter_counts()
        dtype = "bfloat16 autocast, float32 weights" if self.device.type == "cuda" else "float32"
        start = f", from step {self.state.step} ({self.resume_folder})" if self.state.step else ""
        lines = [
            f"parameters: {counts['total']:,}",
            f"device: {self.device}"
            + (f" x {self.world_size} processes ({cfg.strategy})" if self.world_size > 1 else ""),
            f"dtype: {dtype}",
            f"data: {self._data_description()}",
            *self._step_lines(),
            f"steps: {cfg.max_steps:,}{start}, evaluating and saving every {cfg.eval_interval:,}",
            f"writes: {self.out}/ (checkpoints/step-N with model.safetensors, optimizer.safetensors, "
            "tokenizer.json, state.json; last and best point at them; metrics.jsonl, loss.png)",
        ]
        lines.append(export_note(self.model_config))  # which Hugging Face formats hold it, or why none does
        if cfg.sample_tokens:
            try:
                start_ids(self.tokenizer)
            except ValueError:
                lines.append(
                    "note: no samples during training: the tokenizer has neither <|endoftext|> nor a "
                    "newline to start one from"
                )
        return lines

    def _step_lines(self) -> list[str]:
        """The header's account of one optimizer step: what a batch holds and how many tokens. A
        method whose batches are not context windows (conversations, pairs, rollouts) overrides it."""
        B, T = self.cfg.batch_size, self.model_config.block_size
        return [
            f"tokens per step: {self._per_step(B * T):,} = {B} windows x {T} context{self._per_step_factors()}"
        ]

    def _per_step(self, tokens: int) -> int:
        """A rank's batch of ``tokens`` tokens as the tokens of one optimizer step."""
        return tokens * self.cfg.grad_accum * self.world_size

    def _per_step_factors(self) -> str:
        """What :meth:`_per_step` multiplies by, as the header writes it."""
        n = self.world_size
        return f" x {self.cfg.grad_accum} grad-accum x {n} process{'es' if n > 1 else ''}"

    def _data_description(self) -> str:
        """The data line of the header: the folder and, for token shards, the tokens of each split."""
        sizes = []
        for split, ids in (
            ("train", getattr(self.train_loader, "ids", None)),
            ("val", getattr(self, "val_ids", None)),
        ):
            if ids is not None:
                sizes.append(f"{split} {len(ids):,} tokens")
        return f"{self.cfg.data}" + (f" ({', '.join(sizes)})" if sizes else "")


def train(
    config: dict,
    *,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    resume_from: str = "last",
    from_run: bool = False,
) -> dict:
    """Train from a config dict with ``model`` and ``train`` sections (see :mod:`scratchlm.config`).

    ``resume`` continues the run in ``train.out_dir`` from its ``resume_from`` checkpoint (``last``
    or ``best``); each ``[train]`` value that differs from the run's is reported. With ``from_run``
    the config holds only changes: the run's recorded config is the rest (``scratchlm train
    --resume --out DIR`` without ``--config``). A fresh run refuses a folder that holds another
    run's checkpoints unless ``overwrite`` (which deletes them first)."""
    train_section, model_section = config.get("train", {}), config.get("model", {})
    defaults = None
    if from_run:
        if not resume:
            raise ValueError("from_run continues a run: it needs resume")
        saved = run_config(train_section.get("out_dir", TrainConfig.out_dir), resume_from)
        model_section, defaults = _over(saved["model"], model_section), saved["train"]
    cfg = TrainConfig.from_dict(train_section, defaults=defaults)
    if not cfg.data:
        raise ValueError("train.data is required: a shards folder from `scratchlm data tokenize`")
    return run_trainer(
        lambda: Trainer(
            model_section,
            cfg,
            resume=resume,
            progress=progress,
            overwrite=overwrite,
            resume_from=resume_from,
        )
    )


def _over(base: dict, changes: dict) -> dict:
    """``changes`` over ``base``, a table (``model.attn``) key by key."""
    merged = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = {**base[key], **value} if both else value
    return merged


def run_trainer(make_trainer) -> dict:
    """Build a trainer (pretraining, SFT, DPO...), run it, and leave a distributed run cleanly."""
    threads = os.environ.get("SCRATCHLM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    distributed = torch.distributed.is_available()
    try:
        trainer = make_trainer()
        summary = trainer.train()
        if distributed and torch.distributed.is_initialized():
            # Free what holds the process group (DDP's reducer sits in reference cycles that only the
            # garbage collector breaks; left to interpreter shutdown, gloo can abort the process),
            # then leave together: a rank tearing gloo down while a peer still works can abort too.
            del trainer
            gc.collect()
            torch.distributed.barrier()
        return summary
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
