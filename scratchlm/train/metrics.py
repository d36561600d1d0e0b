"""The training log: buffered step metrics, ``metrics.jsonl``, TensorBoard, the loss plot, reading it back.

``metrics.jsonl`` holds one JSON record per logged step (loss, learning rate, gradient norm,
throughput, a method's own numbers) or evaluation (validation loss, best so far). Rank 0 writes it.

The host never waits for the device inside a step: each step's loss and gradient norm stay on the
device (:class:`StepMetrics`) and are read in one transfer every log interval, and before any
evaluation or save. A non-finite value is found there, before any checkpoint is written.

A resumed run cuts the log back to its checkpoint's step (:func:`kept_metrics`), then writes the
later steps again, so the log of a resumed run equals an uninterrupted run's. Resumed from a
checkpoint older than ``last`` (``best``), the cut waits for the run's first checkpoint
(:meth:`MetricsLog.publish`): until then ``last`` is still the other branch's, and a plain resume
of it needs that branch's rows.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scratchlm.io import FormatError, atomic_write


class MetricsLog:
    """``out/metrics.jsonl`` and, with ``tensorboard``, ``out/tensorboard``: open on rank 0 only
    (``enabled``); elsewhere :meth:`record` drops every record. ``fresh`` starts an empty log.

    ``held``: the file stays as it is until :meth:`publish`, which replaces it with these lines
    (a resumed run's kept rows) and the records made meanwhile, then appends as usual."""

    def __init__(
        self, out: Path, *, fresh: bool, tensorboard: bool, enabled: bool, held: list[str] | None = None
    ):
        self.file = self.writer = None
        self.path, self.held, self.waiting = out / "metrics.jsonl", None, []
        if not enabled:
            return
        if fresh:
            with atomic_write(self.path, "w"):
                pass
        if held is not None:
            self.held = held
        else:
            self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - the log's lifetime; close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.file.close()
                raise RuntimeError(
                    "train.tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def record(self, entry: dict) -> None:
        if self.held is not None:
            self.waiting.append(json.dumps(entry))
        elif self.file is None:
            return
        else:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        if self.writer:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.writer.add_scalar(k, v, entry["step"])

    def publish(self) -> None:
        """A checkpoint was just published: write the held lines and the records since, at once."""
        if self.held is None:
            return
        with atomic_write(self.path, "w") as f:
            f.write("".join(line + "\n" for line in [*self.held, *self.waiting]))
        self.held, self.waiting = None, []
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - the log's lifetime; close()

    def close(self) -> int:
        """Close the log; the number of records never written (made before a :meth:`publish` that
        did not come)."""
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()
        return len(self.waiting)


class StepMetrics:
    """The steps whose numbers are still on the device, logged by :meth:`flush` in one transfer."""

    def __init__(
        self,
        log: MetricsLog,
        device: torch.device,
        tokens_per_step: int,
        flops_per_token: float,
        peak_tflops: float | None,
    ):
        self.log, self.device = log, device
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_tflops
        self.pending: list[dict] = []
        self.interval_start = time.perf_counter()

    def add(
        self,
        step: int,
        lr: float,
        seconds: float,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        extras: dict[str, torch.Tensor],
    ) -> None:
        self.pending.append(
            {
                "step": step,
                "loss": loss,
                "grad_norm": grad_norm.detach().float(),
                "lr": lr,
                "seconds": seconds,
                "extras": {k: v.detach().float().reshape(()).to(self.device) for k, v in extras.items()},
            }
        )

    def flush(self, non_finite) -> dict | None:
        """Read the pending steps' numbers from the device in one transfer, check them, log them.

        At the first step whose loss or gradient norm is not finite, raises
        ``non_finite(step, lr, loss, grad_norm)`` (an exception). Returns the last step's
        ``{"loss", "lr", "tokens_per_second"}``, or None when no step was pending.
        """
        pending = self.pending
        if not pending:
            return None
        names = sorted(pending[0]["extras"])  # a method's own per-step numbers (DPO's rewards, ...)
        values = (
            torch.stack(
                [torch.stack([p["loss"], p["grad_norm"], *(p["extras"][k] for k in names)]) for p in pending]
            )
            .double()
            .tolist()
        )
        now = time.perf_counter()
        tokens_per_second = self.tokens_per_step * len(pending) / max(now - self.interval_start, 1e-9)
        achieved = self.flops_per_token * tokens_per_second / 1e12
        for entry, (loss, grad_norm, *extras) in zip(pending, values):
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                pending.clear()
                raise non_finite(entry["step"], entry["lr"], loss, grad_norm)
            self.log.record(
                {
                    "step": entry["step"],
                    "loss": loss,
                    "lr": entry["lr"],
                    "grad_norm": grad_norm,
                    **dict(zip(names, extras)),
                    "tokens_per_second": tokens_per_second,
                    "tflops": achieved,
                    "mfu": achieved / self.peak if self.peak else None,
                    "seconds": entry["seconds"],
                }
            )
        last = {"loss": values[-1][0], "lr": pending[-1]["lr"], "tokens_per_second": tokens_per_second}
        pending.clear()
        self.interval_start = now
        return last


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak bf16 dense TFLOP/s, for the MFU estimate: ``configured``, or known GPUs'."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("4090", 165.0))
        for key, tflops in known:
            if key in name:
                return tflops
    return None


def truncate_metrics(metrics: Path, step: int, log) -> None:
    """Keep the log lines up to ``step`` (:func:`kept_metrics`): the resumed run writes the later ones again."""
    if metrics.exists():
        kept = kept_metrics(metrics, step, log)
        with atomic_write(metrics, "w") as f:
            f.write("".join(line + "\n" for line in kept))


def kept_metrics(metrics: Path, step: int, log) -> list[str]:
    """The log's lines up to ``step``.

    A kill (or a full disk) can tear the *last* line; it is dropped. A damaged line anywhere
    else is not a crash artefact but corruption, and is reported with its line number.
    """
    if not metrics.exists():
        return []
    lines = metrics.read_text(encoding="utf-8", errors="replace").split("\n")
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number >= len(lines) - 1:  # the final line (possibly without its newline): torn by a kill
                log(f"{metrics}: dropped a torn last line (line {number}) left by an interrupted run")
                continue
            raise FormatError(
                f"{metrics}, line {number}: not a JSON record ({line[:60]!r}); the log is "
                "damaged: delete that line (or the file) and resume again"
            ) from None
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept


@dataclass(frozen=True)
class Panel:
    """One plot of ``loss.png``: a y-axis label and the metrics drawn on it, each a (key of
    ``metrics.jsonl``, legend label). A per-step key is drawn faintly with its running mean; an
    evaluation's key (``val_...``) as points joined by a line. A trainer names its panels
    (``Trainer.plot_panels``): each method plots its own numbers under their own names."""

    ylabel: str
    curves: tuple[tuple[str, str], ...]
    title: str = ""


# Pretraining and SFT: the (masked) next-token loss.
CROSS_ENTROPY = (Panel("cross-entropy (nats/token)", (("loss", "train"), ("val_loss", "validation"))),)


def plot_losses(metrics: Path, path: Path, panels: tuple[Panel, ...] = CROSS_ENTROPY) -> Path:
    """The run's curves, one plot per panel side by side, saved as an image (:func:`loss_figure`)."""
    from scratchlm.plots import save_figure

    return save_figure(loss_figure(metrics, panels), path)


def loss_figure(metrics: Path, panels: tuple[Panel, ...] = CROSS_ENTROPY):
    """The matplotlib figure of :func:`plot_losses` (its axes carry the panels' labels)."""
    from scratchlm.plots import pyplot

    records = []
    for line in metrics.read_text(encoding="utf-8", errors="replace").split("\n"):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill is left out of the picture
                continue
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels) ** 0.75, 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for key, label in panel.curves:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if not points:
                continue
            steps, values = zip(*points)
            if key.startswith("val_"):
                ax.plot(steps, values, "o-", label=label)
                continue
            line = ax.plot(steps, values, lw=0.6, alpha=0.4, label=f"{label} (per step)")[0]
            k = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, lw=1.5, color=line.get_color(), label=f"{label} (mean of {k})")
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        if panel.title:
            ax.set_title(panel.title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def read_evaluations(out_dir: str | Path, key: str) -> list[dict]:
    """The evaluation records of a run's ``metrics.jsonl`` that carry ``key`` (rank 0 writes the file:
    on other machines of a multi-machine run it may not be there, and then there are none)."""
    metrics = Path(out_dir) / "metrics.jsonl"
    records = (
        [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if metrics.exists()
        else []
    )
    return [r for r in records if key in r]
