"""Corrupted test sets in the layout of CIFAR-10-C (Hendrycks & Dietterich 2019), built with ``imagecorruptions``.

A corruption folder holds, for N test images, the 15 common corruptions at severities 1-5:

* ``<corruption>.npy``: uint8 (5N, H, W, 3), severity 1's N images first, then severity 2's, ... (as the published
  CIFAR-10-C files are laid out, so those can be read the same way once given a manifest);
* ``labels.npy``: int64 (5N,), the test labels repeated for each severity; ``classes.txt``;
* ``manifest.json`` (written last: its presence marks a complete folder): the format, the source folder's test
  files and their SHA-256, the corruptions, severities, N, the seed, the package's version and every file's
  SHA-256.

Each image's corruption is deterministic: numpy's global generator, which ``imagecorruptions`` draws from, is
seeded from ``(seed, corruption, severity, image)`` before it, so any worker count gives the same bytes.
``imagecorruptions`` is the optional extra ``fnclass[corruptions]``. Its parameters are those of the ImageNet-C
code applied to 32x32 images, not the CIFAR-specific ones of the published CIFAR-10-C, and the source here is our
JPEG copy of CIFAR-10: figures on a folder built here are comparable with each other, not with published ones.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
import types
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fnclass.data import DataError, file_sha256, load_classes, load_split
from fnclass.io import write_atomic

FORMAT = "fnclass.corruptions/1"
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")  # imagecorruptions' "common" 15: CIFAR-10-C's
SEVERITIES = (1, 2, 3, 4, 5)
EXTRA = "pip install 'fnclass[corruptions]'"


class CorruptionSet(NamedTuple):
    """A corruption folder, checked: what :func:`read_corruption_set` returns."""

    folder: Path
    manifest: dict
    classes: tuple[str, ...]
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    images: int  # N: images per corruption and severity
    labels: np.ndarray  # (N,) int64: the labels of each severity's block

    def load(self, corruption: str) -> np.ndarray:
        """The (5N, H, W, 3) uint8 images of one corruption, checked against the manifest's SHA-256."""
        path = self.folder / f"{corruption}.npy"
        if not path.is_file():
            raise DataError(f"{path}: missing; the folder is incomplete: build it again with "
                            "`fnclass data prepare cifar10-c`")
        if file_sha256(path) != self.manifest["sha256"][path.name]:
            raise DataError(f"{path}: its SHA-256 differs from manifest.json's (the file was altered or truncated); "
                            "build the folder again with `fnclass data prepare cifar10-c`")
        images = np.load(path, allow_pickle=False)
        expected = (len(self.severities) * self.images, *self.manifest["image_shape"])
        if images.dtype != np.uint8 or images.shape != expected:
            raise DataError(f"{path}: {images.dtype} {images.shape}, expected uint8 {expected}; build the folder again")
        return images


def imagecorruptions_module():
    """``imagecorruptions.corruptions``, made to run on today's libraries.

    Its latest release (1.1.2, 2020) imports ``pkg_resources`` (gone from setuptools 81), calls numpy's
    ``np.float_`` (gone in numpy 2) and scikit-image's ``gaussian(multichannel=True)`` (``channel_axis`` since
    0.19). The three are bridged here, inside that module only: a stand-in ``pkg_resources.resource_filename`` while
    it is imported, and its own ``np`` and ``gaussian`` names rebound. The corruptions themselves are its code.
    """
    try:
        import cv2  # noqa: F401  (imagecorruptions' dependencies, named in the error when missing)
        import skimage  # noqa: F401
    except ImportError as error:
        raise DataError(f"building corrupted images needs the corruptions extra ({error.name} is missing): "
                        f"{EXTRA}") from None
    stand_in = "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None
    if stand_in:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda module, name: os.path.join(  # relative to the module's folder, as there
            os.path.dirname(importlib.import_module(module).__file__), name)
        sys.modules["pkg_resources"] = shim
    try:
        with warnings.catch_warnings():  # its `scipy.ndimage.interpolation` import is deprecated, not yet gone
            warnings.simplefilter("ignore", DeprecationWarning)
            from imagecorruptions import corruptions
    except ImportError:
        raise DataError(f"building corrupted images needs the corruptions extra: {EXTRA}") from None
    finally:
        if stand_in:
            del sys.modules["pkg_resources"]
    if not hasattr(np, "float_"):
        corruptions.np = _NumpyWithFloat("numpy")
    from skimage.filters import gaussian

    corruptions.gaussian = lambda image, sigma, multichannel=False, **kwargs: gaussian(
        image, sigma=sigma, channel_axis=-1 if multichannel else None, **kwargs)
    return corruptions


class _NumpyWithFloat(types.ModuleType):
    """numpy, plus the ``float_`` alias numpy 2 removed (for :func:`imagecorruptions_module`)."""

    float_ = np.float64

    def __getattr__(self, name):
        return getattr(np, name)


def image_seed(seed: int, corruption: int, severity: int, image: int) -> int:
    """The 32-bit seed of one image's corruption."""
    return int(np.random.SeedSequence([seed, corruption, severity, image]).generate_state(1)[0])


def corrupt_block(images: np.ndarray, corruption: str, severity: int, seed: int, first: int = 0) -> np.ndarray:
    """One corruption at one severity on uint8 (N, H, W, 3) images (image ``i`` is source row ``first + i``)."""
    module = imagecorruptions_module()
    function = getattr(module, corruption)
    number = CORRUPTIONS.index(corruption)
    from PIL import Image

    out = np.empty_like(images)
    saved = np.random.get_state()
    try:
        for i, image in enumerate(images):
            np.random.seed(image_seed(seed, number, severity, first + i))
            out[i] = np.uint8(np.clip(function(Image.fromarray(image), severity), 0, 255))
    finally:
        np.random.set_state(saved)
    return out


def _corrupt_task(args) -> np.ndarray:
    """A worker's share: ``corrupt_block`` on a slice (picklable arguments for a process pool)."""
    return corrupt_block(*args)


def prepare_corruptions(source: str | Path, out: str | Path, *, images: int | None = None, seed: int = 0,
                        corruptions: tuple[str, ...] = CORRUPTIONS, workers: int = 1, progress=None) -> Path:
    """Build a corruption folder from the test split of a canonical data folder.

    Args:
      source: a data folder (``test_images.npy``, ``test_labels.npy``, ``classes.txt``).
      out: the folder to write (created; refused when it already holds files).
      images: corrupt the first N test images only (default: all).
      seed: the seed every image's corruption derives from.
      corruptions: which of :data:`CORRUPTIONS`.
      workers: processes corrupting in parallel (the result does not depend on it).
      progress: called with ``(done, total)`` after each corruption and severity.

    Returns:
      ``out``.

    Raises:
      DataError: for a bad source or ``out``, an unknown corruption, or the extra missing.
    """
    source, out = Path(source), Path(out)
    unknown = sorted(set(corruptions) - set(CORRUPTIONS))
    if unknown or not corruptions:
        raise DataError(f"unknown corruption(s) {', '.join(unknown) or '(none given)'}: choose from "
                        f"{', '.join(CORRUPTIONS)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder: choose a new --out (nothing was written)")
    test_images, test_labels = load_split(source, "test", limit=images)
    classes = load_classes(source)
    imagecorruptions_module()  # the extra's absence is reported before any work
    test_images, test_labels = test_images.numpy(), test_labels.numpy()
    out.mkdir(parents=True, exist_ok=True)
    chunks = max(1, workers)
    bounds = np.linspace(0, len(test_images), chunks + 1).astype(int)
    tasks = [(name, severity) for name in corruptions for severity in SEVERITIES]
    digests = {}
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
    try:
        done = 0
        for name in corruptions:
            blocks = []
            for severity in SEVERITIES:
                parts = [(test_images[a:b], name, severity, seed, int(a)) for a, b in zip(bounds, bounds[1:])]
                blocks += list(pool.map(_corrupt_task, parts)) if pool else [corrupt_block(*p) for p in parts]
                done += 1
                if progress is not None:
                    progress(done, len(tasks))
            digests[f"{name}.npy"] = _save_npy(out / f"{name}.npy", np.concatenate(blocks))
    finally:
        if pool is not None:
            pool.shutdown()
    digests["labels.npy"] = _save_npy(out / "labels.npy", np.tile(test_labels.astype(np.int64), len(SEVERITIES)))
    write_atomic(out / "classes.txt", ("\n".join(classes) + "\n").encode())
    from importlib.metadata import version

    manifest = {"format": FORMAT, "source": {"folder": str(source), "sha256": {
        name: file_sha256(source / name) for name in ("test_images.npy", "test_labels.npy")}},
        "corruptions": list(corruptions), "severities": list(SEVERITIES), "images": len(test_images),
        "image_shape": list(test_images.shape[1:]), "seed": seed,
        "imagecorruptions": version("imagecorruptions"), "layout": "CIFAR-10-C: <corruption>.npy holds severities "
        "1-5 in blocks of `images` rows; labels.npy repeats the test labels for each block", "sha256": digests}
    write_atomic(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return out


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write one array atomically (``np.save``, no pickle); its SHA-256."""
    write_atomic(path, lambda handle: np.save(handle, array, allow_pickle=False))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_corruption_set(folder: str | Path) -> CorruptionSet:
    """Open and check a corruption folder (its manifest, classes and labels; each corruption file on loading).

    Raises:
      DataError: when the folder has no valid manifest, or its labels or classes do not fit it.
    """
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise DataError(f"{folder}: no manifest.json, so not a corruption folder; build one with `fnclass data "
                        "prepare cifar10-c --from DATA_DIR --out DIR`")
    try:
        manifest = json.loads(path.read_text())
        ok = (manifest.get("format") == FORMAT and set(manifest["corruptions"]) <= set(CORRUPTIONS)
              and manifest["severities"] == list(SEVERITIES) and int(manifest["images"]) > 0
              and len(manifest["image_shape"]) == 3 and isinstance(manifest["sha256"], dict))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{path}: not a {FORMAT} manifest (a damaged or foreign file); build the folder again with "
                        "`fnclass data prepare cifar10-c`")
    classes = load_classes(folder)
    labels_path = folder / "labels.npy"
    if not labels_path.is_file() or file_sha256(labels_path) != manifest["sha256"].get("labels.npy"):
        raise DataError(f"{labels_path}: missing or not the file manifest.json lists; build the folder again")
    labels = np.load(labels_path, allow_pickle=False)
    count = int(manifest["images"])
    if labels.shape != (len(SEVERITIES) * count,) or labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"{labels_path}: shape {labels.shape} or values do not fit {count} images per severity and "
                        f"{len(classes)} classes; build the folder again")
    return CorruptionSet(folder, manifest, classes, tuple(manifest["corruptions"]), tuple(SEVERITIES), count,
                         labels[:count].astype(np.int64))
