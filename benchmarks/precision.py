"""Whole `fnclass train` commands in float32 and in bf16, paired (issue 31): speed and accuracy per precision.

Run by hand from the repository root, not by pytest::

    python -m benchmarks.precision --rounds 3 --data-dir ../shared/data/cifar10 --json precision.json
    python -m benchmarks.precision --config cpu --set data.train_limit=5000 --rounds 2   # a quick look
    python -m benchmarks.precision --grads RUN/checkpoints/last.safetensors --limit 1000 --rounds 3

Round ``i`` trains seed ``i`` once per precision (``train.precision = "fp32"`` and ``"bf16"``, nothing else
changed), each a fresh ``python -m fnclass train --config CONFIG --quiet --json`` subprocess into a temporary
folder, the order alternating from round to round (round 0: fp32 first). Each command is timed as a whole, from
the process's start to its exit (start-up, data loading, the whitening fit, training, evaluation and files
included), and its summary.json gives the training seconds, images/s and the test accuracy with and without TTA.
The table gives, per precision, the median wall time and the mean ± sample standard deviation of the accuracies
over the seeds, and the per-round ratio fp32/bf16 of wall and training seconds (median and range). The CPU's
name and bf16 units head the table. ``--json`` is rewritten after every command, so a partial run keeps its rounds.

``--grads CHECKPOINT`` times whole ``fnclass grads CHECKPOINT --limit N --precision P --json`` commands instead
(per-example gradients of the first N training images, chunk 100), the precision alternating as above: the median
wall time and examples/s per precision, the per-round ratio fp32/bf16 (median and range), and how far bf16's
per-example gradient norms lie from float32's (relative L2 distance over the N).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import device_name
from fnclass.io import cpu_bf16_units

PRECISIONS = ("fp32", "bf16")


def _train(config: str, precision: str, seed: int, data_dir: str, sets: list[str]) -> dict:
    """One whole `fnclass train` command: its wall seconds and its summary.json figures."""
    with tempfile.TemporaryDirectory() as temp:
        out = Path(temp) / "run"
        command = [sys.executable, "-m", "fnclass", "train", "--config", config, "--quiet", "--json", "--data-dir",
                   data_dir, "--out", str(out), "--seed", str(seed), "--set", f"train.precision={precision}",
                   *[a for s in sets for a in ("--set", s)]]
        tick = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - tick
        if result.returncode != 0:
            raise SystemExit(f"{precision} seed {seed} failed ({result.returncode}): {result.stderr[-2000:]}")
        summary = json.loads((out / "summary.json").read_text())
    return {"precision": precision, "seed": seed, "wall_seconds": wall, "train_seconds": summary["train_seconds"],
            "images_per_second": summary["images_per_second"], "test_accuracy": summary["test_accuracy"],
            "test_accuracy_tta": summary.get("test_accuracy_tta"), "recorded_precision": summary["precision"]}


def _grads(checkpoint: str, precision: str, limit: int, data_dir: str) -> dict:
    """One whole `fnclass grads` command: its wall seconds, examples/s and per-example gradient norms."""
    with tempfile.TemporaryDirectory() as temp:
        command = [sys.executable, "-m", "fnclass", "grads", checkpoint, "--json", "--data-dir", data_dir, "--limit",
                   str(limit), "--chunk-size", "100", "--precision", precision, "--out", temp]
        tick = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - tick
        if result.returncode != 0:
            raise SystemExit(f"grads {precision} failed ({result.returncode}): {result.stderr[-2000:]}")
        report = json.loads(result.stdout)
        lines = (Path(temp) / "per_example.csv").read_text().splitlines()
        column = lines[0].split(",").index("grad_norm")
        norms = [float(line.split(",")[column]) for line in lines[1:]]
    return {"precision": report["precision"], "wall_seconds": wall,
            "examples_per_second": report["examples_per_second"], "norms": norms}


def _grads_rounds(args, header: dict) -> None:
    runs = []
    for round_ in range(args.rounds):
        for precision in PRECISIONS if round_ % 2 == 0 else PRECISIONS[::-1]:
            runs.append({"round": round_, **_grads(args.grads, precision, args.limit, args.data_dir)})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "norms"}), flush=True)
            if args.json_path:
                Path(args.json_path).write_text(json.dumps({**header, "runs": runs}) + "\n")
    print(f"{header['cpu']}; bf16 units: {header['bf16_units']}; torch {header['torch']}; fnclass grads "
          f"{args.grads} --limit {args.limit}; {args.rounds} rounds, order alternating")
    for precision in PRECISIONS:
        mine = [r for r in runs if r["precision"] == precision]
        print(f"{precision:6s} wall {statistics.median(r['wall_seconds'] for r in mine):7.1f} s (median), "
              f"{statistics.median(r['examples_per_second'] for r in mine):6.1f} examples/s (median)")
    by = {(r["round"], r["precision"]): r for r in runs}
    for what in ("wall_seconds", "examples_per_second"):
        ratios = [by[i, "fp32"][what] / by[i, "bf16"][what] for i in range(args.rounds)]
        print(f"fp32/bf16 {what.replace('_', ' ')}: {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} rounds")
    exact, bf16 = torch.tensor(by[0, "fp32"]["norms"]), torch.tensor(by[0, "bf16"]["norms"])
    print(f"bf16's per-example gradient norms lie {float((bf16 - exact).norm() / exact.norm()):.2%} from float32's "
          f"(relative L2 over {len(exact)})")


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2%} ± {std * 100:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default=os.environ.get("FNCLASS_DATA"), required="FNCLASS_DATA" not in os.environ)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--grads", metavar="CHECKPOINT", help="Time `fnclass grads` on this checkpoint instead.")
    parser.add_argument("--limit", type=int, default=1000, help="With --grads: the examples analysed.")
    args = parser.parse_args()
    header = {"cpu": device_name(torch.device("cpu")), "bf16_units": cpu_bf16_units(), "torch": torch.__version__,
              "config": args.config, "sets": args.sets, "date": time.strftime("%Y-%m-%d")}
    if args.grads:
        _grads_rounds(args, header)
        return
    runs = []
    for seed in range(args.rounds):
        order = PRECISIONS if seed % 2 == 0 else PRECISIONS[::-1]
        for precision in order:
            runs.append(_train(args.config, precision, seed, args.data_dir, args.sets))
            print(json.dumps(runs[-1]), flush=True)
            if args.json_path:
                Path(args.json_path).write_text(json.dumps({**header, "runs": runs}, indent=2) + "\n")
    print(f"{header['cpu']}; bf16 units: {header['bf16_units']}; torch {header['torch']}; --config {args.config} "
          f"{' '.join(args.sets)}; {args.rounds} rounds, order alternating")
    print(f"{'precision':10s} {'wall s (median)':>16s} {'images/s (median)':>18s} {'test accuracy':>16s} "
          f"{'with TTA':>16s}")
    for precision in PRECISIONS:
        mine = [r for r in runs if r["precision"] == precision]
        tta = [r["test_accuracy_tta"] for r in mine if r["test_accuracy_tta"] is not None]
        print(f"{precision:10s} {statistics.median(r['wall_seconds'] for r in mine):16.1f} "
              f"{statistics.median(r['images_per_second'] for r in mine):18.0f} "
              f"{_spread([r['test_accuracy'] for r in mine]):>16s} {_spread(tta) if tta else '-':>16s}")
    for what in ("wall_seconds", "train_seconds"):
        by = {(r["seed"], r["precision"]): r[what] for r in runs}
        ratios = [by[s, "fp32"] / by[s, "bf16"] for s in range(args.rounds)]
        print(f"fp32/bf16 {what.replace('_', ' ')}: {statistics.median(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
