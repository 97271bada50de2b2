"""DP-SGD: fnclass's private step against Opacus' (``GradSampleModule`` + ``DPOptimizer``), and Opacus training the
same model with configs/dp.toml's hyperparameters and privacy budget, to compare with ``fnclass train --config dp``.

Run by hand from the repository root (Opacus ships a top-level ``benchmarks`` package), not by pytest::

    python -m benchmarks.dp speed [--batch-size 1024] [--rounds 5] [--no-ghost] [--json dp-speed.json]
    python -m benchmarks.dp train --data-dir ../shared/data/cifar10 [--set train.epochs=2] [--json dp-train.json]
    python -m benchmarks.dp opacus-train --data-dir ../shared/data/cifar10 [--json dp-opacus.json]

``speed``: one private step (per-example gradients, clipping, noise, then dp.toml's optimizer) on the same model,
weights and batch, examples per second. fnclass runs its step (``fnclass.privacy.clipped_noisy_gradient`` through
``make_train_step``, channels-last as dp.toml says) at each ``--chunk-sizes`` (examples per vmap call) and with
ghost clipping (``privacy.clipping = "ghost"``); Opacus its
hooks on the ``nn.Module`` twin (tests/torch_reference.py) and its fast gradient clipping (``opacus ghost``) with
the whole batch as one physical batch, in NCHW
(see :func:`opacus_private`). Before timing, both clipped sums without noise are compared once with the float64
one, fnclass's on the timed (channels-last) inputs, and the run stops if either is off (``max_rel_error``).
Rounds call every variant once, in an order that rotates; the table gives each one's median
and the paired per-round ratio to Opacus (median, min, max).

``train``: dp.toml's run by fnclass (``fnclass.train``, what ``fnclass train --config dp`` calls), then the same run by
Opacus, in one process: one table of test accuracy, epsilon, steps and seconds for both. ``opacus-train``: Opacus'
side alone. Opacus' run is dp.toml's done with Opacus: the twin starting from fnclass's initial weights for
``train.seed``, Poisson batches of the same rate (``torch.rand < q`` per example, as Opacus' DPDataLoader), the same
augmentation (fnclass.core.augment, so only the DP machinery differs), the same learning-rate schedule, noise
multiplier (Opacus' ``get_noise_multiplier``, as fnclass), clipping norm and steps; Opacus' RDP accountant reports
the epsilon spent. Test accuracy on the test split at the end, and the wall time of the training steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from benchmarks.common import device_name, publish, random_batch
from fnclass import data, privacy
from fnclass.config import load_config
from fnclass.core import random, tree
from fnclass.core.augment import augment
from fnclass.core.losses import cross_entropy
from fnclass.data.batches import PUBLIC_NORMALIZATION
from fnclass.io import synchronize
from fnclass.models import resolve_config
from fnclass.training import recipe
from fnclass.training.step import create_train_state, make_train_step
from tests.torch_reference import reference_module, torch_name

warnings.filterwarnings("ignore", category=UserWarning)  # Opacus' hook and accountant warnings


# A float32 clipped sum against the float64 one, largest error relative to each leaf's largest entry. Measured on
# dp.toml's model, batch 256: fnclass channels-last 2.3e-6, fnclass NCHW 2.6e-3, Opacus (NCHW) 2.2e-3 (the CPU's
# NCHW convolutions round more); a wrong computation is off by order 1 (Opacus fed channels-last images: 1 to 2.5).
MAX_REL_ERROR = 1e-2


def dp_config(overrides=()):
    """dp.toml, resolved, for 10 classes."""
    return resolve_config(load_config("dp", ["model.num_classes=10", *overrides]))


def torch_optimizer(config, parameters):
    """dp.toml's optimizer as torch.optim (its schedule is set per step)."""
    if config.optim.name == "sgd":
        return torch.optim.SGD(parameters, lr=config.optim.lr, momentum=config.optim.momentum,
                               nesterov=config.optim.nesterov)
    return torch.optim.Adam(parameters, lr=config.optim.lr, betas=(config.optim.b1, config.optim.b2),
                            eps=config.optim.eps)


def opacus_private(config, params, state, *, sigma: float, batch_size: int, device: str = "cpu"):
    """The twin under ``GradSampleModule`` and its ``DPOptimizer`` (clip, noise, divide by the expected batch)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # Contiguous (NCHW) inputs always: on channels-last inputs Opacus 1.6.0's per-sample convolution gradients are
    # wrong (measured: relative error 1 to 2.5 against NCHW for every layer of this model; on the loaded CIFAR-10
    # images, an NHWC array viewed as NCHW, the clipped gradients of most convolutions came out exactly zero), so it
    # is only timed and trained the way it computes correctly.
    module = GradSampleModule(reference_module(config.model, params, state).to(device).train())
    optimizer = DPOptimizer(torch_optimizer(config, module.parameters()), noise_multiplier=sigma,
                            max_grad_norm=config.privacy.max_grad_norm, expected_batch_size=batch_size)
    return module, optimizer


def opacus_ghost(config, params, state, *, sigma: float, batch_size: int, device: str = "cpu"):
    """The twin under Opacus' fast gradient clipping (``grad_sample_mode="ghost"``: ghost norms, then a second
    backward pass of the reweighted loss): ``(module, optimizer, criterion)``; ``criterion(logits, labels)``
    returns the loss whose ``backward()`` does both passes. NCHW inputs, as :func:`opacus_private`."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    module = GradSampleModuleFastGradientClipping(reference_module(config.model, params, state).to(device).train(),
                                                  max_grad_norm=config.privacy.max_grad_norm,
                                                  use_ghost_clipping=True)
    optimizer = DPOptimizerFastGradientClipping(torch_optimizer(config, module.parameters()), noise_multiplier=sigma,
                                                max_grad_norm=config.privacy.max_grad_norm,
                                                expected_batch_size=batch_size)
    criterion = DPLossFastGradientClipping(module, optimizer, torch.nn.CrossEntropyLoss(reduction="mean"))
    return module, optimizer, criterion


def speed(args) -> None:
    config, device = dp_config(), torch.device(args.device)
    model, loss_fn = recipe.create_model(config), recipe.create_loss(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, 48, config.train.epochs)
    train_state = tree.tree_to(create_train_state(model, optimizer, random.key(0)), device)
    images, labels = random_batch(args.batch_size, device)
    sigma, clip = 1.0, config.privacy.max_grad_norm
    runners = {}
    for chunk in args.chunk_sizes:
        gradient = privacy.clipped_noisy_gradient(clip, sigma, args.batch_size, chunk_size=chunk)
        step = make_train_step(model, loss_fn, optimizer, gradient=gradient, channels_last=config.train.channels_last)
        runners[f"fnclass chunk {chunk}"] = lambda step=step: step(train_state, (images, labels),
                                                                   random.key(1).to(device))
    if args.ghost:  # ghost clipping (fnclass.privacy.ghost): one batched pass, per-example norms layer by layer
        gradient = privacy.clipped_noisy_gradient(clip, sigma, args.batch_size, clipping="ghost")
        ghost_step = make_train_step(model, loss_fn, optimizer, gradient=gradient,
                                     channels_last=config.train.channels_last)
        runners["fnclass ghost"] = lambda: ghost_step(train_state, (images, labels), random.key(1).to(device))
    try:
        module, dp_optimizer = opacus_private(config, train_state.params, train_state.state, sigma=sigma,
                                              batch_size=args.batch_size, device=device)
    except ImportError:  # the GPU machine's image has no opacus: fnclass's figures alone
        module = None
    if module is not None:
        def opacus_step():
            dp_optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(module(images), labels).backward()
            dp_optimizer.step()
        runners["opacus"] = opacus_step
        ghost_module, ghost_optimizer, ghost_criterion = opacus_ghost(
            config, train_state.params, train_state.state, sigma=sigma, batch_size=args.batch_size, device=device)

        def opacus_ghost_step():
            ghost_optimizer.zero_grad(set_to_none=True)
            ghost_criterion(ghost_module(images), labels).backward()
            ghost_optimizer.step()
        runners["opacus ghost"] = opacus_ghost_step
    max_rel_error = None
    if module is not None:  # the clipped sums without noise, once, against float64: the timed computations agree
        def loss_and_aux(params, state, x, y, key):
            logits, new_state = model.apply(params, state, x, train=True, key=key)
            return loss_fn(logits, y), (new_state, logits.detach())

        def clipped_sum(params, x):
            check = privacy.clipped_noisy_gradient(clip, 0.0, args.batch_size, chunk_size=args.chunk_sizes[0])
            return tree.flatten_paths(check(loss_and_aux)(params, train_state.state, x, labels,
                                                          random.key(1).to(device))[0])

        # fnclass on the timed path: the memory format the timed step gives the model (channels-last as dp.toml
        # says), the first timed chunk size; the truth: the same sum in float64.
        timed_images = images.contiguous(memory_format=torch.channels_last) if config.train.channels_last else images
        mine = clipped_sum(train_state.params, timed_images)
        truth = clipped_sum(tree.tree_map(lambda p: p.double(), train_state.params), images.double())
        twin, twin_optimizer = opacus_private(config, train_state.params, train_state.state, sigma=0.0,
                                              batch_size=args.batch_size, device=device)
        F.cross_entropy(twin(images), labels).backward()
        twin_optimizer.pre_step()
        theirs = {name.removeprefix("_module."): p.grad for name, p in twin.named_parameters()}
        theirs = {name: theirs[torch_name(name)] for name in truth}
        error = lambda got: max(float((got[name].double() - want).abs().max() / want.abs().max())
                                for name, want in truth.items())
        ghost_twin, ghost_twin_optimizer, ghost_twin_criterion = opacus_ghost(
            config, train_state.params, train_state.state, sigma=0.0, batch_size=args.batch_size, device=device)
        ghost_twin_criterion(ghost_twin(images), labels).backward()
        ghost_twin_optimizer.pre_step()
        ghosts = {name.removeprefix("_module."): p.grad for name, p in ghost_twin.named_parameters()}
        ghosts = {name: ghosts[torch_name(name)] for name in truth}
        max_rel_error = {"fnclass": error(mine), "opacus": error(theirs), "opacus ghost": error(ghosts)}
        if max(max_rel_error.values()) > MAX_REL_ERROR:  # different computations: their times would not compare
            raise SystemExit(f"error: a clipped sum is off the float64 one on the timed inputs ({max_rel_error}, "
                             f"relative; over {MAX_REL_ERROR:g}): the timed steps do not compute the same thing")
    for run in runners.values():  # warm-up
        run()
    names, times = list(runners), {name: [] for name in runners}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize(device)
            tick = time.perf_counter()
            runners[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - tick)
    base = times.get("opacus")
    rows = {name: {"examples_per_second": args.batch_size / statistics.median(t),
                   "ratio_to_opacus": None if base is None else [min(o / s for s, o in zip(t, base)),
                                                                 statistics.median(o / s for s, o in zip(t, base)),
                                                                 max(o / s for s, o in zip(t, base))]}
            for name, t in times.items()}
    table = [f"DP step, {config.model.name} GroupNorm ({tree.num_params(train_state.params):,} parameters), "
             f"batch {args.batch_size}, {args.rounds} rounds, {device_name(device)}, torch {torch.__version__}",
             f"{'variant':<20}{'examples/s':>12}  x opacus (median [min, max] over rounds)"]
    for name, row in rows.items():
        ratio = "opacus not installed" if row["ratio_to_opacus"] is None else "{1:.3f} [{0:.3f}, {2:.3f}]".format(
            *row["ratio_to_opacus"])
        table.append(f"{name:<20}{row['examples_per_second']:>12,.0f}  {ratio}")
    if max_rel_error is not None:
        table.append("clipped sums without noise against float64, max relative error: fnclass (timed path) "
                     f"{max_rel_error['fnclass']:.1e}, Opacus {max_rel_error['opacus']:.1e}, Opacus ghost "
                     f"{max_rel_error['opacus ghost']:.1e}")
    publish({"device": device_name(device), "torch": torch.__version__, "batch_size": args.batch_size,
             "rounds": args.rounds, "max_rel_error": max_rel_error, "results": rows}, "\n".join(table), args.json)


def opacus_train(args) -> None:
    """``opacus-train``: dp.toml's run by Opacus alone."""
    results = opacus_run(dp_config(args.set), args.data_dir)
    publish(results, f"Opacus, dp.toml: test accuracy {results['test_accuracy']:.2%}, epsilon "
                     f"{results['epsilon']:.3f} (delta {results['plan']['delta']:g}), "
                     f"{results['train_seconds']:.0f} s of training steps", args.json)


def both_train(args) -> None:
    """``train``: dp.toml's run by fnclass (``fnclass.train``, the library call behind ``fnclass train``), then by
    Opacus, in this one process on the same data, config and initial weights; one table of both."""
    import tempfile

    from fnclass.training.program import train

    config = dp_config(args.set)
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        tick = time.perf_counter()
        summary = train(config, workdir, data_dir=args.data_dir, device="cpu", download=False).summary
        rows["fnclass"] = {"test_accuracy": summary["test_accuracy"], "epsilon": summary["privacy"]["epsilon"],
                           "train_seconds": summary["train_seconds"], "steps": summary["steps"],
                           "whole_seconds": time.perf_counter() - tick}
    opacus = opacus_run(config, args.data_dir)
    rows["opacus"] = {name: opacus[name] for name in ("test_accuracy", "epsilon", "train_seconds")}
    rows["opacus"] |= {"steps": opacus["plan"]["steps"], "whole_seconds": opacus["whole_seconds"]}
    table = [f"dp.toml{' with ' + ', '.join(args.set) if args.set else ''}, both trainers, "
             f"{device_name(torch.device('cpu'))}, torch {torch.__version__}",
             f"{'trainer':<10}{'test acc':>10}{'epsilon':>9}{'steps':>7}{'train s':>10}{'whole s':>10}"]
    for name, row in rows.items():
        table.append(f"{name:<10}{row['test_accuracy']:>10.2%}{row['epsilon']:>9.3f}{row['steps']:>7}"
                     f"{row['train_seconds']:>10.1f}{row['whole_seconds']:>10.1f}")
    ratio = rows["opacus"]["train_seconds"] / rows["fnclass"]["train_seconds"]
    table.append(f"Opacus' training steps took {ratio:.2f}x fnclass's")
    publish({"device": device_name(torch.device("cpu")), "torch": torch.__version__, "overrides": args.set,
             "results": rows, "opacus_over_fnclass_train_seconds": ratio}, "\n".join(table), args.json)


def opacus_run(config, data_dir: str) -> dict:
    """dp.toml's run (``config``) trained by Opacus; test accuracy, epsilon and timings (see the module's doc)."""
    from opacus.accountants import RDPAccountant

    whole = time.perf_counter()
    folder = data.resolve_data_dir(data_dir, "cifar10", download=False)
    dataset = data.load_dataset(folder, train_limit=config.data.train_limit, test_limit=config.data.test_limit)
    n, batch_size = len(dataset.train_images), config.train.batch_size
    steps_per_epoch = n // batch_size
    plan = privacy.plan(config.privacy, n=n, batch_size=batch_size, steps=steps_per_epoch * config.train.epochs)
    model = recipe.create_model(config)
    optimizer = recipe.create_run_optimizer(config, model.param_labels, steps_per_epoch)
    start = create_train_state(model, optimizer, random.key(config.train.seed))  # fnclass's initial weights
    module, dp_optimizer = opacus_private(config, start.params, start.state, sigma=plan.noise_multiplier,
                                          batch_size=batch_size)
    schedule = recipe.create_schedule(config.optim, steps_per_epoch, config.train.epochs)
    accountant, generator = RDPAccountant(), torch.Generator().manual_seed(config.train.seed)
    mean, std = PUBLIC_NORMALIZATION
    train_images = data.normalize(dataset.train_images, mean, std)
    tick = time.perf_counter()
    for step in range(plan.steps):
        sampled = torch.nonzero(torch.rand(n, generator=generator) < plan.sample_rate).squeeze(1)
        images = augment(random.fold_in(random.key(config.train.seed), step), train_images[sampled], config.data)
        images = images.contiguous()  # the loaded images are NHWC underneath: see opacus_private
        for group in dp_optimizer.param_groups:
            group["lr"] = float(schedule(step))
        dp_optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(images), dataset.train_labels[sampled]).backward()
        dp_optimizer.step()
        accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        if (step + 1) % steps_per_epoch == 0:
            print(f"epoch {(step + 1) // steps_per_epoch}: {time.perf_counter() - tick:.0f} s, epsilon "
                  f"{accountant.get_epsilon(plan.delta):.3f}", flush=True)
    seconds = time.perf_counter() - tick
    module.eval()
    with torch.no_grad():
        test = data.normalize(dataset.test_images, mean, std).contiguous()
        logits = torch.cat([module(test[i:i + 1000]) for i in range(0, len(test), 1000)])
    accuracy = float((logits.argmax(1) == dataset.test_labels).float().mean())
    loss = float(cross_entropy(logits, dataset.test_labels))
    results = {"test_accuracy": accuracy, "test_loss": loss, "train_seconds": seconds,
               "epsilon": accountant.get_epsilon(plan.delta), "plan": plan._asdict(),
               "device": device_name(torch.device("cpu")), "torch": torch.__version__,
               "config": dataclasses.asdict(config.optim) | {"epochs": config.train.epochs}}
    return results | {"whole_seconds": time.perf_counter() - whole}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fast = commands.add_parser("speed", help="one private step: fnclass against Opacus")
    fast.add_argument("--batch-size", type=int, default=1024)
    fast.add_argument("--rounds", type=int, default=5)
    fast.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 128, 256])
    fast.add_argument("--device", default="cpu", help="cpu or cuda")
    fast.add_argument("--ghost", action=argparse.BooleanOptionalAction, default=True,
                      help="also time privacy.clipping = \"ghost\"")
    fast.add_argument("--json")
    slow = commands.add_parser("opacus-train", help="dp.toml's run, trained by Opacus")
    slow.add_argument("--data-dir", required=True)
    slow.add_argument("--set", action="append", default=[], help="section.key=value, as fnclass train --set")
    slow.add_argument("--json")
    both = commands.add_parser("train", help="dp.toml's run by fnclass, then by Opacus: one table")
    both.add_argument("--data-dir", required=True)
    both.add_argument("--set", action="append", default=[], help="section.key=value, as fnclass train --set")
    both.add_argument("--json")
    args = parser.parse_args()
    {"speed": speed, "opacus-train": opacus_train, "train": both_train}[args.command](args)


if __name__ == "__main__":
    main()
