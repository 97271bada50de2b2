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
