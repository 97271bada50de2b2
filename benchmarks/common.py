"""What several benchmarks share: a fixed random batch, the name of the device they ran on, and how results are
published (a table printed, the numbers as JSON)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def random_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped random images and labels on ``device`` (fixed seed, so every variant sees the same)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    return images.to(device), labels.to(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (with the thread count torch uses)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def publish(results: dict, table: str, json_path: str | None) -> None:
    """Print a benchmark's rendered ``table`` and, when asked, write ``results`` to ``json_path``."""
    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_path}")
