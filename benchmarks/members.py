"""K members at once (vmap or loop) against K runs one after another: paired speed and fresh-process peak memory.

Run by hand from the repository root, not by pytest::

    python -m benchmarks.members                                  # cpu.toml, K = 1 2 4 8, both strategies
    python -m benchmarks.members --config fast --device cuda --compile --members 1 8 --strategies vmap --steps 20

Speed, in one process: for each K, the K members' steps built as ``fnclass train`` builds them (the recipe's step
from :func:`fnclass.training.recipe.create_train_step`; ``vmap``: torch.func's gradient under
:func:`fnclass.training.step.make_members_step`, NCHW, the vmapped step compiled as one graph with ``--compile``;
``loop``: the single run's step member after member, channels-last as the config says, each compiled with
``--compile``) against ``sequential``: K single runs one after another, each ``--steps`` steps with the single
run's step. Same work every way: K x ``--steps`` steps of ``train.batch_size`` random CIFAR-shaped images (each
member its own batch). After one untimed call of every program (compilation, first-call costs; reported), each of
``--rounds`` rounds times every program once, in an order that rotates from round to round, and the per-round
ratio ``sequential seconds / strategy seconds`` gives the table's median and range (min, max).

Peak memory, one fresh process per (program, K) (``--one``): the same program built and stepped in a process of its
own, whose peak is its own: on the CPU the kernel's high-water mark of the resident set (``VmHWM`` in
/proc/self/status, which a new program image starts afresh, unlike ``getrusage``'s ``ru_maxrss``, which keeps the
parent's peak across ``fork`` and ``exec``), on CUDA ``torch.cuda.max_memory_allocated``. Before measuring, the
counter is checked (:func:`check_peak_counter`): a known allocation must show in it, and a fresh process started
from this one, which then holds it, must not report it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROGRAMS = ("sequential", "vmap", "loop")


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: ``VmHWM`` (peak resident set) or ``VmRSS`` (resident set now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")


FRESH_PEAK = [sys.executable, "-c", "from benchmarks.members import vm_kib; print(vm_kib('VmHWM'))"]


def check_peak_counter(mib: int = 512) -> dict:
    """The peak counter seen working on a known allocation: ``mib`` MiB of ones raise this process's ``VmHWM`` by
    about that much, and a fresh process started while this one holds them reports a peak of its own (below this
    process's resident set by at least the allocation). Raises ``RuntimeError`` otherwise."""
    before = vm_kib("VmHWM")
    held = torch.ones(mib * 2**20 // 4)  # written, so resident
    rose = (vm_kib("VmHWM") - before) / 1024
    rss = vm_kib("VmRSS") / 1024
    fresh = int(subprocess.run(FRESH_PEAK, capture_output=True, text=True, check=True).stdout) / 1024
    del held
    if not 0.9 * mib <= rose <= 1.25 * mib + 64:  # before may already hold freed pages: allow slack above
        raise RuntimeError(f"VmHWM rose by {rose:.0f} MiB for a {mib} MiB allocation")
    if fresh > rss - 0.9 * mib:
        raise RuntimeError(f"a fresh process reported a peak of {fresh:.0f} MiB while this one holds {rss:.0f}: "
                           "it inherited the parent's")
    return {"allocation_mib": mib, "vmhwm_rose_mib": rose, "parent_rss_mib": rss, "fresh_process_peak_mib": fresh}


def build(program: str, members: int, config, device: torch.device, *, compile: bool, per_pass: int | None):
    """``run(steps)``: ``steps`` steps of every member, by ``program``, on a fixed batch per member."""
    from benchmarks.common import random_batch
    from fnclass.core import random, tree
    from fnclass.training import recipe
    from fnclass.training.step import create_train_state, make_members_step, mean_gradient

    model = recipe.create_model(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, 97, config.train.epochs)
    loss_fn = recipe.create_loss(config)
    batch_size = config.train.batch_size
    batches = [random_batch(batch_size, device) for _ in range(members)]
    batches = [(images.roll(i, 0), labels.roll(i, 0)) for i, (images, labels) in enumerate(batches)]  # distinct
    states = [tree.tree_to(create_train_state(model, optimizer, random.key(i)), device) for i in range(members)]
    keys = [random.key(100 + i).to(device) for i in range(members)]
    vmapped = program == "vmap"
    single = recipe.create_train_step(  # as fnclass.training.program._train_step builds a member's or a run's step
        config, model, loss_fn, optimizer, gradient=functools.partial(mean_gradient, transformable=vmapped),
        channels_last=config.train.channels_last and not vmapped, compile=compile and not vmapped)
    if program == "sequential":
        def run(steps: int) -> None:
            for i in range(members):
                for _ in range(steps):
                    states[i], _ = single(states[i], batches[i], keys[i])
        return run
    stacked_step = make_members_step(lambda hyper: single, compile=compile and vmapped, chunk_size=per_pass,
                                     strategy=program)
    stacked = [tree.tree_stack(states)]
    batch = (torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches]))
    stacked_keys = torch.stack(keys)

    def run(steps: int) -> None:
        for _ in range(steps):
            stacked[0], _ = stacked_step(stacked[0], batch, stacked_keys, {})
    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, steps: int, device: torch.device) -> float:
    synchronize(device)
    tick = time.perf_counter()
    run(steps)
    synchronize(device)
    return time.perf_counter() - tick


def paired(config, members: int, strategies: list[str], args, device: torch.device) -> dict:
    """First-call seconds, and per-round seconds of every program in rotating order, for ``members``."""
    programs = ("sequential", *strategies)
    runs = {name: build(name, members, config, device, compile=args.compile, per_pass=args.per_pass)
            for name in programs}
    first_call = {name: timed(run, 1, device) for name, run in runs.items()}
    seconds = {name: [] for name in programs}
    for round_ in range(args.rounds):
        order = programs[round_ % len(programs):] + programs[:round_ % len(programs)]
        for name in order:
            seconds[name].append(timed(runs[name], args.steps, device))
    images = members * args.steps * config.train.batch_size
    result = {"members": members, "first_call_seconds": first_call, "seconds": seconds,
              "images_per_second": {name: images / statistics.median(s) for name, s in seconds.items()}}
    for name in strategies:
        ratios = [s / t for s, t in zip(seconds["sequential"], seconds[name])]
        result[f"sequential_over_{name}"] = {"median": statistics.median(ratios), "min": min(ratios),
                                             "max": max(ratios), "rounds": ratios}
    return result


def measure_one(args, config, device: torch.device) -> dict:
    """``--one PROGRAM K``: this fresh process's peak after building and stepping one program."""
    program, members = args.one[0], int(args.one[1])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = build(program, members, config, device, compile=args.compile, per_pass=args.per_pass)
    run(2)
    synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else vm_kib("VmHWM") * 1024) / 2**20
    return {"program": program, "members": members, "peak_mib": peak,
            "counter": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM"}


def fresh_peak(program: str, members: int, argv: list[str]) -> float:
    """The peak of a fresh process that builds and steps ``program`` for ``members``."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.members", *argv, "--one", program, str(members)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def parse_args(argv: list[str] | None):
    from fnclass.config import load_config
    from fnclass.models import resolve_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cpu", help="a shipped config's name or a TOML file (default: cpu)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as `fnclass train --set` takes (repeatable)")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--strategies", nargs="+", choices=PROGRAMS[1:], default=list(PROGRAMS[1:]))
    parser.add_argument("--steps", type=int, default=3, help="steps per member in each timed call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-pass", type=int, default=None, help="vmap this many members at a time")
    parser.add_argument("--compile", action="store_true", help="compile the steps (a GPU's setting)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the fresh-process peaks")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--one", nargs=2, metavar=("PROGRAM", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = resolve_config(load_config(args.config, args.overrides), args.config)
    return args, config


def render(results: dict) -> str:
    lines = [f"--config {results['config']}{''.join(' --set ' + o for o in results['overrides'])}: "
             f"{results['model']}, batch {results['batch_size']}, {results['precision']}, compile "
             f"{results['compile']}; {results['steps']} steps per member per call, {results['rounds']} rounds in "
             f"rotating order; {results['device_name']}, torch {results['torch']}"]
    check = results.get("peak_counter_check")
    if check:
        lines.append(f"peak counter (VmHWM) checked: a {check['allocation_mib']} MiB allocation raised it by "
                     f"{check['vmhwm_rose_mib']:.0f} MiB; a fresh process started while this one held "
                     f"{check['parent_rss_mib']:.0f} MiB reported {check['fresh_process_peak_mib']:.0f} MiB")
    strategies = results["strategies"]
    header = f"{'K':>3} {'sequential img/s':>17}"
    for name in strategies:
        header += f" {name + ' img/s':>11} {'seq/' + name + ' median [min, max]':>28}"
    if results["memory"]:
        header += "   peak MiB " + " / ".join(("sequential", *strategies))
    lines += ["", header]
    for row in results["rows"]:
        line = f"{row['members']:>3} {row['images_per_second']['sequential']:>17,.0f}"
        for name in strategies:
            ratio = row[f"sequential_over_{name}"]
            line += (f" {row['images_per_second'][name]:>11,.0f} "
                     f"{ratio['median']:>12.3f}x [{ratio['min']:.3f}, {ratio['max']:.3f}]")
        if results["memory"]:
            line += "   " + " / ".join(f"{row['peak_mib'][name]:,.0f}" for name in ("sequential", *strategies))
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.common import device_name, publish
    from fnclass.io import keep_freed_memory

    argv = sys.argv[1:] if argv is None else argv
    args, config = parse_args(argv)
    keep_freed_memory()  # the allocator settings fnclass.train runs under (glibc's malloc thresholds)
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(measure_one(args, config, device)))
        return
    results = {"config": args.config, "overrides": args.overrides, "model": config.model.name,
               "batch_size": config.train.batch_size, "precision": config.train.precision, "compile": args.compile,
               "steps": args.steps, "rounds": args.rounds, "strategies": args.strategies, "memory": args.memory,
               "device_name": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "rows": []}
    if args.memory and device.type == "cpu":
        results["peak_counter_check"] = check_peak_counter()
    # The fresh processes get this command line's settings, without its --json PATH.
    passed = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
    for members in args.members:
        row = paired(config, members, args.strategies, args, device)
        if args.memory:
            row["peak_mib"] = {name: fresh_peak(name, members, passed) for name in ("sequential", *args.strategies)}
        results["rows"].append(row)
        print(render({**results, "rows": [row]}).splitlines()[-1], flush=True)
    publish(results, render(results), args.json)


if __name__ == "__main__":
    main()
