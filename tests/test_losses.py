"""Losses against torch.nn.functional and against timm's smoothed mixup targets."""

import pytest
import torch
import torch.nn.functional as F

from fnclass.core import losses

CLASSES = 10
# Two ways of summing 10 float32 terms of size |log p| <= 30 (the logits are 3 x standard normal) may differ by
# about 10 x 30 x eps.
TOLERANCE = dict(rtol=0.0, atol=CLASSES * 30 * torch.finfo(torch.float32).eps)


def _batch(n: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, CLASSES, generator=generator)
    labels = torch.randint(CLASSES, (n,), generator=generator)
    soft = torch.softmax(torch.randn(n, CLASSES, generator=generator), dim=-1)
    return logits, labels, soft


def _timm_mixup_target(labels: torch.Tensor, lam: float, smoothing: float) -> torch.Tensor:
    """timm's ``mixup_target``, written out: smooth each one-hot row, then mix a row with its partner's."""
    off = smoothing / CLASSES
    smoothed = torch.full((len(labels), CLASSES), off)
    smoothed[torch.arange(len(labels)), labels] = 1.0 - smoothing + off
    return lam * smoothed + (1.0 - lam) * smoothed.flip(0)


def test_integer_labels_give_torchs_loss_exactly():
    logits, labels, _ = _batch()
    # The integer path is the mean of F.cross_entropy's per-example losses: bit-identical to that, equal to its own
    # mean reduction to rounding, and with F.cross_entropy's gradient bit for bit (so runs train identically).
    for smoothing in (0.0, 0.1):
        assert torch.equal(losses.cross_entropy(logits, labels, label_smoothing=smoothing),
                           F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none").mean())
        torch.testing.assert_close(losses.cross_entropy(logits, labels, label_smoothing=smoothing),
                                   F.cross_entropy(logits, labels, label_smoothing=smoothing), rtol=1e-6, atol=0)
        ours, theirs = (torch.func.grad(lambda z, f=f, s=smoothing: f(z, labels, label_smoothing=s))(logits)
                        for f in (losses.cross_entropy, F.cross_entropy))
        assert torch.equal(ours, theirs)
        assert torch.equal(losses.per_example_cross_entropy(logits, labels, label_smoothing=smoothing),
                           F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none"))
    torch.testing.assert_close(losses.cross_entropy(logits, labels, label_smoothing=torch.tensor(0.1)),
                               F.cross_entropy(logits, labels, label_smoothing=0.1), **TOLERANCE)


def test_one_hot_rows_give_the_integer_labels_loss():
    logits, labels, _ = _batch()
    one_hot = F.one_hot(labels, CLASSES).float()
    for smoothing in (0.0, 0.1, torch.tensor(0.1)):
        torch.testing.assert_close(losses.cross_entropy(logits, one_hot, label_smoothing=smoothing),
                                   losses.cross_entropy(logits, labels, label_smoothing=smoothing), **TOLERANCE)
    for smoothing in (0.0, 0.1):
        torch.testing.assert_close(losses.per_example_cross_entropy(logits, one_hot, label_smoothing=smoothing),
                                   losses.per_example_cross_entropy(logits, labels, label_smoothing=smoothing),
                                   **TOLERANCE)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_probability_rows_match_torchs_probability_targets(smoothing):
    logits, _, soft = _batch()
    torch.testing.assert_close(losses.cross_entropy(logits, soft, label_smoothing=smoothing),
                               F.cross_entropy(logits, soft, label_smoothing=smoothing), **TOLERANCE)
    torch.testing.assert_close(losses.per_example_cross_entropy(logits, soft, label_smoothing=smoothing),
                               F.cross_entropy(logits, soft, label_smoothing=smoothing, reduction="none"),
                               **TOLERANCE)


def test_tensor_smoothing_with_probability_rows_and_under_vmap():
    logits, _, soft = _batch()
    torch.testing.assert_close(losses.cross_entropy(logits, soft, label_smoothing=torch.tensor(0.1)),
                               F.cross_entropy(logits, soft, label_smoothing=0.1), **TOLERANCE)
    sweep = torch.tensor([0.0, 0.1, 0.3])
    swept = torch.func.vmap(lambda s: losses.cross_entropy(logits, soft, label_smoothing=s))(sweep)
    torch.testing.assert_close(swept, torch.stack([F.cross_entropy(logits, soft, label_smoothing=s)
                                                   for s in sweep.tolist()]), **TOLERANCE)


def test_smoothing_mixed_rows_equals_timms_mixup_target():
    logits, labels, _ = _batch()
    lam, smoothing = 0.7, 0.1
    one_hot = F.one_hot(labels, CLASSES).float()
    mixed = lam * one_hot + (1.0 - lam) * one_hot.flip(0)
    torch.testing.assert_close(losses.cross_entropy(logits, mixed, label_smoothing=smoothing),
                               losses.cross_entropy(logits, _timm_mixup_target(labels, lam, smoothing)), **TOLERANCE)


def test_float_targets_of_the_wrong_shape_are_refused():
    logits, labels, _ = _batch()
    with pytest.raises(ValueError, match="probability rows"):
        losses.cross_entropy(logits, labels.float())


def test_weighted_loss_is_the_weighted_mean_of_the_per_example_losses():
    """``weights`` (data.train_weights): the mean over all rows of weight x loss, against a loop; all ones is the
    unweighted loss bit for bit, for integer labels, a vmapped sweep's tensor smoothing and soft targets."""
    logits, labels, _ = _batch()
    weights = torch.rand(len(labels), generator=torch.Generator().manual_seed(3)) * 2
    for smoothing in (0.0, 0.1, torch.tensor(0.1)):
        expected = sum(float(w) * float(losses.cross_entropy(z[None], y[None], label_smoothing=smoothing))
                       for z, y, w in zip(logits, labels, weights)) / len(labels)
        got = losses.cross_entropy(logits, labels, label_smoothing=smoothing, weights=weights)
        assert float(got) == pytest.approx(expected, rel=1e-5)
        ones = losses.cross_entropy(logits, labels, label_smoothing=smoothing, weights=torch.ones(len(labels)))
        assert torch.equal(ones, losses.cross_entropy(logits, labels, label_smoothing=smoothing))
    soft = torch.softmax(torch.randn(logits.shape, generator=torch.Generator().manual_seed(4)), -1)
    assert torch.equal(losses.cross_entropy(logits, soft, weights=torch.ones(len(labels))),
                       losses.cross_entropy(logits, soft))
