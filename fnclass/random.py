"""Explicit, JAX-style random keys built from tensor ops.

A key is an int64 tensor of shape ``(2,)`` holding two 32-bit words. Every random number is a pure
function of a key and a position: a counter is hashed together with the key words, so the same key
gives bit-identical numbers in any process, on any device, eager or under ``torch.compile``, and no
global generator is touched. The hash keeps every intermediate below 2**63 (32-bit values times
31-bit odd multipliers), so int64 arithmetic never overflows and CPU and GPU agree exactly.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31 so that a 32-bit value times one fits in a signed int64.
_MUL_A = 0x7FEB352D
_MUL_B = 0x5BD1E995
_GOLDEN = 0x9E3779B9


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash of each element (values in [0, 2**32) held in int64)."""
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    return x ^ (x >> 15)


def key(seed: int) -> torch.Tensor:
    """Make a key from an integer seed (any Python int; only its low 64 bits are used).

    Args:
      seed: the seed.

    Returns:
      An int64 tensor of shape (2,) on the CPU.
    """
    seed &= (1 << 64) - 1
    words = torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64)
    return _mix(_mix(words ^ torch.tensor([0, _GOLDEN])) + torch.tensor([1, 2]) & _MASK32)


def bits(key: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Uniform 32-bit random words of ``shape`` (int64 values in [0, 2**32)) on ``key``'s device.

    Args:
      key: a key from :func:`key`, :func:`split` or :func:`fold_in`.
      shape: the output shape.

    Returns:
      An int64 tensor of ``shape``.
    """
    n = math.prod(shape)
    counter = torch.arange(n, device=key.device, dtype=torch.int64)
    low, high = counter & _MASK32, counter >> 32
    x = _mix((low ^ key[0]) + _GOLDEN & _MASK32)
    x = _mix(x ^ key[1] ^ _mix(high + key[0] & _MASK32))
    return _mix(x + key[1] & _MASK32).reshape(shape)


def split(key: torch.Tensor, num: int = 2) -> torch.Tensor:
    """Split a key into ``num`` independent keys, returned stacked as a (num, 2) tensor.

    Args:
      key: the key to split; it should not be used again afterwards.
      num: how many keys to make.

    Returns:
      An int64 tensor of shape (num, 2); unpack it (``k1, k2 = split(key)``) or index it.
    """
    return bits(fold_in(key, 0x5EED), (num, 2))


def fold_in(key: torch.Tensor, data: int | torch.Tensor) -> torch.Tensor:
    """Derive a new key from ``key`` and an integer (a step number, an example index, ...).

    Args:
      key: the parent key.
      data: a Python int or an integer tensor of shape ().

    Returns:
      A new key, independent of ``key`` for practical purposes.
    """
    if isinstance(data, torch.Tensor):
        data = data.to(device=key.device, dtype=torch.int64)
    # Python ints enter as kernel scalars and the lane offsets are made on the key's device: no host-to-
    # device copy, which on CUDA would make the host wait for the GPU at every step.
    lanes = torch.arange(2, device=key.device, dtype=torch.int64) * 2 + 3
    return _mix(_mix(key ^ (data & _MASK32)) + lanes & _MASK32)


def uniform(key: torch.Tensor, shape, *, low: float = 0.0, high: float = 1.0,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform floats in ``[low, high)`` of ``shape`` (24 random bits each)."""
    unit = (bits(key, shape) >> 8).to(torch.float32) * (1.0 / (1 << 24))
    return (low + (high - low) * unit).to(dtype)


def normal(key: torch.Tensor, shape, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal floats of ``shape`` (inverse-CDF of a uniform strictly inside (0, 1))."""
    unit = ((bits(key, shape) >> 8).to(torch.float64) + 0.5) * (1.0 / (1 << 24))
    return (torch.erfinv(2.0 * unit - 1.0) * math.sqrt(2.0)).to(dtype)


def bernoulli(key: torch.Tensor, p: float, shape) -> torch.Tensor:
    """Booleans of ``shape`` that are True with probability ``p``."""
    return uniform(key, shape) < p


def randint(key: torch.Tensor, shape, low: int, high: int) -> torch.Tensor:
    """Integers in ``[low, high)`` of ``shape`` (int64; modulo bias below 2**-20 for ranges up to 4096)."""
    return low + bits(key, shape) % (high - low)


def permutation(key: torch.Tensor, n: int) -> torch.Tensor:
    """A random permutation of ``range(n)`` (argsort of random words, ties broken by position)."""
    return torch.argsort(bits(key, (n,)) * n + torch.arange(n, device=key.device))
