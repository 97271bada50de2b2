"""The functional train step against a stateful nn.Module + torch.optim step, compiled against eager, the
gradient argument, TTA, and real-data checks that learning works."""

import functools

import pytest
import torch

import fnclass
from fnclass import data
from fnclass.config import ModelConfig, load_config
from fnclass.core import losses, optim, random, schedules, tree
from fnclass.models import resolve, resolve_config
from fnclass.training import evaluate, recipe, step, wrappers
from fnclass.training.program import train
from tests.torch_reference import reference_module, torch_name

SMALL = ModelConfig(name="tiny", widths=(8, 16, 16), stem_width=8, attn_heads=2)


def _fp16_step(model, loss_fn, opt):
    """The fp16 step: the loss-scaled gradient and the loss-scaling wrapper around the minimal step."""
    return wrappers.with_loss_scaling(fnclass.make_train_step(
        model, loss_fn, opt, gradient=wrappers.loss_scaled_gradient(step.mean_gradient), precision="fp16"))


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
    train_step = fnclass.make_train_step(model, loss_fn, opt)
    module = reference_module(SMALL, ts.params, ts.state).train()
    torch_opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True)
    for i in range(3):
        images, labels = _batch(i)
        ts, metrics = train_step(ts, (images, labels), random.fold_in(ts.key, ts.step))
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
    ours = step._eager_grad_and_value(loss_and_aux)(params, state, images, labels, None)
    reference = torch.func.grad_and_value(loss_and_aux, has_aux=True)(params, state, images, labels, None)
    double = functools.partial(tree.tree_map, torch.Tensor.double)
    exact = torch.func.grad_and_value(loss_and_aux, has_aux=True)(double(params), double(state), images.double(),
                                                                   labels, None)
    # Both float32 paths against float64 (gradients, loss, new BatchNorm statistics, logits), leaf by leaf: float32
    # rounding over the longest reduction (a stem weight's gradient sums batch x 32 x 32 = 32,768 terms) bounds
    # the error by eps x 32,768 (3.9e-3) of the leaf's scale. Measured: at most 4.3e-6; a gradient 1% off fails.
    bound = torch.finfo(torch.float32).eps * len(images) * 32 * 32
    paths = {"eager": tree.flatten_paths(ours), "torch.func": tree.flatten_paths(reference)}
    for path, want in tree.flatten_paths(exact).items():
        for name, got in paths.items():
            error = (got[path].double() - want).abs().max() / want.abs().max()
            assert error <= bound, f"{name} {path}: {error:.2g} of the leaf's scale"


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
    opt = optim.sgd(schedules.warmup_cosine(0.01, 2, 10), momentum=0.9, nesterov=True)  # see the SGD note above
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
    opt = optim.adam(schedules.warmup_cosine(2e-3, 20, epochs * 512 // batch_size))
    ts = fnclass.create_train_state(model, opt, fnclass.key(0))
    train_step = fnclass.make_train_step(model, losses.cross_entropy, opt)
    for epoch in range(epochs):
        order = random.permutation(random.fold_in(ts.key, epoch), 512)
        for start in range(0, 512, batch_size):
            idx = order[start:start + batch_size]
            ts, _ = train_step(ts, (x[idx], labels[idx]), random.fold_in(ts.key, ts.step))
    logits = fnclass.make_eval_step(model)(ts.params, ts.state, x)
    assert losses.accuracy(logits, labels).item() >= 0.95


def test_tta_logits_average_the_views_as_airbench_does():
    weight = torch.randn(3 * 8 * 8, 10)
    eval_step = lambda params, state, x: x.flatten(1) @ weight  # a model that is neither flip- nor shift-invariant
    x = torch.randn(4, 3, 8, 8)
    f = lambda v: eval_step(None, None, v)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[:, :, :8, :8], padded[:, :, 2:, 2:]
    flips = (f(x) + f(x.flip(3))) / 2
    torch.testing.assert_close(evaluate.tta_logits(eval_step, None, None, x, 1), flips)
    shifted = (f(up_left) + f(up_left.flip(3)) + f(down_right) + f(down_right.flip(3))) / 4
    torch.testing.assert_close(evaluate.tta_logits(eval_step, None, None, x, 2), (flips + shifted) / 2)
    torch.testing.assert_close(up_left[:, :, 1:, 1:], x[:, :, :7, :7])  # a one-pixel shift down-right of the content


def test_fast_recipe_optimizer_composes_the_techniques_by_parameter_path():
    from fnclass.config import OptimConfig
    from fnclass.models.fast import fit_whitening

    cfg = ModelConfig(name="tiny", widths=(8, 16, 16), whiten=True)
    model = fnclass.build_model(cfg)
    params, state = model.init(random.key(0))
    state = fit_whitening(state, torch.randn(32, 3, 32, 32), resolve(cfg))
    config = OptimConfig(name="sgd", lr=0.1, momentum=0.5, nesterov=True, muon=True, bias_lr_scale=8.0,
                         head_lr_scale=0.25, schedule="constant", whiten_bias_epochs=1.0)
    opt = recipe.create_optimizer(config, model.param_labels, steps_per_epoch=2, epochs=3)
    opt_state, momentum = opt.init(params), tree.tree_map(torch.zeros_like, params)
    for count in range(3):
        grads = tree.tree_map(lambda p: torch.randn_like(p), params)
        updates, opt_state = opt.update(grads, opt_state, params)
        # The same by hand: Nesterov momentum, Newton-Schulz for matrices and filters (not the head), lr, scales.
        momentum = tree.tree_map(lambda m, g: 0.5 * m + g, momentum, grads)
        nesterov = tree.tree_map(lambda m, g: g + 0.5 * m, momentum, grads)
        flat = tree.flatten_paths(nesterov)
        orthogonal = optim.orthogonalize()
        for path, direction in flat.items():
            updates_flat = tree.flatten_paths(updates)
            update = updates_flat[path]
            if direction.ndim > 1 and not path.startswith("head."):
                direction = orthogonal.update({"x": direction}, {}, None)[0]["x"]
            scale = {"head.weight": 0.25, "whiten.bias": 8.0}.get(path, 8.0 if path.endswith("bn.bias") else 1.0)
            if path == "whiten.bias" and count >= 2:
                scale = 0.0  # frozen after one epoch of two steps
            torch.testing.assert_close(update, -0.1 * scale * direction, rtol=1e-5, atol=1e-7, msg=path)
        assert "whiten.weight" not in updates_flat  # the whitening filters are state, never trained
        params = optim.apply_updates(params, updates)


def test_fast_recipe_learns_on_real_data(cifar_dir, tmp_path):
    overrides = ["model.name=tiny", "data.train_limit=4000", "data.test_limit=1000", "train.epochs=3",
                 "train.batch_size=250", "train.compile=false", "train.precision=fp32", "train.log_every_steps=0",
                 "optim.lookahead_every=5"]
    summary = train(load_config("configs/fast.toml", overrides), tmp_path / "run", data_dir=str(cifar_dir)).summary
    # Every technique of fast.toml at once (whitening, Dirac init, alternating flips, Muon, scaled lrs, frozen
    # whitening bias, Lookahead, translation TTA) on a CPU-sized budget: it must learn, not just run. Seeds 0-4 reached
    # 47.6-53.1% (TTA 47.7-54.7%; seed 0, tested here: 49.1%), so 43% is 2.8 standard deviations under their mean.
    assert summary["test_accuracy"] > 0.43 and summary["test_accuracy_tta"] > 0.43


@pytest.mark.parametrize("config,shape", [
    ("configs/seed.toml", ["model.widths=[8, 8, 16, 16]", "model.depths=[1, 1, 1, 1]"]),
    ("configs/cpu.toml", ["model.widths=[8, 16, 16]"]),
    ("configs/fast.toml", ["model.name=tiny", "model.widths=[8, 16, 16]", "optim.lookahead_every=5"])])
def test_whole_step_traces_as_one_graph(config, shape):
    from fnclass.models.fast import fit_whitening

    cfg = resolve_config(load_config(config, shape))
    model = fnclass.build_model(cfg.model)
    opt = recipe.create_optimizer(cfg.optim, model.param_labels, 10, 2)
    ts = step.create_train_state(model, opt, random.key(0))
    images, labels = _batch(n=8)
    if cfg.model.whiten:
        ts = ts._replace(state=fit_whitening(ts.state, images, cfg.model))
    compiled = step.make_train_step(model, losses.cross_entropy, opt, compile=True, channels_last=True)
    # Gradient, optimizer, schedule, masks by label, Lookahead: one graph, no break (no host synchronisation).
    explanation = torch._dynamo.explain(compiled._torchdynamo_orig_callable)(ts, (images, labels), random.key(1))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_the_gradient_is_a_parameter_of_the_step():
    # A stand-in for a cross-process average or a clipped, noised sum: the default gradient, doubled. With plain SGD
    # that is the default step at twice the learning rate.
    model = fnclass.build_model(SMALL)

    def doubled(loss_and_aux, *, compile=False):
        grad_and_value = step.mean_gradient(loss_and_aux, compile=compile)

        def wrapped(params, *args):
            grads, aux = grad_and_value(params, *args)
            return tree.tree_map(lambda g: 2 * g, grads), aux
        return wrapped
    ts = fnclass.create_train_state(model, optim.sgd(0.05), fnclass.key(0))
    ours, _ = step.make_train_step(model, losses.cross_entropy, optim.sgd(0.05), gradient=doubled)(ts, _batch(), None)
    reference, _ = step.make_train_step(model, losses.cross_entropy, optim.sgd(0.1))(ts, _batch(), None)
    for a, b in zip(tree.tree_leaves(ours.params), tree.tree_leaves(reference.params)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not tree.tree_allclose(ours.params, ts.params)


def _equal_trees(a, b):
    return all(x.equal(y) for x, y in zip(tree.tree_leaves(a), tree.tree_leaves(b)))


@pytest.mark.parametrize("poison", ["nan_image", "inf_gradient"])
def test_a_skipped_non_finite_step_changes_nothing_but_the_step_count(poison):
    model = fnclass.build_model(SMALL)
    opt = optim.adam(1e-3)
    ts = fnclass.create_train_state(model, opt, fnclass.key(0))
    loss_fn = losses.cross_entropy
    if poison == "inf_gradient":  # a finite loss (0) whose gradient is not: d sqrt(x)/dx at 0
        loss_fn = lambda logits, labels: torch.sqrt((logits * 0.0).sum().abs())  # noqa: E731
    images, labels = _batch(0)
    if poison == "nan_image":
        images[3, 0, 5, 5] = float("nan")
    skip = wrappers.skip_nonfinite(fnclass.make_train_step(model, loss_fn, opt))
    plain = fnclass.make_train_step(model, loss_fn, opt)
    after, metrics = skip(ts, (images, labels), fnclass.key(1))
    assert not bool(metrics["finite"]) and int(after.step) == int(ts.step) + 1
    assert _equal_trees((after.params, after.state, after.opt_state), (ts.params, ts.state, ts.opt_state))
    unguarded, _ = plain(ts, (images, labels), fnclass.key(1))  # what skipping prevents
    assert not all(torch.isfinite(leaf).all() for leaf in tree.tree_leaves(unguarded.params))


def test_an_update_that_overflows_the_weights_is_not_finite_and_skipping_keeps_the_old_state():
    """A finite loss and finite gradients whose update makes parameters inf (SGD at lr 1e38 on 1,000 x the
    cross-entropy: lr x a gradient above 3.4 overflows float32's 3.4e38) flag the step as not finite, and the skip
    guard keeps the old state; the update does overflow (the plain step's parameters, checked)."""
    model = fnclass.build_model(SMALL)
    opt = optim.sgd(1e38, momentum=0.0)
    ts = fnclass.create_train_state(model, opt, fnclass.key(0))
    loss_fn = lambda logits, labels: 1000.0 * losses.cross_entropy(logits, labels)  # noqa: E731
    plain = fnclass.make_train_step(model, loss_fn, opt)
    grads = step.mean_gradient(lambda p, s, x, y, k: (loss_fn(model.apply(p, s, x, train=True, key=k)[0], y),
                                                      (s, None)))(ts.params, ts.state, *_batch(0), fnclass.key(1))[0]
    assert all(torch.isfinite(g).all() for g in tree.tree_leaves(grads))  # the loss and gradients are finite
    unguarded, metrics = plain(ts, _batch(0), fnclass.key(1))
    assert torch.isfinite(metrics["loss"])
    assert not all(torch.isfinite(leaf).all() for leaf in tree.tree_leaves(unguarded.params))  # the update is not
    assert not bool(metrics["finite"])
    after, _ = wrappers.skip_nonfinite(plain)(ts, _batch(0), fnclass.key(1))
    assert _equal_trees((after.params, after.state, after.opt_state), (ts.params, ts.state, ts.opt_state))


def test_a_finite_step_is_the_same_with_or_without_the_skip_guard():
    model = fnclass.build_model(SMALL)
    opt = optim.adam(1e-3)
    ts = fnclass.create_train_state(model, opt, fnclass.key(0))
    guarded = wrappers.skip_nonfinite(fnclass.make_train_step(model, losses.cross_entropy, opt))
    plain = fnclass.make_train_step(model, losses.cross_entropy, opt)
    a, metrics = guarded(ts, _batch(2), fnclass.key(1))
    b, _ = plain(ts, _batch(2), fnclass.key(1))
    assert bool(metrics["finite"]) and _equal_trees(a, b) and not _equal_trees(a.params, ts.params)


def test_soft_targets_train_as_the_stateful_module_with_probability_targets():
    """mixup/CutMix targets: the step's loss and update equal nn.Module + torch.optim with F.cross_entropy's
    probability targets, label smoothing applied to the mixed rows; ``correct`` counts the targets' argmax."""
    model = fnclass.build_model(SMALL)
    opt = optim.sgd(0.05, momentum=0.9, nesterov=True)
    ts = fnclass.create_train_state(model, opt, fnclass.key(0))
    train_step = fnclass.make_train_step(model, functools.partial(losses.cross_entropy, label_smoothing=0.1), opt)
    module = reference_module(SMALL, ts.params, ts.state).train()
    torch_opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True)
    for i in range(2):
        images, labels = _batch(i)
        lam = 0.3 + 0.2 * i
        targets = lam * torch.nn.functional.one_hot(labels, 10) + (1 - lam) * torch.nn.functional.one_hot(
            labels.flip(0), 10)
        ts, metrics = train_step(ts, (images, targets.float()), random.fold_in(ts.key, ts.step))
        torch_opt.zero_grad()
        logits = module(images)
        ref_loss = torch.nn.functional.cross_entropy(logits, targets.float(), label_smoothing=0.1)
        ref_loss.backward()
        torch_opt.step()
        torch.testing.assert_close(metrics["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-6)
        assert int(metrics["correct"]) == int((logits.argmax(-1) == targets.argmax(-1)).sum())
    reference = module.state_dict()
    for path, value in tree.flatten_paths(ts.params).items():
        torch.testing.assert_close(value, reference[torch_name(path)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_a_hand_written_moving_average(warmup):
    model = fnclass.build_model(SMALL)
    opt = optim.sgd(0.05, momentum=0.9)
    ts = fnclass.create_train_state(model, opt, fnclass.key(0), ema=True)
    train_step = wrappers.skip_nonfinite(wrappers.with_ema(
        fnclass.make_train_step(model, losses.cross_entropy, opt), 0.9, warmup=warmup))
    double = lambda tree_: tree.tree_map(lambda leaf: leaf.double(), tree_)
    average = double({"params": ts.params, "state": ts.state})  # the reference, in float64
    for t in range(1, 6):
        images, labels = _batch(t)
        if t == 4:
            images = images.clone()
            images[0, 0, 0, 0] = float("nan")  # a skipped step: nothing moves, the average included
        ts, metrics = train_step(ts, (images, labels), random.fold_in(ts.key, ts.step))
        decay = min(0.9, (1 + t) / (10 + t)) if warmup else 0.9
        if bool(metrics["finite"]):
            current = double({"params": ts.params, "state": ts.state})
            average = tree.tree_map(lambda a, x, d=decay: d * a + (1 - d) * x, average, current)
    assert int(ts.step) == 5
    # float32 lerps of values of scale ~1, five times: a few float32 eps
    for path, value in tree.flatten_paths(ts.ema).items():
        torch.testing.assert_close(value.double(), tree.flatten_paths(average)[path], rtol=1e-6, atol=1e-6)
    assert not tree.tree_allclose(ts.ema["params"], ts.params)


def test_fp16_loss_scaling_follows_grad_scaler_with_an_injected_overflow(monkeypatch):
    """precision="fp16" on the CPU (float32 arithmetic, the scaling machinery as on a GPU): the same run as an
    nn.Module + torch.optim.SGD + torch.amp.GradScaler. A start at 2**124 on a loss x1000 makes the scaled gradients
    overflow: those steps are skipped and the scale backs off; after ``growth_interval`` finite steps it grows and
    overflows again. Scales are compared step by step, parameters at the end."""
    import fnclass.core.loss_scale as loss_scale_module

    interval, real_update = 3, loss_scale_module.update
    monkeypatch.setattr(loss_scale_module, "update",  # the run's rules with a short interval, to see growth here
                        lambda state, finite: real_update(state, finite, growth_interval=interval))
    model = fnclass.build_model(SMALL)
    opt = optim.sgd(1e-5, momentum=0.9)  # on a loss x1000: as lr 0.01
    ts = fnclass.create_train_state(model, opt, fnclass.key(0), loss_scaling=True)
    assert float(ts.loss_scale["scale"]) == 2.0 ** 16 and int(ts.loss_scale["growth_tracker"]) == 0
    ts = ts._replace(loss_scale={"scale": torch.tensor(2.0 ** 124), "growth_tracker": torch.tensor(0)})
    loss_fn = lambda logits, labels: 1000 * losses.cross_entropy(logits, labels)
    train_step = _fp16_step(model, loss_fn, opt)
    module = reference_module(SMALL, ts.params, ts.state).train()
    torch_opt = torch.optim.SGD(module.parameters(), lr=1e-5, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 124, growth_interval=interval)
    overflows, scales = 0, [2.0 ** 124]
    for i in range(14):
        images, labels = _batch(i)
        ts, metrics = train_step(ts, (images, labels), random.fold_in(ts.key, ts.step))
        torch_opt.zero_grad()
        scaler.scale(1000 * torch.nn.functional.cross_entropy(module(images), labels)).backward()
        scaler.step(torch_opt)
        scaler.update()
        assert float(ts.loss_scale["scale"]) == scaler.get_scale(), i  # GradScaler's scale, step by step
        overflows += int(metrics["overflow"])
        scales.append(scaler.get_scale())
        assert bool(metrics["finite"])  # an overflow with a scale >= 1 is not divergence
    steps = list(zip(scales, scales[1:]))
    assert overflows >= 2 and any(b < a for a, b in steps) and any(b > a for a, b in steps)
    reference = module.state_dict()
    for path, value in tree.flatten_paths(ts.params).items():
        torch.testing.assert_close(value, reference[torch_name(path)], rtol=1e-4, atol=1e-5)


def test_fp16_step_with_a_power_of_two_scale_equals_the_fp32_step_and_an_overflow_changes_nothing():
    model = fnclass.build_model(SMALL)
    opt = optim.sgd(0.05, momentum=0.9)
    plain = fnclass.create_train_state(model, opt, fnclass.key(0))
    scaled = fnclass.create_train_state(model, opt, fnclass.key(0), loss_scaling=True)
    images, labels = _batch(0)
    key = random.fold_in(plain.key, 0)
    after, metrics = fnclass.make_train_step(model, losses.cross_entropy, opt)(plain, (images, labels), key)
    step16 = _fp16_step(model, losses.cross_entropy, opt)
    after16, metrics16 = step16(scaled, (images, labels), key)
    # multiplying by 2**16 and back is exact in float32, and backprop is linear in the loss
    assert tree.tree_allclose(after16.params, after.params, rtol=0, atol=0)
    assert torch.equal(metrics16["loss"], metrics["loss"]) and not bool(metrics16["overflow"])
    nan_images = images.clone()
    nan_images[0] = float("inf")  # an injected overflow: inf activations, non-finite gradients
    huge = scaled._replace(loss_scale={"scale": torch.tensor(3e38), "growth_tracker": torch.tensor(5)})
    skipped, flags = step16(huge, (nan_images, labels), key)
    assert bool(flags["overflow"]) and bool(flags["finite"]) and int(skipped.step) == 1
    assert tree.tree_allclose((skipped.params, skipped.state, skipped.opt_state),
                              (huge.params, huge.state, huge.opt_state), rtol=0, atol=0)
    assert float(skipped.loss_scale["scale"]) == float(torch.tensor(1.5e38)) and int(
        skipped.loss_scale["growth_tracker"]) == 0
    collapsed = scaled._replace(loss_scale={"scale": torch.tensor(1.5), "growth_tracker": torch.tensor(0)})
    _, flags = step16(collapsed, (nan_images, labels), key)
    assert bool(flags["overflow"]) and not bool(flags["finite"])  # the scale fell below 1: divergence


def test_an_fp16_overflow_skips_the_update_but_the_optimizers_counters_follow_the_batches():
    """A learning-rate schedule and Adam's count advance through a skipped overflow, as a scheduler beside GradScaler
    steps every batch: otherwise every overflow would shift the schedule (and Lookahead's final sync) one step."""
    model = fnclass.build_model(SMALL)
    opt = optim.adam(schedules.warmup_cosine(1e-3, 2, 10))
    ts = fnclass.create_train_state(model, opt, fnclass.key(0), loss_scaling=True)
    images, labels = _batch(0)
    images[0] = float("inf")
    after, metrics = _fp16_step(model, losses.cross_entropy, opt)(
        ts, (images, labels), fnclass.key(1))
    assert bool(metrics["overflow"])
    old, new = tree.flatten_paths(ts.opt_state), tree.flatten_paths(after.opt_state)
    counts = [name for name, leaf in old.items() if not leaf.is_floating_point()]
    assert counts and all(int(new[name]) == int(old[name]) + 1 for name in counts)
    assert all(torch.equal(new[name], old[name]) for name in old if name not in counts)
    assert _equal_trees(after.params, ts.params)


def test_ema_with_accumulation_averages_once_per_optimizer_step():
    model = fnclass.build_model(SMALL)
    opt = optim.multi_steps(optim.sgd(0.05, momentum=0.9), 2)
    ts = fnclass.create_train_state(model, opt, fnclass.key(0), ema=True)
    train_step = wrappers.with_ema(fnclass.make_train_step(model, losses.cross_entropy, opt), 0.9, warmup=True,
                                   every=2)
    average = {"params": ts.params, "state": ts.state}
    for t in range(1, 5):
        before = ts.ema
        ts, _ = train_step(ts, _batch(t), random.fold_in(ts.key, ts.step))
        if t % 2 == 0:  # the weights moved: one EMA update, the warm-up counting updates (1, then 2)
            decay = min(0.9, (1 + t // 2) / (10 + t // 2))
            average = tree.tree_map(lambda a, x, d=decay: d * a + (1 - d) * x, average,
                                    {"params": ts.params, "state": ts.state})
        else:
            assert _equal_trees(ts.ema, before)  # between optimizer steps the average waits
    for path, value in tree.flatten_paths(ts.ema).items():
        torch.testing.assert_close(value, tree.flatten_paths(average)[path], rtol=1e-6, atol=1e-6)
