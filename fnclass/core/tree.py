"""Pytree helpers on top of optree: flat dotted paths, stacking, sizes, norms and comparisons."""

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


def tree_stack(trees: list[Any] | tuple[Any, ...]) -> Any:
    """Stack trees of the same structure leaf by leaf on a new leading axis (K models as one tree).

    The JAX idiom ``jax.tree.map(lambda *xs: jnp.stack(xs), *trees)``; :func:`tree_unstack` undoes it.

    Args:
      trees: a non-empty sequence of trees with one structure and equal leaf shapes.

    Returns:
      One tree whose leaves have shape ``(len(trees), *leaf.shape)``.
    """
    if not trees:
        raise ValueError("tree_stack needs at least one tree")
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *trees)


def tree_unstack(tree: Any) -> list[Any]:
    """Split a stacked tree along its leading axis into the list of trees it stacks (views, no copies)."""
    leaves, treedef = optree.tree_flatten(tree)
    count = len(leaves[0]) if leaves else 0
    if any(leaf.ndim == 0 or len(leaf) != count for leaf in leaves):
        raise ValueError("tree_unstack needs every leaf to have the same leading axis")
    return [optree.tree_unflatten(treedef, [leaf[i] for leaf in leaves]) for i in range(count)]


def tree_index(tree: Any, i: int) -> Any:
    """Member ``i`` of a stacked tree (views)."""
    return optree.tree_map(lambda leaf: leaf[i], tree)


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
