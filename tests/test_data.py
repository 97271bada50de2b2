"""Writing, importing, describing and finding data folders (``fnclass.data``); no test touches the network."""

from __future__ import annotations

import hashlib
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

from fnclass import data
from fnclass.core import random
from fnclass.data import FILES, DataError
from tests.needs import missing


def small_arrays(seed: int = 0, num_classes: int = 3, size: int = 8):
    """Random uint8 images and labels for a train split of 20 and a test split of 10."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (20, size, size, 3), dtype=np.uint8), rng.integers(0, num_classes, 20),
            rng.integers(0, 256, (10, size, size, 3), dtype=np.uint8), rng.integers(0, num_classes, 10),
            [f"class{i}" for i in range(num_classes)])


def save_image(path: Path, array: np.ndarray, mode: str = "RGB") -> None:
    """Write an RGB uint8 array as an image file (format from the suffix), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)


def solid(red: int, green: int, height: int = 40, width: int = 24) -> np.ndarray:
    """A constant-colour image, so its value survives resizing and identifies it."""
    return np.broadcast_to(np.array([red, green, 7], dtype=np.uint8), (height, width, 3)).copy()


# write_dataset


def test_write_dataset_round_trips_through_load_dataset(tmp_path):
    train_images, train_labels, test_images, test_labels, classes = small_arrays()
    assert data.write_dataset(tmp_path / "out", train_images, train_labels, test_images, test_labels,
                              classes) == tmp_path / "out"
    loaded = data.load_dataset(tmp_path / "out")
    assert torch.equal(loaded.train_images, torch.from_numpy(train_images))
    assert torch.equal(loaded.test_images, torch.from_numpy(test_images))
    assert torch.equal(loaded.train_labels, torch.from_numpy(train_labels.astype(np.int64)))
    assert torch.equal(loaded.test_labels, torch.from_numpy(test_labels.astype(np.int64)))
    assert loaded.classes == tuple(classes)
    assert np.load(tmp_path / "out" / "train_labels.npy").dtype == np.int64
    assert sorted(os.listdir(tmp_path / "out")) == sorted(FILES)


def test_write_dataset_accepts_list_labels_like_torchvision_targets(tmp_path):
    train_images, train_labels, test_images, test_labels, classes = small_arrays()
    data.write_dataset(tmp_path, train_images, train_labels.tolist(), test_images, test_labels.tolist(), classes)
    assert data.load_split(tmp_path, "train")[1].tolist() == train_labels.tolist()


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "train_images": a["train_images"].astype(np.float32)}, "uint8"),
    (lambda a: {**a, "test_labels": a["test_labels"][:-1]}, "9 labels for 10 images"),
    (lambda a: {**a, "train_labels": a["train_labels"] + 3}, r"labels must lie in 0\.\.2"),
    (lambda a: {**a, "test_images": a["test_images"][:, :4]}, "train images are"),
    (lambda a: {**a, "classes": ["a", "a", "b"]}, "repeated: a"),
    (lambda a: {**a, "classes": ["a", " b", "c"]}, "surrounding spaces"),
    (lambda a: {**a, "classes": ["a", "b\nc", "d"]}, "one-line"),
    (lambda a: {**a, "test_images": a["test_images"][:0], "test_labels": a["test_labels"][:0]}, "at least one"),
])
def test_write_dataset_rejects_invalid_input_and_writes_nothing(tmp_path, change, match):
    names = ("train_images", "train_labels", "test_images", "test_labels", "classes")
    arrays = change(dict(zip(names, small_arrays())))
    with pytest.raises(DataError, match=match):
        data.write_dataset(tmp_path / "out", *(arrays[name] for name in names))
    assert not (tmp_path / "out").exists()


def test_write_dataset_is_atomic_a_failed_write_keeps_the_old_files(tmp_path, monkeypatch):
    data.write_dataset(tmp_path, *small_arrays(seed=0))
    before = {name: (tmp_path / name).read_bytes() for name in FILES}
    real_save, calls = np.save, []

    def save_then_fail(file, array, **kwargs):
        calls.append(array.shape)
        if len(calls) == 3:  # two temp files are complete, the third is half written
            file.write(b"\x93NUMPY half")
            raise OSError(28, "No space left on device")
        real_save(file, array, **kwargs)

    monkeypatch.setattr(np, "save", save_then_fail)
    with pytest.raises(DataError, match="cannot write .*No space left on device"):
        data.write_dataset(tmp_path, *small_arrays(seed=1))
    assert len(calls) == 3
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)  # no temp file left behind
    assert {name: (tmp_path / name).read_bytes() for name in FILES} == before


def test_write_dataset_never_writes_pickles(tmp_path, monkeypatch):
    real_save, seen = np.save, []
    monkeypatch.setattr(np, "save", lambda file, array, **kw: (seen.append(kw), real_save(file, array, **kw)))
    data.write_dataset(tmp_path, *small_arrays())
    assert seen and all(kw.get("allow_pickle") is False for kw in seen)


# prepare_image_folder


def test_image_folder_split_rule_class_order_labels_and_resize(tmp_path):
    # Class folders given out of order; each image's red channel names its class, green its file index.
    names = ["zebra", "ant", "moth"]
    for code, name in enumerate(names):
        for index in range(10):
            suffix = ".png" if index % 2 else ".PNG"
            save_image(tmp_path / "src" / name / f"img{index:02d}{suffix}", solid(50 * code, 20 * index))
    (tmp_path / "src" / "ant" / "notes.txt").write_text("ignored")
    (tmp_path / "src" / ".hidden").mkdir()

    data.prepare_image_folder(tmp_path / "src", tmp_path / "out")
    loaded = data.load_dataset(tmp_path / "out")
    assert loaded.classes == ("ant", "moth", "zebra")
    assert loaded.train_images.shape == (24, 32, 32, 3) and loaded.test_images.shape == (6, 32, 32, 3)

    def decode(images, labels):
        """(class name, file index) of each image, checking it stayed one solid colour."""
        pairs = []
        for image, label in zip(images.numpy(), labels.tolist()):
            assert (image == image[0, 0]).all()
            assert names[image[0, 0, 0] // 50] == loaded.classes[label]
            pairs.append((loaded.classes[label], int(image[0, 0, 1]) // 20))
        return pairs

    test_pairs = decode(loaded.test_images, loaded.test_labels)
    train_pairs = decode(loaded.train_images, loaded.train_labels)
    assert sorted(test_pairs) == sorted((name, index) for name in names for index in (4, 9))  # 5th and 10th
    assert sorted(train_pairs + test_pairs) == sorted((name, index) for name in names for index in range(10))
    assert test_pairs != sorted(test_pairs)  # shuffled, so a leading slice mixes classes

    data.prepare_image_folder(tmp_path / "src", tmp_path / "again")
    assert all((tmp_path / "out" / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in FILES)


@pytest.mark.parametrize("count, fraction, expected", [
    (10, 0.2, [4, 9]), (10, 0.5, [1, 3, 5, 7, 9]), (7, 0.3, [3, 6]), (100, 0.29, None), (4, 0.2, []),
])
def test_split_rule_holds_out_floor_n_f_evenly(count, fraction, expected):
    held_out = [i for i in range(count) if data._is_test_file(i, fraction)]
    assert len(held_out) == int(count * fraction + 1e-9)
    if expected is not None:
        assert held_out == expected


def test_image_folder_with_train_and_test_folders_resizes_with_lanczos(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    save_image(tmp_path / "src" / "train" / "cat" / "a.png", noise)
    save_image(tmp_path / "src" / "train" / "cat" / "b.jpg", solid(200, 10))
    save_image(tmp_path / "src" / "train" / "dog" / "c.jpeg", solid(10, 200))
    save_image(tmp_path / "src" / "train" / "dog" / "gray.png", solid(90, 90), mode="L")
    save_image(tmp_path / "src" / "test" / "cat" / "d.png", noise[:16, :16])
    save_image(tmp_path / "src" / "test" / "dog" / "e.png", solid(0, 255, height=12, width=12))

    data.prepare_image_folder(tmp_path / "src", tmp_path / "out", size=16)
    loaded = data.load_dataset(tmp_path / "out")
    assert loaded.classes == ("cat", "dog")
    assert loaded.train_images.shape == (4, 16, 16, 3) and loaded.test_images.shape == (2, 16, 16, 3)
    assert sorted(loaded.train_labels.tolist()) == [0, 0, 1, 1] and sorted(loaded.test_labels.tolist()) == [0, 1]

    images = list(loaded.train_images.numpy())
    expected = np.asarray(Image.fromarray(noise).resize((16, 16), Image.Resampling.LANCZOS))
    assert sum(np.array_equal(image, expected) for image in images) == 1
    assert np.array_equal(loaded.test_images.numpy()[loaded.test_labels.numpy() == 0][0], noise[:16, :16])
    flat = [image for image in images if np.ptp(image.reshape(-1, 3), axis=0).max() <= 3]
    gray = [image for image in flat if image[0, 0, 0] == image[0, 0, 1] == image[0, 0, 2]]
    assert len(gray) == 1 and (gray[0] == gray[0][0, 0]).all()  # mode L became three equal channels
    jpeg = [image for image in flat if image[0, 0, 0] > 150]
    assert len(jpeg) == 1 and np.abs(jpeg[0].astype(int) - [200, 10, 7]).max() <= 3  # JPEG is lossy


def test_undecodable_image_names_the_file(tmp_path):
    for name in ("a", "b"):
        for index in range(5):
            save_image(tmp_path / "src" / name / f"{index}.png", solid(index, 0))
    broken = tmp_path / "src" / "b" / "3.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=f"{broken} is not a readable image"):
        data.prepare_image_folder(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out" / "train_images.npy").exists()


@pytest.mark.parametrize("layout, match", [
    ({}, "holds 0 class folder"),
    ({"a": 3}, "holds 1 class folder"),
    ({"a": 3, "b": 0}, "b holds no .png/.jpg/.jpeg images"),
    ({"a": 3, "b": 3}, "test split would be empty"),
    ({"train/a": 1, "train/b": 1}, "has a train/ folder but no test/"),
    ({"train/a": 1, "train/b": 1, "test/a": 1}, "only in train/: \\['b'\\]"),
])
def test_bad_image_folders_raise_data_error(tmp_path, layout, match):
    (tmp_path / "src").mkdir()
    for folder, count in layout.items():
        (tmp_path / "src" / folder).mkdir(parents=True)
        for index in range(count):
            save_image(tmp_path / "src" / folder / f"{index}.png", solid(0, 0))
    with pytest.raises(DataError, match=match):
        data.prepare_image_folder(tmp_path / "src", tmp_path / "out")


def test_missing_source_folder_and_bad_fraction(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        data.prepare_image_folder(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "src" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="strictly between 0 and 1"):
        data.prepare_image_folder(tmp_path / "src", tmp_path / "out", test_fraction=1.0)


# dataset_info


def test_dataset_info_matches_numpy_and_hashlib(tmp_path):
    train_images, train_labels, test_images, test_labels, classes = small_arrays(num_classes=4)
    data.write_dataset(tmp_path, train_images, train_labels, test_images, test_labels, classes)
    info = data.dataset_info(tmp_path)

    assert info["classes"] == classes and info["image_shape"] == [8, 8, 3]
    assert info["counts"]["train"] == [int((train_labels == c).sum()) for c in range(4)]
    assert info["counts"]["test"] == [int((test_labels == c).sum()) for c in range(4)]
    assert (info["train_size"], info["test_size"]) == (20, 10)
    pixels = train_images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(info["mean"], pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(info["std"], pixels.std(axis=0), rtol=1e-6)
    assert info["sha256"] == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in FILES}
    listing = "".join(f"{hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}  {name}\n" for name in FILES)
    assert info["sha256_all"] == hashlib.sha256(listing.encode()).hexdigest()


def test_dataset_info_on_a_missing_folder(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        data.dataset_info(tmp_path / "nowhere")
    with pytest.raises(DataError, match="classes.txt is missing"):
        data.dataset_info(tmp_path)


def test_dataset_info_on_real_cifar10(cifar_dir):
    info = data.dataset_info(cifar_dir)
    assert info["image_shape"] == [32, 32, 3] and len(info["classes"]) == 10
    assert info["counts"] == {"train": [5000] * 10, "test": [1000] * 10}
    np.testing.assert_allclose(info["mean"], (0.4913, 0.4821, 0.4465), atol=2e-4)
    np.testing.assert_allclose(info["std"], (0.2452, 0.2428, 0.2606), atol=2e-4)
    sums = cifar_dir / "SHA256SUMS"  # shipped in ../shared/data/cifar10, in sha256sum format
    if not sums.is_file():
        missing(f"{sums} is missing, so the data cannot be checked against its published checksums")
    listed = {name: digest for digest, name in (line.split("  ") for line in sums.read_text().splitlines())}
    assert info["sha256"] == listed
    assert info["sha256_all"] == hashlib.sha256(sums.read_bytes()).hexdigest()


# prepare_torchvision and resolve_data_dir (torchvision's dataset classes are replaced by fakes)


class FakeCifar:
    """Stands in for ``torchvision.datasets.CIFAR10``: small arrays, records how it was called."""

    calls: list = []

    def __init__(self, root, train=True, download=False):
        type(self).calls.append((Path(root), train, download))
        count = 12 if train else 6
        self.data = np.full((count, 32, 32, 3), 100 if train else 200, dtype=np.uint8)
        self.targets = [i % 3 for i in range(count)]
        self.classes = ["airplane", "bird", "cat"]


class OfflineCifar:
    """Raises what torchvision raises without a network (download=True) or without files (download=False)."""

    def __init__(self, root, train=True, download=False):
        if download:
            raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")


@pytest.fixture
def fake_cifar(monkeypatch):
    FakeCifar.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCifar)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCifar)
    return FakeCifar


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", OfflineCifar)


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty candidate folders: $FNCLASS_DATA unset, the cache under a temporary $XDG_CACHE_HOME."""
    monkeypatch.delenv("FNCLASS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def test_prepare_torchvision_writes_the_canonical_format(tmp_path, fake_cifar):
    assert data.prepare_torchvision("cifar100", tmp_path / "out", download=False) == tmp_path / "out"
    assert fake_cifar.calls == [(tmp_path / "out" / "torchvision", True, False),
                                (tmp_path / "out" / "torchvision", False, False)]
    loaded = data.load_dataset(tmp_path / "out")
    assert loaded.classes == ("airplane", "bird", "cat")
    assert loaded.train_images.shape == (12, 32, 32, 3) and int(loaded.test_images[0, 0, 0, 0]) == 200
    assert loaded.train_labels.tolist() == [i % 3 for i in range(12)]


def test_prepare_torchvision_offline_is_one_line_naming_the_place(tmp_path, offline):
    with pytest.raises(DataError) as caught:
        data.prepare_torchvision("cifar10", tmp_path / "out", download_root=tmp_path / "tv")
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "seems offline" in message and str(tmp_path / "tv") in message
    assert "fnclass data prepare" in message and "--data-dir" in message
    with pytest.raises(DataError, match="downloading is off"):
        data.prepare_torchvision("cifar10", tmp_path / "out", download=False)
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        data.prepare_torchvision("imagenet", tmp_path / "out")


def test_prepare_dispatches_and_rejects_folder_options_for_cifar(tmp_path, fake_cifar):
    data.prepare("cifar10", tmp_path / "out", size=32)
    assert (tmp_path / "out" / "train_images.npy").is_file()
    with pytest.raises(DataError, match="apply to image folders"):
        data.prepare("cifar10", tmp_path / "out", size=64)
    with pytest.raises(DataError, match="is not a folder"):
        data.prepare(tmp_path / "cifar10", tmp_path / "out")  # a path is never a dataset name


def test_resolve_order_data_dir_then_env_then_cache(places, monkeypatch):
    given, env, cache = places / "given", places / "env", places / "xdg" / "fnclass" / "cifar10"
    for folder in (given, env, cache):
        data.write_dataset(folder, *small_arrays())
    monkeypatch.setenv("FNCLASS_DATA", str(env))
    assert data.resolve_data_dir(given, "cifar10") == given
    assert data.resolve_data_dir(None, "cifar10") == env
    monkeypatch.setenv("FNCLASS_DATA", str(places / "no-such-folder"))
    assert data.resolve_data_dir(None, "cifar10") == cache
    monkeypatch.delenv("FNCLASS_DATA")
    assert data.resolve_data_dir(None, "cifar10", download=False) == cache


def test_resolve_never_falls_through_a_bad_data_dir(places, monkeypatch):
    data.write_dataset(places / "env", *small_arrays())
    monkeypatch.setenv("FNCLASS_DATA", str(places / "env"))
    with pytest.raises(DataError, match=f"data folder {places / 'empty'} has no train_images.npy"):
        data.resolve_data_dir(places / "empty", "cifar10")


def test_resolve_uses_home_cache_without_xdg(places, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(places / "home"))
    data.write_dataset(places / "home" / ".cache" / "fnclass" / "cifar100", *small_arrays())
    assert data.resolve_data_dir(None, "cifar100") == places / "home" / ".cache" / "fnclass" / "cifar100"


def test_resolve_downloads_into_the_cache(places, fake_cifar):
    cache = places / "xdg" / "fnclass" / "cifar10"
    assert data.resolve_data_dir(None, "cifar10") == cache
    assert fake_cifar.calls == [(cache / "torchvision", True, True), (cache / "torchvision", False, True)]
    assert data.load_dataset(cache).classes == ("airplane", "bird", "cat")
    assert data.resolve_data_dir(None, "cifar10") == cache and len(fake_cifar.calls) == 2  # found, no download


def test_resolve_offline_error_names_every_place_and_the_command(places, monkeypatch, offline):
    monkeypatch.setenv("FNCLASS_DATA", str(places / "wrong"))
    cache = places / "xdg" / "fnclass" / "cifar10"
    with pytest.raises(DataError) as caught:
        data.resolve_data_dir(None, "cifar10")
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    for part in (f"$FNCLASS_DATA={places / 'wrong'}", str(cache), "seems offline",
                 f"fnclass data prepare cifar10 --out {cache}", "--data-dir"):
        assert part in message
    assert not (cache / "train_images.npy").exists()


def test_resolve_without_download_or_for_other_datasets(places, fake_cifar):
    with pytest.raises(DataError, match=r"\$FNCLASS_DATA \(not set\).*downloading is off.*fnclass data prepare"):
        data.resolve_data_dir(None, "cifar10", download=False)
    with pytest.raises(DataError, match="no flowers data found.*fnclass data prepare IMAGE_FOLDER"):
        data.resolve_data_dir(None, "flowers")
    assert fake_cifar.calls == []


def test_validation_split_is_class_balanced_seeded_and_a_partition():
    shuffle = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[shuffle]
    train_idx, val_idx = data.validation_split(labels, 15, seed=0)
    assert torch.equal(torch.sort(torch.cat([train_idx, val_idx])).values, torch.arange(100))  # a partition
    assert torch.equal(train_idx, torch.sort(train_idx).values) and torch.equal(val_idx, torch.sort(val_idx).values)
    # Quotas 15 x (50, 30, 20) / 100 = 7.5, 4.5, 3.0: floors 7, 4, 3 and the one left over goes to the largest
    # remainder, a tie of 0.5 broken towards the lower label: 8, 4, 3.
    assert torch.bincount(labels[val_idx], minlength=3).tolist() == [8, 4, 3]
    assert torch.equal(data.validation_split(labels, 15, seed=0)[1], val_idx)  # fixed by its seed
    assert not torch.equal(data.validation_split(labels, 15, seed=1)[1], val_idx)
    assert torch.equal(data.validation_split(labels, 0.15, seed=0)[1], val_idx)  # a fraction of 100 is the same
    # Which images of a class go is the seed's permutation of that class's images.
    root = random.key(0)
    for label, share in enumerate([8, 4, 3]):
        members = torch.nonzero(labels == label).flatten()
        expected = members[random.permutation(random.fold_in(root, label), len(members))[:share]]
        assert set(expected.tolist()) == set(val_idx[labels[val_idx] == label].tolist())
    for size in (100, 1.0 - 1e-9, 0.001):
        with pytest.raises(DataError, match="leaves images on both sides"):
            data.validation_split(labels, size, seed=0)
