"""Datasets in the canonical on-disk format: a folder of ``.npy`` arrays plus ``classes.txt``.

``train_images.npy`` (N, H, W, 3) uint8 RGB, ``train_labels.npy`` (N,) integers, the same for ``test_*``,
and ``classes.txt`` with one class name a line in label order. Arrays are loaded without pickle and
validated, then kept as uint8 tensors; batches are cut and normalised on the device.

Writing (:func:`write_dataset`, :func:`prepare`) and finding (:func:`resolve_data_dir`) such folders also lives
here; the files are plain ``.npy`` arrays and text, never pickles.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import importlib
import math
import os
import re
import tokenize
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from fnclass.errors import InputError
from fnclass.io import fsync_folder, read_small, write_temp

FILES = ("train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy", "classes.txt")
MAX_CLASSES_BYTES = 1 << 20  # 20,000 class names of 50 characters fit in a MiB; a larger file is not a class list
MAX_INDICES_BYTES = 64 << 20  # eight million 7-digit lines; a larger text file is not a list of indices
INDEX_SUFFIXES = (".npy", ".txt", ".csv")
INDEX = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take "1_000" and other scripts' digits
INDEX_FORMAT = ("write the 0-based rows of train_images.npy to keep as integers, one a line (.txt; .csv: the first "
                "column, under an optional 'index' header), or as a 1-d integer array (.npy)")


class DataError(InputError):
    """The data folder is missing or malformed; the message names the file and the fix."""


class Dataset(NamedTuple):
    """A labelled image classification dataset held as tensors (images uint8 NHWC, labels int64)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]


REMAKE = "re-create it with `fnclass data prepare`"  # the fix for a broken file of a data folder


def _check_npy_header(path: Path, handle, fix: str = REMAKE) -> None:
    """Check a ``.npy`` header against the file before anything is allocated: no objects, sizes that agree."""
    try:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"format version {version[0]}.{version[1]} is not read here")
        shape, _fortran_order, dtype = read_header[version](handle)
    except (ValueError, SyntaxError, TypeError, EOFError, tokenize.TokenError) as error:  # numpy's header parser
        raise DataError(f"{path} is not a readable .npy array (bad header: {error}); {fix}") from None
    if dtype.hasobject:
        raise DataError(f"{path} holds Python objects (a pickle), which are never loaded: save plain numbers with "
                        f"np.save(..., allow_pickle=False) or {fix}")
    needed = math.prod(shape) * dtype.itemsize
    held = os.fstat(handle.fileno()).st_size - handle.tell()
    if held != needed or any(side < 0 for side in shape):
        # A header may claim any shape: comparing it with the file's size refuses (10**12, 32, 32, 3) before
        # np.load allocates that, and names a truncated copy as such.
        raise DataError(f"{path} is damaged: its header says {dtype} {shape} ({needed:,} bytes) but the file holds "
                        f"{held:,} bytes of data; copy it again or {fix}")


def _load_array(path: Path, fix: str = REMAKE) -> np.ndarray:
    """``np.load`` without pickle, its header checked against the file first; every failure is one DataError line."""
    if not path.is_file():
        raise DataError(f"{path} is {'not a file' if path.exists() else 'missing'}: a data folder needs "
                        f"{', '.join(FILES)} (write one with `fnclass data prepare`)")
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise DataError(f"{path} cannot be read ({error.strerror}); check its permissions") from None
    with handle:
        _check_npy_header(path, handle, fix)
        handle.seek(0)
        try:
            return np.load(handle, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(f"{path} is not a readable .npy array ({error}); {fix}") from None


def _check_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    """Validate one split's shapes, dtypes, size and label range."""
    where = folder / f"{split}_images.npy"
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3]:
        raise DataError(f"{where}: expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise DataError(f"{where}: the {split} split needs at least one image")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{folder / f'{split}_labels.npy'}: expected a 1-d integer array, "
                        f"got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{folder / f'{split}_labels.npy'}: {len(labels)} labels for {len(images)} images in "
                        f"{split}_images.npy; the two files must come from the same write")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{folder / f'{split}_labels.npy'}: labels must lie in 0..{num_classes - 1} "
                        f"(classes.txt has {num_classes} lines), found {labels.min()}..{labels.max()}")


def load_classes(folder: Path) -> tuple[str, ...]:
    """The class names from ``classes.txt``, one a line."""
    path = Path(folder) / "classes.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing: write one class name a line, in label order")
    raw = read_small(path, MAX_CLASSES_BYTES, DataError, "class list")
    try:
        lines = raw.decode("utf-8-sig").splitlines()  # -sig: a byte-order mark from a Windows editor is not a name
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start} is {raw[error.start]:#04x}): save it as "
                        "UTF-8") from None
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line.strip():  # skipping it would shift every later class onto the wrong label
            raise DataError(f"{path}: line {number} is empty; write one class name a line, in label order")
    return _check_classes(Path(folder), [line.strip() for line in lines])


def _out_of_range(path: Path, index, size: int, where: str = "") -> DataError:
    """The error for an index outside ``0..size - 1``."""
    return DataError(f"{path}: {where}index {index} is out of range: the training split has {size:,} images, "
                     f"indices 0..{size - 1}")


def _parse_index(text: str, path: Path, line: int, size: int) -> int:
    """One line's index in ``0..size - 1``, or one DataError line naming it."""
    if INDEX.fullmatch(text) is None:
        raise DataError(f"{path}: line {line} is {repr(text)[:60]}, not an integer; {INDEX_FORMAT}")
    # Twenty digits are beyond int64 (and int() refuses thousands): out of range before they are converted.
    if len(text.lstrip("+-").lstrip("0")) > 19 or not 0 <= int(text) < size:
        raise _out_of_range(path, text[:60], size, f"line {line}: ")
    return int(text)


def _text_indices(path: Path, size: int) -> np.ndarray:
    """The indices of a ``.txt`` or ``.csv`` file (a CSV's first column, under an optional ``index`` header)."""
    raw = read_small(path, MAX_INDICES_BYTES, DataError, "index list")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte {error.start} is {raw[error.start]:#04x}); "
                        f"{INDEX_FORMAT}") from None
    lines = text.splitlines()
    if path.suffix.lower() == ".csv":
        try:
            lines = [row[0] if row else "" for row in csv.reader(lines)]
        except csv.Error as error:
            raise DataError(f"{path} is not a readable CSV file ({error}); {INDEX_FORMAT}") from None
        if lines and lines[0].strip().lower() == "index":
            lines[0] = ""  # the header (line numbers in messages stay the file's)
    return np.array([_parse_index(line.strip(), path, number, size) for number, line in enumerate(lines, 1)
                     if line.strip()], dtype=np.int64)


def read_indices(path: str | Path, size: int) -> torch.Tensor:
    """The rows of a split that a file of indices selects (``data.train_indices``), sorted.

    The file is a ``.npy`` 1-d integer array (read without pickle), or text: ``.txt`` with one integer a line, or
    ``.csv`` whose first column is read, under an optional header whose first column is ``index`` (such as
    ``fnclass grads --score``'s ``scores.csv`` and ``kept_indices.txt``). Blank lines are skipped. A relative path is
    relative to the current directory. The order in the file does not matter: the selected images keep the split's
    order, that of the sorted indices.

    Args:
      path: the file.
      size: the number of images in the split the indices point into (rows ``0..size - 1``).

    Returns:
      The sorted int64 CPU tensor of the selected rows.

    Raises:
      DataError: one line naming the file, when it is missing, unreadable, not integers, empty, has an index
        twice, or one outside ``0..size - 1`` (the first such one is named).
    """
    path = Path(path).expanduser()
    if path.suffix.lower() not in INDEX_SUFFIXES:
        raise DataError(f"{path}: expected a .npy, .txt or .csv file of indices; {INDEX_FORMAT}")
    if not path.is_file():
        raise DataError(f"{path} is {'not a file' if path.exists() else 'missing'}: data.train_indices names a "
                        "file of training-image indices, such as the kept_indices.txt of `fnclass grads --score`; "
                        "check the path (relative paths start at the current directory)")
    if path.suffix.lower() == ".npy":
        indices = _load_array(path, fix=INDEX_FORMAT)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise DataError(f"{path}: expected a 1-d integer array, got {indices.dtype} {indices.shape}; "
                            f"{INDEX_FORMAT}")
    else:
        indices = _text_indices(path, size)
    if len(indices) == 0:
        raise DataError(f"{path} selects no images: it must hold at least one index; {INDEX_FORMAT}")
    outside = np.flatnonzero((indices < 0) | (indices >= size))
    if len(outside):
        raise _out_of_range(path, indices[outside[0]], size)
    indices = np.sort(indices.astype(np.int64))
    repeated = indices[1:][indices[1:] == indices[:-1]]
    if len(repeated):
        raise DataError(f"{path}: index {repeated[0]} is listed more than once; list each training image once")
    return torch.from_numpy(indices)


WEIGHTS_FORMAT = ("write one finite, non-negative loss weight per row of train_images.npy, in its order: a 1-d float "
                  "array (.npy) or one number a line (.txt)")


def read_weights(path: str | Path, size: int) -> torch.Tensor:
    """A loss weight for each row of a split (``data.train_weights``), as a float32 CPU tensor of length ``size``.

    The file is a ``.npy`` 1-d numeric array (read without pickle) or ``.txt`` text, one number a line (blank lines
    skipped). A relative path is relative to the current directory.

    Raises:
      DataError: one line naming the file, when it is missing, unreadable, not numbers, of another length than
        the split, or holds a negative or non-finite weight (the first such row is named).
    """
    path = Path(path).expanduser()
    if path.suffix.lower() not in (".npy", ".txt"):
        raise DataError(f"{path}: expected a .npy or .txt file of loss weights; {WEIGHTS_FORMAT}")
    if not path.is_file():
        raise DataError(f"{path} is {'not a file' if path.exists() else 'missing'}: data.train_weights names a file "
                        "of loss weights; check the path (relative paths start at the current directory)")
    if path.suffix.lower() == ".npy":
        weights = _load_array(path, fix=WEIGHTS_FORMAT)
        if weights.ndim != 1 or not (np.issubdtype(weights.dtype, np.floating)
                                     or np.issubdtype(weights.dtype, np.integer)):
            raise DataError(f"{path}: expected a 1-d numeric array, got {weights.dtype} {weights.shape}; "
                            f"{WEIGHTS_FORMAT}")
        weights = weights.astype(np.float64)
    else:
        lines = read_small(path, MAX_INDICES_BYTES, DataError, "weight list").decode("utf-8", "replace").splitlines()
        values = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    values.append(float(line.strip()))
                except ValueError:
                    raise DataError(f"{path}: line {number} is {repr(line.strip())[:60]}, not a number; "
                                    f"{WEIGHTS_FORMAT}") from None
        weights = np.array(values, dtype=np.float64)
    if len(weights) != size:
        raise DataError(f"{path} holds {len(weights)} weights but train_images.npy has {size} rows; "
                        f"{WEIGHTS_FORMAT}")
    bad = np.flatnonzero(~np.isfinite(weights) | (weights < 0))
    if len(bad):
        raise DataError(f"{path}: the weight of row {bad[0]} is {weights[bad[0]]}; {WEIGHTS_FORMAT}")
    return torch.from_numpy(weights.astype(np.float32))


def load_split(folder: str | Path, split: str, *, limit: int | None = None,
               indices: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and validate one split (``"train"`` or ``"test"``) as ``(images uint8 NHWC, labels int64)``.

    Args:
      folder: the data folder.
      split: ``"train"`` or ``"test"``.
      limit: keep only the first ``limit`` examples (the canonical files are in shuffled order).
      indices: instead, keep the rows a file of indices selects, in sorted order (:func:`read_indices`).

    Returns:
      CPU tensors ``(images, labels)``.

    Raises:
      DataError: when a file is missing, unreadable or malformed.
    """
    if limit is not None and indices is not None:
        raise ValueError("load_split takes a limit or indices, not both")
    folder = Path(folder)
    classes = load_classes(folder)
    images = _load_array(folder / f"{split}_images.npy")
    labels = _load_array(folder / f"{split}_labels.npy")
    _check_split(folder, split, images, labels, len(classes))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if indices is not None:
        chosen = read_indices(indices, len(images)).numpy()
        images, labels = images[chosen], labels[chosen]
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def load_dataset(folder: str | Path, *, train_limit: int | None = None, test_limit: int | None = None,
                 train_indices: str | Path | None = None) -> Dataset:
    """Load a whole data folder (see :func:`load_split`); ``train_indices`` selects training images by a file."""
    train_images, train_labels = load_split(folder, "train", limit=train_limit, indices=train_indices)
    test_images, test_labels = load_split(folder, "test", limit=test_limit)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"{folder}: train images are {tuple(train_images.shape[1:])} but test images are "
                        f"{tuple(test_images.shape[1:])}")
    return Dataset(train_images, train_labels, test_images, test_labels, load_classes(Path(folder)))


def validation_split(labels: torch.Tensor, size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, val)`` of a fixed, seeded, class-balanced hold-out of a training split.

    Each class gives its share of the ``size`` held-out images (``size`` < 1: that fraction of all), rounded
    by largest remainder so the shares add up to exactly the size; which of its images go is a permutation drawn
    from ``fold_in(key(seed), class)``. Both index tensors are sorted, so the training images keep their order.

    Args:
      labels: the (N,) int64 labels of the training split.
      size: how many images to hold out (an int), or a fraction in (0, 1).
      seed: the split's seed (``data.val_seed``).

    Returns:
      ``(train_indices, val_indices)``, int64 CPU tensors that partition ``range(N)``.

    Raises:
      DataError: when the split would leave no training or no validation image.
    """
    from fnclass.core import random

    labels = labels.cpu()
    n = len(labels)
    count = round(size * n) if isinstance(size, float) else size
    if not 0 < count < n:
        raise DataError(f"data.val_size = {size} holds out {count} of {n} training images: choose a size that "
                        "leaves images on both sides")
    classes, counts = torch.unique(labels, return_counts=True)
    quotas = counts.double() * count / n
    shares = quotas.floor().long()
    # Largest remainder (ties to the lower class label) hands out the images the floors left over.
    order = sorted(range(len(classes)), key=lambda i: (-(quotas[i] - shares[i]).item(), i))
    for i in order[:count - int(shares.sum())]:
        shares[i] += 1
    root = random.key(seed)
    held = []
    for label, share in zip(classes.tolist(), shares.tolist()):
        members = torch.nonzero(labels == label).flatten()
        held.append(members[random.permutation(random.fold_in(root, label), len(members))[:share]])
    val = torch.sort(torch.cat(held)).values
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


def channel_stats(images: torch.Tensor, chunk: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 NHWC images, scaled to [0, 1]."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 1, 2))
        squares += (x * x).sum(dim=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    std = (squares / count - mean * mean).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def as_images(images) -> torch.Tensor:
    """uint8 RGB images as a model file takes them, from a torch tensor or a NumPy array (``np.load`` of the data
    set, ``np.asarray`` of a PIL image): ``(N, H, W, 3)``, or one ``(H, W, 3)`` image made a batch of one.

    Raises:
      InputError: another dtype or layout, naming what came and the fix.
    """
    import numpy as np

    if not isinstance(images, torch.Tensor):
        array = np.asarray(images)
        if array.dtype == object:
            raise InputError(f"images: got {type(images).__name__}, not an array; pass a uint8 NumPy array or torch "
                             "tensor of shape (N, H, W, 3)")
        array = np.ascontiguousarray(array)
        images = torch.from_numpy(array if array.flags.writeable else array.copy())  # np.load(mmap_mode="r")
    if images.ndim == 3 and images.shape[-1] == 3:
        images = images[None]
    shape = tuple(images.shape)
    if images.dtype != torch.uint8:
        fix = ("scale to 0-255 and convert, e.g. (x * 255).round().astype(np.uint8)" if images.is_floating_point()
               else "convert with .astype(np.uint8) / .to(torch.uint8)")
        raise InputError(f"images: expected uint8 RGB (N, H, W, 3), got {str(images.dtype).removeprefix('torch.')} "
                         f"{shape}; {fix}")
    if images.ndim != 4 or shape[-1] != 3:
        fix = (", channels last: x.transpose(0, 2, 3, 1) (NumPy) or x.permute(0, 2, 3, 1) (torch)"
               if images.ndim == 4 and shape[1] == 3 else "")
        raise InputError(f"images: expected uint8 RGB (N, H, W, 3), got shape {shape}{fix}")
    return images


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NHWC images -> normalised float NCHW: ``(x / 255 - mean) / std`` per channel."""
    mean_t = torch.as_tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    x = images.permute(0, 3, 1, 2).to(dtype) * (1.0 / 255.0)
    return (x - mean_t) / std_t


class TorchvisionSource(NamedTuple):
    """How torchvision holds one dataset: what its class is asked and where the arrays come out."""

    class_name: str  # in torchvision.datasets
    split_by: str  # "train": the class takes train=True/False; "split": split="train"/"test"
    layout: str  # of the class's image array: "NHWC", "NCHW" or "NHW" (grey, repeated into RGB)
    labels: str  # the attribute holding the labels
    size: int  # the side written unless --size chooses another
    resizable: bool  # whether --size may choose another side
    classes: tuple[str, ...] | None = None  # where torchvision has no .classes
    needs: str | None = None  # a module the class's reader imports that fnclass does not depend on


TORCHVISION_DATASETS = {
    "cifar10": TorchvisionSource("CIFAR10", "train", "NHWC", "targets", 32, False),
    "cifar100": TorchvisionSource("CIFAR100", "train", "NHWC", "targets", 32, False),
    "svhn": TorchvisionSource("SVHN", "split", "NCHW", "labels", 32, False, tuple("0123456789"), needs="scipy"),
    # STL-10's 96x96 images come down to CIFAR's 32x32, so a CIFAR recipe runs on them unchanged.
    "stl10": TorchvisionSource("STL10", "split", "NCHW", "labels", 32, True),
    "fashion-mnist": TorchvisionSource("FashionMNIST", "train", "NHW", "targets", 28, True),
    "mnist": TorchvisionSource("MNIST", "train", "NHW", "targets", 28, True),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")  # what Pillow may decode: other formats (EPS runs Ghostscript) are refused
MAX_IMAGE_SIDE = 4096  # the largest input size a checkpoint may record (fnclass.run.checkpoint)
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own default: 256 MiB at 3 bytes a pixel, about 9,459 x 9,459
DEFAULT_TEST_FRACTION = 0.2  # CIFAR's own ratio is 1/6; 0.2 is the usual hold-out and gives "every 5th file"


def _check_classes(folder: Path, classes) -> tuple[str, ...]:
    """Class names that survive a round trip through ``classes.txt`` (one a line, stripped, unique)."""
    classes = tuple(classes)
    where = folder / "classes.txt"
    if len(classes) < 2:
        raise DataError(f"{where}: expected at least 2 class names, got {len(classes)}")
    for name in classes:
        if not isinstance(name, str) or name.strip() != name or len(name.splitlines()) != 1:
            raise DataError(f"{where}: a class name must be non-empty one-line text without surrounding spaces, "
                            f"got {repr(name)[:60]}")
    if len(set(classes)) != len(classes):
        duplicates = sorted(name for name, count in collections.Counter(classes).items() if count > 1)
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        raise DataError(f"{where}: class names must be unique, repeated: {', '.join(duplicates[:5])}{more}")
    return classes


def write_dataset(folder: str | Path, train_images, train_labels, test_images, test_labels, classes) -> Path:
    """Validate a dataset and write it atomically in the canonical format.

    Every file is first written to a hidden temporary file in ``folder`` and then moved into place with
    ``os.replace``, ``train_images.npy`` last: a failed or interrupted write leaves any existing files
    intact and no half-written ``train_images.npy``, the file that marks a complete folder.

    Args:
      folder: the output folder (created if needed).
      train_images: uint8 array (N, H, W, 3), RGB.
      train_labels: integer array (N,), values in ``0..len(classes) - 1``; stored as int64.
      test_images: uint8 array (M, H, W, 3) with the same H and W.
      test_labels: integer array (M,).
      classes: class names in label order.

    Returns:
      ``folder`` as a Path.

    Raises:
      DataError: for invalid arrays or class names, or when a file cannot be written.
    """
    folder = Path(folder)
    classes = _check_classes(folder, classes)
    arrays = {}
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        images, labels = np.asarray(images), np.asarray(labels)
        _check_split(folder, split, images, labels, len(classes))
        arrays[f"{split}_images.npy"] = np.ascontiguousarray(images)
        arrays[f"{split}_labels.npy"] = labels.astype(np.int64)
    if arrays["train_images.npy"].shape[1:] != arrays["test_images.npy"].shape[1:]:
        raise DataError(f"{folder}: train images are {arrays['train_images.npy'].shape[1:]} but test images are "
                        f"{arrays['test_images.npy'].shape[1:]}")
    contents = {"classes.txt": "".join(f"{name}\n" for name in classes)}
    contents.update((name, arrays[name]) for name in ("test_labels.npy", "test_images.npy", "train_labels.npy",
                                                      "train_images.npy"))
    temps: dict[str, Path] = {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in contents.items():
            temps[name] = write_temp(folder / name, content.encode("utf-8") if isinstance(content, str) else
                                     lambda handle, array=content: np.save(handle, array, allow_pickle=False))
        for name, temp in temps.items():
            os.replace(temp, folder / name)
        fsync_folder(folder)
    except OSError as error:
        raise DataError(f"cannot write {folder}: {error}; choose another output folder") from None
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)
    return folder


class _Unavailable(Exception):
    """torchvision could not provide a dataset; the message says why and where it looked."""


def _new_folders(*folders: Path) -> set[Path]:
    """For each of ``folders``, the topmost of it and its ancestors that is missing (none when the folder is there)."""
    made = set()
    for folder in folders:
        missing = [path for path in (folder, *folder.parents) if not path.exists()]
        if missing and not folder.exists():
            made.add(missing[-1])
    return made


def _torchvision_or_nothing(name: str, out_dir: Path, root: Path, *, download: bool, size: int | None = None) -> Path:
    """:func:`_write_torchvision`, leaving nothing behind when it fails: a folder it created (torchvision's download
    folder, the cache, ``out_dir``), with whatever partial download it holds, is removed again."""
    import shutil

    made = _new_folders(out_dir, root)
    try:
        return _write_torchvision(name, out_dir, root, download=download, size=size)
    except _Unavailable:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _torchvision_split(name: str, root: Path, *, train: bool, download: bool):
    """One split as a torchvision dataset object; raises :class:`_Unavailable`."""
    import torchvision.datasets

    source = TORCHVISION_DATASETS[name]
    dataset_class = getattr(torchvision.datasets, source.class_name)
    split = {"train": train} if source.split_by == "train" else {"split": "train" if train else "test"}
    try:
        # torchvision's own CIFAR files are pickles; this is torchvision reading its own download. What we write
        # from them is plain .npy and text.
        return dataset_class(str(root), **split, download=download)
    except OSError as error:  # urllib's URLError, socket timeouts, connection resets
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _Unavailable(f"{name} is not in {root} and downloading it failed ({reason}): "
                           "the machine seems offline") from None
    except RuntimeError as error:
        if not download:
            raise _Unavailable(f"{name} is not in {root} and downloading is off") from None
        # MNIST's download reports every mirror it tried (URLErrors for an offline machine) on lines of their own.
        raise _Unavailable(f"torchvision could neither read nor download {name} into {root} "
                           f"({' '.join(str(error).split())})") from None


def _rgb_images(images, layout: str) -> np.ndarray:
    """A torchvision image array in ``layout`` ("NHWC", "NCHW" or "NHW" grey) as uint8 (N, H, W, 3) RGB."""
    images = np.asarray(images, dtype=np.uint8)
    if layout == "NHW":
        return np.repeat(images[..., None], 3, axis=-1)
    return images.transpose(0, 2, 3, 1) if layout == "NCHW" else images


def _resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) images resized to ``size`` x ``size`` with Pillow's bicubic filter, each on its own."""
    from PIL import Image

    if images.shape[1:3] == (size, size):
        return images
    # BICUBIC: Pillow widens its support by the scale factor when shrinking, so STL-10's 96 -> 32 is antialiased,
    # and it interpolates smoothly when enlarging MNIST's 28 -> 32, where an area (BOX) filter would copy pixels
    # into blocks. Without reducing_gap Pillow resamples in one exact pass: the same bytes on every machine.
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
                     for image in images])


def _write_torchvision(name: str, out_dir: Path, root: Path, *, download: bool, size: int | None = None) -> Path:
    """Both splits from torchvision (kept in ``root``) written to ``out_dir``; raises :class:`_Unavailable`."""
    source = TORCHVISION_DATASETS[name]
    if source.needs is not None:
        try:
            importlib.import_module(source.needs)
        except ImportError:
            raise DataError(f"reading {name} needs {source.needs}, which is not installed: pip install "
                            f"{source.needs} (or pip install 'fnclass[datasets]')") from None
    splits = [_torchvision_split(name, root, train=train, download=download) for train in (True, False)]
    classes = source.classes or getattr(splits[0], "classes", None)
    if classes is None:  # STL-10 reads its names from class_names.txt, which a partial copy may lack
        raise _Unavailable(f"torchvision found no class names for {name} in {root}; its files seem incomplete")
    arrays = []
    for split in splits:
        arrays += [_resize_images(_rgb_images(split.data, source.layout), size or source.size),
                   np.asarray(getattr(split, source.labels))]
    return write_dataset(out_dir, *arrays, classes)


def prepare_torchvision(name: str, out_dir: str | Path, *, size: int | None = None,
                        download_root: str | Path | None = None, download: bool = True) -> Path:
    """Fetch a dataset through torchvision and write it in the canonical format (see :data:`TORCHVISION_DATASETS`).

    The images keep torchvision's order and its train/test split, and become uint8 RGB: grey MNIST and
    Fashion-MNIST repeat their one channel, SVHN's digit 0 is label 0 (torchvision's mapping of the files' 10).
    CIFAR-100 uses the 100 fine labels. STL-10 (96x96) is resized to 32x32 and (Fashion-)MNIST keeps its 28x28
    unless ``size`` says otherwise, with Pillow's bicubic filter; CIFAR and SVHN come as 32x32 only.

    Args:
      name: ``"cifar10"``, ``"cifar100"``, ``"svhn"``, ``"stl10"``, ``"fashion-mnist"`` or ``"mnist"``.
      out_dir: where the canonical files go.
      size: the side of the written images, for STL-10 and (Fashion-)MNIST; None: 32 resp. 28.
      download_root: where torchvision keeps (or looks for) its own download; default ``out_dir / "torchvision"``.
      download: download when ``download_root`` does not hold the data yet.

    Returns:
      ``out_dir`` as a Path.

    Raises:
      DataError: for an unknown name or a size the dataset does not take, when SVHN's reader (scipy) is
        missing, or when the data is neither in ``download_root`` nor downloadable.
    """
    if name not in TORCHVISION_DATASETS:
        raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(TORCHVISION_DATASETS)}")
    source = TORCHVISION_DATASETS[name]
    if size is not None and not source.resizable and size != source.size:
        resizable = ", ".join(other for other, entry in TORCHVISION_DATASETS.items() if entry.resizable)
        raise DataError(f"the image size and test fraction apply to image folders (the size also to {resizable}); "
                        f"{name} comes as {source.size}x{source.size} images with its own train/test split")
    if size is not None and not 1 <= size <= MAX_IMAGE_SIDE:
        raise DataError(f"image size must be 1..{MAX_IMAGE_SIDE} pixels, got {size}")
    out_dir = Path(out_dir)
    root = Path(download_root) if download_root is not None else out_dir / "torchvision"
    try:
        return _torchvision_or_nothing(name, out_dir, root, download=download, size=size)
    except _Unavailable as problem:
        raise DataError(f"cannot prepare {name}: {problem}; run `fnclass data prepare {name} --out DIR` on a "
                        "machine with the data or internet access and copy DIR here, or point --data-dir at a "
                        "folder in the canonical format") from None


def _class_folders(folder: Path) -> list[Path]:
    """The sub-folders of ``folder`` sorted by name, hidden ones (``.git``) left out."""
    return sorted((path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")),
                  key=lambda path: path.name)


def _image_files(folder: Path) -> list[Path]:
    """The PNG/JPEG files directly in ``folder``, sorted by name; an empty class is an error."""
    files = sorted((path for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")
                    and path.suffix.lower() in IMAGE_SUFFIXES), key=lambda path: path.name)
    if not files:
        raise DataError(f"{folder} holds no {'/'.join(IMAGE_SUFFIXES)} images: every class folder needs at least one")
    return files


class _TooLarge(Exception):
    """An image's header claims more than :data:`MAX_IMAGE_PIXELS` pixels."""


def _decode_rgb(path: Path):
    """Open a PNG/JPEG, refuse it before decoding when too large, apply EXIF rotation and convert to RGB."""
    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice it, and decodes anyway: the check below refuses instead.
        # Its other warnings (a damaged EXIF block, which then just loses its rotation) would break the CLI's
        # one-line output.
        warnings.simplefilter("ignore")
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise _TooLarge(f"{image.width} x {image.height} pixels")
            return _to_rgb(ImageOps.exif_transpose(image))


def _to_rgb(image):
    """RGB from any PNG/JPEG mode: 16-bit grey keeps its high byte, transparency is composited onto black."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grey: Pillow's convert("RGB") clips at 255; the high byte is what Pillow keeps of 16-bit colour.
        grey = np.right_shift(np.clip(np.asarray(image), 0, 65535), 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.has_transparency_data:  # RGBA, LA, palettes and RGB/L with a transparent colour (tRNS)
        rgba = np.asarray(image.convert("RGBA"))
        rgb = rgba[..., :3].astype(np.uint16) * rgba[..., 3:]
        return Image.fromarray(((rgb + 127) // 255).astype(np.uint8))  # round(c * alpha / 255): never a tie
    return image.convert("RGB")  # L, 1, P, RGB; CMYK as r = (255 - c) * (255 - k) / 255 (no colour profile)


def read_image(path: Path, size: int | tuple[int, int]) -> np.ndarray:
    """Decode one PNG/JPEG file to uint8 RGB of shape (height, width, 3); an int ``size`` means a square.

    EXIF rotation is applied, 16-bit grey keeps its high byte, transparency is composited onto black
    (each channel times alpha / 255, rounded), CMYK is converted without a colour profile. Files of other
    formats, and images of more than :data:`MAX_IMAGE_PIXELS` pixels, are refused before decoding.

    Raises:
      DataError: one line naming the file, when it is not a decodable PNG/JPEG or too large.
    """
    from PIL import Image

    if not Path(path).is_file():  # a folder is not an image, and a named pipe would block the read
        raise DataError(f"{path} is {'not a file' if Path(path).exists() else 'missing'}: expected a PNG or JPEG file")
    try:
        image = _decode_rgb(path)
    except (_TooLarge, Image.DecompressionBombError) as error:  # Pillow refuses twice its own limit in open()
        raise DataError(f"{path} is too large to decode ({error}): images may have at most {MAX_IMAGE_PIXELS:,} "
                        "pixels; shrink it first") from None
    except (OSError, ValueError, SyntaxError) as error:  # Pillow's errors for damaged files (fuzzed in the tests)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{path} is not a readable image ({reason}); only undamaged PNG and JPEG files are read: "
                        "delete or replace it") from None
    height, width = (size, size) if isinstance(size, int) else size
    if image.size != (width, height):
        # LANCZOS: Pillow's sharpest filter for shrinking photos to a few dozen pixels, and antialiased
        # (Pillow widens its support by the reduction factor), so small textures do not alias.
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _is_test_file(index: int, test_fraction: float) -> bool:
    """Whether the ``index``-th (0-based) sorted file of a class is held out: floor(n * f) of every first n are."""
    # The epsilon keeps products such as 100 * 0.29 = 28.999... on the intended side of the integer.
    return math.floor((index + 1) * test_fraction + 1e-9) > math.floor(index * test_fraction + 1e-9)


def prepare_image_folder(src: str | Path, out_dir: str | Path, *, size: int = 32,
                         test_fraction: float | None = None) -> Path:
    """Import a folder of images, one sub-folder per class, into the canonical format.

    Classes are the sub-folder names in sorted order (label 0 is the first). Each class folder's ``.png``,
    ``.jpg`` and ``.jpeg`` files are read with Pillow (EXIF rotation applied), converted to RGB and, when
    their size differs, resized to ``size`` x ``size`` with Lanczos filtering (non-square images are
    stretched, not cropped). Hidden files, other file types and nested folders are ignored.

    Splits: when ``src`` has ``train/`` and ``test/`` sub-folders, each holding the same class folders, those
    are the splits. Otherwise each class is split on its own by a fixed rule: sort its files by name, and
    the i-th file (1-based) goes to test when ``floor(i * f) > floor((i - 1) * f)`` for ``f = test_fraction``
    (default 0.2). That holds out exactly ``floor(n * f)`` of a class's n files, evenly spread: with 0.2,
    the 5th, 10th, 15th... file. Each split is then shuffled with ``numpy.random.default_rng(0)``, so any
    leading slice is a fair class mix; the same folder always gives the same bytes.

    Args:
      src: the image folder.
      out_dir: where the canonical files go.
      size: side of the square output images in pixels, 1..MAX_IMAGE_SIDE (4096).
      test_fraction: share of each class held out for test, in (0, 1); only without train/ and test/.

    Returns:
      ``out_dir`` as a Path.

    Raises:
      DataError: when ``src`` is not a folder or holds no classes, a class folder has no images, an image
        cannot be decoded (the message names the file), or a split would be empty.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src} is not a folder: expected one sub-folder of images per class, or train/ and test/ "
                        "folders holding such sub-folders")
    if not 1 <= size <= MAX_IMAGE_SIDE:
        raise DataError(f"image size must be 1..{MAX_IMAGE_SIDE} pixels, got {size}")
    has_train, has_test = (src / "train").is_dir(), (src / "test").is_dir()
    if has_train != has_test:
        raise DataError(f"{src} has a {'train' if has_train else 'test'}/ folder but no "
                        f"{'test' if has_train else 'train'}/ folder: give both, or one folder per class")
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    if has_train:
        if test_fraction is not None:
            raise DataError(f"{src} already has train/ and test/ folders: leave out the test fraction")
        classes = [folder.name for folder in _class_folders(src / "train")]
        test_classes = [folder.name for folder in _class_folders(src / "test")]
        if classes != test_classes:
            raise DataError(f"{src}: train/ and test/ must hold the same class folders; only in train/: "
                            f"{sorted(set(classes) - set(test_classes))}, only in test/: "
                            f"{sorted(set(test_classes) - set(classes))}")
        for split in files:
            for label, name in enumerate(classes):
                files[split] += [(path, label) for path in _image_files(src / split / name)]
    else:
        fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
        if not 0 < fraction < 1:
            raise DataError(f"the test fraction must lie strictly between 0 and 1, got {fraction}")
        classes = [folder.name for folder in _class_folders(src)]
        for label, name in enumerate(classes):
            for index, path in enumerate(_image_files(src / name)):
                files["test" if _is_test_file(index, fraction) else "train"].append((path, label))
    if len(classes) < 2:
        raise DataError(f"{src} holds {len(classes)} class folder(s): expected one sub-folder of images per class, "
                        "at least 2")
    for split, pairs in files.items():
        if not pairs:
            raise DataError(f"{src}: the {split} split would be empty; add images or change the test fraction")
    arrays = {}
    for split, pairs in files.items():
        order = np.random.default_rng(0).permutation(len(pairs))
        images = np.stack([read_image(pairs[i][0], size) for i in order])
        arrays[split] = images, np.array([pairs[i][1] for i in order], dtype=np.int64)
    return write_dataset(out_dir, *arrays["train"], *arrays["test"], classes)


def prepare(source: str | Path, out_dir: str | Path, *, size: int | None = None, test_fraction: float | None = None,
            download: bool = True) -> Path:
    """Write a canonical data folder from a torchvision dataset's name or an image folder (what the CLI calls).

    A name in :data:`TORCHVISION_DATASETS` goes to :func:`prepare_torchvision` (``test_fraction`` does not
    apply: those come with their own split); anything else is a path for :func:`prepare_image_folder`
    (``size`` default 32). A folder that happens to be called ``cifar10`` is reached as ``./cifar10``.
    """
    if str(source) in TORCHVISION_DATASETS:
        if test_fraction is not None:
            raise DataError(f"the test fraction applies to image folders; {source} comes with its own train/test "
                            "split")
        return prepare_torchvision(str(source), out_dir, size=size, download=download)
    return prepare_image_folder(source, out_dir, size=32 if size is None else size, test_fraction=test_fraction)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file as hex, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def listing_sha256(sha256: dict[str, str]) -> str:
    """The SHA-256 of the ``sha256sum`` listing of :data:`FILES` (file name -> hex digest), in that order."""
    listing = "".join(f"{sha256[name]}  {name}\n" for name in FILES)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def dataset_info(folder: str | Path) -> dict:
    """Describe a canonical data folder: counts, statistics, shape and checksums.

    Args:
      folder: a data folder in the canonical format (validated as :func:`load_dataset` does).

    Returns:
      A JSON-ready dict: ``folder``, ``classes`` (label order), ``image_shape`` ``[H, W, 3]``, ``counts``
      (``{"train": [...], "test": [...]}``, images per class in label order), ``train_size``, ``test_size``,
      ``mean`` and ``std`` (per RGB channel of the train images in [0, 1]), ``sha256`` (file name -> hex for
      the five files) and ``sha256_all``: the SHA-256 of their ``sha256sum`` listing in :data:`FILES` order,
      so ``sha256sum train_images.npy train_labels.npy test_images.npy test_labels.npy classes.txt | sha256sum``
      prints it too.

    Raises:
      DataError: when the folder is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: expected a data folder with {', '.join(FILES)}")
    dataset = load_dataset(folder)
    mean, std = channel_stats(dataset.train_images)
    sha256 = {name: file_sha256(folder / name) for name in FILES}
    return {
        "folder": str(folder),
        "classes": list(dataset.classes),
        "image_shape": list(dataset.train_images.shape[1:]),
        "counts": {split: torch.bincount(labels, minlength=len(dataset.classes)).tolist()
                   for split, labels in (("train", dataset.train_labels), ("test", dataset.test_labels))},
        "train_size": len(dataset.train_labels),
        "test_size": len(dataset.test_labels),
        "mean": list(mean),
        "std": list(std),
        "sha256": sha256,
        "sha256_all": listing_sha256(sha256),
    }


def cache_dir(dataset: str) -> Path:
    """The per-user cache folder for ``dataset``: ``$XDG_CACHE_HOME/fnclass/<dataset>``, else ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fnclass" / dataset


def _is_data_folder(folder: Path) -> bool:
    """A folder counts as canonical when it has ``train_images.npy`` (written last by :func:`write_dataset`)."""
    return (folder / "train_images.npy").is_file()


def resolve_data_dir(data_dir: str | Path | None, dataset: str, *, download: bool = True) -> Path:
    """Find the data folder for ``dataset``, downloading it into the cache when torchvision has it and nothing else.

    Looks, in order, at ``data_dir`` (when given it must be a data folder: no falling through), then
    ``$FNCLASS_DATA``, then :func:`cache_dir`. When none has ``train_images.npy`` and ``dataset`` is a name in
    :data:`TORCHVISION_DATASETS` (cifar10, svhn, mnist, ...) and ``download`` is true, it runs
    :func:`prepare_torchvision` into the cache folder, with torchvision's own download in
    ``<cache folder>/torchvision``. Any other name must have been prepared there (or be given as ``data_dir``).

    Args:
      data_dir: an explicit folder (the CLI's ``--data-dir``), or None.
      dataset: the dataset name (``DataConfig.dataset``); names the cache folder.
      download: allow the download.

    Returns:
      The folder to load.

    Raises:
      DataError: one line naming the places looked in and the ``fnclass data prepare`` command.
    """
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not _is_data_folder(folder):
            raise DataError(f"data folder {folder} has no train_images.npy: point --data-dir at a folder with "
                            f"{', '.join(FILES)}, or write one with `fnclass data prepare`")
        return folder
    looked = []
    from_env = os.environ.get("FNCLASS_DATA")
    if from_env:
        folder = Path(from_env).expanduser()
        if _is_data_folder(folder):
            return folder
        looked.append(f"$FNCLASS_DATA={folder}")
    else:
        looked.append("$FNCLASS_DATA (not set)")
    cache = cache_dir(dataset)
    if _is_data_folder(cache):
        return cache
    looked.append(str(cache))
    source = dataset if dataset in TORCHVISION_DATASETS else "IMAGE_FOLDER"
    fix = (f"run `fnclass data prepare {source} --out {cache}` (on a machine with the data or internet access, "
           "then copy the folder here), or pass --data-dir with a folder in the canonical format")
    if dataset not in TORCHVISION_DATASETS:
        raise DataError(f"no {dataset} data found (looked in {', '.join(looked)}); {fix}")
    if not download:
        raise DataError(f"no {dataset} data found (looked in {', '.join(looked)}) and downloading is off; {fix}")
    try:
        return _torchvision_or_nothing(dataset, cache, cache / "torchvision", download=True)
    except _Unavailable as problem:
        raise DataError(f"no {dataset} data found (looked in {', '.join(looked)}); {problem}; {fix}") from None
