"""The training program: ``train(config, workdir)`` — set up the run, build its pieces, run the epochs, finish.

One program for one model and for K members (``--seeds``, ``--sweep``): a single run is the one member
``{"seed": train.seed}`` with an unstacked TrainState; members stack theirs on a leading axis and step together
(``vmap`` or a loop over the same step), each with the batches and keys of the single run with its seed. What a run
is made of comes from :mod:`fnclass.training.recipe` (model, optimizer, the step with its wrappers), the batch
sources (:mod:`fnclass.data.sources`, :mod:`fnclass.privacy.sources`, :mod:`fnclass.distributed.sources`), the
hooks (:mod:`fnclass.training.hooks`) and the run directory (:mod:`fnclass.run.directory`, every file written).
Everything random derives from the members' seeds (and, under ``[privacy]``, the run's secret) and the step number,
so a resumed run replays the same batches and ends with the same parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fnclass import data, distributed, privacy
from fnclass.config import Config
from fnclass.core import random, tree
from fnclass.data.batches import RunData, load_run_data, normalized
from fnclass.data.sources import PermutedSource, Stacked
from fnclass.distributed.members import MemberBlocks, member_blocks
from fnclass.distributed.sources import Sharded
from fnclass.errors import InputError
from fnclass.io import keep_freed_memory, pick_device, resolve_precision, synchronize
from fnclass.models import resolve_config
from fnclass.privacy.sources import PoissonSource
from fnclass.run import inputs
from fnclass.run.checkpoint import copy_checkpoint, read_file, set_temperature
from fnclass.run.directory import PlainReporter, Reporter, RunDirectory
from fnclass.training import calibration, finetune, members, recipe
from fnclass.training.evaluate import evaluate_members, split_logits, split_metrics
from fnclass.training.hooks import FiniteCheck, GradStats, StepCheckpoint, StepLog, TrainingDiverged, diverged
from fnclass.training.loop import EpochLoop, step_of
from fnclass.training.step import (
    TrainState,
    create_train_state,
    make_eval_step,
    make_members_step,
    mean_gradient,
    start_ema,
)


class TrainingInterrupted(Exception):
    """Training was stopped with Ctrl-C; ``last.safetensors`` holds the state at ``step`` (None: members spread over
    a torchrun job, which save nothing then; the last epoch end's or step checkpoint stays)."""

    def __init__(self, step: int | None, checkpoint: Path):
        super().__init__(f"interrupted at step {step}; saved {checkpoint}" if step is not None else
                         f"interrupted; {checkpoint} (if written) holds the last epoch end's or step checkpoint")
        self.step, self.checkpoint = step, checkpoint


class TrainResult(NamedTuple):
    """What :func:`train` returns: the final TrainState and the summary (also in ``summary.json``)."""

    train_state: TrainState
    summary: dict


class Setup(NamedTuple):
    """A run before anything is built: its resolved config, data, device, job, members and privacy plan."""

    config: Config
    ds: RunData
    dev: torch.device
    process: Any  # a torchrun job's distributed.Process (data parallel, or members spread over it), or None
    members: list[dict]  # {"seed": ..., swept key: value}; one for a single run
    stacked: bool  # members' TrainStates stacked on a leading axis (--seeds / --sweep)
    blocks: MemberBlocks  # the members this process trains: all, or its block of a job's
    steps_per_epoch: int
    privacy_plan: privacy.Plan | None
    run: RunDirectory
    resume: bool
    inputs: dict  # the input files' record (fnclass.run.inputs): inputs.json and summary.json
    precision_reason: str = ""  # why config.train.precision (resolved from "auto") is what it is


class Program(NamedTuple):
    """What :func:`build_program` makes of a :class:`Setup`."""

    train_state: TrainState  # this process's members: all, or its block of a job's
    loop: EpochLoop
    eval_step: Any
    schedule: Any
    lr_scales: list[float]
    init_source: Any
    clock: dict


def train(config: Config, workdir: str | Path, *, data_dir: str | None = None, device: str = "auto",
          download: bool = True, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train and evaluate a model (or K members) as ``config`` says, writing the run directory ``workdir``.

    The run directory gets ``config.toml`` (resolved), ``metrics.jsonl``, ``summary.json``,
    ``checkpoints/last.safetensors`` and ``best.safetensors``, and ``plots/curves.png``; with members, stacked
    checkpoints (every leaf ``(K, ...)``, the members in the metadata), a ``member_epoch`` line per member per
    epoch, epoch rows whose metrics are the ensemble's (the mean of the members' logits) with the members' spread,
    ``plots/members.png`` and a summary holding every member.

    Args:
      config: the run config (its model defaults are filled in here).
      workdir: the run directory (created if needed).
      data_dir: a canonical data folder; else the config's, ``$FNCLASS_DATA`` or the cache.
      device: ``auto``, ``cpu`` or ``cuda``.
      download: allow fetching CIFAR-10/100 through torchvision when no data folder has it.
      resume: continue from the run directory's last checkpoint.
      reporter: receives progress (:class:`fnclass.run.directory.Reporter`); default a
        :class:`~fnclass.run.directory.PlainReporter`, plain lines on standard error (the start, a step line every
        30 s, each epoch, the result); ``Reporter()`` is silent.

    Returns:
      ``TrainResult(train_state, summary)``.

    Raises:
      InputChanged: on resume, when an input file (data folder, selection, weights, fine-tuning source) is missing
        or its bytes differ from those recorded in ``inputs.json`` when the run started; nothing is written.
      TrainingInterrupted: on Ctrl-C, after writing ``last.safetensors``.
      TrainingDiverged: when a loss or gradient is not finite and ``train.nan_policy = "stop"`` (the last good
        checkpoint stays). Non-finite values are flagged on the device at every step and looked at where the
        loop synchronises anyway: logging steps, checkpoint saves and epoch ends.
    """
    setup = set_up_run(config, workdir, data_dir=data_dir, device=device, download=download, resume=resume,
                       reporter=PlainReporter() if reporter is None else reporter)
    program = build_program(setup)
    try:  # the run directory's lock is released however the run ends
        train_state, summary = run_epochs(setup, program)
    except KeyboardInterrupt:
        train_state = interrupted(setup, program)
        raise TrainingInterrupted(None if train_state is None else step_of(train_state), setup.run.last) from None
    finally:
        setup.run.close()
    distributed.finish(setup.process)
    return TrainResult(train_state, summary)


def set_up_run(config: Config, workdir, *, data_dir, device: str, download: bool, resume: bool,
               reporter) -> Setup:
    """Resolve the config, join a torchrun job, load the data, plan the privacy budget, open the run directory."""
    config = resolve_config(config)
    keep_freed_memory()  # a pure step allocates afresh every step: do not fault that memory in again each time
    process = distributed.from_environment(device)  # a torchrun job: data parallel, rank 0 writes and reports
    # Members are spread whole over a job's processes (no batch is shared): a block of them each.
    blocks = member_blocks(len(config.member_list()), process if config.members.active else None)
    if not config.members.active:
        distributed.check_batch(process, config.train.batch_size)
    dev = distributed.device_of(process, pick_device(device))
    # "auto" resolved once, recorded as resolved in config.toml: a resumed run keeps the choice.
    precision, precision_reason = resolve_precision(config.train.precision, dev)
    if resume:
        precision_reason = "the run's recorded choice (config.toml)"
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision=precision))
    if process is not None:  # one download, by rank 0, before the others look for the files
        distributed.first_on_rank_zero(process, lambda: data.resolve_data_dir(data_dir or config.data.data_dir,
                                                                              config.data.dataset, download=download))
    folder = data.resolve_data_dir(data_dir or config.data.data_dir, config.data.dataset, download=download)
    recorded = run_inputs(config, workdir, folder, resume)  # a resume refuses changed inputs, before any write
    config, ds = load_run_data(config, folder, download, dev)
    steps_per_epoch = len(ds.train_images) // config.train.batch_size  # the last partial batch is dropped
    if steps_per_epoch * config.train.epochs < config.train.accumulate_steps:
        raise InputError(f"train.accumulate_steps = {config.train.accumulate_steps} is more than the run's "
                         f"{steps_per_epoch * config.train.epochs} batches: no optimizer step would be taken; lower "
                         "it or train longer")
    plan = None
    if config.privacy.enabled:  # DP-SGD: resolved (noise for the target epsilon) before anything is written
        plan = privacy.plan(config.privacy, n=len(ds.train_images), batch_size=config.train.batch_size,
                            steps=steps_per_epoch * config.train.epochs)
        # The noise used is recorded in config.toml: a resumed run accounts with it, whatever the accountant does.
        config = dataclasses.replace(config, privacy=dataclasses.replace(
            config.privacy, noise_multiplier=plan.noise_multiplier))
    writes = process is None or process.writes
    run = RunDirectory(workdir, config, reporter=reporter if writes else None, writes=writes)
    return Setup(config, ds, dev, process, config.member_list(), config.members.active, blocks, steps_per_epoch, plan,
                 run, resume, recorded, precision_reason)


def run_inputs(config: Config, workdir, folder, resume: bool) -> dict:
    """The record of the run's input files: checked against the files now on resume (:class:`InputChanged`
    when one changed), else made now (a new run, or one started before fnclass recorded its inputs)."""
    record = inputs.read_inputs(workdir) if resume else None
    if record is None:
        return {**inputs.fingerprint_inputs(config, folder), "recorded_on_resume": resume}
    inputs.check_inputs(record, config, folder)
    return record


def build_program(setup: Setup) -> Program:
    """The members' initial (or restored) TrainState, the step with its wrappers, the batch source, the hooks.

    Members spread over a torchrun job: this process's block of them (its members' states, swept values, keys and
    steps); the loop gathers every member where the run needs them."""
    config, ds, dev, run = setup.config, setup.ds, setup.dev, setup.run
    model = recipe.create_model(config, process=_data_parallel(setup))
    hyper = members.swept_values([setup.members[i] for i in setup.blocks.block])
    optimizer_for = functools.partial(recipe.create_run_optimizer, config, model.param_labels, setup.steps_per_epoch)
    train_state, init_source, whitening = initial_state(setup, model, optimizer_for(members.first(hyper)))
    secret = None if setup.privacy_plan is None else run.privacy_secret(resume=setup.resume).to(dev)
    if secret is not None and setup.process is not None:  # rank 0's: every process draws the same samples and noise
        secret = distributed.broadcast(secret, setup.process)
    train_step = _train_step(setup, model, optimizer_for, hyper, secret)
    keys = list(train_state.key) if setup.stacked else [train_state.key]
    sources = [_source(setup, key, secret) for key in keys]
    source = Stacked(sources) if setup.stacked else sources[0]
    source = source if _data_parallel(setup) is None else Sharded(source, setup.process)
    schedule = recipe.create_batch_schedule(config, setup.steps_per_epoch)
    lr_scales = [m.get("optim.lr", config.optim.lr) / config.optim.lr for m in setup.members]
    hooks = [StepLog(config, run, schedule, lr_scales, setup.stacked)]
    if config.train.grad_stats_every:
        hooks.append(GradStats(config, ds, model, run, setup.stacked))
    hooks.append(StepCheckpoint(run, config.checkpoint.every_steps))
    finite = FiniteCheck(config, setup.steps_per_epoch, run.last, [members.member_name(m) for m in setup.members],
                         gather=setup.blocks.gather)
    loop = EpochLoop(source, train_step, setup.steps_per_epoch, config.train.batch_size,
                     members=len(setup.members) if setup.stacked else None, finite=finite, hooks=tuple(hooks),
                     blocks=setup.blocks)
    eval_step = make_eval_step(model, compile=config.train.compile, precision=config.train.precision,
                               channels_last=config.train.channels_last)
    clock = {"whitening": whitening, "compile": 0.0, "train": 0.0, "final_eval": 0.0, "eval": 0.0}
    return Program(train_state, loop, eval_step, schedule, lr_scales, init_source, clock)


def initial_state(setup: Setup, model, optimizer) -> tuple[TrainState, Any, float]:
    """Every member's TrainState from its seed (stacked with members), fitted to the data or started from
    ``train.init_from``, or the run directory's last checkpoint on resume; also the fine-tuning source's record and
    the seconds the data-dependent init took. Members spread over a torchrun job: this process's block of them
    (restored from the checkpoint of all K)."""
    config, dev = setup.config, setup.dev
    create = lambda member: create_train_state(model, optimizer, random.key(member["seed"]),
                                               ema=bool(config.train.ema_decay),
                                               loss_scaling=config.train.precision == "fp16")
    if setup.resume:
        states = [create(m) for m in setup.members]
        skeleton = tree.tree_stack(states) if setup.stacked else states[0]
        return tree.tree_to(setup.blocks.take(setup.run.restore(skeleton)), dev), None, 0.0
    states = [create(setup.members[i]) for i in setup.blocks.block]
    states, init_source, seconds = [tree.tree_to(s, dev) for s in states], None, 0.0
    if config.train.init_from:  # fine-tuning: the source's weights (and fitted whitening), heads from each key
        source = finetune.load_source(config.train.init_from)
        starts = [finetune.init_from(s, model, optimizer, source, path=config.train.init_from,
                                     input_size=tuple(setup.ds.train_images.shape[1:3])) for s in states]
        states, init_source = [s for s, _ in starts], starts[0][1]
    elif model.data_init is not None:
        tick = time.perf_counter()
        normalize = lambda images: normalized(setup.ds, images)
        states = [s._replace(state=model.data_init(s.state, setup.ds.train_images, normalize)) for s in states]
        states = [start_ema(s) if s.ema is not None else s for s in states]  # the EMA starts from the fitted state
        synchronize(dev)
        seconds = time.perf_counter() - tick
    return (tree.tree_stack(states) if setup.stacked else states[0]), init_source, seconds


def _train_step(setup: Setup, model, optimizer_for, hyper: dict, secret):
    """``step(train_state, batch, key)``: the recipe's step, or the members' (vmapped or looped) over theirs."""
    config, plan, process = setup.config, setup.privacy_plan, _data_parallel(setup)
    strategy = config.members.strategy
    if strategy == "auto":
        strategy = "vmap" if setup.dev.type == "cuda" else "loop"
    vmapped = setup.stacked and strategy == "vmap"

    def gradient():
        if plan is None:
            return functools.partial(mean_gradient, transformable=vmapped)
        return privacy.clipped_noisy_gradient(plan.max_grad_norm, plan.noise_multiplier, plan.expected_batch_size,
                                              chunk_size=config.privacy.chunk_size, copies=plan.augmult,
                                              secret=secret, skip_padding=not vmapped, process=process,
                                              clipping=_clipping(config, vmapped))

    def build_step(member_hyper: dict):
        # Under vmap: torch.func's gradient, and no memory-format requests (vmap refuses them); compiled as a
        # whole below. In a loop (and a single run): the single run's own step, compiled when asked.
        return recipe.create_train_step(config, model, recipe.create_loss(config, member_hyper),
                                        optimizer_for(member_hyper), gradient=gradient(), process=process,
                                        channels_last=config.train.channels_last and not vmapped,
                                        compile=config.train.compile and not vmapped)

    if not setup.stacked:
        return build_step({})
    step = make_members_step(build_step, compile=config.train.compile and vmapped,
                             chunk_size=config.members.per_pass or None, strategy=strategy)
    on_device = {name: values.to(setup.dev) for name, values in hyper.items()}
    return lambda train_state, batch, keys: step(train_state, batch, keys, on_device)


def _data_parallel(setup: Setup):
    """The job whose processes share each step of a single run (the gradient all-reduced, BatchNorm's statistics
    over the global batch), or None: one process, or members, each stepped whole by the process holding it."""
    return None if setup.stacked else setup.process


def _clipping(config: Config, vmapped: bool) -> str:
    """``privacy.clipping``, refused (one line) where it cannot run: ghost clipping records the layers of an eager
    forward pass, which members under ``vmap`` do not make."""
    if config.privacy.clipping == "ghost" and vmapped:
        raise InputError('privacy.clipping = "ghost" cannot run under members.strategy = "vmap" (it records each '
                         'layer of an eager forward pass): set members.strategy = "loop" or privacy.clipping = "vmap"')
    return config.privacy.clipping


def _source(setup: Setup, key: torch.Tensor, secret):
    """One member's batch source: Poisson batches under ``[privacy]``, a permutation per epoch otherwise."""
    plan, config = setup.privacy_plan, setup.config
    if plan is not None and plan.poisson_sampling:
        return PoissonSource(setup.ds, config.data, key, plan, secret,
                             shards=_data_parallel(setup).world_size if _data_parallel(setup) else 1)
    return PermutedSource(setup.ds, config.data, key, config.train.batch_size,
                          copies=plan.augmult if plan is not None else 1)


def run_epochs(setup: Setup, program: Program) -> tuple[TrainState, dict]:
    """The epochs left: train, evaluate, log the row, save (``best`` on the selection split); then the summary.

    Members spread over a torchrun job: each process steps its block, and every member's state is gathered at each
    epoch's end, so evaluation, the rows and the checkpoint are of all K (as one process training them writes)."""
    config, run, loop, clock, blocks = setup.config, setup.run, program.loop, program.clock, setup.blocks
    own, start_step = program.train_state, step_of(program.train_state)  # this process's members
    _start(setup, program, start_step)
    if config.train.compile:
        clock["compile"] = loop.compile(own, setup.dev)
    best, evaluation = run.best_accuracy(), None
    split, progress = setup.ds.selection_split, run.progress  # the split evaluated every epoch; "best" chosen on it
    for epoch in range(loop.first_epoch(start_step, run.has_epoch_row), config.train.epochs):
        own, seconds, train_metrics = loop(own, epoch, setup.dev, progress)
        train_state = blocks.gather(own)  # every member (the loop's metrics are every member's already)
        progress = None  # only the epoch a run resumes in started before this process
        clock["train"] += seconds
        tick, final = time.perf_counter(), epoch + 1 == config.train.epochs
        evaluated = evaluates(config, epoch)
        evaluation = evaluate(setup, program, train_state, split, final=final) if evaluated else None
        if evaluation is not None:  # before the epoch's row and checkpoint: a non-finite evaluation saves nothing
            check_evaluation(setup, evaluation, split, f"epoch {epoch + 1} (step {step_of(train_state)})")
        clock["final_eval"] = time.perf_counter() - tick  # evaluation ends with .item(): synchronised
        clock["eval"] += clock["final_eval"]
        row = epoch_row(setup, program, train_state, epoch, train_metrics, evaluation, split, seconds)
        mean_lr = recipe.interval_learning_rate(config, program.schedule, epoch + 1, step_of(train_state),
                                                setup.steps_per_epoch)
        learning_rate = [mean_lr * scale for scale in program.lr_scales] if setup.stacked else mean_lr
        better = evaluated and (best is None or row[run.selection] > best)
        run.end_epoch(row, train_state, best=better, learning_rate=learning_rate)
        best = row[run.selection] if better else best
    if evaluation is None:  # resumed a finished run: evaluate what is there
        train_state = blocks.gather(own)
        evaluation = evaluate(setup, program, train_state, split, final=True)
        check_evaluation(setup, evaluation, split, f"the final weights (step {step_of(train_state)})")
        best = max(best or 0.0, _scores(evaluation, split)[run.selection])
    tick = time.perf_counter()
    test = evaluation if split == "test" else evaluate(setup, program, train_state, "test", final=True)
    if test is not evaluation:
        check_evaluation(setup, test, "test", f"the final weights (step {step_of(train_state)})")
    seconds = time.perf_counter() - tick
    clock["final_eval"] += seconds
    clock["eval"] += seconds
    summary = make_summary(setup, program, train_state, evaluation, test, split, best, start_step)
    tables = {"test": test[""]["ensemble"]}
    if config.train.calibrate:
        summary["calibration"], tables = calibrate(setup, program, train_state)
    if run.writes:
        calibration.plot_reliability(run.path / "plots" / "reliability.png", tables,
                                     f"{run.path.name}: the test split (the plain view's logits)")
    if setup.stacked:
        members.plot_members(run, setup.members)
    run.finish(summary)
    return train_state, summary


def calibrate(setup: Setup, program: Program, train_state: TrainState) -> tuple[dict, dict]:
    """``train.calibrate``: fit a temperature to the validation split's logits (the ensemble's, for members) and
    record it in ``last.safetensors`` (and ``best.safetensors`` when it holds the same step). Returns the summary's
    ``calibration`` and the test split's metrics before and after it (for the reliability diagram)."""
    weights = "ema" if train_state.ema is not None else "raw"  # what `fnclass eval` and export load by default
    params, state = ((train_state.ema["params"], train_state.ema["state"]) if train_state.ema is not None
                     else (train_state.params, train_state.state))
    models = ([(tree.tree_index(params, i), tree.tree_index(state, i)) for i in range(len(setup.members))]
              if setup.stacked else [(params, state)])
    logits = {name: split_logits(program.eval_step, models, setup.ds.split(name)[0], mean=setup.ds.mean_t,
                                 std=setup.ds.std_t, batch_size=setup.config.train.eval_batch_size)
              for name in ("val", "test")}
    labels = {name: setup.ds.split(name)[1].cpu() for name in ("val", "test")}
    report, tables = calibration.fit_report(logits, labels, weights=weights)
    temperature = report["temperature"]
    if setup.run.writes:
        set_temperature(setup.run.last, temperature, weights=weights, calibration=report)
        best = setup.run.checkpoints / "best.safetensors"
        if best.exists() and read_file(best)[1].get("step") == read_file(setup.run.last)[1].get("step"):
            copy_checkpoint(setup.run.last, best)  # the same weights: the same temperature
    return report, {"test, T = 1": tables["test"]["before"], f"test, T = {temperature:.3f}": tables["test"]["after"]}


def _start(setup: Setup, program: Program, start_step: int) -> None:
    """The run directory's config, header and ``run`` line: what the run is about to do."""
    ds, config, plan = setup.ds, setup.config, setup.privacy_plan
    params = tree.num_params(program.train_state.params) // len(setup.blocks.block)
    info = {"device": str(setup.dev), "data_dir": str(ds.folder), "train_images": len(ds.train_images),
            "test_images": len(ds.test_images), "steps_per_epoch": setup.steps_per_epoch,
            "selection_split": ds.selection_split, "val_images": 0 if ds.val_images is None else len(ds.val_images),
            "total_steps": setup.steps_per_epoch * config.train.epochs, "num_params": params,
            "start_step": start_step, "processes": setup.process.world_size if setup.process else 1,
            **({"members": setup.members} if setup.stacked else {}),
            "privacy": plan._asdict() if plan else None,
            "init_from": program.init_source._asdict() if program.init_source else None,
            "resumed_from": str(setup.run.resumed_from) if setup.resume else None,
            "rejected_checkpoints": setup.run.rejected,
            "inputs_unchecked": bool(setup.inputs.get("recorded_on_resume")),
            "precision": config.train.precision, "precision_reason": setup.precision_reason}
    setup.run.start(step=start_step, classes=ds.classes, mean=ds.mean, std=ds.std,
                    input_size=tuple(ds.train_images.shape[1:3]), inputs=setup.inputs,
                    **({"members": setup.members} if setup.stacked else {}), info=info)


def evaluate(setup: Setup, program: Program, train_state: TrainState, split: str, *, final: bool) -> dict:
    """Every member's metrics of the ``"val"`` or ``"test"`` split and their ensemble's (the mean of their logits;
    one member's own), for the raw weights (``""``) and, with an EMA, the EMA weights (``"ema_"``). TTA only when
    ``final`` and on the split it is reported for (the test split)."""
    config = setup.config
    tta = (1 + config.train.tta_translate) if config.train.tta and final and split == "test" else 0
    images, labels = setup.ds.split(split)
    weights = {"": (train_state.params, train_state.state)}
    if train_state.ema is not None:
        weights["ema_"] = (train_state.ema["params"], train_state.ema["state"])
    evaluation = {}
    for prefix, (params, state) in weights.items():
        models = ([(tree.tree_index(params, i), tree.tree_index(state, i)) for i in range(len(setup.members))]
                  if setup.stacked else [(params, state)])  # a model with no state (GroupNorm) has {} to index
        result = evaluate_members(program.eval_step, models, images, labels, mean=setup.ds.mean_t,
                                  std=setup.ds.std_t, batch_size=config.train.eval_batch_size, tta=tta,
                                  process=setup.process)
        if result["ensemble"] is None:  # one member: its own logits are the ensemble's
            result["ensemble"] = result["members"][0]
        evaluation[prefix] = result
    return evaluation


def check_evaluation(setup: Setup, evaluation: dict, split: str, when: str) -> None:
    """Raise :class:`TrainingDiverged` (exit 3) if any model of ``evaluation`` (raw or EMA weights, each member,
    the ensemble; the plain view or a TTA view) had a nan or inf logit, loss or calibration figure."""
    bad = []
    for prefix, result in evaluation.items():
        models = result["members"]
        named = [("", models[0])] if len(models) == 1 else [*((f", member {i}", m) for i, m in enumerate(models)),
                                                             (", ensemble", result["ensemble"])]
        for who, metrics in named:
            numbers = [metrics[name] for name in ("loss", "nll", "ece", "brier") if name in metrics]
            if metrics["nonfinite_logits"] or not all(math.isfinite(value) for value in numbers):
                bad.append(f"{'the EMA weights' if prefix else 'the weights'}{who}: {metrics['nonfinite_logits']} of "
                           f"{len(metrics['predictions'])} images with nan/inf logits, loss {metrics['loss']:.4g}")
    if bad:
        raise diverged(setup.config, f"evaluating {when} on the {split} split gave nan/inf ({'; '.join(bad)})",
                       setup.run.last, skip=False)


def evaluates(config: Config, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) is evaluated: every ``train.eval_every``-th one and always the last."""
    every = config.train.eval_every
    return epoch + 1 == config.train.epochs or (every > 0 and (epoch + 1) % every == 0)


def _scores(evaluation: dict, split: str) -> dict:
    """The ensemble's (a single run's) metrics under their row names: ``val_accuracy``, ``ema_val_accuracy``, ...,
    and the per-class accuracies as ``per_class_accuracy`` / ``ema_per_class_accuracy``."""
    named = {}
    for prefix, result in evaluation.items():
        named.update(split_metrics(result["ensemble"], prefix + split))
        named[prefix + "per_class_accuracy"] = result["ensemble"]["per_class_accuracy"]
    return named


def epoch_row(setup: Setup, program: Program, train_state: TrainState, epoch: int, train_metrics: dict,
              evaluation: dict, split: str, seconds: float) -> dict:
    """The metrics.jsonl row of an epoch (its evaluation is of the split "best" is chosen on; ``None``: the epoch
    was not evaluated, ``train.eval_every``, and the row has no evaluation columns); with members, the ensemble's
    metrics, the members' spread and a ``member_epoch`` line each (logged here)."""
    step, lr = step_of(train_state), float(program.schedule(step_of(train_state) - 1))
    mean = lambda values: statistics.fmean(values) if isinstance(values, list) else values
    total = lambda values: sum(values) if isinstance(values, list) else values
    row = {"kind": "epoch", "step": step, "epoch": epoch + 1, "train_loss": mean(train_metrics["loss"]),
           "train_accuracy": mean(train_metrics["accuracy"]),
           **{name: value for name, value in _scores(evaluation or {}, split).items() if "per_class" not in name},
           "lr": lr, "seconds": seconds, "images_per_second": train_metrics["images_per_second"],
           "skipped_steps": total(train_metrics["skipped_steps"])}
    if "poisson_overflow" in train_metrics:
        row["poisson_overflow"] = total(train_metrics["poisson_overflow"])
    if setup.privacy_plan is not None:  # the budget spent so far, by the accountant (null: no noise, no privacy)
        row["epsilon"] = _finite(privacy.epsilon(setup.privacy_plan, step))
    if setup.stacked:
        for member_row in members.member_rows(setup.members, epoch, train_state, train_metrics, evaluation or {},
                                              split, lr, program.lr_scales):
            setup.run.log(member_row)
        row.update(members.epoch_spread(setup.members, evaluation, split) if evaluation else
                   {"members": len(setup.members)})
    return row


def make_summary(setup: Setup, program: Program, train_state: TrainState, evaluation: dict, test: dict, split: str,
                 best, start_step: int) -> dict:
    """summary.json: the test split's metrics (the ensemble's; evaluated once, at the end, with a validation split),
    the facts of the run, the privacy guarantee, and with members every member and their spread."""
    ds, run = setup.ds, setup.run
    scores = lambda named: {name: value for name, value in named.items() if "per_class" not in name}
    test_scores = _scores(test, "test")
    summary = {**scores(test_scores), "selection": run.selection, f"best_{run.selection}": best,
               **(scores(_scores(evaluation, "val")) if split == "val" else {})}
    if setup.stacked:
        summary["ensemble_test_accuracy"] = test[""]["ensemble"]["accuracy"]
    summary.update(run_facts(setup, program.clock, program.loop.images_seen, step_of(train_state), start_step,
                             tree.num_params(train_state.params) // len(setup.members)))
    for name in ("per_class_accuracy", "ema_per_class_accuracy"):
        if name in test_scores:
            summary[name] = dict(zip(ds.classes, test_scores[name]))
    if setup.stacked:
        summary.update(members.summary_members(setup.members, evaluation, test, split))
    if setup.privacy_plan is not None:
        summary["privacy"] = privacy_summary(setup.privacy_plan, step_of(train_state), run.epoch_rows())
        if setup.stacked:  # each member is its own private run: its own samples and noise, the same guarantee;
            # releasing all K models composes K runs on the same data (K times the steps at the same rate and noise)
            for entry in summary["members"]:
                entry["epsilon"] = summary["privacy"]["epsilon"]
            summary["privacy"]["ensemble_epsilon"] = _finite(privacy.epsilon(
                setup.privacy_plan, step_of(train_state) * len(setup.members)))
    return summary


def run_facts(setup: Setup, clock: dict, images_seen: int, steps: int, start_step: int, num_params: int) -> dict:
    """The summary.json fields of every run: timings, steps, resume, device, versions, data."""
    from fnclass._version import __version__
    from fnclass.io import device_name

    config, ds, run = setup.config, setup.ds, setup.run
    seeds = [m["seed"] for m in setup.members]
    return {
        "train_seconds": clock["train"], "compile_seconds": clock["compile"], "whitening_seconds": clock["whitening"],
        "final_eval_seconds": clock["final_eval"], "eval_seconds": clock["eval"],
        "images_per_second": images_seen / clock["train"] if clock["train"] else None,
        "steps": steps, "epochs": config.train.epochs, "resumed_from_step": start_step or None,
        "resumed_from_checkpoint": run.resumed_from.name if run.resumed_from else None,
        "skipped_steps": sum(row.get("skipped_steps", 0) for row in run.epoch_rows()),
        "nan_policy": config.train.nan_policy, "init_from": config.train.init_from,
        "device": device_name(setup.dev), "precision": config.train.precision,
        "precision_reason": setup.precision_reason, "torch_version": torch.__version__, "fnclass_version": __version__,
        "seed": seeds if setup.stacked else seeds[0], "num_params": num_params, "model": config.model.name,
        "data_dir": str(ds.folder), "train_images": len(ds.train_images), "test_images": len(ds.test_images),
        "val_images": 0 if ds.val_images is None else len(ds.val_images), "run_dir": str(run.path),
        "inputs": setup.inputs,
    }


def privacy_summary(plan: privacy.Plan, steps: int, rows: list[dict]) -> dict:
    """summary.json's ``privacy``: the guarantee (epsilon, delta) and everything it was computed from."""
    recorded = {name: value for name, value in plan._asdict().items() if name != "steps"}
    return {"epsilon": _finite(privacy.epsilon(plan, steps)), "steps": steps, **recorded,
            "poisson_overflow": sum(row.get("poisson_overflow", 0) for row in rows)}


def interrupted(setup: Setup, program: Program) -> TrainState | None:
    """On Ctrl-C: the state after the last finished step (never one after a non-finite step), saved.

    Members spread over a torchrun job: nothing is saved, as the processes stop at different steps (between the
    points where they meet, each steps its own block); the last checkpoint stays."""
    loop, train_state = program.loop, program.train_state
    if setup.blocks.process is not None:
        return None
    if loop.latest is not None:
        loop.finite.check()
        train_state = loop.latest
    setup.run.save(train_state, loop.progress())
    return train_state


def _finite(value: float) -> float | None:
    """``value``, or None (JSON null) when it is infinite."""
    return value if math.isfinite(value) else None


__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "train"]
