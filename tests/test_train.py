"""The functional train step against a stateful nn.Module + torch.optim step, compiled against eager,
and a real-data check that learning works."""

import functools

import pytest
import torch

import fnclass
from fnclass import data, losses, optim, random, train, tree
from fnclass.config import ModelConfig
from tests.torch_reference import reference_module, torch_name

SMALL = ModelConfig(name="tiny", widths=(8, 16, 16), stem_width=8, attn_heads=2)


def _batch(seed=0, n=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_train_step_matches_stateful_module_and_torch_sgd():
    # SGD rather than Adam here: attention's key bias has an exactly-zero true gradient, and Adam would
    # blow its rounding noise up to full-size steps. Adam itself is checked against torch in test_optim.
    model = fnclass.build_model(SMALL)
    opt = optim.sgd(0.05, momentum=0.9, nesterov=True)
    ts = fnclass.create_train_state(model, opt, fnclass.key(0))
    loss_fn = functools.partial(losses.cross_entropy, label_smoothing=0.1)
    step = fnclass.make_train_step(model, loss_fn, opt)
    module = reference_module(SMALL, ts.params, ts.state).train()
    torch_opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True)
    for i in range(3):
        images, labels = _batch(i)
        ts, metrics = step(ts, (images, labels), random.fold_in(ts.key, ts.step))
        torch_opt.zero_grad()
        ref_loss = torch.nn.functional.cross_entropy(module(images), labels, label_smoothing=0.1)
        ref_loss.backward()
        torch_opt.step()
        torch.testing.assert_close(metrics["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert int(ts.step) == 3
    reference = module.state_dict()
    for path, value in {**tree.flatten_paths(ts.params), **tree.flatten_paths(ts.state)}.items():
        torch.testing.assert_close(value, reference[torch_name(path)], rtol=1e-4, atol=1e-5)


def test_eager_gradient_equals_torch_func():
    model = fnclass.build_model(SMALL)
    params, state = model.init(fnclass.key(4))
    images, labels = _batch(1)

    def loss_and_aux(p, s, x, y, key):
        logits, new_state = model.apply(p, s, x, train=True, key=key)
        return losses.cross_entropy(logits, y), (new_state, logits.detach())
    ours = train._eager_grad_and_value(loss_and_aux)(params, state, images, labels, None)
    reference = torch.func.grad_and_value(loss_and_aux, has_aux=True)(params, state, images, labels, None)
    assert tree.tree_allclose(ours, reference, rtol=1e-6, atol=1e-7)


def test_train_step_does_not_mutate_its_input():
    model = fnclass.build_model(SMALL)
    opt = optim.sgd(0.1, momentum=0.9)
    ts = fnclass.create_train_state(model, opt, fnclass.key(1))
    snapshot = tree.tree_map(torch.clone, ts)
    new_ts, _ = fnclass.make_train_step(model, losses.cross_entropy, opt)(ts, _batch(), fnclass.key(2))
    assert tree.tree_allclose(ts, snapshot, rtol=0, atol=0)
    assert not tree.tree_allclose(new_ts.params, ts.params)


def test_eval_step_uses_running_statistics():
    model = fnclass.build_model(SMALL)
    params, state = model.init(fnclass.key(0))
    images, _ = _batch()
    expected, _ = model.apply(params, state, images, train=False)
    torch.testing.assert_close(fnclass.make_eval_step(model)(params, state, images), expected)


@pytest.mark.slow
def test_compiled_step_equals_eager_step():
    model = fnclass.build_model(SMALL)
    opt = optim.sgd(optim.warmup_cosine(0.01, 2, 10), momentum=0.9, nesterov=True)  # see the SGD note above
    eager = fnclass.make_train_step(model, losses.cross_entropy, opt)
    compiled = fnclass.make_train_step(model, losses.cross_entropy, opt, compile=True)
    ts_eager = ts_compiled = fnclass.create_train_state(model, opt, fnclass.key(3))
    for i in range(3):
        batch = _batch(i)
        ts_eager, m_eager = eager(ts_eager, batch, random.fold_in(ts_eager.key, i))
        ts_compiled, m_compiled = compiled(ts_compiled, batch, random.fold_in(ts_compiled.key, i))
        torch.testing.assert_close(m_compiled["loss"], m_eager["loss"], rtol=1e-4, atol=1e-5)
    for a, b in zip(tree.tree_leaves(ts_compiled), tree.tree_leaves(ts_eager)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_tiny_model_fits_512_real_images(cifar_dir):
    images, labels = data.load_split(cifar_dir, "train", limit=512)
    x = data.normalize(images, *data.channel_stats(images))
    model = fnclass.build_model(ModelConfig(name="tiny"))
    epochs, batch_size = 12, 128
    opt = optim.adam(optim.warmup_cosine(2e-3, 20, epochs * 512 // batch_size))
    ts = fnclass.create_train_state(model, opt, fnclass.key(0))
    step = fnclass.make_train_step(model, losses.cross_entropy, opt)
    for epoch in range(epochs):
        order = random.permutation(random.fold_in(ts.key, epoch), 512)
        for start in range(0, 512, batch_size):
            idx = order[start:start + batch_size]
            ts, _ = step(ts, (x[idx], labels[idx]), random.fold_in(ts.key, ts.step))
    logits = fnclass.make_eval_step(model)(ts.params, ts.state, x)
    assert losses.accuracy(logits, labels).item() >= 0.95
