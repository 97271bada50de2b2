"""Training: the TrainState pytree, the pure train and eval steps built on ``torch.func.grad_and_value``,
and the training program ``train_and_evaluate`` that the ``fnclass train`` command calls."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import optree
import torch

from fnclass import __version__, data, optim, random, tree
from fnclass.augment import alternating_flips, augment
from fnclass.checkpoint import restore_train_state, save_checkpoint, write_atomic
from fnclass.config import Config, ConfigError, OptimConfig, config_to_toml
from fnclass.losses import cross_entropy, per_example_cross_entropy
from fnclass.models import Model, build_model


class TrainState(NamedTuple):
    """Everything a run carries from step to step, as one pytree.

    Attributes:
      step: int64 0-d tensor, the number of optimizer updates made.
      params: the model's parameter tree.
      state: the model's state tree (BatchNorm running statistics).
      opt_state: the optimizer's state tree.
      key: the run's random key; per-step keys are ``fold_in(key, step)``.
    """

    step: torch.Tensor
    params: Any
    state: Any
    opt_state: Any
    key: torch.Tensor


def create_train_state(model: Model, optimizer: optim.Transform, key: torch.Tensor) -> TrainState:
    """Initialise a model and its optimizer from one key.

    Args:
      model: the model.
      optimizer: the optimizer transform.
      key: the run's key; split into the init key and the run key.

    Returns:
      A TrainState at step 0 (on the CPU; move it with :func:`fnclass.tree.tree_to`).
    """
    init_key, run_key = random.split(key)
    params, state = model.init(init_key)
    return TrainState(torch.zeros((), dtype=torch.int64), params, state, optimizer.init(params), run_key)


def _autocast(device_type: str, precision: str):
    """bf16 autocast on CUDA when asked for; float32 everywhere else."""
    if precision == "bf16" and device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
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


def make_train_step(model: Model, loss_fn: Callable, optimizer: optim.Transform, *, compile: bool = False,
                    precision: str = "fp32", channels_last: bool = False) -> Callable:
    """Build ``step(train_state, batch, key) -> (train_state, metrics)``.

    One call computes the loss and its gradient (model state as an auxiliary output), transforms the
    gradient with ``optimizer`` and applies it. Compiled, the gradient is ``torch.func.grad_and_value``
    and the whole step is one graph; eager, it is the same computation through ``torch.autograd.grad``
    without torch.func's ``create_graph=True`` overhead (to nest transforms such as ``vmap`` over the
    model, apply ``torch.func`` to ``model.apply`` directly). Inputs are never
    mutated and no buffer is donated: the returned TrainState is made of new tensors. ``metrics`` holds
    0-d device tensors ``loss`` (mean over the batch) and ``correct`` (count); nothing is synchronised
    with the host.

    Args:
      model: the model to train.
      loss_fn: ``loss_fn(logits, labels) -> 0-d tensor``, e.g. ``partial(cross_entropy, label_smoothing=0.1)``.
      optimizer: the optimizer transform.
      compile: compile the whole step (gradient and update) as one graph with ``torch.compile``.
      precision: ``"fp32"``, or ``"bf16"`` for bf16 autocast on CUDA (params, optimizer state and BatchNorm
        statistics stay float32; ignored on the CPU).
      channels_last: feed images in channels-last memory format (faster convolutions on recent GPUs, and
        about 1.5x faster on this project's 2-core CPU with oneDNN).

    Returns:
      The step function. ``batch`` is ``(images, labels)``: float NCHW images and int64 labels;
      ``key`` drives the model's randomness (dropout) for this step.
    """
    def loss_and_aux(params, state, images, labels, key):
        with _autocast(images.device.type, precision):
            logits, new_state = model.apply(params, state, images, train=True, key=key)
        return loss_fn(logits, labels), (new_state, logits.detach())

    grad_and_value = torch.func.grad_and_value(loss_and_aux, has_aux=True) if compile else _eager_grad_and_value(
        loss_and_aux)

    def step(train_state: TrainState, batch, key):
        images, labels = batch
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        grads, (loss, (new_state, logits)) = grad_and_value(train_state.params, train_state.state, images,
                                                            labels, key)
        updates, opt_state = optimizer.update(grads, train_state.opt_state, train_state.params)
        params = optim.apply_updates(train_state.params, updates)
        metrics = {"loss": loss.detach(), "correct": (logits.argmax(dim=-1) == labels).sum()}
        return TrainState(train_state.step + 1, params, new_state, opt_state, train_state.key), metrics

    return torch.compile(step) if compile else step


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


def create_schedule(config: OptimConfig, steps_per_epoch: int, epochs: int) -> optim.Schedule:
    """The learning-rate schedule an :class:`OptimConfig` describes, over ``steps_per_epoch * epochs`` steps.

    ``warmup_cosine`` rises linearly from 0 over the warm-up and follows a cosine down to
    ``lr * final_lr_fraction``; ``one_cycle`` is triangular, from and back to ``lr * final_lr_fraction``.
    A run shorter than twice its warm-up keeps the warm-up's slope and peaks at its midpoint, at the learning
    rate the warm-up reaches there, so it still comes back down and never climbs faster than the full run.
    """
    total = steps_per_epoch * epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    low = config.lr * config.final_lr_fraction
    start = 0.0 if config.schedule == "warmup_cosine" else low
    peak = config.lr
    if warmup > total // 2:
        warmup, peak = total // 2, start + (config.lr - start) * (total // 2) / warmup
    if config.schedule == "constant":
        return optim.constant_schedule(config.lr)
    if config.schedule == "warmup_cosine":
        return optim.warmup_cosine(peak, warmup, total, end_value=min(low, peak))
    return optim.piecewise_linear([0, warmup, total], [low, peak, low])


def create_optimizer(config: OptimConfig, steps_per_epoch: int, epochs: int) -> optim.Transform:
    """The optimizer an :class:`OptimConfig` describes, with its schedule (see :func:`create_schedule`).

    Weight decay (decoupled) applies to weight matrices and convolution filters only, not to
    BatchNorm/LayerNorm scales or biases. ``muon`` orthogonalises the (Nesterov momentum) updates of conv
    filters and attention matrices; ``bias_lr_scale`` and ``head_lr_scale`` multiply the learning rate of
    BatchNorm/whitening biases and of the classifier head; ``whiten_bias_epochs`` freezes the whitening
    bias after that many epochs; ``lookahead_every`` wraps everything in Lookahead, whose slow-weight decay
    ramps up as the cube of progress and ends at 1, so the run ends on the slow weights.
    """
    total = steps_per_epoch * epochs
    schedule = create_schedule(config, steps_per_epoch, epochs)
    decay_mask = lambda params: tree.tree_map(lambda p: p.ndim > 1, params)
    parts = [optim.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    if config.name in ("adam", "adamw"):
        parts.append(optim.scale_by_adam(config.b1, config.b2, config.eps))
    elif config.momentum:
        parts.append(optim.trace(config.momentum, config.nesterov))
    if config.muon:
        parts.append(optim.orthogonalize(mask=functools.partial(_path_map, lambda path, p: p.ndim > 1
                                                                and not path.startswith("head."))))
    if config.weight_decay:
        parts.append(optim.add_decayed_weights(config.weight_decay, decay_mask))
    parts.append(optim.scale_by_learning_rate(schedule))
    if config.bias_lr_scale != 1.0 or config.head_lr_scale != 1.0:
        parts.append(optim.scale_leaves(functools.partial(_path_map, functools.partial(_lr_scale, config))))
    if config.whiten_bias_epochs:
        parts.append(optim.freeze_after(round(config.whiten_bias_epochs * steps_per_epoch),
                                        functools.partial(_path_map, lambda path, p: path == "whiten.bias")))
    optimizer = optim.chain(*parts)
    if config.lookahead_every:
        peak = config.lookahead_decay
        decay = lambda count: torch.where(count >= total, 1.0, peak * (count / total) ** 3)
        optimizer = optim.lookahead(optimizer, config.lookahead_every, decay, total)
    return optimizer


def _lr_scale(config: OptimConfig, path: str, leaf: torch.Tensor) -> float:
    """The learning-rate multiplier of one parameter, by its path."""
    if path.startswith("head."):
        return config.head_lr_scale
    if path == "whiten.bias" or re.search(r"(^|\.)bn\d*\.bias$", path):  # fast's `bn`, resnet_attn's `bn1`, `bn2`
        return config.bias_lr_scale
    return 1.0


def _path_map(fn: Callable[[str, torch.Tensor], Any], params, prefix: str = ""):
    """A tree shaped like ``params`` holding ``fn(dotted_path, leaf)`` for each leaf.

    A plain recursive walk rather than optree's paths: it runs inside the compiled step, and dynamo traces
    Python dicts and lists but not optree's path flattening.
    """
    if isinstance(params, dict):
        return {k: _path_map(fn, v, f"{prefix}{k}.") for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return type(params)(_path_map(fn, v, f"{prefix}{i}.") for i, v in enumerate(params))
    return fn(prefix[:-1], params)


class Reporter:
    """Receives a run's progress; the CLI renders it, the library itself prints nothing."""

    def start(self, info: dict) -> None:
        """Called once with the run's facts (device, sizes, steps, resumed step)."""

    def step(self, info: dict) -> None:
        """Called after every step with ``step``, ``epoch``, ``epoch_step``, ``steps_per_epoch``, ``lr``,
        ``images_per_second`` and, on logging steps, ``loss``."""

    def epoch(self, row: dict) -> None:
        """Called after each epoch's evaluation with the metrics.jsonl row."""

    def end(self, summary: dict) -> None:
        """Called once with the summary.json contents."""


class TrainingInterrupted(Exception):
    """Training was stopped with Ctrl-C; ``last.safetensors`` holds the state at ``step``."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted at step {step}; saved {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def tta_logits(eval_step: Callable, params, state, images: torch.Tensor, level: int,
               logits: torch.Tensor | None = None) -> torch.Tensor:
    """Logits averaged over test-time views of a normalised NCHW batch (airbench's test-time augmentation).

    Level 1 averages the image and its mirror; level 2 gives that pair half the weight and the pairs
    shifted by one pixel up-left and down-right (reflect padding) the other half. ``logits``, when given,
    are the plain view's (already computed), so that view is not run again.
    """
    def pair(views, plain=None):
        plain = eval_step(params, state, views) if plain is None else plain
        return 0.5 * (plain + eval_step(params, state, views.flip(3)))

    logits = pair(images, logits)
    if level >= 2:
        height, width = images.shape[2:]
        padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
        logits = 0.5 * logits + 0.25 * (pair(padded[:, :, :height, :width]) + pair(padded[:, :, 2:, 2:]))
    return logits


def evaluate_dataset(eval_step: Callable, params, state, images: torch.Tensor, labels: torch.Tensor, *,
                     mean, std, batch_size: int, tta: int = 0) -> dict:
    """Logits-based metrics over a whole uint8 split: loss, accuracy, per-class accuracy (and TTA accuracy).

    ``tta`` is the :func:`tta_logits` level (0: off; 1: flips; 2: flips and translations). Returns a dict
    of Python numbers plus ``predictions`` (an int64 tensor on the CPU).
    """
    loss_sum = torch.zeros((), device=images.device)
    predictions, tta_predictions = [], []
    for start in range(0, len(images), batch_size):
        x = data.normalize(images[start:start + batch_size], mean, std)
        y = labels[start:start + batch_size]
        logits = eval_step(params, state, x)
        loss_sum += per_example_cross_entropy(logits, y).sum()
        predictions.append(logits.argmax(dim=-1))
        if tta:
            tta_predictions.append(tta_logits(eval_step, params, state, x, tta, logits).argmax(dim=-1))
    predictions = torch.cat(predictions)
    correct = predictions == labels
    per_class = torch.zeros(int(labels.max()) + 1, device=labels.device).index_add_(0, labels, correct.float())
    counts = torch.bincount(labels, minlength=len(per_class)).clamp(min=1)
    result = {"loss": loss_sum.item() / len(labels), "accuracy": correct.float().mean().item(),
              "per_class_accuracy": (per_class / counts).tolist(), "predictions": predictions.cpu()}
    if tta:
        result["tta_accuracy"] = (torch.cat(tta_predictions) == labels).float().mean().item()
    return result


def write_json(path: Path, payload: dict) -> None:
    """Write a JSON file atomically (numbers that are not plain floats, such as tensors' items, as floats)."""
    write_atomic(path, (json.dumps(payload, indent=2, default=float) + "\n").encode())


def _append_jsonl(path: Path, row: dict) -> None:
    """Append one line to metrics.jsonl (flushed, so a crash loses at most the line being written)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the metrics lines logged up to ``step`` (a resumed run replays the rest)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_atomic(path, "".join(line + "\n" for line in kept).encode())


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Draw loss and accuracy per epoch from metrics.jsonl into a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    rows = [r for r in rows if r.get("kind") == "epoch"]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in rows], label="train")
    ax_acc.plot(epochs, [r["test_accuracy"] for r in rows], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out_path)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def train_and_evaluate(config: Config, workdir: str | Path, *, data_dir: str | None = None, device: str = "auto",
                       download: bool = True, resume: bool = False, reporter: Reporter | None = None) -> dict:
    """Train and evaluate a model as ``config`` says, writing the run directory ``workdir``.

    The run directory gets ``config.toml`` (resolved), ``metrics.jsonl``, ``summary.json``,
    ``checkpoints/last.safetensors`` and ``best.safetensors``, and ``plots/curves.png``. Every random
    choice derives from ``train.seed`` and the step number, so a resumed run (``resume=True``, from
    ``checkpoints/last.safetensors``) replays the same batches and ends with the same parameters.

    Args:
      config: the validated run config.
      workdir: the run directory (created if needed).
      data_dir: a canonical data folder; else the config's, ``$FNCLASS_DATA`` or the cache.
      device: ``auto``, ``cpu`` or ``cuda``.
      download: allow fetching CIFAR-10/100 through torchvision when no data folder has it.
      resume: continue from the run directory's last checkpoint.
      reporter: receives progress (see :class:`Reporter`).

    Returns:
      The summary dict (also written to ``summary.json``).

    Raises:
      TrainingInterrupted: on Ctrl-C, after writing ``last.safetensors``.
    """
    reporter = reporter or Reporter()
    config = config.resolved()
    workdir = Path(workdir)
    dev = pick_device(device)
    folder = data.resolve_data_dir(data_dir or config.data.data_dir, config.data.dataset, download=download)
    dataset = data.load_dataset(folder, train_limit=config.data.train_limit, test_limit=config.data.test_limit)
    if len(dataset.classes) != config.model.num_classes:
        raise ConfigError(f"model.num_classes = {config.model.num_classes} but {folder} has "
                          f"{len(dataset.classes)} classes: set model.num_classes = {len(dataset.classes)}")
    mean, std = data.channel_stats(dataset.train_images)
    # Made once on the device: a Python tuple would be copied to the GPU (and wait for it) at every step.
    mean_t = torch.tensor(mean, device=dev).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=dev).view(1, 3, 1, 1)
    train_images, train_labels = dataset.train_images.to(dev), dataset.train_labels.to(dev)
    test_images, test_labels = dataset.test_images.to(dev), dataset.test_labels.to(dev)

    n_train, batch_size = len(train_images), config.train.batch_size
    if batch_size > n_train:
        raise ConfigError(f"train.batch_size = {batch_size} is more than the {n_train} training images: set "
                          f"train.batch_size <= {n_train} or use more data (data.train_limit)")
    steps_per_epoch = n_train // batch_size  # the last partial batch is dropped: static shapes
    total_steps = steps_per_epoch * config.train.epochs
    model = build_model(config.model)
    optimizer = create_optimizer(config.optim, steps_per_epoch, config.train.epochs)
    train_state = create_train_state(model, optimizer, random.key(config.train.seed))
    checkpoints, metrics_path = workdir / "checkpoints", workdir / "metrics.jsonl"
    if resume:
        train_state = restore_train_state(checkpoints / "last.safetensors", train_state)
        _truncate_jsonl(metrics_path, int(train_state.step))
    else:
        metrics_path.unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "config.toml", config_to_toml(config).encode())
    train_state = tree.tree_to(train_state, dev)
    whitening_seconds = 0.0
    if config.model.whiten and not resume:
        from fnclass.models.fast import fit_whitening

        # airbench fits its whitening layer to the first 5,000 training images, before any augmentation.
        tick = time.perf_counter()
        fit_images = data.normalize(train_images[:5000], mean_t, std_t)
        train_state = train_state._replace(state=fit_whitening(train_state.state, fit_images, config.model))
        _synchronize(dev)
        whitening_seconds = time.perf_counter() - tick

    loss_fn = functools.partial(cross_entropy, label_smoothing=config.train.label_smoothing)
    options = dict(compile=config.train.compile, precision=config.train.precision,
                   channels_last=config.train.channels_last)
    train_step = make_train_step(model, loss_fn, optimizer, **options)
    eval_step = make_eval_step(model, **options)
    schedule = create_schedule(config.optim, steps_per_epoch, config.train.epochs)
    order_root, step_root = random.split(train_state.key)
    # Alternating flips: which half of the data is mirrored in even epochs, drawn once for the run.
    first_flips = random.bernoulli(random.fold_in(order_root, -1), 0.5, (n_train,)) if config.data.alternate_flips \
        else None
    tta_level = (1 + config.train.tta_translate) if config.train.tta else 0
    probe = slice(0, min(config.train.grad_stats_examples, n_train))
    probe_images, probe_labels = data.normalize(train_images[probe], mean_t, std_t), train_labels[probe]

    def probe_gradient_statistics(ts: TrainState) -> dict:
        """Noise scale and per-layer-group gradient norms of the fixed probe batch (BatchNorm in eval mode)."""
        from fnclass.analysis import gradient_statistics

        stats = gradient_statistics(model, ts.params, ts.state, probe_images, probe_labels, cosine=False,
                                    chunk_size=config.train.eval_batch_size)
        return {"noise_scale": stats["noise_scale"]["b_simple"],
                "grad_norm": float(stats["per_example"]["grad_norm"].mean()),
                "group_grad_norms": {g: float(n.mean()) for g, n in stats["per_example"]["group_norms"].items()}}
    save = functools.partial(save_checkpoint, config=config, classes=dataset.classes, mean=mean, std=std,
                             input_size=tuple(train_images.shape[1:3]))
    start_step = int(train_state.step)
    best = _best_so_far(metrics_path)
    reporter.start({"device": str(dev), "data_dir": str(folder), "train_images": n_train,
                    "test_images": len(test_images), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                    "num_params": tree.num_params(train_state.params), "start_step": start_step,
                    "config": config, "workdir": str(workdir)})
    compile_seconds = 0.0
    if config.train.compile:
        # Compiled on a throwaway call (the step is pure, so its result is simply dropped), so that every real
        # step is timed: airbench's clock includes its first step too.
        tick = time.perf_counter()
        warm_key = random.fold_in(step_root, -1)  # no real step uses a negative step number
        warm_images = augment(warm_key, data.normalize(train_images[:batch_size], mean_t, std_t), config.data,
                              flip=None if first_flips is None else first_flips[:batch_size])
        train_step(train_state, (warm_images, train_labels[:batch_size]), warm_key)
        _synchronize(dev)
        compile_seconds = time.perf_counter() - tick
    train_seconds, images_seen = 0.0, 0
    last_eval, final_eval_seconds = None, 0.0
    step = start_step
    try:
        for epoch in range(start_step // steps_per_epoch, config.train.epochs):
            order = random.permutation(random.fold_in(order_root, epoch), n_train)
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            epoch_images, epoch_start = 0, time.perf_counter()
            for epoch_step in range(step - epoch * steps_per_epoch, steps_per_epoch):
                step_key = random.fold_in(step_root, step)
                aug_key, model_key = random.split(step_key)
                idx = order[epoch_step * batch_size:(epoch_step + 1) * batch_size]
                flips = None if first_flips is None else alternating_flips(first_flips, idx, epoch)
                images = augment(aug_key, data.normalize(train_images[idx], mean_t, std_t), config.data, flip=flips)
                train_state, metrics = train_step(train_state, (images, train_labels[idx]), model_key)
                loss_sum += metrics["loss"] * batch_size
                correct += metrics["correct"]
                step += 1
                epoch_images += batch_size
                log = config.train.log_every_steps and step % config.train.log_every_steps == 0
                if log:
                    _synchronize(dev)
                images_seen += batch_size
                info = {"step": step, "epoch": epoch, "epoch_step": epoch_step + 1, "steps_per_epoch": steps_per_epoch,
                        "lr": float(schedule(step - 1)),
                        "images_per_second": epoch_images / max(time.perf_counter() - epoch_start, 1e-9)}
                if log:
                    info["loss"] = metrics["loss"].item()
                    _append_jsonl(metrics_path, {"kind": "step", "step": step, "epoch": epoch,
                                                 "loss": info["loss"], "lr": info["lr"]})
                if config.train.grad_stats_every and step % config.train.grad_stats_every == 0:
                    _append_jsonl(metrics_path, {"kind": "grad_stats", "step": step, "epoch": epoch,
                                                 **probe_gradient_statistics(train_state)})
                reporter.step(info)
                if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                    save(checkpoints / "last.safetensors", train_state)
            _synchronize(dev)  # steps run asynchronously: the epoch ends when the GPU is done
            epoch_seconds = time.perf_counter() - epoch_start
            train_seconds += epoch_seconds
            train_loss = loss_sum.item() / max(epoch_images, 1)
            if not math.isfinite(train_loss):  # checked before saving: the last good checkpoint stays
                raise ConfigError(f"training diverged: the train loss is {train_loss} in epoch {epoch + 1}; lower "
                                  f"optim.lr (now {config.optim.lr}) or set optim.clip_norm")
            final_epoch = epoch + 1 == config.train.epochs
            tick = time.perf_counter()
            last_eval = evaluate_dataset(eval_step, train_state.params, train_state.state, test_images, test_labels,
                                         mean=mean_t, std=std_t, batch_size=config.train.eval_batch_size,
                                         tta=tta_level if final_epoch else 0)
            final_eval_seconds = time.perf_counter() - tick  # evaluate_dataset ends with .item(): synchronised
            row = {"kind": "epoch", "step": step, "epoch": epoch + 1, "train_loss": train_loss,
                   "train_accuracy": correct.item() / max(epoch_images, 1), "test_loss": last_eval["loss"],
                   "test_accuracy": last_eval["accuracy"], "lr": float(schedule(step - 1)),
                   "seconds": epoch_seconds}
            if "tta_accuracy" in last_eval:
                row["test_accuracy_tta"] = last_eval["tta_accuracy"]
            _append_jsonl(metrics_path, row)
            save(checkpoints / "last.safetensors", train_state)
            if best is None or row["test_accuracy"] > best:
                best = row["test_accuracy"]
                if config.checkpoint.keep_best:
                    save(checkpoints / "best.safetensors", train_state)
            reporter.epoch(row)
    except KeyboardInterrupt:
        save(checkpoints / "last.safetensors", train_state)
        raise TrainingInterrupted(int(train_state.step), checkpoints / "last.safetensors") from None

    if last_eval is None:  # resumed a finished run: evaluate what is there
        last_eval = evaluate_dataset(eval_step, train_state.params, train_state.state, test_images, test_labels,
                                     mean=mean_t, std=std_t, batch_size=config.train.eval_batch_size,
                                     tta=tta_level)
        best = max(best or 0.0, last_eval["accuracy"])
    summary = {
        "test_accuracy": last_eval["accuracy"], "best_test_accuracy": best, "test_loss": last_eval["loss"],
        "train_seconds": train_seconds, "compile_seconds": compile_seconds, "whitening_seconds": whitening_seconds,
        "final_eval_seconds": final_eval_seconds,
        "images_per_second": images_seen / train_seconds if train_seconds else None,
        "steps": int(train_state.step), "epochs": config.train.epochs, "resumed_from_step": start_step or None,
        "device": _device_name(dev), "torch_version": torch.__version__, "fnclass_version": __version__,
        "seed": config.train.seed, "num_params": tree.num_params(train_state.params),
        "model": config.model.name, "data_dir": str(folder), "train_images": n_train, "test_images": len(test_images),
        "per_class_accuracy": dict(zip(dataset.classes, last_eval["per_class_accuracy"])),
        "run_dir": str(workdir),
    }
    if "tta_accuracy" in last_eval:
        summary["test_accuracy_tta"] = last_eval["tta_accuracy"]
    write_json(workdir / "summary.json", summary)
    plot_curves(metrics_path, workdir / "plots" / "curves.png")
    reporter.end(summary)
    return summary


def _synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a clock read after it then includes that work); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_so_far(metrics_path: Path) -> float | None:
    """The best test accuracy logged in metrics.jsonl so far (for a resumed run)."""
    if not metrics_path.is_file():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    accuracies = [r["test_accuracy"] for r in rows if r.get("kind") == "epoch"]
    return max(accuracies) if accuracies else None


def _device_name(device: torch.device) -> str:
    """A readable name of the device (the GPU's model on CUDA)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"
