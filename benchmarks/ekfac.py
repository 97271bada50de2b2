"""EK-FAC influence side by side: fnclass (``fnclass.analysis.ekfac``, a functional tap) against Kronfluence 1.0.1
(module wrappers) on the same trained weights, through the ``nn.Module`` twin (tests/torch_reference.py).

Run by hand from the repository root (``pip install -e '.[bench]'`` for Kronfluence)::

    python -m benchmarks.ekfac compare --checkpoint RUN/checkpoints/last.safetensors --data-dir DATA
        [--train 2000] [--test 50] [--rounds 3] [--damping 0.1] [--work runs/bench-ekfac] [--json ekfac.json]
    python -m benchmarks.ekfac self --checkpoint ... --data-dir DATA --library fnclass|kronfluence --out S.npy
        [--train N]

``compare``: pairwise scores (the first ``--test`` test images against the first ``--train`` training rows the
checkpoint's run trained on) and self-influence of those rows, by each library in its own process, ``--rounds``
rounds in alternating order; the seconds (factors and scores together) and the peak resident memory
(``VmHWM`` of the worker process) of each, the median and range of the per-round time ratios, and the agreement of
the scores: Pearson over all pairs, the mean over test images of the Spearman correlation over training images, and
the Spearman correlation of the self-influence. Both cover the same layers: every convolution whose weight is
trained and the head (Kronfluence tracks ``nn.Conv2d`` and ``nn.Linear`` modules; the twin's attention is an
``nn.MultiheadAttention``, whose projections it cannot wrap, so both leave attention out here). Both use the true
Fisher (labels drawn from the model; each library draws its own), the margin as the test output, the plain
cross-entropy on the training side, and damping ``--damping`` x each layer's mean corrected eigenvalue
(Kronfluence's ``damping_factor=None`` heuristic is 0.1). Kronfluence's measurement is minus the margin, so its
scores are fnclass's times the number of training examples (same sign: positive for proponents).

``self``: one library's self-influence of the rows (all of them by default), written as .npy (used by
``benchmarks.attribution mislabel`` for Kronfluence's ranking).

``--factor-examples N`` (every command): both libraries fit their factors on the same N rows drawn at random
(numpy seed 0); the scores cover every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import device_name, publish


def _peak_mib() -> float:
    """This process's peak resident memory (VmHWM, which an exec resets, unlike ru_maxrss), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _problem(checkpoint: Path, data_dir: Path, n_train: int | None, n_test: int):
    """The checkpoint, its model (attention on the math path), the run's training rows (the first ``n_train``) and
    the first ``n_test`` test images, preprocessed."""
    from fnclass import data
    from fnclass.analysis.gradients import vmap_model
    from fnclass.analysis.influence import training_rows
    from fnclass.run.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint, weights="raw")
    images, labels = data.load_split(data_dir, "train")
    rows = training_rows(ckpt, labels, n_train)
    test_images, test_labels = data.load_split(data_dir, "test")
    return (ckpt, vmap_model(ckpt), ckpt.preprocess(images[rows]), labels[rows],
            ckpt.preprocess(test_images[:n_test]), test_labels[:n_test])


def _covered(params) -> list[str]:
    """The weight paths both libraries cover: the trained convolutions and the head (not attention)."""
    from fnclass.core import tree

    return [path for path in tree.flatten_paths(params)
            if path.endswith(".weight") and (".conv" in path or path == "head.weight")]


def run_fnclass(ckpt, model, train_x, train_y, test_x, test_y, damping: float, mode: str, chunk: int, fit_rows):
    from fnclass.analysis import ekfac
    from fnclass.core import random

    factors = ekfac.fit(model, ckpt.params, ckpt.state, train_x[fit_rows], key=random.key(0), damping=damping,
                        chunk_size=chunk, only=_covered(ckpt.params), train_size=len(train_x))
    if mode == "self":
        return ekfac.self_influence(factors, model, ckpt.params, ckpt.state, train_x, train_y, chunk_size=chunk)
    return ekfac.scores(factors, model, ckpt.params, ckpt.state, train_x, train_y, test_x, test_y, chunk_size=chunk)


def run_kronfluence(ckpt, train_x, train_y, test_x, test_y, damping: float, mode: str, chunk: int, fit_rows,
                    work: Path):
    import logging

    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    from fnclass.core.losses import margin
    from tests.torch_reference import reference_module

    if damping != 0.1:  # checked before any work: Kronfluence takes other dampings as absolute values
        raise SystemExit("Kronfluence's per-layer heuristic damping is 0.1 x the mean eigenvalue; use --damping 0.1")
    module = reference_module(ckpt.config.model, ckpt.params, ckpt.state).eval()
    tracked = [path.removesuffix(".weight") for path in _covered(ckpt.params)]

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            images, labels = batch
            logits = model(images)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(logits.detach().softmax(-1), 1)[:, 0]
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            images, labels = batch
            return -margin(model(images), labels).sum()

        def get_influence_tracked_modules(self):
            return tracked

    task = Classification()
    module = prepare_model(module, task)
    analyzer = Analyzer("bench", module, task, cpu=True, disable_tqdm=True, output_dir=str(work),
                        log_level=logging.WARNING)
    analyzer.fit_all_factors("ekfac", TensorDataset(train_x[fit_rows], train_y[fit_rows]), per_device_batch_size=chunk,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    arguments = ScoreArguments(damping_factor=None)  # its heuristic: 0.1 x each layer's mean eigenvalue
    if mode == "self":
        analyzer.compute_self_scores("self", "ekfac", TensorDataset(train_x, train_y),
                                     per_device_train_batch_size=chunk, score_args=arguments, overwrite_output_dir=True)
        return analyzer.load_self_scores("self")["all_modules"] / len(train_x)
    analyzer.compute_pairwise_scores("pairs", "ekfac", TensorDataset(test_x, test_y), TensorDataset(train_x, train_y),
                                     per_device_query_batch_size=len(test_x), per_device_train_batch_size=chunk,
                                     score_args=arguments, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("pairs")["all_modules"] / len(train_x)


def worker(args) -> None:
    """One library, one mode, in this process: the scores to ``--out`` (.npy), then JSON (seconds, peak MiB)."""
    torch.manual_seed(0)  # Kronfluence draws its Fisher labels from torch's global generator
    problem = _problem(Path(args.checkpoint), Path(args.data_dir), args.train, args.test)
    ckpt, model, *tensors = problem
    n = len(tensors[0])
    fit_rows = torch.arange(n)
    if args.factor_examples and args.factor_examples < n:  # the same sample for both libraries
        fit_rows = torch.from_numpy(np.sort(np.random.default_rng(0).choice(n, args.factor_examples, replace=False)))
    tick = time.perf_counter()
    if args.library == "fnclass":
        scores = run_fnclass(ckpt, model, *tensors, args.damping, args.mode, args.chunk_size, fit_rows)
    else:
        scores = run_kronfluence(ckpt, *tensors, args.damping, args.mode, args.chunk_size, fit_rows,
                                 Path(args.work) / f"kronfluence-{args.mode}")
    seconds = time.perf_counter() - tick
    np.save(args.out, scores.float().numpy(), allow_pickle=False)
    print(json.dumps({"seconds": seconds, "peak_mib": _peak_mib()}))


def _spawn(args, library: str, mode: str, out: Path) -> dict:
    command = [sys.executable, "-m", "benchmarks.ekfac", "worker", "--library", library, "--mode", mode,
               "--checkpoint", args.checkpoint, "--data-dir", args.data_dir, "--train", str(args.train), "--test",
               str(args.test), "--damping", str(args.damping), "--chunk-size", str(args.chunk_size), "--work",
               args.work, "--out", str(out)] + (["--factor-examples", str(args.factor_examples)]
                                                if args.factor_examples else [])
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args) -> None:
    from scipy.stats import pearsonr, spearmanr

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = {(lib, mode): [] for lib in ("fnclass", "kronfluence") for mode in ("pairs", "self")}
    for r in range(args.rounds):
        order = ("fnclass", "kronfluence") if r % 2 == 0 else ("kronfluence", "fnclass")
        for mode in ("pairs", "self"):
            for library in order:
                runs[(library, mode)].append(_spawn(args, library, mode, work / f"{library}-{mode}.npy"))
    scores = {key: np.load(work / f"{key[0]}-{key[1]}.npy", allow_pickle=False) for key in runs}
    ours, theirs = scores[("fnclass", "pairs")], scores[("kronfluence", "pairs")]
    agreement = {
        "pairs_pearson": float(pearsonr(ours.ravel(), theirs.ravel()).statistic),
        "pairs_spearman_per_test": float(np.mean([spearmanr(a, b).statistic for a, b in zip(ours, theirs)])),
        "self_spearman": float(spearmanr(scores[("fnclass", "self")], scores[("kronfluence", "self")]).statistic),
        "pairs_scale_ratio": float(np.median(np.abs(theirs)) / np.median(np.abs(ours))),
    }
    summary = {}
    for mode in ("pairs", "self"):
        ratios = [k["seconds"] / f["seconds"] for f, k in zip(runs[("fnclass", mode)], runs[("kronfluence", mode)])]
        summary[mode] = {"fnclass_seconds": statistics.median(r["seconds"] for r in runs[("fnclass", mode)]),
                         "kronfluence_seconds": statistics.median(r["seconds"] for r in runs[("kronfluence", mode)]),
                         "speedup_median": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)],
                         "fnclass_peak_mib": max(r["peak_mib"] for r in runs[("fnclass", mode)]),
                         "kronfluence_peak_mib": max(r["peak_mib"] for r in runs[("kronfluence", mode)])}
    table = [f"EK-FAC: fnclass against Kronfluence 1.0.1, {args.train:,} training rows, {args.test} test images, "
             f"damping {args.damping} x mean eigenvalue, {args.rounds} rounds alternating; "
             f"{device_name(torch.device('cpu'))}, torch {torch.__version__}",
             f"{'':<8}{'fnclass s':>11}{'Kronfl. s':>11}{'Kronfl./fnclass (median, range)':>34}"
             f"{'fnclass MiB':>13}{'Kronfl. MiB':>13}"]
    for mode, row in summary.items():
        table.append(f"{mode:<8}{row['fnclass_seconds']:>11.1f}{row['kronfluence_seconds']:>11.1f}"
                     f"{row['speedup_median']:>14.2f}x [{row['speedup_range'][0]:.2f}, {row['speedup_range'][1]:.2f}]"
                     f"{'':>6}{row['fnclass_peak_mib']:>13.0f}{row['kronfluence_peak_mib']:>13.0f}")
    table.append("agreement: " + ", ".join(f"{k} {v:.3f}" for k, v in agreement.items()))
    publish({"train": args.train, "test": args.test, "damping": args.damping, "rounds": args.rounds,
             "timings": summary, "agreement": agreement, "runs": {f"{k[0]}-{k[1]}": v for k, v in runs.items()},
             "device": device_name(torch.device("cpu")), "torch": torch.__version__}, "\n".join(table), args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("compare", "worker", "self"):
        sub = commands.add_parser(name)
        sub.add_argument("--checkpoint", required=True)
        sub.add_argument("--data-dir", required=True)
        sub.add_argument("--train", type=int, default=2000 if name != "self" else None)
        sub.add_argument("--test", type=int, default=50)
        sub.add_argument("--damping", type=float, default=0.1)
        sub.add_argument("--chunk-size", type=int, default=100)
        sub.add_argument("--work", default="runs/bench-ekfac")
        sub.add_argument("--factor-examples", type=int, help="fit the factors on this many rows drawn at random "
                         "(numpy seed 0; the same rows for both libraries)")
        if name == "compare":
            sub.add_argument("--rounds", type=int, default=3)
            sub.add_argument("--json")
        else:
            sub.add_argument("--library", choices=["fnclass", "kronfluence"], required=True)
            sub.add_argument("--out", required=True)
            if name == "worker":
                sub.add_argument("--mode", choices=["pairs", "self"], required=True)
    args = parser.parse_args()
    if args.command == "self":
        args.mode = "self"
        worker(args)
    else:
        {"compare": compare, "worker": worker}[args.command](args)


if __name__ == "__main__":
    main()
