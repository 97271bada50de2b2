"""Per-example gradients per second: fnclass's vmap over grad against a naive loop and Opacus.

Run by hand, not by pytest::

    python -m benchmarks.per_example_grads                                # fast on CUDA, tiny on CPU
    python -m benchmarks.per_example_grads --device cpu --compile --json tiny.json

Every variant computes, for one fixed random batch, the gradient of each example's own cross-entropy
with respect to every parameter, BatchNorm in eval mode (running statistics), as ``fnclass.analysis.gradients`` does:

- ``vmap eager``: ``fnclass.analysis.gradients.make_per_example_grad_fn`` on the model built with
  ``attn_impl="math"`` (the fused SDPA kernels have no vmap batching rule);
- ``vmap eager sdpa``: the same with ``attn_impl="sdpa"``, for comparison: vmap falls back to a loop over
  examples for the ops it cannot batch, named in the output;
- ``vmap compiled``: ``torch.compile`` of the ``math`` function; its first call (the compile) is shown apart;
- ``naive loop``: one forward and one ``torch.autograd.grad`` per example;
- ``opacus hooks`` and ``opacus functorch``: ``opacus.GradSampleModule`` (default, and
  ``force_functorch=True``) on the ``nn.Module`` twin from ``tests/torch_reference.py``, adapted as
  :func:`opacus_module` explains; skipped with a note when opacus is not installed (``pip install -e .[bench]``).

Each result is checked once against the naive loop (max relative error: the largest absolute difference
of a parameter's gradients over the largest absolute gradient of that parameter, maximised over
parameters); a max-pool whose two largest inputs tie, or nearly, can route one example's gradient elsewhere
under other rounding (sdpa, compiled), which shows as an error near 1e-3. After its first call each
variant is timed in rounds: a round calls every variant once, back to back, in an order that rotates from
round to round. grads/s is the median over all rounds. A speed ratio ("x naive", "x opacus") is paired:
each round's ratio of the two variants' calls in that round, so a slow spell of a shared machine that
spans the round cancels out; the table gives the median of these per-round ratios over all rounds, with
their minimum and maximum. On a CPU a 512x512 matmul probe runs before each round and is reported, not
used to select rounds: its range shows how steady the machine was.

Peak memory against chunk size: ``fnclass.analysis.gradients.per_example_grads(..., chunk_size=K)`` for each K,
each in a fresh process on a CPU (peak resident set size, ``VmHWM``) and in this one with
``torch.cuda.max_memory_allocated`` on CUDA; "rise" is the peak above the peak after a one-example call.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import multiprocessing
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fnclass

# The repo root, for tests/, and this folder, for step_throughput (a `benchmarks` package elsewhere may shadow it).
from benchmarks.common import device_name, publish, random_batch
from fnclass.analysis.gradients import make_per_example_grad_fn, per_example_grads
from fnclass.config import ModelConfig
from fnclass.core import tree
from fnclass.core.losses import per_example_cross_entropy
from fnclass.models import MODELS, resolve
from tests.torch_reference import reference_module, torch_name

# Per-device defaults: the CPU gets the small model and no compile (inductor takes minutes on 2 cores).
_DEVICE_DEFAULTS = {
    "cuda": dict(model="fast", rounds=20, compile=True),
    "cpu": dict(model="tiny", rounds=7, compile=False),
}


@dataclass(frozen=True)
class Options:
    """The resolved command line: every default filled in for the chosen device."""

    model: str
    device: str
    batch_size: int
    rounds: int
    compile: bool
    chunk_sizes: tuple[int, ...]
    json: str | None


def parse_options(argv: list[str] | None = None) -> Options:
    """Parse the command line and fill the device-dependent defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS), help="default: fast on cuda, tiny on cpu")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, help="timed rounds of one call per variant (default: 20 on cuda, "
                                                   "7 on cpu; medians over all rounds reported)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="also time torch.compile of the vmap function (default: on for cuda, off for cpu)")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[8, 32, 128],
                        help="chunk sizes for the peak-memory table (none: skip it)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device; use --device cpu or auto")
    defaults = _DEVICE_DEFAULTS[device]
    chosen = {name: getattr(args, name) for name in defaults}
    resolved = {name: defaults[name] if value is None else value for name, value in chosen.items()}
    options = Options(device=device, batch_size=args.batch_size, chunk_sizes=tuple(args.chunk_sizes),
                      json=args.json, **resolved)
    if options.batch_size < 1 or options.rounds < 1 or any(k < 1 for k in options.chunk_sizes):
        parser.error("--batch-size, --rounds and every --chunk-sizes value must be at least 1")
    return options


def model_config(name: str, attn_impl: str) -> ModelConfig:
    """The named model's resolved config with the given attention implementation."""
    return dataclasses.replace(resolve(ModelConfig(name=name)), attn_impl=attn_impl)


def build(name: str, attn_impl: str, device: torch.device):
    """``(config, model, params, state)`` from key 0, on ``device``."""
    config = model_config(name, attn_impl)
    model = fnclass.build_model(config)
    params, state = tree.tree_to(model.init(fnclass.key(0)), device)
    return config, model, params, state


def vmap_runner(model, params, state, images, labels, *, compile: bool) -> Callable[[], dict]:
    """``fnclass.analysis.gradients``'s per-example gradient function for the whole batch, eager or compiled."""
    grad_fn = make_per_example_grad_fn(model, state)
    if compile:
        grad_fn = torch.compile(grad_fn)
    return lambda: grad_fn(params, images, labels)[0]


def naive_runner(model, params, state, images, labels) -> Callable[[], dict]:
    """One forward and one ``torch.autograd.grad`` per example, stacked into a tree like the vmap result."""
    structure = tree.tree_structure(params)
    leaves = [leaf.detach().requires_grad_() for leaf in tree.tree_leaves(params)]
    example_params = tree.tree_unflatten(structure, leaves)

    def run():
        per_example = []
        for i in range(len(images)):
            logits, _ = model.apply(example_params, state, images[i:i + 1], train=False)
            per_example.append(torch.autograd.grad(per_example_cross_entropy(logits, labels[i:i + 1])[0], leaves))
        return tree.tree_unflatten(structure, [torch.stack(grads) for grads in zip(*per_example)])

    return run


class FrozenBatchNorm2d(nn.Module):
    """Eval-mode BatchNorm2d with its running statistics as plain tensors, not buffers (Opacus refuses
    buffers): ``weight`` and ``bias`` stay parameters; build it on the device it will run on."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.weight = nn.Parameter(bn.weight.detach().clone())
        self.bias = nn.Parameter(bn.bias.detach().clone())
        self.mean = bn.running_mean.detach().clone()
        self.inv_std = (bn.running_var.detach() + bn.eps).rsqrt()

    def forward(self, x):
        return ((x - self.mean[:, None, None]) * self.inv_std[:, None, None] * self.weight[:, None, None]
                + self.bias[:, None, None])


def dp_attention_mixes_heads() -> bool:
    """Whether ``opacus.layers.DPMultiheadAttention(batch_first=True)`` mixes heads up, as opacus 1.6.0 does:
    it reshapes the (batch x heads, tokens, head_dim) output straight to (batch, tokens, dim)."""
    from opacus.layers import DPMultiheadAttention

    reference = nn.MultiheadAttention(8, 2, batch_first=True)
    attention = DPMultiheadAttention(8, 2, batch_first=True)
    attention.load_state_dict(dict(reference.state_dict()))
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    return not torch.allclose(attention(x, x, x)[0], reference(x, x, x, need_weights=False)[0], atol=1e-5)


class UnmixHeads(nn.Module):
    """Puts the heads of ``DPMultiheadAttention``'s mixed-up output back in place, before ``out_proj``."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        n, tokens, dim = x.shape
        return x.reshape(n, self.heads, tokens, dim // self.heads).transpose(1, 2).reshape(n, tokens, dim)


def opacus_module(config: ModelConfig, params, state, device: torch.device, *, unmix_heads: bool) -> nn.Module:
    """The nn.Module twin rebuilt from modules Opacus accepts, computing the same function.

    ``GradSampleModule`` refuses ``BatchNorm2d`` (a trainable layer with buffers), also with
    ``force_functorch=True``, and with ``strict=False`` its functorch fallback raises on buffers; it
    computes nothing for a module in eval mode (its forward hooks return early). So each BatchNorm is a
    :class:`FrozenBatchNorm2d` (Opacus's functorch fallback differentiates it) and the module is put in
    train mode, where nothing else here behaves differently (no dropout). ``nn.MultiheadAttention``, which
    Opacus rejects too, is ``opacus.layers.DPMultiheadAttention(batch_first=True)`` holding the same
    weights, with its head mix-up undone before ``out_proj`` when ``unmix_heads`` (see
    :func:`dp_attention_mixes_heads`; its sequence-first path would make Opacus take tokens for examples).
    """
    from opacus.layers import DPMultiheadAttention

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, name, FrozenBatchNorm2d(child))
            elif isinstance(child, nn.MultiheadAttention):
                attention = DPMultiheadAttention(child.embed_dim, child.num_heads, batch_first=True).to(device)
                attention.load_state_dict(dict(child.state_dict()))
                if unmix_heads:  # a module, not a hook: Opacus's functorch path reruns a layer's hooks
                    attention.out_proj = nn.Sequential(UnmixHeads(child.num_heads), attention.out_proj)
                setattr(parent, name, attention)
            else:
                swap(child)

    module = reference_module(config, params, state).to(device)
    swap(module)
    return module.train()


def opacus_runner(config, params, state, images, labels, *, force_functorch: bool,
                  unmix_heads: bool) -> Callable[[], dict]:
    """``GradSampleModule`` of :func:`opacus_module`: forward, summed loss, backward, ``p.grad_sample``."""
    from opacus import GradSampleModule

    module = opacus_module(config, params, state, images.device, unmix_heads=unmix_heads)
    sampled = GradSampleModule(module, loss_reduction="sum", force_functorch=force_functorch)

    def run():
        sampled.zero_grad(set_to_none=True)
        F.cross_entropy(sampled(images), labels, reduction="sum").backward()
        return {name: p.grad_sample for name, p in module.named_parameters()}

    return run


def opacus_plain_twin_outcome(config, params, state, images, labels, **kwargs) -> str:
    """What ``GradSampleModule(twin.eval(), **kwargs)`` does with the unmodified twin: "ok" or its error."""
    from opacus import GradSampleModule

    try:
        sampled = GradSampleModule(reference_module(config, params, state).to(images.device).eval(), **kwargs)
        F.cross_entropy(sampled(images[:2]), labels[:2], reduction="sum").backward()
    except Exception as error:  # any refusal is the finding being recorded
        return f"{type(error).__name__}: {str(error)[:160]}"
    missing = sum(getattr(p, "grad_sample", None) is None for p in sampled.parameters())
    return f"ran, but {missing} parameters have no grad_sample" if missing else "ok"


def fnclass_named(grads) -> dict[str, torch.Tensor]:
    """An fnclass gradient tree keyed by the twin's state_dict names."""
    return {torch_name(path): leaf for path, leaf in tree.flatten_paths(grads).items()}


def opacus_named(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`opacus_module`'s gradients keyed by the twin's names (q, k, v joined into ``in_proj``)."""
    named = {name.replace(".out_proj.1.", ".out_proj."): grad for name, grad in grads.items()}
    for prefix in [name.removesuffix(".qlinear.weight") for name in grads if name.endswith(".qlinear.weight")]:
        for kind in ("weight", "bias"):
            named[f"{prefix}.in_proj_{kind}"] = torch.cat([named.pop(f"{prefix}.{x}linear.{kind}") for x in "qkv"],
                                                          dim=1)
    return named


def max_relative_error(got: dict, want: dict) -> float:
    """Max over parameters of max |got - want| / max |want|, both keyed by the twin's names."""
    if set(got) != set(want):
        raise ValueError(f"gradients for different parameters: {sorted(set(got) ^ set(want))[:5]}")
    return max(float((got[k].to(want[k].device) - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-30))
               for k in want)


def matmul_gflops(size: int = 512, repeats: int = 4) -> float:
    """GFLOP/s of a few float32 matmuls: a cheap probe of how fast the CPU runs right now."""
    a, b = torch.ones(size, size), torch.ones(size, size)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def timed_call(run: Callable, synchronize: Callable[[], None]):
    """``(seconds, result)`` of one call of ``run``, with the device drained before and after."""
    synchronize()
    start = time.perf_counter()
    result = run()
    synchronize()
    return time.perf_counter() - start, result


def peak_rss() -> int:
    """This process's peak resident set size in bytes: ``VmHWM``, which unlike ``getrusage``'s ``ru_maxrss``
    does not inherit the parent's peak across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line in /proc/self/status: the CPU memory table needs Linux")


def peak_memory(model_name: str, device: str, batch_size: int, chunk_size: int) -> dict:
    """Peak memory of a ``per_example_grads(..., chunk_size)`` call on a fresh model and batch, above the
    peak after a one-example call (which pays the one-time set-up), and the seconds a second call takes."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    synchronize = torch.cuda.synchronize if cuda else lambda: None
    _, model, params, state = build(model_name, "math", dev)
    images, labels = random_batch(batch_size, dev)
    run = lambda: per_example_grads(model, params, state, images, labels, chunk_size=chunk_size)
    per_example_grads(model, params, state, images[:1], labels[:1])
    if cuda:
        synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else peak_rss()
    _, grads = timed_call(run, synchronize)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    output = sum(leaf.numel() * leaf.element_size() for leaf in tree.tree_leaves(grads))
    del grads
    seconds, _ = timed_call(run, synchronize)
    return {"chunk_size": chunk_size, "peak_bytes": peak, "before_bytes": before, "rise_bytes": peak - before,
            "output_bytes": output, "seconds": seconds}


def chunk_memory(options: Options) -> list[dict]:
    """:func:`peak_memory` for every chunk size: each in a fresh process on a CPU, in this one on CUDA."""
    args = [(options.model, options.device, options.batch_size, k) for k in options.chunk_sizes]
    if options.device == "cuda":
        return [peak_memory(*a) for a in args]
    results = []
    for a in args:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            results.append(pool.apply(peak_memory, a))
    return results


def make_runners(options: Options, device: torch.device, notes: dict):
    """``(runners, num_params)``: a function per variant that returns the batch's per-example gradients.

    Adds to ``notes`` the opacus version (or why its variants are missing) and what Opacus makes of
    the unmodified twin.
    """
    config, model, params, state = build(options.model, "math", device)
    _, sdpa_model, _, _ = build(options.model, "sdpa", device)
    batch = (params, state, *random_batch(options.batch_size, device))
    runners = {"naive loop": naive_runner(model, *batch),
               "vmap eager": vmap_runner(model, *batch, compile=False),
               "vmap eager sdpa": vmap_runner(sdpa_model, *batch, compile=False)}
    if options.compile:
        runners["vmap compiled"] = vmap_runner(model, *batch, compile=True)
    try:
        import opacus
    except ImportError:
        notes["opacus"] = "not installed: its variants are skipped (pip install -e .[bench])"
        return runners, tree.num_params(params)
    notes["opacus"] = opacus.__version__
    unmix_heads = dp_attention_mixes_heads()
    notes["opacus DPMultiheadAttention(batch_first=True) mixes heads up"] = (
        f"{unmix_heads}{' (undone by UnmixHeads before out_proj)' if unmix_heads else ''}")
    for mode, force in (("hooks", False), ("functorch", True)):
        notes[f"opacus {mode} on the unmodified twin in eval mode"] = opacus_plain_twin_outcome(
            config, *batch, loss_reduction="sum", force_functorch=force)
        runners[f"opacus {mode}"] = opacus_runner(config, *batch, force_functorch=force, unmix_heads=unmix_heads)
    return runners, tree.num_params(params)


def first_calls(runners: dict, synchronize: Callable[[], None], notes: dict) -> tuple[dict, dict]:
    """``(seconds, max relative error)`` per variant of its first call, checked against the naive loop.

    Adds to ``notes`` the ops that vmap could not batch (it warns, then loops over examples).
    """
    seconds, reference = timed_call(runners["naive loop"], synchronize)
    first, errors, reference = {"naive loop": seconds}, {"naive loop": 0.0}, fnclass_named(reference)
    for name, run in runners.items():
        if name in first:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first[name], result = timed_call(run, synchronize)
        errors[name] = max_relative_error((opacus_named if name.startswith("opacus") else fnclass_named)(result),
                                          reference)
        fallbacks = sorted({str(w.message).split("batching rule for ")[1].split(".")[0] for w in caught
                            if "batching rule for " in str(w.message)})
        if fallbacks:
            notes[f"{name}: vmap loops over examples for"] = ", ".join(fallbacks)
    return first, errors


def timed_rounds(runners: dict, rounds: int, batch_size: int, synchronize: Callable[[], None],
                 probe: Callable[[], float | None]) -> tuple[dict, list]:
    """``(rates, probes)``: per variant its per-example gradients/s in each round, and the probe before each."""
    names = list(runners)
    rates, probes = {name: [] for name in names}, []
    for round_index in range(rounds):
        shift = round_index % len(names)
        probes.append(probe())
        for name in names[shift:] + names[:shift]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # vmap's fallback warnings, reported after the first call
                seconds, _ = timed_call(runners[name], synchronize)
            rates[name].append(batch_size / seconds)
    return rates, probes


def paired_ratios(rates: dict, reference: str) -> dict:
    """Per variant, ``{"median", "min", "max", "rounds"}`` of its per-round speed over ``reference``'s."""
    ratios = {}
    for name, rounds in rates.items():
        per_round = [r / ref for r, ref in zip(rounds, rates[reference], strict=True)]
        ratios[name] = {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
                        "rounds": per_round}
    return ratios


def measure(options: Options) -> dict:
    """Build every variant, check it once against the naive loop, time interleaved rounds; return the results."""
    device = torch.device(options.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    probe = matmul_gflops if device.type == "cpu" else lambda: None
    notes = {}
    runners, num_params = make_runners(options, device, notes)
    first, errors = first_calls(runners, synchronize, notes)
    rates, probes = timed_rounds(runners, options.rounds, options.batch_size, synchronize, probe)
    variants = {name: {"first_call_s": first[name], "max_rel_err": errors[name],
                       "grads_per_s": statistics.median(rounds), "grads_per_s_rounds": rounds}
                for name, rounds in rates.items()}
    over_naive = paired_ratios(rates, "naive loop")
    over_opacus = paired_ratios(rates, "opacus hooks") if "opacus hooks" in rates else {}
    return {
        "options": asdict(options),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "num_params": num_params,
        "probe_gflops_rounds": probes if device.type == "cpu" else [],
        "variants": variants,
        # The medians of the paired per-round ratios; gpu_check.sh reads these two.
        "over_naive_loop": {name: r["median"] for name, r in over_naive.items()},
        "over_opacus_hooks": {name: r["median"] for name, r in over_opacus.items()},
        "over_naive_loop_paired": over_naive,
        "over_opacus_hooks_paired": over_opacus,
        "notes": notes,
        "chunk_memory": chunk_memory(options) if options.chunk_sizes else [],
    }


def ratio_cell(ratio: dict | None) -> str:
    """A paired ratio as ``median [min-max]``, or a dash."""
    if ratio is None:
        return f"{'-':>19}"
    return f"{ratio['median']:>6.2f}x [{ratio['min']:.2f}-{ratio['max']:.2f}]".rjust(19)


def render(results: dict) -> str:
    """Fixed-width tables of the variants and of peak memory against chunk size, then the notes."""
    o = results["options"]
    probes = [p for p in results["probe_gflops_rounds"] if p]
    probe = f"; matmul probe before each round: {min(probes):.0f}-{max(probes):.0f} GFLOP/s" if probes else ""
    lines = [f"model {o['model']} ({results['num_params']:,} parameters), batch {o['batch_size']}, {o['device']} "
             f"({results['device_name']}), torch {results['torch']}",
             f"{o['rounds']} rounds of one call per variant, all kept{probe}",
             "grads/s: median over rounds; x naive, x opacus: median [min-max] of the per-round paired ratios",
             "",
             f"{'variant':<18}{'first call s':>13}{'grads/s':>10}{'x naive':>19}{'x opacus':>19}{'max rel err':>13}"]
    for name, v in results["variants"].items():
        over_opacus = results["over_opacus_hooks_paired"].get(name)
        lines.append(f"{name:<18}{v['first_call_s']:>13.2f}{v['grads_per_s']:>10.1f}"
                     f"{ratio_cell(results['over_naive_loop_paired'][name])}{ratio_cell(over_opacus)}"
                     f"{v['max_rel_err']:>13.1e}")
    if results["chunk_memory"]:
        kind = "CUDA max_memory_allocated" if o["device"] == "cuda" else "peak RSS (VmHWM) of a fresh process"
        output = results["chunk_memory"][0]["output_bytes"] / 2**20
        lines += ["", f"per_example_grads peak memory ({kind}); rise: above the peak after a one-example "
                      f"call; the gradients themselves: {output:.0f} MiB",
                  f"{'chunk':>6}{'peak MiB':>10}{'rise MiB':>10}{'seconds':>9}"]
        for m in results["chunk_memory"]:
            lines.append(f"{m['chunk_size']:>6}{m['peak_bytes'] / 2**20:>10.0f}{m['rise_bytes'] / 2**20:>10.0f}"
                         f"{m['seconds']:>9.2f}")
    lines += ["", *[f"{key}: {value}" for key, value in results["notes"].items()]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    results = measure(options)
    publish(results, render(results), options.json)


if __name__ == "__main__":
    main()
