"""The epoch loop: a batch from the source, the step, the epoch's sums on the device, then the hooks.

The loop knows nothing of what the batches are (:mod:`fnclass.data.sources`, :mod:`fnclass.privacy.sources`,
:mod:`fnclass.distributed.sources`), what the step does (:func:`fnclass.training.recipe.create_train_step`) or what
is written (:mod:`fnclass.training.hooks`). One model or K stacked members run through it the same way: with
members every sum, flag and count has a leading member axis. Members spread over a torchrun job
(:mod:`fnclass.distributed.members`): each process steps its block, and what the hooks see at a synchronising step
and the epoch's metrics are gathered over every block, so they are those of all K members.
"""

from __future__ import annotations

import time

import torch

from fnclass.distributed.members import MemberBlocks
from fnclass.io import synchronize
from fnclass.training.hooks import FiniteCheck, StepEvent


class EpochLoop:
    """The steps of one epoch after another.

    Args:
      source: ``source(step, epoch, epoch_step) -> Batch``.
      train_step: ``step(train_state, (images, labels), key) -> (train_state, metrics)`` (members: stacked in and
        out, ``metrics`` leaves ``(K,)``).
      steps_per_epoch: the steps of a full epoch.
      batch_size: the images a step trains on (per member; the global batch under data parallel).
      members: K for a stacked TrainState (all the run's, however many this process steps), None for one model.
      finite: the finite check (:class:`fnclass.training.hooks.FiniteCheck`).
      hooks: called in order after every step with a :class:`fnclass.training.hooks.StepEvent`.
      blocks: the members this process steps (:class:`fnclass.distributed.members.MemberBlocks`; the state, the
        source and the step are of its block); None: all of them. Speeds count all K members' images.
    """

    def __init__(self, source, train_step, steps_per_epoch: int, batch_size: int, *, members: int | None,
                 finite: FiniteCheck, hooks: tuple = (), blocks: MemberBlocks | None = None):
        self.source, self.train_step, self.hooks, self.finite = source, train_step, hooks, finite
        self.steps_per_epoch, self.batch_size, self.members = steps_per_epoch, batch_size, members
        self.blocks = blocks or MemberBlocks(members or 1, None)
        self.images_seen = 0
        self.latest = None  # the state after the last finished step, for a Ctrl-C between steps
        self.sums: dict = {}  # the epoch's sums so far, on the device

    def first_epoch(self, start_step: int, has_epoch_row) -> int:
        """The epoch a run starting at ``start_step`` begins with.

        A checkpoint saved at an epoch's last step before that epoch's evaluation (every_steps, Ctrl-C) has no
        epoch row yet (``has_epoch_row(step)`` False): the run evaluates and logs that epoch first.
        """
        epoch = start_step // self.steps_per_epoch
        if start_step and start_step % self.steps_per_epoch == 0 and not has_epoch_row(start_step):
            epoch -= 1
        return epoch

    def compile(self, train_state, dev) -> float:
        """Compile the step on a throwaway call (the step is pure: its result is dropped); the seconds it took.

        Every real step is then timed, as airbench's clock includes its first step.
        """
        tick = time.perf_counter()
        batch = self.source(-1, 0, 0)  # no real step uses a negative step number
        self.train_step(train_state, batch.step_batch, batch.key)
        synchronize(dev)
        return time.perf_counter() - tick

    def __call__(self, train_state, epoch: int, dev, progress: dict | None = None) -> tuple:
        """The rest of ``epoch`` from ``train_state.step``: the new state, the seconds and the epoch's metrics.

        ``progress`` holds the sums of the epoch's steps run before a resume (from the checkpoint), so the
        epoch's train loss and accuracy add up as in an uninterrupted run. With members, the metrics' values
        are lists, one per member.
        """
        self._start_sums(progress if progress and progress.get("epoch") == epoch else {}, epoch, dev)
        sums = self.sums
        self.finite.start_epoch(sums["loss_sum"].shape, dev)
        images, start = 0, time.perf_counter()
        step, self.latest = step_of(train_state), train_state
        for epoch_step in range(step - epoch * self.steps_per_epoch, self.steps_per_epoch):
            batch = self.source(step, epoch, epoch_step)
            train_state, metrics = self.train_step(train_state, batch.step_batch, batch.key)
            self.latest = train_state
            self.finite.record(train_state, metrics)
            applied = metrics["finite"] & ~metrics["overflow"] if "overflow" in metrics else metrics["finite"]
            sums["skipped"] += ~applied  # fp16 skips overflows; nan_policy "skip" non-finite steps
            count = self.batch_size if batch.examples is None else batch.examples
            sums["loss_sum"] += torch.where(applied, metrics["loss"], 0.0) * count
            sums["correct"] += metrics["correct"]
            if batch.examples is not None:  # a Poisson batch's size varies: its real examples are counted
                sums["examples"] += torch.where(applied, count, 0)
                sums["overflow"] += batch.overflow
            step, images = step + 1, images + self.batch_size
            sums["images"] += self.batch_size
            event = StepEvent(train_state, metrics, step, epoch, epoch_step + 1, self.steps_per_epoch,
                              images * (self.members or 1) / max(time.perf_counter() - start, 1e-9),
                              sums["skipped"], self.progress, batch.examples)
            if any(hook.syncs(step) for hook in self.hooks if hasattr(hook, "syncs")):
                synchronize(dev)
                self.finite.check()  # a state after a non-finite step is never logged as good or saved
                event = self._everyone(event)
            for hook in self.hooks:
                hook(event)
        synchronize(dev)  # steps run asynchronously: the epoch ends when the GPU is done
        seconds = time.perf_counter() - start
        self.images_seen += images * (self.members or 1)
        self.finite.check()  # before evaluating and saving: the last good checkpoint stays
        return train_state, seconds, self._metrics(images, seconds)

    def _everyone(self, event: StepEvent) -> StepEvent:
        """A step's event with every member's state, metrics and sums (members spread over processes: gathered)."""
        if self.blocks.process is None:
            return event
        train_state, metrics, sums, examples = self.blocks.gather((event.train_state, event.metrics,
                                                                    self._tensor_sums(), event.examples))
        return event._replace(train_state=train_state, metrics=metrics, skipped=sums["skipped"],
                              progress=lambda: _as_json({**self.sums, **sums}), examples=examples)

    def _tensor_sums(self) -> dict:
        """The epoch's per-member sums (the tensors among :attr:`sums`)."""
        return {name: value for name, value in self.sums.items() if isinstance(value, torch.Tensor)}

    def _start_sums(self, progress: dict, epoch: int, dev) -> None:
        """The epoch's sums on the device, from a resumed checkpoint's ``progress`` (every member's: this process
        keeps its block's) or zero."""
        shape = (len(self.blocks.block),) if self.members else ()
        mine = lambda value: self.blocks.take(value) if value.ndim else value
        start = lambda name, dtype=None: mine(torch.tensor(progress.get(name, 0), device=dev,
                                                           dtype=dtype)).expand(shape).clone()
        self.sums = {"loss_sum": start("loss_sum", torch.float32), "correct": start("correct"),
                     "skipped": start("skipped"), "examples": start("examples"), "overflow": start("overflow"),
                     "images": int(progress.get("images", 0)), "epoch": epoch}

    def _metrics(self, images: int, seconds: float) -> dict:
        """The epoch's train loss and accuracy (per member), skipped steps, speed and, for Poisson batches, the
        sampled examples a padded batch could not hold."""
        sums, epoch_images = {**self.sums, **self.blocks.gather(self._tensor_sums())}, self.sums["images"]
        losses, rights, skips, examples = (sums[name].reshape(-1).tolist()
                                           for name in ("loss_sum", "correct", "skipped", "examples"))
        if self.source.varying:  # Poisson batches: the real examples they held
            means = [total / count if count else float("nan") for total, count in zip(losses, examples)]
            accuracies = [right / max(count, 1) for right, count in zip(rights, examples)]
            extra = {"poisson_overflow": sums["overflow"].reshape(-1).tolist()}
        else:  # the loss of a skipped step is not finite: it is left out of the mean
            means = [total / (epoch_images - skip * self.batch_size) if epoch_images > skip * self.batch_size
                     else float("nan") for total, skip in zip(losses, skips)]
            accuracies = [right / max(epoch_images, 1) for right in rights]
            extra = {}
        speed = images * (self.members or 1) / seconds if seconds > 0 else None  # every member's, on this clock
        metrics = {"loss": means, "accuracy": accuracies, "skipped_steps": skips, "images_per_second": speed, **extra}
        if not self.members:
            metrics.update({name: metrics[name][0] for name in ("loss", "accuracy", "skipped_steps",
                                                                 *(["poisson_overflow"] if extra else []))})
        return metrics

    def progress(self) -> dict | None:
        """The epoch's sums so far as JSON numbers (saved with a mid-epoch checkpoint); None before any epoch."""
        if not self.sums:
            return None
        return _as_json(self.sums)


def _as_json(sums: dict) -> dict:
    """An epoch's sums as JSON numbers."""
    return {name: (value.tolist() if isinstance(value, torch.Tensor) else value) for name, value in sums.items()}


def step_of(train_state) -> int:
    """The step count of a TrainState (of its first member when stacked: members step together)."""
    return int(train_state.step.reshape(-1)[0])
