"""Typed, frozen run configuration read from TOML and validated once, at the edge.

A run's config has the sections ``[model]``, ``[data]``, ``[optim]``, ``[train]``, ``[checkpoint]``, ``[members]``
and ``[privacy]``, one frozen dataclass each. :func:`load_config` reads a TOML file, applies ``--set key=value``
overrides and raises :class:`ConfigError` (one line naming the file, the key and what is allowed) on
an unknown key, a wrong type or an impossible value.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import itertools
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fnclass.errors import InputError
from fnclass.io import read_small


class ConfigError(InputError):
    """A config file, override or value is invalid; the message names the key and the fix."""


MAX_EPOCHS = 1_000_000  # a million epochs of 50,000 single-image steps keeps every step counter far inside int64
MAX_CONFIG_BYTES = 1 << 20  # the shipped configs are under 2 KB; a config of a MiB is not a config


NORMS = ("batch", "group")


@dataclass(frozen=True)
class ModelConfig:
    """Which network, and its shape. Fields left ``None`` take the named model's defaults (see
    :func:`fnclass.models.resolve`, which also checks the model-specific keys)."""

    name: str = "resnet_attn"
    num_classes: int | None = None  # None: the data folder's classes.txt (10 for a model built without data)
    widths: tuple[int, ...] | None = None  # channels per stage
    depths: tuple[int, ...] | None = None  # residual blocks per stage (resnet_attn only)
    stem_width: int | None = None  # channels of the first convolution (fast/tiny)
    attn_after: tuple[int, ...] | None = None  # stage indices followed by self-attention
    attn_layers: int | None = None  # attention blocks at each of those stages
    attn_heads: int | None = None
    attn_impl: str = "sdpa"  # "sdpa" (fused kernels) or "math" (faster under vmap)
    bn_momentum: float = 0.1  # torch.nn.BatchNorm2d's default
    dropout: float = 0.0  # before the classifier
    whiten: bool = False  # fast/tiny: a frozen patch-whitening first layer fitted to the training data (airbench)
    whiten_kernel: int = 2  # patch size of that layer: 2x2 patches give 2*3*2*2 = 24 channels (both signs)
    dirac_init: bool = False  # start 3x3 convs as identities on their first in-channels filters (airbench)
    norm: str = "batch"  # "batch" (BatchNorm) or "group" (GroupNorm: no statistics across examples; for [privacy])
    norm_groups: int = 16  # GroupNorm's groups (min(norm_groups, channels) at each layer; De et al. 2022 use 16)
    weight_standardization: bool = False  # standardise each conv filter before use (Qiao et al.; pairs with GroupNorm)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values (the model's own checks: :func:`fnclass.models.resolve`)."""
        _check(isinstance(self.name, str) and self.name != "", "model.name", self.name, "a model name")
        _check(self.num_classes is None or self.num_classes >= 2, "model.num_classes", self.num_classes,
               "an integer >= 2 (or leave it out: the data folder's classes.txt)")
        _check(self.attn_impl in ("sdpa", "math"), "model.attn_impl", self.attn_impl, '"sdpa" or "math"')
        _check(0.0 <= self.bn_momentum <= 1.0, "model.bn_momentum", self.bn_momentum, "a number in [0, 1]")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a number in [0, 1)")
        _check(1 <= self.whiten_kernel <= 4, "model.whiten_kernel", self.whiten_kernel, "an integer in 1..4")
        _check(self.norm in NORMS, "model.norm", self.norm, " or ".join(f'"{name}"' for name in NORMS))
        _check(1 <= self.norm_groups <= 65536, "model.norm_groups", self.norm_groups, "an integer in 1..65536")


# A data folder's name, used as ~/.cache/fnclass/<dataset>: no path separators, not hidden, not "..".
DATASET_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how training batches are augmented."""

    dataset: str = "cifar10"  # names the cache folder ~/.cache/fnclass/<dataset>; torchvision's are downloaded
    data_dir: str | None = None  # a canonical .npy folder; else --data-dir, $FNCLASS_DATA, the cache
    train_limit: int | None = None  # use only the first N training images (quick runs, tests)
    train_indices: str | None = None  # train only on these rows of train_images.npy: a .npy, .txt or .csv file of
    # 0-based indices (fnclass.data.read_indices), e.g. the kept_indices.txt of `fnclass grads --score`
    train_weights: str | None = None  # a loss weight for each row of train_images.npy (.npy floats or .txt, one a
    # line): each example's loss is multiplied by its weight, every batch, key and augmentation as without it
    test_limit: int | None = None  # use only the first N test images
    crop_padding: int = 4  # random-crop translation in pixels (the paper's crop+flip recipe)
    pad_mode: str = "reflect"  # "reflect" or "zeros" padding for the crop
    flip: bool = True  # random horizontal flips
    alternate_flips: bool = False  # derandomised: a random half flipped in even epochs, the other half in odd ones
    cutout: int = 0  # side of a random square set to zero (0: off)
    val_size: int | float = 0  # hold out this many training images (or this fraction, < 1) to choose "best" on;
    # 0: none, and "best" is chosen on the test set (the historical default)
    val_seed: int = 0  # the held-out images depend on this, not on train.seed: every seed is scored on one split
    mixup_alpha: float = 0.0  # mixup's Beta(alpha, alpha) (timm's default when on: 0.8); 0: off
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha) (timm's default when on: 1.0); 0: off
    mix_prob: float = 1.0  # the probability that a batch is mixed at all
    mix_switch_prob: float = 0.5  # with both on: the probability of CutMix rather than mixup (timm's switch_prob)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        _check(isinstance(self.dataset, str) and DATASET_NAME.fullmatch(self.dataset) is not None, "data.dataset",
               self.dataset, "a data folder's name (it names ~/.cache/fnclass/<dataset>): letters, digits, '-', '_' "
               "and '.' (not first), at most 64 characters, such as cifar10 or svhn")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"data.{name}", value, "a positive integer (or leave it out)")
        _check(self.train_indices is None or 0 < len(self.train_indices) <= 4096, "data.train_indices",
               self.train_indices, "the path of a .npy, .txt or .csv file of training-image indices")
        _check(self.train_weights is None or 0 < len(self.train_weights) <= 4096, "data.train_weights",
               self.train_weights, "the path of a .npy or .txt file of one loss weight per training image")
        _check(self.train_weights is None or not self.mixing, "data.train_weights", self.train_weights,
               "no value with mixup or CutMix (data.mixup_alpha, data.cutmix_alpha): a mixed image holds two "
               "examples, so one example's weight is not its loss's")
        _check(self.train_limit is None or self.train_indices is None, "data.train_limit", self.train_limit,
               "no value when data.train_indices is set (both choose the training images: use one)")
        _check(0 <= self.crop_padding <= 16, "data.crop_padding", self.crop_padding, "an integer in 0..16")
        _check(self.pad_mode in ("reflect", "zeros"), "data.pad_mode", self.pad_mode, '"reflect" or "zeros"')
        _check(0 <= self.cutout <= 32, "data.cutout", self.cutout, "an integer in 0..32")
        _check(0 <= self.val_size if type(self.val_size) is int else 0 < self.val_size < 1, "data.val_size",
               self.val_size, "a number of images (an integer >= 0) or a fraction in (0, 1)")
        _check(self.val_seed >= 0, "data.val_seed", self.val_seed, "an integer >= 0")
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            _check(0 <= value <= 100, f"data.{name}", value, "a number in [0, 100] (0: off)")
        for name in ("mix_prob", "mix_switch_prob"):
            _check(0 <= getattr(self, name) <= 1, f"data.{name}", getattr(self, name), "a probability in [0, 1]")

    @property
    def mixing(self) -> bool:
        """Whether batches are mixed (mixup or CutMix): the loss then takes soft targets."""
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "one_cycle")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its learning-rate schedule."""

    name: str = "adam"  # adam, adamw or sgd
    lr: float = 1e-3  # the peak learning rate (the paper: Adam at 1e-3)
    b1: float = 0.9  # Adam's first-moment decay
    b2: float = 0.999  # Adam's second-moment decay
    eps: float = 1e-8
    momentum: float = 0.9  # SGD only
    nesterov: bool = True  # SGD only
    weight_decay: float = 0.0  # decoupled (AdamW-style for adamw and sgd); not applied to BN and biases
    clip_norm: float = 0.0  # clip the global gradient norm (0: off)
    schedule: str = "warmup_cosine"  # constant, warmup_cosine or one_cycle
    warmup_epochs: float = 1.0  # linear warm-up length (one_cycle: its rising part)
    final_lr_fraction: float = 0.01  # the lr at the end, as a fraction of the peak
    muon: bool = False  # SGD only: orthogonalise the updates of conv filters and attention matrices (Newton-Schulz)
    bias_lr_scale: float = 1.0  # lr multiplier for BatchNorm and whitening biases (airbench trains them faster)
    head_lr_scale: float = 1.0  # lr multiplier for the classifier head
    lookahead_every: int = 0  # Lookahead: pull the weights towards slow weights every N steps (0: off)
    lookahead_decay: float = 0.7738  # the slow weights' peak decay, reached with a cubic ramp (airbench: 0.95**5)
    whiten_bias_epochs: float = 0.0  # train the whitening layer's bias for this many epochs, then freeze (0: never)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        _check(self.name in OPTIMIZERS, "optim.name", self.name, f"one of {', '.join(OPTIMIZERS)}")
        _check(self.lr > 0, "optim.lr", self.lr, "a positive number")
        _check(0 <= self.b1 < 1, "optim.b1", self.b1, "a number in [0, 1)")
        _check(0 <= self.b2 < 1, "optim.b2", self.b2, "a number in [0, 1)")
        _check(self.eps > 0, "optim.eps", self.eps, "a positive number")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "a number in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.clip_norm >= 0, "optim.clip_norm", self.clip_norm, "a number >= 0 (0 turns clipping off)")
        _check(self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        _check(0 <= self.warmup_epochs <= MAX_EPOCHS, "optim.warmup_epochs", self.warmup_epochs,
               f"a number in [0, {MAX_EPOCHS:,}]")
        _check(0 <= self.final_lr_fraction <= 1, "optim.final_lr_fraction", self.final_lr_fraction,
               "a number in [0, 1]")
        _check(not self.muon or self.name == "sgd", "optim.muon", self.muon, 'false unless optim.name = "sgd"')
        for name in ("bias_lr_scale", "head_lr_scale"):
            _check(getattr(self, name) > 0, f"optim.{name}", getattr(self, name), "a positive number")
        _check(self.lookahead_every >= 0, "optim.lookahead_every", self.lookahead_every, "an integer >= 0")
        _check(0 <= self.lookahead_decay < 1, "optim.lookahead_decay", self.lookahead_decay, "a number in [0, 1)")
        _check(0 <= self.whiten_bias_epochs <= MAX_EPOCHS, "optim.whiten_bias_epochs", self.whiten_bias_epochs,
               f"a number in [0, {MAX_EPOCHS:,}]")


LOGGERS = ("none", "tensorboard")


@dataclass(frozen=True)
class TrainConfig:
    """How long and how to train and evaluate."""

    epochs: int = 100  # the paper's length
    batch_size: int = 128  # the paper's batch
    seed: int = 0
    label_smoothing: float = 0.0
    precision: str = "fp32"  # "bf16" autocasts on CUDA and the CPU (params and BN statistics stay float32); "fp16"
    # on CUDA, with dynamic loss scaling (GradScaler's rules), for GPUs without fast bf16 (V100, T4); "auto": bf16
    # where the device has native bf16 units (AMX or AVX-512 BF16 on a CPU), else fp32, recorded as resolved
    compile: bool = False  # compile the whole step; pays on a GPU, not on a CPU
    channels_last: bool = False  # channels-last images (faster convolutions on GPUs and with oneDNN on CPUs)
    eval_batch_size: int = 1000
    eval_every: int = 1  # evaluate after every N-th epoch and after the last (0: after the last only); an epoch row
    # not evaluated has no val/test columns, and "best" is chosen among the evaluated epochs
    tta: bool = False  # also report flip test-time-augmented accuracy after the last epoch
    tta_translate: bool = False  # TTA also averages one-pixel translations (airbench's level 2)
    log_every_steps: int = 50  # metrics.jsonl line and progress-bar loss every N steps (0: epoch ends only)
    grad_stats_every: int = 0  # log noise scale and per-layer gradient norms of a probe batch every N steps (0: off)
    grad_stats_examples: int = 256  # size of that fixed probe batch (the first training images, not augmented)
    nan_policy: str = "stop"  # a non-finite loss or gradient: "stop" the run (exit 3) or "skip" that update
    logger: str = "none"  # "tensorboard": also write metrics.jsonl's rows as TensorBoard events in RUN_DIR/tb
    sync_batchnorm: bool = True  # under torchrun: BatchNorm statistics over the global batch, not each process's shard
    init_from: str | None = None  # start from this checkpoint's (EMA) or export's weights: fine-tuning (--init-from)
    accumulate_steps: int = 1  # average the gradients of this many batches per optimizer step (Optax's MultiSteps)
    ema_decay: float = 0.0  # keep an exponential moving average of the weights with this decay (e.g. 0.999); 0: off
    ema_warmup: bool = True  # ramp the EMA decay up as min(decay, (1 + t) / (10 + t)) over updates t (timm, TF):
    # without it a short run's EMA still holds mostly its random initialisation
    calibrate: bool = False  # after the last epoch, fit a temperature on the validation split (data.val_size) and
    # record it in last.safetensors: calibrated probabilities in predict and every export (fnclass calibrate)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        _check(1 <= self.epochs <= MAX_EPOCHS, "train.epochs", self.epochs, f"an integer in 1..{MAX_EPOCHS:,}")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "a positive integer")
        _check(self.seed >= 0, "train.seed", self.seed, "an integer >= 0")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "a number in [0, 1)")
        _check(self.precision in ("fp32", "bf16", "fp16", "auto"), "train.precision", self.precision,
               '"fp32", "bf16", "fp16" or "auto"')
        _check(1 <= self.accumulate_steps <= 1024, "train.accumulate_steps", self.accumulate_steps,
               "an integer in 1..1024 (1: no accumulation)")
        _check(self.eval_batch_size >= 1, "train.eval_batch_size", self.eval_batch_size, "a positive integer")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every,
               "an integer >= 0 (0: evaluate after the last epoch only)")
        _check(self.log_every_steps >= 0, "train.log_every_steps", self.log_every_steps, "an integer >= 0")
        _check(self.grad_stats_every >= 0, "train.grad_stats_every", self.grad_stats_every, "an integer >= 0")
        _check(self.grad_stats_examples >= 2, "train.grad_stats_examples", self.grad_stats_examples, "an integer >= 2")
        _check(self.nan_policy in ("stop", "skip"), "train.nan_policy", self.nan_policy, '"stop" or "skip"')
        _check(self.init_from is None or 0 < len(self.init_from) <= 4096, "train.init_from", self.init_from,
               "the path of a checkpoint or a safetensors export")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "a number in [0, 1) (0: no EMA)")
        _check(self.logger in LOGGERS, "train.logger", self.logger, " or ".join(f'"{name}"' for name in LOGGERS))


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written (``last`` at every epoch end and on Ctrl-C; ``best`` on a new best)."""

    every_steps: int = 0  # also write last.safetensors every N steps (0: epoch ends only)
    keep_best: bool = True  # write best.safetensors whenever test accuracy improves
    keep: int = 2  # also keep the N most recent epoch-end checkpoints as step-NNNNNNNN.safetensors: --resume falls
    # back to them when last.safetensors fails its checksum (0: none)
    every_epochs: int = 0  # keep the checkpoint of every N-th epoch end (and of the last) for good, as
    # epoch-NNNN.safetensors: the checkpoints along the run that `fnclass influence` (TracIn) sums over (0: none)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "an integer >= 0")
        _check(self.keep >= 0, "checkpoint.keep", self.keep, "an integer >= 0")
        _check(self.every_epochs >= 0, "checkpoint.every_epochs", self.every_epochs, "an integer >= 0")


ACCOUNTANTS = ("rdp", "prv")
CLIPPINGS = ("vmap", "ghost")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differentially private training (DP-SGD): on when ``target_epsilon`` or ``noise_multiplier`` is set.

    Each example's gradient is clipped to ``max_grad_norm``, the clipped gradients are summed, Gaussian noise of
    standard deviation ``noise_multiplier * max_grad_norm`` is added and the sum divided by the expected batch
    (``train.batch_size``); batches are Poisson samples of rate ``train.batch_size / training images``. The
    accountant (Opacus', extra ``fnclass[dp]``) turns a target epsilon into the noise, and the steps into epsilon.
    """

    target_epsilon: float | None = None  # the privacy budget; the noise multiplier is chosen to spend it exactly
    noise_multiplier: float | None = None  # the noise's std / max_grad_norm; with target_epsilon: the run is refused
    # if its epochs would spend more than the target
    delta: float | None = None  # None: 1 / training images, rounded down to a power of ten (1e-5 for CIFAR-10)
    max_grad_norm: float = 1.0  # each example's gradient is clipped to this L2 norm
    accountant: str = "rdp"  # "rdp" (Renyi DP, Mironov 2017) or "prv" (privacy random variables, tighter, slower)
    augmult: int = 1  # augmentation multiplicity (De et al. 2022): an example's gradient is the mean over this many
    # augmented copies, taken before clipping, so the privacy cost is unchanged
    poisson_sampling: bool = True  # batches as the accountant assumes them; false: shuffled fixed-size batches
    chunk_size: int = 128  # examples whose per-example gradients are computed at once (bounds memory)
    clipping: str = "vmap"  # "vmap": per-example gradients of the whole model, chunk by chunk; "ghost": per-example
    # norms layer by layer from one batched pass (fnclass.privacy.ghost; eager). The same clipped sum either way

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        _check(self.target_epsilon is None or 0 < self.target_epsilon <= 1000, "privacy.target_epsilon",
               self.target_epsilon, "a number in (0, 1000] (or leave it out and give privacy.noise_multiplier)")
        _check(self.noise_multiplier is None or 0 <= self.noise_multiplier <= 1000, "privacy.noise_multiplier",
               self.noise_multiplier, "a number in [0, 1000] (or leave it out and give privacy.target_epsilon)")
        _check(self.delta is None or 0 < self.delta < 1, "privacy.delta", self.delta,
               "a number in (0, 1), below 1 / training images (or leave it out)")
        _check(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm, "a positive number")
        _check(self.accountant in ACCOUNTANTS, "privacy.accountant", self.accountant,
               " or ".join(f'"{name}"' for name in ACCOUNTANTS))
        _check(1 <= self.augmult <= 256, "privacy.augmult", self.augmult, "an integer in 1..256")
        _check(1 <= self.chunk_size <= 1 << 20, "privacy.chunk_size", self.chunk_size, "a positive integer")
        _check(self.clipping in CLIPPINGS, "privacy.clipping", self.clipping,
               " or ".join(f'"{name}"' for name in CLIPPINGS))
        if not self.enabled:  # a [privacy] section that would train without privacy, silently
            for field in dataclasses.fields(self):
                _check(getattr(self, field.name) == field.default, f"privacy.{field.name}",
                       getattr(self, field.name), "privacy.target_epsilon or privacy.noise_multiplier beside it "
                       "(without either, the run would not be private)")

    @property
    def enabled(self) -> bool:
        """Whether the run trains with DP-SGD."""
        return self.target_epsilon is not None or self.noise_multiplier is not None


# What DP-SGD cannot be combined with, and why: (key, is it in use?, allowed value, the reason).
_NOT_PRIVATE = (
    ("model.norm", lambda c: c.model.norm != "group", '"group"',
     "BatchNorm mixes the examples of a batch, so clipping each example's gradient would not bound its influence"),
    ("model.whiten", lambda c: c.model.whiten, "false", "the whitening filters are fitted to the private images"),
    ("train.precision", lambda c: c.train.precision == "fp16", '"fp32" or "bf16"',
     "a dynamic loss scale skips the steps whose gradients overflow, a data-dependent choice the accountant does "
     "not cover"),
    ("train.accumulate_steps", lambda c: c.train.accumulate_steps != 1, "1",
     "the accountant counts every noised Poisson batch as a step, so k accumulated batches add k draws of noise to "
     "one update where one larger batch (train.batch_size) adds one; privacy.chunk_size bounds memory"),
    ("data.mixup_alpha", lambda c: c.data.mixup_alpha > 0, "0",
     "a mixed image carries two examples, so clipping its gradient no longer bounds one example's influence"),
    ("data.cutmix_alpha", lambda c: c.data.cutmix_alpha > 0, "0",
     "a mixed image carries two examples, so clipping its gradient no longer bounds one example's influence"),
    ("train.grad_stats_every", lambda c: c.train.grad_stats_every > 0, "0",
     "it logs statistics of the private examples' gradients without noise"),
    ("data.train_weights", lambda c: c.data.train_weights is not None, "no value",
     "a weight above 1 scales an example's gradient past the clipping norm the accountant assumes"),
)


MAX_MEMBERS = 1024  # members of one run; each holds a whole TrainState in memory

SWEEPS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "label_smoothing": "train.label_smoothing"}


@dataclass(frozen=True)
class MembersConfig:
    """K models trained at once, as one TrainState stacked on a leading axis under ``torch.func.vmap``.

    The members are the grid of ``seeds`` and every non-empty sweep list (seeds first, then the sweeps in the
    order below); all empty means one ordinary run with ``train.seed``. Each member is exactly the single run with
    its seed and hyperparameters (keys, data order, augmentation); only values that leave the program's shapes
    alone can be swept.
    """

    seeds: tuple[int, ...] = ()  # one member per seed (--seeds 0-7); empty: train.seed
    lr: tuple[float, ...] = ()  # sweep optim.lr, one value per member (--sweep optim.lr=0.05,0.1)
    weight_decay: tuple[float, ...] = ()  # sweep optim.weight_decay
    label_smoothing: tuple[float, ...] = ()  # sweep train.label_smoothing
    per_pass: int = 0  # vmap this many members at a time within each step, to bound memory (0: all at once)
    strategy: str = "auto"  # "vmap" (one batched step), "loop" (members one after another within each step) or
    # "auto": vmap on a GPU, loop on the CPU, where vmap's grouped convolutions measured 2-5x slower than a loop

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values."""
        _check(all(s >= 0 for s in self.seeds), "members.seeds", self.seeds, "integers >= 0")
        _check(len(set(self.seeds)) == len(self.seeds), "members.seeds", self.seeds, "seeds without repeats")
        _check(all(v > 0 for v in self.lr), "members.lr", self.lr, "positive numbers")
        _check(all(v >= 0 for v in self.weight_decay), "members.weight_decay", self.weight_decay, "numbers >= 0")
        _check(all(0 <= v < 1 for v in self.label_smoothing), "members.label_smoothing", self.label_smoothing,
               "numbers in [0, 1)")
        _check(self.per_pass >= 0, "members.per_pass", self.per_pass, "an integer >= 0")
        _check(self.strategy in ("auto", "vmap", "loop"), "members.strategy", self.strategy,
               '"auto", "vmap" or "loop"')
        count = math.prod(len(values) or 1 for values in (self.seeds, self.lr, self.weight_decay,
                                                          self.label_smoothing))
        _check(count <= MAX_MEMBERS, "members", f"{count} members", f"at most {MAX_MEMBERS} members in one run")

    @property
    def active(self) -> bool:
        """Whether this run trains members (a stacked TrainState) rather than one model."""
        return bool(self.seeds or self.lr or self.weight_decay or self.label_smoothing)


@dataclass(frozen=True)
class Config:
    """A whole run's configuration, one section per dataclass."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    members: MembersConfig = MembersConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    def member_list(self) -> list[dict]:
        """The members: ``{"seed": int, "optim.lr": float, ...}`` for each, with only the swept keys besides the seed.

        A run without members has the one member ``{"seed": train.seed}``.
        """
        grid = [[("seed", s) for s in self.members.seeds or (self.train.seed,)]]
        grid += [[(SWEEPS[name], v) for v in getattr(self.members, name)] for name in SWEEPS
                 if getattr(self.members, name)]
        return [dict(choice) for choice in itertools.product(*grid)]

    def validate(self) -> Config:
        """Check every section; returns self so calls chain."""
        for section in SECTIONS:
            getattr(self, section).validate()
        _check(not self.optim.whiten_bias_epochs or self.model.whiten, "optim.whiten_bias_epochs",
               self.optim.whiten_bias_epochs, "0 unless model.whiten = true (there is no whitening bias to freeze)")
        _check(not self.train.calibrate or self.data.val_size, "train.calibrate", self.train.calibrate,
               "false unless data.val_size holds out a validation split to fit the temperature on (e.g. "
               "data.val_size = 5000); fitting it on the test split would be dishonest")
        _check(not self.data.alternate_flips or self.data.flip, "data.alternate_flips", self.data.alternate_flips,
               "false when data.flip = false")
        if self.privacy.enabled:
            for key, used, allowed, why in _NOT_PRIVATE:
                if used(self):
                    value = "on" if key == "members" else _value_of(self, key)
                    raise ConfigError(f"{key} = {shown(value)} is not allowed under [privacy]: expected {allowed} "
                                      f"({why})")
            if self.privacy.clipping == "ghost":
                _check(not self.train.compile, "train.compile", self.train.compile, 'false with privacy.clipping = '
                       '"ghost" (ghost clipping records the layers as the model runs, eagerly)')
                _check(not self.model.weight_standardization, "model.weight_standardization",
                       self.model.weight_standardization, 'false with privacy.clipping = "ghost" (a convolution then '
                       'takes standardised filters, not its parameters, so its per-example norm is not one '
                       'layer\'s), or privacy.clipping = "vmap"')
        if self.data.train_limit is not None:
            _check(self.train.batch_size <= self.data.train_limit, "train.batch_size", self.train.batch_size,
                   f"at most data.train_limit = {self.data.train_limit}")
        return self

SECTIONS = ("model", "data", "optim", "train", "checkpoint", "members", "privacy")
SECTION_CLASSES = (ModelConfig, DataConfig, OptimConfig, TrainConfig, CheckpointConfig, MembersConfig, PrivacyConfig)


def _value_of(config: Config, key: str) -> Any:
    """The value of ``section.key`` in ``config``."""
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} = {shown(value)} is not allowed: expected {allowed}")


def shown(value: Any, limit: int = 60) -> str:
    """A value's repr for a one-line error, cut to ``limit`` characters (a hostile value may be a megabyte)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _key(name: Any) -> str:
    """A key as written in TOML when it is short printable text, else its cut repr."""
    return name if isinstance(name, str) and name.isprintable() and 0 < len(name) <= 60 else shown(name)


def _nearest(name: str, choices, what: str) -> str:
    """``did you mean X? `` for the closest of ``choices`` to a mistyped ``name``, or nothing."""
    close = difflib.get_close_matches(str(name), [str(choice) for choice in choices], n=1)
    return f"did you mean {what.format(close[0])}? " if close else ""


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` (from TOML) against a dataclass field's type; lists become tuples."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {shown(value)} is not allowed: expected a list")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_coerce(item, item_type, key) for item in value)
    if type(value) is int and not -(2**63) <= value < 2**63:
        raise ConfigError(f"{key} = {shown(value)} is not allowed: expected a 64-bit integer (TOML's range)")
    if annotation is float and type(value) is int:  # bools are ints in Python, and stay refused below
        value = float(value)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if annotation in names and type(value) is not annotation:
        raise ConfigError(f"{key} = {shown(value)} is not allowed: expected {names[annotation]}")
    if annotation is float and not math.isfinite(value):
        raise ConfigError(f"{key} = {value} is not allowed: expected a finite number")
    return value


def section_from_dict(cls: type, data: dict, section: str) -> Any:
    """Build a config dataclass from a TOML table, rejecting unknown keys and wrong types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        suggestion = _nearest(unknown[0], fields, section + ".{}")
        raise ConfigError(f"unknown key {section}.{_key(unknown[0])}: {suggestion}allowed keys are "
                          f"{', '.join(sorted(fields))}")
    values = {name: _coerce(value, hints[name], f"{section}.{name}") for name, value in data.items()}
    return cls(**values)




def _unknown_section(name: str, value: Any) -> str:
    """The message for a top-level name that is not a section: a key put outside its section, or a typo."""
    owners = [section for section, cls in zip(SECTIONS, SECTION_CLASSES)
              if not isinstance(value, dict) and name in {f.name for f in dataclasses.fields(cls)}]
    if owners:
        return f"{_key(name)} = {shown(value)} is outside any section: put it under [{owners[0]}]"
    suggestion = _nearest(name, SECTIONS, "[{}]")
    return f"unknown section [{_key(name)}]: {suggestion}allowed sections are {', '.join(SECTIONS)}"


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from nested dicts (a parsed TOML document)."""
    try:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a table of sections ({', '.join(SECTIONS)}), got {shown(data)}")
        unknown = sorted(set(data) - set(SECTIONS), key=str)
        if unknown:
            raise ConfigError(_unknown_section(unknown[0], data[unknown[0]]))
        sections = {}
        for name, cls in zip(SECTIONS, SECTION_CLASSES):
            table = data.get(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{name}] must be a table of keys, got {shown(table)}")
            sections[name] = section_from_dict(cls, table, name)
        return Config(**sections).validate()
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (the value as TOML, or a bare string) into ``(["section", "key"], value)``."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        key = text.split("=", 1)[0].strip()
        owners = [section for section, cls in zip(SECTIONS, SECTION_CLASSES)
                  if key in {f.name for f in dataclasses.fields(cls)}]
        example = f"{owners[0]}.{key}=VALUE" if owners else f"{key}=VALUE" if "." in key else "optim.lr=3e-4"
        raise ConfigError(f"--set {shown(text)}: expected section.key=value, e.g. --set {example}")
    dotted, raw = text.split("=", 1)
    path = [part.strip() for part in dotted.split(".")]
    try:
        document = tomllib.loads(f"v = {raw}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return path, raw
    if set(document) != {"v"}:  # "1\n[model]\nname = 'x'" would otherwise set a second key unseen
        raise ConfigError(f"--set {shown(text)}: the value must be one TOML value, not several lines of keys")
    return path, document["v"]


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to a parsed TOML document (a new dict; the input is not modified)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) != 2:
            raise ConfigError(f"--set {shown(text)}: expected exactly section.key, e.g. optim.lr")
        data.setdefault(path[0], {})
        if not isinstance(data[path[0]], dict):
            raise ConfigError(f"--set {shown(text)}: [{path[0]}] is not a table")
        data[path[0]][path[1]] = value
    return data


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with the package, by name (``cpu``, ``fast``, ``fast95``, ``seed``)."""
    try:
        folder = Path(str(importlib.resources.files("fnclass.configs")))
    except ModuleNotFoundError:  # a checkout used without installing (PYTHONPATH): configs/ beside fnclass/
        folder = Path(__file__).resolve().parents[1] / "configs"
    return {path.stem: path for path in sorted(folder.glob("*.toml"))}


def find_config(name_or_path: str | Path) -> Path:
    """A shipped config's file for a bare name (``fast``), else the path as given."""
    text = str(name_or_path)
    shipped = shipped_configs()
    if text in shipped and not Path(text).exists():
        return shipped[text]
    path = Path(text)
    if not path.is_file():
        problem = "is a folder, not a config file" if path.is_dir() else "no such config file"
        raise ConfigError(f"{path}: {problem}; give a TOML file or one of the shipped names: "
                          f"{', '.join(sorted(shipped))}")
    return path


def read_toml(path: Path, _seen: tuple = ()) -> dict:
    """A config file's tables, with a top-level ``base = "NAME|PATH"`` merged underneath (section by section)."""
    raw = read_small(path, MAX_CONFIG_BYTES, ConfigError, "config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start} is {raw[error.start]:#04x}); TOML files are "
                          "UTF-8: save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(f"{path}: not valid TOML (arrays or tables nested too deeply)") from None
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base = {shown(base)} is not allowed: expected a shipped config's name or a path")
    try:
        base_path = find_config(base if base in shipped_configs() else path.parent / base)
    except ConfigError as error:
        raise ConfigError(f"{path}: base = {shown(base)}: {error}") from None
    if base_path.resolve() in _seen or len(_seen) > 8:
        raise ConfigError(f"{path}: base = {shown(base)} leads back to itself; remove the loop")
    merged = read_toml(base_path, (*_seen, path.resolve()))
    for section, table in data.items():
        merged[section] = {**merged[section], **table} if isinstance(table, dict) and isinstance(
            merged.get(section), dict) else table
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (or the defaults when ``path`` is None), apply ``--set`` overrides, validate.

    Args:
      path: a shipped config's name (``cpu``, ``fast``, ...) or a TOML file with the sections [model], [data],
        [optim], [train], [checkpoint], and optionally ``base = "NAME|PATH"``: the config it changes.
      overrides: ``section.key=value`` strings applied on top.

    Returns:
      The validated Config (model defaults not yet filled; see :func:`fnclass.models.resolve_config`).

    Raises:
      ConfigError: one line naming the file, the key and what is allowed.
    """
    data, source = {}, "defaults"
    if path is not None:
        path = find_config(path)
        source = str(path)
        data = read_toml(path)
    try:
        data = apply_overrides(data, list(overrides))
    except ConfigError as error:
        raise ConfigError(str(error)) from None
    return config_from_dict(data, source + (" with --set" if overrides else ""))


def config_to_dict(config: Config) -> dict:
    """The config as nested plain dicts (tuples as lists, ``None`` values left out: TOML has no null)."""
    out = {}
    for name in SECTIONS:
        section = dataclasses.asdict(getattr(config, name))
        out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in section.items() if v is not None}
    return out


def toml_value(value: Any) -> str:
    """One TOML value (the types a config holds: bool, int, float, str, list of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # Not json.dumps: JSON writes U+1F600 as a surrogate pair and leaves DEL raw, both invalid in TOML.
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or c in '"\\\x7f' else c for c in value) + '"'
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def config_to_toml(config: Config) -> str:
    """The config as a TOML document that :func:`load_config` reads back to an equal Config."""
    lines = []
    for name, section in config_to_dict(config).items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in section.items()]
        lines.append("")
    return "\n".join(lines)
