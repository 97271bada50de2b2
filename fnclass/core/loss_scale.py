"""Dynamic loss scaling for fp16 training, as pure functions of a small state pytree.

fp16 autocast is the fast mixed precision of GPUs without fast bf16 (V100, T4), but fp16's range is narrow:
small gradients underflow to zero in the backward pass. Multiplying the loss by a large scale lifts them into
range; dividing the gradients by the same scale afterwards gives the true gradients back. Too large a scale
overflows instead, so the scale adapts. A step uses it like this::

    scaled_grads, scaled_loss = torch.func.grad_and_value(
        lambda p: loss_scale.scale_loss(loss_fn(p), scale_state))(params)
    grads = loss_scale.unscale(scaled_grads, scale_state)
    finite = step.all_finite(scaled_loss, grads)
    # the optimizer update, kept only where `finite` (torch.where, as make_train_step's skip_nonfinite)
    scale_state = loss_scale.update(scale_state, finite)  # backs off after an overflow, grows after a calm spell

The rules and defaults are ``torch.amp.GradScaler``'s (its ``_amp_update_scale_`` kernel): start at 2**16; on a
step with an inf or NaN gradient multiply the scale by 0.5 and restart the count; after 2000 finite steps in a
row multiply it by 2, unless that would overflow float32. Unlike GradScaler there is no object and no in-place
update: the state ``{"scale", "growth_tracker"}`` lives in the TrainState, is checkpointed under those names,
stacks under ``vmap``, and every choice is a ``torch.where`` on the device, so nothing waits for the host.
"""

from __future__ import annotations

import math

import optree
import torch
from torch._C._functorch import is_batchedtensor


def init(initial_scale: float = 2.0**16) -> dict[str, torch.Tensor]:
    """The state of a fresh run.

    Args:
      initial_scale: the first scale (GradScaler's default); a start that is too large only costs a few skipped
        steps while the scale halves down.

    Returns:
      ``{"scale": float32 0-d tensor, "growth_tracker": int64 0-d tensor}`` (the finite steps in a row since the
      last change of scale), on the CPU; move it with :func:`fnclass.core.tree.tree_to`.
    """
    if not (0.0 < initial_scale and math.isfinite(initial_scale)):
        raise ValueError(f"loss scale: initial_scale must be a positive finite number, got {initial_scale!r}")
    return {"scale": torch.tensor(initial_scale, dtype=torch.float32),
            "growth_tracker": torch.zeros((), dtype=torch.int64)}


def scale_loss(loss: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss multiplied by the current scale: differentiate this one.

    Args:
      loss: the 0-d loss.
      state: the loss-scale state.

    Returns:
      ``loss * scale``.
    """
    return loss * state["scale"]


def unscale(grads, state: dict[str, torch.Tensor]):
    """Divide the gradients of the scaled loss by the scale, giving the gradients of the loss.

    As GradScaler, the leaves are multiplied by ``1 / scale`` (the reciprocal taken in float64, rounded once to
    float32), so a power-of-two scale unscales exactly. A non-finite gradient stays non-finite.

    Args:
      grads: the gradient tree of :func:`scale_loss`'s result.
      state: the loss-scale state the loss was scaled with.

    Returns:
      A new tree like ``grads``; ``grads`` is not modified.
    """
    leaves, treedef = optree.tree_flatten(grads)
    inverse = state["scale"].double().reciprocal().float()
    # functorch has no batching rule for the multi-tensor kernel: under vmap, the same products one by one.
    if is_batchedtensor(inverse) or any(is_batchedtensor(leaf) for leaf in leaves):
        unscaled = [leaf * inverse for leaf in leaves]
    else:
        unscaled = torch._foreach_mul(leaves, inverse)
    return optree.tree_unflatten(treedef, list(unscaled))


def update(state: dict[str, torch.Tensor], finite: torch.Tensor, *, growth_factor: float = 2.0,
           backoff_factor: float = 0.5, growth_interval: int = 2000) -> dict[str, torch.Tensor]:
    """The state after one step, by ``torch.amp.GradScaler``'s rules.

    Not finite: ``scale *= backoff_factor`` and the tracker restarts at 0. Finite: the tracker counts the step;
    when the count reaches ``growth_interval`` exactly, ``scale *= growth_factor`` (kept only if the result is
    finite in float32) and the tracker restarts at 0. The products are taken in float64 and rounded once, as the
    kernel does with its double factors, so any factors give GradScaler's scale bit for bit.

    Args:
      state: the loss-scale state.
      finite: 0-d bool tensor, whether the step's loss and gradients were all finite.
      growth_factor: multiplies the scale after ``growth_interval`` finite steps in a row.
      backoff_factor: multiplies the scale after a non-finite step.
      growth_interval: finite steps in a row before the scale grows.

    Returns:
      A new state; ``state`` is not modified.
    """
    scale, tracker = state["scale"], state["growth_tracker"]
    counted = tracker + 1
    # GradScaler compares with ==: a tracker already past the interval (the interval lowered) never grows.
    due = counted == growth_interval
    grown = (scale.double() * growth_factor).float()
    backed_off = (scale.double() * backoff_factor).float()
    kept_or_grown = torch.where(due & torch.isfinite(grown), grown, scale)
    return {"scale": torch.where(finite, kept_or_grown, backed_off),
            "growth_tracker": torch.where(finite & ~due, counted, torch.zeros_like(counted))}
