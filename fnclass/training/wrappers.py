"""Step wrappers: each takes a step ``step(train_state, batch, key) -> (train_state, metrics)`` and returns one.

A capability that changes how updates are made wraps the minimal step of
:func:`fnclass.training.step.make_train_step` (Optax's ``apply_if_finite`` and ``MultiSteps`` are the model):
its state lives in the TrainState (``ema``, ``loss_scale``), its logic in one place here, and it composes with
members (``vmap`` or a loop over the wrapped step), data parallel and the gradient transforms. Order matters where
two touch the same fields: the EMA averages the new weights, so non-finite skipping and loss scaling go around it
(``skip_nonfinite(with_ema(step))``) and keep the old average with the old weights.
"""

from __future__ import annotations

from collections.abc import Callable

import optree
import torch

from fnclass.core import loss_scale, optim
from fnclass.training.step import TrainState

Step = Callable  # step(train_state, batch, key) -> (train_state, metrics)


def ema_decay_at(decay: float, step: torch.Tensor, warmup: bool) -> torch.Tensor | float:
    """The EMA decay used for update number ``step`` (1 for the first update).

    With ``warmup``, ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's ``ExponentialMovingAverage`` with
    ``num_updates``, timm's ``ModelEmaV3`` warm-up), so early averages are not dominated by the random start.
    """
    if not warmup:
        return decay
    return torch.clamp((1.0 + step) / (10.0 + step), max=decay)


def ema_update(ema: dict, params, state, decay) -> dict:
    """``ema + (1 - decay) * (new - ema)`` for the parameters and the model state (BatchNorm statistics)."""
    old = [leaf.detach() for leaf in optree.tree_leaves(ema)]
    new = [leaf.detach() for leaf in optree.tree_leaves({"params": params, "state": state})]
    if isinstance(decay, torch.Tensor):  # a warm-up's decay: one lerp per leaf (a tensor weight is not foreach on
        averaged = [torch.lerp(a, b, 1.0 - decay) for a, b in zip(old, new)]  # every torch this runs on)
    else:
        averaged = optim._lerp(old, new, 1.0 - decay)
    return optree.tree_unflatten(optree.tree_structure(ema), averaged)


def with_ema(step: Step, decay: float, *, warmup: bool = False, every: int = 1) -> Step:
    """``step`` that also averages the new parameters and model state into ``train_state.ema``.

    The TrainState must hold an EMA (``create_train_state(..., ema=True)`` or :func:`fnclass.training.step.start_ema`).

    Args:
      step: the step to wrap.
      decay: the EMA's decay (``train.ema_decay``).
      warmup: ramp the decay up as :func:`ema_decay_at` says.
      every: average only every this many steps (``train.accumulate_steps``: when the weights move), the warm-up
        counting those updates.
    """
    def ema_step(train_state: TrainState, batch, key):
        new, metrics = step(train_state, batch, key)
        updates_made = (train_state.step + 1) // every
        ema = ema_update(train_state.ema, new.params, new.state, ema_decay_at(decay, updates_made, warmup))
        if every > 1:
            due = (train_state.step + 1) % every == 0
            ema = optree.tree_map(lambda fresh, old: torch.where(due, fresh, old), ema, train_state.ema)
        return new._replace(ema=ema), metrics
    return ema_step


def _kept(new: TrainState, old: TrainState, finite: torch.Tensor, *, count_steps: bool) -> TrainState:
    """``new`` where ``finite``, else ``old``'s parameters, model state, EMA and optimizer state (its integer step
    counters from ``new`` when ``count_steps``); selected with ``torch.where``, so nothing waits for the host."""
    keep = lambda fresh, stale: torch.where(finite, fresh, stale)
    count = lambda fresh, stale: fresh if count_steps and not fresh.is_floating_point() else keep(fresh, stale)
    params, state, ema = optree.tree_map(keep, (new.params, new.state, new.ema), (old.params, old.state, old.ema),
                                         none_is_leaf=False)
    return new._replace(params=params, state=state, ema=ema,
                        opt_state=optree.tree_map(count, new.opt_state, old.opt_state))


def skip_nonfinite(step: Step) -> Step:
    """``step`` that keeps the old parameters, model state, EMA and optimizer state when the loss or a gradient is
    not finite (``metrics["finite"]`` False), as Optax's ``apply_if_finite`` does; ``step`` still counts the batch."""
    def guarded(train_state: TrainState, batch, key):
        new, metrics = step(train_state, batch, key)
        return _kept(new, train_state, metrics["finite"], count_steps=False), metrics
    return guarded


def loss_scaled_gradient(gradient: Callable) -> Callable:
    """A ``gradient`` transform (:func:`fnclass.training.step.make_train_step`) of the loss times a scale: its
    ``grad_and_value`` takes the scale as a last argument and returns the gradients and loss unscaled
    (:func:`fnclass.core.loss_scale.unscale`), so a small gradient survives fp16's narrow range."""
    def scaled(loss_and_aux: Callable, *, compile: bool = False) -> Callable:
        def scaled_loss(params, state, images, labels, key, scale):
            loss, aux = loss_and_aux(params, state, images, labels, key)
            return loss * scale, aux

        grad_and_value = gradient(scaled_loss, compile=compile)

        def unscaled(params, state, images, labels, key, scale):
            grads, (loss, aux) = grad_and_value(params, state, images, labels, key, scale)
            return loss_scale.unscale(grads, {"scale": scale}), (loss / scale, aux)
        return unscaled
    return scaled


def with_loss_scaling(step: Step) -> Step:
    """``step`` with ``torch.amp.GradScaler``'s dynamic loss scale (:mod:`fnclass.core.loss_scale`) around it.

    ``step``'s gradient must be a :func:`loss_scaled_gradient` and its TrainState hold ``loss_scale``. A step whose
    gradients overflow is skipped (parameters, model state, EMA and the optimizer's floating state unchanged; its
    integer step counters advance, so schedules stay on the batches, as a learning-rate scheduler does beside
    GradScaler), the scale halves and ``metrics["overflow"]`` is True; only when the scale falls below 1 (even
    unscaled gradients overflow) does ``metrics["finite"]`` turn False, the divergence ``train.nan_policy`` acts on.
    """
    def scaled(train_state: TrainState, batch, key):
        new, metrics = step(train_state, batch, key)
        finite = metrics["finite"]
        new = _kept(new, train_state, finite, count_steps=True)
        scale_state = loss_scale.update(train_state.loss_scale, finite)
        return new._replace(loss_scale=scale_state), {**metrics, "overflow": ~finite,
                                                      "finite": finite | (scale_state["scale"] >= 1.0)}
    return scaled
