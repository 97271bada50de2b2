"""One recipe trained two ways in one process: fnclass's functional program and a stateful nn.Module + torch.optim twin.

Run by hand from the repository root, not by pytest::

    python -m benchmarks.stateful_twin --config cpu --train-limit 10000 --epochs 2 --set train.tta=false \
        --rounds 5 --data-dir ../shared/data/cifar10          # README's ratio (RESULTS.md, issue 29)
    python -m benchmarks.stateful_twin --config fast --set model.name=tiny --set train.compile=false --json twin.json

Both programs train ``--rounds`` times (default 5) in one process, the order alternating from round to round (the
first round's first program is ``--order``); the ratio is the median of the per-round ratios of images/s, with
its range.

The run config (a shipped name or a TOML file, after ``--set`` overrides, ``--epochs`` and ``--train-limit``) is
loaded with fnclass's own loader and trained twice from the same initial parameters:

- ``fnclass``: ``fnclass.train`` into a temporary run directory; its figures are summary.json's and the train
  loss is the last epoch row of metrics.jsonl.
- ``stateful``: the ``nn.Module`` twin from ``tests/torch_reference.py``, loaded with the parameters and state
  fnclass initialises from ``train.seed`` (whitening filters fitted by the model's ``data_init``, Dirac init
  included), BatchNorm momentum from the config, and torch.optim optimizers that apply the recipe of
  ``fnclass.training.recipe.create_optimizer``: ``DecoupledSGD`` (``torch.optim.SGD``, foreach, Nesterov momentum, one
  param group per parameter label with its lr multiplier, decoupled weight decay ``x lr`` on weights only, the
  whitening bias frozen after ``optim.whiten_bias_epochs``) and, with ``optim.muon``, ``Muon`` for the
  ``weights`` group (momentum, Newton-Schulz orthogonalisation, decay, lr: the order of fnclass's chain). Each
  step sets every group's lr from ``fnclass.training.recipe.create_schedule``; the loss is ``F.cross_entropy`` with the
  config's label smoothing. Batches come from fnclass's own batch source (``fnclass.data.sources.PermutedSource``:
  the epoch's permutation, each step's batch and key), so both
  programs see the same pixels.
  Images and the module are channels-last when the config says so; bf16 is autocast on CUDA when the config
  says so; ``train.compile`` compiles the module (forward and backward) on a throwaway pass on the first batch,
  its BatchNorm statistics restored after, while the optimizers stay eager (foreach).

"Training seconds" are timed the same way on both sides, as ``fnclass.training.loop.EpochLoop`` times them: per epoch,
from after the epoch's permutation to the end of its last step (device synchronised), summed over epochs. They
cover cutting and augmenting each batch and the step, and each program's per-step bookkeeping (fnclass's
non-finite flags, metric sums and metrics lines; the stateful loss sum). They leave out data loading, the
whitening fit, compilation, evaluation and checkpoints. images/s is the images trained on over those seconds.
Test and TTA accuracy are computed by ``fnclass.training.evaluate.evaluate_dataset`` for both (the stateful module in
``eval()`` mode), TTA at the level fnclass uses after its last epoch.

Before either run, one step from the same start on the run's first batch checks that the two programs compute
the same thing: the largest ``|fnclass - stateful|`` over the parameters (absolute, and relative to each leaf's
step) and over the model state, both eager float32. On a 2-core CPU (2026-11-30, channels-last) the parameters
differed by about one rounding of their own size (1.5e-8 for `cpu`, 2.7e-7 for `fast` on `tiny`) and the
BatchNorm statistics not at all. Later steps do not stay that close: a difference of one rounding flips max-pool
choices and grows about tenfold a step (fnclass against itself with parameters moved by 1e-7 diverges as fast), so
the two programs' accuracies differ as two seeds' do; tests/test_stateful_twin.py checks every step's update from
a shared starting point instead. ``fnclass.train`` sets glibc's malloc thresholds for the whole process
(``fnclass.io.keep_freed_memory``); they are set here before either run, so both programs run under the same
allocator whichever goes first (``--order``). The program that runs first in the first round pays the process's
one-time library start-up beyond what the check already warmed; alternating the order over several rounds and
taking the median keeps that round from deciding the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import device_name, publish
from fnclass.config import Config, ConfigError, TrainConfig, load_config
from fnclass.core import random, tree
from fnclass.data.batches import RunData, load_run_data, normalized
from fnclass.data.sources import PermutedSource
from fnclass.io import keep_freed_memory, pick_device, synchronize
from fnclass.models import resolve_config
from fnclass.models.model import (
    BATCH_NORM_BIASES,
    HEAD_BIASES,
    HEAD_WEIGHTS,
    WEIGHTS,
    WHITENING_BIAS,
)
from fnclass.run.directory import RunDirectory
from fnclass.training import recipe
from fnclass.training.evaluate import evaluate_dataset
from fnclass.training.program import train
from fnclass.training.step import TrainState, create_train_state, make_train_step
from tests.torch_reference import reference_module, torch_name

# Read off fnclass/training/recipe.py, not imported from it, so that tests/test_stateful_twin.py fails when the two
# drift.
DECAYED = (WEIGHTS, HEAD_WEIGHTS)
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # Muon's quintic coefficients
NEWTON_SCHULZ_STEPS = 5  # fnclass.core.optim.orthogonalize's default
PROGRAMS = ("stateful", "fnclass")


def newton_schulz(update: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS) -> torch.Tensor:
    """About ``U V^T`` of ``update`` seen as an (out, in*k*k) matrix, times ``sqrt(max(1, out / (in*k*k)))`` (Muon)."""
    a, b, c = NEWTON_SCHULZ
    x = update.reshape(len(update), -1).float()
    rows, cols = x.shape
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    if rows > cols:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if rows > cols:
        x = x.T
    return (x * max(1.0, rows / cols) ** 0.5).reshape(update.shape).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for filters and matrices: (Nesterov) momentum, each update orthogonalised, decoupled decay, then the lr.

    A group's ``decay`` adds ``decay * param`` to the orthogonalised update, before the learning rate, as
    fnclass's chain ``trace -> orthogonalize -> add_decayed_weights -> scale_by_learning_rate`` does.
    """

    def __init__(self, params, lr: float, momentum: float, nesterov: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, decay=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates, momentum = [p.grad for p in params], group["momentum"]
            if momentum:
                buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, updates)
                updates = torch._foreach_add(updates, buffers, alpha=momentum) if group["nesterov"] else buffers
            updates = [newton_schulz(u) for u in updates]
            if group["decay"]:
                torch._foreach_add_(updates, params, alpha=group["decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])


class DecoupledSGD(torch.optim.SGD):
    """torch.optim.SGD whose groups may shrink their parameters by ``1 - lr * decay`` first (decoupled, as AdamW)."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["decay"]:
                params = [p for p in group["params"] if p.grad is not None]
                torch._foreach_mul_(params, 1.0 - group["lr"] * group["decay"])
        return super().step(closure)


class Twin(NamedTuple):
    """The stateful program: the module, the call it trains through, its optimizers and the lr of every step."""

    module: nn.Module
    forward: Callable  # the module, or torch.compile of it
    optimizers: tuple[torch.optim.Optimizer, ...]
    learning_rates: list[float]  # the recipe's schedule at steps 0, 1, ...


def unsupported(config: Config) -> str | None:
    """Why the twin cannot train ``config`` (a resolved run config), or None."""
    optim = config.optim
    reasons = [(optim.name != "sgd", f'optim.name = "{optim.name}": the twin reproduces "sgd" only'),
               (optim.clip_norm > 0, "optim.clip_norm > 0: the twin does not clip; set optim.clip_norm = 0"),
               (optim.lookahead_every > 0, "optim.lookahead_every > 0: the twin has no Lookahead; set it to 0"),
               (config.model.dropout > 0, "model.dropout > 0: the nn.Module twin has no dropout; set it to 0"),
               (config.members.active, "members: the twin trains one model; remove members.seeds and the sweeps")]
    return next((reason for bad, reason in reasons if bad), None)


def parameter_groups(config: Config, module: nn.Module, params) -> dict[str, list[nn.Parameter]]:
    """The module's parameters by fnclass label (the model's ``param_labels``), in fnclass's leaf order."""
    named = dict(module.named_parameters())
    groups: dict[str, list[nn.Parameter]] = {}
    for path, label in tree.flatten_paths(recipe.create_model(config).param_labels(params)).items():
        groups.setdefault(label, []).append(named.pop(torch_name(path)))
    if named:
        raise ValueError(f"module parameters without an fnclass label: {sorted(named)[:5]}")
    return groups


def build_optimizers(config: Config, groups: dict[str, list[nn.Parameter]],
                     steps_per_epoch: int) -> tuple[torch.optim.Optimizer, ...]:
    """DecoupledSGD over every group (but ``weights`` under Muon), and Muon over ``weights`` when the recipe says."""
    optim = config.optim
    scales = {HEAD_WEIGHTS: optim.head_lr_scale, HEAD_BIASES: optim.head_lr_scale,
              BATCH_NORM_BIASES: optim.bias_lr_scale, WHITENING_BIAS: optim.bias_lr_scale}
    freeze = round(optim.whiten_bias_epochs * steps_per_epoch) if optim.whiten_bias_epochs else None

    def group(label):
        return {"params": groups[label], "lr_scale": scales.get(label, 1.0),
                "decay": optim.weight_decay if label in DECAYED else 0.0,
                "freeze_after": freeze if label == WHITENING_BIAS else None}

    muon = optim.muon and WEIGHTS in groups
    sgd = DecoupledSGD([group(label) for label in groups if not (muon and label == WEIGHTS)], lr=0.0,
                       momentum=optim.momentum, nesterov=optim.nesterov and optim.momentum > 0, foreach=True)
    return (sgd, Muon([group(WEIGHTS)], lr=0.0, momentum=optim.momentum, nesterov=optim.nesterov)) if muon else (sgd,)


def build_twin(config: Config, params, state, steps_per_epoch: int, device: torch.device) -> Twin:
    """The stateful twin of ``config``'s run, starting from fnclass's ``params`` and ``state``.

    Args:
      config: a resolved run config the twin supports (see :func:`unsupported`).
      params: fnclass's parameter tree to start from.
      state: fnclass's model state (BatchNorm statistics, whitening filters).
      steps_per_epoch: optimizer steps per epoch (the schedule and the whitening-bias freeze count in steps).
      device: where the module lives.

    Returns:
      The Twin, in training mode.
    """
    module = reference_module(config.model, params, state).to(device).train()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = config.model.bn_momentum  # fnclass's bn_momentum is torch's convention
    if config.train.channels_last:
        module = module.to(memory_format=torch.channels_last)
    schedule = recipe.create_schedule(config.optim, steps_per_epoch, config.train.epochs)
    learning_rates = [float(schedule(step)) for step in range(steps_per_epoch * config.train.epochs)]
    optimizers = build_optimizers(config, parameter_groups(config, module, params), steps_per_epoch)
    return Twin(module, torch.compile(module) if config.train.compile else module, optimizers, learning_rates)


def _autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA when asked for (as fnclass's step); float32 everywhere else."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16" and device.type == "cuda")


def twin_step(twin: Twin, config: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
              step: int) -> torch.Tensor:
    """One stateful step (``step`` from 0): the step's learning rates, forward, backward, update; returns the loss."""
    lr = twin.learning_rates[step]
    for optimizer in twin.optimizers:
        for group in optimizer.param_groups:
            frozen = group["freeze_after"] is not None and step >= group["freeze_after"]
            group["lr"] = 0.0 if frozen else lr * group["lr_scale"]
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(images.device, config.precision):
        logits = twin.forward(images)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
    for optimizer in twin.optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in twin.optimizers:
        optimizer.step()
    return loss.detach()


def batch_source(config: Config, ds: RunData, key: torch.Tensor) -> PermutedSource:
    """fnclass's batch source for a run key: ``source(step, epoch, epoch_step) -> (images, labels, key, ...)``."""
    return PermutedSource(ds, config.data, key, config.train.batch_size)


def initial_state(config: Config, ds: RunData, steps_per_epoch: int, device: torch.device) -> TrainState:
    """The TrainState ``fnclass.train`` starts from: init from ``train.seed``, then the model's data init."""
    model = recipe.create_model(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, steps_per_epoch, config.train.epochs)
    train_state = tree.tree_to(create_train_state(model, optimizer, random.key(config.train.seed)), device)
    if model.data_init is not None:
        normalize = lambda images: normalized(ds, images)  # noqa: E731
        train_state = train_state._replace(state=model.data_init(train_state.state, ds.train_images, normalize))
    return train_state


def differences(start: TrainState, functional: TrainState, module: nn.Module) -> dict:
    """Largest ``|fnclass - stateful|`` over the parameters, over the model state, and over each parameter leaf
    relative to that leaf's largest change from ``start`` (``params_relative``; a leaf neither moved counts 0)."""
    reference = module.state_dict()
    before = tree.flatten_paths(start.params)
    gap = {path: (value - reference[torch_name(path)]).abs().max()
           for path, value in {**tree.flatten_paths(functional.params), **tree.flatten_paths(functional.state)}.items()}
    relative = [0.0 if gap[path] == 0 else float(gap[path] / (value - before[path]).abs().max())
                for path, value in tree.flatten_paths(functional.params).items()]
    return {"params": max(float(gap[path]) for path in before),
            "state": max(float(g) for path, g in gap.items() if path not in before),
            "params_relative": max(relative)}


def first_step_difference(config: Config, ds: RunData, initial: TrainState, steps_per_epoch: int,
                          device: torch.device) -> dict:
    """:func:`differences` after one eager float32 step of each program from ``initial`` on the run's first batch."""
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, compile=False, precision="fp32"))
    model = recipe.create_model(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, steps_per_epoch, config.train.epochs)
    train_step = make_train_step(model, recipe.create_loss(config), optimizer,
                                 channels_last=config.train.channels_last)
    images, labels, key = batch_source(config, ds, initial.key)(0, 0, 0)[:3]
    functional, _ = train_step(initial, (images, labels), key)
    twin = build_twin(config, initial.params, initial.state, steps_per_epoch, device)
    twin_step(twin, config.train, images, labels, 0)
    return differences(initial, functional, twin.module)


def warm_up(twin: Twin, config: TrainConfig, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Compile the module's forward and backward on a throwaway pass, its buffers restored after; the seconds."""
    device = images.device
    saved = {name: buffer.clone() for name, buffer in twin.module.named_buffers()}
    tick = time.perf_counter()
    images = images.contiguous(memory_format=torch.channels_last) if config.channels_last else images
    with _autocast(device, config.precision):
        logits = twin.forward(images)
    F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing).backward()
    synchronize(device)
    seconds = time.perf_counter() - tick
    with torch.no_grad():
        for name, buffer in twin.module.named_buffers():
            buffer.copy_(saved[name])
    for optimizer in twin.optimizers:
        optimizer.zero_grad(set_to_none=True)
    return seconds


def evaluate_twin(twin: Twin, config: Config, ds: RunData) -> dict:
    """fnclass's test metrics (and TTA, at fnclass's final level) of the module in eval mode."""
    module = twin.module.eval()

    def eval_step(params, state, images):  # params and state live in the module
        if config.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _autocast(images.device, config.train.precision):
            return module(images).float()

    tta = (1 + config.train.tta_translate) if config.train.tta else 0
    return evaluate_dataset(eval_step, None, None, ds.test_images, ds.test_labels, mean=ds.mean_t, std=ds.std_t,
                            batch_size=config.train.eval_batch_size, tta=tta)


def train_stateful(config: Config, ds: RunData, initial: TrainState, steps_per_epoch: int,
                   device: torch.device) -> dict:
    """Train the twin from ``initial`` on fnclass's batches; its timings, last-epoch train loss and test metrics."""
    twin = build_twin(config, initial.params, initial.state, steps_per_epoch, device)
    source = batch_source(config, ds, initial.key)
    compile_seconds = 0.0
    if config.train.compile:  # on the batch fnclass compiles on: the first examples, step -1's key
        images, labels = source(-1, 0, 0)[:2]
        compile_seconds = warm_up(twin, config.train, images, labels)
    seconds, step = 0.0, 0
    for epoch in range(config.train.epochs):
        loss_sum = torch.zeros((), device=device)
        start = time.perf_counter()
        for epoch_step in range(steps_per_epoch):
            images, labels = source(step, epoch, epoch_step)[:2]
            loss_sum += twin_step(twin, config.train, images, labels, step)
            step += 1
        synchronize(device)
        seconds += time.perf_counter() - start
    metrics = evaluate_twin(twin, config, ds)
    return {"train_seconds": seconds, "images_per_second": step * source.batch_size / seconds,
            "compile_seconds": compile_seconds, "train_loss": float(loss_sum) / steps_per_epoch,
            "test_accuracy": metrics["accuracy"], "test_accuracy_tta": metrics.get("tta_accuracy")}


def train_fnclass(config: Config, data_dir: str | None, device: str) -> dict:
    """``fnclass.train`` into a temporary run directory; summary.json's figures and the last epoch's train loss."""
    with tempfile.TemporaryDirectory(prefix="fnclass-twin-") as workdir:
        summary = train(config, workdir, data_dir=data_dir, device=device, download=False).summary
        train_loss = RunDirectory(workdir, config).epoch_rows()[-1]["train_loss"]
    return {"train_seconds": summary["train_seconds"], "images_per_second": summary["images_per_second"],
            "compile_seconds": summary["compile_seconds"], "train_loss": train_loss,
            "test_accuracy": summary["test_accuracy"], "test_accuracy_tta": summary.get("test_accuracy_tta")}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """Parse the command line; load, resolve and check the run config once, before any training."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu", help="a shipped config's name or a TOML file (default: cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as `fnclass train --set` takes (repeatable)")
    parser.add_argument("--epochs", type=int, help="shorthand for --set train.epochs=N")
    parser.add_argument("--train-limit", type=int, help="shorthand for --set data.train_limit=N")
    parser.add_argument("--data-dir", default=os.environ.get("FNCLASS_DATA"),
                        help="a canonical CIFAR-10 folder (default: $FNCLASS_DATA, else the config's or the cache)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--order", choices=PROGRAMS, default="stateful", help="the program that runs first in the "
                        "first round (the order alternates from round to round)")
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds: both programs trained once each")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    args.overrides += [f"train.epochs={args.epochs}"] * (args.epochs is not None)
    args.overrides += [f"data.train_limit={args.train_limit}"] * (args.train_limit is not None)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu")
    try:
        config = resolve_config(load_config(args.config, args.overrides), args.config)
    except ConfigError as error:
        parser.error(str(error))
    reason = unsupported(config)
    if reason:
        parser.error(f"{args.config}: {reason}")
    return args, config


def render(results: dict) -> str:
    """A fixed-width table of both programs, the speed ratio and the first-step check."""
    overrides = "".join(f" --set {o}" for o in results["overrides"])
    check = results["first_step_max_abs_diff"]
    lines = [f"--config {results['config']}{overrides}",
             f"{results['model']}, {results['train_images']:,} training images, {results['steps_per_epoch']} steps of "
             f"{results['batch_size']} an epoch, {results['epochs']} epoch(s); {results['device_name']}, torch "
             f"{results['torch']}, {results['precision']}, channels_last {results['channels_last']}, compile "
             f"{results['compile']}; {len(results['rounds'])} paired rounds, {results['order'][0]} first in the first, "
             "the order alternating",
             f"first step from the same start on the same batch: max |fnclass - stateful| {check['params']:.2g} over "
             f"the parameters ({check['params_relative']:.2g} of a leaf's step), {check['state']:.2g} over the state",
             "",
             f"{'program':<10}{'train s':>10}{'images/s':>11}{'compile s':>11}{'train loss':>12}{'test acc':>10}"
             f"{'TTA acc':>10}"]
    for name in PROGRAMS:
        r = results["programs"][name]
        tta = "-" if r["test_accuracy_tta"] is None else f"{100 * r['test_accuracy_tta']:.2f}%"
        lines.append(f"{name:<10}{r['train_seconds']:>10.2f}{r['images_per_second']:>11.1f}"
                     f"{r['compile_seconds']:>11.1f}{r['train_loss']:>12.4f}{100 * r['test_accuracy']:>9.2f}%"
                     f"{tta:>10}")
    ratio = results["functional_over_stateful"]
    lines += ["(each figure the median over the rounds; each program's accuracy is the same in every round)",
              "", f"functional / stateful images/s, per round: "
                  f"{', '.join(format(r['ratio'], '.3f') for r in results['rounds'])}",
              f"median {ratio['median']:.3f}x (min {ratio['min']:.3f}, max {ratio['max']:.3f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args, config = parse_args(argv)
    keep_freed_memory()  # what fnclass.train sets for the process anyway: both programs run under it
    device = pick_device(args.device)
    config, ds = load_run_data(config, args.data_dir, False, device)
    steps_per_epoch = len(ds.train_images) // config.train.batch_size  # fnclass drops the last partial batch
    initial = initial_state(config, ds, steps_per_epoch, device)
    check = first_step_difference(config, ds, initial, steps_per_epoch, device)
    run = {"stateful": lambda: train_stateful(config, ds, initial, steps_per_epoch, device),
           "fnclass": lambda: train_fnclass(config, args.data_dir, args.device)}
    order = (args.order, *(name for name in PROGRAMS if name != args.order))
    rounds = []
    for round_ in range(args.rounds):  # the order alternates: a slow spell of the machine hits both sides alike
        this_order = order if round_ % 2 == 0 else order[::-1]
        programs = {name: run[name]() for name in this_order}
        rounds.append({"order": list(this_order), "programs": programs,
                       "ratio": programs["fnclass"]["images_per_second"] / programs["stateful"]["images_per_second"]})
        print(f"round {round_ + 1}: {this_order[0]} first, functional / stateful {rounds[-1]['ratio']:.3f}x",
              flush=True)
    ratios = [r["ratio"] for r in rounds]
    programs = {name: {key: statistics.median(r["programs"][name][key] for r in rounds)
                       if isinstance(rounds[0]["programs"][name][key], float) else rounds[0]["programs"][name][key]
                       for key in rounds[0]["programs"][name]} for name in PROGRAMS}
    results = {
        "config": args.config, "overrides": args.overrides, "model": config.model.name,
        "train_images": len(ds.train_images), "batch_size": config.train.batch_size,
        "steps_per_epoch": steps_per_epoch, "epochs": config.train.epochs, "precision": config.train.precision,
        "channels_last": config.train.channels_last, "compile": config.train.compile, "order": list(order),
        "device_name": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "first_step_max_abs_diff": check, "programs": programs, "rounds": rounds,
        "functional_over_stateful": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
    }
    publish(results, render(results), args.json)


if __name__ == "__main__":
    main()
