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


def _open_unit(key: torch.Tensor, shape) -> torch.Tensor:
    """Float64 uniforms strictly inside (0, 1): 24 random bits and half a step, so their logarithm is finite."""
    return ((bits(key, shape) >> 8).to(torch.float64) + 0.5) * (1.0 / (1 << 24))


def normal(key: torch.Tensor, shape, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal floats of ``shape`` (inverse-CDF of a uniform strictly inside (0, 1))."""
    return (torch.erfinv(2.0 * _open_unit(key, shape) - 1.0) * math.sqrt(2.0)).to(dtype)


def normal64(key: torch.Tensor, shape) -> torch.Tensor:
    """Float64 standard normals of ``shape`` from 53-bit uniforms: the tails reach 8.2 standard deviations
    (:func:`normal`'s 24-bit ones stop at 5.4), as the Gaussian noise of DP-SGD should."""
    k_high, k_low = split(key)
    high, low = bits(k_high, shape) >> 5, bits(k_low, shape) >> 6  # 27 + 26 bits: k in [0, 2**53)
    # 2u - 1 for the uniform u = (k + 1/2) / 2**53, formed exactly: the odd integer 2k + 1 - 2**53 has at most 53
    # bits. (Rounding (k + 1/2) itself to float64 made u = 1, an infinite normal, at k = 2**53 - 1.)
    centred = (2 * (high * (1 << 26) + low) + 1 - (1 << 53)).to(torch.float64) * 2.0 ** -53
    return torch.erfinv(centred) * math.sqrt(2.0)


# Marsaglia-Tsang accepts a candidate with probability >= 0.9516 (the least, at shape 1), so all 16 of one output
# are rejected with probability below 0.0484**16 < 1e-21.
_GAMMA_CANDIDATES = 16


def _log_gamma(key: torch.Tensor, alpha, shape) -> torch.Tensor:
    """Float64 logarithms of Gamma(alpha, 1) draws of ``shape``: Marsaglia-Tsang with a fixed number of candidates."""
    shape = tuple(shape)
    k_normal, k_uniform, k_boost = split(key, 3)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(device=key.device, dtype=torch.float64)
        boost = (alpha < 1.0).to(torch.float64)
    else:
        boost = float(alpha < 1.0)
    # Below shape 1, Gamma(alpha) = Gamma(alpha + 1) * U ** (1 / alpha); the power is applied in log space, where
    # it cannot underflow (U ** 20 already does in float32 at alpha = 0.05).
    d = alpha + boost - 1.0 / 3.0
    c = (9.0 * d) ** -0.5
    z = normal(k_normal, (_GAMMA_CANDIDATES, *shape), dtype=torch.float64)
    log_u = torch.log(_open_unit(k_uniform, (_GAMMA_CANDIDATES, *shape)))
    # Clamped so that a candidate with 1 + c z <= 0 (always rejected, but possibly the fallback) stays finite.
    v = ((1.0 + c * z) ** 3).clamp_min(torch.finfo(torch.float64).tiny)
    accept = (1.0 + c * z > 0) & (log_u < 0.5 * z * z + d - d * v + d * torch.log(v))
    # The first accepted candidate: the number of rejections before it, or the last one if all are rejected.
    first = (accept.cumsum(0) == 0).sum(0, keepdim=True).clamp_max(_GAMMA_CANDIDATES - 1)
    log_x = torch.gather(torch.log(d * v), 0, first).squeeze(0)
    return log_x + boost * torch.log(_open_unit(k_boost, shape)) / alpha


def gamma(key: torch.Tensor, alpha, shape, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gamma(alpha, 1) floats of ``shape`` (Marsaglia & Tsang, 2000), a pure function of ``key``.

    Each output draws a fixed 16 candidates at once and keeps the first one accepted, so the shapes are static
    and nothing waits for the device. Should all 16 be rejected, the last candidate is kept, a value slightly off
    the distribution; each is accepted with probability at least 0.95, so this happens to fewer than 1 output
    in 10**21 (at a billion draws a second, once in 30,000 years). Below ``alpha`` = 1 a draw of shape
    ``alpha + 1`` is scaled by ``U ** (1 / alpha)``. The arithmetic is in float64 and in log space, so small
    shapes give no infinities or NaNs; values under the smallest normal ``dtype`` number (in float32 about 1% of
    the draws at ``alpha`` = 0.05) lose precision or round to 0.

    Args:
      key: the key.
      alpha: the shape parameter, > 0: a Python float, or a float tensor broadcastable to ``shape`` (e.g. one
        value per member of a vmapped sweep).
      shape: the output shape.
      dtype: the output dtype.

    Returns:
      A tensor of ``shape`` and ``dtype`` on ``key``'s device.
    """
    return torch.exp(_log_gamma(key, alpha, shape)).to(dtype)


def beta(key: torch.Tensor, a, b, shape, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Beta(a, b) floats of ``shape`` in [0, 1], as ``X / (X + Y)`` with X ~ Gamma(a), Y ~ Gamma(b).

    The ratio is taken in log space, ``sigmoid(log X - log Y)``, so tiny shapes (both draws far below the
    float64 range) still give a finite value. See :func:`gamma` for how the draws are made.

    Args:
      key: the key.
      a: the first shape parameter, > 0 (a Python float or a tensor broadcastable to ``shape``).
      b: the second shape parameter, > 0 (likewise).
      shape: the output shape.
      dtype: the output dtype.

    Returns:
      A tensor of ``shape`` and ``dtype`` on ``key``'s device.
    """
    k_a, k_b = split(key)
    return torch.sigmoid(_log_gamma(k_a, a, shape) - _log_gamma(k_b, b, shape)).to(dtype)


def bernoulli(key: torch.Tensor, p: float, shape) -> torch.Tensor:
    """Booleans of ``shape`` that are True with probability ``p``."""
    return uniform(key, shape) < p


def randint(key: torch.Tensor, shape, low: int, high: int) -> torch.Tensor:
    """Integers in ``[low, high)`` of ``shape`` (int64; modulo bias below 2**-20 for ranges up to 4096)."""
    return low + bits(key, shape) % (high - low)


def permutation(key: torch.Tensor, n: int) -> torch.Tensor:
    """A random permutation of ``range(n)`` (argsort of random words, ties broken by position)."""
    return torch.argsort(bits(key, (n,)) * n + torch.arange(n, device=key.device))
