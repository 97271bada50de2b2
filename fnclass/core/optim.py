"""Optax-style optimizers: gradient transformations over pytrees (schedules live in :mod:`fnclass.core.schedules`).

A :class:`Transform` is a pair ``init(params) -> opt_state`` and ``update(grads, opt_state, params) ->
(updates, opt_state)``; optimizers are chains of transforms and :func:`apply_updates` adds the updates
to the parameters. The arithmetic uses multi-tensor ``torch._foreach_*`` kernels, like torch.optim's
``foreach`` implementation, except under ``torch.func.vmap`` (K models trained at once), where functorch has no
batching rules for them and the same operations run tensor by tensor (the CPU's foreach kernels are that same
loop, so results are bit-identical there). Nothing here mutates its inputs: in-place calls only touch lists
freshly allocated in the same function. A learning rate may be a schedule, called on a step count that lives
in the optimizer state, so a restored state continues exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch._C._functorch import is_batchedtensor

from fnclass.core.schedules import Schedule


class Transform(NamedTuple):
    """A gradient transformation: ``init(params) -> state``, ``update(grads, state, params) -> (updates, state)``."""

    init: Callable
    update: Callable


def _batched(xs: list[torch.Tensor]) -> bool:
    """Whether the leaves are being vmapped (functorch cannot batch the multi-tensor foreach kernels)."""
    return any(is_batchedtensor(x) for x in xs)


def _mul(xs: list, y) -> list:
    """``[x * y]`` for a number or 0-d tensor ``y``."""
    return [x * y for x in xs] if _batched(xs) else torch._foreach_mul(xs, y)


def _add(xs: list, ys: list, alpha: float = 1.0) -> list:
    """``[x + alpha * y]``."""
    if _batched(xs) or _batched(ys) or isinstance(alpha, torch.Tensor):
        return [torch.add(x, y, alpha=alpha) if not isinstance(alpha, torch.Tensor) else x + alpha * y
                for x, y in zip(xs, ys)]
    return torch._foreach_add(xs, ys, alpha=alpha)


def _sub(xs: list, ys: list) -> list:
    """``[x - y]``."""
    return [x - y for x, y in zip(xs, ys)] if _batched(xs) or _batched(ys) else torch._foreach_sub(xs, ys)


def _lerp(xs: list, ys: list, weight: float) -> list:
    """``[x + weight * (y - x)]``."""
    if _batched(xs) or _batched(ys):
        return [torch.lerp(x, y, weight) for x, y in zip(xs, ys)]
    return torch._foreach_lerp(xs, ys, weight)


def _count_like(params) -> torch.Tensor:
    """A zero int64 step counter on the parameters' device."""
    leaves = optree.tree_leaves(params)
    return torch.zeros((), dtype=torch.int64, device=leaves[0].device if leaves else None)


def _zeros_like(params):
    """A tree of zeros shaped like ``params``."""
    return optree.tree_map(torch.zeros_like, params)


def _leaves(tree) -> list[torch.Tensor]:
    """The tree's leaves as a list, in optree order."""
    return optree.tree_leaves(tree)


def _like(tree, leaves: list[torch.Tensor]):
    """A tree with ``tree``'s structure and the given leaves."""
    return optree.tree_unflatten(optree.tree_structure(tree), leaves)


def chain(*transforms: Transform) -> Transform:
    """Apply transforms one after another; the state is the tuple of their states.

    Args:
      *transforms: the transforms, first applied first.

    Returns:
      One transform.
    """
    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(grads, state, params=None):
        new_state = []
        for transform, inner in zip(transforms, state):
            grads, inner = transform.update(grads, inner, params)
            new_state.append(inner)
        return grads, tuple(new_state)

    return Transform(init, update)


def scale(factor: float) -> Transform:
    """Multiply updates by a constant."""
    def update(grads, state, params=None):
        return _like(grads, _mul(_leaves(grads), factor)), state
    return Transform(lambda params: {}, update)


def scale_by_schedule(schedule: Schedule) -> Transform:
    """Multiply updates by ``schedule(count)``, where ``count`` is the number of updates made so far."""
    def init(params):
        return {"count": _count_like(params)}

    def update(grads, state, params=None):
        factor = schedule(state["count"])
        return _like(grads, _mul(_leaves(grads), factor)), {"count": state["count"] + 1}

    return Transform(init, update)


def scale_by_learning_rate(learning_rate: float | Schedule) -> Transform:
    """Multiply updates by ``-learning_rate`` (a constant or a schedule of the step)."""
    if callable(learning_rate):
        return scale_by_schedule(lambda count: -learning_rate(count))
    return scale(-learning_rate)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Adam's preconditioning: bias-corrected ``m / (sqrt(v) + eps)`` (Kingma & Ba, 2015)."""
    def init(params):
        return {"count": _count_like(params), "mu": _zeros_like(params), "nu": _zeros_like(params)}

    def update(grads, state, params=None):
        g = _leaves(grads)
        mu = _lerp(_leaves(state["mu"]), g, 1.0 - b1)
        count = state["count"] + 1
        exponent = count.to(torch.float64 if count.device.type == "cpu" else torch.float32)
        bias_correction1 = (1.0 - b1 ** exponent).to(torch.float32)
        bias_correction2_sqrt = (1.0 - b2 ** exponent).sqrt().to(torch.float32)
        if _batched(g):  # the same operations tensor by tensor
            nu = [torch.addcmul(n * b2, x, x, value=1.0 - b2) for n, x in zip(_leaves(state["nu"]), g)]
            updates = [m / (n.sqrt() / bias_correction2_sqrt + eps) / bias_correction1 for m, n in zip(mu, nu)]
        else:
            nu = torch._foreach_mul(_leaves(state["nu"]), b2)
            torch._foreach_addcmul_(nu, g, g, 1.0 - b2)
            denom = torch._foreach_sqrt(nu)
            torch._foreach_div_(denom, bias_correction2_sqrt)
            torch._foreach_add_(denom, eps)
            updates = torch._foreach_div(mu, denom)
            torch._foreach_div_(updates, bias_correction1)
        new_state = {"count": count, "mu": _like(grads, mu), "nu": _like(grads, nu)}
        return _like(grads, updates), new_state

    return Transform(init, update)


def trace(decay: float, nesterov: bool = False) -> Transform:
    """Momentum: ``t = g + decay * t``; the update is ``t`` (or ``g + decay * t`` with Nesterov), as torch SGD."""
    def init(params):
        return {"trace": _zeros_like(params)}

    def update(grads, state, params=None):
        g = _leaves(grads)
        new_trace = _add(_mul(_leaves(state["trace"]), decay), g)
        updates = _add(g, new_trace, alpha=decay) if nesterov else new_trace
        return _like(grads, updates), {"trace": _like(grads, new_trace)}

    return Transform(init, update)


def add_decayed_weights(weight_decay: float, mask: Callable[[Any], Any] | None = None) -> Transform:
    """Add ``weight_decay * param`` to each update: decoupled weight decay when chained before the lr.

    Args:
      weight_decay: the coefficient.
      mask: optional function of the params returning a tree of bools (True: decay this leaf).
    """
    def update(grads, state, params=None):
        g, p = _leaves(grads), _leaves(params)
        if mask is None:
            return _like(grads, _add(g, p, alpha=weight_decay)), state
        keep = _leaves(mask(params))
        decayed = [grad + weight_decay * param if decay else grad for grad, param, decay in zip(g, p, keep)]
        return _like(grads, decayed), state
    return Transform(lambda params: {}, update)


def clip_by_global_norm(max_norm: float) -> Transform:
    """Scale all updates together so that their joint L2 norm is at most ``max_norm`` (as clip_grad_norm_)."""
    def update(grads, state, params=None):
        g = _leaves(grads)
        norms = [torch.linalg.vector_norm(x) for x in g] if _batched(g) else torch._foreach_norm(g)
        norm = torch.linalg.vector_norm(torch.stack(norms))
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return _like(grads, _mul(g, factor)), state
    return Transform(lambda params: {}, update)


def identity() -> Transform:
    """Pass the updates through unchanged (Optax's ``identity``)."""
    return Transform(lambda params: {}, lambda grads, state, params=None: (grads, state))


def multi_transform(transforms: dict[str, Transform], param_labels: Callable[[Any], Any]) -> Transform:
    """Apply a different transform to each group of leaves, as Optax's ``multi_transform``.

    Args:
      transforms: a transform per label.
      param_labels: function of the params returning a tree like them holding one label per leaf (a model's
        ``param_labels``); every label must have a transform.

    Returns:
      A Transform whose state is ``{label: that transform's state}`` for the labels that have leaves; each
      transform sees only the list of its own leaves.
    """
    def groups(params):
        """Leaf indices by label, for the labels that have leaves."""
        labels = _leaves(param_labels(params))
        index = {name: [i for i, label in enumerate(labels) if label == name] for name in transforms}
        return {name: leaves for name, leaves in index.items() if leaves}

    def init(params):
        p = _leaves(params)
        return {name: transforms[name].init([p[i] for i in index]) for name, index in groups(params).items()}

    def update(grads, state, params=None):
        g, p = _leaves(grads), _leaves(params)
        out, new_state = list(g), {}
        for name, index in groups(params).items():
            updates, new_state[name] = transforms[name].update([g[i] for i in index], state[name],
                                                               [p[i] for i in index])
            for i, u in zip(index, updates):
                out[i] = u
        return _like(grads, out), new_state

    return Transform(init, update)


def freeze_after(steps: int, mask: Callable[[Any], Any]) -> Transform:
    """Zero the updates of masked leaves once this transform has made ``steps`` updates; other leaves pass.

    Chain it last (after the learning rate), so that momentum or weight decay cannot still move a frozen leaf.

    Args:
      steps: how many updates a masked leaf receives before it is frozen.
      mask: function of the params returning a tree of bools (True: freeze this leaf after ``steps``).

    Returns:
      A Transform whose state is ``{"count": int64 tensor}``.
    """
    def init(params):
        return {"count": _count_like(params)}

    def update(grads, state, params=None):
        frozen = state["count"] >= steps
        out = [torch.where(frozen, 0.0, g) if m else g for g, m in zip(_leaves(grads), _leaves(mask(params)))]
        return _like(grads, out), {"count": state["count"] + 1}

    return Transform(init, update)


_NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # Muon's quintic: steepest slope at 0 that keeps outputs in ~[0.7, 1.2]


def _newton_schulz(update: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's Newton–Schulz approximation of ``U V^T`` for ``update`` viewed as an (out, in*k*k) matrix."""
    a, b, c = _NEWTON_SCHULZ
    # Muon runs this in bfloat16 on the GPU; float32 keeps the CPU results close to the exact iteration.
    x = update.reshape(update.shape[0], -1).float()
    rows, cols = x.shape
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    if rows > cols:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if rows > cols:
        x = x.T
    # The factor gives every shape an update RMS of about 1/sqrt(cols), as Muon does.
    return (x * max(1.0, rows / cols) ** 0.5).reshape(update.shape).to(update.dtype)


def orthogonalize(steps: int = 5, mask: Callable[[Any], Any] | None = None) -> Transform:
    """Muon's update (Keller Jordan, 2024): replace each matrix update ``G`` by about ``U V^T`` of its SVD.

    Conv filters ``(out, in, k, k)`` are treated as ``(out, in*k*k)`` matrices; each result is multiplied by
    ``sqrt(max(1, rows / cols))``. Muon chains it after Nesterov momentum and before the learning rate. Leaves
    with fewer than two dimensions, or that ``mask`` leaves out, pass through unchanged.

    Args:
      steps: quintic Newton–Schulz iterations; five bring the singular values into about [0.68, 1.2].
      mask: optional function of the params returning a tree of bools (True: orthogonalize this leaf);
        by default every leaf with two or more dimensions.

    Returns:
      A stateless Transform.
    """
    def update(grads, state, params=None):
        g = _leaves(grads)
        keep = [True] * len(g) if mask is None else _leaves(mask(params))
        return _like(grads, [_newton_schulz(u, steps) if m and u.ndim >= 2 else u for u, m in zip(g, keep)]), state
    return Transform(lambda params: {}, update)


def lookahead(inner: Transform, every: int, decay: Schedule, total_steps: int | None = None) -> Transform:
    """Lookahead (Zhang et al., 2019) as airbench94 uses it: fast weights are pulled into slow ones periodically.

    ``inner`` moves the fast weights, ``fast = params + updates``. On a sync step (``count % every == 0``, or
    ``count == total_steps``) ``slow = d * slow + (1 - d) * fast`` with ``d = decay(count)``, and the fast
    weights restart from ``slow``; ``inner``'s state (momentum) is kept, as in airbench94. The updates are
    ``new_fast - params``, so :func:`apply_updates` gives the new weights; with ``decay(total_steps) == 1``
    the run ends on the slow weights, up to the rounding of ``params + (slow - params)``.

    Args:
      inner: the transform making the fast steps, learning rate included.
      every: steps between syncs.
      decay: schedule of the count (already incremented, so 1 on the first step) giving the slow weights' share.
      total_steps: optional last step, which is always a sync.

    Returns:
      A Transform whose state is ``{"inner": inner's state, "slow": tree like params, "count": int64 tensor}``.
    """
    def init(params):
        slow = optree.tree_map(torch.clone, params)
        return {"inner": inner.init(params), "slow": slow, "count": _count_like(params)}

    def update(grads, state, params=None):
        updates, inner_state = inner.update(grads, state["inner"], params)
        p, u, slow = _leaves(params), _leaves(updates), _leaves(state["slow"])
        count = state["count"] + 1
        sync = count % every == 0
        if total_steps is not None:
            sync = sync | (count == total_steps)
        weight = 1.0 - torch.as_tensor(decay(count), dtype=torch.float32, device=count.device)
        # Blending on every step and selecting with torch.where keeps one graph under torch.compile.
        # slow + (1 - d) * (fast - slow) is airbench94's lerp; _foreach_lerp with a tensor weight fails in inductor.
        blended = _add(_mul(_sub(_add(p, u), slow), weight), slow)
        jumps = _sub(blended, p)
        new_slow = [torch.where(sync, b, s) for b, s in zip(blended, slow)]
        new_updates = [torch.where(sync, j, x) for j, x in zip(jumps, u)]
        return _like(grads, new_updates), {"inner": inner_state, "slow": _like(params, new_slow), "count": count}

    return Transform(init, update)


def multi_steps(inner: Transform, every: int) -> Transform:
    """Gradient accumulation, as Optax's ``MultiSteps``: ``inner`` updates once per ``every`` mini steps.

    Each mini step adds its gradient to a running sum. On every ``every``-th one (``count % every == every - 1``)
    ``inner`` updates with the sum divided by ``every`` and the sum restarts from zero; on the others the updates
    are zeros and ``inner``'s state is kept, so its counters (Adam's bias correction, a learning-rate schedule)
    count optimizer steps, not mini steps. With a mean loss and equal mini-batches, ``every`` mini steps of B
    examples then equal one step of ``every * B`` examples up to rounding, for a model without BatchNorm (whose
    statistics stay those of each mini-batch).

    ``inner`` is evaluated on every mini step and its result discarded off the boundary by ``torch.where`` (where
    Optax uses a ``cond``): the cost of a step that stays one static graph, compiled or under ``vmap``.

    Args:
      inner: the optimizer applied to the mean of the accumulated gradients, learning rate included.
      every: mini steps per optimizer step, at least 1; 1 returns ``inner`` itself.

    Returns:
      A Transform whose state is ``{"count": int64 tensor (mini steps made), "grad_sum": tree like params (the
      gradients since the last optimizer step), "inner": inner's state}``.

    Raises:
      ValueError: if ``every`` is not a positive int.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"multi_steps: every must be a positive int (mini steps per optimizer step), got {every!r}")
    if every == 1:
        return inner

    def init(params):
        return {"count": _count_like(params), "grad_sum": _zeros_like(params), "inner": inner.init(params)}

    def update(grads, state, params=None):
        boundary = state["count"] % every == every - 1
        grad_sum = _add(_leaves(state["grad_sum"]), _leaves(grads))
        updates, inner_state = inner.update(_like(grads, _mul(grad_sum, 1.0 / every)), state["inner"], params)
        # Selecting the whole inner state, counters included, keeps it as it was off the boundary.
        inner_state = optree.tree_map(lambda new, old: torch.where(boundary, new, old), inner_state, state["inner"])
        updates = [torch.where(boundary, u, 0.0) for u in _leaves(updates)]
        grad_sum = [torch.where(boundary, 0.0, s) for s in grad_sum]
        new_state = {"count": state["count"] + 1, "grad_sum": _like(state["grad_sum"], grad_sum), "inner": inner_state}
        return _like(grads, updates), new_state

    return Transform(init, update)


def apply_updates(params, updates):
    """Return ``params + updates`` leaf by leaf (a new tree; ``params`` is not modified).

    Args:
      params: the parameter tree.
      updates: a tree of the same structure, as returned by a transform's ``update``.

    Returns:
      The new parameter tree.
    """
    return _like(params, _add(_leaves(params), _leaves(updates)))


def adam(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Transform:
    """Adam, numerically equal to PyTorch's Adam (no weight decay).

    Args:
      learning_rate: a constant or a schedule of the step.
      b1: decay of the first-moment average.
      b2: decay of the second-moment average.
      eps: added to the root of the second moment.

    Returns:
      The optimizer as a Transform.
    """
    return chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(learning_rate))


def adamw(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 1e-2, mask: Callable | None = None) -> Transform:
    """AdamW (decoupled weight decay, Loshchilov & Hutter), numerically equal to PyTorch's AdamW.

    Args:
      learning_rate: a constant or a schedule of the step; it also scales the decay, as in torch.
      b1, b2, eps: as for :func:`adam`.
      weight_decay: the decay coefficient.
      mask: optional function of the params returning a tree of bools (True: decay this leaf).

    Returns:
      The optimizer as a Transform.
    """
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))


def sgd(learning_rate: float | Schedule, momentum: float = 0.0, nesterov: bool = False,
        weight_decay: float = 0.0, mask: Callable | None = None) -> Transform:
    """SGD with optional (Nesterov) momentum and decoupled weight decay.

    With ``weight_decay=0`` it equals PyTorch's SGD with the same momentum. The decay is
    decoupled (``param -= lr * weight_decay * param``), not added to the gradient before momentum.

    Args:
      learning_rate: a constant or a schedule of the step.
      momentum: the momentum coefficient (0 for plain SGD).
      nesterov: use Nesterov momentum.
      weight_decay: the decoupled decay coefficient.
      mask: optional function of the params returning a tree of bools (True: decay this leaf).

    Returns:
      The optimizer as a Transform.
    """
    parts = [trace(momentum, nesterov)] if momentum else []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay, mask))
    return chain(*parts, scale_by_learning_rate(learning_rate))


nesterov_sgd = functools.partial(sgd, nesterov=True)
