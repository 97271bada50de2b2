"""Per-example gradient analysis: ``torch.func.vmap`` over ``torch.func.grad``, chunked and streamed.

The loss analysed is each example's plain cross-entropy (no label smoothing, no weight decay) unless a
``loss_fn`` says otherwise, and the model runs with ``train=False``: BatchNorm normalises with its running
statistics, so an example's gradient depends on that example alone and is well defined.

Statistics are streamed chunk by chunk and never hold N x P numbers: per-example loss, gradient norm
(total and per layer group), cosine to the mean gradient, the mean gradient, and the gradient noise scale
``B_simple = tr(Sigma) / |G|^2`` of McCandlish et al. (2018), "An Empirical Model of Large-Batch Training",
overall and per layer group, with unbiased estimates of ``tr(Sigma)`` and ``|G|^2``.

Data valuation (:func:`score_checkpoint`, ``fnclass grads --score``) ranks examples by EL2N or GraNd (Paul et al.
2021, "Deep Learning on a Data Diet"), averaged over the members of a stacked checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import optree
import torch

from fnclass import data
from fnclass.core import tree
from fnclass.core.losses import per_example_cross_entropy
from fnclass.core.per_example import per_example_grad_and_value
from fnclass.io import in_precision, pick_device, resolve_precision, save_figure, write_atomic, write_json
from fnclass.models import Model, build_model
from fnclass.run.checkpoint import Checkpoint, load_checkpoint

LOSS_DESCRIPTION = ("per-example cross-entropy without label smoothing or weight decay; BatchNorm in eval mode "
                    "(running statistics), so each example's gradient depends on that example alone")


def layer_group(path: str) -> str:
    """The layer group of a flat parameter path: its first component, with the index for lists
    (``stages.1.blocks.0.conv1.weight`` -> ``stages.1``, ``head.weight`` -> ``head``)."""
    parts = path.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def make_per_example_grad_fn(model: Model, state, *, loss_fn: Callable = per_example_cross_entropy) -> Callable:
    """``fn(params, images, labels) -> (grads, (losses, logits))`` with a leading batch axis on every output.

    Args:
      model: the model.
      state: its state (BatchNorm running statistics), used as is.
      loss_fn: ``loss_fn(logits, labels) -> (N,)`` per-example losses.
    """
    def example_loss(params, images, labels):  # one example: images (1, C, H, W), labels (1,)
        logits, _ = model.apply(params, state, images, train=False)
        return loss_fn(logits, labels)[0], logits[0].detach()

    return per_example_grad_and_value(example_loss)


def vmap_model(ckpt, precision: str = "fp32") -> Model:
    """A checkpoint's model with attention on its explicit ``math`` path, which vectorises under vmap (the fused
    SDPA kernels have no batching rule); the parameters and the function are the same. ``precision``: ``"bf16"``
    computes it under bf16 autocast (:func:`fnclass.io.in_precision`), float32 logits and gradients."""
    return in_precision(build_model(dataclasses.replace(ckpt.config.model, attn_impl="math")), precision)


def training_rows(ckpt: Checkpoint, labels: torch.Tensor, limit: int | None = None) -> torch.Tensor:
    """The rows of the training split (``labels``: all of it) that ``ckpt``'s run trained on, as
    :func:`fnclass.data.batches.load_run_data` chose them (``data.train_limit`` or ``data.train_indices``, without the
    images ``data.val_size`` held out), the first ``limit`` of them."""
    config = ckpt.config.data
    rows = torch.arange(len(labels))
    if config.train_indices:
        rows = data.read_indices(config.train_indices, len(labels))
    elif config.train_limit:
        rows = rows[:config.train_limit]
    if config.val_size:
        kept, _ = data.validation_split(labels[rows], config.val_size, config.val_seed)
        rows = rows[kept]
    return rows[:limit] if limit else rows


def data_folder(process, data_dir, dataset: str, download: bool) -> Path:
    """The data folder (:func:`fnclass.data.resolve_data_dir`); in a torchrun job rank 0 finds, and if allowed
    downloads, it first while the others wait, so a fresh cache is not written by several processes at once."""
    from fnclass import distributed

    if process is not None:
        distributed.first_on_rank_zero(process, lambda: data.resolve_data_dir(data_dir, dataset, download=download))
    return data.resolve_data_dir(data_dir, dataset, download=download)


def _chunks(n: int, chunk_size: int | None):
    """Slices of ``range(n)`` of at most ``chunk_size`` (one slice when None)."""
    step = n if not chunk_size else chunk_size
    return [slice(start, min(start + step, n)) for start in range(0, n, max(step, 1))]


def per_example_grads(model: Model, params, state, images: torch.Tensor, labels: torch.Tensor, *,
                      chunk_size: int | None = None, loss_fn: Callable = per_example_cross_entropy):
    """Per-example gradients of the loss, a pytree shaped like ``params`` with a leading batch axis.

    Args:
      model: the model.
      params: its parameters.
      state: its state; BatchNorm uses these running statistics (``train=False``).
      images: (N, C, H, W) float images as ``Checkpoint.preprocess`` returns them.
      labels: (N,) int64 labels.
      chunk_size: examples per vmap call (None: all at once). Results do not depend on it.
      loss_fn: per-example loss ``(logits, labels) -> (N,)``; default plain cross-entropy.

    Returns:
      The tree of (N, *param.shape) gradients. This holds N x P numbers: use
      :func:`gradient_statistics` for large N.
    """
    grad_fn = make_per_example_grad_fn(model, state, loss_fn=loss_fn)
    # Chunks are written into one preallocated output, so the peak is the output plus one chunk.
    out = optree.tree_map(lambda p: p.new_empty((len(images), *p.shape)), params)
    for part in _chunks(len(images), chunk_size):
        grads = grad_fn(params, images[part], labels[part])[0]
        for target, chunk in zip(tree.tree_leaves(out), tree.tree_leaves(grads)):
            target[part] = chunk
    return out


def _bytes_saved_for_backward(model: Model, params, state, image: torch.Tensor) -> int:
    """Bytes of activations one example saves for its backward pass (measured with saved-tensor hooks)."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    leaves = [leaf.detach().requires_grad_() for leaf in tree.tree_leaves(params)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.apply(tree.tree_unflatten(tree.tree_structure(params), leaves), state, image[None], train=False)
    return total


def memory_budget(device: torch.device) -> int:
    """Default budget for per-example work: half the free GPU memory, or a quarter of the available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def auto_chunk_size(model: Model, params, state, image: torch.Tensor, *, max_memory: int | None = None,
                    limit: int | None = None) -> int:
    """The largest chunk whose per-example gradients and activations fit ``max_memory`` bytes.

    Each example costs its gradient (P floats) three times over (the gradient, the vmapped backward's
    temporaries, the statistics' products) plus twice the activations it saves for backward.
    """
    budget = max_memory if max_memory is not None else memory_budget(image.device)
    per_example = 3 * 4 * tree.num_params(params) + 2 * _bytes_saved_for_backward(model, params, state, image)
    size = max(1, budget // max(per_example, 1))
    return int(min(size, limit)) if limit else int(size)


def _group_names(params) -> tuple[list[str], list[str]]:
    """Each leaf's layer group, in leaf order, and the distinct groups in first-seen order."""
    leaf_groups = [layer_group(path) for path in tree.flatten_paths(params)]
    return leaf_groups, list(dict.fromkeys(leaf_groups))


def noise_scale(sum_sq_norms: float, mean_grad_sq_norm: float, n: int) -> dict:
    """``B_simple = tr(Sigma) / |G|^2`` from ``sum_i |g_i|^2`` and ``|mean_i g_i|^2`` over ``n`` examples.

    Unbiased: ``tr(Sigma) = (sum_i |g_i|^2 - n |g_mean|^2) / (n - 1)`` and
    ``|G|^2 = |g_mean|^2 - tr(Sigma) / n``. ``b_simple`` is ``inf`` when the estimate of ``|G|^2`` is not
    positive (the mean gradient is lost in the noise).
    """
    trace = (sum_sq_norms - n * mean_grad_sq_norm) / max(n - 1, 1)
    signal = mean_grad_sq_norm - trace / n
    return {"trace_sigma": trace, "mean_grad_sq_norm": signal, "b_simple": trace / signal if signal > 0 else math.inf}


def gradient_statistics(model: Model, params, state, images: torch.Tensor, labels: torch.Tensor, *,
                        chunk_size: int | None = None, loss_fn: Callable = per_example_cross_entropy,
                        cosine: bool = True, progress: Callable | None = None, process=None) -> dict:
    """Streaming per-example gradient statistics over a whole split, one chunk in memory at a time.

    With a data-parallel ``process`` (:mod:`fnclass.distributed`, a torchrun job) each process takes a contiguous
    shard of the split; the gradient sums are all-reduced and the per-example columns gathered in the split's
    order, so every process returns what one process would.

    Args:
      model, params, state: the model to analyse (BatchNorm in eval mode).
      images: (N, C, H, W) float images as ``Checkpoint.preprocess`` returns them.
      labels: (N,) int64 labels.
      chunk_size: examples per vmap call (None: all at once); see :func:`auto_chunk_size`.
      loss_fn: per-example loss; default plain cross-entropy.
      cosine: also compute each example's cosine to the mean gradient (a second pass over the data).
      progress: ``progress(done, total)`` after each chunk of each pass: examples done by this process, of its
        ``total`` (its shard, twice with ``cosine``).
      process: a :class:`fnclass.distributed.Process`, or None.

    Returns:
      A dict: ``per_example`` (CPU tensors of shape (N,): ``loss``, ``grad_norm``, ``predicted``, ``cos_to_mean``
      and ``group_norms`` per layer group), ``mean_grad`` (a tree like params), ``noise_scale`` (overall) and
      ``group_noise_scale`` (per group), ``groups`` and ``num_examples``.
    """
    from fnclass.distributed import all_sum, gather_rows, split_rows

    grad_fn = make_per_example_grad_fn(model, state, loss_fn=loss_fn)
    leaf_groups, groups = _group_names(params)
    n = len(images)
    images, labels = split_rows(images, process), split_rows(labels, process)
    whole = lambda parts, like: gather_rows(torch.cat(parts) if parts else like.new_empty(0), n, process)
    chunks = _chunks(len(images), chunk_size)
    passes = 2 if cosine else 1
    sums = [torch.zeros_like(leaf) for leaf in tree.tree_leaves(params)]
    losses, predicted, group_sq = [], [], {group: [] for group in groups}
    for part in chunks:
        grads, (loss, logits) = grad_fn(params, images[part], labels[part])
        leaves = tree.tree_leaves(grads)
        per_leaf_sq = [leaf.flatten(1).pow(2).sum(1) for leaf in leaves]
        for group in groups:
            group_sq[group].append(sum(sq for sq, g in zip(per_leaf_sq, leaf_groups) if g == group))
        for total, leaf in zip(sums, leaves):
            total += leaf.sum(0)
        losses.append(loss.detach())
        predicted.append(logits.argmax(-1))
        if progress:
            progress(part.stop, passes * len(images))
    if process is not None:
        sums = all_sum(sums, process)
    mean_leaves = [total / n for total in sums]
    empty = torch.empty(0, device=labels.device)
    group_sq = {group: whole(values, empty) for group, values in group_sq.items()}
    total_sq = sum(group_sq.values())
    mean_sq = {group: sum(float(m.pow(2).sum()) for m, g in zip(mean_leaves, leaf_groups) if g == group)
               for group in groups}
    per_example = {"loss": whole(losses, empty).cpu(), "grad_norm": total_sq.sqrt().cpu(),
                   "predicted": whole(predicted, labels.new_empty(0)).cpu(),
                   "group_norms": {group: values.sqrt().cpu() for group, values in group_sq.items()}}
    if cosine:
        mean_norm = math.sqrt(sum(mean_sq.values()))
        dots = []
        for part in chunks:
            grads, _ = grad_fn(params, images[part], labels[part])
            dots.append(sum((leaf.flatten(1) * mean.flatten()).sum(1)
                            for leaf, mean in zip(tree.tree_leaves(grads), mean_leaves)))
            if progress:
                progress(len(images) + part.stop, passes * len(images))
        per_example["cos_to_mean"] = whole(dots, empty).cpu() / (per_example["grad_norm"] * mean_norm).clamp(min=1e-30)
    return {
        "per_example": per_example,
        "mean_grad": tree.tree_unflatten(tree.tree_structure(params), mean_leaves),
        "noise_scale": noise_scale(float(total_sq.sum()), sum(mean_sq.values()), n),
        "group_noise_scale": {g: noise_scale(float(group_sq[g].sum()), mean_sq[g], n) for g in groups},
        "groups": groups,
        "num_examples": n,
    }


def analyze_checkpoint(checkpoint_path, out_dir, *, data_dir=None, split: str = "train", limit: int | None = None,
                       chunk_size: int | str = "auto", max_memory: int | None = None, top: int = 64,
                       device: str = "auto", download: bool = True, progress: Callable | None = None,
                       weights: str = "auto", precision: str = "fp32", rows: str = "run") -> dict:
    """Per-example gradient analysis of a checkpoint on a data split, written to ``out_dir``.

    ``weights``: ``"auto"`` (the EMA when the checkpoint has one), ``"ema"`` or ``"raw"``; the report's ``weights``
    names those analysed. ``precision``: ``"fp32"``, ``"bf16"`` (autocast; the gradients stay float32) or
    ``"auto"`` (bf16 where the device has bf16 units, :func:`fnclass.io.resolve_precision`); the report's
    ``precision`` names the one used. ``rows`` (``split = "train"`` only): ``"run"``, the rows the checkpoint's run
    trained on (``data.train_limit``, ``data.train_indices``, less ``data.val_size``: those ``fnclass influence``
    takes), or ``"split"``, every row; the first ``limit`` of them. ``per_example.csv``'s ``index`` and the report's
    ``top_indices`` are rows of the split.

    Writes ``per_example.csv`` (index, label, predicted, loss, grad_norm, one column per layer group,
    cos_to_mean), ``report.json`` (every aggregate), ``top_examples.png`` (the ``top`` highest-norm
    examples with true and predicted labels) and ``norms.png`` (gradient-norm histograms per class).
    Attention runs through its explicit ``math`` path here, which vectorises under vmap (fused SDPA kernels
    have no batching rule); the parameters and the function are the same.

    Under torchrun (``torchrun --nproc-per-node N -m fnclass grads ...``) the split is sharded over the processes
    (:func:`gradient_statistics`) and rank 0 writes the outputs.

    Returns:
      The report dict (also ``report.json``), with ``top_indices`` added.
    """
    from fnclass import distributed

    process, ckpt, dev, raw_images, labels, chosen, model, precision = _open_split(
        checkpoint_path, data_dir, split, limit, device, download, weights, precision, rows)
    params, state = tree.tree_to((ckpt.params, ckpt.state), dev)
    images, labels = ckpt.preprocess(raw_images.to(dev)), labels.to(dev)
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(model, params, state, images[0], max_memory=max_memory, limit=len(images))
    start = time.perf_counter()
    stats = gradient_statistics(model, params, state, images, labels, chunk_size=chunk_size, progress=progress,
                                process=process)
    seconds = time.perf_counter() - start
    report = build_report(stats, labels.cpu(), ckpt.classes, split=split, chunk_size=chunk_size, seconds=seconds,
                          checkpoint=str(checkpoint_path), top=top)
    report["processes"], report["weights"] = process.world_size if process else 1, ckpt.weights
    report["precision"], report["rows"] = precision, rows if split == "train" else "split"
    positions, report["top_indices"] = report["top_indices"], chosen[report["top_indices"]].tolist()
    if process is None or process.writes:
        write_outputs(Path(out_dir), stats, labels.cpu(), raw_images, ckpt.classes, report, chosen, positions)
    distributed.finish(process)
    return report


def build_report(stats: dict, labels: torch.Tensor, classes, *, split: str, chunk_size, seconds: float,
                 checkpoint: str, top: int) -> dict:
    """The aggregates of :func:`gradient_statistics` as plain JSON-ready numbers."""
    per = stats["per_example"]
    sq_total = float(per["grad_norm"].pow(2).sum())
    shares = {g: float(norms.pow(2).sum()) / sq_total if sq_total else 0.0 for g, norms in per["group_norms"].items()}
    per_class = {}
    for index, name in enumerate(classes):
        mask = labels == index
        if mask.any():
            per_class[name] = {"count": int(mask.sum()), "mean_grad_norm": float(per["grad_norm"][mask].mean()),
                               "mean_loss": float(per["loss"][mask].mean()),
                               "accuracy": float((per["predicted"][mask] == index).float().mean())}
    order = torch.argsort(per["grad_norm"], descending=True)
    return {
        "checkpoint": checkpoint, "split": split, "num_examples": stats["num_examples"], "loss": LOSS_DESCRIPTION,
        "mean_loss": float(per["loss"].mean()), "accuracy": float((per["predicted"] == labels).float().mean()),
        "mean_grad_norm": float(per["grad_norm"].mean()), "noise_scale": stats["noise_scale"],
        "group_noise_scale": stats["group_noise_scale"], "group_norm_share": shares, "per_class": per_class,
        "chunk_size": chunk_size, "seconds": seconds,
        "examples_per_second": stats["num_examples"] / seconds if seconds else None,
        "top_indices": order[:top].tolist(),
    }


def write_outputs(out_dir, stats: dict, labels: torch.Tensor, raw_images: torch.Tensor, classes, report: dict,
                  rows: torch.Tensor | None = None, top_positions: list[int] | None = None) -> None:
    """per_example.csv, report.json, top_examples.png and norms.png, each written atomically. ``rows``: each
    example's row of the split (default its position); ``top_positions``: the positions of the report's
    ``top_indices``."""
    rows = torch.arange(len(labels)) if rows is None else rows
    top_positions = report["top_indices"] if top_positions is None else top_positions
    out_dir.mkdir(parents=True, exist_ok=True)
    per = stats["per_example"]
    groups = list(per["group_norms"])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "label", "predicted", "loss", "grad_norm", *[f"norm_{g}" for g in groups],
                     "cos_to_mean"])
    cos = per.get("cos_to_mean")
    for i in range(stats["num_examples"]):
        writer.writerow([int(rows[i]), int(labels[i]), int(per["predicted"][i]), f"{float(per['loss'][i]):.6g}",
                         f"{float(per['grad_norm'][i]):.6g}",
                         *[f"{float(per['group_norms'][g][i]):.6g}" for g in groups],
                         f"{float(cos[i]):.6g}" if cos is not None else ""])
    write_atomic(out_dir / "per_example.csv", buffer.getvalue().encode())
    write_json(out_dir / "report.json", report)
    _plot_top_examples(out_dir / "top_examples.png", raw_images, labels, per, classes, top_positions, rows)
    _plot_norms(out_dir / "norms.png", labels, per["grad_norm"], classes)


def _plot_top_examples(path, raw_images, labels, per, classes, indices, row_of) -> None:
    """The highest-norm examples (``indices``: positions) as an image grid titled ``#row``, ``true / predicted``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 8
    rows = max(1, math.ceil(len(indices) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, indices):
        true, guess = classes[int(labels[index])], classes[int(per["predicted"][index])]
        ax.imshow(raw_images[index].numpy())
        ax.set_title(f"#{int(row_of[index])}\n{true} / {guess}", fontsize=7, color="black" if true == guess else "red")
    fig.suptitle("highest per-example gradient norms (true / predicted)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_norms(path, labels, norms, classes) -> None:
    """Histograms of per-example gradient norms, one per class, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    positive = norms.clamp(min=1e-12)
    bins = torch.logspace(math.log10(float(positive.min())), math.log10(float(positive.max()) * 1.0001), 40)
    for index, name in enumerate(classes):
        mask = labels == index
        if mask.any():
            ax.hist(positive[mask].numpy(), bins=bins.numpy(), histtype="step", label=name)
    ax.set(xscale="log", xlabel="per-example gradient norm", ylabel="examples", title="gradient norms per class")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


SCORES = {  # the one-line definitions scores.json records
    "el2n": "EL2N (Paul et al. 2021): the L2 norm of softmax(logits) minus the one-hot label, the model in eval mode",
    "grand": "GraNd (Paul et al. 2021): the L2 norm of the gradient of the example's cross-entropy with respect to "
             "all parameters, BatchNorm in eval mode",
}


def el2n_scores(model: Model, params, state, images: torch.Tensor, labels: torch.Tensor, *,
                chunk_size: int | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Each example's EL2N score ``|softmax(logits) - one_hot(label)|_2``, the model in eval mode.

    Args:
      model, params, state: one model (a member: :meth:`fnclass.run.checkpoint.Checkpoint.member`).
      images: (N, C, H, W) float images as ``Checkpoint.preprocess`` returns them.
      labels: (N,) int64 labels.
      chunk_size: examples per call (None: all at once); the scores do not depend on it.
      progress: ``progress(done, N)`` after each chunk.

    Returns:
      The (N,) float32 scores, on the images' device.
    """
    scores = []
    with torch.no_grad():
        for part in _chunks(len(images), chunk_size):
            logits, _ = model.apply(params, state, images[part], train=False)
            probabilities = torch.softmax(logits.float(), dim=-1)
            one_hot = torch.nn.functional.one_hot(labels[part], probabilities.shape[-1]).to(probabilities.dtype)
            scores.append((probabilities - one_hot).norm(dim=-1))
            if progress:
                progress(part.stop, len(images))
    return torch.cat(scores) if scores else images.new_zeros(0)


def grand_scores(model: Model, params, state, images: torch.Tensor, labels: torch.Tensor, *,
                 chunk_size: int | None = None, progress: Callable | None = None) -> torch.Tensor:
    """Each example's GraNd score: the L2 norm of its cross-entropy's gradient in all parameters (BatchNorm in eval
    mode, :func:`make_per_example_grad_fn`). Arguments and result as :func:`el2n_scores`."""
    grad_fn = make_per_example_grad_fn(model, state)
    scores = []
    for part in _chunks(len(images), chunk_size):
        grads, _ = grad_fn(params, images[part], labels[part])
        scores.append(sum(leaf.flatten(1).pow(2).sum(1) for leaf in tree.tree_leaves(grads)).sqrt())
        if progress:
            progress(part.stop, len(images))
    return torch.cat(scores) if scores else images.new_zeros(0)


SCORE_FUNCTIONS = {"el2n": el2n_scores, "grand": grand_scores}


def kept_indices(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The indices of the ``ceil(fraction x N)`` highest scores, ascending; of equal scores the lower index is kept.

    ``fraction`` is taken as the decimal it prints as, so 0.07 of 100 examples keeps 7 (``0.07 * 100`` is
    7.000000000000001 in binary floating point).
    """
    count = math.ceil(Fraction(repr(float(fraction))) * len(scores))
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:count]).values


def score_checkpoint(checkpoint_path, out_dir, *, method: str, data_dir=None, split: str = "train",
                     limit: int | None = None, chunk_size: int | str = "auto", max_memory: int | None = None,
                     keep_fraction: float | None = None, top: int = 10, device: str = "auto", download: bool = True,
                     progress: Callable | None = None, weights: str = "auto", precision: str = "fp32",
                     rows: str = "run") -> dict:
    """Data-valuation scores of every example of a split (``fnclass grads --score``), written to ``out_dir``.

    A stacked checkpoint's score is the mean of its members' (each :meth:`Checkpoint.member`): the expectation over
    seeds that GraNd is defined by. Writes ``scores.csv`` (``index``, ``label``, ``score``, and with members one
    ``score_member<i>`` column each), ``scores.json`` (the summary returned here) and, with ``keep_fraction``,
    ``kept_indices.txt``: the :func:`kept_indices` of the highest scores, one a line, the file
    ``data.train_indices`` reads.

    Args:
      checkpoint_path: a checkpoint (one model or members).
      out_dir: the output folder (created if needed).
      method: ``"el2n"`` or ``"grand"`` (:data:`SCORES`).
      data_dir, split, limit, chunk_size, max_memory, device, download, weights, precision, rows: as
        :func:`analyze_checkpoint` (``scores.csv``'s ``index``, the summary's ``top`` and ``kept_indices.txt`` hold
        rows of the split).
      keep_fraction: in (0, 1]: also write ``kept_indices.txt``.
      top: how many of the highest-scoring examples the summary lists.
      progress: ``progress(done, total)`` after each chunk: examples done over all members (this process's shard).

    Returns:
      The summary (also ``scores.json``): ``method``, ``definition``, ``checkpoint``, ``weights``, ``precision``,
      ``split``,
      ``num_examples``,
      ``members`` (how many were averaged) and ``member_settings``, ``mean_score``, ``keep_fraction`` and ``kept``,
      ``chunk_size``, ``seconds`` and ``top`` (rank, index, label, class and score of the highest scores).

    Under torchrun (``torchrun --nproc-per-node N -m fnclass grads --score ...``) each process scores a contiguous
    shard of the split (:func:`fnclass.distributed.split_rows`), the scores are gathered in the split's order, and
    rank 0 writes the files; every process returns the summary.

    Raises:
      InputError: a bad checkpoint or data folder.
    """
    from fnclass import distributed

    process, ckpt, dev, raw_images, labels, chosen, model, precision = _open_split(
        checkpoint_path, data_dir, split, limit, device, download, weights, precision, rows)
    members = [ckpt.member(i) for i in range(len(ckpt.members))] if ckpt.members else [ckpt]
    n, start = len(labels), time.perf_counter()
    # Each process preprocesses and scores its shard only; an example's score depends on that example alone.
    images = ckpt.preprocess(distributed.split_rows(raw_images, process).to(dev))
    shard_labels = distributed.split_rows(labels, process).to(dev)
    per_member = []
    for number, member in enumerate(members):
        params, state = tree.tree_to((member.params, member.state), dev)
        if chunk_size == "auto":  # measured on the split's first image: a shard may be empty (N < processes)
            chunk_size = auto_chunk_size(model, params, state, ckpt.preprocess(raw_images[:1].to(dev))[0],
                                         max_memory=max_memory, limit=len(images))
        before = number * len(images)
        done = (lambda count, _, before=before: progress(before + count, len(members) * len(images))) \
            if progress else None
        scores = SCORE_FUNCTIONS[method](model, params, state, images, shard_labels, chunk_size=chunk_size,
                                         progress=done)
        per_member.append(distributed.gather_rows(scores, n, process).cpu())
    scores = torch.stack(per_member).mean(0)
    order = torch.sort(scores, descending=True, stable=True).indices
    summary = {
        "method": method,
        "definition": SCORES[method] + (f"; the mean over {len(members)} members" if ckpt.members else ""),
        "checkpoint": str(checkpoint_path), "weights": ckpt.weights, "precision": precision, "split": split,
        "rows": rows if split == "train" else "split", "num_examples": n, "members": len(members),
        "member_settings": list(ckpt.members), "mean_score": float(scores.mean()),
        "keep_fraction": keep_fraction, "kept": None, "chunk_size": chunk_size,
        "processes": process.world_size if process else 1, "seconds": time.perf_counter() - start,
        "top": [{"rank": rank + 1, "index": int(chosen[i]), "label": int(labels[i]),
                 "class": ckpt.classes[int(labels[i])], "score": float(scores[i])}
                for rank, i in enumerate(order[:top])],
    }
    kept = None if keep_fraction is None else torch.sort(chosen[kept_indices(scores, keep_fraction)]).values
    summary["kept"] = None if kept is None else len(kept)
    if process is None or process.writes:
        _write_scores(Path(out_dir), summary, labels, scores, per_member if ckpt.members else [], kept, chosen)
    distributed.finish(process)
    return summary


def _write_scores(out_dir: Path, summary: dict, labels, scores, per_member: list, kept, rows) -> None:
    """scores.csv, scores.json and (with a keep fraction) kept_indices.txt, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if kept is not None:
        write_atomic(out_dir / "kept_indices.txt", "".join(f"{i}\n" for i in kept.tolist()).encode())
    write_atomic(out_dir / "scores.csv", _scores_csv(labels, scores, per_member, rows))
    write_json(out_dir / "scores.json", summary)


def _open_split(checkpoint_path, data_dir, split: str, limit, device: str, download: bool, weights: str,
                precision: str, rows: str):
    """A torchrun job joined (or None), the checkpoint (its ``weights``), the device, the uint8 images and labels
    analysed (checked against the checkpoint) with their rows of the split, the vmappable model in ``precision``
    and that precision resolved: what the analysis commands start from. ``rows``: ``"run"`` takes, of the training
    split, the rows the checkpoint's run trained on (:func:`training_rows`, as ``fnclass influence``); ``"split"``
    every row; the first ``limit`` of them either way."""
    from fnclass import distributed

    process = distributed.from_environment(device)
    ckpt = load_checkpoint(checkpoint_path, weights=weights)
    dev = distributed.device_of(process, pick_device(device))
    precision, _ = resolve_precision(precision, dev, name="--precision")
    if rows not in ("run", "split"):
        raise ValueError(f"rows {rows!r}: expected run or split")
    folder = data_folder(process, data_dir, ckpt.config.data.dataset, download)
    if split == "train" and rows == "run":
        raw_images, labels = data.load_split(folder, split)
        ckpt.check_split(folder, raw_images, labels)
        chosen = training_rows(ckpt, labels, limit)
        raw_images, labels = raw_images[chosen], labels[chosen]
    else:
        raw_images, labels = data.load_split(folder, split, limit=limit)
        ckpt.check_split(folder, raw_images, labels)
        chosen = torch.arange(len(labels))
    return process, ckpt, dev, raw_images, labels, chosen, vmap_model(ckpt, precision), precision


def _scores_csv(labels: torch.Tensor, scores: torch.Tensor, per_member: list[torch.Tensor], rows) -> bytes:
    """scores.csv: index (the row of the split), label, score and one score_member<i> column per member (9 digits:
    float32 exactly)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "label", "score", *[f"score_member{i}" for i in range(len(per_member))]])
    columns = [scores.tolist(), *[member.tolist() for member in per_member]]
    for i, (row, label) in enumerate(zip(rows.tolist(), labels.tolist())):
        writer.writerow([row, label, *[f"{column[i]:.9g}" for column in columns]])
    return buffer.getvalue().encode()
