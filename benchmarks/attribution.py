"""Data attribution benchmarks (docs/attribution.md): mislabel detection on real CIFAR-10.

Run by hand from the repository root, not by pytest (``pip install -e '.[bench]'`` for Captum)::

    python -m benchmarks.attribution mislabel --data-dir ../shared/data/cifar10 [--train-limit 10000]
        [--every-epochs 3] [--work runs/bench-mislabel] [--json mislabel.json]
    python -m benchmarks.attribution speed --data-dir ../shared/data/cifar10 [--train 1000] [--json speed.json]
    python -m benchmarks.attribution prune --data-dir ../shared/data/cifar10 [--seeds 0-2] [--keep 0.7]

``mislabel``: the first ``--train-limit`` training images with 10% of their labels changed at random to another
class (``--seed``), written as a data folder; configs/cpu.toml trained on it with a checkpoint kept every
``--every-epochs`` epochs; then four rankings of the training examples, each asking which labels look wrong:
TracIn self-influence over the kept checkpoints (``fnclass influence --self``), and the final checkpoint's loss,
gradient norm (``fnclass grads``) and EL2N (``fnclass grads --score el2n``). For each ranking, the fraction of the
flipped examples found among its top 5%, 10% and 20%; chance finds 5%, 10% and 20% of them.

``speed``: TracIn of ``--test`` test images against ``--train`` training images over two checkpoints of
configs/cpu.toml's model (without its whitening stem, which the ``nn.Module`` twin lacks), as training
examples scored per second (training examples x checkpoints / seconds): fnclass exact and projected (D = 1024, all
layers) and Captum's ``TracInCP`` on the twin, exact: its default (one backward per example, all parameters)
and with ``sample_wise_grads_per_batch`` (hooks that cover Linear and Conv2d parameters only). Captum projects
only in ``TracInCPFastRandProj``, which takes the final layer's gradients alone and needs the ``annoy`` package:
not the same computation, so it is left out.
fnclass's exact scores are compared with Captum's ``TracInCP`` (max relative error) before they are timed.

``prune``: "prune by score, retrain" as two commands. EL2N is scored early in training, as Paul et al. do (here
a 2-epoch cpu.toml run of two seeds, the members' mean: ``fnclass grads --score el2n --keep-fraction``); then
cpu.toml is trained on the ``--keep`` highest-scoring training images and on as many drawn at random, with
``--seeds`` as members of one run each (``data.train_indices``), and the test accuracies are compared.
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


def speed(args) -> None:
    import tempfile

    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    from fnclass import influence, random, recipe, tree
    from fnclass.analysis import vmap_model
    from fnclass.checkpoint import save_checkpoint
    from fnclass.config import load_config
    from fnclass.data import load_split
    from fnclass.models import resolve_config
    from fnclass.step import create_train_state
    from tests.torch_reference import reference_module

    config = resolve_config(load_config("cpu", ["model.whiten=false", "optim.whiten_bias_epochs=0",
                                               "model.num_classes=10"]))
    model = recipe.create_model(config)
    optimizer = recipe.create_run_optimizer(config, model.param_labels, 10)
    train_raw, train_labels = load_split(args.data_dir, "train", limit=args.train)
    test_raw, test_labels = load_split(args.data_dir, "test", limit=args.test)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    folder = Path(tempfile.mkdtemp())
    paths = []
    for k in range(2):
        state = create_train_state(model, optimizer, random.key(k))
        paths.append(folder / f"epoch-{k + 1:04d}.safetensors")
        save_checkpoint(paths[-1], state, config=config, classes=[str(c) for c in range(10)], mean=mean, std=std,
                        input_size=(32, 32), learning_rate=0.1 * (k + 1))
    along = influence.load_along(paths)
    first = along[0].checkpoint
    train_x, test_x = first.preprocess(train_raw).contiguous(), first.preprocess(test_raw).contiguous()
    problem = influence.Problem(vmap_model(first), train_x, train_labels, test_x, test_labels,
                                args.chunk_size)
    timed = {}

    def clock(name, work):
        tick = time.perf_counter()
        result = work()
        timed[name] = len(train_x) * len(paths) / (time.perf_counter() - tick)
        return result

    exact = clock("fnclass exact", lambda: influence.tracin_scores(along, problem))
    clock("fnclass projected D=1024", lambda: influence.tracin_scores(along, problem, proj_dim=1024))
    twin = reference_module(config.model, first.params, first.state).eval()
    weights = {str(path): item for path, item in zip(paths, along)}

    def load(module, path):
        item = weights[str(path)]
        loaded = reference_module(config.model, item.checkpoint.params, item.checkpoint.state)
        module.load_state_dict(loaded.state_dict())
        module.eval()
        return item.learning_rates[0]

    dataset = TensorDataset(train_x, train_labels)
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    hooks = TracInCP(twin, dataset, [str(p) for p in paths], checkpoints_load_func=load, loss_fn=loss,
                     batch_size=args.chunk_size, sample_wise_grads_per_batch=True)
    clock("Captum TracInCP, per-sample hooks (Linear/Conv2d only)", lambda: hooks.influence((test_x, test_labels)))
    plain = TracInCP(twin, dataset, [str(p) for p in paths], checkpoints_load_func=load,
                     loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=args.chunk_size)
    theirs = clock("Captum TracInCP (exact)", lambda: plain.influence((test_x, test_labels)))
    error = float((exact - theirs).abs().max() / theirs.abs().max())
    base = timed["Captum TracInCP (exact)"]
    table = [f"TracIn speed: {len(test_x)} test x {len(train_x)} training images, 2 checkpoints, cpu.toml's model "
             f"without whitening ({tree.num_params(first.params):,} parameters), chunk {args.chunk_size}; "
             f"{device_name(torch.device('cpu'))}, torch {torch.__version__}",
             f"{'variant':<56}{'train ex./s':>12}{'x Captum TracInCP':>20}"]
    table += [f"{name:<56}{value:>12,.1f}{value / base:>19.2f}x" for name, value in timed.items()]
    table.append(f"fnclass exact against Captum TracInCP: max relative error {error:.1e}")
    publish({"train": len(train_x), "test": len(test_x), "examples_per_second": timed, "max_rel_error": error,
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
    chosen = np.sort(np.random.default_rng(args.seed).choice(n, len(kept), replace=False))
    np.savetxt(work / "random_indices.txt", chosen, fmt="%d")
    accuracy = {}
    for name, indices in (("EL2N", work / "el2n/kept_indices.txt"), ("random", work / "random_indices.txt")):
        out = work / f"train-{name.lower()}"
        seconds[f"train {name}"] = fnclass("train", "--config", "cpu", "--data-dir", args.data_dir, "--out",
                                           str(out), "--quiet", "--seeds", args.seeds, "--set",
                                           f"data.train_indices={indices.resolve()}")
        summary = json.loads((out / "summary.json").read_text())
        accuracy[name] = [member["test_accuracy"] for member in summary["members"]]
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
    fast = commands.add_parser("speed", help="TracIn: fnclass against Captum's TracInCP")
    fast.add_argument("--data-dir", required=True)
    fast.add_argument("--train", type=int, default=1000)
    fast.add_argument("--test", type=int, default=10)
    fast.add_argument("--chunk-size", type=int, default=64)
    fast.add_argument("--json")
    cut = commands.add_parser("prune", help="cpu.toml on the 70%% kept by EL2N against 70%% at random")
    cut.add_argument("--data-dir", required=True)
    cut.add_argument("--keep", type=float, default=0.7)
    cut.add_argument("--seeds", default="0-2")
    cut.add_argument("--score-epochs", type=int, default=2)
    cut.add_argument("--seed", type=int, default=0, help="the random selection's")
    cut.add_argument("--work", default="runs/bench-prune")
    cut.add_argument("--json")
    args = parser.parse_args()
    {"mislabel": mislabel, "speed": speed, "prune": prune}[args.command](args)


if __name__ == "__main__":
    main()
