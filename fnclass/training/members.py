"""K models in one run: seeds, ensembles and hyperparameter sweeps as one stacked TrainState under ``vmap``.

A model here is a pure function of its parameter tree, so K members train at once: their TrainStates are
stacked on a leading axis (:func:`fnclass.core.tree.tree_stack`) and one step, vmapped, updates all of them
(:func:`fnclass.training.step.make_members_step`). Member ``i`` is exactly the single run with its seed and swept values:
the same init key, data order, augmentation and model keys. Swept values (``optim.lr``, ``optim.weight_decay``,
``train.label_smoothing``) reach each member's optimizer and loss as 0-d tensors, so the program is one.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch

from fnclass.config import SWEEPS, Config
from fnclass.core import random, tree
from fnclass.io import pick_device, save_figure, synchronize
from fnclass.run.directory import Reporter, RunDirectory
from fnclass.training import finetune, recipe
from fnclass.training.evaluate import evaluate_members, split_metrics
from fnclass.training.loop import EpochLoop, TrainingInterrupted, TrainResult, load_run_data, normalized, run_facts
from fnclass.training.step import create_train_state, make_eval_step, make_members_step, mean_gradient


def member_name(member: dict) -> str:
    """``seed 3, optim.lr 0.2``: a member's seed and swept values."""
    return ", ".join(f"{key} {value}" for key, value in member.items())


def train_members(config: Config, workdir: str | Path, *, data_dir: str | None = None, device: str = "auto",
                  download: bool = True, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train ``config.member_list()`` at once; :func:`fnclass.training.program.train` calls this when members are set.

    Writes the run directory as a single run does, with stacked checkpoints (every leaf ``(K, ...)``, the
    members in the metadata), a ``member_epoch`` line per member per epoch in metrics.jsonl, epoch rows whose
    ``test_accuracy`` is the ensemble's (the mean of the members' logits) with the members' mean, std, min and
    max, ``plots/members.png`` and a summary holding every member.
    """
    members = config.member_list()
    dev = pick_device(device)
    config, ds = load_run_data(config, data_dir, download, dev)
    run = RunDirectory(workdir, config, reporter=reporter)
    n_train, epochs = len(ds.train_images), config.train.epochs
    steps_per_epoch = n_train // config.train.batch_size
    model = recipe.create_model(config)
    swept = [key for key in members[0] if key != "seed"]
    hyper_values = {key: torch.tensor([m[key] for m in members], dtype=torch.float32) for key in swept}

    def optimizer_for(hyper):
        return recipe.create_run_optimizer(config, model.param_labels, steps_per_epoch, hyper)

    first = {key: values[0] for key, values in hyper_values.items()}  # the optimizer state's structure is one
    states = [create_train_state(model, optimizer_for(first), random.key(m["seed"]),
                                 loss_scaling=config.train.precision == "fp16") for m in members]
    clock = {"whitening": 0.0, "compile": 0.0, "train": 0.0, "final_eval": 0.0}
    init_source = None
    if config.train.init_from and not resume:  # every member starts from the same weights, heads from its own key
        source = finetune.load_source(config.train.init_from)
        starts = [finetune.init_from(s, model, optimizer_for(first), source, path=config.train.init_from,
                                     input_size=tuple(ds.train_images.shape[1:3])) for s in states]
        states, init_source = [s for s, _ in starts], starts[0][1]
    elif model.data_init is not None and not resume:
        tick = time.perf_counter()
        normalize = lambda images: normalized(ds, images)
        states = [s._replace(state=model.data_init(s.state, ds.train_images, normalize)) for s in states]
        synchronize(dev)
        clock["whitening"] = time.perf_counter() - tick
    train_state = tree.tree_stack(states)
    train_state = tree.tree_to(run.restore(train_state) if resume else train_state, dev)
    start_step = int(train_state.step[0])
    options = dict(precision=config.train.precision, channels_last=config.train.channels_last)
    strategy = config.members.strategy
    if strategy == "auto":
        strategy = "vmap" if dev.type == "cuda" else "loop"
    vmapped = strategy == "vmap"

    def build_step(hyper):
        # Under vmap: torch.func's gradient, and no memory-format requests (vmap refuses them). In a loop: the
        # single run's own step (eager gradient, channels-last), compiled per member when asked.
        return recipe.create_train_step(config, model, recipe.create_loss(config, hyper), optimizer_for(hyper),
                                        gradient=functools.partial(mean_gradient, transformable=vmapped),
                                        channels_last=config.train.channels_last and not vmapped,
                                        compile=config.train.compile and not vmapped)

    train_step = make_members_step(build_step, compile=config.train.compile and vmapped,
                                   chunk_size=config.members.per_pass or None, strategy=strategy)
    eval_step = make_eval_step(model, compile=config.train.compile, **options)
    schedule = recipe.create_batch_schedule(config, steps_per_epoch)
    lr_scales = [m.get("optim.lr", config.optim.lr) / config.optim.lr for m in members]
    loop = EpochLoop(config, ds, train_state.key, train_step, schedule, run, model, steps_per_epoch,
                     hyper={k: v.to(dev) for k, v in hyper_values.items()},
                     member_names=[member_name(m) for m in members], lr_scales=lr_scales)
    run.start(step=start_step, classes=ds.classes, mean=ds.mean, std=ds.std,
              input_size=tuple(ds.train_images.shape[1:3]), members=members,
              info={"device": str(dev), "data_dir": str(ds.folder), "train_images": n_train,
                    "test_images": len(ds.test_images), "steps_per_epoch": steps_per_epoch,
                    "selection_split": ds.selection_split,
                    "val_images": 0 if ds.val_images is None else len(ds.val_images),
                    "total_steps": steps_per_epoch * epochs, "members": members,
                    "num_params": tree.num_params(train_state.params) // len(members), "start_step": start_step,
                    "init_from": init_source._asdict() if init_source else None,
                    "resumed_from": str(run.resumed_from) if resume else None, "rejected_checkpoints": run.rejected})
    try:
        if config.train.compile:
            clock["compile"] = loop.compile(train_state, dev)
        best, result = run.best_accuracy(), None
        tta = (1 + config.train.tta_translate) if config.train.tta else 0
        split = ds.selection_split  # evaluated every epoch; "best" is chosen on it
        split_tta = tta if split == "test" else 0  # with a validation split, TTA is for the one test evaluation
        first_epoch, progress = loop.first_epoch(start_step), run.progress
        for epoch in range(first_epoch, epochs):
            train_state, seconds, train_metrics = loop(train_state, epoch, dev, progress)
            progress = None
            clock["train"] += seconds
            tick = time.perf_counter()
            result = _evaluate(eval_step, train_state, ds, config, split, split_tta if epoch + 1 == epochs else 0)
            clock["final_eval"] = time.perf_counter() - tick
            lr = float(schedule(train_state.step[0] - 1))
            for row in _member_rows(members, epoch, train_state, train_metrics, result, split, lr, lr_scales):
                run.log(row)
            row = _epoch_row(members, epoch, train_state, train_metrics, result, split, lr, seconds)
            mean_lr = recipe.interval_learning_rate(config, schedule, epoch + 1, int(train_state.step[0]),
                                                    steps_per_epoch)
            run.end_epoch(row, train_state, best=best is None or row[run.selection] > best,
                          learning_rate=[mean_lr * scale for scale in lr_scales])
            best = row[run.selection] if best is None else max(best, row[run.selection])
        if result is None:  # resumed a finished run: evaluate what is there
            result = _evaluate(eval_step, train_state, ds, config, split, split_tta)
            best = max(best or 0.0, result["ensemble"]["accuracy"])
        tick = time.perf_counter()
        test_result = result if split == "test" else _evaluate(eval_step, train_state, ds, config, "test", tta)
        clock["final_eval"] += time.perf_counter() - tick
        summary = _summary(config, members, train_state, result, test_result, split, best, clock, loop.images_seen,
                           start_step, dev, ds, run)
        _plot_members(run, members)
        run.finish(summary)
    except KeyboardInterrupt:
        if loop.latest is not None:
            loop.check_finite()
            train_state = loop.latest
        run.save(train_state, loop.progress())
        raise TrainingInterrupted(int(train_state.step[0]), run.last) from None
    finally:
        run.close()
    return TrainResult(train_state, summary)


def _evaluate(eval_step, train_state, ds, config: Config, split: str, tta: int) -> dict:
    """Each member's metrics of the ``"val"`` or ``"test"`` split, and the ensemble's (the mean of their logits)."""
    models = list(zip(tree.tree_unstack(train_state.params), tree.tree_unstack(train_state.state)))
    images, labels = ds.split(split)
    result = evaluate_members(eval_step, models, images, labels, mean=ds.mean_t, std=ds.std_t,
                              batch_size=config.train.eval_batch_size, tta=tta)
    if result["ensemble"] is None:  # one member: its own logits are the ensemble's
        result["ensemble"] = result["members"][0]
    return result


def _member_rows(members, epoch: int, train_state, train_metrics: dict, result: dict, split: str, lr: float,
                 lr_scales: list[float]) -> list[dict]:
    """The ``member_epoch`` lines of metrics.jsonl: one per member, as a single run's epoch row."""
    rows = []
    for i, (member, metrics) in enumerate(zip(members, result["members"])):
        rows.append({"kind": "member_epoch", "member": i, "step": int(train_state.step[i]), "epoch": epoch + 1,
                     **{k: v for k, v in member.items()}, "train_loss": train_metrics["loss"][i],
                     "train_accuracy": train_metrics["accuracy"][i], **split_metrics(metrics, split),
                     "lr": lr * lr_scales[i], "skipped_steps": train_metrics["skipped_steps"][i]})
    return rows


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _groups(members: list[dict], accuracies: list[float]) -> list[dict]:
    """Accuracy spread over the seeds of each swept setting (a sweep's table groups by these)."""
    settings: dict[tuple, list[float]] = {}
    for member, accuracy in zip(members, accuracies):
        settings.setdefault(tuple((k, v) for k, v in member.items() if k != "seed"), []).append(accuracy)
    return [{"hyperparameters": dict(key), "members": len(values), **spread(values)}
            for key, values in settings.items()]


def _epoch_row(members, epoch: int, train_state, train_metrics: dict, result: dict, split: str, lr: float,
               seconds: float) -> dict:
    """The epoch row: the ensemble's metrics of ``split``, the members' spread, their mean train metrics."""
    accuracies = [m["accuracy"] for m in result["members"]]
    ensemble = result["ensemble"]
    row = {"kind": "epoch", "step": int(train_state.step[0]), "epoch": epoch + 1,
           "train_loss": statistics.fmean(train_metrics["loss"]),
           "train_accuracy": statistics.fmean(train_metrics["accuracy"]), **split_metrics(ensemble, split),
           "lr": lr, "seconds": seconds, "images_per_second": train_metrics["images_per_second"],
           "skipped_steps": sum(train_metrics["skipped_steps"]), "members": len(members),
           **{f"{split}_accuracy_{k}": v for k, v in spread(accuracies).items()}}
    if any(k != "seed" for k in members[0]):
        row["groups"] = _groups(members, accuracies)
    if "tta_accuracy" in ensemble:
        row.update({f"{split}_accuracy_tta_{k}": v for k, v in
                    spread([m["tta_accuracy"] for m in result["members"]]).items()})
    return row


def _summary(config: Config, members, train_state, result: dict, test_result: dict, split: str, best, clock: dict,
             images_seen: int, start_step: int, dev, ds, run: RunDirectory) -> dict:
    """summary.json: every member, their spread, the ensemble (whose numbers fill the single-run keys).

    The test numbers come from ``test_result`` (evaluated once, at the end, when a validation split was held out).
    """
    ensemble = test_result["ensemble"]
    per_member = []
    for i, (member, metrics) in enumerate(zip(members, test_result["members"])):
        entry = {"member": i, "seed": member["seed"],
                 "hyperparameters": {k: v for k, v in member.items() if k != "seed"},
                 **split_metrics(metrics, "test")}
        if split == "val":
            entry.update(split_metrics(result["members"][i], "val"))
        per_member.append(entry)
    accuracies = [m["test_accuracy"] for m in per_member]
    summary = {
        **split_metrics(ensemble, "test"), "selection": run.selection, f"best_{run.selection}": best,
        **(split_metrics(result["ensemble"], "val") if split == "val" else {}),
        "ensemble_test_accuracy": ensemble["accuracy"], "members": per_member,
        **{f"test_accuracy_{k}": v for k, v in spread(accuracies).items()},
        **run_facts(config, clock=clock, images_seen=images_seen, steps=int(train_state.step[0]),
                    start_step=start_step, dev=dev, ds=ds, run=run, seed=[m["seed"] for m in members],
                    num_params=tree.num_params(train_state.params) // len(members)),
        "per_class_accuracy": dict(zip(ds.classes, ensemble["per_class_accuracy"])),
    }
    if any(k != "seed" for k in members[0]):
        summary["groups"] = _groups(members, accuracies)
    if "tta_accuracy" in ensemble:
        summary["ensemble_test_accuracy_tta"] = ensemble["tta_accuracy"]
        summary.update({f"test_accuracy_tta_{k}": v for k, v in
                        spread([m["test_accuracy_tta"] for m in per_member]).items()})
    return summary


def _plot_members(run: RunDirectory, members: list[dict]) -> None:
    """plots/members.png: each member's test accuracy per epoch, and the ensemble's."""
    if not run.writes:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, key = run.member_rows(), run.selection
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, member in enumerate(members):
        mine = [r for r in rows if r["member"] == i]
        ax.plot([r["epoch"] for r in mine], [r[key] for r in mine], alpha=0.6, linewidth=1,
                label=member_name(member) if len(members) <= 10 else None)
    epochs = run.epoch_rows()
    ax.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], color="black", linewidth=2,
            label="ensemble (mean logits)")
    ax.set(xlabel="epoch", ylabel=key.replace("_", " "), title=f"{len(members)} members")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, run.path / "plots" / "members.png")


__all__ = ["SWEEPS", "member_name", "spread", "train_members"]
