"""Learning-rate schedules: functions of the step count (an int or a 0-d tensor) returning the value for that step.

They are pure and trace into a compiled step (no data-dependent indexing). Optax keeps its schedules apart from
its transforms; so do we. ``constant_schedule`` and ``cosine_decay_schedule`` have Optax's names and signatures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Schedule = Callable[[Any], Any]


def constant_schedule(value: float) -> Schedule:
    """The same value at every step."""
    return lambda count: value


def piecewise_linear(steps: list[float], values: list[float]) -> Schedule:
    """Linear interpolation between ``(steps[i], values[i])`` points, constant outside them.

    Args:
      steps: increasing step numbers.
      values: the value at each of those steps.

    Returns:
      A schedule returning a float32 tensor.
    """
    points = list(zip(steps, values))

    def schedule(count):
        # A sum of clamped ramps, one per segment: no data-dependent indexing, so it traces into the step's graph.
        c = torch.as_tensor(count).to(torch.float64)
        value = torch.full_like(c, float(values[0]))
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            rise = ((c - x0) / (x1 - x0)).clamp(0.0, 1.0) if x1 > x0 else (c >= x0).to(c.dtype)
            value = value + (y1 - y0) * rise
        return value.to(torch.float32)

    return schedule


def linear_warmup(peak: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """Rise linearly from ``init_value`` to ``peak`` over ``warmup_steps``, then stay at ``peak``."""
    return piecewise_linear([0, max(warmup_steps, 1)], [init_value, peak])


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """Half a cosine from ``init_value`` down to ``alpha * init_value`` over ``decay_steps``, then constant."""
    def schedule(count):
        c = torch.as_tensor(count).to(torch.float64).clamp(0, decay_steps)
        cosine = 0.5 * (1.0 + torch.cos(math.pi * c / decay_steps))
        return (init_value * ((1.0 - alpha) * cosine + alpha)).to(torch.float32)
    return schedule


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, init_value: float = 0.0,
                  end_value: float = 0.0) -> Schedule:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``end_value`` at ``total_steps``.

    Args:
      peak: the value reached at the end of warm-up.
      warmup_steps: steps of linear warm-up (0 for none).
      total_steps: the step at which the decay ends.
      init_value: the value at step 0.
      end_value: the value from ``total_steps`` on.

    Returns:
      A schedule returning a float32 tensor.
    """
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(count):
        c = torch.as_tensor(count).to(torch.float64)
        warm = init_value + (peak - init_value) * c / max(warmup_steps, 1)
        progress = ((c - warmup_steps) / decay_steps).clamp(0.0, 1.0)
        cool = end_value + (peak - end_value) * 0.5 * (1.0 + torch.cos(math.pi * progress))
        return torch.where(c < warmup_steps, warm, cool).to(torch.float32)

    return schedule


def one_cycle(peak: float, total_steps: int, pct_start: float = 0.25, div_factor: float = 25.0,
              final_div_factor: float = 1e4) -> Schedule:
    """The triangular one-cycle policy (Smith, 2018), as used by the fast CIFAR-10 trainers.

    Linear from ``peak / div_factor`` up to ``peak`` over the first ``pct_start`` of the run, then
    linear down to ``peak / (div_factor * final_div_factor)`` at ``total_steps``.
    """
    start = peak / div_factor
    return piecewise_linear([0, pct_start * total_steps, total_steps], [start, peak, start / final_div_factor])


cosine_decay_schedule = cosine_decay  # Optax's name, same arguments
