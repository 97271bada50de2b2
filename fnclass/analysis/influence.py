"""Data attribution from per-example gradients: which training examples made a prediction.

**TracIn** (Pruthi et al. 2020, "Estimating Training Data Influence by Tracing Gradient Descent"), the checkpoint
form TracInCP: the influence of a training example ``z`` on a test example ``z'`` is

    sum over checkpoints k of  lr_k * <g_k(z), g_k(z')>

with ``g_k`` the gradient of the plain cross-entropy at checkpoint ``k`` (BatchNorm in eval mode, as
``fnclass grads``) and ``lr_k`` the mean learning rate of the steps the checkpoint ends (recorded by the run, see
``checkpoint.every_epochs``). Positive: a step on ``z`` lowers the loss on ``z'`` (a proponent); negative: an
opponent. The self-influence ``sum_k lr_k |g_k(z)|^2`` ranks training examples for data debugging: mislabelled
and atypical examples come first. A checkpoint holding K members contributes the mean over its members.

**Random projections** (Johnson-Lindenstrauss): each per-example gradient is multiplied by a ``P x D`` Gaussian
matrix with entries N(0, 1/D), drawn block by block from fnclass keys, so ``<Rg, Rg'>`` estimates ``<g, g'>``
without bias and no ``N x P`` gradient matrix is ever held; the chunk's gradients are the largest tensor.

**TRAK** (Park et al. 2023, "TRAK: Attributing Model Behavior at Scale"): for every model (each member of each
checkpoint) the projected gradients ``phi`` of the margin ``logit_y - logsumexp_{j != y} logit_j``, then
``phi(z') (Phi^T Phi + damping mean(diag) I)^-1 phi(z)``, averaged over the models and multiplied by the mean of
``1 - p_y(z)``.
The more independently trained models (``--seeds``), the better its estimate.

**EK-FAC** influence functions (``--method ekfac``, :mod:`fnclass.analysis.ekfac`): ``-(1/N) grad margin(z')^T
(F + lambda)^-1 grad loss(z)`` at the final checkpoint, the Fisher in each layer's eigenvalue-corrected Kronecker
eigenbasis; :func:`ekfac_scores` and :func:`ekfac_self_influence` here.

**LDS** (the linear datamodeling score, Park et al. 2023): how well an attribution predicts retraining. For M
random subsets of the training set, the sum of the scores of a subset's examples is compared with the output
(the margin) of a model retrained on that subset: the Spearman correlation over the subsets, per test example.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from fnclass import data
from fnclass.analysis import ekfac
from fnclass.analysis.gradients import (
    _chunks,
    auto_chunk_size,
    data_folder,
    make_per_example_grad_fn,
    training_rows,
    vmap_model,
)
from fnclass.core import random, tree
from fnclass.core.losses import margin, per_example_cross_entropy
from fnclass.errors import InputError
from fnclass.run.checkpoint import Checkpoint, CheckpointError, load_checkpoint

METHODS = ("tracin", "trak", "ekfac")
DEFAULT_TRAK_DIM = 2048
DEFAULT_TRAK_DAMPING = 0.1  # x mean(diag(Phi^T Phi)): best for 8 members in RESULTS.md's LDS sweep; safe at D >= N


class AlongRun(NamedTuple):
    """A checkpoint that attribution sums over, and the weights of its models (one per member)."""

    path: Path
    checkpoint: Checkpoint
    learning_rates: tuple[float, ...]

    def models(self, device: torch.device) -> list[tuple[object, object]]:
        """``(params, state)`` of each model the file holds (its members, or itself), on ``device``."""
        ckpt = self.checkpoint
        pairs = ([(ckpt.params, ckpt.state)] if not ckpt.members else
                 [(tree.tree_index(ckpt.params, i), tree.tree_index(ckpt.state, i)) for i in range(len(ckpt.members))])
        return [tree.tree_to(pair, device) for pair in pairs]


def checkpoint_paths(sources: Sequence[str | Path]) -> list[Path]:
    """The checkpoint files of ``sources``: files as given, and for a run directory the checkpoints it kept along
    the run (``checkpoints/epoch-*.safetensors``, written with ``checkpoint.every_epochs``), in epoch order."""
    paths = []
    for source in map(Path, sources):
        if source.is_dir():
            folder = source / "checkpoints" if (source / "checkpoints").is_dir() else source
            along = sorted(folder.glob("epoch-*.safetensors"))
            if not along:
                raise CheckpointError(f"{source}: no checkpoints kept along the run (epoch-*.safetensors); train "
                                      "with --set checkpoint.every_epochs=1, or pass checkpoint files")
            paths += along
        elif source.is_file():
            paths.append(source)
        else:
            raise CheckpointError(f"{source}: no such checkpoint file or run directory")
    return paths


def load_along(sources: Sequence[str | Path], *, uniform: bool = False, weights: str = "auto") -> list[AlongRun]:
    """Load the checkpoints of ``sources`` (see :func:`checkpoint_paths`) with their learning rates.

    Args:
      sources: checkpoint files and run directories.
      uniform: weigh every checkpoint 1 instead of its learning rate (for files without the record).
      weights: ``"auto"`` (each checkpoint's EMA when it has one, as ``fnclass eval`` takes it), ``"ema"`` or
        ``"raw"`` (the trained weights, whose steps the recorded learning rates scale: TracIn's derivation).

    Raises:
      CheckpointError: one line, for a file without a learning rate (unless ``uniform``), or checkpoints of
        different models, classes or normalisations.
    """
    along = []
    for path in checkpoint_paths(sources):
        ckpt = load_checkpoint(path, weights=weights)
        count = max(len(ckpt.members), 1)
        if uniform:
            rates = (1.0,) * count
        else:
            if "learning_rate" not in ckpt.metadata:
                raise CheckpointError(f"{path}: no learning rate recorded (written mid-epoch or by an older "
                                      "fnclass); use epoch-end checkpoints, or pass --uniform to weigh each one 1")
            try:
                value = json.loads(ckpt.metadata["learning_rate"])
                rates = tuple(float(v) for v in (value if isinstance(value, list) else [value]))
            except (ValueError, TypeError):
                raise CheckpointError(f"{path}: metadata 'learning_rate' is malformed (the file was altered); use "
                                      "another file") from None
            if len(rates) != count or not all(math.isfinite(r) and r >= 0 for r in rates):
                raise CheckpointError(f"{path}: metadata 'learning_rate' does not fit its {count} model(s) (the "
                                      "file was altered); use another file")
        along.append(AlongRun(path, ckpt, rates))
    first = along[0].checkpoint
    for item in along[1:]:
        ckpt = item.checkpoint
        if (ckpt.config.model != first.config.model or ckpt.classes != first.classes or ckpt.mean != first.mean
                or ckpt.std != first.std):
            raise CheckpointError(f"{item.path}: another model, classes or normalisation than {along[0].path}; "
                                  "pass checkpoints of one run")
    return along


class Projection:
    """``x -> x @ R``, ``R`` a (P, dim) matrix of N(0, 1/dim) entries drawn from ``key`` block by block.

    ``R`` is drawn once and kept when it fits ``cache_bytes`` (default: the memory budget of
    :func:`fnclass.analysis.gradients.memory_budget`, a quarter of the available RAM or half the free GPU memory);
    otherwise its blocks are drawn again for every chunk. A block is a ``torch.Generator`` stream seeded from
    ``fold_in(key, leaf, block)``, so the same key gives the same matrix on a device type. Apply it to a list of
    per-example gradient leaves, each ``(N, *shape)``.
    """

    def __init__(self, key: torch.Tensor, sizes: Sequence[int], dim: int, device: torch.device,
                 block_rows: int | None = None, cache_bytes: int | None = None):
        from fnclass.analysis.gradients import memory_budget

        self.key, self.sizes, self.dim, self.device = key, list(sizes), dim, torch.device(device)
        self.block_rows = block_rows or max(1, (1 << 24) // dim)
        budget = memory_budget(self.device) if cache_bytes is None else cache_bytes
        self.cache = {} if sum(self.sizes) * dim * 4 <= budget else None

    def block(self, leaf: int, start: int) -> torch.Tensor:
        """Rows ``start:start + block_rows`` of leaf ``leaf``'s part of ``R``."""
        if self.cache is not None and (leaf, start) in self.cache:
            return self.cache[(leaf, start)]
        seed = int(random.bits(random.fold_in(random.fold_in(self.key, leaf), start), (1,))[0])
        generator = torch.Generator(self.device).manual_seed(seed)
        rows = min(self.block_rows, self.sizes[leaf] - start)
        matrix = torch.randn(rows, self.dim, generator=generator, device=self.device) / math.sqrt(self.dim)
        if self.cache is not None:
            self.cache[(leaf, start)] = matrix
        return matrix

    def __call__(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(len(leaves[0]), self.dim, device=self.device)
        for index, leaf in enumerate(leaves):
            flat = leaf.flatten(1).float()
            for start in range(0, flat.shape[1], self.block_rows):
                out += flat[:, start:start + self.block_rows] @ self.block(index, start)
        return out


def features(model, params, state, images: torch.Tensor, labels: torch.Tensor, *, chunk_size: int | None,
             output: Callable = per_example_cross_entropy, project: Projection | None = None
             ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Per chunk: ``(rows, gradient features, logits)``, the features the flattened per-example gradients of
    ``output`` (``(c, P)``), or their projections (``(c, dim)``)."""
    grad_fn = make_per_example_grad_fn(model, state, loss_fn=output)
    for part in _chunks(len(images), chunk_size):
        grads, (_, logits) = grad_fn(params, images[part], labels[part])
        leaves = tree.tree_leaves(grads)
        flat = project(leaves) if project is not None else torch.cat([leaf.flatten(1).float() for leaf in leaves], 1)
        yield part, flat, logits


class Problem(NamedTuple):
    """What attribution runs on: the model, the training rows, the test examples (already preprocessed)."""

    model: object
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    chunk_size: int | None


def _training_shard(problem: Problem, process) -> Problem:
    """The problem with this process's contiguous shard of the training rows (all of them for a single process)."""
    from fnclass.distributed import split_rows

    return problem._replace(train_images=split_rows(problem.train_images, process),
                            train_labels=split_rows(problem.train_labels, process))


def _gather_columns(scores: torch.Tensor, total: int, process) -> torch.Tensor:
    """The ``(T, total)`` scores whose columns the processes' training shards hold, on every process."""
    from fnclass.distributed import gather_rows

    return gather_rows(scores.T, total, process).T


def tracin_scores(along: Sequence[AlongRun], problem: Problem, *, proj_dim: int | None = None,
                  key: torch.Tensor | None = None, progress: Callable | None = None, process=None) -> torch.Tensor:
    """TracInCP scores, ``(T, N)``: test example by training example (see the module docstring).

    Exact with ``proj_dim`` None (the test gradients, ``T x P``, are held; the training gradients stream); with
    ``proj_dim`` D, every model's gradients are projected by its own :class:`Projection` (from ``fold_in(key,
    model)``), so both sides stream. Members of a checkpoint are averaged. With a data-parallel ``process``
    (:mod:`fnclass.distributed`) each process streams its shard of the training rows past all the test gradients
    and the columns are gathered, so every process returns what one process would.
    """
    n = len(problem.train_images)
    problem = _training_shard(problem, process)
    device = problem.train_images.device
    scores = torch.zeros(len(problem.test_images), len(problem.train_images), device=device)
    key = random.key(0) if key is None else key
    done, total = 0, _gradients_total(along, len(problem.train_images))
    for k, item in enumerate(along):
        models = item.models(device)
        for m, (params, state) in enumerate(models):
            weight = item.learning_rates[m] / len(models)
            project = None
            if proj_dim:
                sizes = [leaf.numel() for leaf in tree.tree_leaves(params)]
                project = Projection(random.fold_in(random.fold_in(key, k), m), sizes, proj_dim, device)
            test = torch.cat([f for _, f, _ in features(problem.model, params, state, problem.test_images,
                                                        problem.test_labels, chunk_size=problem.chunk_size,
                                                        project=project)])
            for part, train, _ in features(problem.model, params, state, problem.train_images, problem.train_labels,
                                           chunk_size=problem.chunk_size, project=project):
                scores[:, part] += weight * (test @ train.T)
                done += part.stop - part.start
                if progress:
                    progress(done, total)
    return _gather_columns(scores, n, process)


def _gradients_total(along: Sequence[AlongRun], rows: int) -> int:
    """The progress total of a pass over ``rows`` training rows at every model of ``along``."""
    return rows * sum(len(item.learning_rates) for item in along)


def self_influence(along: Sequence[AlongRun], problem: Problem, *, progress: Callable | None = None,
                   process=None) -> torch.Tensor:
    """TracIn self-influence of every training example, ``(N,)``: ``sum_k lr_k |g_k(z)|^2`` (exact). With a
    data-parallel ``process`` each process takes a shard of the training rows and the scores are gathered."""
    from fnclass.distributed import gather_rows

    n = len(problem.train_images)
    problem = _training_shard(problem, process)
    device = problem.train_images.device
    scores = torch.zeros(len(problem.train_images), device=device)
    done, total = 0, _gradients_total(along, len(problem.train_images))
    for item in along:
        models = item.models(device)
        for m, (params, state) in enumerate(models):
            grad_fn = make_per_example_grad_fn(problem.model, state)
            for part in _chunks(len(problem.train_images), problem.chunk_size):
                grads, _ = grad_fn(params, problem.train_images[part], problem.train_labels[part])
                squares = sum(leaf.flatten(1).float().pow(2).sum(1) for leaf in tree.tree_leaves(grads))
                scores[part] += item.learning_rates[m] / len(models) * squares
                done += part.stop - part.start
                if progress:
                    progress(done, total)
    return gather_rows(scores, n, process)


def trak_scores(along: Sequence[AlongRun], problem: Problem, *, proj_dim: int = DEFAULT_TRAK_DIM,
                key: torch.Tensor | None = None, damping: float = DEFAULT_TRAK_DAMPING,
                progress: Callable | None = None, process=None, projection: Callable = Projection) -> torch.Tensor:
    """TRAK scores, ``(T, N)``, over every model the checkpoints hold (see the module docstring).

    ``damping`` times the mean diagonal of ``Phi^T Phi`` is added to it before the solve (float64): a ridge that
    keeps the noise in its smallest eigenvalues from being amplified (0 is TRAK as published, which breaks down as
    ``proj_dim`` nears the number of training examples). With a data-parallel ``process`` each process projects its
    shard of the training rows; ``Phi^T Phi``, a sum over the rows, is all-reduced, and the columns are gathered.
    ``projection(key, sizes, dim, device)`` makes each model's projection (default :class:`Projection`).
    """
    from fnclass.distributed import all_sum

    n = len(problem.train_images)
    problem = _training_shard(problem, process)
    device = problem.train_images.device
    key = random.key(0) if key is None else key
    total = torch.zeros(len(problem.test_images), len(problem.train_images), device=device, dtype=torch.float64)
    residual = torch.zeros(len(problem.train_images), device=device, dtype=torch.float64)
    count, done, steps = 0, 0, _gradients_total(along, len(problem.train_images))
    for k, item in enumerate(along):
        for m, (params, state) in enumerate(item.models(device)):
            sizes = [leaf.numel() for leaf in tree.tree_leaves(params)]
            project = projection(random.fold_in(random.fold_in(key, k), m), sizes, proj_dim, device)
            train = torch.zeros(len(problem.train_images), proj_dim, device=device, dtype=torch.float64)
            correct = torch.zeros(len(problem.train_images), device=device, dtype=torch.float64)
            for part, phi, logits in features(problem.model, params, state, problem.train_images,
                                              problem.train_labels, chunk_size=problem.chunk_size, output=margin,
                                              project=project):
                train[part] = phi.double()
                correct[part] = logits.float().softmax(-1).gather(1, problem.train_labels[part, None])[:, 0].double()
                done += part.stop - part.start
                if progress:
                    progress(done, steps)
            test = torch.cat([f.double() for _, f, _ in features(
                problem.model, params, state, problem.test_images, problem.test_labels,
                chunk_size=problem.chunk_size, output=margin, project=project)])
            kernel = train.T @ train
            if process is not None:
                kernel = all_sum(kernel, process)
            kernel += damping * kernel.diagonal().mean().clamp(min=1e-30) * torch.eye(proj_dim, device=device,
                                                                                      dtype=torch.float64)
            total += (train @ torch.linalg.solve(kernel, test.T)).T
            residual += 1 - correct
            count += 1
    return _gather_columns((total / count * (residual / count)).float(), n, process)


def final_checkpoint(sources: Sequence[str | Path]) -> Path:
    """The one model EK-FAC scores with: the last of ``sources``, where a run directory stands for its final
    checkpoint (``checkpoints/last.safetensors``, or the last one kept along the run)."""
    source = Path(sources[-1])
    if source.is_dir() and (source / "checkpoints" / "last.safetensors").is_file():
        return source / "checkpoints" / "last.safetensors"
    return checkpoint_paths([source])[-1]


def _one_process(process) -> None:
    if process is not None:
        raise InputError("--method ekfac runs in one process (its factors are not sharded): run it without torchrun")


def _ekfac_mean(item: AlongRun, problem: Problem, key: torch.Tensor, damping: float, progress: Callable | None,
                score: Callable, factor_examples: int | None = None) -> tuple[torch.Tensor, dict]:
    """``score(factors, params, state, progress)`` averaged over the checkpoint's models (its members, or itself),
    each with its factors fitted on the training rows (or ``factor_examples`` of them drawn at random from
    ``key``) and labels drawn from ``fold_in(key, member)``; and what the report says of them (the covered layers
    and the parameters left out)."""
    n, total, factors = len(problem.train_images), 0, None
    fitted = problem.train_images
    if factor_examples and factor_examples < n:
        rows = random.permutation(random.fold_in(key, -1), n)[:factor_examples].sort().values
        fitted = problem.train_images[rows.to(fitted.device)]
    models = item.models(problem.train_images.device)
    each = 2 * len(fitted) + n  # two passes over the fitted rows (factors, eigenvalue correction), one to score
    ticks = (lambda start: lambda done, _: progress(start + done, each * len(models))) if progress else \
        (lambda start: None)
    for m, (params, state) in enumerate(models):
        factors = ekfac.fit(problem.model, params, state, fitted, key=random.fold_in(key, m), damping=damping,
                            chunk_size=problem.chunk_size, train_size=n, progress=ticks(each * m))
        total = total + score(factors, params, state, ticks(each * m + 2 * len(fitted)))
    return total / len(models), {"damping": damping, "factor_examples": len(fitted),
                                 "ekfac_layers": [layer.weight for layer in factors.layers],
                                 "ekfac_left_out": factors.left_out}


def ekfac_scores(item: AlongRun, problem: Problem, *, key: torch.Tensor, damping: float = ekfac.DEFAULT_DAMPING,
                 factor_examples: int | None = None, progress: Callable | None = None) -> tuple[torch.Tensor, dict]:
    """EK-FAC influence scores, ``(T, N)`` (:mod:`fnclass.analysis.ekfac`), averaged over the checkpoint's models,
    and the report's entries (:func:`_ekfac_mean`)."""
    return _ekfac_mean(item, problem, key, damping, progress, lambda factors, params, state, ticks: ekfac.scores(
        factors, problem.model, params, state, problem.train_images, problem.train_labels, problem.test_images,
        problem.test_labels, chunk_size=problem.chunk_size, progress=ticks), factor_examples)


def ekfac_self_influence(item: AlongRun, problem: Problem, *, key: torch.Tensor,
                         damping: float = ekfac.DEFAULT_DAMPING, factor_examples: int | None = None,
                         progress: Callable | None = None) -> tuple[torch.Tensor, dict]:
    """EK-FAC self-influence of every training example, ``(N,)``, averaged over the checkpoint's models."""
    return _ekfac_mean(item, problem, key, damping, progress, lambda factors, params, state, ticks:
                       ekfac.self_influence(factors, problem.model, params, state, problem.train_images,
                                            problem.train_labels, chunk_size=problem.chunk_size, progress=ticks),
                       factor_examples)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based, float64) along dim 0, tied values sharing their mean rank, as Spearman's correlation ranks."""
    ranked = torch.empty(values.shape, dtype=torch.float64)
    order = values.argsort(dim=0, stable=True)
    ranked.scatter_(0, order, torch.arange(len(values), dtype=torch.float64)[:, None].expand(values.shape))
    for j in range(values.shape[1]):
        _, inverse, counts = values[:, j].unique(return_inverse=True, return_counts=True)
        if bool((counts > 1).any()):
            sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranked[:, j])
            ranked[:, j] = (sums / counts)[inverse]
    return ranked


def linear_datamodeling_score(scores, masks, outputs) -> torch.Tensor:
    """The LDS of an attribution, per test example: ``(T,)``, in [-1, 1]; NaN for a test example whose outputs or
    predictions are all equal, or hold a NaN (a retrained model that diverged), as scipy's ``spearmanr`` gives.

    Args:
      scores: ``(T, N)`` attribution scores, test example by training example (higher: raises the output).
      masks: ``(M, N)`` bool, which training examples each of M retrained models saw.
      outputs: ``(M, T)`` each retrained model's output on each test example (TRAK's margin).

    Returns:
      For each test example, the Spearman correlation over the M models between the predicted output, the sum of
      the scores over the model's subset, and the output itself.
    """
    scores, outputs = torch.as_tensor(scores).double().cpu(), torch.as_tensor(outputs).double().cpu()
    masks = torch.as_tensor(masks).cpu()
    if scores.ndim != 2 or outputs.ndim != 2 or masks.shape != (len(outputs), scores.shape[1]) \
            or outputs.shape[1] != len(scores):
        raise ValueError(f"shapes do not fit: scores {tuple(scores.shape)} (T, N), masks {tuple(masks.shape)} (M, N), "
                         f"outputs {tuple(outputs.shape)} (M, T)")
    predicted = masks.double() @ scores.T
    a, b = _ranks(predicted), _ranks(outputs)
    a, b = a - a.mean(0), b - b.mean(0)
    lds = (a * b).sum(0) / ((a * a).sum(0) * (b * b).sum(0)).sqrt()
    lds[predicted.isnan().any(0) | outputs.isnan().any(0)] = float("nan")  # ranks would put a NaN last
    return lds.float()


def top_examples(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``scores`` the indices of its ``k`` highest (proponents) and ``k`` lowest (opponents)."""
    k = min(k, scores.shape[1])
    return scores.topk(k, dim=1).indices, (-scores).topk(k, dim=1).indices


def prepare(ckpt: Checkpoint, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) images as the checkpoint's model takes them, on ``device``."""
    return ckpt.preprocess(images.to(device))


def parse_indices(text: str, size: int) -> list[int]:
    """``"0,5,10-19"`` -> ``[0, 5, 10, ..., 19]``, each in ``range(size)``.

    Raises:
      InputError: one line naming the bad part.
    """
    chosen = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, dash, high = part.partition("-")
        if not low.isdigit() or dash and not high.isdigit():
            raise InputError(f"--test-indices {text!r}: {part!r} is not an index or a range such as 10-19")
        first, last = int(low), int(high) if dash else int(low)
        if first > last or last >= size:
            raise InputError(f"--test-indices {text!r}: {part!r} is outside the test split's 0..{size - 1}")
        chosen += range(first, last + 1)
    if not chosen:
        raise InputError(f"--test-indices {text!r}: no index given; e.g. --test-indices 0-7")
    return chosen


def _check_options(method: str, damping: float | None, proj_dim: int | None, factor_examples: int | None) -> None:
    """One line for an option the method does not take, or a bad damping (:func:`attribute`)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {METHODS}")
    if damping is not None and method == "tracin":
        raise InputError("--damping is TRAK's and EK-FAC's (--method trak or ekfac); TracIn has no curvature to damp: "
                         "drop it")
    if damping is not None and not (math.isfinite(damping) and damping >= 0):
        raise InputError(f"--damping {damping}: expected a number >= 0 (a multiple of the mean diagonal of "
                         "Phi^T Phi for trak, of each layer's mean corrected eigenvalue for ekfac), e.g. 0.1")
    if method == "ekfac" and proj_dim:
        raise InputError("--proj-dim: EK-FAC does not project (its factors are per layer): drop --proj-dim")
    if factor_examples and method != "ekfac":
        raise InputError("--factor-examples is EK-FAC's (--method ekfac): drop it")


def _method_scores(method, along, problem, proj_dim, damping, seed, factor_examples, progress, process):
    """``(scores, report entries)`` of :func:`attribute`'s method."""
    if method == "tracin":
        return tracin_scores(along, problem, proj_dim=proj_dim, key=random.key(seed), progress=progress,
                             process=process), {}
    if method == "ekfac":
        return ekfac_scores(along[-1], problem, key=random.key(seed), factor_examples=factor_examples,
                            damping=ekfac.DEFAULT_DAMPING if damping is None else damping, progress=progress)
    return trak_scores(along, problem, proj_dim=proj_dim, key=random.key(seed), damping=damping, progress=progress,
                       process=process), {}


def attribute(sources: Sequence[str | Path], out_dir: str | Path, *, data_dir=None, test_indices: str | None = None,
              image_paths: Sequence[str | Path] = (), top: int = 8, method: str = "tracin",
              proj_dim: int | None = None, damping: float | None = None, train_limit: int | None = None,
              chunk_size: int | str = "auto", max_memory: int | None = None, uniform: bool = False, seed: int = 0,
              device: str = "auto", download: bool = True, factor_examples: int | None = None,
              progress: Callable | None = None, weights: str = "auto", precision: str = "fp32") -> dict:
    """Attribute test examples (``test_indices`` of the test split, or the images ``image_paths``, which are
    attributed for the class the last checkpoint predicts) to the training examples, and write ``out_dir``:
    ``influence.csv`` and ``influence.json`` (each test example's ``top`` proponents and opponents),
    ``scores.npy`` (the whole ``(T, N)`` score matrix, float32) with ``train_indices.npy`` (its columns' rows of
    the training split) and ``influence.png`` (each test image, then its proponents and its opponents).

    Under torchrun (``torchrun --nproc-per-node N -m fnclass influence ...``) the training rows are sharded over the
    processes (:func:`tracin_scores`, :func:`trak_scores`) and rank 0 writes the files; every process returns the
    report.

    ``weights`` (``"auto"``: the EMA where a checkpoint has one; ``"ema"``; ``"raw"``) chooses each checkpoint's
    weights (:func:`load_along`); the report's ``weights`` names them. ``precision`` (``"fp32"``; ``"bf16"``:
    the per-example gradients under bf16 autocast, still float32; ``"auto"``) as
    :func:`fnclass.analysis.gradients.analyze_checkpoint`; EK-FAC computes in float32.

    Returns:
      The report (also ``influence.json``).
    """
    import time

    from fnclass import distributed

    _check_options(method, damping, proj_dim, factor_examples)
    process = distributed.from_environment(device)
    if method == "ekfac":
        _one_process(process)
        sources, uniform = [final_checkpoint(sources)], True
    along, last, dev, folder, (train_raw, train_labels, rows), precision = _open(
        sources, uniform, device, data_dir, download, train_limit, process, weights, precision, method)
    if image_paths:
        test_raw = torch.stack([torch.tensor(data.read_image(Path(p), last.input_size)) for p in image_paths])
        test_labels = _predict(last, test_raw)
        names = [str(p) for p in image_paths]
    else:
        test_all, test_all_labels = data.load_split(folder, "test")
        last.check_split(folder, test_all, test_all_labels)
        chosen = parse_indices(test_indices or "0-7", len(test_all))
        test_raw, test_labels, names = test_all[chosen], test_all_labels[chosen], chosen
    if method == "trak" and damping == 0 and (proj_dim or DEFAULT_TRAK_DIM) >= len(train_raw):
        raise InputError(f"--damping 0 with --proj-dim {proj_dim or DEFAULT_TRAK_DIM} and {len(train_raw)} training "
                         "examples: Phi^T Phi is singular when the dimension reaches their number; raise --damping "
                         "or lower --proj-dim")
    model = vmap_model(last, precision)
    train_images = prepare(last, train_raw, dev)
    size = _chunk(chunk_size, along, model, train_images, max_memory, method)
    problem = Problem(model, train_images, train_labels.to(dev), prepare(last, test_raw, dev), test_labels.to(dev),
                      size)
    if method == "trak":
        proj_dim, damping = proj_dim or DEFAULT_TRAK_DIM, DEFAULT_TRAK_DAMPING if damping is None else damping
    tick = time.perf_counter()
    scores, extra = _method_scores(method, along, problem, proj_dim, damping, seed, factor_examples, progress, process)
    damping = extra.get("damping", damping)
    seconds = time.perf_counter() - tick
    scores = scores.cpu()
    proponents, opponents = top_examples(scores, top)
    models = sum(len(item.learning_rates) for item in along)
    gradients = models * (len(train_images) + len(test_raw))
    pick = lambda idx, t: [{"index": int(rows[i]), "label": int(train_labels[i]), "score": float(scores[t, i])}
                           for i in idx]
    report = {
        "method": method, "proj_dim": proj_dim, "damping": damping, "seed": seed, "weights": _weights(along),
        "precision": precision, "checkpoints": _checkpoints(along),
        "models": models, "train_examples": len(train_images), "chunk_size": size,
        "processes": process.world_size if process else 1, "seconds": seconds,
        "gradients_per_second": gradients / seconds if seconds else None, "classes": list(last.classes), **extra,
        "tests": [{"test": name, "label": int(test_labels[t]), "proponents": pick(proponents[t], t),
                   "opponents": pick(opponents[t], t)} for t, name in enumerate(names)],
    }
    if process is None or process.writes:
        predicted = test_labels if image_paths else _predict(last, test_raw)
        _write_attribution(Path(out_dir), report, scores, rows, test_raw, train_raw, last.classes, bool(image_paths),
                           predicted)
    distributed.finish(process)
    return report


def rank_self_influence(sources: Sequence[str | Path], out_dir: str | Path, *, data_dir=None, top: int = 32,
                        train_limit: int | None = None, chunk_size: int | str = "auto",
                        max_memory: int | None = None, uniform: bool = False, device: str = "auto",
                        download: bool = True, method: str = "tracin", damping: float | None = None, seed: int = 0,
                        factor_examples: int | None = None, progress: Callable | None = None,
                        weights: str = "auto", precision: str = "fp32") -> dict:
    """Rank every training example by self-influence and write ``out_dir``: ``self_influence.csv`` (rank,
    index, label, predicted, score; highest first), ``self_influence.json`` and ``self_influence.png`` (the
    ``top`` first, titled ``label / predicted``). ``method``: ``"tracin"`` (``sum_k lr_k |g_k(z)|^2`` over the
    checkpoints) or ``"ekfac"`` (``g(z)^T H^-1 g(z) / N`` at the final checkpoint, :mod:`fnclass.analysis.ekfac`,
    labels drawn from ``seed``'s key, ``damping`` as there). ``weights`` and ``precision`` as :func:`attribute`.

    Under torchrun (TracIn only) the training rows are sharded over the processes (:func:`self_influence`, and the
    predictions) and rank 0 writes the files; every process returns the report.

    Returns:
      The report (also ``self_influence.json``).
    """
    import time

    from fnclass import distributed

    if method not in ("tracin", "ekfac"):
        raise ValueError(f"method {method!r}: expected tracin or ekfac")
    if damping is not None and method != "ekfac":
        raise InputError("--damping with --self is EK-FAC's (--method ekfac); TracIn has no curvature to damp: "
                         "drop it")
    if factor_examples and method != "ekfac":
        raise InputError("--factor-examples is EK-FAC's (--method ekfac): drop it")
    process = distributed.from_environment(device)
    if method == "ekfac":
        _one_process(process)
        sources, uniform = [final_checkpoint(sources)], True
    along, last, dev, folder, (train_raw, train_labels, rows), precision = _open(
        sources, uniform, device, data_dir, download, train_limit, process, weights, precision, method)
    model = vmap_model(last, precision)
    images = prepare(last, train_raw, dev)
    size = _chunk(chunk_size, along, model, images, max_memory, method)
    problem = Problem(model, images, train_labels.to(dev), images[:0], train_labels[:0].to(dev), size)
    extra = {}
    tick = time.perf_counter()
    if method == "ekfac":
        damping = ekfac.DEFAULT_DAMPING if damping is None else damping
        scores, extra = ekfac_self_influence(along[-1], problem, key=random.key(seed), damping=damping,
                                             factor_examples=factor_examples, progress=progress)
        scores = scores.cpu()
    else:
        scores = self_influence(along, problem, progress=progress, process=process).cpu()
    seconds = time.perf_counter() - tick
    shard = _predict(last, distributed.split_rows(train_raw, process))
    predicted = distributed.gather_rows(shard.to(dev), len(train_raw), process).cpu()  # dev: NCCL gathers there
    order = torch.argsort(scores, descending=True, stable=True)
    models = sum(len(item.learning_rates) for item in along)
    report = {
        "method": f"{method}-self", **extra, "weights": _weights(along), "precision": precision,
        "checkpoints": _checkpoints(along),
        "models": models, "train_examples": len(images), "chunk_size": size,
        "processes": process.world_size if process else 1, "seconds": seconds,
        "gradients_per_second": models * len(images) / seconds if seconds else None,
        "mean_score": float(scores.mean()), "classes": list(last.classes),
        "top": [{"index": int(rows[i]), "label": int(train_labels[i]), "predicted": int(predicted[i]),
                 "score": float(scores[i])} for i in order[:top]],
    }
    if process is None or process.writes:
        _write_self_influence(Path(out_dir), report, scores, order, predicted, train_raw, train_labels, rows,
                              last.classes, top)
    distributed.finish(process)
    return report


def _write_self_influence(out: Path, report: dict, scores, order, predicted, train_raw, train_labels, rows, classes,
                          top: int) -> None:
    """self_influence.csv/.json and self_influence.png, each written atomically."""
    from fnclass.io import write_atomic, write_json

    out.mkdir(parents=True, exist_ok=True)
    lines = ["rank,index,label,predicted,score"] + [
        f"{r + 1},{int(rows[i])},{int(train_labels[i])},{int(predicted[i])},{float(scores[i]):.8g}"
        for r, i in enumerate(order.tolist())]
    write_atomic(out / "self_influence.csv", ("\n".join(lines) + "\n").encode())
    write_json(out / "self_influence.json", report)
    _plot_self(out / "self_influence.png", train_raw, train_labels, predicted, scores, order[:top], rows, classes)


def _open(sources, uniform: bool, device: str, data_dir, download: bool, train_limit: int | None, process,
          weights: str, precision: str, method: str):
    """What both commands start from: the checkpoints (their ``weights``), the last one, this process's device, the
    data folder, the run's training split (see :func:`_training_split`) and ``precision`` resolved."""
    from fnclass.distributed import device_of
    from fnclass.io import pick_device, resolve_precision

    if method == "ekfac" and precision == "bf16":
        raise InputError("--precision bf16 with --method ekfac: EK-FAC fits its curvature in float32; drop "
                         "--precision (auto picks fp32 for it)")
    along = load_along(sources, uniform=uniform, weights=weights)
    last = along[-1].checkpoint
    dev = device_of(process, pick_device(device))
    precision = "fp32" if method == "ekfac" else resolve_precision(precision, dev, name="--precision")[0]
    folder = data_folder(process, data_dir, last.config.data.dataset, download)
    return along, last, dev, folder, _training_split(last, folder, train_limit), precision


def _checkpoints(along: list[AlongRun]) -> list[dict]:
    """The report's ``checkpoints``: each file, the weights taken from it and its learning rates."""
    return [{"path": str(item.path), "weights": item.checkpoint.weights, "learning_rates": list(item.learning_rates)}
            for item in along]


def _weights(along: list[AlongRun]) -> str:
    """The report's ``weights``: ``ema`` or ``raw`` when every checkpoint gave the same, else ``mixed``."""
    chosen = {item.checkpoint.weights for item in along}
    return chosen.pop() if len(chosen) == 1 else "mixed"


def _chunk(chunk_size: int | str, along, model, images: torch.Tensor, max_memory: int | None,
           method: str = "tracin") -> int:
    """``chunk_size``, or with ``"auto"`` the chunk that fits the memory budget."""
    from fnclass.analysis.gradients import memory_budget

    if chunk_size != "auto":
        return chunk_size
    params, state = along[0].models(images.device)[0]
    if method == "ekfac":
        budget = max_memory if max_memory is not None else memory_budget(images.device)
        return ekfac.auto_chunk_size(model, params, state, images[0], budget, limit=len(images))
    return auto_chunk_size(model, params, state, images[0], max_memory=max_memory, limit=len(images))


def _training_split(ckpt: Checkpoint, folder: Path, limit: int | None):
    """The run's training images, labels and their rows of the split (see :func:`training_rows`)."""
    images, labels = data.load_split(folder, "train")
    ckpt.check_split(folder, images, labels)
    rows = training_rows(ckpt, labels, limit)
    return images[rows], labels[rows], rows


def _predict(ckpt: Checkpoint, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's predicted classes (members: their ensemble) for uint8 images, in batches of 1,000."""
    with torch.no_grad():
        return torch.cat([torch.zeros(0, dtype=torch.int64)] +  # an empty shard predicts nothing
                         [ckpt.logits(images[i:i + 1000]).argmax(1) for i in range(0, len(images), 1000)])


def _write_attribution(out: Path, report: dict, scores: torch.Tensor, rows: torch.Tensor, test_raw, train_raw,
                       classes, images_given: bool, predicted) -> None:
    """influence.csv/.json, scores.npy, train_indices.npy and influence.png, each written atomically;
    ``predicted``: the model's class for each test example (its row's title)."""
    import io as _io

    import numpy as np

    from fnclass.io import write_atomic, write_json

    out.mkdir(parents=True, exist_ok=True)
    lines = ["test,test_label,kind,rank,train_index,train_label,score"]
    for test in report["tests"]:
        for kind in ("proponents", "opponents"):
            for rank, row in enumerate(test[kind], 1):
                lines.append(f"{test['test']},{test['label']},{kind[:-1]},{rank},{row['index']},{row['label']},"
                             f"{row['score']:.8g}")
    write_atomic(out / "influence.csv", ("\n".join(lines) + "\n").encode())
    write_json(out / "influence.json", report)
    for name, array in (("scores.npy", scores.numpy().astype(np.float32)), ("train_indices.npy", rows.numpy())):
        buffer = _io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        write_atomic(out / name, buffer.getvalue())
    by_row = {int(r): i for i, r in enumerate(rows.tolist())}
    _plot_attribution(out / "influence.png", report, test_raw, train_raw, by_row, classes, images_given,
                      predicted)


def _plot_attribution(path, report, test_raw, train_raw, by_row, classes, images_given, predicted) -> None:
    """One row per test example: the test image, titled with its test index (or file name), label and the
    model's prediction, then its proponents (green captions: ``#index``, class, score) and its opponents (red).
    Captions are 9 pt at the saved 100 dpi, on 1.3-inch panels; the test column is ``wide`` panels wide for its
    title, its image padded to a panel's size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fnclass.io import save_figure

    tests = report["tests"]
    k = max(len(tests[0]["proponents"]), 1)
    wide = 1.3
    fig, axes = plt.subplots(len(tests), 1 + 2 * k, figsize=((wide + 2 * k) * 1.3, 0.5 + len(tests) * 1.9),
                             squeeze=False, gridspec_kw={"width_ratios": [wide] + [1] * (2 * k)},
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for t, test in enumerate(tests):
        axes[t, 0].imshow(test_raw[t].numpy())
        side = test_raw[t].shape[1] * (wide - 1) / 2
        axes[t, 0].set_xlim(-0.5 - side, test_raw[t].shape[1] - 0.5 + side)
        guess = classes[int(predicted[t])]
        if images_given:
            name = Path(test["test"]).name
            name = name if len(name) <= 20 else f"{name[:9]}...{name[-8:]}"
            title = f"{name}\npredicted {guess}"
        else:
            title = f"test {test['test']}\nlabel {classes[test['label']]}\npredicted {guess}"
        axes[t, 0].set_title(title, fontsize=9, fontweight="bold")
        for j, (kind, color) in enumerate((("proponents", "green"), ("opponents", "red"))):
            for i, row in enumerate(test[kind]):
                ax = axes[t, 1 + j * k + i]
                ax.imshow(train_raw[by_row[row["index"]]].numpy())
                ax.set_title(f"#{row['index']}\n{classes[row['label']]}\n{row['score']:.3g}", fontsize=9,
                             color=color)
    fig.suptitle(f"{report['method']}: proponents (green) and opponents (red) of each test image", fontsize=12)
    save_figure(fig, path)


def _plot_self(path, train_raw, labels, predicted, scores, order, rows, classes) -> None:
    """The highest self-influence examples, titled ``#index``, ``label / predicted`` (red when they differ),
    9 pt at the saved 100 dpi."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fnclass.io import save_figure

    columns = 8
    count = max(len(order), 1)
    lines = math.ceil(count / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(columns * 1.8, 0.4 + lines * 2.1), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist()):
        label, guess = classes[int(labels[i])], classes[int(predicted[i])]
        ax.imshow(train_raw[i].numpy())
        ax.set_title(f"#{int(rows[i])}\n{label} / {guess}", fontsize=9, color="black" if label == guess else "red")
    fig.suptitle("highest self-influence (label / predicted)", fontsize=12)
    save_figure(fig, path)
