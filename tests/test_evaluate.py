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


def test_images_with_a_nan_or_inf_logit_in_any_view_are_counted():
    """``nonfinite_logits`` counts the images one of whose views (plain, mirrored, translated) had a nan or inf
    logit: an eval step that poisons image 3's plain view, image 5's mirrored view only and image 9 with inf, on
    images whose views all differ, counted against the hand-made list; the members and their ensemble alike."""
    from fnclass.training.evaluate import evaluate_members

    count = 40
    table, images, _ = _fixed_logits(10, count)
    images[:, 0, 1] = 0  # each image's index in the first pixel, 0 beside it: a mirrored view has them swapped

    def step_of(poison: bool):
        def eval_step(params, state, x):
            first, second = x[:, 0, 0, 0].round().long(), x[:, 0, 0, -1].round().long()
            index, mirrored = first + second, second != 0
            logits = table[index].clone()
            if poison:
                logits[(index == 3) & ~mirrored] = float("nan")  # the plain view of image 3
                logits[(index == 5) & mirrored] = float("nan")  # the mirrored view only
                logits[index == 9, 2] = float("inf")
            return logits
        return eval_step

    labels = torch.randint(0, 10, (count,), generator=torch.Generator().manual_seed(1))
    args = dict(mean=torch.zeros(1, 3, 1, 1), std=torch.full((1, 3, 1, 1), 1 / 255), batch_size=16)
    clean = evaluate_dataset(step_of(False), None, None, images, labels, tta=1, **args)
    assert clean["nonfinite_logits"] == 0
    plain = evaluate_dataset(step_of(True), None, None, images, labels, **args)
    assert plain["nonfinite_logits"] == 2  # images 3 and 9: the mirrored view is not evaluated without TTA
    with_tta = evaluate_dataset(step_of(True), None, None, images, labels, tta=1, **args)
    assert with_tta["nonfinite_logits"] == 3  # and image 5's mirror
    both = evaluate_members(lambda p, s, x: step_of(p)(p, s, x), [(False, None), (True, None)], images, labels,
                            tta=1, **args)
    assert [m["nonfinite_logits"] for m in both["members"]] == [0, 3] and both["ensemble"]["nonfinite_logits"] == 3
