"""fnclass: CIFAR-10 classification the JAX way on PyTorch.

Models are ``Model(init, apply)`` pairs of pure functions over parameter pytrees, optimizers are
Optax-style ``Transform(init, update)`` pairs, and a training step is ``torch.func.grad_and_value``
plus a functional update over one ``TrainState`` pytree.
"""

__version__ = "0.1.0"  # before the imports below: fnclass.train records it

from fnclass.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from fnclass.export import Exported, load_exported  # noqa: E402
from fnclass.models import Model, build_model  # noqa: E402
from fnclass.random import fold_in, key, split  # noqa: E402
from fnclass.train import (  # noqa: E402
    TrainState,
    create_train_state,
    make_eval_step,
    make_train_step,
    train_and_evaluate,
)

__all__ = [
    "Checkpoint", "Exported", "Model", "TrainState", "__version__", "build_model", "create_train_state", "fold_in",
    "key", "load_checkpoint", "load_exported", "make_eval_step", "make_train_step", "split", "train_and_evaluate",
]
