"""Data attribution benchmarks (docs/attribution.md): mislabel detection on real CIFAR-10.

Run by hand from the repository root, not by pytest::

    python -m benchmarks.attribution mislabel --data-dir ../shared/data/cifar10 [--train-limit 10000]
        [--every-epochs 3] [--work runs/bench-mislabel] [--json mislabel.json]

``mislabel``: the first ``--train-limit`` training images with 10% of their labels changed at random to another
class (``--seed``), written as a data folder; configs/cpu.toml trained on it with a checkpoint kept every
``--every-epochs`` epochs; then four rankings of the training examples, each asking which labels look wrong:
TracIn self-influence over the kept checkpoints (``fnclass influence --self``), and the final checkpoint's loss,
gradient norm (``fnclass grads``) and EL2N (``fnclass grads --score el2n``). For each ranking, the fraction of the
flipped examples found among its top 5%, 10% and 20%; chance finds 5%, 10% and 20% of them.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import device_name, publish


def flipped_folder(source: Path, out: Path, n: int, fraction: float, seed: int) -> np.ndarray:
    """A data folder with the first ``n`` training images of ``source``, ``fraction`` of their labels changed to
    another class drawn at random; returns the flipped rows."""
    out.mkdir(parents=True, exist_ok=True)
    labels = np.load(source / "train_labels.npy", allow_pickle=False)[:n].astype(np.int64)
    classes = int(labels.max()) + 1
    generator = np.random.default_rng(seed)
    flipped = np.sort(generator.choice(n, int(round(fraction * n)), replace=False))
    labels[flipped] = (labels[flipped] + generator.integers(1, classes, len(flipped))) % classes
    np.save(out / "train_images.npy", np.load(source / "train_images.npy", mmap_mode="r")[:n])
    np.save(out / "train_labels.npy", labels)
    for name in ("test_images.npy", "test_labels.npy", "classes.txt"):
        target = out / name
        if not target.exists():
            target.symlink_to((source / name).resolve())
    np.save(out / "flipped.npy", flipped)
    return flipped


def fnclass(*args: str) -> float:
    """Run ``fnclass ARGS`` (this checkout), return its wall time in seconds."""
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fnclass", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - tick


def column(path: Path, name: str, index: str = "index") -> np.ndarray:
    """A CSV's ``name`` column ordered by its ``index`` column."""
    rows = list(csv.DictReader(open(path)))
    values = np.empty(len(rows))
    for row in rows:
        values[int(row[index])] = float(row[name])
    return values


def found(scores: np.ndarray, flipped: np.ndarray, fractions=(0.05, 0.1, 0.2)) -> dict:
    """The share of ``flipped`` among the top ``fraction`` of ``scores`` (highest first), for each fraction."""
    order = np.argsort(-scores, kind="stable")
    chosen = set(flipped.tolist())
    return {f"{fraction:.0%}": len(chosen & set(order[:round(fraction * len(scores))].tolist())) / len(flipped)
            for fraction in fractions}


def mislabel(args) -> None:
    work = Path(args.work)
    data = work / "data"
    flipped = flipped_folder(Path(args.data_dir), data, args.train_limit, 0.1, args.seed)
    run = work / "run"
    seconds = {"train": fnclass("train", "--config", "cpu", "--data-dir", str(data), "--out", str(run), "--quiet",
                                "--set", f"checkpoint.every_epochs={args.every_epochs}")}
    summary = json.loads((run / "summary.json").read_text())
    last = run / "checkpoints/last.safetensors"
    seconds["self_influence"] = fnclass("influence", str(run), "--self", "--data-dir", str(data), "--out",
                                        str(work / "self"))
    seconds["grads"] = fnclass("grads", str(last), "--data-dir", str(data), "--out", str(work / "grads"))
    seconds["el2n"] = fnclass("grads", str(last), "--data-dir", str(data), "--score", "el2n", "--out",
                              str(work / "el2n"))
    rankings = {"TracIn self-influence": column(work / "self/self_influence.csv", "score"),
                "final loss": column(work / "grads/per_example.csv", "loss"),
                "gradient norm": column(work / "grads/per_example.csv", "grad_norm"),
                "EL2N": column(work / "el2n/scores.csv", "score")}
    results = {name: found(scores, flipped) for name, scores in rankings.items()}
    checkpoints = len(list((run / "checkpoints").glob("epoch-*.safetensors")))
    table = [f"mislabel detection: {args.train_limit:,} CIFAR-10 training images, {len(flipped):,} labels flipped "
             f"(10%), cpu.toml ({summary.get('test_accuracy', float('nan')):.2%} test accuracy), {checkpoints} "
             f"checkpoints for TracIn; {device_name(torch.device('cpu'))}, torch {torch.__version__}",
             f"{'ranking':<24}" + "".join(f"{'top ' + k:>10}" for k in next(iter(results.values())))]
    for name, shares in results.items():
        table.append(f"{name:<24}" + "".join(f"{share:>10.1%}" for share in shares.values()))
    table.append("chance finds 5%, 10% and 20%; seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    publish({"train_limit": args.train_limit, "flipped": len(flipped), "seed": args.seed,
             "every_epochs": args.every_epochs, "checkpoints": checkpoints,
             "test_accuracy": summary.get("test_accuracy"), "found": results, "seconds": seconds,
             "device": device_name(torch.device("cpu")), "torch": torch.__version__}, "\n".join(table), args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    detect = commands.add_parser("mislabel", help="find 10%% flipped labels: self-influence, loss, norm, EL2N")
    detect.add_argument("--data-dir", required=True)
    detect.add_argument("--train-limit", type=int, default=10_000)
    detect.add_argument("--every-epochs", type=int, default=3)
    detect.add_argument("--seed", type=int, default=0)
    detect.add_argument("--work", default="runs/bench-mislabel")
    detect.add_argument("--json")
    args = parser.parse_args()
    mislabel(args)


if __name__ == "__main__":
    main()
