"""Calibration and robustness of one model, of temperature scaling and of an ensemble (issue 28).

    python -m benchmarks.calibration --data-dir ../shared/data/cifar10 [--corrupt-images 2000] [--seeds 0-3]
        [--work runs/bench-calibration] [--json runs/bench-calibration/result.json]

1. A corruption folder of the first ``--corrupt-images`` test images (`fnclass data prepare cifar10-c`, all 15
   corruptions at severities 1-5, seed 0), built once in ``--work``.
2. The shipped ``cifar10-cpu`` model (trained on all 50,000 images: no held-out split, so no temperature).
3. One `fnclass train --config cpu --seeds 0-3 --set data.val_size=5000 --set train.calibrate=true` run: four members
   of configs/cpu.toml on 45,000 images (each member is exactly the single run with its seed), the last 5,000 held
   out. Each member alone, before and after its own temperature (fitted on the held-out 5,000 only), and the
   ensemble (the mean of the members' logits), before and after the ensemble's temperature (the one the run fitted).

Every model is measured on the clean test split (10,000 images) and on the corrupted sets: accuracy, NLL, ECE
(15 bins) and Brier score. The run is kept in ``--work``, so a second call only measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, publish

METRICS = ("accuracy", "nll", "ece", "brier")


def split_logits(logits_of, images: torch.Tensor) -> torch.Tensor:
    """A model's logits of a whole uint8 split, in batches of 1,000."""
    with torch.no_grad():
        return torch.cat([logits_of(images[i:i + 1000]).float().cpu() for i in range(0, len(images), 1000)])


def corrupted_logits(logits_of, corruption_set) -> list[torch.Tensor]:
    """The logits of every corruption's 5N images (computed once; every temperature reuses them)."""
    return [split_logits(logits_of, torch.from_numpy(corruption_set.load(name)))
            for name in corruption_set.corruptions]


def measure(clean: torch.Tensor, labels: torch.Tensor, corrupted: list[torch.Tensor], corruption_set,
            temperature: float) -> dict:
    """Clean and corrupted metrics (the mean over the 75 corrupted sets) of cached logits at one temperature."""
    from fnclass.training.calibration import calibration_metrics

    n, corrupted_labels = corruption_set.images, torch.from_numpy(corruption_set.labels)
    rows = [calibration_metrics(logits[s * n:(s + 1) * n], corrupted_labels, temperature)
            for logits in corrupted for s in range(len(corruption_set.severities))]
    metrics = calibration_metrics(clean, labels, temperature)
    return {"temperature": temperature, "clean": {k: metrics[k] for k in METRICS},
            "corrupted": {k: statistics.fmean(r[k] for r in rows) for k in METRICS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--corrupt-images", type=int, default=2000)
    parser.add_argument("--seeds", default="0-3")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--work", default="runs/bench-calibration")
    parser.add_argument("--json")
    args = parser.parse_args()

    import fnclass
    from fnclass.config import load_config
    from fnclass.core import tree
    from fnclass.data import load_split
    from fnclass.data.corruptions import prepare_corruptions, read_corruption_set
    from fnclass.run.checkpoint import ensemble_logits, load_checkpoint
    from fnclass.training.calibration import fit_temperature
    from fnclass.training.program import train

    work, data = Path(args.work), Path(args.data_dir)
    work.mkdir(parents=True, exist_ok=True)
    seconds = {}
    corrupted_dir = work / f"cifar10-c-{args.corrupt_images}"
    if not (corrupted_dir / "manifest.json").exists():
        tick = time.perf_counter()
        prepare_corruptions(data, corrupted_dir, images=args.corrupt_images, workers=2)
        seconds["prepare cifar10-c"] = time.perf_counter() - tick
    corruption_set = read_corruption_set(corrupted_dir)
    run = work / "members"
    if not (run / "summary.json").exists():
        first, last = (int(v) for v in args.seeds.split("-"))
        config = load_config("cpu", [f"members.seeds=[{','.join(map(str, range(first, last + 1)))}]",
                                     f"data.val_size={args.val_size}", "train.calibrate=true"])
        tick = time.perf_counter()
        train(config, run, data_dir=str(data), device="cpu", download=False)
        seconds["train members"] = time.perf_counter() - tick
    summary = json.loads((run / "summary.json").read_text())
    test_images, test_labels = load_split(data, "test")
    train_images, train_labels = load_split(data, "train")
    from fnclass.data import validation_split

    ckpt = load_checkpoint(run / "checkpoints/last.safetensors")
    val = validation_split(train_labels, ckpt.config.data.val_size, ckpt.config.data.val_seed)[1]
    val_images, val_labels = train_images[val], train_labels[val]
    results = {}
    tick = time.perf_counter()
    shipped = fnclass.pretrained("cifar10-cpu")
    results["cifar10-cpu (shipped; trained on all 50,000: no temperature)"] = measure(
        split_logits(shipped.logits, test_images), test_labels, corrupted_logits(shipped.logits, corruption_set),
        corruption_set, 1.0)
    members, member_logits = [], []
    for i in range(len(ckpt.members)):
        member = ckpt.member(i)
        logits_of = lambda images, m=member: ensemble_logits(m.model, m.params, m.state, m.mean, m.std,
                                                             torch.float32, images)
        clean, corrupted = split_logits(logits_of, test_images), corrupted_logits(logits_of, corruption_set)
        temperature = fit_temperature(split_logits(logits_of, val_images), val_labels)
        member_logits.append((clean, corrupted))
        members.append({"seed": ckpt.members[i]["seed"],
                        "before": measure(clean, test_labels, corrupted, corruption_set, 1.0),
                        "after": measure(clean, test_labels, corrupted, corruption_set, temperature)})
        print(f"member {i}: T = {temperature:.4f}", flush=True)
    # the ensemble's logits are the mean of the members' (Checkpoint.logits of the stacked file)
    clean = torch.stack([c for c, _ in member_logits]).mean(dim=0)
    corrupted = [torch.stack([m[1][j] for m in member_logits]).mean(dim=0)
                 for j in range(len(corruption_set.corruptions))]
    results["ensemble"] = measure(clean, test_labels, corrupted, corruption_set, 1.0)
    results["ensemble + T"] = measure(clean, test_labels, corrupted, corruption_set, ckpt.temperature)
    seconds["measure"] = time.perf_counter() - tick
    mean_member = {when: {split: {k: statistics.fmean(m[when][split][k] for m in members) for k in METRICS}
                          for split in ("clean", "corrupted")} for when in ("before", "after")}
    gains = {split: {k: results["ensemble"][split][k] / mean_member["before"][split][k] - 1 for k in ("nll", "ece",
                                                                                                      "brier")}
             for split in ("clean", "corrupted")}
    rows = [(name, r) for name, r in results.items() if name.startswith("cifar10-cpu")]
    rows += [(f"member seed {m['seed']}", m["before"]) for m in members]
    rows += [(f"member seed {m['seed']} + T = {m['after']['temperature']:.3f}", m["after"]) for m in members]
    rows += [("members' mean", {**mean_member["before"], "temperature": 1.0}),
             ("members' mean + own T", {**mean_member["after"], "temperature": None}),
             (f"ensemble of {len(members)}", results["ensemble"]),
             (f"ensemble + T = {ckpt.temperature:.3f}", results["ensemble + T"])]
    table = [f"Calibration on CIFAR-10 (our JPEG copy): the clean test split (10,000) and {args.corrupt_images:,} test "
             f"images x 15 corruptions x 5 severities (imagecorruptions, seed 0); configs/cpu.toml --seeds "
             f"{args.seeds} with {args.val_size:,} training images held out (temperatures fitted on them only); "
             f"{device_name(torch.device('cpu'))}, torch {torch.__version__}",
             f"{'model':<44}{'acc':>8}{'NLL':>8}{'ECE':>8}{'Brier':>8} |{'C acc':>8}{'C NLL':>8}{'C ECE':>8}"
             f"{'C Brier':>8}"]
    for name, r in rows:
        c, k = r["clean"], r["corrupted"]
        table.append(f"{name:<44}{c['accuracy']:>8.2%}{c['nll']:>8.4f}{c['ece']:>8.4f}{c['brier']:>8.4f} |"
                     f"{k['accuracy']:>8.2%}{k['nll']:>8.4f}{k['ece']:>8.4f}{k['brier']:>8.4f}")
    table.append("ensemble against the members' mean (no temperature): " + "; ".join(
        f"{split}: " + ", ".join(f"{k.upper() if k != 'brier' else 'Brier'} {v:+.1%}" for k, v in g.items())
        for split, g in gains.items()))
    table.append(f"parameters per member: {tree.num_params(ckpt.member(0).params):,}; seconds: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    publish({"results": results, "members": members, "mean_member": mean_member, "gains": gains,
             "run_summary_calibration": summary.get("calibration"), "corrupt_images": args.corrupt_images,
             "seconds": seconds, "device": device_name(torch.device("cpu")), "torch": torch.__version__},
            "\n".join(table), args.json)


if __name__ == "__main__":
    main()
