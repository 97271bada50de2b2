"""What the on-device non-finite check costs a train step (issue 12): the `cpu` config's eager step, three ways.

``none`` replaces the check with a constant (the step before issue 12), ``stop`` is the default (the flag is
computed, nothing waits for it), ``skip`` also selects the old state with ``torch.where`` when the flag is false.

    python -m benchmarks.nonfinite_check [--repeats 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import device_name, random_batch
from fnclass.config import load_config
from fnclass.core import random
from fnclass.models import resolve_config
from fnclass.training import recipe, wrappers
from fnclass.training import step as step_module


def seconds_per_step(config, train_state, batch, *, variant: str, repeats: int, steps: int) -> float:
    """The fastest of ``repeats`` timings of ``steps`` steps, per step."""
    real = step_module.all_finite
    if variant == "none":
        step_module.all_finite = lambda loss, grads: torch.ones((), dtype=torch.bool)
    try:
        model = recipe.create_model(config)
        optimizer = recipe.create_optimizer(config.optim, model.param_labels, 97, config.train.epochs)
        step = step_module.make_train_step(model, recipe.create_loss(config), optimizer,
                                           channels_last=config.train.channels_last)
        step = wrappers.skip_nonfinite(step) if variant == "skip" else step
        for _ in range(3):
            train_state, _ = step(train_state, batch, random.key(1))
        best = float("inf")
        for _ in range(repeats):
            tick = time.perf_counter()
            for _ in range(steps):
                train_state, _ = step(train_state, batch, random.key(1))
            best = min(best, (time.perf_counter() - tick) / steps)
        return best
    finally:
        step_module.all_finite = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    config = resolve_config(load_config("cpu"))
    model = recipe.create_model(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, 97, config.train.epochs)
    train_state = step_module.create_train_state(model, optimizer, random.key(0))
    batch = random_batch(config.train.batch_size, torch.device("cpu"))
    print(f"cpu config, batch {config.train.batch_size}, eager, {device_name(torch.device('cpu'))}")
    for round_ in range(2):  # interleaved twice: a busy machine shows up as disagreeing rounds
        for variant in ("none", "stop", "skip"):
            ms = 1000 * seconds_per_step(config, train_state, batch, variant=variant, repeats=args.repeats,
                                         steps=args.steps)
            print(f"round {round_ + 1}  {variant:<5} {ms:7.1f} ms/step")


if __name__ == "__main__":
    main()
