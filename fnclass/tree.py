"""Pytree helpers on top of optree: flat dotted paths, sizes, norms and comparisons."""

from __future__ import annotations

from typing import Any

import optree
import torch

tree_map = optree.tree_map
tree_leaves = optree.tree_leaves
tree_flatten = optree.tree_flatten
tree_unflatten = optree.tree_unflatten
tree_structure = optree.tree_structure


def flatten_paths(tree: Any) -> dict[str, torch.Tensor]:
    """Flatten a tree into ``{"stages.0.blocks.1.conv2.weight": leaf}`` (optree path joined by ".").

    Args:
      tree: a pytree of tensors (nested dicts, lists, tuples, named tuples).

    Returns:
      An insertion-ordered dict from dotted path to leaf, in optree's leaf order.
    """
    paths, leaves, _ = optree.tree_flatten_with_path(tree)
    return {".".join(str(part) for part in path): leaf for path, leaf in zip(paths, leaves)}


def unflatten_paths(skeleton: Any, flat: dict[str, torch.Tensor]) -> Any:
    """Rebuild a tree shaped like ``skeleton`` from a flat dict made by :func:`flatten_paths`.

    Args:
      skeleton: a tree with the wanted structure (its leaves give the expected shapes and dtypes).
      flat: dotted path to tensor; must hold exactly the skeleton's paths.

    Returns:
      A tree with the skeleton's structure and the flat dict's tensors.

    Raises:
      ValueError: when paths are missing or extra, or a shape differs from the skeleton's.
    """
    expected = flatten_paths(skeleton)
    missing = sorted(expected.keys() - flat.keys())
    extra = sorted(flat.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"tree paths differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for path, leaf in expected.items():
        if tuple(flat[path].shape) != tuple(leaf.shape):
            raise ValueError(f"{path}: expected shape {tuple(leaf.shape)}, got {tuple(flat[path].shape)}")
    return optree.tree_unflatten(optree.tree_structure(skeleton), [flat[p] for p in expected])


def num_params(tree: Any) -> int:
    """Total number of elements in the tree's leaves."""
    return sum(leaf.numel() for leaf in optree.tree_leaves(tree))


def global_norm(tree: Any) -> torch.Tensor:
    """The L2 norm of all leaves taken together, as a 0-d tensor."""
    leaves = optree.tree_leaves(tree)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(leaves)))


def tree_to(tree: Any, device=None, dtype=None) -> Any:
    """Move every tensor leaf to ``device`` (and floating leaves to ``dtype`` when given)."""
    def move(leaf):
        cast = dtype if dtype is not None and leaf.is_floating_point() else None
        return leaf.to(device=device, dtype=cast)
    return optree.tree_map(move, tree)


def tree_allclose(a: Any, b: Any, *, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """True when both trees have the same structure and every pair of leaves is close."""
    if optree.tree_structure(a) != optree.tree_structure(b):
        return False
    return all(torch.allclose(x, y, rtol=rtol, atol=atol)
               for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)))
