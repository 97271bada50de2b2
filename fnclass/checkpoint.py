"""Checkpoints: a TrainState as one safetensors file (tensors under their pytree paths, JSON metadata).

Tensor keys are the flat paths of the TrainState: ``params.stem.conv.weight``, ``state.stem.bn.mean``,
``opt_state.0.mu.stem.conv.weight``, ``step``, ``key``. The metadata holds the resolved config, the class
names, the normalisation and the fnclass version, each as JSON. Restoring builds the skeleton with the
model's ``init`` and fills it; nothing is ever unpickled. Files are written to a temporary name and
renamed, so an existing checkpoint is never left half-written.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import safetensors
import safetensors.torch
import torch

from fnclass import tree
from fnclass.config import Config, ConfigError, config_from_dict, config_to_dict
from fnclass.models import Model, build_model

FORMAT = "fnclass.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, tampered with or does not fit its config."""


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns: everything needed to run (or continue) the model."""

    model: Model
    params: Any
    state: Any
    config: Config
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    step: int
    metadata: dict
    tensors: dict[str, torch.Tensor]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) images -> the normalised float NCHW tensor ``model.apply`` takes."""
        from fnclass.data import normalize

        return normalize(images, self.mean, self.std)


def write_atomic(path: str | Path, payload: bytes) -> None:
    """Write bytes to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, train_state, *, config: Config, classes, mean, std) -> None:
    """Write a TrainState (params, model state, optimizer state, step, key) and its metadata.

    Args:
      path: the ``.safetensors`` file to write (atomically).
      train_state: the :class:`fnclass.train.TrainState`.
      config: the run's resolved config.
      classes: the class names, in label order.
      mean: per-channel normalisation mean.
      std: per-channel normalisation std.
    """
    flat = tree.flatten_paths(train_state._asdict())
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in flat.items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config_to_dict(config)),
        "classes": json.dumps(list(classes)),
        "normalization": json.dumps({"mean": list(mean), "std": list(std)}),
        "fnclass_version": _version(),
        "step": str(int(train_state.step)),
    }
    write_atomic(path, safetensors.torch.save(tensors, metadata=metadata))


def _version() -> str:
    """The installed fnclass version."""
    from fnclass import __version__

    return __version__


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file's tensors and metadata, turning every failure into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises several types for truncated or garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(error)}); it may be "
                              "truncated or corrupted: use another checkpoint or re-run training") from None
    return tensors, metadata


def _first_line(error: Exception) -> str:
    """An exception's message cut to its first line."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def _metadata_json(path, metadata: dict, name: str):
    """One JSON field of the metadata, or a one-line error."""
    if name not in metadata:
        raise CheckpointError(f"{path}: metadata has no {name!r}; this is not an fnclass checkpoint")
    try:
        return json.loads(metadata[name])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata field {name!r} is not valid JSON (the file was altered)") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint without pickle and rebuild its model.

    Args:
      path: a ``.safetensors`` file written by :func:`save_checkpoint`.

    Returns:
      A :class:`Checkpoint`: ``model`` (``init``/``apply``), ``params``, ``state``, ``config``, ``classes``,
      ``preprocess(images)``, and the raw ``tensors`` (for restoring the optimizer state).

    Raises:
      CheckpointError: when the file is unreadable, not an fnclass checkpoint, or its tensors do not fit
        the model its config describes.
    """
    tensors, metadata = read_file(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an fnclass checkpoint (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})")
    try:
        config = config_from_dict(_metadata_json(path, metadata, "config"), f"{path} metadata").resolved()
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    normalization = _metadata_json(path, metadata, "normalization")
    classes = tuple(_metadata_json(path, metadata, "classes"))
    model = build_model(config.model)
    skeleton_params, skeleton_state = model.init(torch.zeros(2, dtype=torch.int64))
    params = _restore(path, skeleton_params, tensors, "params.")
    state = _restore(path, skeleton_state, tensors, "state.")
    return Checkpoint(model, params, state, config, classes, tuple(normalization["mean"]),
                      tuple(normalization["std"]), int(metadata.get("step", 0)), metadata, tensors)


def _restore(path, skeleton, tensors: dict, prefix: str):
    """Fill ``skeleton`` with the tensors stored under ``prefix``; a mismatch is a CheckpointError."""
    flat = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        restored = tree.unflatten_paths(skeleton, flat)
    except ValueError as error:
        raise CheckpointError(f"{path}: tensors do not fit the model in its config ({error})") from None
    for leaf, reference in zip(tree.tree_leaves(restored), tree.tree_leaves(skeleton)):
        if leaf.dtype != reference.dtype:
            raise CheckpointError(f"{path}: expected {reference.dtype} tensors, found {leaf.dtype}")
    return restored


def restore_train_state(path: str | Path, skeleton):
    """Rebuild a full TrainState shaped like ``skeleton`` (optimizer state included) from a checkpoint."""
    tensors, _ = read_file(path)
    restored = _restore(path, skeleton._asdict(), tensors, "")
    return type(skeleton)(**restored)
