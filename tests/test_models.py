"""Models against their stateful torch.nn twins (tests/torch_reference.py) with the same weights."""

import dataclasses
import subprocess
import sys

import pytest
import torch

import fnclass
from fnclass.config import ConfigError, ModelConfig
from fnclass.core import losses, tree
from fnclass.models import resolve
from fnclass.models.fast import fit_whitening
from tests.torch_reference import module_grads, reference_module, torch_name

SMALL_RESNET = ModelConfig(name="resnet_attn", widths=(16, 32, 32), depths=(1, 2, 1), attn_after=(1, 2),
                           attn_layers=1, attn_heads=4)
CONFIGS = {"resnet_attn": SMALL_RESNET, "tiny": ModelConfig(name="tiny"),
           "fast": ModelConfig(name="fast", widths=(16, 32, 32), stem_width=8),
           "fast_whiten": ModelConfig(name="fast", widths=(16, 32, 32), whiten=True, dirac_init=True),
           # GroupNorm (torch.nn.GroupNorm in the twin), with weight-standardised convolutions for the ResNet
           "resnet_attn_group_ws": dataclasses.replace(SMALL_RESNET, norm="group", norm_groups=4,
                                                       weight_standardization=True),
           "tiny_group": ModelConfig(name="tiny", norm="group")}


def _checksum(name: str) -> str:
    params, state = fnclass.build_model(ModelConfig(name=name)).init(fnclass.key(123))
    return ",".join(f"{leaf.double().sum().item():.17g}" for leaf in tree.tree_leaves((params, state)))


@pytest.mark.parametrize("name", ["tiny", "fast"])
def test_init_is_bit_identical_across_processes(name):
    code = f"from tests.test_models import _checksum; print(_checksum({name!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == _checksum(name)


def test_init_depends_on_key():
    model = fnclass.build_model(ModelConfig(name="tiny"))
    a, _ = model.init(fnclass.key(0))
    b, _ = model.init(fnclass.key(1))
    assert not torch.equal(a["head"]["weight"], b["head"]["weight"])


@pytest.mark.parametrize("name", ["resnet_attn", "fast", "tiny"])
def test_default_shapes_dtypes_and_paths(name):
    model = fnclass.build_model(ModelConfig(name=name))
    params, state = model.init(fnclass.key(0))
    assert all(leaf.dtype == torch.float32 for leaf in tree.tree_leaves((params, state)))
    logits, new_state = model.apply(params, state, torch.randn(2, 3, 32, 32), train=True)
    assert logits.shape == (2, 10) and logits.dtype == torch.float32
    assert tree.tree_structure(new_state) == tree.tree_structure(state)
    paths = tree.flatten_paths(params)
    assert "stem.conv.weight" in paths and "attn.0.qkv.weight" in paths
    expected = {"resnet_attn": (10e6, 16e6), "fast": (2.0e6, 2.5e6), "tiny": (0.2e6, 0.5e6)}[name]
    assert expected[0] < tree.num_params(params) < expected[1]


def test_resnet_paths_follow_stages_and_blocks():
    params, state = fnclass.build_model(ModelConfig(name="resnet_attn")).init(fnclass.key(0))
    assert "stages.1.blocks.0.bn1.scale" in tree.flatten_paths(params)
    assert "stages.1.blocks.0.shortcut.conv.weight" in tree.flatten_paths(params)
    assert "stages.1.blocks.0.bn1.mean" in tree.flatten_paths(state)


def _relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_gradients_and_state_match_torch_nn(name):
    cfg = CONFIGS[name]
    model = fnclass.build_model(cfg)
    params, state = model.init(fnclass.key(7))
    if cfg.whiten:
        state = fit_whitening(state, torch.randn(64, 3, 32, 32), resolve(cfg))
    reference = reference_module(cfg, params, state).train()
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    if cfg.weight_standardization:  # float32 rounding alone moved a gradient by 5e-4 here (rsqrt against 1/sqrt)
        params, state = tree.tree_map(lambda t: t.double(), (params, state))
        reference, images = reference.double(), images.double()

    def loss_fn(p):
        logits, new_state = model.apply(p, state, images, train=True)
        return losses.cross_entropy(logits, labels), new_state

    grads, (loss, new_state) = torch.func.grad_and_value(loss_fn, has_aux=True)(params)
    ref_loss = torch.nn.functional.cross_entropy(reference(images), labels)
    ref_loss.backward()
    assert _relative_error(loss, ref_loss) < 1e-5
    ref_grads = module_grads(reference)
    flat = tree.flatten_paths(grads)
    assert {torch_name(k) for k in flat} == set(ref_grads)
    for path, grad in flat.items():
        assert _relative_error(grad, ref_grads[torch_name(path)]) < 1e-5, path
    ref_state = reference.state_dict()
    for path, value in tree.flatten_paths(new_state).items():
        torch.testing.assert_close(value, ref_state[torch_name(path)], rtol=1e-5, atol=1e-6)
    # Eval mode uses the running statistics, as nn.Module.eval() does.
    logits, _ = model.apply(params, new_state, images, train=False)
    torch.testing.assert_close(logits, reference.eval()(images), rtol=1e-5, atol=1e-5)


def _block_conv_weights(**config):
    params, _ = fnclass.build_model(ModelConfig(name="tiny", widths=(8, 16, 16), stem_width=8, **config)).init(
        fnclass.key(0))
    return {p: w for p, w in tree.flatten_paths(params).items() if p.startswith("blocks.") and p.endswith("weight")}


@pytest.mark.parametrize("whiten", [False, True])
def test_dirac_init_starts_every_block_convolution_as_an_identity(whiten):
    dirac, default = _block_conv_weights(whiten=whiten, dirac_init=True), _block_conv_weights(whiten=whiten)
    assert len(dirac) == 6  # two 3x3 convolutions in each of the three blocks
    for path, weight in dirac.items():
        identity = torch.nn.init.dirac_(torch.empty(min(weight.shape[:2]), *weight.shape[1:]))
        n = len(identity)
        # Exact by construction: the identity filters are assigned zeros and ones, and the other filters are the
        # default init's draws from the same key.
        assert torch.equal(weight[:n], identity), path
        assert torch.equal(weight[n:], default[path][n:]), path
        assert not torch.equal(default[path][:n], identity), path
    assert any(len(w) > min(w.shape[:2]) for w in dirac.values())  # some convolution keeps random filters too


def test_dropout_needs_and_uses_the_key():
    cfg = ModelConfig(name="tiny", dropout=0.5)
    model = fnclass.build_model(cfg)
    params, state = model.init(fnclass.key(0))
    x = torch.randn(4, 3, 32, 32)
    a, _ = model.apply(params, state, x, train=True, key=fnclass.key(1))
    b, _ = model.apply(params, state, x, train=True, key=fnclass.key(1))
    c, _ = model.apply(params, state, x, train=True, key=fnclass.key(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("change, key", [
    (dict(name="vgg"), "model.name"),
    (dict(widths=(16, 32), depths=(1,)), "model.depths"),
    (dict(attn_after=(5,)), "model.attn_after"),
    (dict(attn_heads=3), "model.attn_heads"),
    (dict(dropout=1.0), "model.dropout"),
])
def test_model_config_validation_names_the_key(change, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config = ModelConfig(**{"name": "resnet_attn", **change})
        config.validate()
        resolve(config)


def test_the_whitening_data_init_normalises_and_uses_only_the_first_5000_images():
    model = fnclass.build_model(ModelConfig(name="tiny", widths=(8, 16, 16), whiten=True))
    _, state = model.init(fnclass.key(0))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5200, 32, 32, 3), dtype=torch.uint8, generator=gen)
    seen = []

    def normalize(x):
        seen.append(len(x))
        return x.permute(0, 3, 1, 2).float() / 255.0
    ours = model.data_init(state, images, normalize)
    expected = fit_whitening(state, normalize(images[:5000]), resolve(ModelConfig(name="tiny", whiten=True)))
    assert seen == [5000, 5000]  # only the examples it uses are normalised
    assert torch.equal(ours["whiten"]["weight"], expected["whiten"]["weight"])
    assert fnclass.build_model(ModelConfig(name="tiny", widths=(8, 16, 16))).data_init is None


def test_group_norm_models_treat_each_example_alone():
    # GroupNorm keeps no statistics across examples: an example's training-mode logits are those it has alone.
    model = fnclass.build_model(CONFIGS["tiny_group"])
    params, state = model.init(fnclass.key(3))
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    together, new_state = model.apply(params, state, images, train=True)
    alone = torch.cat([model.apply(params, state, images[i:i + 1], train=True)[0] for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert tree.flatten_paths(new_state) == {} and "blocks.0.conv1.bn.scale" in tree.flatten_paths(params)
    bn_params, _ = fnclass.build_model(CONFIGS["tiny"]).init(fnclass.key(3))
    assert tree.flatten_paths(bn_params).keys() == tree.flatten_paths(params).keys()  # the same paths as BatchNorm's


def test_norm_groups_must_divide_the_channels():
    with pytest.raises(ConfigError, match="model.norm_groups = 12 is not allowed: expected a divisor"):
        resolve(ModelConfig(name="tiny", norm="group", norm_groups=12))
    with pytest.raises(ConfigError, match='model.norm = .layer. is not allowed'):
        ModelConfig(norm="layer").validate()
