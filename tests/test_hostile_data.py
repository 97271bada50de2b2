"""Hostile data folders (issue 12): each malformed file is one ``error:`` line naming it, exit code 2, no change.

Through the real CLI (``fnclass data info`` and ``fnclass eval --data-dir``) and ``fnclass.data`` directly.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fnclass import data
from fnclass.data import DataError
from tests.oneline import one_error_line

CLASSES = ["cat", "dog", "emu"]
ROOT = Path(__file__).resolve().parents[1]


def write_folder(folder: Path) -> Path:
    """A valid data folder: 6 train and 4 test images of 16 x 16, labels 0..2."""
    rng = np.random.default_rng(0)
    return data.write_dataset(folder, rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), [0, 1, 2, 0, 1, 2],
                              rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), [0, 1, 2, 0], CLASSES)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def _npy_with_header(path: Path, shape, descr: str = "|u1", data_bytes: int = 1000) -> None:
    """A .npy file whose header claims ``shape`` but which holds only ``data_bytes`` bytes of data."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": descr, "fortran_order": False, "shape": shape})
        handle.write(b"\0" * data_bytes)


def _truncate(path: Path, count: int) -> None:
    path.write_bytes(path.read_bytes()[:-count])


# (file broken, how, what the one line says). Every case leaves the other four files valid.
BROKEN = {
    "float images": ("train_images.npy", lambda p: np.save(p, np.zeros((6, 16, 16, 3), np.float32)),
                     "expected uint8 images of shape (N, H, W, 3), got float32"),
    "rank 3 images": ("train_images.npy", lambda p: np.save(p, np.zeros((6, 16, 16), np.uint8)), "(6, 16, 16)"),
    "4 channels": ("train_images.npy", lambda p: np.save(p, np.zeros((6, 16, 16, 4), np.uint8)), "(6, 16, 16, 4)"),
    "zero height": ("train_images.npy", lambda p: np.save(p, np.zeros((6, 0, 16, 3), np.uint8)), "(6, 0, 16, 3)"),
    "fewer labels": ("train_labels.npy", lambda p: np.save(p, np.zeros(5, np.int64)), "5 labels for 6 images"),
    "label too large": ("train_labels.npy", lambda p: np.save(p, np.array([0, 1, 2, 3, 0, 1])), "0..2"),
    "negative label": ("train_labels.npy", lambda p: np.save(p, np.array([0, 1, 2, -1, 0, 1])), "found -1..2"),
    "float labels": ("train_labels.npy", lambda p: np.save(p, np.arange(6.0)), "1-d integer array, got float64"),
    "bool labels": ("train_labels.npy", lambda p: np.save(p, np.ones(6, bool)), "got bool"),
    "2-d labels": ("train_labels.npy", lambda p: np.save(p, np.zeros((6, 1), np.int64)), "got int64 (6, 1)"),
    "truncated images": ("train_images.npy", lambda p: _truncate(p, 100), "is damaged: its header says uint8"),
    "truncated header": ("train_images.npy", lambda p: p.write_bytes(p.read_bytes()[:40]), "bad header"),
    "garbage header": ("train_images.npy", lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\x20\x00{garbage: ]]] }\n" +
                                                                   bytes(100)), "bad header"),
    "not an npy file": ("train_images.npy", lambda p: p.write_bytes(b"PK\x03\x04 a zip file"), "bad header"),
    "absurd shape": ("train_images.npy", lambda p: _npy_with_header(p, (10**12, 32, 32, 3)),
                     "(1000000000000, 32, 32, 3) (3,072,000,000,000,000 bytes) but the file holds 1,000 bytes"),
    "negative shape": ("train_images.npy", lambda p: _npy_with_header(p, (-1, -1, 1, 3), data_bytes=3), "damaged"),
    "empty test split": ("test_images.npy", lambda p: np.save(p, np.zeros((0, 16, 16, 3), np.uint8)),
                         "needs at least one image"),
    "missing labels": ("train_labels.npy", lambda p: p.unlink(), "is missing"),
    "labels a folder": ("train_labels.npy", lambda p: (p.unlink(), p.mkdir()), "is not a file"),
    "no class names": ("classes.txt", lambda p: p.write_text(""), "expected at least 2 class names, got 0"),
    "latin-1 classes": ("classes.txt", lambda p: p.write_bytes(b"caf\xe9\ndog\nemu\n"),
                        "is not UTF-8 text (byte 3 is 0xe9)"),
    "repeated class": ("classes.txt", lambda p: p.write_text("cat\ncat\nemu\n"), "repeated: cat"),
    "blank line": ("classes.txt", lambda p: p.write_text("cat\n\ndog\nemu\n"), "line 2 is empty"),
    "too few classes": ("classes.txt", lambda p: p.write_text("cat\ndog\n"), "labels must lie in 0..1"),
    "huge classes.txt": ("classes.txt", lambda p: p.write_text("cat\n" * 300_000), "over 1,048,576 bytes"),
    # Just under the size limit: 200,000 names, checked in linear time.
    "many repeats": ("classes.txt", lambda p: p.write_text("".join(f"c{i % 9}\n" for i in range(200_000))),
                     "repeated: c0, c1, c2, c3, c4 and 4 more"),
}
# Which file a case breaks decides which split `fnclass eval` must load to meet it.
SPLIT = {"train_images.npy": "train", "train_labels.npy": "train", "test_images.npy": "test", "classes.txt": "test"}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_folder_is_one_line_naming_the_file_for_info_and_eval(tmp_path, tiny_checkpoint, case):
    name, damage, message = BROKEN[case]
    folder = write_folder(tmp_path / "set")
    damage(folder / name)
    before = snapshot(folder)
    one_error_line(["data", "info", str(folder)], str(folder), message)
    one_error_line(["eval", str(tiny_checkpoint), "--data-dir", str(folder), "--split", SPLIT[name], "--device", "cpu",
                    "--no-download"], str(folder), message)
    assert snapshot(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_fixes_the_messages_suggest_are_accepted(tmp_path):
    """The rules are not stricter than the format: a byte-order mark and trailing blank lines are fine."""
    folder = write_folder(tmp_path / "set")
    (folder / "classes.txt").write_bytes("\ufeffcat\ndog\r\nemu\n\n\n".encode())
    assert data.load_dataset(folder).classes == tuple(CLASSES)


def test_absurd_header_is_refused_before_anything_is_loaded(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "set")
    _npy_with_header(folder / "train_images.npy", (10**5, 32, 32, 3))  # 307 MB claimed, 1,000 bytes held

    def no_loading(*args, **kwargs):
        raise AssertionError("np.load was called on a file whose header does not fit its size")
    monkeypatch.setattr(np, "load", no_loading)
    with pytest.raises(DataError, match="307,200,000 bytes"):
        data.load_split(folder, "train")


def test_absurd_header_in_a_real_process_is_one_line_on_stderr_and_exit_code_2(tmp_path):
    """The console entry point in its own process: nothing on stdout, one stderr line, no traceback, no hang."""
    folder = write_folder(tmp_path / "set")
    _npy_with_header(folder / "train_images.npy", (10**12, 32, 32, 3))
    result = subprocess.run([sys.executable, "-c", "from fnclass.cli import main; main()", "data", "info", str(folder)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    assert result.stderr.startswith(f"error: {folder / 'train_images.npy'} is damaged") and \
        result.stderr.count("\n") == 1, result.stderr


class _RunsCode:
    """A pickle that, when loaded, creates a file: what a crafted .npy of objects would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_npy_is_refused_and_never_unpickled(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "set")
    np.save(folder / "train_labels.npy", np.array([_RunsCode(tmp_path / "probe")] * 6, dtype=object),
            allow_pickle=True)
    np.load(folder / "train_labels.npy", allow_pickle=True)  # the payload works: loading it runs code
    assert (tmp_path / "probe").exists()
    marker = tmp_path / "code-ran"
    np.save(folder / "train_labels.npy", np.array([_RunsCode(marker)] * 6, dtype=object), allow_pickle=True)
    before = snapshot(folder)
    one_error_line(["data", "info", str(folder)], str(folder / "train_labels.npy"), "holds Python objects (a pickle)")
    for unpickle in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, unpickle, lambda *args, **kwargs: pytest.fail("something tried to unpickle"))
    with pytest.raises(DataError, match="never loaded"):
        data.load_dataset(folder)
    assert not marker.exists() and snapshot(folder) == before


def test_labels_are_checked_beyond_the_limit(tmp_path):
    """`--limit` / `data.train_limit` do not hide a broken file: the whole file is checked, then sliced."""
    folder = write_folder(tmp_path / "set")
    np.save(folder / "train_labels.npy", np.array([0, 1, 2, 0, 1, 7]))
    with pytest.raises(DataError, match="labels must lie in 0..2"):
        data.load_split(folder, "train", limit=2)


@pytest.fixture(scope="module")
def valid_npy(tmp_path_factory) -> bytes:
    return (write_folder(tmp_path_factory.mktemp("valid") / "set") / "train_images.npy").read_bytes()


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.none() | st.integers(0, 1600))
def test_fuzzed_npy_header_loads_or_fails_in_one_line(tmp_path, valid_npy, edits, cut):
    """Random bytes in the 128-byte header (and a random cut) give a valid split or one DataError line."""
    folder = tmp_path / "set"
    if not folder.exists():
        write_folder(folder)
    blob = bytearray(valid_npy)
    for position, value in edits:
        blob[position] = value
    (folder / "train_images.npy").write_bytes(bytes(blob[:cut]))
    try:
        images, labels = data.load_split(folder, "train")
    except DataError as error:
        assert str(error).startswith(str(folder / "train_images.npy")) and "\n" not in str(error)
    else:
        assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[0] == len(labels) == 6


@pytest.mark.parametrize("size", [8, 5])
def test_images_of_another_size_than_the_model_takes_are_one_line_for_eval_and_grads(tmp_path, tiny_checkpoint,
                                                                                     size):
    """8 x 8 images used to be evaluated silently by the 16 x 16 model, 5 x 5 ones to crash with a traceback."""
    rng = np.random.default_rng(0)
    folder = data.write_dataset(tmp_path / "set", rng.integers(0, 256, (6, size, size, 3), dtype=np.uint8),
                                [0, 1, 2, 0, 1, 2], rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
                                [0, 1, 2, 0], CLASSES)
    message = f"images are {size}x{size} but the checkpoint's model takes 16x16"
    one_error_line(["eval", str(tiny_checkpoint), "--data-dir", str(folder), "--device", "cpu"], str(folder), message)
    one_error_line(["grads", str(tiny_checkpoint), "--data-dir", str(folder), "--out", str(tmp_path / "grads"),
                    "--device", "cpu"], str(folder), message)
    assert not (tmp_path / "grads").exists()
