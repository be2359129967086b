"""Pictures: detections drawn on images, prediction next to ground truth, training curves,
attention maps, sampling points and the Hungarian matching (from :mod:`detrkit.explain`). The
evaluation's pictures (precision-recall curves, confusion matrix, F1 curve) are drawn beside
their data in :mod:`detrkit.analysis`, with :func:`figure` and :func:`save_png` from here.

Boxes are drawn with :func:`torchvision.utils.draw_bounding_boxes`. Figures are
matplotlib ``Figure`` objects on an Agg canvas, never pyplot: pyplot keeps global state
(the current figure, the chosen backend, figures that stay open until closed) that would
leak into the caller's program.
"""
from __future__ import annotations

import csv
import inspect
import math
import os
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageColor
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

PathLike = Union[str, os.PathLike]
Color = Union[str, tuple[int, int, int]]

# Well-separated colours (Tableau 10 with its gray swapped for yellow: gray boxes vanish on
# gray scenes); a class keeps its colour across images.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#ffd92f", "#bcbd22", "#17becf")

# The metrics of results.png, each in its own panel after the losses.
CURVE_METRICS = ("AP", "AP50", "AP75")

# Captions on a box-coloured band read on any background. Newer torchvision can draw them
# (fill_labels, label_colors); older versions draw the caption text in the box colour.
_FILLED_CAPTIONS = {"fill_labels", "label_colors"} <= set(inspect.signature(draw_bounding_boxes).parameters)


def draw_detections(image: Tensor, boxes: Tensor, labels: Sequence[str], scores: Optional[Tensor] = None,
                    colors: Optional[Union[Color, Sequence[Color]]] = None, *, width: int = 2) -> Tensor:
    """Draw boxes with "name 0.93" captions (just "name" without ``scores``).

    Args:
        image: ``(3, H, W)`` uint8 tensor.
        boxes: ``(N, 4)`` absolute ``(x0, y0, x1, y1)`` in pixels of ``image``.
        labels: N class names.
        scores: optional ``(N,)`` confidences, printed with two decimals.
        colors: one colour for all boxes or one per box (PIL names, "#rrggbb" or RGB tuples);
            by default each class name gets a fixed colour of :data:`PALETTE`.
        width: line width in pixels.

    Returns:
        A new ``(3, H, W)`` uint8 tensor on the CPU; ``image`` is not modified.
    """
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"image must be a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    image = image.detach().cpu()
    boxes = torch.as_tensor(boxes).detach().cpu().float().reshape(-1, 4)
    labels = [str(name) for name in labels]
    if len(labels) != len(boxes):
        raise ValueError(f"got {len(boxes)} boxes but {len(labels)} labels")
    if len(boxes) == 0:
        return image.clone()  # draw_bounding_boxes warns on an empty box list
    captions = labels
    if scores is not None:
        scores = torch.as_tensor(scores).detach().cpu().float().reshape(-1)
        if len(scores) != len(boxes):
            raise ValueError(f"got {len(boxes)} boxes but {len(scores)} scores")
        captions = [f"{name} {score:.2f}" for name, score in zip(labels, scores.tolist())]
    if colors is None:
        colors = [class_color(name) for name in labels]
    elif _is_one_color(colors):
        colors = [colors] * len(boxes)
    else:
        colors = list(colors)
        if len(colors) != len(boxes):
            raise ValueError(f"got {len(boxes)} boxes but {len(colors)} colors")
    # A box past the border is drawn along the border, not dropped; draw_bounding_boxes
    # itself only refuses boxes with x1 < x0 or y1 < y0.
    h, w = image.shape[1:]
    boxes = torch.stack([boxes[:, 0].clamp(0, w - 1), boxes[:, 1].clamp(0, h - 1),
                         boxes[:, 2].clamp(0, w - 1), boxes[:, 3].clamp(0, h - 1)], dim=1)
    style = {}
    if _FILLED_CAPTIONS:
        style = dict(fill_labels=True, label_colors=[_text_color(c) for c in colors])
    return draw_bounding_boxes(image, boxes, labels=captions, colors=colors, width=width, **style)


def class_color(name: str) -> str:
    """The palette colour of a class name: the same in every image and every run."""
    # crc32, not hash(): Python salts str hashes per process.
    return PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def _is_one_color(colors) -> bool:
    # "red" or (255, 0, 0) is one colour; ("red", "blue") or [(255, 0, 0)] is one per box.
    return isinstance(colors, str) or (isinstance(colors, tuple) and len(colors) == 3
                                       and all(isinstance(v, int) for v in colors))


def _text_color(color: Color) -> str:
    """Black text on light bands, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = ImageColor.getrgb(color)[:3] if isinstance(color, str) else color[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def save_image(image: Tensor, path: PathLike) -> Path:
    """Save a ``(3, H, W)`` uint8 tensor (or float in [0, 1]); the suffix picks the format.

    Parent folders are created. Returns the path.
    """
    image = image.detach().cpu()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"image must be a (3, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return path


def side_by_side(pred_img: Tensor, gt_img: Tensor, path: PathLike, *,
                 titles: tuple[str, str] = ("prediction", "ground truth"), dpi: int = 100) -> Path:
    """Save prediction and ground truth pictures next to each other, with titles, as PNG.

    Both are ``(3, H, W)`` uint8 tensors (e.g. from :func:`draw_detections`); they may
    differ in size. Parent folders are created. Returns the path.
    """
    images = [_to_hwc(pred_img), _to_hwc(gt_img)]
    height = max(img.shape[0] for img in images)
    width = sum(img.shape[1] for img in images)
    # Roughly one image pixel per figure pixel, plus room for the titles.
    fig = figure(figsize=(max(width / dpi, 4.0), max(height / dpi, 2.0) + 0.5), dpi=dpi)
    for ax, img, title in zip(fig.subplots(1, 2), images, titles):
        ax.imshow(img)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    return save_png(fig, path, dpi)


def plot_training_curves(results_csv_path: PathLike, out_png: PathLike) -> Path:
    """Plot a results.csv as PNG: one small panel per loss term and metric (see
    :func:`training_curves_figure`). Returns the output path."""
    return save_png(training_curves_figure(results_csv_path), out_png, 100)


def training_curves_figure(results_csv_path: PathLike):
    """A grid of small panels, one per series of a results.csv, each with its own y axis.

    The series are the loss columns (those with "loss" in their name: ``train_loss``, the
    weighted total, first, then each term such as ``train_loss_ce``) and the metrics ``AP``,
    ``AP50``, ``AP75``, in that order, at most five panels a row (as Ultralytics' results.png).
    Separate axes keep a term of 0.05-2 readable beside a total of ~20. The csv has a header row
    and one row per epoch; empty or non-numeric cells (epochs without evaluation) are skipped,
    not drawn as 0; without an ``epoch`` column the row number counts from 1. A file with one
    row, or a header only, still gives a figure. Returns the matplotlib Figure.
    """
    with open(results_csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    epochs = _column(rows, "epoch") if "epoch" in columns else np.arange(1, len(rows) + 1, dtype=float)
    # Totals (train_loss) before their terms (train_loss_ce, ...); otherwise the csv's order.
    losses = sorted((c for c in columns if "loss" in c.lower()), key=lambda c: not c.lower().endswith("loss"))
    series = losses + [c for c in CURVE_METRICS if c in columns]
    cols = min(5, max(1, len(series)))
    nrows = max(1, math.ceil(len(series) / cols))
    fig = figure(figsize=(2.7 * cols, 2.2 * nrows), dpi=100)
    # One epoch axis for all, also where AP is sparse; each panel keeps its tick labels.
    axes = np.atleast_1d(fig.subplots(nrows, cols, sharex=True)).reshape(-1)
    for ax in axes:
        ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes[max(1, len(series)):]:
        fig.delaxes(ax)  # the unused cells of the last row
    if not series:
        axes[0].text(0.5, 0.5, "no loss or metric columns", ha="center", va="center", color="gray")
        axes[0].axis("off")
    for ax, name in zip(axes, series):
        metric = name in CURVE_METRICS
        _plot_panel(ax, epochs, _column(rows, name), name, "no evaluation yet" if metric else "no values yet")
        if metric and np.isfinite(_column(rows, name)).any():
            ax.set_ylim(bottom=0)  # AP on an absolute scale: 0.30 vs 0.31 should look close
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Looking inside the model (data from detrkit.explain)
# ---------------------------------------------------------------------------------------------
def draw_explanation(explanation, path: PathLike, *, cols: int = 4, panel: float = 3.0, dpi: int = 100) -> Path:
    """One PNG: the detections, then each detection's decoder cross-attention, then each
    reference point's encoder self-attention, each map upsampled onto the image.

    ``explanation`` is a :class:`detrkit.explain.Explanation`. Maps are shown scaled to their
    own maximum (the colour says where a query looks most, not how much in absolute terms).
    Returns the path.
    """
    e = explanation
    n, p = len(e.boxes), len(e.points)
    fig, axes, image, captions, colors = _detections_grid(e, 1 + n + p, cols, panel, dpi)
    for i in range(n):
        ax = axes[1 + i]
        _overlay(ax, image, e.upsample(e.decoder_attention[i:i + 1])[0])
        _boxes(ax, e.boxes[i:i + 1], [str(i + 1)], [colors[i]])
        ax.set_title(f"decoder: {captions[i]} (query {int(e.queries[i])})", fontsize=9)
    for j in range(p):
        ax = axes[1 + n + j]
        _overlay(ax, image, e.upsample(e.encoder_attention[j:j + 1])[0])
        x, y = e.points[j].tolist()
        ax.plot([x], [y], marker="o", markersize=8, markerfacecolor="white", markeredgecolor="black")
        ax.set_title(f"encoder: point ({x:.0f}, {y:.0f})", fontsize=9)
    fig.suptitle("last decoder layer: cross-attention of each detection;  last encoder layer: self-attention "
                 "of each point  (mean over heads)", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi)


def draw_sampling(explanation, path: PathLike, *, cols: int = 3, panel: float = 4.0, dpi: int = 100) -> Path:
    """One PNG: the detections, then one panel per detection with its box and the points its query
    sampled in the last decoder layer (every head), coloured by attention weight (scaled to the
    detection's largest), one marker per feature level. ``explanation`` is a
    :class:`detrkit.explain.SamplingExplanation`. Returns the path."""
    e = explanation
    n = len(e.boxes)
    fig, axes, image, captions, colors = _detections_grid(e, 1 + n, cols, panel, dpi)
    height, width = image.shape[:2]
    for i in range(n):
        ax = axes[1 + i]
        ax.imshow(image)
        _boxes(ax, e.boxes[i:i + 1], [str(i + 1)], [colors[i]])
        weight = e.weights[i] / e.weights[i].max().clamp(min=1e-12)  # (heads, P)
        for level, marker in zip(range(len(e.strides)), "osD^v"):
            xy, w = e.points[i][:, e.levels == level].reshape(-1, 2), weight[:, e.levels == level].reshape(-1)
            ax.scatter(xy[:, 0], xy[:, 1], c=w, cmap="viridis", vmin=0, vmax=1, s=8 + 40 * w, marker=marker,
                       edgecolors="white", linewidths=0.3, label=f"stride {e.strides[level]}")
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.legend(loc="lower right", fontsize=6, markerscale=0.8)
        ax.set_title(f"{captions[i]} (query {int(e.queries[i])})", fontsize=9)
    fig.suptitle(f"sampling points of each detection's query ({e.layer}); colour, size: attention weight", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path, dpi)


def _detections_grid(e, count: int, cols: int, panel: float, dpi: int):
    """A figure of ``count`` panels, the first showing the explanation's detections: ``(fig, axes, image
    (H, W, 3), captions, colors)``, one caption and colour per detection."""
    image = _to_hwc(e.image)
    cols = min(cols, count)
    rows = math.ceil(count / cols)
    fig = figure(figsize=(panel * cols, (panel + 0.2) * rows + 0.3), dpi=dpi)  # room for each panel's title
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax in axes:
        ax.axis("off")
    captions = [f"{i + 1} {name} {score:.2f}" for i, (name, score) in enumerate(zip(e.names, e.scores.tolist()))]
    colors = [class_color(name) for name in e.names]
    n = len(e.boxes)
    axes[0].imshow(image)
    _boxes(axes[0], e.boxes, captions, colors)
    axes[0].set_title(f"{n} detection{'s' if n != 1 else ''}" if n else "no detection above the threshold", fontsize=9)
    return fig, axes, image, captions, colors


def draw_matching(matching, path: PathLike, *, dpi: int = 100) -> Path:
    """One PNG: the targets (solid), the prediction the matcher assigned to each (dashed, same
    colour, joined to it), the unmatched queries faded (grey), and a table of each pair's cost
    terms. ``matching`` is a :class:`detrkit.explain.Matching`. Returns the path.
    """
    m = matching
    image = _to_hwc(m.image)
    fig = figure(figsize=(11, 5.6), dpi=dpi)
    ax, ax_text = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 0.95]})
    ax.imshow(image)
    ax.axis("off")
    matched = {q for q, _ in m.pairs}
    unmatched = [q for q in range(len(m.pred_boxes)) if q not in matched]
    for q in unmatched:
        _boxes(ax, m.pred_boxes[q:q + 1], [""], ["white"], alpha=0.5, width=0.8)
    for k, (q, t) in enumerate(sorted(m.pairs, key=lambda pair: pair[1])):
        color = PALETTE[t % len(PALETTE)]
        _boxes(ax, m.target_boxes[t:t + 1], [f"T{t + 1}"], [color], width=2.5)
        _boxes(ax, m.pred_boxes[q:q + 1], [f"q{q}"], [color], linestyle="--", width=1.5, caption_below=True)
        (tx, ty), (px, py) = ((b[:2] + b[2:]) / 2 for b in (m.target_boxes[t], m.pred_boxes[q]))
        ax.plot([float(tx), float(px)], [float(ty), float(py)], color=color, linewidth=1)
    for t in range(len(m.target_boxes)):
        if t not in {t for _, t in m.pairs}:  # more targets than queries: left unmatched
            _boxes(ax, m.target_boxes[t:t + 1], [f"T{t + 1}"], ["black"], width=2.5)
    ax.set_title(f"{len(m.target_boxes)} targets, {len(m.pred_boxes)} queries: {len(m.pairs)} matched "
                 f"(dashed), {len(unmatched)} trained as \"no object\" (faded)", fontsize=9)

    w = m.weights
    cls = {"-p": "-p(class)", "1 - p": "1 - p(class)", "focal": "focal(p) - focal(1-p)"}[m.class_cost_formula]
    lines = [f"cost = {w['class']:g} * class + {w['bbox']:g} * L1 + {w['giou']:g} * (-GIoU)",
             f"class term: {cls}", "",
             f"{'target':<14}{'query (its best class)':<26}{'class':>7}{'L1':>7}{'-GIoU':>7}{'total':>8}"]
    order = sorted(range(len(m.pairs)), key=lambda k: m.pairs[k][1])
    for k in order:
        q, t = m.pairs[k]
        c = {name: float(v[k]) for name, v in m.costs.items()}
        lines.append(f"{f'T{t + 1} {m.target_names[t]}':<14}{f'q{q} {m.pred_names[q]} {float(m.pred_scores[q]):.2f}':<26}"
                     f"{c['class']:>7.2f}{c['bbox']:>7.3f}{c['giou']:>7.2f}{c['total']:>8.2f}")
    if not m.pairs:
        lines.append("(no targets: every query is trained towards \"no object\")")
    best_unmatched = sorted(unmatched, key=lambda q: -float(m.pred_scores[q]))[:5]
    if best_unmatched:
        lines += ["", "best-scoring unmatched queries (duplicates are", "trained towards \"no object\" too):"]
        lines += [f"  q{q} {m.pred_names[q]} {float(m.pred_scores[q]):.2f}" for q in best_unmatched]
    ax_text.axis("off")
    ax_text.text(0.0, 1.0, "\n".join(lines), family="monospace", fontsize=8.5, va="top", ha="left",
                 transform=ax_text.transAxes)
    fig.tight_layout()
    return save_png(fig, path, dpi)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def figure(figsize: tuple[float, float], dpi: int):
    """A matplotlib Figure on its own Agg canvas: no pyplot, no global state."""
    # matplotlib is imported here: it takes a noticeable fraction of a second to load and
    # only these figures need it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself to fig; no pyplot, no global backend switch
    return fig


def save_png(fig, path: PathLike, dpi: int) -> Path:
    """Save ``fig`` as PNG at ``path`` (parent folders made). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def _to_hwc(image: Tensor) -> np.ndarray:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a (3, H, W) tensor, got {tuple(image.shape)}")
    image = image.detach().cpu()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).numpy()  # (H, W, 3)


def _column(rows: list[dict], name: str) -> np.ndarray:
    """One csv column as floats, NaN where a cell is empty or not a number."""
    values = []
    for row in rows:
        try:
            values.append(float(row.get(name) or "nan"))
        except ValueError:
            values.append(math.nan)
    return np.asarray(values, dtype=float)


def _plot_panel(ax, epochs: np.ndarray, values: np.ndarray, title: str, empty_note: str) -> None:
    from matplotlib.ticker import MaxNLocator

    keep = np.isfinite(values) & np.isfinite(epochs)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if keep.any():
        # Markers make a single epoch (or a metric measured every few epochs) visible.
        ax.plot(epochs[keep], values[keep], marker="o", markersize=2.5, linewidth=1.2)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, color="gray", fontsize=8)


def _overlay(ax, image: np.ndarray, heat: Tensor) -> None:
    """An attention map over the image, scaled to its own maximum."""
    heat = heat.detach().cpu().float()
    heat = heat / heat.max().clamp(min=1e-12)
    ax.imshow(image)
    ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=1)


def _boxes(ax, boxes: Tensor, captions: Sequence[str], colors: Sequence[Color], *, linestyle: str = "-",
           alpha: float = 1.0, width: float = 2.0, caption_below: bool = False) -> None:
    """xyxy boxes as matplotlib rectangles (crisp at any figure size), with captions on a band."""
    from matplotlib.patches import Rectangle

    for box, caption, color in zip(torch.as_tensor(boxes).reshape(-1, 4).tolist(), captions, colors):
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=width,
                               linestyle=linestyle, alpha=alpha))
        if caption:
            ax.text(x1 if caption_below else x0, y1 if caption_below else y0, caption, fontsize=7,
                    color=_text_color(color), va="top" if caption_below else "bottom",
                    ha="right" if caption_below else "left", alpha=alpha,
                    bbox=dict(facecolor=color, edgecolor="none", pad=1, alpha=0.85 * alpha))
