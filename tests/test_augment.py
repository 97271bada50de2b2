"""Batched, keyed augmentation against naive per-example loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from fnclass.config import DataConfig
from fnclass.core import augment, random


def test_random_crop_matches_a_naive_loop():
    images = torch.randn(16, 3, 8, 8)
    key, padding = random.key(0), 2
    out = augment.random_crop(key, images, padding, mode="reflect")
    shifts = random.randint(key, (2, 16), 0, 2 * padding + 1)
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    for i in range(16):
        dy, dx = int(shifts[0, i]), int(shifts[1, i])
        torch.testing.assert_close(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])
    assert len({tuple(s) for s in shifts.T.tolist()}) > 5, "shifts should vary across examples"


def test_zero_padding_fills_zeros():
    images = torch.ones(64, 1, 4, 4)
    out = augment.random_crop(random.key(1), images, 1, mode="zeros")
    assert (out == 0).any() and set(out.unique().tolist()) <= {0.0, 1.0}


def test_flip_is_per_example_and_keyed():
    images = torch.arange(2 * 1 * 1 * 3, dtype=torch.float32).reshape(2, 1, 1, 3).repeat(50, 1, 1, 1)
    out = augment.random_flip(random.key(2), images)
    flipped = (out != images).flatten(1).any(1)
    assert 0.3 < flipped.float().mean() < 0.7
    torch.testing.assert_close(out[flipped], images[flipped].flip(3))
    assert torch.equal(out, augment.random_flip(random.key(2), images))


def test_cutout_zeroes_at_most_a_square():
    images = torch.ones(32, 3, 16, 16)
    out = augment.cutout(random.key(3), images, 6)
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert zeros.max() == 36 and zeros.min() >= 0 and (zeros > 0).all()
    assert torch.equal(out[:, 0], out[:, 2]), "all channels share the mask"


def test_augment_follows_config_and_key():
    images = torch.randn(8, 3, 32, 32)
    cfg = DataConfig(crop_padding=0, flip=False, cutout=0)
    assert torch.equal(augment.augment(random.key(0), images, cfg), images)
    cfg = DataConfig(crop_padding=4, flip=True, cutout=8)
    a = augment.augment(random.key(0), images, cfg)
    assert torch.equal(a, augment.augment(random.key(0), images, cfg))
    assert not torch.equal(a, augment.augment(random.key(1), images, cfg))


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    key, n = random.key(4), 1000
    first = random.bernoulli(key, 0.5, (n,))
    indices = torch.randperm(n)
    epochs = [augment.alternating_flips(first, indices, epoch) for epoch in range(4)]
    assert 0.45 < epochs[0].float().mean() < 0.55  # a random half first
    for epoch in (1, 2, 3):
        assert torch.equal(epochs[epoch], epochs[0] ^ bool(epoch % 2))
    # Keyed by image, not by position in the batch: the same image gets the same decision in any order.
    order = torch.randperm(n)
    assert torch.equal(augment.alternating_flips(first, indices[order], 0), epochs[0][order])
    images = torch.randn(6, 3, 4, 4)
    flip = torch.tensor([True, False, True, False, False, True])
    out = augment.augment(key, images, DataConfig(crop_padding=0), flip=flip)
    torch.testing.assert_close(out, torch.stack([im.flip(2) if f else im for im, f in zip(images, flip)]))


def _naive_mix(key, images, labels, num_classes, *, mixup_alpha=0.0, cutmix_alpha=0.0, mix_prob=1.0,
               switch_prob=0.5):
    """timm's batch mode one example and one pixel at a time in Python floats, with the draws mix_batch makes.

    Returns the mixed images, the targets and which of "none", "mixup" and "cutmix" was done.
    """
    k_apply, k_switch, k_mixup, k_cutmix, k_box = random.split(key, 5)
    n, channels, h, w = images.shape
    x, out = images.tolist(), images.tolist()
    lam, kind = 1.0, "none"
    if random.bernoulli(k_apply, mix_prob, ()):
        both = mixup_alpha > 0 and cutmix_alpha > 0
        kind = "cutmix" if cutmix_alpha > 0 and (not both or random.bernoulli(k_switch, switch_prob, ())) else "mixup"
    if kind == "cutmix":
        lam = random.beta(k_cutmix, cutmix_alpha, cutmix_alpha, (), dtype=torch.float64).item()
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        k_row, k_col = random.split(k_box)
        row, col = random.randint(k_row, (), 0, h).item(), random.randint(k_col, (), 0, w).item()
        top, bottom = min(max(row - cut_h // 2, 0), h), min(max(row + cut_h // 2, 0), h)
        left, right = min(max(col - cut_w // 2, 0), w), min(max(col + cut_w // 2, 0), w)
        for i in range(n):
            for c in range(channels):
                for y in range(top, bottom):
                    for z in range(left, right):
                        out[i][c][y][z] = x[n - 1 - i][c][y][z]
        lam = 1 - (bottom - top) * (right - left) / (h * w)
    if kind == "mixup":
        lam = random.beta(k_mixup, mixup_alpha, mixup_alpha, ()).item()
        for i in range(n):
            for c in range(channels):
                for y in range(h):
                    for z in range(w):
                        out[i][c][y][z] = lam * x[i][c][y][z] + (1 - lam) * x[n - 1 - i][c][y][z]
    targets = [[0.0] * num_classes for _ in range(n)]
    for i in range(n):
        targets[i][labels[i]] += lam
        targets[i][labels[n - 1 - i]] += 1 - lam
    return torch.tensor(out), torch.tensor(targets), kind


@pytest.mark.parametrize("options, kinds", [
    (dict(mixup_alpha=1.0), {"mixup"}),
    (dict(cutmix_alpha=1.0), {"cutmix"}),
    (dict(mixup_alpha=0.4, cutmix_alpha=1.0), {"mixup", "cutmix"}),
    (dict(mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.5, switch_prob=0.3), {"none", "mixup", "cutmix"}),
])
def test_mix_batch_matches_a_naive_loop(options, kinds):
    images = torch.randn(4, 2, 6, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    before = images.clone(), labels.clone()
    seen = set()
    for seed in range(12):
        key = random.key(seed)
        out, targets = augment.mix_batch(key, images, labels, num_classes=3, **options)
        expected, expected_targets, kind = _naive_mix(key, images, labels.tolist(), 3, **options)
        seen.add(kind)
        if kind == "mixup":
            # Two float32 products and a sum against Python's float64: a few float32 steps at the images' scale.
            torch.testing.assert_close(out, expected, rtol=0.0,
                                       atol=4 * torch.finfo(torch.float32).eps * images.abs().max().item())
        else:
            assert torch.equal(out, expected), "CutMix copies pixels and no mixing leaves them: exact"
        assert targets.dtype == torch.float32
        torch.testing.assert_close(targets, expected_targets, rtol=0.0, atol=2 * torch.finfo(torch.float32).eps)
        torch.testing.assert_close(targets.sum(1), torch.ones(4), rtol=0.0, atol=torch.finfo(torch.float32).eps)
        again = augment.mix_batch(key, images, labels, num_classes=3, **options)
        assert torch.equal(again[0], out) and torch.equal(again[1], targets)
        assert torch.equal(images, before[0]) and torch.equal(labels, before[1]), "the inputs are not modified"
    assert seen == kinds


def test_cutmix_lam_is_the_area_outside_the_clipped_box():
    h = w = 8
    images = torch.arange(2 * h * w, dtype=torch.float32).reshape(2, 1, h, w)  # no pixel equals its partner's
    clipped = 0
    for seed in range(40):
        key = random.key(seed)
        out, targets = augment.mix_batch(key, images, torch.tensor([0, 1]), num_classes=2, cutmix_alpha=1.0)
        pasted = out[0, 0] != images[0, 0]
        rows, cols = pasted.any(1).sum().item(), pasted.any(0).sum().item()
        assert pasted.sum().item() == rows * cols, "the pasted pixels form a rectangle"
        assert targets[0, 0].item() == pytest.approx(1 - rows * cols / (h * w), abs=1e-6)
        drawn = random.beta(random.split(key, 5)[3], 1.0, 1.0, (), dtype=torch.float64).item()
        half = int(h * math.sqrt(1 - drawn)) // 2
        clipped += rows * cols < (2 * half) ** 2
    assert clipped >= 5, "some boxes should reach over the border"


def test_mix_prob_zero_or_no_alpha_leaves_the_batch_alone():
    images, labels = torch.randn(6, 3, 5, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    one_hot = F.one_hot(labels, 5).float()
    for seed in range(10):
        for options in (dict(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.0), {}):
            out, targets = augment.mix_batch(random.key(seed), images, labels, num_classes=5, **options)
            assert torch.equal(out, images) and torch.equal(targets, one_hot)
        out, _ = augment.mix_batch(random.key(seed), images, labels, num_classes=5, mixup_alpha=1.0, mix_prob=1.0)
        assert not torch.equal(out, images)


def test_switch_frequency_and_mean_lam_over_many_keys():
    images, labels = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1])
    keys = random.split(random.key(20), 2000)

    def mix(key):
        return augment.mix_batch(key, images, labels, num_classes=2, mixup_alpha=0.4, cutmix_alpha=1.0,
                                 switch_prob=0.3)

    # vmap draws the 2000 batches at once (as it would one batch per member of an ensemble), identically.
    out, targets = torch.func.vmap(mix)(keys)
    for i in (0, 1, 1999):
        assert torch.equal(out[i], mix(keys[i])[0]) and torch.equal(targets[i], mix(keys[i])[1])
    # CutMix copies pixels; mixup blends them into values in neither image.
    cutmix = ((out == images) | (out == images.flip(0))).flatten(1).all(1)
    assert abs(cutmix.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(keys))
    # Beta(0.4, 0.4) is symmetric about 1/2, with variance 1/4 / (2 x 0.4 + 1).
    lam = targets[~cutmix, 0, 0]
    assert abs(lam.mean().item() - 0.5) < 4 * math.sqrt(0.25 / 1.8 / len(lam))
    torch.testing.assert_close(targets.sum(-1), torch.ones(len(keys), 2), rtol=0.0,
                               atol=torch.finfo(torch.float32).eps)
