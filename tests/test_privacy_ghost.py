"""Ghost clipping (fnclass.privacy.ghost) against the materialised per-example gradients (the vmap path) in float64,
on each built-in model with GroupNorm, with augmentation copies and padding rows; and what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fnclass import privacy
from fnclass.config import ConfigError, load_config
from fnclass.core import random, tree
from fnclass.errors import InputError
from fnclass.models import build_model, resolve_config

MODELS = {
    "dp.toml (tiny)": ("dp", []),
    "fast": (None, ["model.name=fast", "model.norm=group", "model.whiten=false", "model.widths=[16, 32, 32]",
                    "model.stem_width=16", "model.attn_impl=math"]),
    "resnet_attn": (None, ["model.name=resnet_attn", "model.norm=group", "model.attn_impl=math",
                           "model.widths=[16, 16, 32, 32]", "model.depths=[1, 1, 1, 1]"]),
}


def _loss_and_aux(model):
    def loss_and_aux(params, state, images, labels, key):
        logits, new_state = model.apply(params, state, images, train=True, key=key)
        # in the logits' own dtype (fnclass's cross_entropy works in float32: no float64 comparison through it)
        return F.cross_entropy(logits, labels), (new_state, logits.detach())
    return loss_and_aux


def _clipped_sum(model, params, state, images, labels, clipping, copies, sigma=0.0):
    gradient = privacy.clipped_noisy_gradient(0.5, sigma, 9.0, copies=copies, clipping=clipping, chunk_size=4)
    grads, (loss, (_, logits)) = gradient(_loss_and_aux(model))(params, state, images, labels, random.key(1))
    return tree.flatten_paths(grads), loss, logits


def _error(got: dict, want: dict) -> float:
    """The largest difference relative to the largest entry of the whole gradient."""
    scale = max(float(v.abs().max()) for v in want.values())
    return max(float((got[k].double() - want[k].double()).abs().max()) for k in want) / scale


@pytest.mark.parametrize("name", list(MODELS))
def test_ghost_clipping_equals_the_materialised_clipped_sum(name):
    config, sets = MODELS[name]
    model = build_model(resolve_config(load_config(config, sets)).model)
    params, state = model.init(random.key(0))
    gen = torch.Generator().manual_seed(0)
    n, copies = 10, 2
    images = torch.randn(n * copies, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    labels[-3:] = privacy.PADDING  # three padded rows: nothing of theirs reaches the sum
    images[-3 * copies:] = float("nan")
    p64 = tree.tree_map(lambda p: p.double(), params)
    want, want_loss, want_logits = _clipped_sum(model, p64, state, images.double(), labels, "vmap", copies)
    ghost64, loss64, logits64 = _clipped_sum(model, p64, state, images.double(), labels, "ghost", copies)
    assert _error(ghost64, want) < 1e-9  # the same sum: float64 rounding apart
    assert float(loss64) == pytest.approx(float(want_loss), rel=1e-12)
    real = labels >= 0  # (a padded row's logits are never scored: the vmap path computes some, ghost none)
    assert torch.allclose(logits64[real], want_logits[real], rtol=1e-10, atol=1e-12)
    # float32, channels-last as the step feeds it: within the float32 rounding of the materialised path itself
    ghost32, _, _ = _clipped_sum(model, params, state, images.contiguous(memory_format=torch.channels_last), labels,
                                 "ghost", copies)
    vmap32, _, _ = _clipped_sum(model, params, state, images.contiguous(memory_format=torch.channels_last), labels,
                                "vmap", copies)
    assert _error(ghost32, want) <= 2 * _error(vmap32, want) + 1e-5, (_error(ghost32, want), _error(vmap32, want))
    # The noise is the same draw on either path.
    noisy_ghost, _, _ = _clipped_sum(model, p64, state, images.double(), labels, "ghost", copies, sigma=2.0)
    noisy_vmap, _, _ = _clipped_sum(model, p64, state, images.double(), labels, "vmap", copies, sigma=2.0)
    assert _error(noisy_ghost, noisy_vmap) < 1e-9


def test_a_parameter_ghost_clipping_cannot_see_is_named_in_one_line():
    config = resolve_config(load_config("dp", ["model.weight_standardization=true"]))
    model = build_model(config.model)
    params, state = model.init(random.key(0))
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    with pytest.raises(InputError, match=r"privacy.clipping = \"ghost\" does not support \S+ on the parameter "
                                         r"stem\.conv\.weight") as error:
        _clipped_sum(model, params, state, images, labels, "ghost", 1)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="model.weight_standardization"):  # the config says it before any run
        load_config("dp", ["model.weight_standardization=true", "privacy.clipping=ghost"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("dp", ["train.compile=true", "privacy.clipping=ghost"])
    with pytest.raises(ConfigError, match="privacy.clipping"):
        load_config("dp", ["privacy.clipping=ghosts"])


def test_a_run_with_ghost_clipping_ends_where_the_vmap_run_does(cifar_dir, tmp_path, monkeypatch):
    """`fnclass train` with privacy.clipping = "ghost": the same samples, noise and steps as the vmap run (the same
    secret), so the same weights to float32 rounding after 2 steps (over more, float32 rounding grows chaotically:
    1e-4 after 10 steps on two threads, 7e-4 on one)."""
    import safetensors.torch

    from fnclass.training.program import train

    monkeypatch.setattr(privacy, "new_secret", lambda: random.key(5))
    sets = ["model.widths=[8, 16, 16]", "model.stem_width=8", "model.norm_groups=4", "data.train_limit=128",
            "data.test_limit=100", "train.batch_size=64", "train.epochs=1", "train.log_every_steps=0",
            "train.tta=false", "privacy.target_epsilon=4", "privacy.augmult=2"]
    weights = {}
    for clipping in ("vmap", "ghost"):
        summary = train(load_config("dp", [*sets, f"privacy.clipping={clipping}"]), tmp_path / clipping,
                        data_dir=str(cifar_dir)).summary
        assert summary["steps"] == 2
        weights[clipping] = safetensors.torch.load_file(tmp_path / clipping / "checkpoints/last.safetensors")
    params = [k for k in weights["vmap"] if k.startswith("params.")]
    error = _error({k: weights["ghost"][k] for k in params}, {k: weights["vmap"][k] for k in params})
    print(f"ghost against vmap after 2 steps: {error:.1e}")
    assert error < 1e-5, error


def test_a_constant_weight_beside_a_parameter_bias_counts_only_the_bias():
    """A convolution whose filters are a constant (as a frozen stem's) and whose bias is a parameter: only the bias's
    per-example gradient enters the norm, as in the materialised path."""
    gen = torch.Generator().manual_seed(0)
    frozen = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    params = {"bias": torch.randn(4, generator=gen, dtype=torch.float64),
              "head": torch.randn(10, 4, generator=gen, dtype=torch.float64)}

    def loss_and_aux(params, state, images, labels, key):
        x = F.conv2d(images, frozen, params["bias"], padding=1).relu().mean((2, 3))
        logits = F.linear(x, params["head"])
        return F.cross_entropy(logits, labels), (state, logits.detach())

    images, labels = torch.randn(6, 3, 8, 8, generator=gen, dtype=torch.float64), torch.arange(6)
    sums = {}
    for clipping in ("vmap", "ghost"):
        gradient = privacy.clipped_noisy_gradient(0.05, 0.0, 6.0, clipping=clipping)
        sums[clipping] = gradient(loss_and_aux)(params, {}, images, labels, random.key(0))[0]
    assert _error(sums["ghost"], sums["vmap"]) < 1e-9
