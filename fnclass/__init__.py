"""fnclass: CIFAR-10 classification the JAX way on PyTorch.

Models are ``Model(init, apply, param_labels, data_init)`` tuples of pure functions over parameter pytrees,
optimizers are Optax-style ``Transform(init, update)`` pairs, and a training step is ``torch.func.grad_and_value``
plus a functional update over one ``TrainState`` pytree. ``fnclass.train(config, workdir)`` runs the whole program.

The names below are imported on first use, so ``import fnclass`` (and ``fnclass --help``) does not load torch.
"""

import importlib

from fnclass._version import __version__

_PUBLIC = {
    "Checkpoint": "fnclass.run.checkpoint", "load_checkpoint": "fnclass.run.checkpoint",
    "load_config": "fnclass.config", "Exported": "fnclass.run.export", "load_exported": "fnclass.run.export",
    "Model": "fnclass.models", "build_model": "fnclass.models", "pretrained": "fnclass.run.zoo",
    "fold_in": "fnclass.core.random", "key": "fnclass.core.random", "split": "fnclass.core.random",
    "TrainState": "fnclass.training.step", "create_train_state": "fnclass.training.step",
    "make_eval_step": "fnclass.training.step", "make_train_step": "fnclass.training.step",
    "TrainResult": "fnclass.training.program", "train": "fnclass.training.program",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fnclass' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])


__all__ = ["__version__", *_PUBLIC]
