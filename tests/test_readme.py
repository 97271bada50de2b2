"""README.md as a newcomer runs it (issue 32): every Python block, and every Quick-start command, shrunk to a few
hundred images and one epoch, in a fresh folder with only FNCLASS_DATA set, as the README says."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from fnclass.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
# Each command gets these on top of its own (later --set overrides win); the README's sizes shrink with them.
SHRINK = {"train": ["--set", "data.train_limit=300", "--set", "data.test_limit=100", "--set", "train.epochs=1",
                    "--set", "train.batch_size=40"],
          "eval": ["--limit", "100"], "grads": ["--limit", "60"], "influence": ["--train-limit", "40"]}
REPLACED = {"data.val_size=5000": "data.val_size=60", "--test-indices 0-7": "--test-indices 0-1",
            "--seeds 0-3": "--seeds 0-1"}
# Not run here: torchrun (two processes of the GPU recipe; tests/test_distributed.py runs torchrun on the CPU).
LEFT_OUT = ("torchrun",)


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def quick_start() -> list[str]:
    """The Quick start's command lines, comments removed."""
    block = next(b for b in _blocks("bash") if "export FNCLASS_DATA" in b)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith(" ")]


def shrunk(line: str) -> list[str]:
    for old, new in REPLACED.items():
        line = line.replace(old, new)
    args = shlex.split(line)[1:]
    extra = SHRINK.get(args[0], [])
    if args[0] == "train" and "--resume" in args:
        extra = []  # a resumed run takes its recorded config
    if args[0] == "train" and "--config" in args and args[args.index("--config") + 1] == "dp":
        extra = [*extra, "--set", "train.batch_size=100"]  # the expected Poisson batch, a third of 300 images
    if any("train_indices" in a for a in args):  # the kept rows are the selection: no train_limit beside it
        extra = ["--set", "data.test_limit=100", "--set", "train.epochs=1", "--set", "train.batch_size=40"]
    return [*args, *extra]


def test_the_quick_start_runs_as_written_in_a_fresh_folder(cifar_dir, tmp_path, monkeypatch):
    lines, cifar_dir = quick_start(), cifar_dir.resolve()
    assert lines[0] == "export FNCLASS_DATA=../shared/data/cifar10"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FNCLASS_DATA", str(cifar_dir))  # the README's relative path, from the repository root
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing found there, nothing written
    cat = np.load(cifar_dir / "test_images.npy", mmap_mode="r")[0]  # test image 0 is a cat
    from PIL import Image

    Image.fromarray(np.array(cat)).save(tmp_path / "cat.png")
    outputs = {}
    for line in lines[1:]:
        if line.startswith(LEFT_OUT):
            continue
        assert line.startswith("fnclass "), line
        result = CliRunner().invoke(main, shrunk(line))
        assert result.exit_code == 0, f"{line}\n{result.output}"
        outputs[line] = result.output
    assert not (tmp_path / "cache/fnclass").exists()  # (matplotlib may keep its font cache there)
    said = lambda start: next(text for line, text in outputs.items() if line.startswith(start))
    assert "runs/cpu4: using runs/cpu4/checkpoints/best.safetensors (the run's best checkpoint" in \
        said("fnclass eval runs/cpu4")
    assert "the run already finished its 1 epochs" in said("fnclass train --resume runs/cpu4")
    assert "precision fp32" in said("fnclass train --config cpu --set train.epochs=4")
    # grads --score and influence take the same rows: the run's 300 (and the --limit / --train-limit of them)
    scores = json.loads((tmp_path / "scores/scores.json").read_text())
    assert (scores["rows"], scores["num_examples"], scores["kept"]) == ("run", 60, math.ceil(0.7 * 60))
    assert "(the rows the run trained on)" in said("fnclass grads runs/cpu4 --score")
    kept = [int(v) for v in (tmp_path / "scores/kept_indices.txt").read_text().split()]
    assert kept == sorted(kept) and max(kept) < 60
    assert said("fnclass influence runs/traced --test-indices").startswith("tracin (raw weights): 1 checkpoint, 40 ")
    prediction = said("fnclass predict model.onnx cat.png")
    assert "cat.png" in prediction and "probability" in prediction


def test_every_python_block_runs_as_written(cifar_dir, tmp_path, monkeypatch):
    """The blocks in order, in one namespace (as one session), in a fresh folder."""
    cifar_dir = cifar_dir.resolve()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FNCLASS_DATA", str(cifar_dir))
    namespace = {}
    for block in _blocks("python"):
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    # the functional core: a real step on real images, its loss that of the model at the initial parameters
    assert 1.0 < float(namespace["metrics"]["loss"]) < 4.0
    assert 0.0 <= namespace["result"].summary["test_accuracy"] <= 1.0
    assert (tmp_path / "runs/readme/summary.json").is_file()
    # the pretrained model on NumPy images: the same as on the torch tensor of them
    model, images = namespace["model"], namespace["images"]
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8
    assert torch.allclose(namespace["probabilities"], model.logits(torch.from_numpy(images)).softmax(-1))
