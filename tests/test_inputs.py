"""A run's input files are fingerprinted when it starts, and `--resume` refuses inputs that changed (issue 30).

The run trains on a small data folder cut from real CIFAR-10, with a selection file (``data.train_indices``), a
weight file (``data.train_weights``) and a fine-tuning source (``train.init_from``). Each input is then changed in
turn (a byte of the same size, a file removed, a line of a text file, another checkpoint) and ``fnclass train
--resume`` must refuse in one ``error:`` line naming it, exit 2, with the run folder untouched; put back (same
bytes, new modification times: the hash path), the resume goes on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from fnclass.cli import main
from fnclass.config import load_config
from fnclass.data import FILES, dataset_info, load_split, write_dataset
from fnclass.run.inputs import INPUTS_FILE
from fnclass.training.program import train

QUICK = ["model.name=tiny", "model.widths=[8, 16, 16]", "model.stem_width=8", "data.test_limit=200",
         "train.epochs=1", "train.batch_size=100", "train.log_every_steps=2"]


def _snapshot(folder):
    """Every file under ``folder`` with its size and modification time: what a refused resume must not change."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fine_tuned(cifar_dir, tmp_path_factory):
    """A data folder of 600 + 200 real images, a source run, and a run fine-tuned from it with both input files."""
    root = tmp_path_factory.mktemp("inputs")
    images, labels = load_split(cifar_dir, "train", limit=600)
    test_images, test_labels = load_split(cifar_dir, "test", limit=200)
    classes = (cifar_dir / "classes.txt").read_text().split()
    data = write_dataset(root / "data", images.numpy(), labels.numpy(), test_images.numpy(), test_labels.numpy(),
                         classes)
    train(load_config(None, QUICK), root / "source", data_dir=str(data))
    np.savetxt(root / "kept.txt", np.arange(0, 600, 2), fmt="%d")
    np.save(root / "weights.npy", np.linspace(0.5, 1.5, 600).astype(np.float32), allow_pickle=False)
    sets = [*QUICK, f"data.train_indices='{root / 'kept.txt'}'", f"data.train_weights='{root / 'weights.npy'}'",
            f"train.init_from='{root / 'source/checkpoints/last.safetensors'}'"]
    train(load_config(None, sets), root / "run", data_dir=str(data))
    return root, data


def test_a_run_records_the_sha256_of_every_input(fine_tuned):
    root, data = fine_tuned
    record = json.loads((root / "run" / INPUTS_FILE).read_text())
    files = {(f["input"], os.path.basename(f["path"])): f for f in record["files"]}
    expected = {("data", name): data / name for name in FILES}
    expected |= {("data.train_indices", "kept.txt"): root / "kept.txt",
                 ("data.train_weights", "weights.npy"): root / "weights.npy",
                 ("train.init_from", "last.safetensors"): root / "source/checkpoints/last.safetensors"}
    assert files.keys() == expected.keys()
    for key, path in expected.items():  # against hashlib on the files themselves
        assert files[key]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), key
        assert files[key]["bytes"] == path.stat().st_size
    assert record["data_sha256_all"] == dataset_info(data)["sha256_all"]  # what `fnclass data info` prints
    summary = json.loads((root / "run/summary.json").read_text())
    assert summary["inputs"] == record


def _resume(root, data_dir):
    return CliRunner().invoke(main, ["train", "--resume", str(root / "run"), "--data-dir", str(data_dir), "--quiet"])


def _flip_a_byte(path):
    payload = bytearray(path.read_bytes())
    payload[-1] ^= 0x01  # the last pixel (or label): same size, other bytes
    path.write_bytes(bytes(payload))


def _replace_line(path):
    lines = path.read_text().splitlines()
    lines[3] = "7"  # 6 -> 7: the same size, another image
    path.write_text("\n".join(lines) + "\n")


def _other_weights(path):
    weights = np.load(path)
    weights[10] = 2.0
    np.save(path, weights, allow_pickle=False)


CHANGES = [  # (what is changed, how, the words the error names it by)
    ("data/train_images.npy", _flip_a_byte, "data folder file"),
    ("data/classes.txt", lambda path: path.unlink(), "is missing"),
    ("kept.txt", _replace_line, "data.train_indices file"),
    ("weights.npy", _other_weights, "data.train_weights file"),
    ("source/checkpoints/last.safetensors", _flip_a_byte, "train.init_from file"),
]


@pytest.mark.parametrize("name, change, words", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_refuses_a_changed_input_and_writes_nothing(fine_tuned, name, change, words):
    root, data = fine_tuned
    path = root / name
    original = path.read_bytes()
    before = _snapshot(root / "run")
    change(path)
    try:
        result = _resume(root, data)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --resume:") and words in lines[0], lines
        assert str(path.name) in lines[0] and "start a new run with --out" in lines[0]
        assert _snapshot(root / "run") == before  # nothing written, not even the lock's file or config.toml
    finally:
        path.write_bytes(original)  # the same bytes under a new modification time
    result = _resume(root, data)  # back as it was: the hash decides, and the finished run resumes
    assert result.exit_code == 0, result.output


def test_a_moved_copy_of_the_data_passes_by_its_bytes(fine_tuned, tmp_path):
    root, data = fine_tuned
    copy = tmp_path / "copied"
    shutil.copytree(data, copy)  # other modification times, the same bytes
    for name in FILES:
        os.utime(copy / name, ns=(1, 1))
    result = _resume(root, copy)
    assert result.exit_code == 0, result.output


def test_a_run_from_before_the_record_resumes_with_a_warning_and_records_its_inputs(fine_tuned, tmp_path):
    root, data = fine_tuned
    old = tmp_path / "old"
    shutil.copytree(root / "run", old)
    (old / INPUTS_FILE).unlink()
    result = CliRunner().invoke(main, ["train", "--resume", str(old), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "warning: the run recorded no inputs.json" in result.stderr
    record = json.loads((old / INPUTS_FILE).read_text())
    assert record["recorded_on_resume"] is True
    assert [f["sha256"] for f in record["files"]] == [
        f["sha256"] for f in json.loads((root / "run" / INPUTS_FILE).read_text())["files"]]


def test_metagrad_refuses_to_replay_a_run_on_changed_data(fine_tuned):
    from tests.oneline import one_error_line

    root, data = fine_tuned
    path = data / "train_labels.npy"
    original = path.read_bytes()
    _flip_a_byte(path)
    try:
        one_error_line(["influence", str(root / "source"), "--method", "metagrad", "--test-indices", "0",
                        "--data-dir", str(data), "--out", str(root / "metagrad")],
                       "--method metagrad: data folder file", "train_labels.npy changed since the run started")
    finally:
        path.write_bytes(original)
    assert not (root / "metagrad").exists()
