"""The stateful twin of benchmarks/stateful_twin.py against fnclass's functional program: the benchmark compares two
programs only while these agree, step for step and batch for batch."""

import pytest
import torch

import fnclass
from benchmarks import stateful_twin
from fnclass import data
from fnclass.config import load_config
from fnclass.core import tree
from fnclass.data.batches import RunData
from fnclass.data.sources import PermutedSource
from fnclass.models import resolve_config
from fnclass.training import recipe
from fnclass.training.hooks import FiniteCheck
from fnclass.training.loop import EpochLoop
from fnclass.training.step import TrainState, create_train_state, make_train_step
from tests.torch_reference import load_flat, torch_name

STEPS = 3  # one step an epoch: the schedule moves at every step, and a 2-epoch whitening bias freezes at the third
SMALL = ["model.widths=[8, 16, 16]", "model.stem_width=8", "train.batch_size=16", "train.channels_last=false",
         "train.compile=false", "train.precision=fp32", f"train.epochs={STEPS}"]
RECIPES = {
    # Muon on the filters, bias and head multipliers, the whitening stem, Dirac init and the whitening-bias freeze.
    "fast": ("fast", ["model.name=tiny", "optim.whiten_bias_epochs=2"]),
    # Nesterov SGD with decoupled decay on weights, a warm-up and the head multiplier.
    "cpu": ("cpu", []),
}


def _images(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 NHWC images and labels."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 32, 32, 3), generator=generator, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=generator))


def _start(name: str, overrides: list[str]):
    """A small version of a shipped recipe: config, model, optimizer and the TrainState fnclass.train starts from."""
    config = resolve_config(load_config(name, [*SMALL, *overrides]))
    model = recipe.create_model(config)
    optimizer = recipe.create_optimizer(config.optim, model.param_labels, 1, STEPS)
    train_state = create_train_state(model, optimizer, fnclass.key(0))
    if model.data_init is not None:  # whitening filters fitted to random pixels
        pixels, _ = _images(99, 64)
        state = model.data_init(train_state.state, pixels, lambda x: data.normalize(x, (0.5,) * 3, (0.25,) * 3))
        train_state = train_state._replace(state=state)
    return config, model, optimizer, train_state


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_stateful_steps_match_the_functional_steps(recipe_name):
    config, model, optimizer, train_state = _start(*RECIPES[recipe_name])
    train_step = make_train_step(model, recipe.create_loss(config), optimizer)
    twin = stateful_twin.build_twin(config, train_state.params, train_state.state, 1, torch.device("cpu"))
    eps = torch.finfo(torch.float32).eps
    for step in range(STEPS):
        pixels, labels = _images(step, 16)
        images = data.normalize(pixels, (0.5,) * 3, (0.25,) * 3)
        # Both programs step from the same point (the twin keeps its own momentum): a difference of one ulp in the
        # parameters could otherwise flip a max-pool and grow by orders of magnitude within a few steps.
        load_flat(twin.module, {**tree.flatten_paths(train_state.params), **tree.flatten_paths(train_state.state)})
        before = tree.flatten_paths(train_state.params)
        train_state, _ = train_step(train_state, (images, labels), fnclass.fold_in(train_state.key, step))
        stateful_twin.twin_step(twin, config.train, images, labels, step)
        reference = twin.module.state_dict()
        for path, value in tree.flatten_paths(train_state.params).items():
            moved, twin_moved = value - before[path], reference[torch_name(path)] - before[path]
            # The gradients agree to float32 rounding over the longest reduction (a stem filter's: batch x 32 x 32
            # terms), relative to the step; adding the step to the parameter rounds a few times on each side, in
            # another order. A missed lr multiplier, decay, freeze, momentum or schedule step is a whole part of it.
            # Measured: at most 3% of the bound; each of twelve such mistakes planted in the twin failed it.
            bound = eps * (4 * value.abs().max() + len(images) * 32 * 32 * moved.abs().max())
            assert (twin_moved - moved).abs().max() <= bound, f"step {step}, {path}"
        for path, value in tree.flatten_paths(train_state.state).items():  # BatchNorm statistics of the same batch
            bound = eps * len(images) * 32 * 32 * value.abs().max()
            assert (reference[torch_name(path)] - value).abs().max() <= bound, f"step {step}, {path}"


class _Recorder:
    """A train step that records the batches and keys it is given and only counts the step."""

    def __init__(self):
        self.calls = []

    def __call__(self, train_state, batch, key):
        self.calls.append((batch, key))
        metrics = {"loss": torch.tensor(0.0), "correct": torch.tensor(0), "finite": torch.tensor(True)}
        return train_state._replace(step=train_state.step + 1), metrics


def test_twin_batches_are_the_epoch_loops(tmp_path):
    config = resolve_config(load_config("fast", [*SMALL, "model.name=tiny", "train.log_every_steps=0"]))
    pixels, labels = _images(7, 64)  # alternating flips, crops and the permutation all act on these
    mean_t, std_t = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    ds = RunData(pixels, labels, pixels, labels, (0.5,) * 3, (0.25,) * 3, mean_t, std_t, tuple("abcdefghij"), tmp_path)
    key, steps_per_epoch, epoch = fnclass.key(3), 4, 1
    recorder = _Recorder()
    batch_size = config.train.batch_size
    loop = EpochLoop(PermutedSource(ds, config.data, key, batch_size), recorder, steps_per_epoch, batch_size,
                     members=None, finite=FiniteCheck(config, steps_per_epoch, tmp_path / "last.safetensors", []))
    start = TrainState(torch.tensor(epoch * steps_per_epoch), None, None, None, key)
    loop(start, epoch, torch.device("cpu"))
    twin_source = stateful_twin.batch_source(config, ds, key)
    assert len(recorder.calls) == steps_per_epoch
    for epoch_step, ((images, labels), model_key) in enumerate(recorder.calls):
        step = epoch * steps_per_epoch + epoch_step
        twin_batch = twin_source(step, epoch, epoch_step)[:3]
        for ours, theirs in zip(twin_batch, (images, labels, model_key), strict=True):
            assert torch.equal(ours, theirs)  # the same code on the same keys: exact
