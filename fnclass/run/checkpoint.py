"""Checkpoints: a TrainState as one safetensors file (tensors under their pytree paths, JSON metadata).

Tensor keys are the flat paths of the TrainState: ``params.stem.conv.weight``, ``state.stem.bn.mean``,
``opt_state.0.mu.stem.conv.weight``, ``step``, ``key``. The metadata holds the resolved config, the class
names, the input size, the normalisation and the fnclass version, each as JSON, and ``sha256``: the SHA-256 of the
whole file with that value written as 64 zeros, so a flipped bit anywhere (header, metadata or tensor bytes) is
found on load. Restoring builds the skeleton with the model's ``init`` on the meta device and fills it; nothing
is ever unpickled. Files are written to a temporary name, fsynced and renamed, so an existing checkpoint is never
left half-written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import safetensors
import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors

from fnclass._version import __version__
from fnclass.config import MAX_MEMBERS, Config, ConfigError, MembersConfig, config_from_dict, config_to_dict
from fnclass.core import tree
from fnclass.errors import InputError
from fnclass.io import write_atomic
from fnclass.models import Model, build_model, resolve_config

FORMAT = "fnclass.checkpoint/2"  # /2 records the checksum
UNSEALED_FORMATS = ("fnclass.checkpoint/1", "fnclass.export/1")  # written before checksums: loaded unverified
CHECKSUM = "sha256"  # the metadata field holding the file's checksum
_UNSET = "0" * 64  # the checksum's value while the file's checksum is computed
MAX_HEADER = 100 << 20  # a safetensors header longer than this is refused before it is read


class CheckpointError(InputError):
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
    input_size: tuple[int, int]
    step: int
    metadata: dict
    tensors: dict[str, torch.Tensor]
    members: tuple[dict, ...] = ()  # a run of K members: params and state stacked (K, ...), one dict per member
    weights: str = "raw"  # "ema": params and state are the run's exponential moving average (train.ema_decay)
    temperature: float = 1.0  # divides the logits for calibrated probabilities (fitted by `fnclass calibrate`)

    def member(self, index: int) -> Checkpoint:
        """Member ``index`` of a stacked checkpoint as a single model's checkpoint (config: its seed and values)."""
        if not self.members:
            raise CheckpointError("this checkpoint holds one model, not members: drop --member")
        if not 0 <= index < len(self.members):
            raise CheckpointError(f"member {index} does not exist: this checkpoint holds members "
                                  f"0..{len(self.members) - 1}")
        chosen = self.members[index]
        config = dataclasses.replace(self.config, members=MembersConfig(),
                                     train=dataclasses.replace(self.config.train, seed=chosen["seed"]))
        for key, value in chosen.items():
            if key != "seed":
                section, name = key.split(".")
                config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section),
                                                                                     **{name: value})})
        tensors = {k: v[index] for k, v in self.tensors.items()}
        # a temperature fitted to the ensemble's logits says nothing about one member's: dropped
        return self._replace(params=tree.tree_index(self.params, index), state=tree.tree_index(self.state, index),
                             config=config, tensors=tensors, members=(), temperature=1.0)

    def logits(self, images, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 (N, H, W, 3) images (a torch tensor or NumPy array) -> float32 logits in eval mode (members: the
        mean of their logits)."""
        return ensemble_logits(self.model, self.params, self.state, self.mean, self.std, dtype, images,
                               len(self.members))

    def calibrated_logits(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` divided by the checkpoint's temperature: their softmax is the calibrated probabilities."""
        return self.logits(images) / self.temperature

    def check_split(self, folder, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Refuse a data split this model cannot be run on: another image size, or labels beyond its classes."""
        from fnclass.data import DataError

        if tuple(images.shape[1:3]) != tuple(self.input_size):
            raise DataError(f"{folder}: images are {images.shape[1]}x{images.shape[2]} but the checkpoint's model "
                            f"takes {self.input_size[0]}x{self.input_size[1]}; use the data set it was trained on")
        if len(labels) and int(labels.max()) >= len(self.classes):
            raise DataError(f"{folder}: labels go up to {int(labels.max())} but the checkpoint knows "
                            f"{len(self.classes)} classes; use the data set it was trained on")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) images -> the normalised float NCHW tensor ``model.apply`` takes."""
        from fnclass.data import normalize

        return normalize(images, self.mean, self.std)


def save_checkpoint(path: str | Path, train_state, *, config: Config, classes, mean, std,
                    input_size: tuple[int, int], progress: dict | None = None, members: list | None = None,
                    learning_rate: float | list[float] | None = None) -> None:
    """Write a TrainState (params, model state, optimizer state, step, key) and its metadata.

    Args:
      path: the ``.safetensors`` file to write (atomically).
      train_state: the :class:`fnclass.training.step.TrainState`.
      config: the run's resolved config.
      classes: the class names, in label order.
      mean: per-channel normalisation mean.
      std: per-channel normalisation std.
      input_size: the (height, width) of the training images.
      progress: a run's sums over the epoch so far (JSON numbers), so that a resumed run's epoch row adds up
        as the uninterrupted run's does.
      members: for a stacked TrainState (K members on a leading axis), each member's seed and swept values.
      learning_rate: at an epoch end, the mean learning rate of the steps since the previous checkpoint kept for
        attribution (``checkpoint.every_epochs`` epochs; one per member of a stacked TrainState): the weight
        TracIn gives this checkpoint (:mod:`fnclass.analysis.influence`).
    """
    if config.model.num_classes is None:  # left to the data: the file records the number its classes say
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=len(classes)))
    flat = tree.flatten_paths(train_state._asdict())
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in flat.items()}
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config_to_dict(config)),
        "classes": json.dumps(list(classes)),
        "normalization": json.dumps({"mean": list(mean), "std": list(std)}),
        "input_size": json.dumps(list(input_size)),
        "fnclass_version": __version__,
        "step": str(int(train_state.step.reshape(-1)[0])),  # stacked members step together
    }
    if progress is not None:
        metadata["progress"] = json.dumps(progress)
    if members is not None:
        metadata["members"] = json.dumps(members)
    if learning_rate is not None:
        metadata["learning_rate"] = json.dumps(learning_rate)
    write_atomic(path, serialize(tensors, metadata))


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes whose metadata ``sha256`` is the SHA-256 of the file with that value as 64 zeros."""
    data = bytearray(safetensors.torch.save(tensors, metadata={**metadata, CHECKSUM: _UNSET}))
    at = _checksum_offset(data, _UNSET)
    if at is None:  # another metadata value is 64 zeros too; never written by fnclass
        raise ValueError("a metadata value equals the checksum placeholder")
    data[at:at + 64] = hashlib.sha256(data).hexdigest().encode()
    return bytes(data)


def _checksum_offset(data: bytes | bytearray, value: str) -> int | None:
    """Where the JSON string ``value`` (the checksum) sits in a safetensors header, if it occurs exactly once."""
    header = memoryview(data)[8:8 + int.from_bytes(data[:8], "little")].tobytes()
    needle = f'"{value}"'.encode()
    at = header.find(needle)
    if at < 0 or header.find(needle, at + 1) >= 0:
        return None
    return 8 + at + 1


def _header(path: Path, data: bytes) -> dict:
    """The JSON header of safetensors bytes, its length checked against the file before it is parsed."""
    if len(data) < 10:
        raise CheckpointError(f"{path}: {len(data)} bytes is too short for a safetensors file; it is truncated or "
                              "corrupted: use another file")
    size = int.from_bytes(data[:8], "little")
    if size > min(len(data) - 8, MAX_HEADER):
        raise CheckpointError(f"{path}: the header claims {size} bytes but the file has {len(data) - 8} after the "
                              "length field; it is truncated or corrupted: use another file")
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: the header is not valid JSON; the file is corrupted: use another "
                              "file") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the header is not a safetensors header (a table of tensors with string "
                              "metadata); the file is corrupted: use another file")
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2 and isinstance(entry["data_offsets"][1], int)]
    if ends and max(ends) > len(data) - 8 - size:
        raise CheckpointError(f"{path}: its tensors need {max(ends)} bytes but the file has {len(data) - 8 - size}; "
                              "it is truncated or corrupted: use another file")
    return header


def verify_checksum(path: Path, data: bytes, metadata: dict) -> bool:
    """Check the ``sha256`` the file records (a CheckpointError when it does not match); False when it has none."""
    recorded = metadata.get(CHECKSUM)
    if recorded is None:
        return False
    at = _checksum_offset(data, recorded) if len(recorded) == 64 else None
    digest = hashlib.sha256()
    if at is not None:
        view = memoryview(data)
        digest.update(view[:at])
        digest.update(_UNSET.encode())
        digest.update(view[at + 64:])
    if at is None or digest.hexdigest() != recorded:
        raise CheckpointError(f"{path}: checksum mismatch, the file changed after it was written (a flipped bit or "
                              "an edit); use another checkpoint (a run keeps checkpoints/step-*.safetensors)")
    return True


def copy_checkpoint(source: str | Path, path: str | Path) -> None:
    """Write the bytes of the checkpoint ``source`` to ``path`` too (atomically), without serialising it again."""
    write_atomic(path, Path(source).read_bytes())


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file's tensors and metadata, its checksum verified; every failure a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read it ({error.strerror or error})") from None
    metadata = _header(path, data).get("__metadata__", {})
    fnclass_format = metadata.get("format", "").startswith("fnclass.")
    if not verify_checksum(path, data, metadata) and fnclass_format and metadata["format"] not in UNSEALED_FORMATS:
        raise CheckpointError(f"{path}: its format ({metadata['format']}) records a checksum but the file has none; "
                              "the file was altered: use another file")
    try:
        tensors = load_safetensors(data)  # safetensors' own parser: no pickle anywhere
    except Exception as error:  # safetensors raises several types for truncated or garbled files
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(error)}); it may be "
                              "truncated or corrupted: use another checkpoint or re-run training") from None
    return tensors, metadata


def first_line(error: Exception) -> str:
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


WEIGHTS = ("auto", "ema", "raw")


def load_checkpoint(path: str | Path, *, weights: str = "auto") -> Checkpoint:
    """Load a checkpoint without pickle and rebuild its model.

    Args:
      path: a ``.safetensors`` file written by :func:`save_checkpoint`.
      weights: which weights ``params``/``state`` hold: ``"ema"`` the exponential moving average a run with
        ``train.ema_decay`` keeps, ``"raw"`` the trained weights themselves, ``"auto"`` the EMA when the file has
        one (the default of ``fnclass eval``, ``export`` and ``grads``).

    Returns:
      A :class:`Checkpoint`: ``model`` (``init``/``apply``), ``params``, ``state``, ``config``, ``classes``,
      ``preprocess(images)``, and the raw ``tensors`` (for restoring the optimizer state).

    Raises:
      CheckpointError: when the file is unreadable, not an fnclass checkpoint, or its tensors do not fit
        the model its config describes.
    """
    tensors, metadata = read_file(path)
    if metadata.get("format") not in (FORMAT, "fnclass.checkpoint/1"):
        raise CheckpointError(f"{path}: not an fnclass checkpoint (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})")
    config, classes, mean, std, input_size = read_model_metadata(path, metadata)
    members = read_members(path, metadata)
    model = build_model(config.model)
    has_ema = any(name.startswith("ema.") for name in tensors)
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights = {weights!r}: expected one of {', '.join(WEIGHTS)}")
    if weights == "ema" and not has_ema:
        raise CheckpointError(f"{path} holds no EMA weights (its run had train.ema_decay = 0): use the raw weights "
                              "(--weights raw)")
    chosen = "ema" if weights == "ema" or weights == "auto" and has_ema else "raw"
    params, state = restore_model(path, model, tensors, members=len(members),
                                  prefix="ema." if chosen == "ema" else "")
    return Checkpoint(model, params, state, config, classes, mean, std, input_size, int(metadata.get("step", 0)),
                      metadata, tensors, members, chosen, read_temperature(path, metadata, chosen))


def read_temperature(path, metadata: dict, weights: str) -> float:
    """The temperature a file records for ``weights`` (1.0 when none was fitted, or fitted to the other weights)."""
    if "temperature" not in metadata:
        return 1.0
    temperature = _metadata_json(path, metadata, "temperature")
    if type(temperature) not in (int, float) or not 0 < temperature < float("inf"):
        raise CheckpointError(f"{path}: metadata 'temperature' is {temperature!r}, not a positive number (the file "
                              "was altered); fit it again with `fnclass calibrate`")
    fitted_to = metadata.get("temperature_weights", weights)
    return float(temperature) if fitted_to == weights else 1.0


def set_temperature(path: str | Path, temperature: float, *, weights: str, calibration: dict,
                    out: str | Path | None = None) -> None:
    """Record a fitted temperature in a checkpoint's metadata (its tensors unchanged), atomically.

    Args:
      path: the checkpoint (its checksum is verified first).
      temperature: the fitted temperature (finite, positive).
      weights: the weights it was fitted to (``"raw"`` or ``"ema"``): loading the other ones ignores it.
      calibration: what to record beside it (the split, its size, NLL and ECE before and after): JSON.
      out: write the result here instead of over ``path``.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise CheckpointError(f"temperature {temperature!r}: expected a finite positive number; nothing written")
    tensors, metadata = read_file(path)
    if metadata.get("format") not in (FORMAT, "fnclass.checkpoint/1"):
        raise CheckpointError(f"{path}: not an fnclass training checkpoint (format {metadata.get('format')!r}); "
                              "calibrate the training checkpoint, then export it again")
    metadata = {**metadata, "format": FORMAT, "temperature": json.dumps(float(temperature)),
                "temperature_weights": weights, "calibration": json.dumps(calibration)}
    metadata.pop(CHECKSUM, None)
    write_atomic(out if out is not None else path, serialize(tensors, metadata))


def read_members(path, metadata: dict) -> tuple[dict, ...]:
    """The members a stacked file records (``()`` for one model), checked."""
    if "members" not in metadata:
        return ()
    members = _metadata_json(path, metadata, "members")
    allowed = {"seed", "optim.lr", "optim.weight_decay", "train.label_smoothing"}
    ok = (isinstance(members, list) and 1 <= len(members) <= MAX_MEMBERS
          and all(isinstance(m, dict) and type(m.get("seed")) is int and set(m) <= allowed
                  and all(type(v) in (int, float) for v in m.values()) for m in members))
    if not ok:
        raise CheckpointError(f"{path}: metadata 'members' is malformed (the file was altered); use another file")
    return tuple(members)


def ensemble_logits(model: Model, params, state, mean, std, dtype: torch.dtype, images: torch.Tensor,
                    members: int = 0) -> torch.Tensor:
    """Normalise uint8 NHWC images in ``dtype`` and run the model in eval mode: float32 logits.

    With ``members`` > 0, ``params`` and ``state`` are stacked and the logits are the mean of the members'.
    ``images``: a uint8 torch tensor or NumPy array (:func:`fnclass.data.as_images`).
    """
    from fnclass.data import as_images, normalize

    images = as_images(images)
    device = next(iter(tree.tree_leaves(params)), images).device
    x = normalize(images.to(device), mean, std, dtype)
    if not members:
        return model.apply(params, state, x, train=False)[0].float()
    total = None
    for i in range(members):
        logits = model.apply(tree.tree_index(params, i), tree.tree_index(state, i), x, train=False)[0].float()
        total = logits if total is None else total + logits
    return total / members


def read_model_metadata(path, metadata: dict) -> tuple[Config, tuple[str, ...], tuple, tuple, tuple[int, int]]:
    """The validated config, class names, normalisation mean/std and input size stored in a file's metadata."""
    raw = _metadata_json(path, metadata, "config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: metadata 'config' is not a table of sections (the file was altered)")
    try:
        config = resolve_config(config_from_dict(raw, f"{path} metadata"))
    except ConfigError as error:
        message = str(error)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: metadata {message}") from None
    classes = _metadata_json(path, metadata, "classes")
    normalization = _metadata_json(path, metadata, "normalization")
    # Checkpoints written before the input size was recorded all came from 32x32 CIFAR data.
    input_size = _metadata_json(path, {"input_size": "[32, 32]", **metadata}, "input_size")
    try:
        mean, std = (tuple(float(v) for v in normalization[name]) for name in ("mean", "std"))
        ok = (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
              and len(classes) == config.model.num_classes and len(mean) == len(std) == 3 and min(std) > 0
              and isinstance(input_size, list) and len(input_size) == 2
              and all(type(v) is int and 16 <= v <= 4096 for v in input_size))  # bools are ints in Python
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: metadata 'classes', 'normalization' or 'input_size' is malformed or "
                              "disagrees with the config (the file was altered); export the checkpoint again")
    return config, tuple(classes), mean, std, (input_size[0], input_size[1])


def restore_model(path, model: Model, tensors: dict, dtype: torch.dtype | None = None, *, members: int = 0,
                  prefix: str = ""):
    """``(params, state)`` of ``model`` filled from the ``params.*`` and ``state.*`` tensors of a file (with
    ``prefix = "ema."``: from ``ema.params.*`` and ``ema.state.*``).

    The skeleton is built on the meta device, so a tampered config cannot make this allocate memory
    before the tensors are checked against it. ``dtype`` is the floating dtype the tensors must have
    (default: the model's own). ``members`` > 0: the tensors are stacked, ``(members, ...)``.
    """
    try:
        with torch.device("meta"):
            skeleton_params, skeleton_state = model.init(torch.zeros(2, dtype=torch.int64))
            if members:
                stack = lambda leaf: torch.empty((members, *leaf.shape), dtype=leaf.dtype)
                skeleton_params, skeleton_state = tree.tree_map(stack, (skeleton_params, skeleton_state))
    except (RuntimeError, ValueError, OverflowError) as error:  # e.g. absurd widths in a tampered config
        raise CheckpointError(f"{path}: the model in its config cannot be built ({first_line(error)}); the file "
                              "was altered: use another file") from None
    return (_restore(path, skeleton_params, tensors, prefix + "params.", dtype),
            _restore(path, skeleton_state, tensors, prefix + "state.", dtype))


def _restore(path, skeleton, tensors: dict, prefix: str, dtype: torch.dtype | None = None):
    """Fill ``skeleton`` with the tensors stored under ``prefix``; a mismatch is a CheckpointError."""
    flat = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        restored = tree.unflatten_paths(skeleton, flat)
    except ValueError as error:
        raise CheckpointError(f"{path}: tensors do not fit the model in its config ({error})") from None
    for leaf, reference in zip(tree.tree_leaves(restored), tree.tree_leaves(skeleton)):
        expected = dtype if dtype is not None and reference.is_floating_point() else reference.dtype
        if leaf.dtype != expected:
            raise CheckpointError(f"{path}: expected {expected} tensors, found {leaf.dtype}")
    return restored


def restore_train_state(path: str | Path, skeleton):
    """Rebuild a full TrainState shaped like ``skeleton`` (optimizer state included) from a checkpoint."""
    return read_train_state(path, skeleton)[0]


def read_train_state(path: str | Path, skeleton) -> tuple[Any, dict]:
    """A checkpoint's TrainState shaped like ``skeleton``, and its ``progress`` metadata (``{}`` if none)."""
    tensors, metadata = read_file(path)
    restored = _restore(path, skeleton._asdict(), tensors, "")
    progress = _metadata_json(path, metadata, "progress") if "progress" in metadata else {}
    number = lambda v: type(v) in (int, float)
    if not isinstance(progress, dict) or not all(number(v) or type(v) is list and all(map(number, v))
                                                 for v in progress.values()):
        raise CheckpointError(f"{path}: metadata 'progress' is not a table of numbers (the file was altered)")
    return type(skeleton)(**restored), progress
