"""Stateless export: a trained model as pure data (safetensors) or as a self-contained program (pt2, ONNX).

* ``safetensors``: the inference weights only (params and BatchNorm statistics under their pytree paths,
  no optimizer state) and JSON metadata naming the model, its full config, the classes, the input size,
  the normalisation, the fnclass version and the SHA-256 of the source checkpoint.
  :func:`load_exported` rebuilds ``apply`` from that file alone; any implementation of the architecture
  can read it with ``safetensors`` and ``json``.
* ``pt2``: a ``torch.export`` program of ``apply(params, state, images, train=False)`` with the weights
  embedded, normalisation included and a dynamic batch dimension. It takes uint8 images (N, H, W, 3),
  exactly as the data files store them, returns float32 logits (N, classes), and runs with
  ``torch.export.load`` alone. The metadata travels as the archive's ``extra/fnclass.json``.
* ``onnx``: the same program through ``torch.onnx.export(dynamo=True)`` (the ``fnclass[onnx]`` extra), the
  metadata in the model's ``metadata_props``.

``--dtype`` casts the weights and runs the program in that dtype; logits come out as float32. Every file is
written to a temporary name and renamed.

A checkpoint calibrated by ``fnclass calibrate`` (or ``train.calibrate``) carries its temperature ``T`` into every
format: the metadata's ``temperature``, and the pt2 and ONNX programs return ``logits / T``, so their softmax is the
calibrated probabilities (the argmax, and so the accuracy, is unchanged). A safetensors export stores the weights
as trained and ``T`` in its metadata; :class:`Exported` and ``fnclass predict`` divide by it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from fnclass._version import __version__
from fnclass.config import ModelConfig, config_to_dict
from fnclass.core import random, tree
from fnclass.data import as_images, file_sha256, read_image
from fnclass.io import write_atomic
from fnclass.models import Model, build_model
from fnclass.run.checkpoint import (
    Checkpoint,
    CheckpointError,
    ensemble_logits,
    first_line,
    load_checkpoint,
    read_file,
    read_members,
    read_model_metadata,
    read_temperature,
    restore_model,
    serialize,
)

FORMAT = "fnclass.export/2"  # /2 records the checksum
READ_FORMATS = (FORMAT, "fnclass.export/1")  # /1 files (no checksum) still load
FORMATS = ("safetensors", "pt2", "onnx")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METADATA_NAME = "fnclass.json"  # the pt2 archive's extra file holding the metadata


class Exported(NamedTuple):
    """What :func:`load_exported` returns: the model and its inference weights, ready to classify."""

    model: Model
    params: Any
    state: Any
    config: ModelConfig
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int]
    dtype: torch.dtype
    metadata: dict
    members: tuple[dict, ...] = ()  # an ensemble export: stacked weights, logits are the members' mean

    def logits(self, images) -> torch.Tensor:
        """uint8 (N, H, W, 3) images (a torch tensor or NumPy array) -> float32 logits (N, classes), computed in the
        export's dtype."""
        return ensemble_logits(self.model, self.params, self.state, self.mean, self.std, self.dtype, images,
                               len(self.members))

    @property
    def temperature(self) -> float:
        """The temperature the export carries (1.0: not calibrated)."""
        return float(json.loads(self.metadata.get("temperature", "1.0")))

    def calibrated_logits(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` divided by the temperature: their softmax is the calibrated probabilities."""
        return self.logits(images) / self.temperature


class Predictor(NamedTuple):
    """Any model file as one function: uint8 (N, H, W, 3) images -> float32 logits (divided by the file's
    temperature, when it carries one: their softmax is the calibrated probabilities), plus what it knows."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    format: str
    weights: str = "raw"  # "ema" or "raw": the weights of the run that the file holds


def export_metadata(ckpt: Checkpoint, *, dtype: str, source_sha256: str) -> dict[str, str]:
    """The metadata every export carries (string values, as safetensors stores them)."""
    return {
        "format": FORMAT,
        "model": ckpt.config.model.name,
        "config": json.dumps(config_to_dict(ckpt.config)),
        "classes": json.dumps(list(ckpt.classes)),
        "input_size": json.dumps(list(ckpt.input_size)),
        "input": "uint8 images (N, H, W, 3), RGB, 0-255; normalised inside the program (pt2, onnx)",
        "normalization": json.dumps({"mean": list(ckpt.mean), "std": list(ckpt.std)}),
        "dtype": dtype,
        "fnclass_version": __version__,
        "source_sha256": source_sha256,
        "source_step": str(ckpt.step),
        "weights": ckpt.weights,
        "temperature": json.dumps(ckpt.temperature),
        "output": "logits divided by the temperature: their softmax is the calibrated probabilities (pt2, onnx)",
        **({"members": json.dumps(list(ckpt.members))} if ckpt.members else {}),
    }


def inference_tensors(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Params and model state under their flat paths (``params.*``, ``state.*``), floating ones cast to ``dtype``."""
    flat = tree.flatten_paths({"params": ckpt.params, "state": ckpt.state})
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in flat.items()}


class _Program(torch.nn.Module):
    """The thin stateful wrapper ``torch.export`` needs: the weights as buffers, ``forward`` calls ``apply``."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype):
        super().__init__()
        self.ckpt, self.dtype = ckpt, dtype
        self.treespec = tree.tree_structure({"params": ckpt.params, "state": ckpt.state})
        # inference_tensors keeps optree's leaf order; buffer names may not contain ".", so they are numbered.
        for i, leaf in enumerate(inference_tensors(ckpt, dtype).values()):
            self.register_buffer(f"w{i}", leaf)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        leaves = [getattr(self, f"w{i}") for i in range(self.treespec.num_leaves)]
        weights = tree.tree_unflatten(self.treespec, leaves)
        logits = ensemble_logits(self.ckpt.model, weights["params"], weights["state"], self.ckpt.mean,
                                 self.ckpt.std, self.dtype, images, len(self.ckpt.members))
        return logits if self.ckpt.temperature == 1.0 else logits / self.ckpt.temperature


def export_program(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> torch.export.ExportedProgram:
    """``torch.export`` the checkpoint's eval-mode ``apply`` with normalisation and a dynamic batch dimension."""
    height, width = ckpt.input_size
    example = torch.zeros(2, height, width, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    return torch.export.export(_Program(ckpt, dtype).eval(), (example,), dynamic_shapes={"images": {0: batch}},
                               strict=False)


def export_checkpoint(checkpoint_path: str | Path, out: str | Path, *, format: str = "safetensors",
                      dtype: str = "float32", member: int | None = None, ensemble: bool = False,
                      weights: str = "auto") -> dict:
    """Export a training checkpoint as inference weights or a standalone program.

    Args:
      checkpoint_path: a checkpoint written by ``fnclass train``.
      out: the file to write (atomically); its folder is created.
      format: ``"safetensors"``, ``"pt2"`` or ``"onnx"``.
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the weights' dtype and the program's compute dtype.
      member: export this member of a stacked checkpoint (a run of members) as one model.
      ensemble: export all members of a stacked checkpoint as one model whose logits are their mean.
      weights: ``"auto"`` (the EMA weights when the checkpoint keeps them), ``"ema"`` or ``"raw"``; recorded
        in the export's metadata.

    Returns:
      A summary: the output path, format, dtype, size in bytes and the metadata written.

    Raises:
      CheckpointError: when the checkpoint is unreadable or the format/dtype pair cannot be exported.
    """
    if format not in FORMATS or dtype not in DTYPES:
        raise CheckpointError(f"cannot export format {format!r} with dtype {dtype!r}: formats are "
                              f"{', '.join(FORMATS)}; dtypes {', '.join(DTYPES)}")
    if format == "onnx" and dtype == "bfloat16":
        raise CheckpointError("ONNX Runtime has no bfloat16 convolution: export ONNX with --dtype float16 or float32")
    ckpt = load_checkpoint(checkpoint_path, weights=weights)
    if ckpt.members and member is None and not ensemble:
        raise CheckpointError(f"{checkpoint_path} holds {len(ckpt.members)} members: choose --member I (one of "
                              f"0..{len(ckpt.members) - 1}) or --ensemble (their mean logits)")
    if member is not None and ensemble:
        raise CheckpointError("--member and --ensemble exclude each other: choose one")
    if ensemble and not ckpt.members:
        raise CheckpointError(f"{checkpoint_path} holds one model, not members: drop --ensemble")
    if member is not None:
        ckpt = ckpt.member(member)
    metadata = export_metadata(ckpt, dtype=dtype, source_sha256=file_sha256(Path(checkpoint_path)))
    writers = {"safetensors": _write_safetensors, "pt2": _write_pt2, "onnx": _write_onnx}
    writers[format](ckpt, Path(out), DTYPES[dtype], metadata)
    return {"path": str(out), "format": format, "dtype": dtype, "bytes": Path(out).stat().st_size,
            "max_abs_logit_diff": _check_export(ckpt, out), "metadata": metadata}


def _check_export(ckpt: Checkpoint, out: Path, count: int = 16) -> float:
    """Read the written file back and compare its logits with the checkpoint's on ``count`` random images."""

    height, width = ckpt.input_size
    images = random.randint(random.key(0), (count, height, width, 3), 0, 256).to(torch.uint8)
    with torch.no_grad():
        expected = ckpt.calibrated_logits(images)
        return float((load_predictor(out, trust_program=True).logits(images) - expected).abs().max())


def _write_safetensors(ckpt: Checkpoint, out: Path, dtype: torch.dtype, metadata: dict) -> None:
    """Inference weights and metadata as one safetensors file."""
    write_atomic(out, serialize(inference_tensors(ckpt, dtype), metadata))


def _write_pt2(ckpt: Checkpoint, out: Path, dtype: torch.dtype, metadata: dict) -> None:
    """The exported program, weights embedded, with the metadata as an extra file of the archive."""
    buffer = io.BytesIO()
    torch.export.save(export_program(ckpt, dtype), buffer, extra_files={METADATA_NAME: json.dumps(metadata)})
    write_atomic(out, buffer.getvalue())


def _write_onnx(ckpt: Checkpoint, out: Path, dtype: torch.dtype, metadata: dict) -> None:
    """The exported program converted by ``torch.onnx.export(dynamo=True)``, metadata in ``metadata_props``."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs onnx and onnxscript; the written file is checked with onnxruntime)
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise CheckpointError("ONNX export needs the onnx extra: pip install 'fnclass[onnx]'") from None
    program = torch.onnx.export(export_program(ckpt, dtype), dynamo=True, verbose=False)
    program.model.metadata_props.update(metadata)
    write_atomic(out, program.model_proto.SerializeToString())


def load_exported(path: str | Path) -> Exported:
    """Rebuild a model from an exported safetensors file alone (no pickle, no training checkpoint).

    Args:
      path: a file written by ``fnclass export --format safetensors``.

    Returns:
      An :class:`Exported`: ``model``, ``params``, ``state`` (in the export's dtype), ``config``, ``classes``,
      ``mean``/``std``, ``input_size`` and ``logits(images)`` for uint8 NHWC images.

    Raises:
      CheckpointError: when the file is unreadable, not an fnclass export, or its weights do not fit its config.
    """
    tensors, metadata = read_file(path)
    if metadata.get("format") not in READ_FORMATS:
        hint = " (a training checkpoint: use load_checkpoint)" if metadata.get("format", "").startswith(
            "fnclass.checkpoint") else ""
        raise CheckpointError(f"{path}: not an fnclass export (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r}){hint}")
    if metadata.get("dtype") not in DTYPES:
        raise CheckpointError(f"{path}: metadata dtype {metadata.get('dtype')!r} is not one of "
                              f"{', '.join(DTYPES)} (the file was altered)")
    config, classes, mean, std, input_size = read_model_metadata(path, metadata)
    model = build_model(config.model)
    dtype = DTYPES[metadata["dtype"]]
    members = read_members(path, metadata)
    params, state = restore_model(path, model, tensors, dtype, members=len(members))
    read_temperature(path, metadata, metadata.get("weights", "raw"))  # refuses a damaged value
    return Exported(model, params, state, config.model, classes, mean, std, input_size, dtype, metadata, members)


def load_for_evaluation(path: str | Path, *, weights: str = "auto") -> Checkpoint:
    """A training checkpoint, or a safetensors export as one (weights widened to float32, no optimizer state).

    What ``fnclass eval`` runs on: exports compute in float32 whatever dtype stores their weights, the way the
    model zoo's cards measure accuracy.

    Raises:
      CheckpointError: when the file is neither, or is damaged.
    """
    _, metadata = read_file(path)
    if metadata.get("format") not in READ_FORMATS:
        return load_checkpoint(path, weights=weights)
    recorded = _exported_weights(path, metadata.get("weights", "raw"), weights)
    exported = load_exported(path)
    config, *_ = read_model_metadata(path, metadata)
    widen = lambda leaf: leaf.float() if leaf.is_floating_point() else leaf
    params, state = tree.tree_map(widen, (exported.params, exported.state))
    return Checkpoint(exported.model, params, state, config, exported.classes, exported.mean, exported.std,
                      exported.input_size, int(metadata.get("source_step", 0)), metadata, {}, exported.members,
                      recorded, exported.temperature)


def _exported_weights(path, recorded: str, weights: str) -> str:
    """The weights an export holds (``recorded``), when they are the ones asked for (``auto`` takes either)."""
    if weights not in ("auto", recorded):
        raise CheckpointError(f"{path} is an export of the {recorded} weights, not the {weights} ones: export the "
                              f"training checkpoint again with --weights {weights}")
    return recorded


def load_predictor(path: str | Path, *, trust_program: bool = False, weights: str = "auto") -> Predictor:
    """Open any model file (training checkpoint, safetensors export, pt2 or ONNX) as a :class:`Predictor`.

    The format is recognised from the file's first bytes, not its name. A pt2 archive is a program: loading
    it evaluates Python code stored in it (torch.export's guards and shape expressions), so it is opened only
    with ``trust_program=True`` — for files you made or trust; checkpoints, safetensors exports and ONNX
    models are data and need no trust.

    ``weights``: ``"auto"`` (a checkpoint's EMA when it has one; an export's own), ``"ema"`` or ``"raw"``; an export
    of the other weights is refused. The predictor's ``weights`` names those it runs.

    Raises:
      CheckpointError: when the file is missing, of no known format, damaged, or an untrusted pt2 program.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK"):
        if not trust_program:
            raise CheckpointError(f"{path}: a pt2 program, and loading one runs code it contains; pass "
                                  "--trust-program if you made it or trust its source (or use a safetensors export)")
        predictor = _pt2_predictor(path)
    elif _looks_like_safetensors(path, head):
        _, metadata = read_file(path)
        if metadata.get("format") not in READ_FORMATS:
            ckpt = load_checkpoint(path, weights=weights)
            return Predictor(ckpt.calibrated_logits, ckpt.classes, ckpt.input_size, "checkpoint", ckpt.weights)
        exported = load_exported(path)
        predictor = Predictor(exported.calibrated_logits, exported.classes, exported.input_size, "safetensors",
                              exported.metadata.get("weights", "raw"))
    elif path.suffix == ".onnx" or head[:1] == b"\x08":  # an ONNX ModelProto starts with field 1 (ir_version)
        predictor = _onnx_predictor(path)
    else:
        raise CheckpointError(f"{path}: not a checkpoint, safetensors, pt2 or ONNX model file; pass a file written "
                              "by `fnclass train` or `fnclass export`")
    _exported_weights(path, predictor.weights, weights)
    return predictor
    raise CheckpointError(f"{path}: not a checkpoint, safetensors, pt2 or ONNX model file; pass a file written by "
                          "`fnclass train` or `fnclass export`")


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    """A safetensors file starts with a little-endian u64 header length followed by ``{``."""
    if len(head) < 8:
        return False
    with open(path, "rb") as handle:
        handle.seek(8)
        return handle.read(1) == b"{"


def _program_metadata(path: Path, text: str | None) -> tuple[tuple[str, ...], tuple[int, int], str]:
    """Classes, input size and weights (``ema`` or ``raw``) from a program's embedded metadata JSON."""
    try:
        metadata = json.loads(text) if isinstance(text, str) else text
        classes, size = json.loads(metadata["classes"]), json.loads(metadata["input_size"])
        if metadata.get("format") not in READ_FORMATS or not all(isinstance(c, str) for c in classes):
            raise ValueError
        weights = metadata.get("weights", "raw")
        if weights not in ("ema", "raw"):
            raise ValueError
        return tuple(classes), (int(size[0]), int(size[1])), weights
    except (TypeError, KeyError, ValueError, IndexError):
        raise CheckpointError(f"{path}: no fnclass metadata in this model file (was it written by "
                              "`fnclass export`?)") from None


def _pt2_predictor(path: Path) -> Predictor:
    """A torch.export archive as a Predictor (the archive's CRCs are checked first)."""
    extra = {METADATA_NAME: ""}
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise ValueError(f"member {damaged} fails its CRC check")
        with _quiet("torch.export"), _weights_only_loads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the weights-only unpickler warns about a crafted pickle's protocol
            program = torch.export.load(str(path), extra_files=extra)
        module = program.module()
    except Exception as error:  # zipfile, torch's deserialiser and its weights loader raise many types
        # torch's own message for a refused pickle recommends the unsafe weights_only=False: not repeated here.
        reason = "it holds objects that are not tensors" if "eights only" in str(error) else first_line(error)
        raise CheckpointError(f"{path}: not a readable pt2 program ({reason}); "
                              "export it again with `fnclass export --format pt2`") from None
    classes, size, weights = _program_metadata(path, extra[METADATA_NAME])
    return Predictor(lambda images: module(as_images(images)), classes, size, "pt2", weights)


@contextlib.contextmanager
def _weights_only_loads():
    """Force every ``torch.load`` in the block to be weights-only.

    ``torch.export.load`` unpickles parts of an archive with ``weights_only=False`` when the archive asks for
    it (or as a fallback), so a crafted pt2 file could run code; torch's override closes that door.
    """
    saved = {name: os.environ.pop(name, None) for name in _LOAD_OVERRIDES}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


_LOAD_OVERRIDES = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence a library logger (``torch.export`` logs a traceback before raising) for a block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _onnx_predictor(path: Path) -> Predictor:
    """An ONNX model run by onnxruntime as a Predictor."""
    try:
        import onnxruntime
    except ImportError:
        raise CheckpointError("running an ONNX model needs the onnx extra: pip install 'fnclass[onnx]'") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types for every kind of bad file
        raise CheckpointError(f"{path}: not a readable ONNX model ({first_line(error)}); "
                              "export it again with `fnclass export --format onnx`") from None
    classes, size, weights = _program_metadata(path, session.get_modelmeta().custom_metadata_map)
    name = session.get_inputs()[0].name

    def logits(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: as_images(images).cpu().numpy()})[0])
    return Predictor(logits, classes, size, "onnx", weights)


def predict(path: str | Path, image_paths, *, top: int = 5, trust_program: bool = False,
            predictor: Predictor | None = None, weights: str = "auto") -> dict:
    """Classify image files with any model file: the top-``top`` classes and probabilities of each.

    Args:
      path: a checkpoint, safetensors export, pt2 or ONNX file.
      image_paths: PNG/JPEG files of any size (resized to the model's input size).
      top: how many classes to report per image.
      trust_program: allow a pt2 program (see :func:`load_predictor`).
      predictor: an already loaded model (e.g. :func:`fnclass.run.zoo.predictor`); ``path`` then only names it.
      weights: ``"auto"``, ``"ema"`` or ``"raw"`` (see :func:`load_predictor`).

    Returns:
      ``{"model": ..., "format": ..., "weights": ..., "predictions": [{"image", "top": [{"class",
      "probability"}]}]}``.

    Raises:
      CheckpointError, DataError: for a bad model file or an image that cannot be decoded.
    """

    if predictor is None:
        predictor = load_predictor(path, trust_program=trust_program, weights=weights)
    else:
        _exported_weights(path, predictor.weights, weights)
    height, width = predictor.input_size
    images = torch.stack([torch.tensor(read_image(Path(p), (height, width))) for p in image_paths])
    try:
        with torch.no_grad():
            probabilities = torch.softmax(predictor.logits(images).float(), dim=-1)
    except Exception as error:  # a program whose metadata disagrees with its graph fails here, in torch or ORT
        raise CheckpointError(f"{path}: the model failed on {height}x{width} images ({first_line(error)}); its "
                              "metadata does not fit the model: export it again") from None
    k = min(top, len(predictor.classes))
    values, indices = probabilities.topk(k, dim=-1)
    predictions = [{"image": str(p), "top": [{"class": predictor.classes[int(i)], "probability": float(v)}
                                             for v, i in zip(row_v, row_i)]}
                   for p, row_v, row_i in zip(image_paths, values, indices)]
    return {"model": str(path), "format": predictor.format, "weights": predictor.weights, "predictions": predictions}
