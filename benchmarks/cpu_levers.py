"""The CPU recipe's levers that need no retraining, measured on a validation folder (docs/cpu-recipe.md).

Run by hand from the repository root, not by pytest::

    python -m benchmarks.cpu_levers folder ../shared/data/cifar10 /tmp/cifarval     # train: the first 45,000
    fnclass train --config cpu --data-dir /tmp/cifarval --out runs/val13 \\
        --set train.epochs=13 --set train.eval_every=0 --set checkpoint.every_epochs=1
    python -m benchmarks.cpu_levers posthoc runs/val13 --data-dir /tmp/cifarval [--json levers.json]

``folder`` writes a canonical data folder whose training split is the first 45,000 training images and whose
"test" split is the last 5,000 (the validation split docs/cpu-recipe.md tunes on; never the real test set).
``posthoc`` evaluates a run trained on it with ``checkpoint.every_epochs = 1``: the last checkpoint without TTA,
with flips (level 1), with flips and two one-pixel translations (level 2, what the recipe uses), and with flips
and four one-pixel translations (the two diagonals of level 2 plus up-right and down-left, each pair a quarter of
the half the translations get: a variant not in the library); and the ensembles of the last 2 and 3 epoch
checkpoints (the mean of their level-2 TTA logits). Each with the seconds it took on this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def make_folder(source: Path, out: Path, train: int = 45_000) -> None:
    """The validation folder: training rows ``:train`` as the training split, the rest as the "test" split."""
    images, labels = (np.load(source / f"train_{kind}.npy", allow_pickle=False) for kind in ("images", "labels"))
    out.mkdir(parents=True, exist_ok=True)
    for name, array in (("train_images", images[:train]), ("train_labels", labels[:train]),
                        ("test_images", images[train:]), ("test_labels", labels[train:])):
        np.save(out / f"{name}.npy", array, allow_pickle=False)
    shutil.copyfile(source / "classes.txt", out / "classes.txt")
    print(f"wrote {out}: {train:,} training images, {len(images) - train:,} validation images (class counts "
          f"{np.bincount(labels[train:]).tolist()})")


def four_shift_logits(eval_step, params, state, images: torch.Tensor) -> torch.Tensor:
    """Flips and four one-pixel diagonal translations: half the weight on the plain pair, half on the shifts."""
    def pair(views):
        return 0.5 * (eval_step(params, state, views) + eval_step(params, state, views.flip(3)))

    height, width = images.shape[2:]
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, top:top + height, left:left + width] for top in (0, 2) for left in (0, 2)]
    return 0.5 * pair(images) + 0.125 * sum(pair(view) for view in shifted)


def posthoc(run: Path, data_dir: Path, batch_size: int = 1000) -> dict:
    from fnclass import data
    from fnclass.run.checkpoint import load_checkpoint
    from fnclass.training.evaluate import tta_logits
    from fnclass.training.step import make_eval_step

    checkpoints = sorted((run / "checkpoints").glob("epoch-*.safetensors"))
    if len(checkpoints) < 3:
        raise SystemExit(f"{run}: needs the checkpoints of at least its last 3 epochs (checkpoint.every_epochs=1)")
    images, labels = data.load_split(str(data_dir), "test")
    loaded = [load_checkpoint(path) for path in checkpoints[-3:]]
    last = loaded[-1]
    model = last.model
    eval_step = make_eval_step(model, channels_last=True)
    mean = torch.tensor(last.mean).view(1, 3, 1, 1)
    std = torch.tensor(last.std).view(1, 3, 1, 1)

    def logits_of(checkpoint, views) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = data.normalize(images[start:start + batch_size], mean, std)
                out.append(views(checkpoint.params, checkpoint.state, x))
        return torch.cat(out)

    variants = {
        "no TTA": lambda c: logits_of(c, lambda p, s, x: eval_step(p, s, x)),
        "flips (level 1)": lambda c: logits_of(c, lambda p, s, x: tta_logits(eval_step, p, s, x, 1)),
        "flips + 2 translations (level 2)": lambda c: logits_of(c, lambda p, s, x: tta_logits(eval_step, p, s, x, 2)),
        "flips + 4 translations": lambda c: logits_of(c, lambda p, s, x: four_shift_logits(eval_step, p, s, x)),
    }
    rows, level2 = {}, {}
    for name, compute in variants.items():
        tick = time.perf_counter()
        logits = compute(last)
        rows[name] = {"accuracy": (logits.argmax(1) == labels).float().mean().item(),
                      "seconds": time.perf_counter() - tick}
        if "level 2" in name:
            level2[len(loaded) - 1] = logits
    for back in (2, 3):
        tick = time.perf_counter()
        for i in range(len(loaded) - back, len(loaded)):
            if i not in level2:
                level2[i] = variants["flips + 2 translations (level 2)"](loaded[i])
        seconds = time.perf_counter() - tick + rows["flips + 2 translations (level 2)"]["seconds"]
        mean_logits = torch.stack([level2[i] for i in range(len(loaded) - back, len(loaded))]).mean(0)
        rows[f"last {back} epochs' checkpoints, level 2 each"] = {
            "accuracy": (mean_logits.argmax(1) == labels).float().mean().item(), "seconds": seconds}
    return {"run": str(run), "data_dir": str(data_dir), "images": len(images),
            "checkpoints": [path.name for path in checkpoints[-3:]], "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    folder = sub.add_parser("folder", help="write the validation folder")
    folder.add_argument("source", type=Path)
    folder.add_argument("out", type=Path)
    after = sub.add_parser("posthoc", help="TTA variants and checkpoint ensembles of a finished run")
    after.add_argument("run", type=Path)
    after.add_argument("--data-dir", type=Path, required=True)
    after.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.command == "folder":
        make_folder(args.source, args.out)
        return
    results = posthoc(args.run, args.data_dir)
    print(f"{results['run']} on {results['images']:,} images of {results['data_dir']} "
          f"({', '.join(results['checkpoints'])})")
    for name, row in results["rows"].items():
        print(f"  {name:<45}{100 * row['accuracy']:>7.2f}%{row['seconds']:>8.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
