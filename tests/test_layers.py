"""Every layer against its torch.nn counterpart holding the same weights."""

import numpy as np
import pytest
import torch
from torch import nn

from fnclass.core import layers, random
from tests.torch_reference import SpatialAttention


def test_conv_matches_conv2d():
    params = layers.conv_init(random.key(0), 3, 8, 3, bias=True)
    ref = nn.Conv2d(3, 8, 3, padding=1)
    ref.load_state_dict(params)
    x = torch.randn(4, 3, 10, 10)
    torch.testing.assert_close(layers.conv(params, x), ref(x))
    expected = nn.functional.conv2d(x, ref.weight, ref.bias, 2)
    torch.testing.assert_close(layers.conv(params, x, stride=2, padding=0), expected)


def test_init_matches_torch_default_bounds():
    params = layers.conv_init(random.key(0), 16, 32, 3, bias=True)
    bound = 1 / (16 * 9) ** 0.5
    assert params["weight"].abs().max() <= bound and params["weight"].abs().max() > 0.95 * bound
    assert abs(params["weight"].std().item() - bound / 3**0.5) < 0.05 * bound


def test_linear_matches_linear():
    params = layers.linear_init(random.key(1), 5, 7)
    ref = nn.Linear(5, 7)
    ref.load_state_dict(params)
    x = torch.randn(3, 5)
    torch.testing.assert_close(layers.linear(params, x), ref(x))


def _bn_pair(channels=6):
    params, state = layers.batch_norm_init(channels)
    params = {"scale": torch.rand(channels) + 0.5, "bias": torch.randn(channels)}
    state = {"mean": torch.randn(channels), "var": torch.rand(channels) + 0.5}
    ref = nn.BatchNorm2d(channels, momentum=0.1)
    ref.load_state_dict({"weight": params["scale"], "bias": params["bias"], "running_mean": state["mean"],
                         "running_var": state["var"], "num_batches_tracked": torch.tensor(0)})
    return params, state, ref


def test_batch_norm_train_matches_and_does_not_mutate():
    params, state, ref = _bn_pair()
    before = {k: v.clone() for k, v in state.items()}
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    y, new_state = layers.batch_norm(params, state, x, train=True, momentum=0.1)
    torch.testing.assert_close(y, ref.train()(x))
    torch.testing.assert_close(new_state["mean"], ref.running_mean)
    torch.testing.assert_close(new_state["var"], ref.running_var)
    for k in state:
        assert torch.equal(state[k], before[k]), "input state was mutated"


def test_batch_norm_eval_uses_running_statistics():
    params, state, ref = _bn_pair()
    x = torch.randn(8, 6, 5, 5)
    y, new_state = layers.batch_norm(params, state, x, train=False)
    torch.testing.assert_close(y, ref.eval()(x))
    assert new_state is state


def test_batch_norm_train_under_grad():
    params, state, ref = _bn_pair()
    x = torch.randn(8, 6, 5, 5)

    def loss(p):
        y, s = layers.batch_norm(p, state, x, train=True)
        return (y ** 3).sum(), s
    grads, new_state = torch.func.grad(loss, has_aux=True)(params)
    (ref.train()(x) ** 3).sum().backward()
    torch.testing.assert_close(grads["scale"], ref.weight.grad)
    torch.testing.assert_close(grads["bias"], ref.bias.grad)
    torch.testing.assert_close(new_state["var"], ref.running_var)


def test_layer_norm_matches():
    params = {"scale": torch.rand(9), "bias": torch.randn(9)}
    ref = nn.LayerNorm(9)
    ref.load_state_dict({"weight": params["scale"], "bias": params["bias"]})
    x = torch.randn(4, 3, 9)
    torch.testing.assert_close(layers.layer_norm(params, x), ref(x))


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_attention_matches_multihead_attention(impl):
    dim, heads = 16, 4
    params = layers.attention_init(random.key(2), dim)
    params["qkv"]["bias"] = torch.randn(3 * dim)
    params["proj"]["bias"] = torch.randn(dim)
    ref = nn.MultiheadAttention(dim, heads, batch_first=True)
    ref.load_state_dict({"in_proj_weight": params["qkv"]["weight"], "in_proj_bias": params["qkv"]["bias"],
                         "out_proj.weight": params["proj"]["weight"], "out_proj.bias": params["proj"]["bias"]})
    x = torch.randn(3, 10, dim)
    torch.testing.assert_close(layers.attention(params, x, heads=heads, impl=impl),
                               ref(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_spatial_attention_matches_its_torch_nn_twin(impl):
    channels, heads, height, width = 16, 4, 4, 5  # not square, so a swapped height and width would show
    gen = torch.Generator().manual_seed(0)
    params = layers.spatial_attention_init(random.key(3), channels)
    # Init makes the norm's scale 1 and every bias 0: random values make a skipped one show.
    params["norm"] = {"scale": torch.rand(channels, generator=gen) + 0.5, "bias": torch.randn(channels, generator=gen)}
    params["qkv"]["bias"] = torch.randn(3 * channels, generator=gen)
    params["proj"]["bias"] = torch.randn(channels, generator=gen)
    twin = SpatialAttention(channels, heads)  # nn.LayerNorm and nn.MultiheadAttention, nothing from fnclass.core.layers
    twin.load_state_dict({"norm.weight": params["norm"]["scale"], "norm.bias": params["norm"]["bias"],
                          "mha.in_proj_weight": params["qkv"]["weight"], "mha.in_proj_bias": params["qkv"]["bias"],
                          "mha.out_proj.weight": params["proj"]["weight"], "mha.out_proj.bias": params["proj"]["bias"]})
    x = torch.randn(2, channels, height, width, generator=gen)
    expected = twin(x)
    # float32 rounding over reductions no longer than channels x positions, relative to the output's scale.
    atol = torch.finfo(torch.float32).eps * channels * height * width * expected.abs().max().item()
    torch.testing.assert_close(layers.spatial_attention(params, x, heads=heads, impl=impl), expected, rtol=0,
                               atol=atol)


def test_dropout_is_keyed_and_scaled():
    x = torch.ones(100_000)
    a = layers.dropout(random.key(0), x, 0.25, train=True)
    assert torch.equal(a, layers.dropout(random.key(0), x, 0.25, train=True))
    assert not torch.equal(a, layers.dropout(random.key(1), x, 0.25, train=True))
    assert abs((a == 0).float().mean().item() - 0.25) < 0.01
    assert torch.allclose(a[a != 0], torch.tensor(1 / 0.75))
    assert layers.dropout(random.key(0), x, 0.25, train=False) is x


def test_pooling():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(layers.max_pool(x), nn.MaxPool2d(2)(x))
    torch.testing.assert_close(layers.global_avg_pool(x), nn.AdaptiveAvgPool2d(1)(x).flatten(1))
    torch.testing.assert_close(layers.global_max_pool(x), nn.AdaptiveMaxPool2d(1)(x).flatten(1))


@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (3, 5, 3, 3), (4, 4, 1, 1)])
def test_dirac_matches_torch_init_on_the_first_filters(shape):
    weight = torch.randn(*shape)
    expected = weight.clone()
    nn.init.dirac_(expected[:min(shape[:2])])
    assert torch.equal(layers.dirac(weight), expected)
    x = torch.randn(2, shape[1], 5, 5)  # the identity filters pass their channels through
    n = min(shape[:2])
    torch.testing.assert_close(layers.conv({"weight": layers.dirac(weight)}, x)[:, :n], x[:, :n])


def test_whitening_filters_whiten_the_patches():
    x = torch.randn(400, 3, 8, 8) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    x[:, 1] += 0.8 * x[:, 0]  # correlated channels
    x[:, :, :, 1:] += 0.5 * x[:, :, :, :-1].clone()  # correlated neighbours
    filters = layers.whitening_filters(x, 2, eps=0.0)
    assert filters.shape == (24, 3, 2, 2)
    torch.testing.assert_close(filters[12:], -filters[:12])
    out = nn.functional.conv2d(x.double(), filters[:12].double()).permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(out.T @ out / len(out), torch.eye(12, dtype=torch.float64), atol=1e-5, rtol=0)
    # Against numpy's eigendecomposition of the same patch covariance: the same spectrum, largest first.
    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double().numpy()
    eigenvalues = np.linalg.eigvalsh(patches.T @ patches / len(patches))[::-1]
    norms = np.linalg.norm(filters[:12].reshape(12, -1).double().numpy(), axis=1)
    np.testing.assert_allclose(norms, 1 / np.sqrt(eigenvalues), rtol=1e-4)


def test_group_norm_and_weight_standardization_match_torch():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(4, 12, 5, 5, generator=gen), torch.randn(6, 12, 3, 3, generator=gen)
    params = {"scale": torch.randn(12, generator=gen), "bias": torch.randn(12, generator=gen)}
    reference = torch.nn.GroupNorm(3, 12)
    with torch.no_grad():
        reference.weight.copy_(params["scale"]), reference.bias.copy_(params["bias"])
    torch.testing.assert_close(layers.group_norm(params, x, groups=3), reference(x))
    # Weight standardisation by hand, in float64: each filter's mean 0 and (biased) variance 1 up to eps.
    w = weight.double()
    flat = w.flatten(1)
    by_hand = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(layers.standardize_weight(weight).double(), by_hand.view_as(w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers.conv({"weight": weight}, x, standardize=True),
                               torch.nn.functional.conv2d(x, by_hand.view_as(w).float(), padding=1),
                               rtol=1e-5, atol=1e-5)
