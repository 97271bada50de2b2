"""K members at once under vmap against K runs one after another (issue 13): step time and peak memory.

Each measurement runs in a fresh process (so its peak resident memory is its own): the `cpu` config's model and
recipe (``--config``, default `cpu`: batch 256), random CIFAR-shaped images, ``--steps`` timed steps after two warm-up
steps.
``sequential`` trains K models one after another with the single-run step (channels-last, as `fnclass train`
does); ``vmapped`` trains them as one stacked TrainState with the vmapped members step; ``looped`` as one stacked
TrainState with the members step's loop strategy (the CPU's default). Same total work every way.

    python -m benchmarks.members [--members 1 2 4 8] [--steps 8] [--per-pass M] [--device cpu] [--config cpu]
    python -m benchmarks.members --config fast --device cuda --members 1 8     # the issue's GPU check
    python -m benchmarks.members --paired 4     # sequential vs looped in one process, paired rounds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def measure(mode: str, members: int, steps: int, per_pass: int | None, device: str, config_name: str = "cpu") -> dict:
    """Seconds for ``steps`` steps of ``members`` models, and this process's peak resident memory."""
    import functools

    from benchmarks.common import random_batch
    from fnclass.config import load_config
    from fnclass.core import random, tree
    from fnclass.models import resolve_config
    from fnclass.training import recipe
    from fnclass.training import step as step_module

    dev = torch.device(device)
    config = resolve_config(load_config(config_name))
    model = recipe.create_model(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, 97, config.train.epochs)
    loss_fn = recipe.create_loss(config)
    images, labels = random_batch(config.train.batch_size, dev)
    states = [tree.tree_to(step_module.create_train_state(model, optimizer, random.key(i)), dev)
              for i in range(members)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if mode == "sequential":
        step = step_module.make_train_step(model, loss_fn, optimizer, channels_last=config.train.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

        def run(count):
            for i in range(members):
                for _ in range(count):
                    states[i], _ = step(states[i], (images, labels), random.key(1))
    else:
        vmapped = mode == "vmapped"
        member_step = step_module.make_train_step(
            model, loss_fn, optimizer, gradient=functools.partial(step_module.mean_gradient, transformable=vmapped),
            channels_last=config.train.channels_last and not vmapped)
        stacked_step = step_module.make_members_step(lambda hyper: member_step, chunk_size=per_pass,
                                                     strategy="vmap" if vmapped else "loop")
        stacked = [tree.tree_stack(states)]
        if not vmapped:
            images = images.contiguous(memory_format=torch.channels_last)
        batch = (images.expand(members, *images.shape), labels.expand(members, *labels.shape))
        keys = torch.stack([random.key(1)] * members).to(dev)

        def run(count):
            for _ in range(count):
                stacked[0], _ = stacked_step(stacked[0], batch, keys, {})
    run(2)
    sync()
    tick = time.perf_counter()
    run(steps)
    sync()
    seconds = time.perf_counter() - tick
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"mode": mode, "members": members, "steps": steps, "seconds": seconds, "peak_mib": peak}


def paired(members: int, rounds: int, steps: int) -> None:
    """Sequential single-run steps against the looped members step in one process, alternating rounds."""
    import statistics

    from benchmarks.common import random_batch
    from fnclass.config import load_config
    from fnclass.core import random, tree
    from fnclass.models import resolve_config
    from fnclass.training import recipe
    from fnclass.training import step as step_module

    config = resolve_config(load_config("cpu"))
    model = recipe.create_model(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, 97, config.train.epochs)
    images, labels = random_batch(config.train.batch_size, torch.device("cpu"))
    images = images.contiguous(memory_format=torch.channels_last)
    states = [step_module.create_train_state(model, optimizer, random.key(i)) for i in range(members)]
    step = step_module.make_train_step(model, recipe.create_loss(config), optimizer, channels_last=True)
    looped = step_module.make_members_step(lambda hyper: step, strategy="loop")
    stacked = [tree.tree_stack(states)]
    batch = (images.expand(members, *images.shape), labels.expand(members, *labels.shape))
    keys = torch.stack([random.key(1)] * members)

    def sequential(count):
        for i in range(members):
            for _ in range(count):
                states[i], _ = step(states[i], (images, labels), random.key(1))

    def loop(count):
        for _ in range(count):
            stacked[0], _ = looped(stacked[0], batch, keys, {})

    sequential(1)
    loop(1)
    ratios = []
    for _ in range(rounds):
        tick = time.perf_counter()
        sequential(steps)
        middle = time.perf_counter()
        loop(steps)
        ratios.append((middle - tick) / (time.perf_counter() - middle))
    print(f"K = {members}, {rounds} paired rounds of {steps} steps: sequential / looped median "
          f"{statistics.median(ratios):.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--per-pass", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default="cpu", help="shipped config whose model and recipe are timed (cpu, fast)")
    parser.add_argument("--paired", type=int, metavar="K", help="only the in-process paired sequential/looped check")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.paired:
        paired(args.paired, rounds=9, steps=3)
        return
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps, args.per_pass, args.device, args.config)))
        return
    from benchmarks.common import device_name

    print(f"{args.config} config, {args.steps} steps per member, {device_name(torch.device(args.device))}, "
          f"torch {torch.__version__}")
    print(f"{'K':>3} {'sequential s':>13} {'vmapped s':>10} {'ratio':>6} {'looped s':>9} {'ratio':>6} "
          f"{'seq peak MiB':>13} {'vmap peak MiB':>14} {'loop peak MiB':>14}")
    for members in args.members:
        results = {}
        for mode in ("sequential", "vmapped", "looped"):
            command = [sys.executable, "-m", "benchmarks.members", "--one", mode, str(members), "--steps",
                       str(args.steps), "--device", args.device, "--config", args.config]
            command += ["--per-pass", str(args.per_pass)] if args.per_pass else []
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[mode] = json.loads(out.strip().splitlines()[-1])
        seq, vm, lo = results["sequential"], results["vmapped"], results["looped"]
        print(f"{members:>3} {seq['seconds']:>13.2f} {vm['seconds']:>10.2f} {seq['seconds'] / vm['seconds']:>5.2f}x "
              f"{lo['seconds']:>9.2f} {seq['seconds'] / lo['seconds']:>5.2f}x {seq['peak_mib']:>13.0f} "
              f"{vm['peak_mib']:>14.0f} {lo['peak_mib']:>14.0f}")


if __name__ == "__main__":
    main()
