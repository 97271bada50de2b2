import pytest
import torch

from fnclass.core import tree


def test_flatten_paths_roundtrip():
    t = {"stages": [{"blocks": [{"w": torch.ones(2)}, {"w": torch.zeros(3)}]}], "head": {"bias": torch.ones(1)}}
    flat = tree.flatten_paths(t)
    assert list(flat) == ["head.bias", "stages.0.blocks.0.w", "stages.0.blocks.1.w"]
    back = tree.unflatten_paths(t, {k: v + 1 for k, v in flat.items()})
    assert torch.equal(back["stages"][0]["blocks"][1]["w"], torch.ones(3))
    assert tree.num_params(t) == 6


def test_unflatten_rejects_missing_and_misshaped():
    t = {"a": torch.ones(2), "b": torch.ones(3)}
    with pytest.raises(ValueError, match="missing"):
        tree.unflatten_paths(t, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match="expected shape"):
        tree.unflatten_paths(t, {"a": torch.ones(2), "b": torch.ones(4)})


def test_global_norm_matches_concatenated_norm():
    t = {"a": torch.randn(5, 3), "b": [torch.randn(7)]}
    expected = torch.cat([t["a"].flatten(), t["b"][0]]).norm()
    assert torch.allclose(tree.global_norm(t), expected)
