"""SVHN, STL-10, MNIST and Fashion-MNIST through torchvision (``fnclass.data.prepare``) and ``data.dataset`` names.

Each test writes a tiny fake of the dataset in torchvision's own on-disk format under ``OUT/torchvision`` and lets
torchvision read it with downloading off; no test touches the network. The expected arrays are built by hand from
the fake pixels, never by the code under test.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torchvision.datasets
from click.testing import CliRunner
from PIL import Image

from fnclass import data
from fnclass.cli import main
from fnclass.config import ConfigError, load_config
from fnclass.data import DataError
from tests.oneline import one_error_line

MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def pixels(seed: int, shape) -> np.ndarray:
    """Random uint8 pixels: any mix-up of axes, channels or images changes them."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx-ubyte file (MNIST's format): magic 0x0000 08 <ndim>, big-endian int32 sizes, then the uint8 bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(f">BBBB{array.ndim}I", 0, 0, 8, array.ndim, *array.shape) + array.tobytes())


def fake_mnist(root: Path, name: str) -> dict:
    """Grey 28x28 train (5) and test (3) images under ``root/<Class>/raw``, as torchvision keeps them unzipped."""
    raw = root / MNIST_FOLDERS[name] / "raw"
    splits = {"train": (pixels(1, (5, 28, 28)), np.array([3, 0, 9, 1, 3], np.uint8)),
              "t10k": (pixels(2, (3, 28, 28)), np.array([7, 2, 0], np.uint8))}
    for prefix, (images, labels) in splits.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return splits


def fake_svhn(root: Path, monkeypatch) -> dict:
    """``train_32x32.mat``/``test_32x32.mat``: X is (32, 32, 3, N) and y (N, 1) with 10 standing for the digit 0."""
    splits = {"train": (pixels(3, (32, 32, 3, 6)), np.array([[10], [1], [5], [10], [9], [2]], np.uint8)),
              "test": (pixels(4, (32, 32, 3, 2)), np.array([[3], [10]], np.uint8))}
    root.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images, "y": labels})
    # torchvision checks the real files' MD5s; the fakes have their own.
    monkeypatch.setattr(torchvision.datasets.SVHN, "split_list", {
        split: [f"http://invalid/{split}_32x32.mat", f"{split}_32x32.mat", md5(root / f"{split}_32x32.mat")]
        for split in splits})
    return splits


def fake_stl10(root: Path, monkeypatch) -> dict:
    """``stl10_binary/*.bin``: uint8 images stored channel by channel, each channel column-major; labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    splits = {"train": (pixels(5, (4, 96, 96, 3)), np.array([1, 10, 4, 1], np.uint8)),  # NHWC, as written
              "test": (pixels(6, (3, 96, 96, 3)), np.array([2, 7, 10], np.uint8))}
    for split, (images, labels) in splits.items():
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 3, 2, 1).tobytes())  # (N, C, W, H) order
        (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
    (folder / "unlabeled_X.bin").write_bytes(b"")  # checked by torchvision, read only for the unlabeled split
    (folder / "class_names.txt").write_text("".join(f"{name}\n" for name in STL10_CLASSES))
    checked = lambda names: [[name, md5(folder / name)] for name in names]  # noqa: E731
    monkeypatch.setattr(torchvision.datasets.STL10, "train_list",
                        checked(["train_X.bin", "train_y.bin", "unlabeled_X.bin"]))
    monkeypatch.setattr(torchvision.datasets.STL10, "test_list", checked(["test_X.bin", "test_y.bin"]))
    return splits


def bicubic(image: np.ndarray, size: int) -> np.ndarray:
    """The reference resize, straight from Pillow: one image, bicubic, no reducing_gap."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def classes_txt(folder: Path) -> list[str]:
    return (folder / "classes.txt").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_and_fashion_mnist_are_grey_repeated_into_rgb_at_28(tmp_path, name):
    splits = fake_mnist(tmp_path / "out" / "torchvision", name)
    data.prepare(name, tmp_path / "out", download=False)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        grey, labels = splits[prefix]
        images = np.load(tmp_path / "out" / f"{split}_images.npy")
        assert images.dtype == np.uint8 and images.shape == (len(grey), 28, 28, 3)
        for channel in range(3):
            assert np.array_equal(images[..., channel], grey)
        assert np.load(tmp_path / "out" / f"{split}_labels.npy").tolist() == labels.tolist()
        assert np.load(tmp_path / "out" / f"{split}_labels.npy").dtype == np.int64
    expected = {"mnist": ("0 - zero", "9 - nine"), "fashion-mnist": ("T-shirt/top", "Ankle boot")}[name]
    names = classes_txt(tmp_path / "out")
    assert len(names) == 10 and (names[0], names[-1]) == expected


def test_mnist_with_a_size_is_resized_bicubic_like_pillow(tmp_path):
    splits = fake_mnist(tmp_path / "out" / "torchvision", "mnist")
    result = CliRunner().invoke(main, ["data", "prepare", "mnist", "--out", str(tmp_path / "out"), "--size", "32",
                                       "--no-download"])
    assert result.exit_code == 0, result.output
    images = np.load(tmp_path / "out" / "test_images.npy")
    grey = splits["t10k"][0]
    # Pillow resamples each channel alone, so resizing the grey image once and repeating it is the same.
    expected = np.stack([np.repeat(bicubic(image, 32)[..., None], 3, axis=-1) for image in grey])
    assert images.shape == (3, 32, 32, 3) and np.array_equal(images, expected)


def test_svhn_maps_10_to_digit_0_and_comes_as_nhwc(tmp_path, monkeypatch):
    splits = fake_svhn(tmp_path / "out" / "torchvision", monkeypatch)
    data.prepare("svhn", tmp_path / "out", download=False)
    for split, (images, labels) in splits.items():
        written = np.load(tmp_path / "out" / f"{split}_images.npy")
        assert np.array_equal(written, images.transpose(3, 0, 1, 2))  # X[h, w, c, n] -> [n, h, w, c]
        digits = [0 if label == 10 else int(label) for label in labels[:, 0]]
        assert np.load(tmp_path / "out" / f"{split}_labels.npy").tolist() == digits
    assert classes_txt(tmp_path / "out") == [str(digit) for digit in range(10)]
    with pytest.raises(DataError, match="svhn comes as 32x32 images"):
        data.prepare("svhn", tmp_path / "other", size=64, download=False)


def test_stl10_is_read_column_major_and_resized_to_32_by_default(tmp_path, monkeypatch):
    splits = fake_stl10(tmp_path / "out" / "torchvision", monkeypatch)
    data.prepare("stl10", tmp_path / "out", download=False)
    for split, (images, labels) in splits.items():
        written = np.load(tmp_path / "out" / f"{split}_images.npy")
        assert np.array_equal(written, np.stack([bicubic(image, 32) for image in images]))
        assert np.load(tmp_path / "out" / f"{split}_labels.npy").tolist() == (labels.astype(int) - 1).tolist()
    assert classes_txt(tmp_path / "out") == STL10_CLASSES
    # --size 96 keeps the pixels exactly; any other size resizes to it.
    data.prepare_torchvision("stl10", tmp_path / "full", size=96, download_root=tmp_path / "out" / "torchvision",
                             download=False)
    assert np.array_equal(np.load(tmp_path / "full" / "train_images.npy"), splits["train"][0])
    data.prepare_torchvision("stl10", tmp_path / "48", size=48, download_root=tmp_path / "out" / "torchvision",
                             download=False)
    assert np.array_equal(np.load(tmp_path / "48" / "test_images.npy"),
                          np.stack([bicubic(image, 48) for image in splits["test"][0]]))


@pytest.mark.parametrize("name", ["svhn", "stl10", "fashion-mnist", "mnist"])
def test_no_download_with_missing_files_is_one_line_with_exit_code_2(tmp_path, name):
    out = tmp_path / "out"
    one_error_line(["data", "prepare", name, "--out", str(out), "--no-download"],
                   f"cannot prepare {name}", str(out / "torchvision"), "downloading is off")
    assert not (out / "train_images.npy").exists()


def test_svhn_without_scipy_names_the_install_command(tmp_path, monkeypatch):
    fake_svhn(tmp_path / "out" / "torchvision", monkeypatch)
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy` raise ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    one_error_line(["data", "prepare", "svhn", "--out", str(tmp_path / "out"), "--no-download"],
                   "needs scipy", "pip install scipy", "fnclass[datasets]")
    assert not (tmp_path / "out" / "train_images.npy").exists()


@pytest.mark.parametrize("name, size, fraction, match", [
    ("mnist", None, 0.2, "the test fraction applies to image folders"),
    ("cifar10", 28, None, "cifar10 comes as 32x32 images"),
    ("stl10", 4097, None, r"image size must be 1\.\.4096"),
])
def test_sizes_and_fractions_a_dataset_does_not_take_are_refused(tmp_path, name, size, fraction, match):
    with pytest.raises(DataError, match=match):
        data.prepare(name, tmp_path / "out", size=size, test_fraction=fraction, download=False)
    assert not (tmp_path / "out").exists()


def test_data_dataset_svhn_resolves_to_the_prepared_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("FNCLASS_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / ".cache" / "fnclass" / "svhn"
    fake_svhn(cache / "torchvision", monkeypatch)
    data.prepare("svhn", Path("~/.cache/fnclass/svhn").expanduser(), download=False)  # as docs/data.md says
    config = load_config(None, ["data.dataset=svhn"])
    assert config.data.dataset == "svhn"
    assert data.resolve_data_dir(None, config.data.dataset, download=False) == cache
    assert data.load_dataset(cache).classes == tuple("0123456789")


def test_a_torchvision_name_downloads_into_the_cache_another_name_must_be_prepared(tmp_path, monkeypatch):
    monkeypatch.delenv("FNCLASS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = tmp_path / "xdg" / "fnclass"
    fake_mnist(cache / "fashion-mnist" / "torchvision", "fashion-mnist")  # what a finished download leaves
    assert data.resolve_data_dir(None, "fashion-mnist") == cache / "fashion-mnist"
    assert data.load_dataset(cache / "fashion-mnist").train_images.shape == (5, 28, 28, 3)
    with pytest.raises(DataError, match=r"no stl10 data found .*downloading is off"):
        data.resolve_data_dir(None, "stl10", download=False)
    with pytest.raises(DataError) as caught:
        data.resolve_data_dir(None, "my-flowers.v2")
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert f"fnclass data prepare IMAGE_FOLDER --out {cache / 'my-flowers.v2'}" in message and "--data-dir" in message
    assert not (cache / "my-flowers.v2").exists()


@pytest.mark.parametrize("name", ["svhn", "my-flowers_2.v1", "a" * 64, "_x", "-x"])
def test_any_safe_folder_name_is_a_dataset(name):
    assert load_config(None, [f"data.dataset={name}"]).data.dataset == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../svhn", "a\\b", "a b", "a" * 65, "caf\u00e9",
                                  "x\ny"])
def test_a_bad_dataset_name_is_a_one_line_config_error(tmp_path, name):
    path = tmp_path / "bad.toml"
    path.write_text(f"[data]\ndataset = {json.dumps(name)}\n", encoding="utf-8")  # JSON escapes are valid TOML
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "data.dataset = " in message and "letters, digits" in message and "64 characters" in message
