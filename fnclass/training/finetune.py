"""Fine-tuning: a run that starts from another run's weights (``train.init_from``, ``fnclass train --init-from``).

The weights come from a training checkpoint (its EMA when it keeps one) or a safetensors export; the optimizer
state and the learning-rate schedule start afresh. When the number of classes differs, the classifier head keeps
the fresh initialisation drawn from this run's key; every other parameter and the BatchNorm statistics must fit
the run's model exactly. Inputs are normalised with the run's own data statistics, as in any run (for CIFAR-10
and CIFAR-100 they differ in the third decimal); the first epochs adapt the BatchNorm statistics to them.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from fnclass.core import optim, tree
from fnclass.models import Model
from fnclass.models.model import HEAD_BIASES, HEAD_WEIGHTS
from fnclass.run.checkpoint import CheckpointError
from fnclass.training.step import TrainState, start_ema


class InitSource(NamedTuple):
    """Where a fine-tuned run's weights came from (recorded in summary.json, shown when the run starts)."""

    path: str
    step: int
    weights: str  # "ema" or "raw"
    classes: tuple[str, ...]
    head_reinitialised: bool


def load_source(path: str | Path):
    """The checkpoint or safetensors export to start from, read for its weights (EMA when present)."""
    from fnclass.run.export import load_for_evaluation

    ckpt = load_for_evaluation(path)
    if ckpt.members:
        raise CheckpointError(f"{path} holds {len(ckpt.members)} members: export one with `fnclass export {path} "
                              "--member I` and start from that file")
    return ckpt


def init_from(train_state: TrainState, model: Model, optimizer: optim.Transform, source, *, path: str | Path,
              input_size: tuple[int, int]) -> tuple[TrainState, InitSource]:
    """``train_state`` with the source's parameters and model state, a fresh optimizer state and EMA.

    Args:
      train_state: a freshly created TrainState of the run (its head is this run's initialisation).
      model: the run's model (its ``param_labels`` say which leaves form the head).
      optimizer: the run's optimizer; its state is initialised anew from the loaded parameters.
      source: what :func:`load_source` returned.
      path: the source's file (for the record).
      input_size: the run's image size (height, width).

    Returns:
      ``(train_state, InitSource)``.

    Raises:
      CheckpointError: when the source's model does not fit the run's, apart from the head.
    """
    if tuple(source.input_size) != tuple(input_size):
        raise CheckpointError(f"--init-from: the source model takes {source.input_size[0]}x{source.input_size[1]} "
                              f"images but this run's are {input_size[0]}x{input_size[1]}; prepare the data at that "
                              "size (fnclass data prepare --size)")
    labels = tree.flatten_paths(model.param_labels(train_state.params))
    ours, theirs = tree.flatten_paths(train_state.params), tree.flatten_paths(source.params)
    head = {name for name, label in labels.items() if label in (HEAD_WEIGHTS, HEAD_BIASES)}
    _check_fits(ours, theirs, head, "parameter")
    _check_fits(tree.flatten_paths(train_state.state), tree.flatten_paths(source.state), set(), "model state")
    reinitialise = any(ours[name].shape != theirs[name].shape for name in head)
    loaded = {name: (ours[name] if reinitialise and name in head else theirs[name]).to(ours[name]) for name in ours}
    params = tree.unflatten_paths(train_state.params, loaded)
    state = tree.tree_map(lambda mine, theirs_: theirs_.to(mine), train_state.state, source.state)
    train_state = train_state._replace(params=params, state=state, opt_state=optimizer.init(params))
    if train_state.ema is not None:
        train_state = start_ema(train_state)
    info = InitSource(str(path), source.step, source.weights, tuple(source.classes), reinitialise)
    return train_state, info


def _check_fits(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], exempt: set, what: str) -> None:
    """Raise a one-line CheckpointError unless the two flat trees have the same paths and, outside ``exempt``,
    the same shapes."""
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or extra:
        name = (missing or extra)[0]
        where = "the source lacks" if missing else "this run's model has no"
        raise CheckpointError(f"--init-from: {where} the {what} {name}: the source's model differs from this run's; "
                              "use the config the source was trained with (change only the data and training keys)")
    for name, mine in ours.items():
        if name not in exempt and mine.shape != theirs[name].shape:
            raise CheckpointError(f"--init-from: the {what} {name} is {tuple(theirs[name].shape)} in the source but "
                                  f"{tuple(mine.shape)} here: the source's model differs from this run's; use the "
                                  "config the source was trained with (change only the data and training keys)")
