"""fnclass: CIFAR-10 classification the JAX way on PyTorch.

Models are ``Model(init, apply)`` pairs of pure functions over parameter pytrees, optimizers are
Optax-style ``Transform(init, update)`` pairs, and a training step is ``torch.func.grad_and_value``
plus a functional update over one ``TrainState`` pytree.
"""

from fnclass.models import Model, build_model
from fnclass.random import fold_in, key, split
from fnclass.train import TrainState, create_train_state, make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = ["Model", "TrainState", "build_model", "create_train_state", "fold_in", "key", "make_eval_step",
           "make_train_step", "split", "__version__"]
