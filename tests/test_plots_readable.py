"""The saved figures are readable (issue 32): influence.png names each row's test example, its label and the model's
prediction in captions of at least 9 pt that overlap nothing, self_influence.png likewise, and the epoch axes of
curves.png and members.png have whole-epoch ticks only."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch

from fnclass.analysis import influence
from fnclass.run.directory import RunDirectory
from fnclass.training import members

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DPI = 100  # fnclass.io.save_figure's


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions would have saved, by file name."""
    import fnclass.io

    saved = {}

    def keep(fig, path):
        saved[Path(path).name] = fig

    monkeypatch.setattr(fnclass.io, "save_figure", keep)
    monkeypatch.setattr(members, "save_figure", keep)
    monkeypatch.setattr("fnclass.run.directory.save_figure", keep)
    yield saved
    for fig in saved.values():
        plt.close(fig)


def attribution_report(names, k=8):
    """Two test examples of the same class (cat) with ``k`` proponents and opponents each, the widest classes."""
    pick = lambda sign: [{"index": 49000 + i, "label": 1, "score": sign * 12345.678 / (i + 1)} for i in range(k)]
    return {"method": "tracin", "tests": [{"test": name, "label": 3, "proponents": pick(1), "opponents": pick(-1)}
                                         for name in names]}


def plot_attribution(figures, names, images_given, k=8):
    report = attribution_report(names, k)
    test_raw = torch.randint(0, 256, (len(names), 32, 32, 3), dtype=torch.uint8)
    train_raw = torch.randint(0, 256, (k, 32, 32, 3), dtype=torch.uint8)
    by_row = {49000 + i: i for i in range(k)}
    predicted = torch.tensor([5, 3] * (len(names) // 2))
    influence._plot_attribution(Path("influence.png"), report, test_raw, train_raw, by_row, CLASSES, images_given,
                                predicted)
    return figures["influence.png"]


def overlaps(fig, texts, images) -> list[str]:
    """The captions among ``texts`` that overlap another caption or an image, drawn at the saved dpi."""
    fig.set_dpi(DPI)
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    pictures = [image.get_window_extent(renderer) for image in images]
    found = []
    for i, (text, box) in enumerate(boxes):
        if any(box.overlaps(other) for j, (_, other) in enumerate(boxes) if j != i):
            found.append(f"{text!r} overlaps a caption")
        if any(box.overlaps(picture) for picture in pictures):
            found.append(f"{text!r} overlaps an image")
    return found


def test_each_influence_row_names_its_test_index_label_and_prediction(figures):
    fig = plot_attribution(figures, [3, 17], images_given=False)
    rows = [ax for ax in fig.axes if ax.get_subplotspec().colspan.start == 0]
    titles = [ax.get_title() for ax in rows]
    assert "test 3" in titles[0] and "label cat" in titles[0] and "predicted dog" in titles[0]
    assert "test 17" in titles[1] and "label cat" in titles[1] and "predicted cat" in titles[1]
    assert titles[0] != titles[1]


@pytest.mark.parametrize("tests, k", [(8, 8), (12, 2)])
def test_influence_captions_are_legible_at_the_saved_size(figures, tests, k):
    fig = plot_attribution(figures, list(range(tests)), images_given=False, k=k)
    captions = [ax.title for ax in fig.axes if ax.get_title()]
    assert len(captions) == tests * (1 + 2 * k)
    assert min(t.get_fontsize() for t in captions) >= 9
    assert fig.get_suptitle() and fig._suptitle.get_fontsize() >= 9
    assert "#49000\nautomobile\n1.23e+04" in [t.get_text() for t in captions]
    assert overlaps(fig, captions + [fig._suptitle], [im for ax in fig.axes for im in ax.images]) == []
    width = fig.get_size_inches()[0] * DPI
    assert width <= 2400, f"{width:.0f} px wide"


def test_influence_rows_of_given_images_name_the_file_and_the_prediction(figures):
    names = ["/some/where/deep/photo.png", "/elsewhere/a_very_long_file_name_of_a_holiday_photo.jpeg"]
    fig = plot_attribution(figures, names, images_given=True, k=3)
    titles = [ax.get_title() for ax in fig.axes if ax.get_subplotspec().colspan.start == 0]
    assert titles[0] == "photo.png\npredicted dog"
    name, guess = titles[1].split("\n")
    assert name.startswith("a_very_") and name.endswith(".jpeg") and len(name) <= 20 and guess == "predicted cat"
    assert overlaps(fig, [ax.title for ax in fig.axes if ax.get_title()], []) == []


def test_self_influence_captions_are_legible_and_name_the_example(figures):
    count = 16
    labels, predicted = torch.full((count,), 1), torch.tensor([1] * 8 + [9] * 8)
    rows = torch.arange(49000, 49000 + count)
    influence._plot_self(Path("self_influence.png"), torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8),
                         labels, predicted, torch.rand(count), torch.arange(count), rows, CLASSES)
    fig = figures["self_influence.png"]
    captions = [ax.title for ax in fig.axes if ax.get_title()]
    assert captions[0].get_text() == "#49000\nautomobile / automobile"
    assert captions[8].get_text() == "#49008\nautomobile / truck" and captions[8].get_color() == "red"
    assert min(t.get_fontsize() for t in captions) >= 9
    assert overlaps(fig, captions, [im for ax in fig.axes for im in ax.images]) == []


def whole_epochs(ax) -> list[float]:
    """The epoch axis's ticks within its view, after checking they are whole numbers."""
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    return ticks


def epoch_rows(epochs: int, evaluated: set[int]) -> list[dict]:
    return [{"epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.1 * e,
             **({"test_loss": 2.1 / e, "test_accuracy": 0.1 * e} if e in evaluated else {})}
            for e in range(1, epochs + 1)]


@pytest.mark.parametrize("epochs, evaluated", [(3, {3}), (1, {1}), (7, {2, 4, 6, 7})])
def test_the_curves_have_whole_epoch_ticks(figures, epochs, evaluated):
    run = SimpleNamespace(epoch_rows=lambda: epoch_rows(epochs, evaluated), selection="test_accuracy")
    RunDirectory._plot_curves(run, Path("curves.png"))
    for ax in figures["curves.png"].axes:
        assert ax.get_xlabel() == "epoch"
        whole_epochs(ax)


@pytest.mark.parametrize("epochs, evaluated", [(3, {3}), (4, {1, 2, 3, 4})])
def test_the_members_plot_has_whole_epoch_ticks_and_shows_a_single_evaluation(figures, epochs, evaluated):
    rows = [{"member": m, "epoch": e, "test_accuracy": 0.3 + 0.01 * m} for m in range(2) for e in sorted(evaluated)]
    run = SimpleNamespace(writes=True, member_rows=lambda: rows, selection="test_accuracy", path=Path("run"),
                          epoch_rows=lambda: epoch_rows(epochs, evaluated))
    members.plot_members(run, [{"seed": 0}, {"seed": 1}])
    (ax,) = figures["members.png"].axes
    assert ax.get_xlabel() == "epoch"
    ticks = whole_epochs(ax)
    assert ticks == [3] if evaluated == {3} else len(ticks) >= 4
    assert all(line.get_marker() not in (None, "None", "") for line in ax.get_lines())
