"""The report's figures: one function per figure, each returning a matplotlib `Figure`.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot), so nothing lands in a global
figure registry and no GUI backend is involved: `save_figure` renders PNGs with Agg. Sizes are
chosen for GitHub, which shows a PNG at its pixel width up to about 900 px: at DPI 100 a figure
at most 9 inches wide is shown unscaled, so a 9 pt font stays 9 pt (tick labels 8 pt).
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from matplotlib import colormaps, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from tinylm.files import atomic_path

DPI = 100
MAX_WIDTH = 9.0  # inches: 900 px at DPI, the widest GitHub shows without shrinking
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "figure.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3,
}
# Token labels on a heatmap need at least this much room each (8 pt text plus a little air).
LABEL_PITCH_IN = 0.14
# Attention rows sum to 1 over up to T keys, so most probabilities are small: a square-root
# colour scale keeps a spread-out head visible next to one that puts everything on a token.
ATTENTION_NORM = dict(gamma=0.5, vmin=0.0, vmax=1.0)
ATTENTION_LABEL = "attention probability (square-root scale)"


def styled(build: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure under the report's font sizes (rc params are read when artists are made)."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs) -> Figure:
        with rc_context(STYLE):
            return build(*args, **kwargs)
    return wrapper


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(min(width, MAX_WIDTH), height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write a PNG atomically; no Software/date metadata, so the same figure gives the same bytes."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})


@styled
def bytes_per_token_chart(rows: Sequence[tuple[str, float, str]]) -> Figure:
    """Horizontal bars: UTF-8 bytes per token of each tokenizer on the same text (higher = shorter
    sequences). rows: (label, bytes per token, family); bars of one family share a colour."""
    families = list(dict.fromkeys(family for _, _, family in rows))
    colours = {family: f"C{i}" for i, family in enumerate(families)}
    values = [value for _, value, _ in rows]
    fig = new_figure(7.5, 1.2 + 0.38 * len(rows))
    ax = fig.add_subplot()
    bars = ax.barh(range(len(rows)), values, color=[colours[family] for _, _, family in rows])
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_xlabel("UTF-8 bytes per token (validation text)")
    ax.set_ylabel("tokenizer")
    ax.set_title("Tokenizer compression: bytes per token")
    ax.grid(axis="y", visible=False)
    return fig


@styled
def loss_curves(train_steps: Sequence[int], train_loss: Sequence[float], val_steps: Sequence[int],
                val_loss: Sequence[float], batch_tokens: int) -> Figure:
    """Train and val loss against optimizer step (left) and against training tokens seen (right).

    Tokens seen before the forward at step s are s * batch_tokens (every step consumes one batch)."""
    fig = new_figure(9, 3.6)
    by_step, by_tokens = fig.subplots(1, 2, sharey=True)
    for ax, scale in ((by_step, 1), (by_tokens, batch_tokens)):
        ax.plot(np.asarray(train_steps) * scale, train_loss, label="train (batch)", color="tab:blue", lw=1.2)
        ax.plot(np.asarray(val_steps) * scale, val_loss, label="validation", color="tab:orange", lw=1.5,
                marker="o", ms=3.5)
        ax.legend()
    by_step.set_xlabel("optimizer step")
    by_step.set_ylabel("cross-entropy loss (nats/token)")
    by_step.set_title("Loss vs step")
    by_tokens.set_xlabel("training tokens seen")
    by_tokens.set_ylabel("cross-entropy loss (nats/token)")
    by_tokens.xaxis.set_major_formatter(EngFormatter(sep=""))
    by_tokens.set_title("Loss vs tokens")
    return fig


@styled
def training_dynamics(lr: tuple[Sequence[int], Sequence[float]], grad_norm: tuple[Sequence[int], Sequence[float]],
                      tokens_per_s: tuple[Sequence[int], Sequence[float]], grad_clip: float | None = None) -> Figure:
    """Learning rate schedule, global gradient norm (before clipping) and throughput, each against step."""
    fig = new_figure(9, 3.0)
    axes = fig.subplots(1, 3)
    axes[0].plot(*lr, color="tab:green")
    axes[0].set_ylabel("learning rate")
    axes[0].set_title("Learning rate")
    axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[1].plot(*grad_norm, color="tab:red", label="before clipping")
    if grad_clip is not None:
        axes[1].axhline(grad_clip, color="black", ls="--", lw=1, label=f"clip at {grad_clip:g}")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("global L2 norm of gradients")
    axes[1].set_title("Gradient norm")
    axes[1].legend()
    axes[2].plot(*tokens_per_s, color="tab:purple")
    axes[2].set_ylabel("tokens / s")
    axes[2].yaxis.set_major_formatter(EngFormatter(sep=""))
    axes[2].set_ylim(bottom=0)
    axes[2].set_title("Training throughput")
    for ax in axes:
        ax.set_xlabel("optimizer step")
    return fig


# Where a scatter label may go, in points from its marker: right, left, above, below, then the
# same directions further out (a leader line then ties the label to its marker).
LABEL_OFFSETS = [(dx * r, dy * r) for r in (1, 2.5, 4) for dx, dy in ((7, 0), (-7, 0), (0, 8), (0, -8))]
MARKER_AREA = 28  # scatter marker size, pt^2


def _place_labels(fig: Figure, ax, xs: np.ndarray, ys: np.ndarray, names: Sequence[str]) -> None:
    """Label each point at the first offset where the text overlaps no other label and no marker and
    stays inside the axes: sweeps crowd (top-k 50, top-p 0.9 and min-p often score alike)."""
    fig.canvas.draw()  # the final layout first: overlaps are tested in display pixels
    renderer = fig.canvas.get_renderer()
    area = ax.get_window_extent()
    markers = ax.transData.transform(np.column_stack([xs, ys]))
    radius = math.sqrt(MARKER_AREA) / 2 * fig.dpi / 72 + 1
    taken = []
    for i, name in enumerate(names):
        others = np.delete(markers, i, axis=0)
        for dx, dy in LABEL_OFFSETS:
            label = ax.annotate(name, (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                                va="bottom" if dy > 0 else "top" if dy < 0 else "center")
            box = label.get_window_extent(renderer)
            near = box.padded(radius)
            hits_marker = any(near.contains(x, y) for x, y in others)
            inside = area.x0 <= box.x0 and box.x1 <= area.x1 and area.y0 <= box.y0 and box.y1 <= area.y1
            if inside and not hits_marker and not any(box.overlaps(other) for other in taken):
                break
            label.remove()
        else:  # nowhere free: the nearest spot, overlapping
            dx, dy = LABEL_OFFSETS[0]
            label = ax.annotate(name, (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                                va="center")
            box = label.get_window_extent(renderer)
        if (dx, dy) not in LABEL_OFFSETS[:4]:  # moved away: a leader line from the marker to the label's edge
            mx, my = markers[i]
            edge = ax.transData.inverted().transform((np.clip(mx, box.x0, box.x1), np.clip(my, box.y0, box.y1)))
            ax.plot([xs[i], edge[0]], [ys[i], edge[1]], color="0.6", lw=0.6, zorder=1)
        label.set_in_layout(False)  # placed for this layout, so it must not change it
        taken.append(box)


@styled
def diversity_vs_coherence(points: Mapping[str, tuple[float, float]]) -> Figure:
    """One labelled point per decoding config: distinct-2 (diversity) against the model's perplexity of
    its own samples (lower = text the model itself finds likely, a proxy for coherence)."""
    fig = new_figure(8, 5.2)
    ax = fig.add_subplot()
    names = list(points)
    xs = np.array([points[name][0] for name in names])
    ys = np.array([points[name][1] for name in names])
    ax.scatter(xs, ys, s=MARKER_AREA, color="tab:blue", zorder=3)
    if ys.min() > 0 and ys.max() / ys.min() > 10:
        ax.set_yscale("log")
    ax.margins(x=0.2, y=0.12)
    ax.set_xlabel("distinct-2 (share of unique word bigrams per sample)")
    ax.set_ylabel("self-perplexity (model's ppl of its own sample)")
    ax.set_title("Decoding: diversity vs coherence")
    _place_labels(fig, ax, xs, ys, names)
    return fig


def _label_stride(count: int, side_in: float) -> int:
    """Label every n-th token so that labels keep LABEL_PITCH_IN of room each."""
    return max(1, math.ceil(count * LABEL_PITCH_IN / side_in))


def _show_attention(ax, probs: np.ndarray):
    """Heatmap of one head; the future keys a causal query cannot see are left blank, not 0."""
    T = probs.shape[-1]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    ax.grid(False)
    return ax.imshow(np.ma.masked_array(probs, mask=future), cmap=cmap, norm=PowerNorm(**ATTENTION_NORM),
                     interpolation="nearest")


@styled
def attention_grid(probs: np.ndarray) -> Figure:
    """Heatmaps of every head (columns) of every layer (rows): probs [n_layer, n_head, T, T],
    query position down, key position across. One shared colour scale from 0 to 1."""
    n_layer, n_head, T, _ = probs.shape
    panel = min(2.2, (MAX_WIDTH - 0.8) / n_head)
    fig = new_figure(panel * n_head + 0.8, panel * n_layer + 0.7)
    axes = fig.subplots(n_layer, n_head, squeeze=False, sharex=True, sharey=True)
    image = None
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            image = _show_attention(ax, probs[layer, head])
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel("query position")
            if layer == n_layer - 1:
                ax.set_xlabel("key position")
    fig.colorbar(image, ax=axes, shrink=0.6, label=ATTENTION_LABEL)
    fig.suptitle(f"Attention of every head on a {T}-token validation story")
    return fig


@styled
def attention_head(probs: np.ndarray, tokens: Sequence[str], title: str) -> Figure:
    """One head's attention [T, T] with the tokens written along both axes."""
    T = probs.shape[0]
    side = min(MAX_WIDTH - 1.6, max(4.0, T * LABEL_PITCH_IN))
    fig = new_figure(side + 1.6, side + 1.0)
    ax = fig.add_subplot()
    image = _show_attention(ax, probs)
    stride = _label_stride(T, side)
    ticks = list(range(0, T, stride))
    ax.set_xticks(ticks, [tokens[i] for i in ticks], rotation=90)
    ax.set_yticks(ticks, [tokens[i] for i in ticks])
    ax.set_xlabel("key token (attended to)")
    ax.set_ylabel("query token (attending)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label=ATTENTION_LABEL)
    return fig


@styled
def weight_histograms(groups: Mapping[str, Mapping[str, np.ndarray]]) -> Figure:
    """One panel per weight kind; in each, one step histogram per layer (or per embedding table).
    groups: {panel title: {series label: flat weights}}. Counts on a log axis show the tails."""
    n = len(groups)
    columns = min(4, n)
    rows = math.ceil(n / columns)
    fig = new_figure(9, 2.5 * rows + 0.5)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, series) in zip(axes, groups.items()):
        low = min(float(w.min()) for w in series.values())
        high = max(float(w.max()) for w in series.values())
        bins = np.linspace(low, high, 61) if high > low else 61
        for label, weights in series.items():
            ax.hist(weights, bins=bins, histtype="step", lw=1.1, label=label)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("Weight distributions per matrix and layer")
    return fig


@styled
def spectral_norm_chart(norms: Mapping[str, Sequence[float]]) -> Figure:
    """Largest singular value of each weight matrix, one line per matrix kind, against layer."""
    fig = new_figure(8, 4.2)
    ax = fig.add_subplot()
    markers = "osD^vP*X"
    for i, (name, values) in enumerate(norms.items()):
        ax.plot(range(len(values)), values, marker=markers[i % len(markers)], label=name)
    layers = len(next(iter(norms.values())))
    ax.set_xticks(range(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("spectral norm (largest singular value)")
    ax.set_ylim(bottom=0)
    ax.set_title("Spectral norm of each weight matrix per layer")
    ax.legend(title="matrix", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
