"""What happens beside the steps, as hooks the epoch loop calls after every step: the finite check, the step lines
of metrics.jsonl and the live progress, gradient statistics, and mid-epoch checkpoints. The loop itself writes
nothing; a hook that needs the host (a logged value, a saved state) says so with ``syncs(step)``, and the loop then
waits for the device once and runs the finite check before any of them, so a non-finite state is never logged as
good or saved.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fnclass.config import Config
from fnclass.core.tree import tree_index
from fnclass.data.batches import RunData, normalized


class TrainingDiverged(Exception):
    """A loss, a gradient, the updated state or an evaluation became nan or inf; the last good checkpoint is kept.
    The CLI exits with code 3."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


def diverged(config: Config, what: str, last: Path, step: int | None = None, *, skip: bool = True
             ) -> TrainingDiverged:
    """The error of a run that went non-finite: ``what`` (where, and at which step or epoch), the likely causes,
    the checkpoint with the last good state, and what to change (``skip``: suggest ``train.nan_policy = "skip"``,
    which helps with a non-finite step, not with weights whose evaluation overflows)."""
    optim = config.optim
    kept = f"{last} holds the last good state" if last.is_file() else "no checkpoint was written before it"
    return TrainingDiverged(
        f"training diverged: {what}; likely causes: a learning rate too high (optim.lr = {optim.lr}), no gradient "
        f"clipping (optim.clip_norm = {optim.clip_norm}), bf16 overflow (train.precision = "
        f"{config.train.precision!r}) or bad input data; {kept}; lower optim.lr"
        + (', or set train.nan_policy = "skip" to skip such updates' if skip else ""), step=step)


class StepEvent(NamedTuple):
    """What a hook sees after a step. ``step`` counts the steps made (1-based), ``epoch_step`` the epoch's."""

    train_state: Any
    metrics: dict
    step: int
    epoch: int
    epoch_step: int
    steps_per_epoch: int
    images_per_second: float
    skipped: torch.Tensor  # the epoch's skipped steps so far, per member
    progress: Any  # () -> the epoch's sums so far (for a mid-epoch checkpoint)
    examples: torch.Tensor | None = None  # a Poisson batch's real examples (per member); None: a fixed-size batch


class FiniteCheck:
    """Flags the first non-finite step on the device at every step; :meth:`check` raises :class:`TrainingDiverged`
    (``train.nan_policy = "stop"``) where the loop synchronises anyway. ``gather`` makes every member's flags of
    this process's (members spread over a torchrun job: every process then raises the same error together)."""

    def __init__(self, config: Config, steps_per_epoch: int, last_checkpoint: Path, member_names: list[str],
                 gather=None):
        self.config, self.steps_per_epoch, self.last = config, steps_per_epoch, last_checkpoint
        self.member_names, self.first_bad = member_names, None
        self.gather = gather or (lambda flags: flags)

    def start_epoch(self, shape: tuple, dev) -> None:
        self.first_bad = torch.zeros(shape, dtype=torch.int64, device=dev)  # the first non-finite step (0: none)

    def record(self, train_state, metrics: dict) -> None:
        """Note the step if it was not finite (kept on the device: nothing waits for the step to finish)."""
        self.first_bad = torch.where((self.first_bad == 0) & ~metrics["finite"], train_state.step, self.first_bad)

    def check(self) -> None:
        """Raise :class:`TrainingDiverged` if a step of this epoch went non-finite (policy stop).

        Detection comes at most ``min(train.log_every_steps, checkpoint.every_steps, steps left in the epoch)``
        steps late; the message names the exact step.
        """
        if self.config.train.nan_policy != "stop" or self.first_bad is None:
            return
        first_bad = self.gather(self.first_bad)
        bad = [(step, member) for member, step in enumerate(first_bad.reshape(-1).tolist()) if step]
        if bad:
            bad, member = min(bad)
            who = f" in member {member} ({self.member_names[member]})" if len(self.member_names) > 1 else ""
            raise diverged(self.config, f"the loss, a gradient or the updated state (parameters, BatchNorm "
                                        f"statistics, optimizer state) is nan/inf at step {bad} (epoch "
                                        f"{(bad - 1) // self.steps_per_epoch + 1}){who}", self.last, step=bad)


class StepLog:
    """metrics.jsonl's ``step`` lines every ``train.log_every_steps`` (one per member) and the live progress
    (:meth:`fnclass.run.directory.RunDirectory.step`) after every step."""

    def __init__(self, config: Config, run, schedule, lr_scales: list[float], members: bool):
        self.config, self.run, self.schedule = config, run, schedule
        self.lr_scales, self.members, self.every = lr_scales, members, config.train.log_every_steps

    def syncs(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, event: StepEvent) -> None:
        lr = float(self.schedule(event.step - 1))
        info = {"step": event.step, "epoch": event.epoch, "epoch_step": event.epoch_step,
                "steps_per_epoch": event.steps_per_epoch, "lr": lr, "images_per_second": event.images_per_second}
        if self.syncs(event.step):
            losses = event.metrics["loss"].reshape(-1).tolist()
            info["loss"] = sum(losses) / len(losses)
            counts = event.skipped.reshape(-1).tolist()
            examples = None if event.examples is None else event.examples.reshape(-1).tolist()
            train = self.config.train
            for member, (loss, scale) in enumerate(zip(losses, self.lr_scales)):
                row = {"kind": "step", **({"member": member} if self.members else {}), "step": event.step,
                       "epoch": event.epoch, "loss": loss if math.isfinite(loss) else None, "lr": lr * scale}
                if train.nan_policy == "skip" or train.precision == "fp16":
                    row["skipped_steps"] = counts[member]  # this epoch's, so far
                if examples is not None:  # what the step trained on: a Poisson sample's size varies
                    row["examples"] = examples[member]
                self.run.log(row)
        self.run.step(info)


class GradStats:
    """Every ``train.grad_stats_every`` steps, a ``grad_stats`` line: the gradient noise scale and per-layer-group
    gradient norms of a fixed probe batch (BatchNorm in eval mode), one per member."""

    def __init__(self, config: Config, ds: RunData, model, run, members: bool):
        probe = slice(0, min(config.train.grad_stats_examples, len(ds.train_images)))
        self.images, self.labels = normalized(ds, ds.train_images[probe]), ds.train_labels[probe]
        self.model, self.chunk_size, self.run, self.members = model, config.train.eval_batch_size, run, members
        self.every = config.train.grad_stats_every

    def syncs(self, step: int) -> bool:
        return step % self.every == 0

    def __call__(self, event: StepEvent) -> None:
        if not self.syncs(event.step):
            return
        states = ([tree_index(event.train_state, i) for i in range(len(event.train_state.step))] if self.members
                  else [event.train_state])
        for member, train_state in enumerate(states):
            row = {"kind": "grad_stats", **({"member": member} if self.members else {}), "step": event.step,
                   "epoch": event.epoch, **self.statistics(train_state)}
            self.run.log(row)

    def statistics(self, train_state) -> dict:
        from fnclass.analysis.gradients import gradient_statistics  # a program of its own; only this hook uses it

        stats = gradient_statistics(self.model, train_state.params, train_state.state, self.images, self.labels,
                                    cosine=False, chunk_size=self.chunk_size)
        return {"noise_scale": stats["noise_scale"]["b_simple"],
                "grad_norm": float(stats["per_example"]["grad_norm"].mean()),
                "group_grad_norms": {g: float(n.mean()) for g, n in stats["per_example"]["group_norms"].items()}}


class StepCheckpoint:
    """``checkpoints/last.safetensors`` every ``checkpoint.every_steps`` steps, with the epoch's sums so far."""

    def __init__(self, run, every: int):
        self.run, self.every = run, every

    def syncs(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, event: StepEvent) -> None:
        if self.syncs(event.step):
            self.run.save(event.train_state, event.progress())
