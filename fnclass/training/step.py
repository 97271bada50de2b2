"""The step: the ``TrainState`` pytree and the pure train and eval steps built on ``torch.func``.

``make_train_step`` returns ``step(train_state, batch, key) -> (train_state, metrics)``, a pure function of
pytrees: it can be compiled as one graph, stacked under ``vmap``, and its gradient swapped (see ``gradient``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from fnclass.core import layers, loss_scale, optim, random
from fnclass.core.tree import tree_index, tree_stack
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


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device_type: str, precision: str):
    """bf16 or fp16 autocast on CUDA when asked for; float32 everywhere else."""
    if precision in AUTOCAST and device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=AUTOCAST[precision])
    return contextlib.nullcontext()


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


def data_parallel(gradient: Callable, process, *, sync_batch_norm: bool = True) -> Callable:
    """``gradient`` (e.g. :func:`mean_gradient`) averaged across the processes of a data-parallel job.

    Each process differentiates the mean loss of its shard of the global batch; the gradients and losses are then
    averaged with an all-reduce (JAX's ``pmean``), so every process holds the global batch's mean gradient. With
    ``sync_batch_norm``, BatchNorm's statistics span the global batch too (the all-reduces are differentiable), and
    the result equals one process stepping through the whole batch, up to float rounding.

    Args:
      gradient: the gradient to distribute, with :func:`make_train_step`'s ``gradient`` signature.
      process: a :class:`fnclass.distributed.Process`.
      sync_batch_norm: BatchNorm over the global batch (``train.sync_batchnorm``) rather than each shard.
    """
    from fnclass.distributed import all_mean

    def distributed(loss_and_aux: Callable, *, compile: bool = False) -> Callable:
        def synchronised(*args):
            with layers.synchronised_batch_norm(process if sync_batch_norm else None):
                return loss_and_aux(*args)

        grad_and_value = gradient(synchronised, compile=compile)

        def averaged(params, *args):
            grads, (loss, (new_state, logits)) = grad_and_value(params, *args)
            if not sync_batch_norm:  # each shard's running statistics: averaged, so every process keeps one model
                new_state = all_mean(new_state, process)
            return all_mean(grads, process), (all_mean(loss, process), (new_state, logits))
        return averaged
    return distributed


def all_finite(loss: torch.Tensor | None, grads) -> torch.Tensor:
    """A 0-d bool device tensor: ``loss`` (unless None) and every element of the gradient tree are finite (no host
    sync)."""
    checks = [torch.isfinite(g).all() for g in optree.tree_leaves(grads)]
    checks += [torch.isfinite(loss).all()] if loss is not None else []
    return torch.stack(checks).all()


def make_train_step(model: Model, loss_fn: Callable, optimizer: optim.Transform, *, gradient: Callable = mean_gradient,
                    compile: bool = False, precision: str = "fp32", channels_last: bool = False,
                    skip_nonfinite: bool = False, ema_decay: float = 0.0, ema_warmup: bool = False, ema_every: int = 1,
                    process=None, sync_batch_norm: bool = True) -> Callable:
    """Build ``step(train_state, batch, key) -> (train_state, metrics)``.

    One call computes the loss and its gradient (model state as an auxiliary output), transforms the
    gradient with ``optimizer`` and applies it. Compiled, the gradient is ``torch.func.grad_and_value``
    and the whole step is one graph; eager, it is the same computation through ``torch.autograd.grad``
    without torch.func's ``create_graph=True`` overhead (to nest transforms such as ``vmap`` over the
    model, apply ``torch.func`` to ``model.apply`` directly). Inputs are never
    mutated and no buffer is donated: the returned TrainState is made of new tensors. ``metrics`` holds
    0-d device tensors ``loss`` (mean over the batch), ``correct`` (count) and ``finite`` (bool: the loss and
    every gradient element are finite); nothing is synchronised with the host.

    Args:
      model: the model to train.
      loss_fn: ``loss_fn(logits, labels) -> 0-d tensor``, e.g. ``partial(cross_entropy, label_smoothing=0.1)``.
      optimizer: the optimizer transform.
      gradient: ``gradient(loss_and_aux, *, compile) -> grad_and_value`` where ``loss_and_aux(params, state,
        images, labels, key) -> (loss, (new_state, logits))`` and ``grad_and_value`` takes the same arguments
        and returns ``(grads, (loss, (new_state, logits)))``, as ``torch.func.grad_and_value(..., has_aux=True)``
        does. The default, :func:`mean_gradient`, differentiates the batch's mean loss; a per-example clipped
        and noised sum (DP-SGD) or a cross-process average (data parallel) drops in here.
      compile: compile the whole step (gradient and update) as one graph with ``torch.compile``.
      precision: ``"fp32"``, ``"bf16"`` for bf16 autocast on CUDA (params, optimizer state and BatchNorm
        statistics stay float32; ignored on the CPU), or ``"fp16"``: fp16 autocast on CUDA with dynamic loss
        scaling by ``torch.amp.GradScaler``'s rules (:mod:`fnclass.core.loss_scale`; the TrainState holds the scale).
        The loss is scaled before differentiation and the gradients unscaled; a step whose gradients overflow is
        skipped (parameters, model state, EMA and the optimizer's floating state unchanged; its integer step
        counters advance, so schedules stay on the batches), the scale halves and ``metrics["overflow"]``
        is True; only when the scale falls below 1 (even unscaled gradients overflow) does ``metrics["finite"]``
        turn False, the divergence ``train.nan_policy`` acts on. On the CPU the scaling runs in float32, which
        lets tests inject overflows.
      channels_last: feed images in channels-last memory format (faster convolutions on recent GPUs, and
        about 1.5x faster on this project's 2-core CPU with oneDNN).
      skip_nonfinite: when the loss or a gradient is not finite, return the parameters, model state and
        optimizer state unchanged (``step`` still counts the batch), as Optax's ``apply_if_finite`` does;
        selected on the device with ``torch.where``, so nothing waits for the host.
      ema_decay: when > 0 (the TrainState then has an ``ema``, see :func:`start_ema`), average the new
        parameters and model state into it with this decay after every update (:func:`ema_update`).
      ema_warmup: ramp the decay up as :func:`ema_decay_at` says.
      ema_every: average only every this many steps (``train.accumulate_steps``: when the weights move), the
        warm-up counting those updates.
      process: a :class:`fnclass.distributed.Process` of a data-parallel job: ``batch`` is this process's shard
        of the global batch, the gradient is :func:`data_parallel` of ``gradient``, and ``metrics["correct"]``
        counts the global batch; every process returns the same TrainState.
      sync_batch_norm: with ``process``, BatchNorm statistics over the global batch.

    Returns:
      The step function. ``batch`` is ``(images, labels)``: float NCHW images and int64 labels (or float
      ``(B, classes)`` soft targets from mixup/CutMix: ``correct`` then counts the targets' largest entry);
      ``key`` drives the model's randomness (dropout) for this step.
    """
    scaling = precision == "fp16"

    def loss_and_aux(params, state, images, labels, key, *scale):
        with _autocast(images.device.type, precision):
            logits, new_state = model.apply(params, state, images, train=True, key=key)
        loss = loss_fn(logits, labels)
        return loss * scale[0] if scale else loss, (new_state, logits.detach())

    if process is not None:
        gradient = data_parallel(gradient, process, sync_batch_norm=sync_batch_norm)
    grad_and_value = gradient(loss_and_aux, compile=compile)

    def step(train_state: TrainState, batch, key):
        images, labels = batch
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        scale = (train_state.loss_scale["scale"],) if scaling else ()
        grads, (loss, (new_state, logits)) = grad_and_value(train_state.params, train_state.state, images,
                                                            labels, key, *scale)
        if scaling:
            grads, loss = loss_scale.unscale(grads, train_state.loss_scale), loss / scale[0]
        updates, opt_state = optimizer.update(grads, train_state.opt_state, train_state.params)
        params = optim.apply_updates(train_state.params, updates)
        finite = all_finite(None if scaling else loss, grads)  # GradScaler looks at the gradients alone
        ema = train_state.ema
        if ema_decay:
            # With gradient accumulation the weights move once per ema_every batches: average then, counting updates.
            updates_made = (train_state.step + 1) // ema_every
            ema = ema_update(ema, params, new_state, ema_decay_at(ema_decay, updates_made, ema_warmup))
            if ema_every > 1:
                due = (train_state.step + 1) % ema_every == 0
                ema = optree.tree_map(lambda new, old: torch.where(due, new, old), ema, train_state.ema)
        if skip_nonfinite or scaling:
            # fp16 overflows are routine: the optimizer's step counters (schedules, Lookahead's sync, accumulation
            # windows) follow the batches through them, as a learning-rate scheduler does beside GradScaler.
            keep = lambda new, old: torch.where(finite, new, old)
            count = lambda new, old: new if scaling and not new.is_floating_point() else keep(new, old)
            params, new_state, ema = optree.tree_map(keep, (params, new_state, ema),
                                                     (train_state.params, train_state.state, train_state.ema),
                                                     none_is_leaf=False)
            opt_state = optree.tree_map(count, opt_state, train_state.opt_state)
        hard = labels if labels.ndim == 1 else labels.argmax(dim=-1)  # soft (mixed) targets: their larger part
        metrics = {"loss": loss.detach(), "correct": (logits.argmax(dim=-1) == hard).sum(), "finite": finite}
        if process is not None:  # the shard's count -> the global batch's
            from fnclass.distributed import all_sum

            metrics["correct"] = all_sum(metrics["correct"], process)
        scale_state = train_state.loss_scale
        if scaling:  # an overflow is skipped and backs the scale off; divergence is a scale that collapsed
            scale_state = loss_scale.update(scale_state, finite)
            metrics.update(overflow=~finite, finite=finite | (scale_state["scale"] >= 1.0))
        return TrainState(train_state.step + 1, params, new_state, opt_state, train_state.key, ema,
                          scale_state), metrics

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
                outs.append(steps[i](tree_index(train_state, i), (batch[0][i], batch[1][i]), key[i]))
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
      precision: ``"fp32"`` or ``"bf16"`` (autocast on CUDA only).
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
