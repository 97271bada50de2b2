"""Exact single-model data attribution by metagradients: a test output differentiated through the whole training run.

A run is a pure function of its data and keys: ``params_T = run(w)``, where ``w`` holds one loss weight per training
example (``data.train_weights``; 1 in the run as trained). This module replays the recorded run step by step from
its seed, with every batch, augmentation key, learning rate and BatchNorm update as trained, checks that the replay
ends on the run's last checkpoint, and then runs reverse mode through the steps (``torch.func.vjp`` of each step,
itself a ``torch.func.grad`` of the loss: second-order terms included) to get, for each test example ``j``,

    scores[j, i] = d margin_j(params_T) / d w_i

(TRAK's margin ``logit_y - logsumexp`` of the others, evaluated as ``fnclass eval`` does, BatchNorm statistics
included). Taking example ``i`` out of the loss moves the margin by about ``-scores[j, i]``: positive scores are
proponents. Engstrom, Ilyas et al. 2025 (REPLAY) compute the same quantity; here the states are recomputed from
every ``segment``-th one kept in memory, so memory holds about ``T / segment + segment`` TrainStates for ``T``
steps.

What cannot be replayed exactly is refused with one line: private runs (the noise comes from a secret the run
keeps out of its checkpoints), members, fine-tuned runs, fp16 loss scaling, and any run whose replay does not end on
its own last checkpoint (a torchrun job, another device, library version or number of CPU threads).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import optree
import torch

from fnclass import data
from fnclass.core import layers
from fnclass.core.losses import margin
from fnclass.data.batches import load_run_data, normalized
from fnclass.data.sources import PermutedSource
from fnclass.distributed.members import member_blocks
from fnclass.errors import InputError
from fnclass.io import pick_device
from fnclass.run import inputs
from fnclass.run.checkpoint import load_checkpoint, restore_train_state
from fnclass.training import recipe
from fnclass.training.program import Setup, initial_state
from fnclass.training.step import mean_gradient

REPLAY_TOLERANCE = 1e-5  # largest parameter difference, relative to the largest parameter, the replay may end at


class Replay(NamedTuple):
    """A recorded run rebuilt for replay: its data, differentiable step, batch source, first state and length."""

    config: object
    ds: object
    model: object
    step: Callable  # the run's step, as trained
    grad_step: Callable  # the same step, differentiable twice: attention in plain operations (``attn_impl = "math"``)
    source: PermutedSource
    start: object
    steps_per_epoch: int
    steps: int
    weights: torch.Tensor  # the run's loss weights (all 1 without data.train_weights), float32 on the device


class Result(NamedTuple):
    """``scores`` (T test, N train) float32, the training rows of its columns, and how the replay went."""

    scores: torch.Tensor
    rows: torch.Tensor
    test_labels: torch.Tensor
    replay_error: float | None  # None: replayed in float64, not checked against the checkpoint
    steps: int
    seconds: float
    train_seconds: float | None


def _refuse(config, run: Path) -> None:
    """One line for a run that cannot be replayed exactly, naming why and what to do."""
    reasons = [
        (config.privacy.enabled, "it is a private run: its noise and samples come from a secret kept out of its "
                                 "checkpoints"),
        (config.members.active, "it trained members; attribute one member's own run instead"),
        (bool(config.train.init_from), "it was fine-tuned from another run (train.init_from)"),
        (config.train.precision == "fp16", "its fp16 loss scaling skips steps by overflow, which has no gradient"),
    ]
    for refused, why in reasons:
        if refused:
            raise InputError(f"--method metagrad cannot replay {run}: {why}; use --method tracin or trak")


def replay_of(run: str | Path, *, data_dir=None, device: str = "cpu", download: bool = False) -> Replay:
    """Rebuild ``run`` (a run directory) for replay: its recorded config, data, first TrainState and step.

    Raises:
      InputError: the run has no last checkpoint, or cannot be replayed exactly (see the module's doc).
    """
    run = Path(run)
    config = _last_checkpoint(run).config
    _refuse(config, run)
    dev = pick_device(device)
    folder = data.resolve_data_dir(data_dir or config.data.data_dir, config.data.dataset, download=download)
    record = inputs.read_inputs(run)
    if record is not None:  # the replay must see the data (and fine-tuning source) the run trained on
        inputs.check_inputs(record, config, folder, action="--method metagrad")
    config, ds = load_run_data(config, folder, download, dev)
    steps_per_epoch = len(ds.train_images) // config.train.batch_size
    model = recipe.create_model(config)
    optimizer = recipe.create_run_optimizer(config, model.param_labels, steps_per_epoch)

    def step_of(model):  # torch.func's gradient, which reverse mode goes through (the eager one's is identical)
        return recipe.create_train_step(config, model, recipe.create_loss(config), optimizer,
                                        gradient=functools.partial(mean_gradient, transformable=True), process=None,
                                        channels_last=config.train.channels_last, compile=False)
    # PyTorch's fused attention kernels have no second derivative: the reverse pass uses the same attention in
    # plain operations (the same function, rounded differently).
    math_model = recipe.create_model(dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                                           attn_impl="math")))
    setup = Setup(config, ds, dev, None, config.member_list(), False, member_blocks(1, None), steps_per_epoch, None,
                  None, False, record or {})
    start = initial_state(setup, model, optimizer)[0]
    source = PermutedSource(ds, config.data, start.key, config.train.batch_size)
    weights = ds.train_weights if ds.train_weights is not None else torch.ones(len(ds.train_images), device=dev)
    return Replay(config, ds, math_model, step_of(model), step_of(math_model), source, start, steps_per_epoch,
                  steps_per_epoch * config.train.epochs, weights)


def _last_checkpoint(run: Path):
    """The run directory's last checkpoint (raw weights), or one line saying a finished run is needed."""
    path = run / "checkpoints" / "last.safetensors"
    if not path.is_file():
        raise InputError(f"{run} has no checkpoints/last.safetensors: --method metagrad replays a run directory "
                         "that finished training; give one")
    return load_checkpoint(path, weights="raw")


def _batch(replay: Replay, t: int):
    """Step ``t``'s batch as the run drew it (its images in the weights' dtype), and the training rows it holds."""
    epoch, epoch_step = divmod(t, replay.steps_per_epoch)
    batch = replay.source(t, epoch, epoch_step)
    return batch._replace(images=batch.images.to(replay.weights.dtype)), replay.source.indices(epoch, epoch_step)


def _advance(replay: Replay, state, t: int):
    batch, rows = _batch(replay, t)
    return replay.step(state, (batch.images, batch.labels, replay.weights[rows]), batch.key)[0]


def _split(state):
    """A TrainState's floating-point leaves (what reverse mode goes through) and a function putting them back."""
    leaves, treedef = optree.tree_flatten(state)
    floating = [i for i, leaf in enumerate(leaves) if leaf.is_floating_point()]

    def rebuild(values):
        merged = list(leaves)
        for i, value in zip(floating, values):
            merged[i] = value
        return optree.tree_unflatten(treedef, merged)
    return [leaves[i] for i in floating], rebuild


def metagradients(run: str | Path, test_indices: list[int], *, data_dir=None, device: str = "cpu",
                  download: bool = False, segment: int | None = None, progress: Callable | None = None,
                  dtype: torch.dtype = torch.float32, max_memory: int | None = None) -> Result:
    """``d margin_j / d w_i`` for the test examples ``test_indices`` and every training example the run used.

    Args:
      run: a finished run's directory.
      test_indices: rows of the test split.
      data_dir: the data folder (default: the run's, ``$FNCLASS_DATA``).
      segment: steps between the TrainStates kept during the forward replay (default ``ceil(sqrt(T))``).
      progress: ``progress(done, total)``: the steps gone back through, of the run's ``total``.
      dtype: ``torch.float64`` replays the same run in double precision (its states, images and weights; the check
        against the last checkpoint is then skipped): to test the reverse pass against finite differences.
      max_memory: bytes the kept TrainStates may take (:func:`states_bytes`); a run that needs more is refused
        before the replay.

    Raises:
      InputError: as :func:`replay_of`, and when the replay does not end on the run's last checkpoint.
    """
    with layers.differentiable_statistics():
        return _metagradients(run, test_indices, data_dir=data_dir, device=device, download=download,
                              segment=segment, progress=progress, dtype=dtype, max_memory=max_memory)


TEST_CHUNK = 2  # test examples per vmapped reverse step: each holds its own copy of the step's second-order graph


def states_bytes(replay: Replay, segment: int, tests: int) -> int:
    """What the reverse pass holds at once: the ``ceil(T / segment)`` kept TrainStates, one segment's recomputed
    ones, and a TrainState-sized cotangent per test example (twice: the step's vector-Jacobian product in flight)."""
    one = sum(leaf.numel() * leaf.element_size() for leaf in optree.tree_leaves(replay.start)
              if isinstance(leaf, torch.Tensor))
    return one * (math.ceil(replay.steps / segment) + segment + 2 * tests)


def _metagradients(run, test_indices, *, data_dir, device, download, segment, progress, dtype, max_memory) -> Result:
    tick = time.perf_counter()
    replay = in_dtype(replay_of(run, data_dir=data_dir, device=device, download=download), dtype)
    total = replay.steps
    segment = segment or max(1, math.ceil(math.sqrt(total)))
    needed = states_bytes(replay, segment, len(test_indices))
    if max_memory is not None and needed > max_memory:
        raise InputError(f"--method metagrad: {total} steps of this run keep about {needed / 2**20:,.0f} MiB of "
                         f"training states for {len(test_indices)} test example(s), over --max-memory "
                         f"{max_memory / 2**20:,.0f} MiB; raise --max-memory or attribute fewer test examples at "
                         "a time")
    kept, state = {}, replay.start
    with torch.no_grad():
        for t in range(total):
            if t % segment == 0:
                kept[t] = state
            state = _advance(replay, state, t)
    error = _replay_error(run, state) if dtype == torch.float32 else None
    test_images, test_labels = _test_split(replay, test_indices)
    # One cotangent per test example, stacked leaf by leaf: the reverse pass of a step is vmapped over them.
    cotangents = [torch.stack(parts) for parts in zip(*[
        _objective_gradient(replay, state, test_images[j:j + 1], test_labels[j:j + 1])
        for j in range(len(test_indices))])]
    scores = torch.zeros(len(test_indices), len(replay.weights), device=replay.weights.device, dtype=dtype)
    done = 0
    for first in reversed(range(0, total, segment)):
        states = [kept[first]]
        with torch.no_grad():
            for t in range(first, min(first + segment, total) - 1):
                states.append(_advance(replay, states[-1], t))
        for t in reversed(range(first, min(first + segment, total))):
            batch, rows = _batch(replay, t)
            leaves, rebuild = _split(states[t - first])

            def step_leaves(values, weights, batch=batch, rebuild=rebuild):
                new = replay.grad_step(rebuild(values), (batch.images, batch.labels, weights), batch.key)[0]
                return _split(new)[0]
            _, vjp = torch.func.vjp(step_leaves, leaves, replay.weights[rows])
            cotangents, weight_grads = torch.func.vmap(vjp, chunk_size=TEST_CHUNK)(cotangents)
            # The products come out attached to the step's graph: kept as they are, each step's graph stayed alive
            # through the next one's, and memory grew by the whole graph every step (400 MiB a step, 16 GiB after 40
            # steps of the LDS benchmark's run). Nothing differentiates the reverse pass itself.
            cotangents = [c.detach() for c in cotangents]
            scores.index_add_(1, rows, weight_grads.detach())
            done += 1
            if progress:
                progress(done, total)
    summary = Path(run) / "summary.json"
    train_seconds = json.loads(summary.read_text()).get("train_seconds") if summary.is_file() else None
    return Result(scores.cpu(), replay.ds.train_rows, test_labels.cpu(), error, total,
                  time.perf_counter() - tick, train_seconds)


def in_dtype(replay: Replay, dtype: torch.dtype) -> Replay:
    """``replay`` with its first state's floating-point leaves and its weights in ``dtype``."""
    cast = lambda leaf: leaf.to(dtype) if leaf.is_floating_point() else leaf
    return replay._replace(start=optree.tree_map(cast, replay.start), weights=replay.weights.to(dtype))


def _test_split(replay: Replay, indices: list[int]):
    images, labels = data.load_split(replay.ds.folder, "test")
    chosen = torch.tensor(indices)
    dev = replay.weights.device
    return normalized(replay.ds, images[chosen].to(dev)).to(replay.weights.dtype), labels[chosen].to(dev)


def _objective_gradient(replay: Replay, state, images, labels) -> list[torch.Tensor]:
    """The gradient of the test example's margin (evaluation mode) with respect to the final state's float leaves."""
    leaves, rebuild = _split(state)

    def objective(values):
        final = rebuild(values)
        logits, _ = replay.model.apply(final.params, final.state, images, train=False)
        return margin(logits, labels).sum()
    return list(torch.func.grad(objective)(leaves))


def _replay_error(run: Path, state) -> float:
    """How far the replay ended from the run's last checkpoint (largest difference over largest value), or one
    line when it is not the same run."""
    recorded = restore_train_state(Path(run) / "checkpoints" / "last.safetensors", state)
    ours, theirs = optree.tree_leaves(state.params), optree.tree_leaves(recorded.params)
    scale = max(float(leaf.abs().max()) for leaf in theirs) or 1.0
    error = max(float((a - b.to(a)).abs().max()) for a, b in zip(ours, theirs)) / scale
    if not error <= REPLAY_TOLERANCE:
        raise InputError(f"--method metagrad: replaying {run} ends {error:.2g} (relative) away from its "
                         "checkpoints/last.safetensors, so it is not the recorded run (trained under torchrun, on "
                         "another device, library version or number of CPU threads, or resumed differently); run "
                         "it as it was trained, or use --method tracin, trak or ekfac")
    return error


def attribute(run: str | Path, out_dir: str | Path, *, test_indices: str | None = None, top: int = 8,
              data_dir=None, device: str = "cpu", download: bool = False, segment: int | None = None,
              max_memory: int | None = None,
              progress: Callable | None = None) -> dict:
    """``fnclass influence RUN --method metagrad``: :func:`metagradients` of the test examples ``test_indices``
    (``"0-7"`` by default), written to ``out_dir`` as the other methods write theirs (``influence.csv``/``.json``,
    ``scores.npy``, ``train_indices.npy``, ``influence.png``). Returns the report."""
    from fnclass.analysis.influence import _predict, _write_attribution, parse_indices, top_examples

    last = _last_checkpoint(Path(run))
    folder = data.resolve_data_dir(data_dir or last.config.data.data_dir, last.config.data.dataset,
                                   download=download)
    test_all, _ = data.load_split(folder, "test")
    chosen = parse_indices(test_indices or "0-7", len(test_all))
    result = metagradients(run, chosen, data_dir=str(folder), device=device, download=download, segment=segment,
                           max_memory=max_memory,
                           progress=progress)
    train_raw, train_labels = data.load_split(folder, "train")
    train_raw, train_labels = train_raw[result.rows], train_labels[result.rows]
    proponents, opponents = top_examples(result.scores, top)
    pick = lambda idx, t: [{"index": int(result.rows[i]), "label": int(train_labels[i]),
                            "score": float(result.scores[t, i])} for i in idx]
    report = {
        "method": "metagrad", "weights": "raw", "objective": "margin", "steps": result.steps,
        "replay_error": result.replay_error,
        "seconds": result.seconds, "train_seconds": result.train_seconds,
        "train_examples": len(result.rows), "classes": list(last.classes), "checkpoints": [],
        "models": 1, "chunk_size": None, "gradients_per_second": None,
        "tests": [{"test": name, "label": int(result.test_labels[t]), "proponents": pick(proponents[t], t),
                   "opponents": pick(opponents[t], t)} for t, name in enumerate(chosen)],
    }
    _write_attribution(Path(out_dir), report, result.scores, result.rows, test_all[chosen], train_raw,
                       last.classes, False, _predict(last, test_all[chosen]))
    return report


__all__ = ["Replay", "Result", "attribute", "metagradients", "replay_of"]
