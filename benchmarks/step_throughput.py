"""Train-step throughput: fnclass's functional step against the idiomatic stateful PyTorch step.

Run by hand, not by pytest::

    python -m benchmarks.step_throughput                                  # fast model, CUDA if present
    python -m benchmarks.step_throughput --device cpu --model tiny --json tiny.json

Up to four variants train the same model from the same initial weights on one fixed random batch
(throughput does not depend on the pixels): ``fnclass.make_train_step`` with ``fnclass.core.optim.adam``,
and the ``nn.Module`` twin from ``tests/torch_reference.py`` with ``torch.optim.Adam``, each eager and
under ``torch.compile``. Compiled, both sides compile forward, backward and the optimizer update: the
functional step is one compiled function; the stateful one is the compiled module (forward, and backward
through AOTAutograd) with ``optimizer.step()`` wrapped in ``torch.compile``, as PyTorch's recipe
"Compiling the optimizer with torch.compile" does. On CUDA both sides use bf16 autocast and channels-last
images by default.

The first call of each variant (which compiles) is timed on its own. After the warm-up steps the
variants are timed in rounds: a round runs every variant's steps once, back to back, in an order that
rotates from round to round. The table gives the median images/second over all rounds, and each
functional/stateful ratio is paired: the ratio of the two variants' speeds within each round, so a slow
spell of the machine that spans the round cancels out; its median over all rounds is reported with the
minimum and maximum. Compile times include inductor's on-disk caches when a run before this one filled
them (``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` measures a cold compile), and the first variant to run
pays the process's one-time library start-up.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import fnclass
from benchmarks.common import device_name, publish, random_batch
from fnclass.config import ModelConfig
from fnclass.core import losses, optim, random, tree
from fnclass.models import MODELS
from tests.torch_reference import reference_module

LEARNING_RATE = 1e-3  # Adam's usual default; the value does not change the step's cost

# Per-device defaults: a batch that keeps a GPU busy without waiting on the host, and one a 2-core
# CPU steps through in under a second; compile and bf16 by default only where they pay off. CPU
# rounds are short (and --rounds many) because a shared VM's CPU can slow down 10x within seconds.
_DEVICE_DEFAULTS = {
    "cuda": dict(batch_size=512, steps=50, warmup=10, compile=True, precision="bf16"),
    "cpu": dict(batch_size=128, steps=3, warmup=2, compile=False, precision="fp32"),
}


@dataclass(frozen=True)
class Options:
    """The resolved command line: every default filled in for the chosen device."""

    model: str
    device: str
    batch_size: int
    steps: int  # timed steps per variant per round
    warmup: int  # untimed steps per variant after the first call
    rounds: int
    compile: bool
    precision: str
    json: str | None


def parse_options(argv: list[str] | None = None) -> Options:
    """Parse the command line and fill the device-dependent defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="fast")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, help="default: 512 on cuda, 128 on cpu")
    parser.add_argument("--steps", type=int,
                        help="timed steps per variant per round (default: 50 on cuda, 3 on cpu)")
    parser.add_argument("--warmup", type=int,
                        help="untimed steps after the first call (default: 10 on cuda, 2 on cpu)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (medians over all "
                                                                "rounds reported)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="also time the torch.compile variants (default: on for cuda, off for cpu)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    defaults = _DEVICE_DEFAULTS[device]
    chosen = {name: getattr(args, name) for name in defaults}
    resolved = {name: defaults[name] if value is None else value for name, value in chosen.items()}
    if device == "cpu" and resolved["precision"] == "bf16":
        parser.error("--precision bf16 needs --device cuda: make_train_step uses bf16 autocast on CUDA only")
    options = Options(model=args.model, device=device, rounds=args.rounds, json=args.json, **resolved)
    for name in ("batch_size", "steps", "warmup", "rounds"):
        least = 0 if name == "warmup" else 1
        if getattr(options, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    return options


def functional_runner(model: fnclass.Model, train_state: fnclass.TrainState, batch, device: torch.device, *,
                      compile: bool, precision: str, channels_last: bool) -> Callable[[], None]:
    """A function that runs one fnclass train step per call, carrying the TrainState between calls."""
    optimizer = optim.adam(LEARNING_RATE)
    step = fnclass.make_train_step(model, losses.cross_entropy, optimizer, compile=compile,
                                   precision=precision, channels_last=channels_last)
    train_state = tree.tree_to(train_state, device)

    def run():
        nonlocal train_state
        train_state, _ = step(train_state, batch, random.fold_in(train_state.key, train_state.step))

    return run


def stateful_runner(config: ModelConfig, train_state: fnclass.TrainState, batch, device: torch.device, *,
                    compile: bool, precision: str, channels_last: bool) -> Callable[[], None]:
    """A function that runs one idiomatic nn.Module + torch.optim.Adam step per call."""
    module = reference_module(config, train_state.params, train_state.state).to(device).train()
    if channels_last:  # the idiom converts the weights too; the functional step converts only the images
        module = module.to(memory_format=torch.channels_last)
    # foreach is torch's default; compiled, inductor fuses the foreach update into a few kernels of its own.
    optimizer = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE, foreach=True)
    forward = torch.compile(module) if compile else module
    update = torch.compile(optimizer.step) if compile else optimizer.step
    use_bf16 = precision == "bf16" and device.type == "cuda"
    images, labels = batch

    def run():
        # Converted every step, as the functional step does: a loader hands over NCHW batches.
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = F.cross_entropy(forward(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        update()

    return run


def time_steps(run: Callable[[], None], steps: int, synchronize: Callable[[], None]) -> float:
    """Seconds that ``steps`` calls of ``run`` take, with the device drained before and after."""
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        run()
    synchronize()
    return time.perf_counter() - start


def measure(options: Options) -> dict:
    """Build every variant, time first calls, warm up, time interleaved rounds; return the results."""
    device = torch.device(options.device)
    config = ModelConfig(name=options.model)
    model = fnclass.build_model(config)
    initial = fnclass.create_train_state(model, optim.adam(LEARNING_RATE), fnclass.key(0))
    batch = random_batch(options.batch_size, device)
    settings = dict(precision=options.precision, channels_last=device.type == "cuda")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    runners = {}
    for compiled in (False, True) if options.compile else (False,):
        mode = "compiled" if compiled else "eager"
        runners[f"functional {mode}"] = functional_runner(model, initial, batch, device, compile=compiled,
                                                          **settings)
        runners[f"stateful {mode}"] = stateful_runner(config, initial, batch, device, compile=compiled,
                                                      **settings)

    first_call = {name: time_steps(run, 1, synchronize) for name, run in runners.items()}
    for run in runners.values():
        time_steps(run, options.warmup, synchronize)

    names = list(runners)
    images_per_s = {name: [] for name in names}
    for round_index in range(options.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = time_steps(runners[name], options.steps, synchronize)
            images_per_s[name].append(options.steps * options.batch_size / seconds)

    variants = {name: {"first_call_s": first_call[name],
                       "images_per_s": statistics.median(images_per_s[name]),
                       "images_per_s_rounds": images_per_s[name]} for name in names}
    paired = {}
    for mode in ("eager", "compiled"):
        if f"functional {mode}" in images_per_s:
            per_round = [f / s for f, s in zip(images_per_s[f"functional {mode}"], images_per_s[f"stateful {mode}"],
                                               strict=True)]
            paired[mode] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
                            "rounds": per_round}
    return {
        "options": {**asdict(options), "channels_last": settings["channels_last"]},
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "variants": variants,
        # The medians of the paired per-round ratios; gpu_check.sh reads these.
        "functional_over_stateful": {mode: r["median"] for mode, r in paired.items()},
        "functional_over_stateful_paired": paired,
    }


def render(results: dict) -> str:
    """A fixed-width table of the results and the functional/stateful ratios."""
    o = results["options"]
    lines = [f"model {o['model']}, batch {o['batch_size']}, {o['device']} ({results['device_name']}), "
             f"torch {results['torch']}, {o['precision']}, channels_last {o['channels_last']}",
             f"{o['rounds']} rounds x {o['steps']} steps per variant, after {o['warmup']} warm-up steps",
             "",
             f"{'variant':<22}{'first call s':>14}{'images/s':>12}{'min':>10}{'max':>10}"]
    for name, v in results["variants"].items():
        rounds = v["images_per_s_rounds"]
        lines.append(f"{name:<22}{v['first_call_s']:>14.2f}{v['images_per_s']:>12.1f}"
                     f"{min(rounds):>10.1f}{max(rounds):>10.1f}")
    lines.append("")
    for mode, r in results["functional_over_stateful_paired"].items():
        lines.append(f"functional/stateful {mode:<9}{r['median']:>6.3f}x  (median of the {len(r['rounds'])} "
                     f"per-round paired ratios; min {r['min']:.3f}, max {r['max']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    results = measure(options)
    publish(results, render(results), options.json)


if __name__ == "__main__":
    main()
