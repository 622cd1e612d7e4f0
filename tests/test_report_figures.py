"""The report's figures: one panel per head, labels that stay readable, sizes that fit GitHub."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from matplotlib.text import Text

from tinylm.report import figures


@pytest.mark.parametrize("n_layer, n_head", [(1, 1), (3, 2), (2, 6)])
def test_attention_grid_has_one_heatmap_per_head_of_every_layer(n_layer, n_head):
    probs = np.tril(np.full((n_layer, n_head, 8, 8), 0.1))
    fig = figures.attention_grid(probs)
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == n_layer * n_head
    titles = {ax.get_title() for ax in heatmaps}
    assert titles == {f"layer {l} head {h}" for l in range(n_layer) for h in range(n_head)}
    assert fig.get_figwidth() <= figures.MAX_WIDTH


def test_head_figure_thins_token_labels_so_they_stay_readable():
    T = 200
    fig = figures.attention_head(np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None],
                                  [f"t{i}" for i in range(T)], "one head")
    (ax,) = [ax for ax in fig.axes if ax.images]
    labels = ax.get_xticklabels()
    fig.canvas.draw()  # lay out, so the axes have their final size
    box = ax.get_window_extent()
    assert 1 < len(labels) < T
    for side_px in (box.width, box.height):
        assert side_px / fig.dpi / len(labels) >= 0.11  # inches per label: 8 pt text needs ~0.11
    assert all(label.get_fontsize() >= 8 for label in labels)


def test_scatter_labels_of_close_points_overlap_no_label_and_no_marker():
    # Five configs with nearly the same scores, as sampling configs often have.
    points = {f"config_{i}": (0.9 + 0.002 * i, 15.0 + 0.1 * i) for i in range(5)} | {"greedy": (0.2, 6.0)}
    fig = figures.diversity_vs_coherence(points)
    fig.canvas.draw()
    (ax,) = fig.axes
    labels = {text.get_text(): Text.get_window_extent(text) for text in ax.texts}  # words, no leader line
    assert sorted(labels) == sorted(points)
    for a, b in itertools.combinations(labels.values(), 2):
        assert not a.overlaps(b)
    markers = dict(zip(points, ax.transData.transform(list(points.values()))))
    for name, box in labels.items():
        assert not any(box.contains(*xy) for other, xy in markers.items() if other != name)
        assert ax.get_window_extent().contains(*box.p0) and ax.get_window_extent().contains(*box.p1)


def test_figures_have_titles_labelled_axes_and_fit_the_page():
    steps = np.arange(0, 100, 10)
    built = [
        figures.bytes_per_token_chart([("ours", 3.0, "ours"), ("GPT-2", 4.0, "GPT-2")]),
        figures.loss_curves(steps, 5 - steps / 50, steps[::5], 5 - steps[::5] / 50, batch_tokens=512),
        figures.training_dynamics((steps, steps * 1e-5), (steps, 1 + steps / 10), (steps, 1000 + steps), 1.0),
        figures.weight_histograms({"attn.q": {"layer 0": np.random.default_rng(0).normal(size=100),
                                               "layer 1": np.random.default_rng(1).normal(size=100)}}),
        figures.spectral_norm_chart({"attn.q": [1.0, 1.2], "mlp.fc": [2.0, 2.5]}),
    ]
    for fig in built:
        assert fig.get_figwidth() <= figures.MAX_WIDTH
        for ax in (ax for ax in fig.axes if ax.get_visible()):
            assert ax.get_title() or fig.get_suptitle()
            assert ax.get_xlabel() and ax.get_ylabel()
            assert all(label.get_fontsize() >= 8 for label in ax.get_xticklabels() + ax.get_yticklabels())
            if len(ax.get_lines()) > 1 and ax.get_title() != "Learning rate":
                assert ax.get_legend() is not None
