"""The recipe: what a run config says to build — the model, the loss, the learning-rate schedule, the optimizer and
the train step (the minimal step with the wrappers and gradient transforms the config asks for).

The optimizer is assembled from the model's parameter-group labels (:data:`fnclass.models.LABELS`) with
Optax-style transforms; nothing here looks at parameter paths or knows a particular model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from fnclass.config import Config, OptimConfig
from fnclass.core import optim, schedules, tree
from fnclass.core.losses import cross_entropy
from fnclass.distributed.data_parallel import data_parallel_gradient, with_global_metrics
from fnclass.models import LABELS, Model, build_model
from fnclass.models.model import (
    BATCH_NORM_BIASES,
    HEAD_BIASES,
    HEAD_WEIGHTS,
    WEIGHTS,
    WHITENING_BIAS,
)
from fnclass.training.step import make_train_step, mean_gradient
from fnclass.training.wrappers import loss_scaled_gradient, skip_nonfinite, with_ema, with_loss_scaling

DECAYED = (WEIGHTS, HEAD_WEIGHTS)  # weight decay: matrices and filters, never scales or biases
ORTHOGONALIZED = (WEIGHTS,)  # Muon: filters and attention matrices, not the head


def create_model(config: Config, *, process=None) -> Model:
    """The model a run config names; in a data-parallel job (``process``) with ``train.sync_batchnorm``, its
    BatchNorm takes its statistics over the job's global batch."""
    axis = process if process is not None and config.train.sync_batchnorm else None
    return build_model(config.model, batch_norm_axis=axis)


def create_train_step(config: Config, model: Model, loss_fn: Callable, optimizer: optim.Transform, *,
                      gradient: Callable = mean_gradient, process=None, compile: bool | None = None,
                      channels_last: bool | None = None) -> Callable:
    """The run's step: :func:`fnclass.training.step.make_train_step` and what ``config.train`` adds around it.

    Gradient transforms: fp16's loss scaling (:func:`~fnclass.training.wrappers.loss_scaled_gradient`), then the
    data-parallel average over ``process`` (:func:`~fnclass.distributed.data_parallel.data_parallel_gradient`)
    around ``gradient`` (the mean gradient, or DP-SGD's clipped noisy one). Step wrappers, inside out: the weight
    EMA (``train.ema_decay``), then fp16 loss scaling or non-finite skipping (``train.nan_policy = "skip"``), then
    the global batch's metrics. Compiled (``train.compile``), the whole composition is one graph.

    Args:
      config: the run config.
      model, loss_fn, optimizer: what :func:`create_model`, :func:`create_loss` and :func:`create_run_optimizer`
        built.
      gradient: the gradient transform at the centre (one that sums over the processes itself, as DP-SGD's with a
        process, says so with a true ``reduces_over_processes`` and is not averaged again).
      process: a data-parallel job's :class:`fnclass.distributed.Process` (its gradients and metrics reduced), or
        None.
      compile: compile the step (default: ``train.compile``).
      channels_last: channels-last images (default: ``train.channels_last``).
    """
    train = config.train
    compile = train.compile if compile is None else compile
    channels_last = train.channels_last if channels_last is None else channels_last
    if train.precision == "fp16":
        gradient = loss_scaled_gradient(gradient)
    if process is not None and not getattr(gradient, "reduces_over_processes", False):
        gradient = data_parallel_gradient(gradient, process, average_state=not train.sync_batchnorm)

    def for_the_whole_step(loss_and_aux: Callable, *, compile: bool = False) -> Callable:
        return gradient(loss_and_aux, compile=whole)  # the graph the composition compiles into, not the bare step

    whole = compile
    step = make_train_step(model, loss_fn, optimizer, gradient=for_the_whole_step, precision=train.precision,
                           channels_last=channels_last)
    if train.ema_decay:
        step = with_ema(step, train.ema_decay, warmup=train.ema_warmup, every=train.accumulate_steps)
    if train.precision == "fp16":  # an overflow is skipped there already
        step = with_loss_scaling(step)
    elif train.nan_policy == "skip":
        step = skip_nonfinite(step)
    if process is not None:
        step = with_global_metrics(step, process)
    return torch.compile(step) if compile else step


def create_loss(config: Config, hyper: dict | None = None) -> Callable:
    """``loss_fn(logits, labels) -> 0-d tensor``: the mean cross-entropy with the config's label smoothing.

    ``hyper`` may hold ``"train.label_smoothing"`` as a 0-d tensor (a member of a vmapped sweep).
    """
    smoothing = (hyper or {}).get("train.label_smoothing", config.train.label_smoothing)
    return functools.partial(cross_entropy, label_smoothing=smoothing)


def create_schedule(config: OptimConfig, steps_per_epoch: float, epochs: int) -> schedules.Schedule:
    """The learning-rate schedule an :class:`OptimConfig` describes, over ``steps_per_epoch * epochs`` steps.

    ``warmup_cosine`` rises linearly from 0 over the warm-up and follows a cosine down to
    ``lr * final_lr_fraction``; ``one_cycle`` is triangular, from and back to ``lr * final_lr_fraction``.
    A run shorter than twice its warm-up keeps the warm-up's slope and peaks at its midpoint, at the learning
    rate the warm-up reaches there, so it still comes back down and never climbs faster than the full run.
    """
    total = math.floor(steps_per_epoch * epochs + 1e-9)  # steps_per_epoch is fractional with accumulation
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    low = config.lr * config.final_lr_fraction
    start = 0.0 if config.schedule == "warmup_cosine" else low
    peak = config.lr
    if warmup > total // 2:
        warmup, peak = total // 2, start + (config.lr - start) * (total // 2) / warmup
    if config.schedule == "constant":
        return schedules.constant_schedule(config.lr)
    if config.schedule == "warmup_cosine":
        return schedules.warmup_cosine(peak, warmup, total, end_value=min(low, peak))
    return schedules.piecewise_linear([0, warmup, total], [low, peak, low])


def create_optimizer(config: OptimConfig, param_labels: Callable, steps_per_epoch: float,
                     epochs: int, hyper: dict | None = None, *, accumulate_steps: int = 1) -> optim.Transform:
    """The optimizer an :class:`OptimConfig` describes, with its schedule (see :func:`create_schedule`).

    Decoupled weight decay applies to weights (filters, matrices, the head's weight), not to norm scales or
    biases. ``muon`` orthogonalises the (Nesterov momentum) updates of the ``weights`` group; ``bias_lr_scale``
    and ``head_lr_scale`` multiply the learning rate of BatchNorm/whitening biases and of the head;
    ``whiten_bias_epochs`` freezes the whitening bias after that many epochs; ``lookahead_every`` wraps
    everything in Lookahead, whose slow-weight decay ramps up as the cube of progress and ends at 1, so the run
    ends on the slow weights.

    Args:
      config: the optimizer section.
      param_labels: the model's ``param_labels``.
      steps_per_epoch: optimizer steps per epoch.
      epochs: epochs of the run.
      hyper: swept values as 0-d tensors, ``"optim.lr"`` and ``"optim.weight_decay"`` (a member of a vmapped
        sweep). The schedule is linear in the learning rate, so a swept one multiplies the schedule of lr 1; a
        swept decay keeps the decay transform in every member's chain (the state's structure stays one).
      accumulate_steps: wrap everything in :func:`fnclass.core.optim.multi_steps`: one optimizer step per that many
        batches, on their mean gradient. ``steps_per_epoch`` counts optimizer steps then (batches / accumulate).
    """
    hyper = hyper or {}
    total = math.floor(steps_per_epoch * epochs + 1e-9)  # steps_per_epoch is fractional with accumulation
    schedule = create_schedule(config, steps_per_epoch, epochs)
    if "optim.lr" in hyper:
        unit, lr = create_schedule(dataclasses.replace(config, lr=1.0), steps_per_epoch, epochs), hyper["optim.lr"]
        schedule = lambda count: lr * unit(count)
    in_group = lambda groups: lambda params: tree.tree_map(lambda label: label in groups, param_labels(params))
    parts = [optim.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    if config.name in ("adam", "adamw"):
        parts.append(optim.scale_by_adam(config.b1, config.b2, config.eps))
    elif config.momentum:
        parts.append(optim.trace(config.momentum, config.nesterov))
    if config.muon:
        parts.append(optim.orthogonalize(mask=in_group(ORTHOGONALIZED)))
    if config.weight_decay or "optim.weight_decay" in hyper:
        decay = hyper.get("optim.weight_decay", config.weight_decay)
        parts.append(optim.add_decayed_weights(decay, in_group(DECAYED)))
    parts.append(optim.scale_by_learning_rate(schedule))
    if config.bias_lr_scale != 1.0 or config.head_lr_scale != 1.0:
        factors = {HEAD_WEIGHTS: config.head_lr_scale, HEAD_BIASES: config.head_lr_scale,
                   BATCH_NORM_BIASES: config.bias_lr_scale, WHITENING_BIAS: config.bias_lr_scale}
        parts.append(optim.multi_transform({label: optim.scale(factors[label]) if label in factors
                                            else optim.identity() for label in LABELS}, param_labels))
    if config.whiten_bias_epochs:
        parts.append(optim.freeze_after(round(config.whiten_bias_epochs * steps_per_epoch),
                                        in_group((WHITENING_BIAS,))))
    optimizer = optim.chain(*parts)
    if config.lookahead_every:
        peak = config.lookahead_decay
        decay = lambda count: torch.where(count >= total, 1.0, peak * (count / total) ** 3)
        optimizer = optim.lookahead(optimizer, config.lookahead_every, decay, total)
    return optim.multi_steps(optimizer, accumulate_steps)  # outermost: every count inside is in optimizer steps


def create_run_optimizer(config: Config, param_labels: Callable, batches_per_epoch: int,
                         hyper: dict | None = None) -> optim.Transform:
    """A run's optimizer: :func:`create_optimizer` over its epochs, stepping once per ``train.accumulate_steps``
    batches."""
    accumulate = config.train.accumulate_steps
    return create_optimizer(config.optim, param_labels, batches_per_epoch / accumulate, config.train.epochs, hyper,
                            accumulate_steps=accumulate)


def create_batch_schedule(config: Config, batches_per_epoch: int) -> schedules.Schedule:
    """The learning rate in effect at each batch (0-based), for the logs: with gradient accumulation the optimizer
    steps once per ``train.accumulate_steps`` batches."""
    accumulate = config.train.accumulate_steps
    schedule = create_schedule(config.optim, batches_per_epoch / accumulate, config.train.epochs)
    return schedule if accumulate == 1 else lambda count: schedule(count // accumulate)


def interval_learning_rate(config: Config, schedule: schedules.Schedule, epoch: int, step: int,
                           steps_per_epoch: int) -> float:
    """The mean learning rate of the batches since the previous checkpoint kept for attribution, at the end of
    epoch ``epoch`` (1-based) after ``step`` batches: the epochs since the last multiple of
    ``checkpoint.every_epochs`` (the last epoch when that is 0).

    TracIn weighs each checkpoint by the step size of the interval it ends (Pruthi et al. 2020); with a
    schedule, the interval's mean is that step size per batch.
    """
    every = config.checkpoint.every_epochs or 1
    start = max(0, step - (epoch - (epoch - 1) // every * every) * steps_per_epoch)
    return sum(float(schedule(s)) for s in range(start, step)) / max(step - start, 1)
