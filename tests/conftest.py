"""Shared fixtures: real CIFAR-10 from $FNCLASS_DATA (required under CI=true, skipped elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.needs import missing

# configs/cpu.toml's train.precision = "auto" picks bf16 on CPUs with bf16 units: the suite pins fp32 so that its
# numbers are the same on every CPU (and in the commands it starts); tests of bf16 and of auto ask for them.
os.environ["FNCLASS_AUTO_PRECISION"] = "fp32"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on two cores: one thread per worker, and in the commands a test starts (two threads in each of
    # two workers fight over the cores and ran the suite slower than one process).
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The real CIFAR-10 folder; in CI a missing folder fails the test instead of skipping it."""
    folder = os.environ.get("FNCLASS_DATA")
    if folder and (Path(folder) / "train_images.npy").is_file():
        return Path(folder)
    missing(f"real CIFAR-10 not found: set FNCLASS_DATA to a folder with train_images.npy (got {folder!r})")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny model for the classes cat, dog, emu and 16 x 16 images (`fnclass eval`/`predict` need one)."""
    import fnclass
    from fnclass.config import load_config
    from fnclass.core.optim import sgd
    from fnclass.models import resolve_config
    from fnclass.run.checkpoint import save_checkpoint
    from fnclass.training.step import create_train_state

    config = resolve_config(load_config(None, ["model.name=tiny", "model.widths=[8, 8, 8]", "model.stem_width=8",
                                               "model.num_classes=3"]))
    state = create_train_state(fnclass.build_model(config.model), sgd(0.1), fnclass.key(0))
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_checkpoint(path, state, config=config, classes=["cat", "dog", "emu"], mean=(0.5,) * 3, std=(0.25,) * 3,
                    input_size=(16, 16))
    return path
