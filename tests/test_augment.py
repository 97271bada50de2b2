"""Batched, keyed augmentation against naive per-example loops."""

import torch
import torch.nn.functional as F

from fnclass import augment, random
from fnclass.config import DataConfig


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
