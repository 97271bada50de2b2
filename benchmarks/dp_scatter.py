"""DP-SGD on frozen wavelet-scattering features (Tramer & Boneh 2021, "Differentially Private Learning Needs Better
Features"): a probe of issue 26's accuracy target, outside the library.

Run by hand from the repository root (needs ``pip install kymatio opacus``)::

    python -m benchmarks.dp_scatter --data-dir ../shared/data/cifar10 --epsilon 3 [--seed 0] [--json out.json]

What it does, as the paper's ScatterNet + CNN on CIFAR-10 (their published hyperparameters, not tuned here):
Kymatio's ``Scattering2D`` (J = 2, L = 8, fitted to nothing) turns each 32x32 RGB image into 243 channels of 8x8
once, before training; GroupNorm with 27 groups and no parameters normalises each example's features; the CNN head
is conv 3x3 (64) - tanh - max-pool - conv 3x3 (64) - tanh - linear, 187k parameters. DP-SGD: Poisson batches of
8,192 expected, clipping norm 0.1, SGD lr 4 with momentum 0.9, 60 epochs (366 steps), noise multiplier from
Opacus' RDP accountant for the target epsilon at delta 1e-5.

The per-example norms are ghost norms (Li et al. 2022) computed layer by layer from the layers' inputs and output
gradients; the first convolution's input is fixed per example, so its Gram matrix (64x64 over the 2,187-long
patches) is computed once, before training, and each step's norm of that layer costs a 64x64x64 product per
example. The clipped sum is one weight-gradient per layer with the output gradients reweighted. The first step's
norms are checked against ``vmap`` of ``grad`` on 64 examples (the run stops if they differ).

Not the library's DP path: the noise and Poisson samples come from ``torch.Generator`` seeded by ``--seed`` (a
benchmark, not a private release), and the model is not an ``fnclass`` model (no export, no checkpoint).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from benchmarks.common import device_name

GROUPS, WIDTH, DELTA = 27, 64, 1e-5


def scattering(images: np.ndarray, chunk: int = 500) -> torch.Tensor:
    """(N, 243, 8, 8) float32 scattering features of uint8 NHWC images (Kymatio, J = 2, L = 8)."""
    # The torch frontend's module directly: ``kymatio.torch`` imports scipy parts that scipy >= 1.15 removed.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    transform = ScatteringTorch2D(J=2, shape=(32, 32), L=8)
    out = torch.empty(len(images), 243, 8, 8)
    with torch.no_grad():
        for i in range(0, len(images), chunk):
            x = torch.from_numpy(images[i:i + chunk]).permute(0, 3, 1, 2).float().contiguous() / 255
            out[i:i + chunk] = transform(x).reshape(-1, 243, 8, 8)
    return out


def normalised(features: torch.Tensor, *, gram: bool, chunk: int = 2048):
    """Each example's features GroupNorm-ed (27 groups, no parameters), and with ``gram`` the Gram matrices (N, 64,
    64) of their 3x3 patches: what the first convolution's ghost norm needs."""
    out = torch.empty_like(features)
    grams = torch.empty(len(features), 64, 64) if gram else None
    for i in range(0, len(features), chunk):
        out[i:i + chunk] = F.group_norm(features[i:i + chunk], GROUPS, eps=1e-5)
        if gram:
            patches = F.unfold(out[i:i + chunk], 3, padding=1)  # (n, 2187, 64)
            grams[i:i + chunk] = torch.bmm(patches.transpose(1, 2), patches)
    return out, grams


def init(seed: int) -> dict:
    """The head's parameters, uniform in +-1/sqrt(fan_in) (PyTorch's default for conv and linear layers)."""
    generator = torch.Generator().manual_seed(seed)
    uniform = lambda shape, fan: (torch.rand(*shape, generator=generator) * 2 - 1) / math.sqrt(fan)
    return {"W1": uniform((WIDTH, 243, 3, 3), 243 * 9), "b1": uniform((WIDTH,), 243 * 9),
            "W2": uniform((WIDTH, WIDTH, 3, 3), WIDTH * 9), "b2": uniform((WIDTH,), WIDTH * 9),
            "Wf": uniform((10, WIDTH * 16), WIDTH * 16), "bf": uniform((10,), WIDTH * 16)}


def apply(p: dict, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(torch.tanh(F.conv2d(x, p["W1"], p["b1"], padding=1)), 2)
    return F.linear(torch.tanh(F.conv2d(x, p["W2"], p["b2"], padding=1)).flatten(1), p["Wf"], p["bf"])


def ghost(p: dict, x: torch.Tensor, y: torch.Tensor, gram: torch.Tensor):
    """Per-example squared gradient norms and what the clipped sum needs, from one forward and backward pass."""
    h1 = F.conv2d(x, p["W1"], p["b1"], padding=1).requires_grad_()
    p1 = F.max_pool2d(torch.tanh(h1), 2)
    h2 = F.conv2d(p1, p["W2"], p["b2"], padding=1)
    a2 = torch.tanh(h2).flatten(1)
    out = F.linear(a2, p["Wf"], p["bf"])
    g1, g2, go = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), [h1, h2, out])
    p1, a2, G1, G2 = p1.detach(), a2.detach(), g1.flatten(2), g2.flatten(2)
    patches2 = F.unfold(p1, 3, padding=1)
    square = go.pow(2).sum(1) * (a2.pow(2).sum(1) + 1)
    square += (torch.bmm(patches2.transpose(1, 2), patches2) * torch.bmm(G2.transpose(1, 2), G2)).sum((1, 2))
    square += G2.sum(2).pow(2).sum(1)
    square += (gram * torch.bmm(G1.transpose(1, 2), G1)).sum((1, 2)) + G1.sum(2).pow(2).sum(1)
    return square, (g1, p1, g2, a2, go)


def clipped_sum(p: dict, x, y, gram, max_grad_norm: float, chunk: int = 2048) -> dict:
    """sum_i clip(g_i) over the batch, chunk by chunk (Opacus' clip factor C / (|g_i| + 1e-6), at most 1)."""
    total = {name: torch.zeros_like(value) for name, value in p.items()}
    for s in range(0, len(x), chunk):
        square, (g1, p1, g2, a2, go) = ghost(p, x[s:s + chunk], y[s:s + chunk], gram[s:s + chunk])
        f = (max_grad_norm / (square.sqrt() + 1e-6)).clamp(max=1.0)
        g1, g2, go = g1 * f[:, None, None, None], g2 * f[:, None, None, None], go * f[:, None]
        total["W1"] += conv2d_weight(x[s:s + chunk], p["W1"].shape, g1, padding=1)
        total["b1"] += g1.sum((0, 2, 3))
        total["W2"] += conv2d_weight(p1, p["W2"].shape, g2, padding=1)
        total["b2"] += g2.sum((0, 2, 3))
        total["Wf"] += go.T @ a2
        total["bf"] += go.sum(0)
    return total


def check_norms(p: dict, x, y, gram) -> float:
    """The largest relative difference between the ghost norms and ``vmap`` of ``grad``'s, on these examples."""
    from torch.func import grad, vmap

    one = lambda params, xi, yi: F.cross_entropy(apply(params, xi[None]), yi[None])
    grads = vmap(grad(one), in_dims=(None, 0, 0))(p, x, y)
    expected = sum(g.flatten(1).pow(2).sum(1) for g in grads.values()).sqrt()
    return float(((ghost(p, x, y, gram)[0].sqrt() - expected).abs() / expected).max())


def accuracy(p: dict, x, y) -> float:
    with torch.no_grad():
        return sum(int((apply(p, x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum())
                   for i in range(0, len(x), 2000)) / len(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=60)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--max-grad-norm", type=float, default=0.1)
    parser.add_argument("--limit", type=int, help="the first LIMIT training and test images only (a quick check)")
    parser.add_argument("--json")
    args = parser.parse_args()
    from opacus.accountants.utils import get_noise_multiplier

    warnings.filterwarnings("ignore", category=UserWarning)  # the RDP accountant's "largest alpha" note

    whole = time.perf_counter()
    load = lambda name: np.load(f"{args.data_dir}/{name}.npy", allow_pickle=False)[:args.limit]
    train_x, test_x = scattering(load("train_images")), scattering(load("test_images"))
    train_y, test_y = torch.from_numpy(load("train_labels")).long(), torch.from_numpy(load("test_labels")).long()
    scatter_seconds = time.perf_counter() - whole
    (train_x, gram), (test_x, _) = normalised(train_x, gram=True), normalised(test_x, gram=False)
    n = len(train_x)
    rate = args.batch_size / n
    steps = int(args.epochs / rate)
    sigma = get_noise_multiplier(target_epsilon=args.epsilon, target_delta=DELTA, sample_rate=rate, steps=steps,
                                 accountant="rdp")
    p, generator = init(args.seed), torch.Generator().manual_seed(10_000 + args.seed)
    error = check_norms(p, train_x[:64], train_y[:64], gram[:64])
    if error > 1e-3:
        raise SystemExit(f"ghost norms differ from vmap's by {error:.1e} (relative): not timing a wrong step")
    momentum = {name: torch.zeros_like(value) for name, value in p.items()}
    tick = time.perf_counter()
    for step in range(steps):
        idx = torch.nonzero(torch.rand(n, generator=generator) < rate).squeeze(1)
        total = clipped_sum(p, train_x[idx], train_y[idx], gram[idx], args.max_grad_norm)
        for name in p:
            noise = sigma * args.max_grad_norm * torch.randn(p[name].shape, generator=generator)
            momentum[name] = args.momentum * momentum[name] + (total[name] + noise) / args.batch_size
            p[name] = p[name] - args.lr * momentum[name]
        if (step + 1) % 61 == 0:
            print(f"step {step + 1}/{steps}: {time.perf_counter() - tick:.0f} s", flush=True)
    train_seconds = time.perf_counter() - tick
    results = {"test_accuracy": accuracy(p, test_x, test_y), "epsilon": args.epsilon, "delta": DELTA,
               "noise_multiplier": sigma, "steps": steps, "sample_rate": rate, "train_seconds": train_seconds,
               "scattering_seconds": scatter_seconds, "whole_seconds": time.perf_counter() - whole,
               "ghost_norm_check": error, "device": device_name(torch.device("cpu")), "torch": torch.__version__,
               "args": vars(args)}
    print(f"ScatterNet + CNN, epsilon {args.epsilon} (delta {DELTA:g}, sigma {sigma:.3f}, {steps} steps), seed "
          f"{args.seed}: test accuracy {results['test_accuracy']:.2%}; {results['whole_seconds']:.0f} s whole "
          f"({scatter_seconds:.0f} s scattering, {train_seconds:.0f} s training), {results['device']}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
