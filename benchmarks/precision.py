"""Whole `fnclass train` commands in float32 and in bf16, paired (issue 31): speed and accuracy per precision.

Run by hand from the repository root, not by pytest::

    python -m benchmarks.precision --rounds 3 --data-dir ../shared/data/cifar10 --json precision.json
    python -m benchmarks.precision --config cpu --set data.train_limit=5000 --rounds 2   # a quick look

Round ``i`` trains seed ``i`` once per precision (``train.precision = "fp32"`` and ``"bf16"``, nothing else
changed), each a fresh ``python -m fnclass train --config CONFIG --quiet --json`` subprocess into a temporary
folder, the order alternating from round to round (round 0: fp32 first). Each command is timed as a whole, from
the process's start to its exit (start-up, data loading, the whitening fit, training, evaluation and files
included), and its summary.json gives the training seconds, images/s and the test accuracy with and without TTA.
The table gives, per precision, the median wall time and the mean ± sample standard deviation of the accuracies
over the seeds, and the per-round ratio fp32/bf16 of wall and training seconds (median and range). The CPU's
name and bf16 units head the table. ``--json`` is rewritten after every command, so a partial run keeps its rounds.
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
    args = parser.parse_args()
    header = {"cpu": device_name(torch.device("cpu")), "bf16_units": cpu_bf16_units(), "torch": torch.__version__,
              "config": args.config, "sets": args.sets, "date": time.strftime("%Y-%m-%d")}
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
