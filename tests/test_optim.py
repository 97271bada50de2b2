"""Functional optimizers against torch.optim over 100 steps, and schedules against hand computations."""

import math

import pytest
import torch

from fnclass import optim, tree

PEAK, STEPS = 0.01, 100


def _problem():
    """A small two-layer regression problem with fixed data and initial weights."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), torch.randn(64, 3, generator=gen)
    params = {"w1": torch.randn(16, 8, generator=gen) * 0.3, "b1": torch.zeros(16),
              "w2": torch.randn(3, 16, generator=gen) * 0.3}

    def loss_fn(p):
        return ((torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T - y) ** 2).mean()
    return params, loss_fn


def _run_functional(transform):
    params, loss_fn = _problem()
    opt_state = transform.init(params)
    for _ in range(STEPS):
        grads = torch.func.grad(loss_fn)(params)
        updates, opt_state = transform.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
    return params


def _run_torch(make_optimizer, schedule):
    params, loss_fn = _problem()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = make_optimizer(list(leaves.values()))
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: float(schedule(step)) / PEAK)
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(leaves).backward()
        opt.step()
        lr_sched.step()
    return {k: v.detach() for k, v in leaves.items()}


SCHEDULE = optim.warmup_cosine(PEAK, warmup_steps=10, total_steps=STEPS, end_value=PEAK * 0.01)


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
    ours, theirs = _run_functional(functional), _run_torch(reference, SCHEDULE)
    start, _ = _problem()
    for k in ours:
        assert not torch.allclose(ours[k], start[k]), "parameters did not move"
        # Parameters are O(0.3); atol covers elements that pass near zero, where rounding order shows.
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
        assert ((ours[k] - theirs[k]).norm() / theirs[k].norm()).item() < 1e-6


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
    cosine = optim.warmup_cosine(1.0, warmup_steps=10, total_steps=110, init_value=0.0, end_value=0.1)
    assert float(cosine(0)) == 0.0
    assert math.isclose(float(cosine(5)), 0.5, rel_tol=1e-6)
    assert math.isclose(float(cosine(10)), 1.0, rel_tol=1e-6)
    assert math.isclose(float(cosine(60)), 0.1 + 0.9 * 0.5, rel_tol=1e-6)
    assert math.isclose(float(cosine(500)), 0.1, rel_tol=1e-6)
    pw = optim.piecewise_linear([0, 10, 30], [1.0, 3.0, 0.0])
    assert [round(float(pw(s)), 5) for s in (0, 5, 10, 20, 30, 99)] == [1.0, 2.0, 3.0, 1.5, 0.0, 0.0]
    oc = optim.one_cycle(0.4, total_steps=100, pct_start=0.25, div_factor=4, final_div_factor=10)
    assert [round(float(oc(s)), 6) for s in (0, 25, 100)] == [0.1, 0.4, 0.01]
    assert math.isclose(float(optim.cosine_decay(2.0, 100, alpha=0.5)(50)), 2.0 * (0.5 * 0.5 + 0.5), rel_tol=1e-6)
    assert float(optim.linear_warmup(1.0, 4)(2)) == 0.5 and float(optim.linear_warmup(1.0, 4)(9)) == 1.0
    # A schedule gives the same value for a tensor count as for an int (the count lives in the opt state).
    assert float(cosine(torch.tensor(37))) == float(cosine(37))


def test_schedule_count_continues_from_restored_state():
    params, loss_fn = _problem()
    transform = optim.adam(SCHEDULE)
    state = transform.init(params)
    for _ in range(3):
        updates, state = transform.update(torch.func.grad(loss_fn)(params), state, params)
        params = optim.apply_updates(params, updates)
    assert int(state[1]["count"]) == 3 and int(state[0]["count"]) == 3


def _newton_schulz_by_hand(g, steps=5):
    """Muon's iteration written out plainly, one matrix at a time."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.reshape(g.shape[0], -1)
    rows, cols = x.shape
    x = x / (x.norm() + 1e-7)
    x = x.T if rows > cols else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if rows > cols else x
    return (x * max(1.0, rows / cols) ** 0.5).reshape(g.shape)


def test_orthogonalize_matches_plain_loop_and_leaves_others_alone():
    gen = torch.Generator().manual_seed(1)
    grads = {"conv": torch.randn(8, 4, 3, 3, generator=gen), "stem": torch.randn(64, 3, 3, 3, generator=gen),
             "head": torch.randn(10, 32, generator=gen), "bias": torch.randn(8, generator=gen)}
    mask = lambda p: {"conv": True, "stem": True, "head": False, "bias": True}
    ours, _ = optim.orthogonalize(mask=mask).update(grads, {}, grads)
    for name in ("conv", "stem"):
        torch.testing.assert_close(ours[name], _newton_schulz_by_hand(grads[name]), rtol=1e-4, atol=1e-5)
    assert ours["head"] is grads["head"] and ours["bias"] is grads["bias"]  # masked out; 1-D
    default, _ = optim.orthogonalize().update(grads, {}, None)
    torch.testing.assert_close(default["head"], _newton_schulz_by_hand(grads["head"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(32, 64), (64, 16), (16, 16)])
def test_orthogonalize_approximates_svd_polar_factor(shape):
    rows, cols = shape
    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(rows, min(shape), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, min(shape), generator=gen))
    g = u @ torch.diag(torch.linspace(1.0, 2.0, min(shape))) @ v.T  # condition number 2
    ours, _ = optim.orthogonalize().update({"w": g}, {}, None)
    x = ours["w"] / max(1.0, rows / cols) ** 0.5
    # x = U D V^T with the SVD's own U and V, D diagonal and near 1: the direction of U V^T.
    d = u.T @ x @ v
    torch.testing.assert_close(u @ d @ v.T, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(d, torch.diag(d.diagonal()), rtol=0, atol=1e-5)
    assert 0.67 < d.diagonal().min() and d.diagonal().max() < 1.2
    assert torch.nn.functional.cosine_similarity(x.flatten(), (u @ v.T).flatten(), dim=0) > 0.97


def test_scale_leaves_by_hand():
    grads = {"bn_bias": torch.randn(4), "head": torch.randn(3, 4), "conv": torch.randn(2, 2)}
    factors = lambda p: {"bn_bias": 64.0, "head": 0.5, "conv": 1.0}
    ours, state = optim.scale_leaves(factors).update(grads, {}, grads)
    assert state == {}
    for name, factor in factors(grads).items():
        assert torch.equal(ours[name], grads[name] * factor)


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
                        optim.scale_leaves(lambda p: {"conv": 1.0, "bias": 64.0, "head": 0.5}),
                        optim.scale_by_learning_rate(optim.warmup_cosine(0.1, 2, total)),
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
