"""The stateful twin of benchmarks/stateful_twin.py against fnclass's functional program: the benchmark compares two
programs only while these agree, step for step and batch for batch."""

import numpy as np
import pytest
import torch

import fnclass
from benchmarks import stateful_twin
from fnclass import data
from fnclass.config import load_config
from fnclass.core import random, tree
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


def _documented_batch(run_key, pixels, labels, config, step: int, epoch: int, epoch_step: int):
    """Step ``step``'s batch built by hand from the key derivation fnclass.data.sources documents, without any of
    fnclass's data code: the run key splits into an order root and a step root; epoch ``e``'s permutation is drawn
    from ``fold_in(order_root, e)`` and the alternating flips from ``fold_in(order_root, -1)``; the step's
    augmentation and model keys are ``split(fold_in(step_root, step))``, and the augmentation key splits into crop,
    flip and cutout keys. Each image is normalised, reflect-padded (NumPy's ``np.pad``) and cut at its shifts, and
    mirrored when its alternating flip says so, one at a time."""
    n, batch_size, padding = len(pixels), config.train.batch_size, config.data.crop_padding
    order_root, step_root = random.split(run_key)
    idx = random.permutation(random.fold_in(order_root, epoch), n)[epoch_step * batch_size:][:batch_size]
    first_flips = random.bernoulli(random.fold_in(order_root, -1), 0.5, (n,))
    aug_key, model_key = random.split(random.fold_in(step_root, step))
    crop_key, _, _ = random.split(aug_key, 3)
    shifts = random.randint(crop_key, (2, batch_size), 0, 2 * padding + 1).numpy()
    images = []
    for j, row in enumerate(idx.tolist()):
        image = (pixels[row].numpy().astype(np.float32) * np.float32(1 / 255) - np.float32(0.5)) / np.float32(0.25)
        padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode="reflect")
        top, left = shifts[:, j]
        image = padded[top:top + 32, left:left + 32]
        if bool(first_flips[row]) != bool(epoch % 2):  # mirrored in even epochs when first_flips says so
            image = image[:, ::-1]
        images.append(torch.from_numpy(image.transpose(2, 0, 1).copy()))
    return torch.stack(images), labels[idx], model_key


def test_twin_and_epoch_loop_batches_follow_the_documented_key_derivation(tmp_path):
    """The stateful twin's batches and the ones EpochLoop hands fnclass's step both equal batches built by hand
    from the documented keys (not from one another: the twin uses fnclass's data code, so comparing the two would
    pass on a bug they share)."""
    config = resolve_config(load_config("fast", [*SMALL, "model.name=tiny", "train.log_every_steps=0"]))
    assert (config.data.crop_padding, config.data.pad_mode, config.data.alternate_flips) == (2, "reflect", True)
    assert (config.data.cutout, config.data.mixing) == (0, False)  # what _documented_batch builds
    pixels, labels = _images(7, 64)  # alternating flips, crops and the permutation all act on these
    mean_t, std_t = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    ds = RunData(pixels, labels, pixels, labels, (0.5,) * 3, (0.25,) * 3, mean_t, std_t, tuple("abcdefghij"), tmp_path)
    key, steps_per_epoch = fnclass.key(3), 4
    batch_size = config.train.batch_size
    twin_source = stateful_twin.batch_source(config, ds, key)
    for epoch in (0, 1):  # both halves of the alternating flips
        recorder = _Recorder()
        loop = EpochLoop(PermutedSource(ds, config.data, key, batch_size), recorder, steps_per_epoch, batch_size,
                         members=None, finite=FiniteCheck(config, steps_per_epoch, tmp_path / "last.safetensors", []))
        start = TrainState(torch.tensor(epoch * steps_per_epoch), None, None, None, key)
        loop(start, epoch, torch.device("cpu"))
        assert len(recorder.calls) == steps_per_epoch
        for epoch_step, ((images, batch_labels), model_key) in enumerate(recorder.calls):
            step = epoch * steps_per_epoch + epoch_step
            want_images, want_labels, want_key = _documented_batch(key, pixels, labels, config, step, epoch,
                                                                   epoch_step)
            twin_images, twin_labels, twin_key = twin_source(step, epoch, epoch_step)[:3]
            for got_images, got_labels, got_key in ((images, batch_labels, model_key),
                                                    (twin_images, twin_labels, twin_key)):
                # The normalisation may round in another order (1 ulp); a wrong crop, flip or row is O(1) off.
                torch.testing.assert_close(got_images, want_images, rtol=0, atol=4 * torch.finfo(torch.float32).eps)
                assert torch.equal(got_labels, want_labels) and torch.equal(got_key, want_key)
