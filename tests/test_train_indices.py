"""``data.train_indices``: training on a file's selection is training on a folder holding just those images; the
file formats read alike; bad files and combinations are one line before anything is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from fnclass import data
from fnclass.cli import main
from fnclass.config import load_config
from fnclass.training.program import train
from tests.oneline import one_error_line

SMALL = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "model.whiten=false",
         "model.dirac_init=false", "optim.whiten_bias_epochs=0", "optim.muon=false", "data.test_limit=200",
         "train.epochs=2", "train.batch_size=64", "train.log_every_steps=0", "train.channels_last=false",
         "train.tta=false", "data.val_size=40"]
SELECTED = 200  # 40 held out for validation, 160 trained on: 2 steps of 64 an epoch (32 dropped)


@pytest.fixture(scope="module")
def selection(cifar_dir, tmp_path_factory) -> tuple:
    """A random selection from the whole training split, its file, and a data folder holding only those images."""
    folder = tmp_path_factory.mktemp("selection")
    labels = np.load(cifar_dir / "train_labels.npy")
    chosen = np.random.default_rng(0).choice(len(labels), SELECTED, replace=False)  # unsorted, as a file may be
    path = folder / "chosen.txt"
    path.write_text("".join(f"{i}\n" for i in chosen))
    rows = np.sort(chosen)
    images = np.load(cifar_dir / "train_images.npy", mmap_mode="r")[rows]
    subset = data.write_dataset(folder / "subset", images, labels[rows], np.load(cifar_dir / "test_images.npy"),
                                np.load(cifar_dir / "test_labels.npy"), data.load_classes(cifar_dir))
    return path, subset, rows


def _tensors(path) -> dict:
    return safetensors.torch.load_file(path)


def test_training_on_indices_is_training_on_those_images(cifar_dir, selection, tmp_path, monkeypatch):
    """Two epochs on the selection against two epochs on a folder of the selected rows in sorted order (same seed,
    the same validation split carved out of them): every tensor of the final checkpoint is bit-identical, since both
    runs do the same arithmetic on the same images. The path is given relative to the current directory, as
    config.toml records it, and --resume from the first epoch's checkpoint ends on the same bits too."""
    path, subset, _ = selection
    cifar_dir = cifar_dir.resolve()  # before moving to the selection's folder
    monkeypatch.chdir(path.parent)
    picked = train(load_config("cpu", SMALL + [f"data.train_indices={path.name}"]), tmp_path / "picked",
                   data_dir=str(cifar_dir))
    folder = train(load_config("cpu", SMALL), tmp_path / "folder", data_dir=str(subset))
    assert picked.summary["train_images"] == folder.summary["train_images"] == SELECTED - 40
    assert picked.summary["val_images"] == 40
    last = _tensors(tmp_path / "picked/checkpoints/last.safetensors")
    expected = _tensors(tmp_path / "folder/checkpoints/last.safetensors")
    assert last.keys() == expected.keys() and all(torch.equal(last[k], expected[k]) for k in last)
    assert f'train_indices = "{path.name}"' in (tmp_path / "picked/config.toml").read_text()

    # Resume from the end of epoch 1, from the selection's folder: the recorded relative path still finds it.
    checkpoints = tmp_path / "picked/checkpoints"
    shutil.copy(checkpoints / "step-00000002.safetensors", checkpoints / "last.safetensors")
    result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "picked"), "--data-dir", str(cifar_dir),
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    resumed = _tensors(checkpoints / "last.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)

    # `fnclass eval --split val` rebuilds the held-out images from the selection: the run's own final val accuracy.
    result = CliRunner().invoke(main, ["eval", str(checkpoints / "last.safetensors"), "--split", "val", "--data-dir",
                                       str(cifar_dir), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["images"] == 40 and evaluated["accuracy"] == picked.summary["val_accuracy"]


def test_npy_txt_and_csv_read_to_the_same_sorted_indices(tmp_path):
    indices = [7, 0, 3, 12, 5]
    np.save(tmp_path / "a.npy", np.array(indices, dtype=np.int32))
    (tmp_path / "a.txt").write_text("7\n0\n\n3\n12\n5")  # a blank line, no final newline
    (tmp_path / "a.csv").write_text("index,label,score\r\n7,1,0.5\r\n0,2,0.25\r\n3,0,1\r\n12,1,0.1\r\n5,3,0.2\r\n")
    (tmp_path / "b.csv").write_text("7\n0\n3\n12\n5\n")  # a CSV without a header
    expected = torch.tensor(sorted(indices))
    for name in ("a.npy", "a.txt", "a.csv", "b.csv"):
        read = data.read_indices(tmp_path / name, 13)
        assert read.dtype == torch.int64 and torch.equal(read, expected), name


def test_the_selected_rows_are_loaded_in_sorted_order(cifar_dir, tmp_path):
    (tmp_path / "some.txt").write_text("49999\n17\n3\n")
    images, labels = data.load_split(cifar_dir, "train", indices=tmp_path / "some.txt")
    every_image = np.load(cifar_dir / "train_images.npy", mmap_mode="r")
    assert np.array_equal(images.numpy(), every_image[[3, 17, 49999]])
    assert np.array_equal(labels.numpy(), np.load(cifar_dir / "train_labels.npy")[[3, 17, 49999]])


BAD = {
    "missing.txt": (None, "missing.txt is missing"),
    "float.txt": ("1\n2.5\n", "line 2 is '2.5', not an integer"),
    "word.csv": ("index\n4\nfour\n", "line 3 is 'four', not an integer"),
    "empty.txt": ("\n\n", "selects no images"),
    "twice.txt": ("8\n3\n8\n", "index 8 is listed more than once"),
    "outside.txt": ("3\n50000\n-1\n", "index 50000 is out of range: the training split has 50,000 images"),
    "negative.txt": ("-1\n", "line 1: index -1 is out of range"),
    "huge.txt": ("5\n" + "1" * 5000 + "\n", "line 2: index 1111"),  # int() refuses 5000 digits: no traceback
    "uint64.npy": (np.array([3, 2**64 - 1], dtype=np.uint64), "index 18446744073709551615 is out of range"),
    "floats.npy": (np.array([1.0, 2.0]), "expected a 1-d integer array, got float64 (2,)"),
    "objects.npy": (np.array([1, None], dtype=object), "holds Python objects (a pickle)"),
    "indices.json": ("[1, 2]", "expected a .npy, .txt or .csv file"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_index_file_is_one_line_and_writes_nothing(cifar_dir, tmp_path, name):
    content, message = BAD[name]
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        np.save(path, content, allow_pickle=True)  # the pickle is the hostile file under test
    out = tmp_path / "run"
    one_error_line(["train", "--config", "cpu", "--data-dir", str(cifar_dir), "--out", str(out),
                    *[a for s in SMALL for a in ("--set", s)], "--set", f"data.train_indices={path}"],
                   str(path), message)
    assert not out.exists()


@pytest.mark.parametrize("sets, message", [
    (["data.train_limit=1000"], "data.train_limit = 1000 is not allowed: expected no value when data.train_indices "
                                "is set (both choose the training images: use one)"),
    (["train.batch_size=161"], "train.batch_size = 161 is more than the 160 training images: set train.batch_size "
                               "<= 160 or select more images (data.train_indices)"),
])
def test_a_selection_that_cannot_work_is_one_line(cifar_dir, selection, tmp_path, sets, message):
    path, _, _ = selection
    out = tmp_path / "run"
    one_error_line(["train", "--config", "cpu", "--data-dir", str(cifar_dir), "--out", str(out),
                    *[a for s in SMALL + sets for a in ("--set", s)], "--set", f"data.train_indices={path}"], message)
    assert not out.exists()
