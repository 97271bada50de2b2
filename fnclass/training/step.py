"""The step: the ``TrainState`` pytree and the pure train and eval steps built on ``torch.func``.

``make_train_step`` returns ``step(train_state, batch, key) -> (train_state, metrics)``, a pure function of
pytrees: it can be compiled as one graph, stacked under ``vmap``, and its gradient swapped (see ``gradient``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from fnclass.core import loss_scale, optim, random
from fnclass.core.tree import tree_index, tree_stack
from fnclass.io import autocast
from fnclass.models import Model


class TrainState(NamedTuple):
    """Everything a run carries from step to step, as one pytree.

    Attributes:
      step: int64 0-d tensor, the number of optimizer updates made.
      params: the model's parameter tree.
      state: the model's state tree (BatchNorm running statistics).
      opt_state: the optimizer's state tree.
      key: the run's random key; per-step keys are ``fold_in(key, step)``.
      ema: with ``train.ema_decay``, ``{"params": ..., "state": ...}``: the exponential moving average of the
        parameters and of the BatchNorm statistics (see :func:`ema_update`); None without.
      loss_scale: with ``train.precision = "fp16"``, the dynamic loss scale's state (:mod:`fnclass.core.loss_scale`);
        None without.
    """

    step: torch.Tensor
    params: Any
    state: Any
    opt_state: Any
    key: torch.Tensor
    ema: Any = None
    loss_scale: Any = None


def start_ema(train_state: TrainState) -> TrainState:
    """``train_state`` with its EMA set to copies of its current parameters and model state."""
    copy = lambda tree: optree.tree_map(torch.clone, tree)
    return train_state._replace(ema={"params": copy(train_state.params), "state": copy(train_state.state)})


def create_train_state(model: Model, optimizer: optim.Transform, key: torch.Tensor, *,
                       ema: bool = False, loss_scaling: bool = False) -> TrainState:
    """Initialise a model and its optimizer from one key.

    Args:
      model: the model.
      optimizer: the optimizer transform.
      key: the run's key; split into the init key and the run key.
      ema: also start an EMA of the parameters and model state (:func:`start_ema`).
      loss_scaling: also start a dynamic loss scale (fp16; :func:`fnclass.core.loss_scale.init`).

    Returns:
      A TrainState at step 0 (on the CPU; move it with :func:`fnclass.core.tree.tree_to`).
    """
    init_key, run_key = random.split(key)
    params, state = model.init(init_key)
    train_state = TrainState(torch.zeros((), dtype=torch.int64), params, state, optimizer.init(params), run_key,
                             loss_scale=loss_scale.init() if loss_scaling else None)
    return start_ema(train_state) if ema else train_state


def _autocast(device_type: str, precision: str):
    """The autocast of ``precision`` on ``device_type`` (:func:`fnclass.io.autocast`)."""
    return autocast(device_type, precision)


def _eager_grad_and_value(loss_and_aux: Callable) -> Callable:
    """``torch.func.grad_and_value(loss_and_aux, has_aux=True)``'s contract, computed with plain reverse mode.

    torch.func always differentiates with ``create_graph=True`` (so that transforms can nest), which keeps
    a graph of the backward pass alive and made the uncompiled step about 7% slower than a stateful
    ``loss.backward()`` on the CPU (benchmarks/RESULTS.md). Under ``torch.compile`` that cost disappears,
    so the compiled step keeps torch.func. Gradients are identical (tested).
    """
    def grad_and_value(params, *args):
        leaves, treedef = optree.tree_flatten(params)
        leaves = [leaf.detach().requires_grad_() for leaf in leaves]
        loss, aux = loss_and_aux(optree.tree_unflatten(treedef, leaves), *args)
        grads = torch.autograd.grad(loss, leaves)
        return optree.tree_unflatten(treedef, list(grads)), (loss.detach(), aux)
    return grad_and_value


def mean_gradient(loss_and_aux: Callable, *, compile: bool = False, transformable: bool = False) -> Callable:
    """The default gradient of :func:`make_train_step`: of the batch's mean loss, ``grad_and_value``-shaped.

    Compiled or ``transformable`` (the step will run under ``vmap``), it is ``torch.func.grad_and_value(
    loss_and_aux, has_aux=True)``; eager, the same computation through ``torch.autograd.grad`` (see
    :func:`_eager_grad_and_value`), which functorch transforms refuse.
    """
    if compile or transformable:
        return torch.func.grad_and_value(loss_and_aux, has_aux=True)
    return _eager_grad_and_value(loss_and_aux)


def all_finite(loss: torch.Tensor | None, grads) -> torch.Tensor:
    """A 0-d bool device tensor: ``loss`` (unless None) and every floating-point element of the tree ``grads`` (or
    any tree of dicts, lists and tuples of tensors) are finite (no host sync)."""
    checks = [torch.isfinite(g).all() for g in _float_leaves(grads, [])]
    checks += [torch.isfinite(loss).all()] if loss is not None else []
    return torch.stack(checks).all()


def _float_leaves(tree, out: list) -> list:
    """The floating-point tensors of a tree of dicts, lists and tuples, appended to ``out``. Walked by hand, not
    with optree: under torch.compile, Dynamo's optree support breaks the graph on the dicts the step itself built
    (the new optimizer state's; "SourcelessBuilder ... DictMetaData", torch 2.14), and a plain walk traces."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point():
            out.append(tree)
    elif isinstance(tree, dict):
        for value in tree.values():
            _float_leaves(value, out)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _float_leaves(value, out)
    return out


def make_train_step(model: Model, loss_fn: Callable, optimizer: optim.Transform, *, gradient: Callable = mean_gradient,
                    compile: bool = False, precision: str = "fp32", channels_last: bool = False) -> Callable:
    """Build ``step(train_state, batch, key) -> (train_state, metrics)``: the gradient, then the update.

    One call computes the loss and its gradient (model state as an auxiliary output), transforms the gradient with
    ``optimizer`` and applies it. What else a run wants from its step is a wrapper around this one or a transform of
    its ``gradient`` (:mod:`fnclass.training.wrappers`: non-finite skipping, the weight EMA, fp16 loss scaling;
    :mod:`fnclass.distributed.data_parallel`: the cross-process average; :mod:`fnclass.privacy`: DP-SGD's clipped,
    noised gradient); :func:`fnclass.training.recipe.create_train_step` builds a run's composition from its config.
    Inputs are never mutated and no buffer is donated: the returned TrainState is made of new tensors (its ``ema``
    and ``loss_scale`` passed through unchanged). ``metrics`` holds 0-d device tensors ``loss`` (mean over the
    batch), ``correct`` (count) and ``finite`` (bool: the loss, every gradient element and the updated parameters,
    model state and optimizer state are finite); nothing is synchronised with the host.

    Args:
      model: the model to train.
      loss_fn: ``loss_fn(logits, labels) -> 0-d tensor``, e.g. ``partial(cross_entropy, label_smoothing=0.1)``;
        for batches with loss weights also ``loss_fn(logits, labels, weights=...)`` (:func:`cross_entropy` does).
      optimizer: the optimizer transform.
      gradient: ``gradient(loss_and_aux, *, compile) -> grad_and_value`` where ``loss_and_aux(params, state,
        images, labels, key) -> (loss, (new_state, logits))`` and ``grad_and_value`` takes the same arguments
        and returns ``(grads, (loss, (new_state, logits)))``, as ``torch.func.grad_and_value(..., has_aux=True)``
        does. The default, :func:`mean_gradient`, differentiates the batch's mean loss; a per-example clipped
        and noised sum (DP-SGD) or a cross-process average (data parallel) drops in here. When the TrainState
        holds a loss scale (fp16), ``grad_and_value`` also gets the scale as a last argument
        (:func:`fnclass.training.wrappers.loss_scaled_gradient`).
      compile: compile the whole step (gradient and update) as one graph with ``torch.compile``.
      precision: ``"fp32"``, ``"bf16"`` (autocast on CUDA and the CPU) or ``"fp16"`` (autocast on CUDA; ignored
        on the CPU); params, optimizer state and BatchNorm statistics stay float32. fp16 needs loss scaling around
        the step
        (:func:`fnclass.training.wrappers.with_loss_scaling`).
      channels_last: feed images in channels-last memory format (faster convolutions on recent GPUs, and
        about 1.5x faster on this project's 2-core CPU with oneDNN).

    Returns:
      The step function. ``batch`` is ``(images, labels)``: float NCHW images and int64 labels (or float
      ``(B, classes)`` soft targets from mixup/CutMix: ``correct`` then counts the targets' largest entry), or
      ``(images, labels, weights)`` with a loss weight per example (``data.train_weights``: the loss is the mean
      of ``weights * per-example loss``, and ``labels`` reaches ``gradient`` as the pair ``(labels, weights)``);
      ``key`` drives the model's randomness (dropout) for this step.
    """
    def loss_and_aux(params, state, images, labels, key):
        labels, weights = labels if isinstance(labels, tuple) else (labels, None)  # (labels, loss weights)
        with _autocast(images.device.type, precision):
            logits, new_state = model.apply(params, state, images, train=True, key=key)
        loss = loss_fn(logits, labels) if weights is None else loss_fn(logits, labels, weights=weights)
        return loss, (new_state, logits.detach())

    grad_and_value = gradient(loss_and_aux, compile=compile)

    def step(train_state: TrainState, batch, key):
        images, labels, *weights = batch
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        scale = () if train_state.loss_scale is None else (train_state.loss_scale["scale"],)
        targets = (labels, weights[0]) if weights else labels
        grads, (loss, (new_state, logits)) = grad_and_value(train_state.params, train_state.state, images,
                                                            targets, key, *scale)
        updates, opt_state = optimizer.update(grads, train_state.opt_state, train_state.params)
        params = optim.apply_updates(train_state.params, updates)
        hard = labels if labels.ndim == 1 else labels.argmax(dim=-1)  # soft (mixed) targets: their larger part
        # Finite: the loss (GradScaler looks at the gradients alone), every gradient, and what the update made: the
        # parameters, the model state (BatchNorm statistics) and the optimizer state.
        finite = all_finite(None if scale else loss, grads) & all_finite(None, (params, new_state, opt_state))
        metrics = {"loss": loss.detach(), "correct": (logits.argmax(dim=-1) == hard).sum(), "finite": finite}
        return train_state._replace(step=train_state.step + 1, params=params, state=new_state,
                                    opt_state=opt_state), metrics

    return torch.compile(step) if compile else step


def make_members_step(build_step: Callable[[dict], Callable], *, compile: bool = False,
                      chunk_size: int | None = None, strategy: str = "vmap") -> Callable:
    """Build ``step(train_states, batches, keys, hyper) -> (train_states, metrics)`` for K stacked members.

    Every argument carries the members on a leading axis: a TrainState stacked with
    :func:`fnclass.core.tree.tree_stack`, batches ``(K, B, ...)``, keys ``(K, 2)`` and ``hyper``, a dict of ``(K,)``
    tensors of swept hyperparameters (may be empty). One member's update is ``build_step(hyper_i)``, a step made
    by :func:`make_train_step` with ``gradient=functools.partial(mean_gradient, transformable=True)`` from that
    member's 0-d hyperparameters; the members run at once under ``torch.func.vmap`` (randomness comes only from
    the keys, so vmap's ``randomness="error"`` holds). ``metrics`` leaves are ``(K,)``.

    Args:
      build_step: ``hyper -> step`` for one member.
      compile: compile the vmapped step as one graph.
      chunk_size: vmap this many members at a time (bounds activation memory; ``None``: all at once).
      strategy: ``"vmap"``, or ``"loop"``: the same stacked-in, stacked-out step computed member after member
        with ``build_step`` (which may then use the eager gradient and channels-last images, and equals the
        single runs bit for bit when nothing is swept). On the CPU, vmap's grouped convolutions measured 2–5x
        slower than the loop (benchmarks/RESULTS.md).
    """
    def member_step(fields, batch, key, hyper):
        train_state, metrics = build_step(hyper)(TrainState(**fields), batch, key)
        return _present(train_state), metrics

    if strategy == "loop":
        steps: dict[int, Callable] = {}  # member -> its step, built once (its hyperparameters never change)

        def looped(train_state, batch, key, hyper):
            outs = []
            for i in range(len(key)):
                if i not in steps:
                    steps[i] = build_step({name: value[i] for name, value in hyper.items()})
                outs.append(steps[i](tree_index(train_state, i), tuple(field[i] for field in batch), key[i]))
            return tree_stack([out[0] for out in outs]), tree_stack([out[1] for out in outs])
        return looped
    stacked = torch.func.vmap(member_step, randomness="error", chunk_size=chunk_size)

    def vmapped(train_state, batch, key, hyper):
        fields, metrics = stacked(_present(train_state), batch, key, hyper)
        return TrainState(**fields), metrics
    return torch.compile(vmapped) if compile else vmapped


def _present(train_state: TrainState) -> dict:
    """The fields of a TrainState that are set: vmap maps over tensors only, and the optional ones may be None."""
    return {name: value for name, value in train_state._asdict().items() if value is not None}


def make_eval_step(model: Model, *, compile: bool = False, precision: str = "fp32",
                   channels_last: bool = False) -> Callable:
    """Build ``evaluate(params, state, images) -> logits`` (float32, BatchNorm running statistics, no grad).

    Args:
      model: the model.
      compile: compile the forward pass with ``torch.compile``.
      precision: ``"fp32"`` or ``"bf16"`` (autocast, on CUDA and the CPU).
      channels_last: feed images in channels-last memory format.

    Returns:
      The eval function.
    """
    def evaluate(params, state, images):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _autocast(images.device.type, precision):
            logits, _ = model.apply(params, state, images, train=False)
        return logits.float()

    return torch.compile(evaluate) if compile else evaluate
