"""EK-FAC influence (fnclass.analysis.ekfac) against dense float64 references built from torch.func's per-example
gradients: the tap's per-example layer gradients, the eigenvalue correction, the Kronecker algebra, the damping, the
sign and the scale; exactness where EK-FAC is exact; and the refusals."""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F

from fnclass.analysis import ekfac
from fnclass.analysis.gradients import per_example_grads
from fnclass.config import ModelConfig
from fnclass.core import random, tree
from fnclass.core.losses import margin, per_example_cross_entropy
from fnclass.errors import InputError
from fnclass.models import build_model
from fnclass.models.model import Model


def _tiny(widths=(4, 6, 8), n=24, size=32, **overrides):
    """A float64 tiny model (whitening stem, attention) with perturbed weights, and ``n`` random images."""
    config = ModelConfig(name="tiny", widths=widths, whiten=True, attn_impl="math", num_classes=10, **overrides)
    model = build_model(config)
    params, state = optree.tree_map(lambda x: x.double(), model.init(random.key(0)))
    generator = torch.Generator().manual_seed(0)
    params = optree.tree_map(lambda x: x + 0.2 * torch.randn(x.shape, generator=generator, dtype=x.dtype), params)
    state["whiten"]["weight"] = torch.randn(state["whiten"]["weight"].shape, generator=generator, dtype=torch.float64)
    images = torch.randn(n, 3, size, size, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return model, params, state, images, labels


def _layer_matrices(grads: dict, layers) -> list[torch.Tensor]:
    """Per covered layer, each example's gradient as (n, p, d): the weight flattened as F.unfold orders a patch
    (channel, then kernel row and column), the bias as the last column."""
    out = []
    for layer in layers:
        weight = grads[layer.weight].flatten(2)
        parts = [weight] + ([grads[layer.bias][:, :, None]] if layer.bias else [])
        out.append(torch.cat(parts, 2))
    return out


def _dense(model, params, state, images, labels, loss_fn, layers):
    """Per-example gradients by torch.func (vmap of grad), flattened over the covered layers: (n, D)."""
    flat = tree.flatten_paths(per_example_grads(model, params, state, images, labels, loss_fn=loss_fn))
    return torch.cat([g.flatten(1) for g in _layer_matrices(flat, layers)], 1)


def _drawn_labels(model, params, state, images, key):
    logits, _ = model.apply(params, state, images, train=False)
    return ekfac.sample_labels(key, logits)


def test_eigenvalues_and_scores_equal_a_dense_computation_from_torch_func_gradients():
    model, params, state, images, labels = _tiny()
    key = random.key(3)
    factors = ekfac.fit(model, params, state, images, key=key, damping=0.1)  # one chunk: one draw of labels
    drawn = _drawn_labels(model, params, state, images, key)
    fisher_grads = _layer_matrices(tree.flatten_paths(per_example_grads(
        model, params, state, images, drawn, loss_fn=per_example_cross_entropy)), factors.layers)
    # The eigenvalue correction is the Fisher's diagonal in each layer's Kronecker eigenbasis.
    blocks = []
    for i, grads in enumerate(fisher_grads):
        q_a, q_s = factors.q_a[i], factors.q_s[i]
        expected = torch.einsum("pq,nqd,de->npe", q_s.T, grads, q_a).pow(2).mean(0)
        torch.testing.assert_close(factors.eigenvalues[i], expected, rtol=1e-10, atol=1e-14)
        assert factors.damping[i] == pytest.approx(0.1 * float(expected.mean()), rel=1e-10)
        # The layer's block of the approximation, written out: (Q_S kron Q_A) diag(Lambda) (Q_S kron Q_A)^T for
        # the row-major vec of a (p, d) gradient.
        basis = torch.kron(q_s, q_a)
        blocks.append(basis @ torch.diag(expected.flatten() + factors.damping[i]) @ basis.T)
    curvature = torch.block_diag(*blocks)
    test_images, test_labels = images[:3], labels[:3]
    margins = _dense(model, params, state, test_images, test_labels, margin, factors.layers)
    losses = _dense(model, params, state, images, labels, per_example_cross_entropy, factors.layers)
    expected = -(margins @ torch.linalg.solve(curvature, losses.T)) / len(images)
    got = ekfac.scores(factors, model, params, state, images, labels, test_images, test_labels, chunk_size=5)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    own = ekfac.self_influence(factors, model, params, state, images, labels, chunk_size=7)
    expected_self = (losses * torch.linalg.solve(curvature, losses.T).T).sum(1) / len(images)
    torch.testing.assert_close(own.double(), expected_self, rtol=1e-5, atol=0)


def test_left_out_parameters_are_the_norms_and_the_frozen_stem_bias():
    model, params, state, images, labels = _tiny()
    factors = ekfac.fit(model, params, state, images[:4], key=random.key(0))
    covered = {name for layer in factors.layers for name in (layer.weight, layer.bias) if name}
    assert "whiten.bias" in factors.left_out and "attn.0.qkv.bias" in covered and "head.weight" in covered
    assert all(name.endswith((".scale", ".bias")) for name in factors.left_out)
    assert covered | set(factors.left_out) == set(tree.flatten_paths(params))


def _linear_model(classes: int, features: int) -> Model:
    def apply(params, state, images, *, train, key=None):
        return F.linear(images.flatten(1), params["w"], params["b"]), state
    return Model(None, apply, None, None)


def test_exact_where_the_fisher_is_kronecker_diagonal_one_example_of_a_linear_layer():
    """One example through one linear layer: the Fisher is vec(G) vec(G)^T with G = g a^T, which is diagonal in
    the Kronecker eigenbasis of a a^T and g g^T, so EK-FAC's inverse is the exact (F + lambda I)^-1."""
    generator = torch.Generator().manual_seed(1)
    model = _linear_model(5, 7)
    params = {"w": torch.randn(5, 7, generator=generator, dtype=torch.float64),
              "b": torch.randn(5, generator=generator, dtype=torch.float64)}
    image = torch.randn(1, 7, generator=generator, dtype=torch.float64)
    key = random.key(2)
    factors = ekfac.fit(model, params, {}, image, key=key, damping=0.05)
    drawn = _drawn_labels(model, params, {}, image, key)
    g = _dense(model, params, {}, image, drawn, per_example_cross_entropy, factors.layers)[0]
    damping = factors.damping[0]
    assert damping == pytest.approx(0.05 * float(g.pow(2).sum()) / g.numel(), rel=1e-10)
    vectors = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64)
    dense = torch.linalg.solve(torch.outer(g, g) + damping * torch.eye(len(g), dtype=torch.float64),
                               vectors.flatten(1).T).T
    torch.testing.assert_close(factors.inverse(0, vectors).flatten(1), dense, rtol=1e-9, atol=1e-12)


def test_refuses_weight_standardisation_and_bad_damping():
    model, params, state, images, _ = _tiny(weight_standardization=True)
    with pytest.raises(InputError, match="blocks.0.conv1.conv.weight.*--method tracin"):
        ekfac.fit(model, params, state, images[:2], key=random.key(0))
    model, params, state, images, _ = _tiny()
    with pytest.raises(InputError, match="--damping -1"):
        ekfac.fit(model, params, state, images[:2], key=random.key(0), damping=-1.0)
