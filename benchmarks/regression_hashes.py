"""SHA-256 of the parameters and model state after fixed short runs: a restructuring of the training program must
leave every one of them unchanged.

    FNCLASS_DATA=../shared/data/cifar10 python -m benchmarks.regression_hashes [--only NAME ...] [--json FILE]

Each run trains on the first 512 real training images (CPU, fixed seed, the test split cut to 200 images) through
``fnclass.train``; the private run's secret key is fixed (``privacy.new_secret`` replaced) so that its noise and
Poisson samples are the same in every run. Printed: one ``name sha256`` line per run (and one for the EMA
weights of a run that keeps them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

RUNS = {  # name: (config, overrides)
    "cpu": ("cpu", ["train.epochs=2"]),
    "fast": ("fast", ["train.epochs=1", "train.batch_size=128"]),
    "seed": ("seed", ["train.epochs=1", "train.batch_size=128"]),
    "dp": ("dp", ["train.epochs=1", "train.batch_size=128"]),
    "seeds-loop": ("cpu", ["train.epochs=1", "members.seeds=[0, 1, 2]", 'members.strategy="loop"']),
    # the step's wrappers: EMA with warm-up, non-finite skipping, accumulation, and fp16 loss scaling (CPU: float32)
    "cpu-ema-skip-accumulate": ("cpu", ["train.epochs=1", "train.ema_decay=0.9", "train.ema_warmup=true",
                                        'train.nan_policy="skip"', "train.accumulate_steps=2"]),
    "cpu-fp16": ("cpu", ["train.epochs=1", 'train.precision="fp16"']),
}
COMMON = ["data.train_limit=512", "data.test_limit=200", "train.batch_size=128", "train.log_every_steps=2",
          "train.seed=0"]
SECRET = (123456789, 987654321)


def digest(train_state, parts=("params", "state")) -> str:
    """SHA-256 over every leaf of ``parts`` (paths, dtypes, shapes and bytes), in path order."""
    import optree
    import torch

    sha = hashlib.sha256()
    for part in parts:
        paths, leaves, _ = optree.tree_flatten_with_path(getattr(train_state, part))
        for path, leaf in sorted(zip(paths, leaves), key=lambda item: [str(p) for p in item[0]]):
            tensor = leaf.detach().cpu().contiguous()
            sha.update(f"{part}.{'.'.join(map(str, path))}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            sha.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def fix_secret() -> None:
    """Every private run draws from the same secret key."""
    import torch

    import fnclass.privacy as privacy

    privacy.new_secret = lambda: torch.tensor(SECRET, dtype=torch.int64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), default=sorted(RUNS))
    parser.add_argument("--json", help="also write the hashes to this JSON file")
    args = parser.parse_args(argv)
    data_dir = os.environ.get("FNCLASS_DATA")
    if not data_dir:
        sys.exit("set FNCLASS_DATA to the real CIFAR-10 folder (../shared/data/cifar10)")
    import torch

    import fnclass

    torch.manual_seed(0)
    fix_secret()
    hashes = {}
    for name in args.only:
        config_name, overrides = RUNS[name]
        config = fnclass.load_config(config_name, [*COMMON, *overrides])
        with tempfile.TemporaryDirectory() as workdir:
            result = fnclass.train(config, workdir, data_dir=data_dir, device="cpu", download=False)
        hashes[name] = digest(result.train_state)
        if result.train_state.ema is not None:  # the EMA wrapper's own output, beside the weights
            hashes[name + " ema"] = digest(result.train_state, ("ema",))
        for key in (name, name + " ema"):
            if key in hashes:
                print(key, hashes[key], flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(hashes, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
