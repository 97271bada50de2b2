"""Data attribution benchmarks (docs/attribution.md): mislabel detection on real CIFAR-10.

Run by hand from the repository root, not by pytest (``pip install -e '.[bench]'`` for Captum)::

    python -m benchmarks.attribution mislabel --data-dir ../shared/data/cifar10 [--train-limit 10000]
        [--every-epochs 3] [--work runs/bench-mislabel] [--json mislabel.json]
    python -m benchmarks.attribution speed --data-dir ../shared/data/cifar10 [--train 1000] [--json speed.json]
    python -m benchmarks.attribution prune --data-dir ../shared/data/cifar10 [--seeds 0-2] [--keep 0.7]
    python -m benchmarks.attribution lds --data-dir ../shared/data/cifar10 [--train 2000] [--test 400]
        [--tune 200] [--subsets 256] [--members 8] [--proj-dim 1024] [--dampings 1e-6,1e-3,1e-2,1e-1,1]
        [--other-dims 512,2048] [--work runs/bench-lds] [--json lds.json]

``mislabel``: the first ``--train-limit`` training images with 10% of their labels changed at random to another
class (``--seed``), written as a data folder; configs/cpu.toml trained on it with a checkpoint kept every
``--every-epochs`` epochs; then four rankings of the training examples, each asking which labels look wrong:
TracIn self-influence over the kept checkpoints (``fnclass influence --self``), and the final checkpoint's loss,
gradient norm (``fnclass grads``) and EL2N (``fnclass grads --score el2n``). For each ranking, the fraction of the
flipped examples found among its top 5%, 10% and 20%; chance finds 5%, 10% and 20% of them.

``speed``: TracIn of ``--test`` test images against ``--train`` training images over the two checkpoints of a
short trained run (cpu.toml's model without its whitening stem, which the ``nn.Module`` twin lacks, ``--epochs``
epochs on ``--train-images`` images, kept in ``--work``), as training examples scored per second (training examples
x checkpoints / seconds): fnclass exact and projected (D = 1024, all layers), Captum's ``TracInCP`` on the twin,
exact: its default (one backward per example, all parameters) and with ``sample_wise_grads_per_batch`` (hooks that
cover Linear and Conv2d parameters only), and dattri's ``TracInAttributor`` (exact) when installed. Each variant
runs once untimed (its scores checked against Captum's exact ones), then ``--rounds`` timed rounds in alternating
order; the table gives the median time and the median and range of the per-round ratios to Captum's exact
TracInCP. Captum projects only in ``TracInCPFastRandProj``, which takes the final layer's gradients alone and needs
the ``annoy`` package: not the same computation, so it is left out.

``prune``: "prune by score, retrain" as two commands. EL2N is scored early in training, as Paul et al. do (here
a 2-epoch cpu.toml run of two seeds, the members' mean: ``fnclass grads --score el2n --keep-fraction``); then
cpu.toml is trained on the ``--keep`` highest-scoring training images and on as many drawn at random, with
``--seeds`` as members of one run for EL2N's selection (``data.train_indices``) and, for the random one, one run
per seed, each on its own random selection (drawn from ``(--seed, seed)``), and the test accuracies are compared.

``lds``: the linear datamodeling score (Park et al. 2023; ``fnclass.analysis.influence.linear_datamodeling_score``) on a
small subset: the first ``--train`` training and ``--test`` test images, a small model (cpu.toml's recipe at widths
16/32/64 without the whitening stem, batch 100). Attributed: fnclass TracIn over the checkpoints of one run
(``--every-epochs``), exact and projected, and TRAK over one model and over ``--members`` seeds; dattri 0.3's
``TracInAttributor`` (exact, the same checkpoints and learning rates; its scores are compared with fnclass's) and
``TRAKAttributor`` (the same members and projection size) on the ``nn.Module`` twin of the same weights; random
scores as the floor. TRAK's damping (a multiple of the mean diagonal of ``Phi^T Phi``) is swept: the LDS is
reported on the first ``--test`` minus ``--tune`` test images, the last ``--tune`` ones choose the damping; the
members' TRAK is also run at ``--other-dims``, with the first of ``--dampings`` and the default damping.
Ground truth: ``--subsets`` models, each trained from its own seed on a random ``--alpha`` half of the training
images, and their margins on the test images (kept in ``--work`` so an interrupted run goes on). The LDS is
checked against ``dattri.metric.lds``. Needs ``pip install -e '.[bench]'`` (dattri).
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


def subset_folder(source: Path, out: Path, n_train: int, n_test: int | None = None) -> None:
    """A data folder with the first ``n_train`` training images of ``source`` and its first ``n_test`` test images
    (None: the whole test split, linked)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        for name in (f"{split}_images.npy", f"{split}_labels.npy"):
            target = out / name
            if n is not None:
                np.save(target, np.load(source / name, mmap_mode="r")[:n])
            elif not target.exists():
                target.symlink_to((source / name).resolve())
    if not (out / "classes.txt").exists():
        (out / "classes.txt").symlink_to((source / "classes.txt").resolve())


def flipped_folder(source: Path, out: Path, n: int, fraction: float, seed: int) -> np.ndarray:
    """A data folder with the first ``n`` training images of ``source``, ``fraction`` of their labels changed to
    another class drawn at random; returns the flipped rows."""
    subset_folder(source, out, n)
    labels = np.load(out / "train_labels.npy", allow_pickle=False).astype(np.int64)
    classes = int(labels.max()) + 1
    generator = np.random.default_rng(seed)
    flipped = np.sort(generator.choice(n, int(round(fraction * n)), replace=False))
    labels[flipped] = (labels[flipped] + generator.integers(1, classes, len(flipped))) % classes
    np.save(out / "train_labels.npy", labels)
    np.save(out / "flipped.npy", flipped)
    return flipped


def fnclass(*args: str) -> float:
    """Run ``fnclass ARGS`` (this checkout), return its wall time in seconds."""
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fnclass", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - tick


def column(path: Path, name: str, index: str = "index") -> np.ndarray:
    """A CSV's ``name`` column ordered by its ``index`` column."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
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
    run = work / "run"
    seconds = {}
    if (run / "summary.json").exists() and (data / "flipped.npy").exists():  # trained already: go on from there
        flipped = np.load(data / "flipped.npy", allow_pickle=False)
    else:
        flipped = flipped_folder(Path(args.data_dir), data, args.train_limit, 0.1, args.seed)
        seconds["train"] = fnclass("train", "--config", "cpu", "--data-dir", str(data), "--out", str(run),
                                   "--quiet", "--set", f"checkpoint.every_epochs={args.every_epochs}")
    summary = json.loads((run / "summary.json").read_text())
    last = run / "checkpoints/last.safetensors"
    steps = {
        "self_influence": ("influence", str(run), "--self", "--data-dir", str(data), "--out", str(work / "self")),
        "ekfac_self": ("influence", str(run), "--self", "--method", "ekfac", "--data-dir", str(data), "--out",
                       str(work / "ekfac-self"), *(("--factor-examples", str(args.factor_examples))
                                                   if args.factor_examples else ())),
        "grads": ("grads", str(last), "--data-dir", str(data), "--out", str(work / "grads")),
        "el2n": ("grads", str(last), "--data-dir", str(data), "--score", "el2n", "--out", str(work / "el2n")),
        "grand": ("grads", str(last), "--data-dir", str(data), "--score", "grand", "--out", str(work / "grand")),
    }
    outputs = {"self_influence": "self/self_influence.csv", "ekfac_self": "ekfac-self/self_influence.csv",
               "grads": "grads/per_example.csv", "el2n": "el2n/scores.csv", "grand": "grand/scores.csv"}
    for name, command in steps.items():
        if not (work / outputs[name]).exists():
            seconds[name] = fnclass(*command)
    rankings = {"TracIn self-influence": column(work / "self/self_influence.csv", "score"),
                "EK-FAC self-influence": column(work / "ekfac-self/self_influence.csv", "score"),
                "final loss": column(work / "grads/per_example.csv", "loss"),
                "gradient norm": column(work / "grads/per_example.csv", "grad_norm"),
                "EL2N": column(work / "el2n/scores.csv", "score"),
                "GraNd": column(work / "grand/scores.csv", "score")}
    results = {name: found(scores, flipped) for name, scores in rankings.items()}
    side = {}
    if args.side_by_side:  # fnclass's EK-FAC and Kronfluence's on the first rows, the same layers and factors' rows
        n = args.side_by_side
        chosen = flipped[flipped < n]
        for library in ("fnclass", "kronfluence"):
            out = work / f"side-{library}.npy"
            if not out.exists():
                tick = time.perf_counter()
                subprocess.run([sys.executable, "-m", "benchmarks.ekfac", "self", "--library", library,
                                "--checkpoint", str(last), "--data-dir", str(data), "--train", str(n), "--out",
                                str(out), *(("--factor-examples", str(args.factor_examples))
                                            if args.factor_examples and args.factor_examples < n else ())],
                               check=True)
                seconds[f"side {library}"] = time.perf_counter() - tick
            side[f"{library} EK-FAC self-influence (convolutions + head)"] = found(
                np.load(out, allow_pickle=False), chosen)
        for name in ("EL2N", "EK-FAC self-influence", "final loss"):
            side[f"fnclass {name} (all layers), these rows"] = found(rankings[name][:n], chosen)
    checkpoints = len(list((run / "checkpoints").glob("epoch-*.safetensors")))
    n_train = len(rankings["EL2N"])
    table = [f"mislabel detection: {n_train:,} CIFAR-10 training images, {len(flipped):,} labels flipped "
             f"(10%, seed {args.seed}), cpu.toml ({summary.get('test_accuracy', float('nan')):.2%} test accuracy), "
             f"{checkpoints} checkpoints for TracIn; {device_name(torch.device('cpu'))}, torch {torch.__version__}",
             f"{'ranking':<56}" + "".join(f"{'top ' + k:>10}" for k in next(iter(results.values())))]
    for name, shares in results.items():
        table.append(f"{name:<56}" + "".join(f"{share:>10.1%}" for share in shares.values()))
    if side:
        table.append(f"side by side on the first {args.side_by_side:,} rows:")
        for name, shares in side.items():
            table.append(f"{name:<56}" + "".join(f"{share:>10.1%}" for share in shares.values()))
    table.append("chance finds 5%, 10% and 20%; seconds (this invocation): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    publish({"train": n_train, "flipped": len(flipped), "seed": args.seed, "every_epochs": args.every_epochs,
             "checkpoints": checkpoints, "factor_examples": args.factor_examples,
             "test_accuracy": summary.get("test_accuracy"), "found": results, "side_by_side": side,
             "side_by_side_rows": args.side_by_side, "seconds": seconds,
             "device": device_name(torch.device("cpu")), "torch": torch.__version__}, "\n".join(table), args.json)


def speed(args) -> None:
    import statistics

    from captum.influence import TracInCP
    from torch.utils.data import DataLoader, TensorDataset

    from fnclass.analysis import influence
    from fnclass.analysis.gradients import vmap_model
    from fnclass.core import tree
    from fnclass.data import load_split
    from fnclass.training.program import train
    from tests.torch_reference import reference_module

    work = Path(args.work)
    run = work / "run"
    if not (run / "summary.json").exists():  # trained checkpoints: cpu.toml without whitening, a short run
        config = lds_config(args.epochs, "model.widths=[48,96,192]", "train.batch_size=500",
                            f"checkpoint.every_epochs={args.epochs // 2}", f"data.train_limit={args.train_images}")
        train(config, run, data_dir=args.data_dir, device="cpu", download=False)
    paths = sorted((run / "checkpoints").glob("epoch-*.safetensors"))
    along = influence.load_along(paths)
    first = along[0].checkpoint
    config = first.config
    train_raw, train_labels = load_split(args.data_dir, "train", limit=args.train)
    test_raw, test_labels = load_split(args.data_dir, "test", limit=args.test)
    train_x, test_x = first.preprocess(train_raw).contiguous(), first.preprocess(test_raw).contiguous()
    problem = influence.Problem(vmap_model(first), train_x, train_labels, test_x, test_labels, args.chunk_size)
    twin = reference_module(config.model, first.params, first.state).eval()
    weights = {str(path): item for path, item in zip(paths, along)}

    def load(module, path):
        item = weights[str(path)]
        loaded = reference_module(config.model, item.checkpoint.params, item.checkpoint.state)
        module.load_state_dict(loaded.state_dict())
        module.eval()
        return item.learning_rates[0]

    dataset = TensorDataset(train_x, train_labels)
    hooks = TracInCP(twin, dataset, [str(p) for p in paths], checkpoints_load_func=load,
                     loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=args.chunk_size,
                     sample_wise_grads_per_batch=True)
    plain = TracInCP(twin, dataset, [str(p) for p in paths], checkpoints_load_func=load,
                     loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=args.chunk_size)
    variants = {"fnclass exact": lambda: influence.tracin_scores(along, problem),
                "fnclass projected D=1024": lambda: influence.tracin_scores(along, problem, proj_dim=1024),
                "Captum TracInCP, per-sample hooks (Linear/Conv2d only)":
                    lambda: hooks.influence((test_x, test_labels)),
                "Captum TracInCP (exact)": lambda: plain.influence((test_x, test_labels))}
    try:
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.task import AttributionTask

        def dattri():
            def loss(params, data):
                image, label = data
                return torch.nn.functional.cross_entropy(torch.func.functional_call(twin, params, image[None]),
                                                         label[None])

            def load_state(model, state):
                model.load_state_dict(state)
                return model.eval()
            states = [reference_module(config.model, item.checkpoint.params, item.checkpoint.state).state_dict()
                      for item in along]
            task = AttributionTask(loss_func=loss, model=twin, checkpoints=states, checkpoints_load_func=load_state)
            tracin = TracInAttributor(task, weight_list=torch.tensor([item.learning_rates[0] for item in along]),
                                      normalized_grad=False, device="cpu")
            tracin.projector_kwargs = None
            return tracin.attribute(DataLoader(dataset, batch_size=500), DataLoader(
                TensorDataset(test_x, test_labels), batch_size=256)).T
        variants["dattri TracInAttributor (exact)"] = dattri
    except ImportError:
        pass
    results = {name: variants[name]() for name in variants}  # once each, untimed: warm-up and the check
    reference = results["Captum TracInCP (exact)"]
    errors = {name: float((torch.as_tensor(value) - reference).abs().max() / reference.abs().max())
              for name, value in results.items() if "projected" not in name}
    names, seconds = list(variants), {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            tick = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - tick)
    base = seconds["Captum TracInCP (exact)"]
    ratios = {name: [b / t for b, t in zip(base, times)] for name, times in seconds.items()}
    table = [f"TracIn speed: {len(test_x)} test x {len(train_x)} training images, {len(paths)} trained checkpoints "
             f"of cpu.toml's model without whitening ({tree.num_params(first.params):,} parameters), chunk "
             f"{args.chunk_size}, {args.rounds} rounds in alternating order; {device_name(torch.device('cpu'))}, "
             f"torch {torch.__version__}",
             f"{'variant':<56}{'train ex./s':>12}{'x Captum TracInCP (median, range)':>36}{'max rel. err.':>15}"]
    for name, times in seconds.items():
        rate = len(train_x) * len(paths) / statistics.median(times)
        spread = f"{statistics.median(ratios[name]):.2f}x [{min(ratios[name]):.2f}, {max(ratios[name]):.2f}]"
        error = f"{errors[name]:.1e}" if name in errors else "-"
        table.append(f"{name:<56}{rate:>12,.1f}{spread:>36}{error:>15}")
    publish({"train": len(train_x), "test": len(test_x), "checkpoints": [str(p) for p in paths],
             "rounds": args.rounds, "seconds": seconds, "ratios_to_captum_exact": ratios, "max_rel_error": errors,
             "device": device_name(torch.device("cpu")), "torch": torch.__version__}, "\n".join(table), args.json)


def prune(args) -> None:
    work = Path(args.work)
    scoring = work / "scoring"
    seconds = {"scoring run": fnclass("train", "--config", "cpu", "--data-dir", args.data_dir, "--out", str(scoring),
                                      "--quiet", "--seeds", "0-1", "--set", f"train.epochs={args.score_epochs}")}
    seconds["el2n"] = fnclass("grads", str(scoring / "checkpoints/last.safetensors"), "--data-dir", args.data_dir,
                              "--score", "el2n", "--keep-fraction", str(args.keep), "--out", str(work / "el2n"))
    kept = np.loadtxt(work / "el2n/kept_indices.txt", dtype=np.int64)
    n = len(np.load(Path(args.data_dir) / "train_labels.npy", mmap_mode="r"))
    out = work / "train-el2n"  # EL2N's selection is one set: the seeds train on it as members of one run
    seconds["train EL2N"] = fnclass("train", "--config", "cpu", "--data-dir", args.data_dir, "--out", str(out),
                                    "--quiet", "--seeds", args.seeds, "--set",
                                    f"data.train_indices={(work / 'el2n/kept_indices.txt').resolve()}")
    accuracy = {"EL2N": [m["test_accuracy"] for m in json.loads((out / "summary.json").read_text())["members"]],
                "random": []}
    low, _, high = args.seeds.partition("-")
    for seed in range(int(low), int(high or low) + 1):  # each seed its own random selection, drawn from (seed, --seed)
        chosen = np.sort(np.random.default_rng([args.seed, seed]).choice(n, len(kept), replace=False))
        indices = work / f"random_indices-{seed}.txt"
        np.savetxt(indices, chosen, fmt="%d")
        out = work / f"train-random-{seed}"
        seconds[f"train random {seed}"] = fnclass("train", "--config", "cpu", "--data-dir", args.data_dir, "--out",
                                                  str(out), "--quiet", "--set", f"train.seed={seed}", "--set",
                                                  f"data.train_indices={indices.resolve()}")
        accuracy["random"].append(json.loads((out / "summary.json").read_text())["test_accuracy"])
    table = [f"pruning: cpu.toml on {len(kept):,} of {n:,} training images ({args.keep:.0%}), seeds {args.seeds}; "
             f"EL2N from {args.score_epochs} epochs x 2 seeds; {device_name(torch.device('cpu'))}, "
             f"torch {torch.__version__}"]
    for name, values in accuracy.items():
        mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        table.append(f"{name:<8} test accuracy {mean:.2%} ± {std:.2%}  ({', '.join(f'{v:.2%}' for v in values)})")
    table.append("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    publish({"keep": args.keep, "kept": len(kept), "seeds": args.seeds, "score_epochs": args.score_epochs,
             "test_accuracy": accuracy, "seconds": seconds, "device": device_name(torch.device("cpu")),
             "torch": torch.__version__}, "\n".join(table), args.json)


# lds: a small model (cpu.toml's recipe at widths 16/32/64, no whitening stem, which the nn.Module twin lacks) that
# trains on 1,000 images in seconds, so that tens of retrainings fit on a CPU.
LDS_SET = ["model.widths=[16,32,64]", "model.whiten=false", "optim.whiten_bias_epochs=0", "train.batch_size=100",
           "train.tta=false", "train.eval_batch_size=1000", "train.log_every_steps=1000"]


def lds_config(epochs: int, *overrides: str):
    from fnclass.config import load_config

    return load_config("cpu", [*LDS_SET, f"train.epochs={epochs}", *overrides])


def test_margins(checkpoint: Path, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """TRAK's output function, the margin, of a checkpoint's model on the test images (eval mode, no TTA)."""
    from fnclass.analysis.influence import margin
    from fnclass.run.checkpoint import load_checkpoint

    with torch.no_grad():
        return margin(load_checkpoint(checkpoint).logits(images), labels).numpy()


def retrain_subsets(args, data: Path, work: Path, test_x: torch.Tensor, test_y: torch.Tensor) -> tuple:
    """Train one model per random ``alpha`` subset of the training rows (seed = subset number), in this process;
    the margins are kept in ``work/retrain`` so that an interrupted benchmark goes on where it stopped."""
    import shutil

    from fnclass.training.program import train

    folder = work / "retrain"
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(args.seed)
    masks = np.zeros((args.subsets, args.train), dtype=bool)
    outputs = np.zeros((args.subsets, len(test_x)))
    accuracy = np.zeros(args.subsets)
    tick = time.perf_counter()
    trained = 0
    for m in range(args.subsets):
        chosen = np.sort(generator.choice(args.train, int(round(args.alpha * args.train)), replace=False))
        masks[m, chosen] = True
        kept = folder / f"subset-{m:04d}.npz"
        if kept.exists():
            with np.load(kept, allow_pickle=False) as saved:
                if "indices" not in saved or not np.array_equal(saved["indices"], chosen):
                    raise SystemExit(f"{kept} was trained on another subset (other --train, --alpha or --seed): "
                                     "use another --work")
        else:
            indices = folder / f"subset-{m:04d}.txt"
            np.savetxt(indices, chosen, fmt="%d")
            run = folder / f"run-{m:04d}"
            shutil.rmtree(run, ignore_errors=True)
            config = lds_config(args.epochs, f"data.train_indices={indices.resolve()}", f"train.seed={m}")
            summary = train(config, run, data_dir=str(data), device="cpu", download=False).summary
            margins = test_margins(run / "checkpoints/last.safetensors", test_x, test_y)
            tmp = folder / f"subset-{m:04d}.tmp.npz"
            np.savez(tmp, margins=margins, accuracy=summary["test_accuracy"], indices=chosen)
            tmp.rename(kept)
            shutil.rmtree(run)
            trained += 1
            print(f"subset {m + 1}/{args.subsets}: test accuracy {summary['test_accuracy']:.2%}, "
                  f"{(time.perf_counter() - tick) / trained:.1f} s a retraining", flush=True)
        with np.load(kept, allow_pickle=False) as saved:
            outputs[m], accuracy[m] = saved["margins"], saved["accuracy"]
    return masks, outputs, accuracy, (time.perf_counter() - tick) / max(trained, 1) if trained else None


def retrain_weighted(args, data: Path, work: Path, test_x: torch.Tensor, test_y: torch.Tensor) -> dict:
    """The single-model setting: for each drop fraction, ``--single-subsets`` retrainings of the attributed run
    itself (the same seed, so every batch, key and augmentation as trained) with a random ``fraction`` of the
    training examples given loss weight 0 (``data.train_weights``). Per fraction: ``(masks, margins)``; kept in
    ``work/retrain-single`` so that an interrupted benchmark goes on where it stopped."""
    import shutil

    from fnclass.training.program import train

    folder = work / "retrain-single"
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for fraction in args.drop_fractions:
        generator = np.random.default_rng([args.seed, round(fraction * 1e6)])
        masks = np.ones((args.single_subsets, args.train), dtype=bool)
        outputs = np.zeros((args.single_subsets, len(test_x)))
        for m in range(args.single_subsets):
            dropped = np.sort(generator.choice(args.train, max(1, round(fraction * args.train)), replace=False))
            masks[m, dropped] = False
            kept = folder / f"drop-{fraction:g}-{m:04d}.npz"
            if not kept.exists():
                weights = folder / f"drop-{fraction:g}-{m:04d}.npy"
                np.save(weights, masks[m].astype(np.float32))
                run = folder / f"run-{fraction:g}-{m:04d}"
                shutil.rmtree(run, ignore_errors=True)
                config = lds_config(args.epochs, f"data.train_weights={weights.resolve()}")
                train(config, run, data_dir=str(data), device="cpu", download=False)
                tmp = folder / f"drop-{fraction:g}-{m:04d}.tmp.npz"
                np.savez(tmp, margins=test_margins(run / "checkpoints/last.safetensors", test_x, test_y),
                         dropped=dropped)
                tmp.rename(kept)
                shutil.rmtree(run)
                print(f"single-model retraining, drop {fraction:g}: {m + 1}/{args.single_subsets}", flush=True)
            with np.load(kept, allow_pickle=False) as saved:
                if not np.array_equal(saved["dropped"], dropped):
                    raise SystemExit(f"{kept} dropped other examples (another --train or --seed): use another --work")
                outputs[m] = saved["margins"]
        results[fraction] = (masks, outputs)
    return results


def dattri_scores(config, along: list, along_members: list, train_x, train_y, test_x, test_y, proj_dim: int,
                  seconds: dict) -> dict:
    """dattri's TracIn (exact, the same checkpoints and learning rates) and TRAK (the same members, the same
    projection size) on the ``nn.Module`` twin of the same weights."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    from fnclass.analysis.influence import margin
    from tests.torch_reference import reference_module

    def twin_weights(item, index=None):
        ckpt = item.checkpoint if index is None else item.checkpoint.member(index)
        return reference_module(config.model, ckpt.params, ckpt.state).eval()

    module = twin_weights(along[0])
    state_dicts = [twin_weights(item).state_dict() for item in along]

    def loss(params, data):
        image, label = data
        logits = torch.func.functional_call(module, params, image[None])
        return torch.nn.functional.cross_entropy(logits, label[None])

    def output(params, data):
        image, label = data
        return margin(torch.func.functional_call(module, params, image[None]), label[None])[0]

    def correct(params, data):
        image, label = data
        logits = torch.func.functional_call(module, params, image[None])
        return torch.exp(-torch.nn.functional.cross_entropy(logits, label[None]))

    def load(model, checkpoint):
        model.load_state_dict(checkpoint)
        return model.eval()

    # dattri's TracIn computes the test gradients again for every training batch: large batches keep that down
    train_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=500, shuffle=False)
    test_loader = DataLoader(TensorDataset(test_x, test_y), batch_size=256, shuffle=False)
    results = {}
    tick = time.perf_counter()
    task = AttributionTask(loss_func=loss, model=module, checkpoints=state_dicts, checkpoints_load_func=load)
    weights = torch.tensor([item.learning_rates[0] for item in along])
    tracin = TracInAttributor(task, weight_list=weights, normalized_grad=False, device="cpu")
    tracin.projector_kwargs = None  # dattri 0.3 projects to 512 dimensions even when given None; exact here
    results["dattri TracIn (exact)"] = tracin.attribute(train_loader, test_loader).T.numpy()
    seconds["dattri TracIn (exact)"] = time.perf_counter() - tick
    tick = time.perf_counter()
    last = along_members[-1]
    members = [twin_weights(last, i).state_dict() for i in range(len(last.checkpoint.members))]
    task = AttributionTask(loss_func=output, model=module, checkpoints=members, checkpoints_load_func=load)
    projector = {"proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
    trak = TRAKAttributor(task, correct_probability_func=correct, projector_kwargs=projector, device="cpu")
    trak.cache(train_loader)
    name = f"dattri TRAK ({len(members)} models, D={proj_dim})"
    results[name] = trak.attribute(test_loader).T.numpy()
    seconds[name] = time.perf_counter() - tick
    return results


def lds(args) -> None:
    from fnclass.analysis import influence
    from fnclass.analysis.gradients import vmap_model
    from fnclass.core import random, tree
    from fnclass.data import load_split
    from fnclass.training.program import train

    if not 0 <= args.tune < args.test:
        raise SystemExit(f"--tune {args.tune}: expected 0 <= --tune < --test ({args.test})")
    work = Path(args.work)
    setup = {k: getattr(args, k) for k in ("train", "test", "alpha", "epochs", "every_epochs", "seed")}
    recorded = work / "setup.json"
    if recorded.exists() and json.loads(recorded.read_text()) != setup:
        raise SystemExit(f"{work} holds runs of another setup ({recorded.read_text().strip()}): use another --work")
    work.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(setup) + "\n")
    data = work / "data"
    subset_folder(Path(args.data_dir), data, args.train, args.test)
    train_raw, train_y = load_split(str(data), "train")
    test_raw, test_y = load_split(str(data), "test")
    held = args.test - args.tune  # LDS is reported on the first `held` test images; the rest choose the damping
    seconds = {}
    single, members = work / "run", work / f"members-{args.members}"
    for out, overrides in ((single, [f"checkpoint.every_epochs={args.every_epochs}"]),
                           (members, [f"members.seeds=[{','.join(map(str, range(args.members)))}]"])):
        if not (out / "summary.json").exists():
            tick = time.perf_counter()
            train(lds_config(args.epochs, *overrides), out, data_dir=str(data), device="cpu", download=False)
            seconds[f"train {out.name}"] = time.perf_counter() - tick
    along = influence.load_along(sorted((single / "checkpoints").glob("epoch-*.safetensors")))
    along_members = influence.load_along([members / "checkpoints/last.safetensors"])
    last_single = influence.load_along([single / "checkpoints/last.safetensors"])
    first = along[0].checkpoint
    train_x, test_x = first.preprocess(train_raw).contiguous(), first.preprocess(test_raw).contiguous()
    problem = influence.Problem(vmap_model(first), train_x, train_y, test_x, test_y, 256)
    scores, sweep = {}, {}

    def timed(name, work):
        tick = time.perf_counter()
        scores[name] = work().numpy()
        seconds[name] = time.perf_counter() - tick
        print(f"{name}: {seconds[name]:.1f} s", flush=True)

    timed(f"fnclass TracIn (exact, {len(along)} checkpoints)", lambda: influence.tracin_scores(along, problem))
    timed(f"fnclass TracIn (D={args.proj_dim})",
          lambda: influence.tracin_scores(along, problem, proj_dim=args.proj_dim))
    for name, runs in ((f"fnclass TRAK (1 model, D={args.proj_dim}", last_single),
                       (f"fnclass TRAK ({args.members} models, D={args.proj_dim}", along_members)):
        for damping in args.dampings:
            sweep.setdefault(name, []).append(f"{name}, damping {damping:g})")
            timed(sweep[name][-1], lambda runs=runs, damping=damping: influence.trak_scores(
                runs, problem, proj_dim=args.proj_dim, key=random.key(0), damping=damping))
    for dim in args.other_dims:
        for damping in sorted({args.dampings[0], influence.DEFAULT_TRAK_DAMPING}):
            timed(f"fnclass TRAK ({args.members} models, D={dim}, damping {damping:g})",
                  lambda dim=dim, damping=damping: influence.trak_scores(along_members, problem, proj_dim=dim,
                                                                         key=random.key(0), damping=damping))
    for name, runs in (("fnclass EK-FAC (1 model)", last_single), (f"fnclass EK-FAC ({args.members} models)",
                                                                     along_members)):
        timed(name, lambda runs=runs: influence.ekfac_scores(runs[-1], problem, key=random.key(0))[0])
    if args.metagrad_tests:
        from fnclass.training import metagrad

        k = args.metagrad_tests
        tick = time.perf_counter()
        result = metagrad.metagradients(single, list(range(k)), data_dir=str(data), device="cpu")
        seconds[f"fnclass metagrad (test images 0-{k - 1})"] = time.perf_counter() - tick
        print(f"metagrad: {seconds[f'fnclass metagrad (test images 0-{k - 1})']:.1f} s, one run "
              f"{result.train_seconds:.1f} s", flush=True)
        padded = np.full((args.test, args.train), np.nan)
        padded[:k] = result.scores.numpy()
        scores[f"fnclass metagrad (test images 0-{k - 1})"] = padded
        seconds["one run of the attributed model"] = result.train_seconds
    if args.kronfluence:
        out = work / "kronfluence-pairs.npy"
        tick = time.perf_counter()
        subprocess.run([sys.executable, "-m", "benchmarks.ekfac", "worker", "--library", "kronfluence", "--mode",
                        "pairs", "--checkpoint", str(single / "checkpoints/last.safetensors"), "--data-dir",
                        str(data), "--train", str(args.train), "--test", str(args.test), "--work", str(work),
                        "--out", str(out)], check=True)
        seconds["Kronfluence EK-FAC (1 model; convolutions + head)"] = time.perf_counter() - tick
        scores["Kronfluence EK-FAC (1 model; convolutions + head)"] = np.load(out, allow_pickle=False)
    if not args.no_dattri:
        scores.update(dattri_scores(first.config, along, along_members, train_x, train_y, test_x, test_y,
                                    args.proj_dim, seconds))
    scores["random scores"] = np.random.default_rng(args.seed).standard_normal((args.test, args.train))
    masks, outputs, accuracy, per_retrain = retrain_subsets(args, data, work, test_raw, test_y)
    single_model = retrain_weighted(args, data, work, test_raw, test_y) if args.drop_fractions else {}
    results = {}
    k = args.metagrad_tests or held
    mean_se = lambda values: (float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values))))
    for name, matrix in scores.items():
        per_test = influence.linear_datamodeling_score(np.nan_to_num(matrix), masks, outputs).numpy()
        results[name] = {"lds": float(np.mean(per_test[:held])),
                         "stderr": float(np.std(per_test[:held], ddof=1) / np.sqrt(held)),
                         "lds_tuning": float(np.mean(per_test[held:])) if args.tune else None,
                         "seconds": seconds.get(name), "first_k": {"cross-seed": mean_se(per_test[:k])}}
        for fraction, (drop_masks, drop_outputs) in single_model.items():
            per_test = influence.linear_datamodeling_score(np.nan_to_num(matrix), drop_masks, drop_outputs).numpy()
            results[name]["first_k"][f"single-model, drop {fraction:g}"] = mean_se(per_test[:k])
    chosen = ({family: max(names, key=lambda n: results[n]["lds_tuning"]) for family, names in sweep.items()}
              if args.tune else {})
    checks = {}
    if not args.no_dattri:
        from dattri.metric import lds as dattri_lds

        ground_truth = (torch.from_numpy(outputs).float(), torch.stack([torch.from_numpy(np.flatnonzero(row))
                                                                       for row in masks]))
        checks["max |LDS - dattri.metric.lds| over test images"] = max(float(np.nanmax(np.abs(
            influence.linear_datamodeling_score(matrix, masks, outputs).numpy()
            - dattri_lds(torch.from_numpy(matrix).float().T, ground_truth)[0].numpy()))) for matrix in scores.values())
        ours, theirs = scores[f"fnclass TracIn (exact, {len(along)} checkpoints)"], scores["dattri TracIn (exact)"]
        checks["fnclass TracIn against dattri TracIn: max relative error"] = float(
            np.abs(ours - theirs).max() / np.abs(theirs).max())
    full = json.loads((single / "summary.json").read_text())["test_accuracy"]
    table = [f"LDS on {args.train:,} CIFAR-10 training images and test images 0-{held - 1} ({args.test - held} more "
             f"choose TRAK's damping): {args.subsets} retrainings on random {args.alpha:.0%} subsets (one seed each, "
             f"mean test accuracy {accuracy.mean():.2%}; the full set: {full:.2%}); cpu.toml's recipe at widths "
             f"16/32/64 without whitening ({tree.num_params(first.params):,} parameters), {args.epochs} epochs; "
             f"{device_name(torch.device('cpu'))}, torch {torch.__version__}",
             f"{'method':<58}{'LDS':>8}{'± s.e.':>9}{'tuning':>8}{'seconds':>10}"]
    for name, row in results.items():
        spent = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        tuning = f"{row['lds_tuning']:.3f}" if row["lds_tuning"] is not None else "-"
        mark = " *" if name in chosen.values() else ""
        table.append(f"{name + mark:<58}{row['lds']:>8.3f}{row['stderr']:>9.3f}{tuning:>8}{spent:>10}")
    table.append("* the damping with the highest LDS on the tuning images; the damping is a multiple of the mean "
                 "diagonal of Phi^T Phi")
    table += [f"{k}: {v:.1e}" for k, v in checks.items()]
    settings = list(next(iter(results.values()))["first_k"])
    table += [f"LDS on test images 0-{k - 1} in each setting (mean ± s.e.; single-model: {args.single_subsets} "
              "retrainings of the attributed run with the fraction's examples weighted 0):",
              f"{'method':<58}" + "".join(f"{setting:>24}" for setting in settings)]
    for name, row in results.items():
        table.append(f"{name:<58}" + "".join(f"{m:>16.3f} ± {e:.3f}" for m, e in row["first_k"].values()))
    if per_retrain:
        table.append(f"one retraining: {per_retrain:.1f} s")
    publish({"train": args.train, "test": args.test, "tune": args.tune, "subsets": args.subsets,
             "alpha": args.alpha, "epochs": args.epochs, "members": args.members, "proj_dim": args.proj_dim,
             "lds": results, "chosen": chosen, "checks": checks, "subset_accuracy": float(accuracy.mean()),
             "full_accuracy": full, "seconds_per_retraining": per_retrain, "seconds": seconds,
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
    detect.add_argument("--factor-examples", type=int, help="EK-FAC's curvature from this many rows (default all)")
    detect.add_argument("--side-by-side", type=int, help="also fnclass's and Kronfluence's EK-FAC self-influence "
                        "on the first N rows (the same layers and factor rows; pip install -e '.[bench]')")
    detect.add_argument("--json")
    fast = commands.add_parser("speed", help="TracIn: fnclass against Captum's TracInCP")
    fast.add_argument("--data-dir", required=True)
    fast.add_argument("--train", type=int, default=1000)
    fast.add_argument("--test", type=int, default=10)
    fast.add_argument("--chunk-size", type=int, default=64)
    fast.add_argument("--rounds", type=int, default=3)
    fast.add_argument("--epochs", type=int, default=4, help="of the short run whose checkpoints are timed")
    fast.add_argument("--train-images", type=int, default=10_000, help="the short run's training images")
    fast.add_argument("--work", default="runs/bench-speed")
    fast.add_argument("--json")
    cut = commands.add_parser("prune", help="cpu.toml on the 70%% kept by EL2N against 70%% at random")
    cut.add_argument("--data-dir", required=True)
    cut.add_argument("--keep", type=float, default=0.7)
    cut.add_argument("--seeds", default="0-2")
    cut.add_argument("--score-epochs", type=int, default=2)
    cut.add_argument("--seed", type=int, default=0, help="the random selection's")
    cut.add_argument("--work", default="runs/bench-prune")
    cut.add_argument("--json")
    quality = commands.add_parser("lds", help="LDS of TracIn and TRAK against dattri, from retrainings on subsets")
    quality.add_argument("--data-dir", required=True)
    quality.add_argument("--train", type=int, default=2000)
    quality.add_argument("--test", type=int, default=400)
    quality.add_argument("--tune", type=int, default=200, help="the last test images, kept to choose the damping")
    quality.add_argument("--subsets", type=int, default=256)
    quality.add_argument("--alpha", type=float, default=0.5)
    quality.add_argument("--epochs", type=int, default=12)
    quality.add_argument("--members", type=int, default=8)
    quality.add_argument("--every-epochs", type=int, default=3, help="TracIn's checkpoints")
    quality.add_argument("--proj-dim", type=int, default=1024)
    quality.add_argument("--dampings", type=lambda text: [float(v) for v in text.split(",")],
                         default=[1e-6, 1e-3, 1e-2, 1e-1, 1.0], help="TRAK's, swept")
    quality.add_argument("--other-dims", type=lambda text: [int(v) for v in text.split(",") if v], default=[512, 2048],
                         help="TRAK of the members at these D too, with the first and the default damping")
    quality.add_argument("--seed", type=int, default=0, help="the subsets' and the random baseline's")
    quality.add_argument("--no-dattri", action="store_true")
    quality.add_argument("--drop-fractions", type=lambda text: [float(v) for v in text.split(",") if v],
                         default=[0.01, 0.1, 0.5], help="the single-model setting's (empty: cross-seed only)")
    quality.add_argument("--single-subsets", type=int, default=32, help="retrainings per drop fraction")
    quality.add_argument("--metagrad-tests", type=int, default=20, help="metagrad of test images 0..K-1 (0: none)")
    quality.add_argument("--kronfluence", action="store_true", help="Kronfluence's EK-FAC too (the bench extra)")
    quality.add_argument("--work", default="runs/bench-lds")
    quality.add_argument("--json")
    args = parser.parse_args()
    {"mislabel": mislabel, "speed": speed, "prune": prune, "lds": lds}[args.command](args)


if __name__ == "__main__":
    main()
