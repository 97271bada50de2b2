"""Shared fixtures: real CIFAR-10 from $FNCLASS_DATA (required under CI=true, skipped elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.needs import missing


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The real CIFAR-10 folder; in CI a missing folder fails the test instead of skipping it."""
    folder = os.environ.get("FNCLASS_DATA")
    if folder and (Path(folder) / "train_images.npy").is_file():
        return Path(folder)
    missing(f"real CIFAR-10 not found: set FNCLASS_DATA to a folder with train_images.npy (got {folder!r})")
