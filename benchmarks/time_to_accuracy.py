"""Time to accuracy: train one config for several seeds; test accuracy and training time, mean ± std.

Run by hand, not by pytest::

    python -m benchmarks.time_to_accuracy --seeds 5 --out tta.json          # configs/fast.toml on CUDA
    python -m benchmarks.time_to_accuracy --device cpu --seeds 2 --set model.name=tiny --set train.epochs=1

Seed ``s`` is ``fnclass.train`` with ``train.seed = s`` into a temporary run directory,
deleted afterwards. torch.compile's in-memory caches are reset between seeds, so each seed compiles its
step again (inductor's on-disk caches still serve seeds after the first: their compile time is a warm one).
The JSON is rewritten after every seed, so a run stopped by a timeout keeps the seeds it finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fnclass.config import ConfigError, load_config
from fnclass.training.program import train

# timed_seconds is what airbench's timer covers: the whitening fit, the training steps and the final (TTA)
# evaluation, GPU-synchronised. airbench compiles on a throwaway warm-up and then times every real step, its
# first included; train_seconds is fnclass.train's figure, so the comparison holds only when train_seconds
# covers every real step too (with train.compile it did not before issue 10: it left out the whole first call,
# that step's compute included). Compile time is compile_seconds, apart.
COLUMNS = ("test_accuracy", "test_accuracy_tta", "train_seconds", "timed_seconds", "compile_seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; check the config and overrides once, before any training."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "fast.toml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as `fnclass train --set` takes (repeatable)")
    parser.add_argument("--seeds", type=int, default=5, help="train with train.seed = 0..N-1")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cuda")
    parser.add_argument("--data-dir", default=os.environ.get("FNCLASS_DATA"),
                        help="a canonical CIFAR-10 folder (default: $FNCLASS_DATA)")
    parser.add_argument("--out", metavar="FILE", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu")
    try:
        load_config(args.config, [*args.overrides, "train.seed=0"])
    except ConfigError as error:
        parser.error(str(error))
    return args


def aggregate(rows: list[dict]) -> dict:
    """Mean, sample standard deviation (None for one value), min and max of each column present."""
    result = {}
    for column in COLUMNS:
        values = [row[column] for row in rows if row.get(column) is not None]
        if values:
            result[column] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1
                              else None, "min": min(values), "max": max(values), "n": len(values)}
    return result


HEADER = f"{'seed':>4}{'test acc':>12}{'TTA acc':>12}{'train s':>12}{'timed s':>12}{'compile s':>12}"


def render_row(row: dict) -> str:
    """One seed's fixed-width table row."""
    cells = [f"{'-':>12}" if row.get(c) is None else f"{100 * row[c]:>11.2f}%" if "accuracy" in c
             else f"{row[c]:>12.1f}" for c in COLUMNS]
    return f"{row['seed']:>4}" + "".join(cells)


def render_aggregate(results: dict) -> str:
    """Mean ± sample std (and min, max) of each column, then where the figures come from."""
    lines = []
    for column, stats in results["aggregate"].items():
        scale, unit = (100, "%") if "accuracy" in column else (1, " s")
        std = "" if stats["std"] is None else f" ± {scale * stats['std']:.2f}"
        lines.append(f"{column:<18}{scale * stats['mean']:>7.2f}{std}{unit}  (n={stats['n']}, min "
                     f"{scale * stats['min']:.2f}, max {scale * stats['max']:.2f})")
    overrides = " ".join(f"--set {o}" for o in results["overrides"])
    lines.append(f"{results['config']} {overrides}, {results['device_name']}, torch {results['torch']}")
    return "\n".join(lines)


def write_json(path: Path, results: dict) -> None:
    """Write ``results`` to ``path`` through a temporary file, so a reader never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {"config": args.config, "overrides": args.overrides, "seeds_asked": args.seeds, "seeds": [],
               "aggregate": {}, "device_name": None, "torch": torch.__version__,
               "python": platform.python_version(),
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    print(HEADER)
    for seed in range(args.seeds):
        torch._dynamo.reset()  # each seed compiles alike, and never hits dynamo's recompile limit
        config = load_config(args.config, [*args.overrides, f"train.seed={seed}"])
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"fnclass-tta-seed{seed}-") as workdir:
            summary = train(config, workdir, data_dir=args.data_dir, device=args.device, download=False).summary
        summary["timed_seconds"] = summary["train_seconds"] + summary["whitening_seconds"] + summary[
            "final_eval_seconds"]
        results["seeds"].append({"seed": seed, **{c: summary.get(c) for c in COLUMNS},
                                 "images_per_second": summary.get("images_per_second"),
                                 "wall_seconds": time.perf_counter() - start})  # data loading and evaluation too
        results["device_name"] = summary.get("device")
        results["aggregate"] = aggregate(results["seeds"])
        print(render_row(results["seeds"][-1]), flush=True)
        if args.out:
            write_json(Path(args.out), results)
    print()
    print(render_aggregate(results))
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
