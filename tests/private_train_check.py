"""Run by tests/test_composition.py, under torchrun and in one process: a short private run of dp.toml on real
images with a fixed secret key (so that both runs draw the same Poisson samples and the same noise).

    python -m tests.private_train_check DATA_DIR OUT [--set KEY=VALUE ...]
"""

import sys

import torch

from fnclass import privacy
from fnclass.config import load_config
from fnclass.training.program import train

SECRET = (4321, 8765)


def main(data_dir: str, out: str, *sets: str) -> None:
    privacy.new_secret = lambda: torch.tensor(SECRET, dtype=torch.int64)
    train(load_config("dp", list(sets)), out, data_dir=data_dir, device="cpu")


if __name__ == "__main__":
    main(*sys.argv[1:])
