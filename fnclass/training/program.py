"""The training program: ``train(config, workdir)`` — set up, one call per epoch, finish.

Everything random derives from ``train.seed`` and the step number, so a resumed run replays the same batches
and ends with the same parameters. The pieces: :mod:`fnclass.training.recipe` (what to build), :mod:`fnclass.training.step`
(the pure step), :mod:`fnclass.training.evaluate` (metrics, TTA) and :mod:`fnclass.run.directory` (every file written).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from fnclass import data, distributed, privacy
from fnclass.config import Config
from fnclass.core import random, tree
from fnclass.errors import InputError
from fnclass.io import keep_freed_memory, pick_device, synchronize
from fnclass.models import resolve_config
from fnclass.run.directory import Reporter, RunDirectory
from fnclass.training import finetune, recipe
from fnclass.training.evaluate import evaluate_dataset, split_metrics
from fnclass.training.loop import (
    EpochLoop,
    RunData,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    load_run_data,
    normalized,
    run_facts,
)
from fnclass.training.members import train_members
from fnclass.training.step import TrainState, create_train_state, make_eval_step, start_ema


def train(config: Config, workdir: str | Path, *, data_dir: str | None = None, device: str = "auto",
          download: bool = True, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train and evaluate a model as ``config`` says, writing the run directory ``workdir``.

    The run directory gets ``config.toml`` (resolved), ``metrics.jsonl``, ``summary.json``,
    ``checkpoints/last.safetensors`` and ``best.safetensors``, and ``plots/curves.png``.

    Args:
      config: the run config (its model defaults are filled in here).
      workdir: the run directory (created if needed).
      data_dir: a canonical data folder; else the config's, ``$FNCLASS_DATA`` or the cache.
      device: ``auto``, ``cpu`` or ``cuda``.
      download: allow fetching CIFAR-10/100 through torchvision when no data folder has it.
      resume: continue from the run directory's last checkpoint.
      reporter: receives progress (see :class:`fnclass.run.directory.Reporter`).

    Returns:
      ``TrainResult(train_state, summary)``.

    Raises:
      TrainingInterrupted: on Ctrl-C, after writing ``last.safetensors``.
      TrainingDiverged: when a loss or gradient is not finite and ``train.nan_policy = "stop"`` (the last good
        checkpoint stays). Non-finite values are flagged on the device at every step and looked at where the
        loop synchronises anyway: logging steps, checkpoint saves and epoch ends.
    """
    config = resolve_config(config)
    keep_freed_memory()  # a pure step allocates afresh every step: do not fault that memory in again each time
    process = distributed.from_environment(device)  # a torchrun job: data parallel, rank 0 writes and reports
    distributed.check_batch(process, config.train.batch_size)
    if config.members.active:  # K models at once: fnclass.training.members
        if process is not None:
            raise InputError("members (--seeds, --sweep) under torchrun are not supported yet: run them in one "
                             "process, or one run per process with its own --out")
        return train_members(config, workdir, data_dir=data_dir, device=device, download=download, resume=resume,
                             reporter=reporter)
    dev = distributed.device_of(process, pick_device(device))
    if process is not None:  # one download, by rank 0, before the others look for the files
        distributed.first_on_rank_zero(process, lambda: data.resolve_data_dir(data_dir or config.data.data_dir,
                                                                              config.data.dataset, download=download))
    config, ds = load_run_data(config, data_dir, download, dev)
    n_train, batch_size = len(ds.train_images), config.train.batch_size
    steps_per_epoch = n_train // batch_size  # the last partial batch is dropped: static shapes
    if steps_per_epoch * config.train.epochs < config.train.accumulate_steps:
        raise InputError(f"train.accumulate_steps = {config.train.accumulate_steps} is more than the run's "
                         f"{steps_per_epoch * config.train.epochs} batches: no optimizer step would be taken; lower "
                         "it or train longer")
    privacy_plan = None
    if config.privacy.enabled:  # DP-SGD: resolved (noise for the target epsilon) before anything is written
        if process is not None:
            raise InputError("[privacy] under torchrun is not supported yet: train a private model in one process")
        privacy_plan = privacy.plan(config.privacy, n=n_train, batch_size=batch_size,
                                    steps=steps_per_epoch * config.train.epochs)
        # The noise used is recorded in config.toml: a resumed run accounts with it, whatever the accountant does.
        config = dataclasses.replace(config, privacy=dataclasses.replace(
            config.privacy, noise_multiplier=privacy_plan.noise_multiplier))
    writes = process is None or process.writes
    run = RunDirectory(workdir, config, reporter=reporter if writes else None, writes=writes)
    model, loss_fn = recipe.create_model(config, process=process), recipe.create_loss(config)
    optimizer = recipe.create_run_optimizer(config, model.param_labels, steps_per_epoch)
    train_state = create_train_state(model, optimizer, random.key(config.train.seed), ema=bool(config.train.ema_decay),
                                     loss_scaling=config.train.precision == "fp16")
    train_state = tree.tree_to(run.restore(train_state) if resume else train_state, dev)
    start_step, clock = int(train_state.step), {"whitening": 0.0, "compile": 0.0, "train": 0.0, "final_eval": 0.0}
    init_source = None
    if config.train.init_from and not resume:  # fine-tuning: the source's weights (and fitted whitening)
        source = finetune.load_source(config.train.init_from)
        train_state, init_source = finetune.init_from(train_state, model, optimizer, source,
                                                      path=config.train.init_from,
                                                      input_size=tuple(ds.train_images.shape[1:3]))
    elif model.data_init is not None and not resume:
        tick = time.perf_counter()
        normalize = lambda images: normalized(ds, images)
        train_state = train_state._replace(state=model.data_init(train_state.state, ds.train_images, normalize))
        train_state = start_ema(train_state) if train_state.ema is not None else train_state  # the fitted state
        synchronize(dev)
        clock["whitening"] = time.perf_counter() - tick
    options = dict(compile=config.train.compile, precision=config.train.precision,
                   channels_last=config.train.channels_last)
    secret = None if privacy_plan is None else run.privacy_secret(resume=resume).to(dev)
    gradient = {} if privacy_plan is None else dict(gradient=privacy.clipped_noisy_gradient(
        privacy_plan.max_grad_norm, privacy_plan.noise_multiplier, privacy_plan.expected_batch_size,
        chunk_size=config.privacy.chunk_size, copies=privacy_plan.augmult, secret=secret))
    train_step = recipe.create_train_step(config, model, loss_fn, optimizer, process=process, **gradient)
    eval_step = make_eval_step(model, **options)
    schedule = recipe.create_batch_schedule(config, steps_per_epoch)
    epoch_loop = EpochLoop(config, ds, train_state.key, train_step, schedule, run, model, steps_per_epoch,
                           process=process, privacy_plan=privacy_plan, privacy_secret=secret)
    run.start(step=start_step, classes=ds.classes, mean=ds.mean, std=ds.std,
              input_size=tuple(ds.train_images.shape[1:3]),
              info={"device": str(dev), "data_dir": str(ds.folder), "train_images": n_train,
                    "test_images": len(ds.test_images), "steps_per_epoch": steps_per_epoch,
                    "selection_split": ds.selection_split,
                    "val_images": 0 if ds.val_images is None else len(ds.val_images),
                    "total_steps": steps_per_epoch * config.train.epochs,
                    "num_params": tree.num_params(train_state.params), "start_step": start_step,
                    "processes": process.world_size if process else 1,
                    "privacy": privacy_plan._asdict() if privacy_plan else None,
                    "init_from": init_source._asdict() if init_source else None,
                    "resumed_from": str(run.resumed_from) if resume else None, "rejected_checkpoints": run.rejected})
    try:  # the run directory's lock is released however the run ends
        if config.train.compile:
            clock["compile"] = epoch_loop.compile(train_state, dev)
        best, last_eval = run.best_accuracy(), None
        tta = (1 + config.train.tta_translate) if config.train.tta else 0
        split = ds.selection_split  # evaluated every epoch; "best" is chosen on it
        split_tta = tta if split == "test" else 0  # with a validation split, TTA is for the one test evaluation
        first_epoch, progress = epoch_loop.first_epoch(start_step), run.progress
        for epoch in range(first_epoch, config.train.epochs):
            train_state, seconds, train_metrics = epoch_loop(train_state, epoch, dev, progress)
            progress = None  # only the epoch a run resumes in started before this process
            clock["train"] += seconds
            final = epoch + 1 == config.train.epochs
            tick = time.perf_counter()
            last_eval = _evaluate(eval_step, train_state, ds, config, split, split_tta if final else 0, process)
            clock["final_eval"] = time.perf_counter() - tick  # evaluate_dataset ends with .item(): synchronised
            lr = float(schedule(train_state.step - 1))
            row = _epoch_row(train_state, epoch, train_metrics, last_eval, lr, seconds)
            if privacy_plan is not None:  # the budget spent so far, by the accountant (null: no noise, no privacy)
                row["epsilon"] = _finite(privacy.epsilon(privacy_plan, int(train_state.step)))
            mean_lr = recipe.interval_learning_rate(config, schedule, epoch + 1, int(train_state.step),
                                                    steps_per_epoch)
            run.end_epoch(row, train_state, best=best is None or row[run.selection] > best, learning_rate=mean_lr)
            best = row[run.selection] if best is None else max(best, row[run.selection])
        if last_eval is None:  # resumed a finished run: evaluate what is there
            last_eval = _evaluate(eval_step, train_state, ds, config, split, split_tta, process)
            best = max(best or 0.0, last_eval[run.selection])
        tick = time.perf_counter()
        test_eval = last_eval if split == "test" else _evaluate(eval_step, train_state, ds, config, "test", tta,
                                                                      process)
        clock["final_eval"] += time.perf_counter() - tick
        summary = _summary(config, train_state, last_eval, test_eval, split, best, clock, epoch_loop.images_seen,
                           start_step, dev, ds, run)
        if privacy_plan is not None:
            summary["privacy"] = privacy_summary(privacy_plan, int(train_state.step), run.epoch_rows())
        run.finish(summary)
    except KeyboardInterrupt:
        if epoch_loop.latest is not None:
            epoch_loop.check_finite()  # a state after a non-finite step is never saved
            train_state = epoch_loop.latest  # the state after the last finished step
        run.save(train_state, epoch_loop.progress())
        raise TrainingInterrupted(int(train_state.step), run.last) from None
    finally:
        run.close()
    distributed.finish(process)
    return TrainResult(train_state, summary)


def _evaluate(eval_step, train_state: TrainState, ds: RunData, config: Config, split: str, tta: int,
              process=None) -> dict:
    """The metrics of the ``"val"`` or ``"test"`` split under their row names (``val_accuracy``, ...), and the
    EMA weights' beside them (``ema_val_accuracy``, ...) when the run keeps an EMA."""
    images, labels = ds.split(split)
    weights = {split: (train_state.params, train_state.state)}
    if train_state.ema is not None:
        weights[f"ema_{split}"] = (train_state.ema["params"], train_state.ema["state"])
    named = {}
    for prefix, (params, state) in weights.items():
        result = evaluate_dataset(eval_step, params, state, images, labels, mean=ds.mean_t, std=ds.std_t,
                                  batch_size=config.train.eval_batch_size, tta=tta, process=process)
        named.update(split_metrics(result, prefix))
        named[prefix.replace(split, "per_class_accuracy")] = result["per_class_accuracy"]
    return named


def _epoch_row(train_state: TrainState, epoch: int, train_metrics: dict, result: dict, lr: float,
               seconds: float) -> dict:
    """The metrics.jsonl row of an epoch (its evaluation is of the split "best" is chosen on)."""
    scores = {name: value for name, value in result.items() if "per_class" not in name}
    return {"kind": "epoch", "step": int(train_state.step), "epoch": epoch + 1, "train_loss": train_metrics["loss"],
            "train_accuracy": train_metrics["accuracy"], **scores, "lr": lr,
            "seconds": seconds, "images_per_second": train_metrics["images_per_second"],
            "skipped_steps": train_metrics["skipped_steps"],
            **({"poisson_overflow": train_metrics["poisson_overflow"]} if "poisson_overflow" in train_metrics else {})}


def _finite(value: float) -> float | None:
    """``value``, or None (JSON null) when it is infinite."""
    return value if math.isfinite(value) else None


def privacy_summary(plan: privacy.Plan, steps: int, rows: list[dict]) -> dict:
    """summary.json's ``privacy``: the guarantee (epsilon, delta) and everything it was computed from."""
    recorded = {name: value for name, value in plan._asdict().items() if name != "steps"}
    return {"epsilon": _finite(privacy.epsilon(plan, steps)), "steps": steps, **recorded,
            "poisson_overflow": sum(row.get("poisson_overflow", 0) for row in rows)}


def _summary(config: Config, train_state: TrainState, result: dict, test_result: dict, split: str, best,
             clock: dict, images_seen: int, start_step: int, dev, ds: RunData, run: RunDirectory) -> dict:
    """The summary.json contents: the test split's metrics (evaluated once, at the end, with a validation split)."""
    scores = lambda named: {name: value for name, value in named.items() if "per_class" not in name}
    summary = {**scores(test_result), "selection": run.selection, f"best_{run.selection}": best,
               **(scores(result) if split == "val" else {}),
               **run_facts(config, clock=clock, images_seen=images_seen, steps=int(train_state.step),
                           start_step=start_step, dev=dev, ds=ds, run=run, seed=config.train.seed,
                           num_params=tree.num_params(train_state.params))}
    for name in ("per_class_accuracy", "ema_per_class_accuracy"):
        if name in test_result:
            summary[name] = dict(zip(ds.classes, test_result[name]))
    return summary


__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "train"]
