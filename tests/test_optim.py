"""Functional optimizers against torch.optim over 100 steps, and schedules against hand computations."""

import math

import pytest
import torch

import fnclass
from fnclass.config import Config, OptimConfig
from fnclass.core import optim, schedules, tree
from fnclass.run import checkpoint
from fnclass.training.recipe import create_optimizer
from fnclass.training.step import TrainState

PEAK, STEPS = 0.01, 100
# Every step's gradient carries float32 rounding of up to about eps x 64 (the batch, the longest reduction)
# relative to its size; over STEPS steps these add up at worst linearly, relative to the parameters' scale.
# Measured: below 1e-6, ~1000x under this. A coupled or missing decay, a decay on biases or a missing bias
# correction gives 7e-3 to 2.
TRAJECTORY_TOL = STEPS * 64 * torch.finfo(torch.float32).eps  # 7.6e-4


def _problem(dtype=torch.float32):
    """A small two-layer regression problem with fixed data and initial weights."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen).to(dtype), torch.randn(64, 3, generator=gen).to(dtype)
    params = {"w1": torch.randn(16, 8, generator=gen) * 0.3, "b1": torch.zeros(16),
              "w2": torch.randn(3, 16, generator=gen) * 0.3}

    def loss_fn(p):
        return ((torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T - y) ** 2).mean()
    return tree.tree_map(lambda v: v.to(dtype), params), loss_fn


def _relative_error(ours, reference):
    """``|ours - reference| / |reference|`` in float64."""
    return ((ours.double() - reference).norm() / reference.norm()).item()


def _run_functional(transform):
    params, loss_fn = _problem()
    opt_state = transform.init(params)
    for _ in range(STEPS):
        grads = torch.func.grad(loss_fn)(params)
        updates, opt_state = transform.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
    return params


def _run_torch(make_optimizer, schedule, dtype=torch.float32):
    params, loss_fn = _problem(dtype)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = make_optimizer(list(leaves.values()))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(schedule(step)) / PEAK)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(leaves).backward()
        opt.step()
        lr_sched.step()
    return {k: v.detach() for k, v in leaves.items()}


SCHEDULE = schedules.warmup_cosine(PEAK, warmup_steps=10, total_steps=STEPS, end_value=PEAK * 0.01)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd_nesterov", "sgd"])
def test_matches_torch_optim_over_100_steps(name):
    functional, reference = {
        "adam": (optim.adam(SCHEDULE), lambda p: torch.optim.Adam(p, lr=PEAK, foreach=True)),
        "adamw": (optim.adamw(SCHEDULE, weight_decay=0.1),
                  lambda p: torch.optim.AdamW(p, lr=PEAK, weight_decay=0.1, foreach=True)),
        "sgd_nesterov": (optim.sgd(SCHEDULE, momentum=0.9, nesterov=True),
                         lambda p: torch.optim.SGD(p, lr=PEAK, momentum=0.9, nesterov=True, foreach=True)),
        "sgd": (optim.sgd(SCHEDULE), lambda p: torch.optim.SGD(p, lr=PEAK, foreach=True)),
    }[name]
    # torch.optim in float64 is the reference; both float32 runs must stay within float32's rounding of it.
    exact, theirs = _run_torch(reference, SCHEDULE, torch.float64), _run_torch(reference, SCHEDULE)
    ours = _run_functional(functional)
    start, _ = _problem(torch.float64)
    for k in ours:
        assert _relative_error(start[k], exact[k]) > 0.05, "parameters did not move"
        assert _relative_error(theirs[k], exact[k]) < TRAJECTORY_TOL, "the float32 reference itself drifted"
        assert _relative_error(ours[k], exact[k]) < TRAJECTORY_TOL, k


def test_update_does_not_mutate_inputs():
    params, loss_fn = _problem()
    grads = torch.func.grad(loss_fn)(params)
    transform = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3, weight_decay=0.1))
    state = transform.init(params)
    snapshot = tree.tree_map(torch.clone, (params, grads, state))
    updates, new_state = transform.update(grads, state, params)
    optim.apply_updates(params, updates)
    assert tree.tree_allclose((params, grads, state), snapshot, rtol=0, atol=0)
    assert int(new_state[1][0]["count"]) == 1


def test_clip_by_global_norm_matches_torch():
    grads = {"a": torch.randn(10) * 5, "b": torch.randn(3, 3) * 5}
    clipped, _ = optim.clip_by_global_norm(1.0).update(grads, {}, None)
    reference = [g.clone().requires_grad_() for g in grads.values()]
    for r, g in zip(reference, grads.values()):
        r.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    for r, c in zip(reference, clipped.values()):
        torch.testing.assert_close(c, r.grad)
    small = {"a": torch.full((4,), 0.1)}
    assert torch.equal(optim.clip_by_global_norm(1.0).update(small, {}, None)[0]["a"], small["a"])


def test_weight_decay_mask_skips_leaves():
    params = {"w": torch.ones(2, 2), "bias": torch.ones(2)}
    grads = tree.tree_map(torch.zeros_like, params)
    mask = lambda p: {"w": True, "bias": False}
    updates, _ = optim.add_decayed_weights(0.5, mask).update(grads, {}, params)
    assert torch.equal(updates["w"], torch.full((2, 2), 0.5)) and torch.equal(updates["bias"], torch.zeros(2))


def test_schedules_against_hand_values():
    cosine = schedules.warmup_cosine(1.0, warmup_steps=10, total_steps=110, init_value=0.0, end_value=0.1)
    assert float(cosine(0)) == 0.0
    assert math.isclose(float(cosine(5)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(cosine(10)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(cosine(60)), 0.1 + 0.9 * 0.5, rel_tol=1e-6)
    assert math.isclose(float(cosine(500)), 0.1, rel_tol=1e-6)
    pw = schedules.piecewise_linear([0, 10, 30], [1.0, 3.0, 0.0])
    assert [round(float(pw(s)), 5) for s in (0, 5, 10, 20, 30, 99)] == [1.0, 2.0, 3.0, 1.5, 0.0, 0.0]
    oc = schedules.one_cycle(0.4, total_steps=100, pct_start=0.25, div_factor=4, final_div_factor=10)
    assert [round(float(oc(s)), 6) for s in (0, 25, 100)] == [0.1, 0.4, 0.01]
    assert math.isclose(float(schedules.cosine_decay(2.0, 100, alpha=0.5)(50)), 2.0 * (0.5 * 0.5 + 0.5), rel_tol=1e-6)
    assert float(schedules.linear_warmup(1.0, 4)(2)) == 0.5 and float(schedules.linear_warmup(1.0, 4)(9)) == 1.0
    # A schedule gives the same value for a tensor count as for an int (the count lives in the opt state).
    assert float(cosine(torch.tensor(37))) == float(cosine(37))


def test_sgd_decoupled_weight_decay_as_cpu_toml_configures_it():
    # cpu.toml's optimizer: Nesterov SGD on a one-cycle schedule, decoupled decay on matrices only. torch.optim's
    # SGD couples its decay into the momentum, so the reference is a float64 hand loop.
    config = OptimConfig(name="sgd", lr=0.3, momentum=0.9, nesterov=True, weight_decay=2e-3, schedule="one_cycle",
                         warmup_epochs=2.0, final_lr_fraction=0.02)
    steps_per_epoch, warmup = STEPS // 10, 20
    labels = lambda p: {"w1": "weights", "b1": "biases", "w2": "weights"}  # what a model's param_labels gives
    transform = create_optimizer(config, labels, steps_per_epoch, 10)
    ours, loss_fn = _problem()
    ours["b1"] = ours["b1"] + 0.5  # a non-zero bias, so that decaying it (the mask failing) would show
    state = transform.init(ours)
    exact, exact_loss = _problem(torch.float64)
    exact["b1"] = exact["b1"] + 0.5
    start = dict(exact)
    trace = tree.tree_map(torch.zeros_like, exact)
    low = config.lr * config.final_lr_fraction
    for t in range(STEPS):
        updates, state = transform.update(torch.func.grad(loss_fn)(ours), state, ours)
        ours = optim.apply_updates(ours, updates)
        lr = low + (config.lr - low) * (min(t / warmup, 1.0) - max(t - warmup, 0) / (STEPS - warmup))
        grads = torch.func.grad(exact_loss)(exact)
        for k in exact:
            trace[k] = config.momentum * trace[k] + grads[k]
            step = grads[k] + config.momentum * trace[k]
            decay = config.weight_decay * exact[k] if exact[k].ndim > 1 else 0.0
            exact[k] = exact[k] - lr * (step + decay)
    for k in exact:
        assert _relative_error(start[k], exact[k]) > 0.05, "parameters did not move"
        # Without the decay, or with it on the bias too, the error is 7e-3 to 2e-2.
        assert _relative_error(ours[k], exact[k]) < TRAJECTORY_TOL, k


def test_schedule_count_continues_from_restored_state(tmp_path):
    params, loss_fn = _problem()

    def run(transform, train_state, steps):
        for _ in range(steps):
            grads = torch.func.grad(loss_fn)(train_state.params)
            updates, opt_state = transform.update(grads, train_state.opt_state, train_state.params)
            train_state = train_state._replace(step=train_state.step + 1, opt_state=opt_state,
                                               params=optim.apply_updates(train_state.params, updates))
        return train_state

    def fresh():
        transform = optim.adamw(SCHEDULE, weight_decay=0.1)  # rebuilt, as a resumed process does
        return transform, TrainState(torch.tensor(0), params, {}, transform.init(params), fnclass.key(0))

    transform, uninterrupted = fresh()
    uninterrupted = run(transform, uninterrupted, 8)
    transform, first = fresh()
    checkpoint.save_checkpoint(tmp_path / "ck.safetensors", run(transform, first, 3), config=Config(),
                               classes=[f"c{i}" for i in range(10)], mean=(0.5,) * 3, std=(0.25,) * 3,
                               input_size=(32, 32))
    transform, skeleton = fresh()
    restored = checkpoint.restore_train_state(tmp_path / "ck.safetensors", skeleton)
    assert int(restored.opt_state[0]["count"]) == int(restored.opt_state[2]["count"]) == 3
    resumed = run(transform, restored, 5)
    # Exact by construction: the file holds the state's bits, and the same float operations follow on them.
    for a, b in zip(tree.tree_leaves(resumed), tree.tree_leaves(uninterrupted), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


# Five quintic Newton-Schulz steps: 15 float32 matmuls, each reducing over at most 64 terms (eps x 15 x 64
# relative to the result). Measured: below 1e-6, ~100x under this.
NEWTON_SCHULZ_TOL = 15 * 64 * torch.finfo(torch.float32).eps


def _is_polar_direction(x, g):
    """Whether ``x`` is ``U D V^T`` with ``g``'s own singular vectors and every ``D`` in [0.5, 1.5].

    Exactly ``U V^T`` would have D = 1; Muon's five quintic steps leave it in about [0.68, 1.13].
    """
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    d = (u.T @ x.double() @ vh.T).diagonal()
    off_direction = (x.double() - u @ torch.diag(d) @ vh).norm()  # off-diagonal and outside g's row/column space
    return bool(off_direction <= NEWTON_SCHULZ_TOL * x.norm() and 0.5 <= d.min() and d.max() <= 1.5)


def test_orthogonalize_reshapes_scales_and_leaves_others_alone():
    gen = torch.Generator().manual_seed(1)
    grads = {"conv": torch.randn(8, 4, 3, 3, generator=gen), "stem": torch.randn(64, 3, 3, 3, generator=gen),
             "head": torch.randn(10, 32, generator=gen), "bias": torch.randn(8, generator=gen)}
    mask = lambda p: {"conv": True, "stem": True, "head": False, "bias": True}
    ours, _ = optim.orthogonalize(mask=mask).update(grads, {}, grads)
    default, _ = optim.orthogonalize().update(grads, {}, None)
    # Filters are (out, in*k*k) matrices; tall ones ("stem") are scaled up by sqrt(rows / cols).
    for name, update in (("conv", ours["conv"]), ("stem", ours["stem"]), ("head", default["head"])):
        g = grads[name].flatten(1)
        assert _is_polar_direction(update.flatten(1) / max(1.0, g.shape[0] / g.shape[1]) ** 0.5, g), name
    assert ours["head"] is grads["head"] and ours["bias"] is grads["bias"]  # masked out; 1-D


@pytest.mark.parametrize("shape", [(32, 64), (64, 16), (16, 16)])
def test_orthogonalize_approximates_svd_polar_factor(shape):
    rows, cols = shape
    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(rows, min(shape), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, min(shape), generator=gen))
    # Singular values from 1 down to 0.01: gradients' spectra spread this widely.
    g = u @ torch.diag(torch.logspace(0, -2, min(shape))) @ v.T
    ours, _ = optim.orthogonalize().update({"w": g}, {}, None)
    assert _is_polar_direction(ours["w"] / max(1.0, rows / cols) ** 0.5, g)
    # The check can tell: with a condition number of 100 (> 3), no rescaling of the raw gradient passes it.
    assert not _is_polar_direction(g / torch.linalg.matrix_norm(g, ord=2), g)


def test_multi_transform_applies_each_group_its_own_transform():
    grads = {"bn_bias": torch.randn(4), "head": torch.randn(3, 4), "conv": torch.randn(2, 2), "conv2": torch.randn(3)}
    labels = lambda p: {"bn_bias": "bias", "head": "head", "conv": "conv", "conv2": "conv"}
    transform = optim.multi_transform({"bias": optim.scale(64.0), "head": optim.scale(0.5),
                                       "conv": optim.trace(0.9), "unused": optim.scale(3.0)}, labels)
    state = transform.init(grads)
    assert set(state) == {"bias", "head", "conv"}  # a label without leaves has no state
    for _ in range(2):
        ours, state = transform.update(grads, state, grads)
    assert torch.equal(ours["bn_bias"], grads["bn_bias"] * 64.0) and torch.equal(ours["head"], grads["head"] * 0.5)
    for name in ("conv", "conv2"):  # momentum after two equal gradients: g + 0.9 g
        torch.testing.assert_close(ours[name], grads[name] * 1.9, rtol=1e-6, atol=0)


def test_freeze_after_by_hand():
    params = {"whiten_bias": torch.zeros(3), "w": torch.zeros(2, 2)}
    transform = optim.freeze_after(2, lambda p: {"whiten_bias": True, "w": False})
    state = transform.init(params)
    for i in range(5):
        grads = {"whiten_bias": torch.full((3,), i + 1.0), "w": torch.full((2, 2), i + 1.0)}
        updates, state = transform.update(grads, state, params)
        expected_bias = grads["whiten_bias"] if i < 2 else torch.zeros(3)
        assert torch.equal(updates["whiten_bias"], expected_bias) and torch.equal(updates["w"], grads["w"])
    assert int(state["count"]) == 5 and state["count"].dtype == torch.int64


def test_lookahead_matches_hand_loop():
    total, every, lr, momentum = 23, 5, 0.5, 0.9
    # airbench94's cubic ramp, raised to exactly 1 at the last step so the run ends on the slow weights.
    decay = lambda c: torch.where(torch.as_tensor(c) >= total, 1.0, 0.95**5 * (torch.as_tensor(c) / total) ** 3)
    params, loss_fn = _problem()
    transform = optim.lookahead(optim.sgd(lr, momentum=momentum), every, decay, total_steps=total)
    state = transform.init(params)
    fast = {k: v.clone() for k, v in params.items()}
    slow = {k: v.clone() for k, v in params.items()}
    buffer = {k: torch.zeros_like(v) for k, v in params.items()}
    for count in range(1, total + 1):
        updates, state = transform.update(torch.func.grad(loss_fn)(params), state, params)
        params = optim.apply_updates(params, updates)
        grads = torch.func.grad(loss_fn)(fast)
        for k in fast:
            buffer[k] = momentum * buffer[k] + grads[k]
            fast[k] = fast[k] - lr * buffer[k]
        if count % every == 0 or count == total:
            d = float(decay(count))
            for k in fast:
                slow[k] = d * slow[k] + (1 - d) * fast[k]
                fast[k] = slow[k].clone()
        for k in fast:
            torch.testing.assert_close(params[k], fast[k], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state["slow"][k], slow[k], rtol=1e-5, atol=1e-6)
    assert int(state["count"]) == total
    start, _ = _problem()
    for k in params:
        assert not torch.allclose(params[k], start[k])
        # The last update is slow - params, so the run ends on the slow weights up to one rounding.
        torch.testing.assert_close(params[k], state["slow"][k], rtol=1e-6, atol=1e-7)


def _muon_like(total):
    """A small chain using every transform above, like an airbench/Muon optimizer."""
    matrices = lambda p: {k: v.ndim >= 2 for k, v in p.items()}
    inner = optim.chain(optim.trace(0.9, nesterov=True), optim.orthogonalize(mask=matrices),
                        optim.multi_transform({"conv": optim.identity(), "bias": optim.scale(64.0),
                                               "head": optim.scale(0.5)}, lambda p: {k: k for k in p}),
                        optim.scale_by_learning_rate(schedules.warmup_cosine(0.1, 2, total)),
                        optim.freeze_after(3, lambda p: {"conv": False, "bias": True, "head": False}))
    return optim.lookahead(inner, 2, lambda c: 0.9 * (c / total) ** 3, total_steps=total)


def test_new_transforms_do_not_mutate_inputs():
    gen = torch.Generator().manual_seed(4)
    params = {"conv": torch.randn(4, 2, 3, 3, generator=gen), "bias": torch.randn(4, generator=gen),
              "head": torch.randn(3, 4, generator=gen)}
    grads = tree.tree_map(lambda v: torch.randn(v.shape, generator=gen), params)
    transform = _muon_like(5)
    state = transform.init(params)
    snapshot = tree.tree_map(torch.clone, (params, grads, state))
    for _ in range(2):  # the second update is a sync step
        transform.update(grads, state, params)
    assert tree.tree_allclose((params, grads, state), snapshot, rtol=0, atol=0)


@pytest.mark.slow
def test_new_transforms_compile_to_one_graph_equal_to_eager():
    total = 5
    transform = _muon_like(total)

    def step(params, state, grads):
        updates, state = transform.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: no Python branching on tensor values
    gen = torch.Generator().manual_seed(3)
    params = {"conv": torch.randn(4, 2, 3, 3, generator=gen), "bias": torch.randn(4, generator=gen),
              "head": torch.randn(3, 4, generator=gen)}
    eager_state = compiled_state = transform.init(params)
    eager_params = compiled_params = params
    for _ in range(total + 1):  # syncs at 2, 4 and 5; the bias freezes from the fourth step
        grads = tree.tree_map(lambda v: torch.randn(v.shape, generator=gen), params)
        eager_params, eager_state = step(eager_params, eager_state, grads)
        compiled_params, compiled_state = compiled(compiled_params, compiled_state, grads)
    for a, b in zip(tree.tree_leaves((compiled_params, compiled_state)), tree.tree_leaves((eager_params, eager_state))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


ACCUMULATE, MINI_BATCH, OUTER_STEPS = 4, 8, 3  # 3 optimizer steps of 4 mini steps of 8 examples: 32 per step


def _conv_problem(dtype):
    """A BatchNorm-free classifier (conv, tanh, mean-pool, linear) over a params dict, and its mean loss.

    tanh rather than relu: the loss is smooth, so rounding cannot flip a kink between the two runs compared.
    """
    gen = torch.Generator().manual_seed(5)
    params = {"conv": {"weight": torch.randn(6, 3, 3, 3, generator=gen) * 0.3, "bias": torch.randn(6, generator=gen)},
              "head": {"weight": torch.randn(10, 6, generator=gen) * 0.3, "bias": torch.zeros(10)}}
    images = torch.randn(OUTER_STEPS, ACCUMULATE * MINI_BATCH, 3, 8, 8, generator=gen).to(dtype)
    labels = torch.randint(0, 10, (OUTER_STEPS, ACCUMULATE * MINI_BATCH), generator=gen)

    def loss_fn(p, x, y):
        hidden = torch.tanh(torch.nn.functional.conv2d(x, p["conv"]["weight"], p["conv"]["bias"], padding=1))
        logits = torch.nn.functional.linear(hidden.mean(dim=(2, 3)), p["head"]["weight"], p["head"]["bias"])
        return torch.nn.functional.cross_entropy(logits, y)
    return tree.tree_map(lambda v: v.to(dtype), params), images, labels, loss_fn


def _accumulated_optimizers():
    """Adam and Nesterov SGD with decoupled decay, each with a schedule that a mini-step count would change.

    The warm-up rises over the 3 optimizer steps; counted in mini steps, the boundaries would fall at counts 3, 7
    and 11, where the cosine has already ended at 0.
    """
    schedule = lambda peak: schedules.warmup_cosine(peak, warmup_steps=2, total_steps=OUTER_STEPS,
                                                    init_value=peak / 4)
    return {"adam": optim.chain(optim.scale_by_adam(), optim.scale_by_learning_rate(schedule(0.01))),
            "sgd": optim.chain(optim.trace(0.9, nesterov=True), optim.add_decayed_weights(0.1),
                               optim.scale_by_learning_rate(schedule(0.5)))}


# float32: the accumulated mean sums the same per-example terms as the large batch's mean, grouped differently,
# so each gradient differs by reduction rounding: at most eps x the longest reduction (the conv filter's gradient
# sums 32 examples x 64 positions) relative to its scale. Adam's normalisation and SGD's linear steps pass that
# relative error on to each step, and the 3 steps add up at worst linearly (a smooth loss and small steps do not
# amplify it), relative to the distance the parameters moved. Measured: below 1.2e-6, ~600x under this. float64
# shows the two are the same computation up to rounding (measured: below 3e-15).
ACCUMULATION_TOL = {torch.float32: OUTER_STEPS * ACCUMULATE * MINI_BATCH * 64 * torch.finfo(torch.float32).eps,
                    torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_multi_steps_equal_one_step_on_the_whole_batch(name, dtype):
    inner = _accumulated_optimizers()[name]
    start, images, labels, loss_fn = _conv_problem(dtype)
    accumulated, large = optim.multi_steps(inner, ACCUMULATE), inner
    acc_params, acc_state = start, accumulated.init(start)
    large_params, large_state = start, large.init(start)
    for outer in range(OUTER_STEPS):
        for x, y in zip(images[outer].split(MINI_BATCH), labels[outer].split(MINI_BATCH)):
            updates, acc_state = accumulated.update(torch.func.grad(loss_fn)(acc_params, x, y), acc_state, acc_params)
            acc_params = optim.apply_updates(acc_params, updates)
        grads = torch.func.grad(loss_fn)(large_params, images[outer], labels[outer])
        updates, large_state = large.update(grads, large_state, large_params)
        large_params = optim.apply_updates(large_params, updates)
        for ours, reference, origin in zip(tree.tree_leaves(acc_params), tree.tree_leaves(large_params),
                                           tree.tree_leaves(start)):
            moved = (reference - origin).norm()
            assert moved > 1e-3 * origin.norm(), "parameters did not move"
            assert (ours - reference).norm() <= ACCUMULATION_TOL[dtype] * moved, outer


def test_multi_steps_hold_parameters_and_inner_state_between_boundaries():
    params, images, labels, loss_fn = _conv_problem(torch.float32)
    transform = optim.multi_steps(_accumulated_optimizers()["adam"], ACCUMULATE)
    state = transform.init(params)
    for mini_step, (x, y) in enumerate(zip(images.flatten(0, 1).split(MINI_BATCH),
                                           labels.flatten(0, 1).split(MINI_BATCH))):
        updates, new_state = transform.update(torch.func.grad(loss_fn)(params, x, y), state, params)
        new_params = optim.apply_updates(params, updates)
        # Exact by construction: off the boundary the updates are zeros selected by torch.where.
        boundary = mini_step % ACCUMULATE == ACCUMULATE - 1
        same_params = all(torch.equal(a, b) for a, b in zip(tree.tree_leaves(new_params), tree.tree_leaves(params)))
        same_inner = all(torch.equal(a, b) for a, b in zip(tree.tree_leaves(new_state["inner"]),
                                                           tree.tree_leaves(state["inner"])))
        assert same_params != boundary and same_inner != boundary, mini_step
        assert int(new_state["count"]) == mini_step + 1
        assert all(torch.equal(s, torch.zeros_like(s)) for s in tree.tree_leaves(new_state["grad_sum"])) == boundary
        params, state = new_params, new_state
    adam, learning_rate = state["inner"]
    assert int(adam["count"]) == int(learning_rate["count"]) == OUTER_STEPS  # the schedule counts optimizer steps


def _assert_close_elementwise(ours, reference):
    """Trees equal up to elementwise float32 arithmetic: each operation rounds once, so a few eps of each scale."""
    for a, b in zip(tree.tree_leaves(ours), tree.tree_leaves(reference), strict=True):
        scale = float(b.abs().max()) if b.is_floating_point() else 0.0
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(a, b, rtol=16 * eps, atol=16 * eps * scale)


def test_multi_steps_under_vmap_equal_each_member_alone():
    gen = torch.Generator().manual_seed(6)
    transform = optim.multi_steps(_accumulated_optimizers()["adam"], 2)
    members = [{"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)} for _ in range(2)]
    alone = [(p, transform.init(p)) for p in members]
    stacked = tree.tree_stack(members), tree.tree_stack([transform.init(p) for p in members])
    stacked_update = torch.func.vmap(transform.update)
    for _ in range(5):  # boundaries at the second and fourth mini steps; the fifth is accumulated only
        grads = [tree.tree_map(lambda v: torch.randn(v.shape, generator=gen), p) for p in members]
        updates, state = stacked_update(tree.tree_stack(grads), stacked[1], stacked[0])
        stacked = optim.apply_updates(stacked[0], updates), state
        for i, (params, opt_state) in enumerate(alone):
            updates, opt_state = transform.update(grads[i], opt_state, params)
            alone[i] = optim.apply_updates(params, updates), opt_state
    for i, member in enumerate(alone):
        _assert_close_elementwise(tree.tree_index(stacked, i), member)
    assert all(not torch.equal(params["w"], start["w"]) for (params, _), start in zip(alone, members))


@pytest.mark.slow
def test_multi_steps_compile_to_one_graph_equal_to_eager():
    transform = optim.multi_steps(_accumulated_optimizers()["adam"], 3)

    def step(params, state, grads):
        updates, state = transform.update(grads, state, params)
        return optim.apply_updates(params, updates), state

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: no Python branching on the boundary
    gen = torch.Generator().manual_seed(7)
    params = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(4, generator=gen)}
    eager = ours = params, transform.init(params)
    for _ in range(7):  # boundaries at the third and sixth mini steps
        grads = tree.tree_map(lambda v: torch.randn(v.shape, generator=gen), params)
        eager, ours = step(*eager, grads), compiled(*ours, grads)
    _assert_close_elementwise(ours, eager)
    assert int(ours[1]["inner"][0]["count"]) == 2


def test_multi_steps_every_one_is_the_inner_transform():
    inner = optim.adam(1e-3)
    assert optim.multi_steps(inner, 1) is inner
    with pytest.raises(ValueError, match="every must be a positive int"):
        optim.multi_steps(inner, 0)
