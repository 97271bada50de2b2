"""What the on-device non-finite check costs a train step (issues 12 and 30): the `cpu` config's eager step, four ways.

``none`` replaces the check with a constant (the step before issue 12); ``grads`` checks the loss and the gradients
only (the step before issue 30); ``stop`` is the default since issue 30 (also the updated parameters, model state
and optimizer state; the flag is computed, nothing waits for it); ``skip`` also selects the old state with
``torch.where`` when the flag is false. Every variant runs once per round, in an order that rotates; the table gives
each one's median seconds per step and the per-round ratio to ``grads`` (median and range).

    python -m benchmarks.nonfinite_check [--rounds 7] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import device_name, random_batch
from fnclass.config import load_config
from fnclass.core import random
from fnclass.io import keep_freed_memory
from fnclass.models import resolve_config
from fnclass.training import recipe, wrappers
from fnclass.training import step as step_module

VARIANTS = ("none", "grads", "stop", "skip")
REAL = step_module.all_finite


def checker(variant: str):
    """``all_finite`` as the variant has it: constant, the loss and gradients only, or everything (the library's)."""
    if variant == "none":
        return lambda loss, tree: torch.ones((), dtype=torch.bool)
    if variant == "grads":  # the state check is the call with no loss on the (params, state, opt_state) tuple
        return lambda loss, tree: (torch.ones((), dtype=torch.bool) if loss is None and isinstance(tree, tuple)
                                   else REAL(loss, tree))
    return REAL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    keep_freed_memory()  # what fnclass.train runs under
    config = resolve_config(load_config("cpu"))
    model = recipe.create_model(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, 97, config.train.epochs)
    start = step_module.create_train_state(model, optimizer, random.key(0))
    batch = random_batch(config.train.batch_size, torch.device("cpu"))
    plain = step_module.make_train_step(model, recipe.create_loss(config), optimizer,
                                        channels_last=config.train.channels_last)
    steps = {variant: wrappers.skip_nonfinite(plain) if variant == "skip" else plain for variant in VARIANTS}
    states = dict.fromkeys(VARIANTS, start)

    def timed(variant: str) -> float:
        step_module.all_finite = checker(variant)  # looked up when the step runs
        try:
            tick = time.perf_counter()
            for _ in range(args.steps):
                states[variant], metrics = steps[variant](states[variant], batch, random.key(1))
            assert bool(metrics["finite"])
            return (time.perf_counter() - tick) / args.steps
        finally:
            step_module.all_finite = REAL

    for variant in VARIANTS:  # warm-up
        timed(variant)
    seconds = {variant: [] for variant in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS[round_ % 4:] + VARIANTS[:round_ % 4]:
            seconds[variant].append(timed(variant))
    print(f"cpu config, batch {config.train.batch_size}, eager, {device_name(torch.device('cpu'))}, torch "
          f"{torch.__version__}; {args.rounds} rounds of {args.steps} steps, rotating order")
    print(f"{'variant':<8}{'ms/step':>9}   vs grads: median [min, max] of the per-round ratios")
    for variant in VARIANTS:
        ratios = [s / g for s, g in zip(seconds[variant], seconds["grads"])]
        print(f"{variant:<8}{1000 * statistics.median(seconds[variant]):>9.1f}   {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}]")


if __name__ == "__main__":
    main()
