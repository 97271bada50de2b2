"""Evaluation metrics against hand computations: top-5 accuracy, the split names."""

import torch

from fnclass.training.evaluate import evaluate_dataset, split_metrics


def _fixed_logits(classes: int, count: int):
    """An eval step whose logits are a fixed random table looked up by the image's first pixel (its index)."""
    table = torch.randn(count, classes, generator=torch.Generator().manual_seed(0))
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 2, 2, 3).contiguous()
    step = lambda params, state, x: table[x[:, 0, 0, 0].round().long()]
    return table, images, step


def test_top5_accuracy_is_the_share_of_labels_among_the_five_highest_logits():
    table, images, step = _fixed_logits(12, 200)
    labels = torch.randint(0, 12, (200,), generator=torch.Generator().manual_seed(1))
    result = evaluate_dataset(step, None, None, images, labels, mean=torch.zeros(1, 3, 1, 1),
                              std=torch.full((1, 3, 1, 1), 1 / 255), batch_size=64)
    # by hand: rank of the label's logit among the 12 (0 = highest)
    ranks = [(table[i] > table[i, labels[i]]).sum().item() for i in range(200)]
    # float32 means of 0/1 over 200 examples: exact to float32 rounding of the quotient
    assert abs(result["top5_accuracy"] - sum(r < 5 for r in ranks) / 200) < 1e-7
    assert abs(result["accuracy"] - sum(r == 0 for r in ranks) / 200) < 1e-7
    assert 0 < result["accuracy"] < result["top5_accuracy"] < 1


def test_no_top5_with_five_classes_or_fewer():
    _, images, step = _fixed_logits(5, 20)
    labels = torch.arange(20) % 5
    result = evaluate_dataset(step, None, None, images, labels, mean=torch.zeros(1, 3, 1, 1),
                              std=torch.full((1, 3, 1, 1), 1 / 255), batch_size=64)
    assert "top5_accuracy" not in result


def test_split_metrics_names_the_split():
    result = {"loss": 1.0, "accuracy": 0.5, "top5_accuracy": 0.9, "tta_accuracy": 0.6, "predictions": None}
    assert split_metrics(result, "val") == {"val_loss": 1.0, "val_accuracy": 0.5, "val_top5_accuracy": 0.9,
                                            "val_accuracy_tta": 0.6}
