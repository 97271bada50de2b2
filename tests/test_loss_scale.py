"""Dynamic loss scaling against torch.amp.GradScaler step by step, through a real model's gradients, under vmap,
traced as one graph, and without touching its inputs."""

import math
from functools import partial

import pytest
import torch

from fnclass.core import loss_scale, tree
from fnclass.training.step import all_finite

FLOAT32_EPS = torch.finfo(torch.float32).eps


def _flags(steps: int, p_overflow: float, seed: int) -> list[bool]:
    """A fixed random sequence of step outcomes: True where the step's gradients were finite."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, generator=gen) >= p_overflow).tolist()


def _grad_scaler_trajectory(flags, *, init_scale, init_tracker, growth_factor, backoff_factor, growth_interval):
    """GradScaler's ``(scale, growth_tracker)`` after each step, through its public API on the CPU."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_factor=growth_factor,
                                  backoff_factor=backoff_factor, growth_interval=growth_interval)
    scaler.load_state_dict(scaler.state_dict() | {"_growth_tracker": init_tracker})  # as a resumed run
    trajectory = []
    for finite in flags:
        opt.zero_grad()
        scaler.scale((param * (1.0 if finite else math.inf)).sum()).backward()
        scaler.step(opt)  # unscales, checks for inf and NaN, skips the SGD step when it finds one
        scaler.update()
        state = scaler.state_dict()
        trajectory.append((state["scale"], state["_growth_tracker"]))
    return trajectory


@pytest.mark.parametrize(("init_scale", "init_tracker", "growth_factor", "backoff_factor", "growth_interval",
                          "p_overflow"), [
    (2.0**16, 0, 2.0, 0.5, 7, 0.1),  # GradScaler's factors, a short interval so that the scale grows often
    (1000.0, 0, 3.0, 0.3, 5, 0.15),  # factors that are not powers of two: the products' rounding must match too
    (2.0**120, 0, 2.0, 0.5, 3, 0.05),  # grows into float32's ceiling, where a growth that would overflow is refused
    (2.0**16, 7, 2.0, 0.5, 4, 0.1),  # resumed past a lowered interval: no growth until an overflow restarts it
])
def test_update_follows_grad_scaler_step_by_step(init_scale, init_tracker, growth_factor, backoff_factor,
                                                 growth_interval, p_overflow):
    flags = _flags(200, p_overflow, seed=growth_interval + init_tracker)
    expected = _grad_scaler_trajectory(flags, init_scale=init_scale, init_tracker=init_tracker,
                                       growth_factor=growth_factor, backoff_factor=backoff_factor,
                                       growth_interval=growth_interval)
    state = loss_scale.init(init_scale) | {"growth_tracker": torch.tensor(init_tracker)}
    for i, (finite, (scale, tracker)) in enumerate(zip(flags, expected)):
        state = loss_scale.update(state, torch.tensor(finite), growth_factor=growth_factor,
                                  backoff_factor=backoff_factor, growth_interval=growth_interval)
        # Exact by construction: both round the same float64 product to float32 once per step.
        assert (state["scale"].item(), state["growth_tracker"].item()) == (scale, tracker), f"step {i}"
    # The sequence must exercise each rule: a finite step that restarts the tracker is a growth, refused when
    # the scale stays (float32's ceiling).
    scales = [init_scale] + [scale for scale, _ in expected]
    restarts = [(earlier, later) for finite, earlier, (later, tracker) in zip(flags, scales, expected)
                if finite and tracker == 0]
    assert sum(later > earlier for earlier, later in restarts) >= 3 and not all(flags)
    if init_scale == 2.0**120:
        assert any(earlier == later == 2.0**127 for earlier, later in restarts)
    if init_tracker > growth_interval:  # GradScaler grows only when the count equals the interval
        assert flags[:2] == [True, True] and expected[1] == (init_scale, init_tracker + 2)


def _two_layer_problem():
    """A pure two-layer tanh regression: its parameters and ``loss_fn(params)``."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=gen), 10.0 * torch.randn(64, 3, generator=gen)
    params = {"w1": torch.randn(16, 8, generator=gen) * 0.3, "b1": torch.zeros(16),
              "w2": torch.randn(3, 16, generator=gen) * 0.3}

    def loss_fn(p):
        return ((torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T - y) ** 2).mean()
    return params, loss_fn


def _unscaled_grads(params, loss_fn, state):
    """Differentiate the scaled loss, then unscale: what a step does."""
    return loss_scale.unscale(torch.func.grad(lambda p: loss_scale.scale_loss(loss_fn(p), state))(params), state)


def test_unscaled_gradients_are_the_losss_gradients():
    params, loss_fn = _two_layer_problem()
    reference = torch.func.grad(loss_fn)(params)
    # A power of two scales every rounded product and sum exactly (far from overflow and underflow), so the
    # unscaled gradients are the plain ones bit for bit; this is GradScaler's case.
    exact = _unscaled_grads(params, loss_fn, loss_scale.init(2.0**16))
    for name in reference:
        assert torch.equal(exact[name], reference[name]), name
    # Any other scale changes every rounding along the backward pass: about eps per operation, and the longest
    # reduction (the batch, 64) adds up 64 of them, relative to the gradient's size.
    inexact = _unscaled_grads(params, loss_fn, loss_scale.init(1000.0))
    for name in reference:
        tolerance = 4 * 64 * FLOAT32_EPS * reference[name].abs().max()
        torch.testing.assert_close(inexact[name], reference[name], rtol=0.0, atol=tolerance.item())


def test_an_overflowing_scale_gives_non_finite_gradients_and_backs_off():
    params, loss_fn = _two_layer_problem()
    state = loss_scale.init(torch.finfo(torch.float32).max)  # every gradient above 1 in size overflows
    grads = _unscaled_grads(params, loss_fn, state)
    assert not all_finite(loss_fn(params), grads)
    assert not all(torch.isfinite(g).all() for g in grads.values())
    assert any(torch.isinf(g).any() or torch.isnan(g).any() for g in grads.values())
    after = loss_scale.update(state, all_finite(loss_fn(params), grads))
    assert after["scale"].item() == torch.finfo(torch.float32).max / 2  # exact: halving a float32 is exact


def test_update_under_vmap_matches_each_member_alone():
    # Two members: the first at the end of its growth interval and finite (grows), the second overflowing.
    states = [{"scale": torch.tensor(1024.0), "growth_tracker": torch.tensor(4)},
              {"scale": torch.tensor(2.0**16), "growth_tracker": torch.tensor(2)}]
    finite = [torch.tensor(True), torch.tensor(False)]
    update = partial(loss_scale.update, growth_interval=5)
    stacked = torch.func.vmap(update)(tree.tree_stack(states), torch.stack(finite))
    alone = [update(s, f) for s, f in zip(states, finite)]
    assert tree.tree_allclose(stacked, tree.tree_stack(alone), rtol=0.0, atol=0.0)  # exact: same operations
    assert stacked["scale"].tolist() == [2048.0, 32768.0] and stacked["growth_tracker"].tolist() == [0, 0]

    params, loss_fn = _two_layer_problem()
    grads = [torch.func.grad(loss_fn)(params), tree.tree_map(lambda g: -3.0 * g, torch.func.grad(loss_fn)(params))]
    unscaled = torch.func.vmap(loss_scale.unscale)(tree.tree_stack(grads), tree.tree_stack(states))
    one_by_one = tree.tree_stack([loss_scale.unscale(g, s) for g, s in zip(grads, states)])
    assert tree.tree_allclose(unscaled, one_by_one, rtol=0.0, atol=0.0)  # exact: the same products


def test_update_and_unscale_trace_as_one_graph():
    def step(grads, state):
        grads = loss_scale.unscale(grads, state)
        return grads, loss_scale.update(state, all_finite(torch.zeros(()), grads))

    params, loss_fn = _two_layer_problem()
    explanation = torch._dynamo.explain(step)(torch.func.grad(loss_fn)(params), loss_scale.init())
    # No .item() and no Python branch on a tensor value: nothing waits for the host inside a compiled step.
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_init_gives_the_checkpointed_state():
    state = loss_scale.init()
    assert list(state) == ["scale", "growth_tracker"]  # checkpoints store them under these paths
    assert state["scale"].dtype == torch.float32 and state["scale"].shape == () and state["scale"].item() == 2.0**16
    assert state["growth_tracker"].dtype == torch.int64 and state["growth_tracker"].shape == ()
    assert state["growth_tracker"].item() == 0
    with pytest.raises(ValueError, match="initial_scale"):
        loss_scale.init(0.0)


@pytest.mark.parametrize(("tracker", "finite"), [(0, True), (4, True), (3, False)])  # count, grow, back off
def test_no_input_is_modified_or_shared(tracker, finite):
    params, loss_fn = _two_layer_problem()
    grads = torch.func.grad(loss_fn)(params)
    state = {"scale": torch.tensor(1024.0), "growth_tracker": torch.tensor(tracker)}
    loss, flag = loss_fn(params), torch.tensor(finite)
    before = tree.tree_map(torch.clone, (grads, state, loss, flag))
    outputs = (loss_scale.scale_loss(loss, state), loss_scale.unscale(grads, state),
               loss_scale.update(state, flag, growth_interval=5))
    assert tree.tree_allclose((grads, state, loss, flag), before, rtol=0.0, atol=0.0)
    inputs = {t.data_ptr() for t in tree.tree_leaves((grads, state, loss, flag))}
    assert not inputs & {t.data_ptr() for t in tree.tree_leaves(outputs)}  # no output aliases an input
