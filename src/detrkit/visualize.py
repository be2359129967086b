"""Pictures: detections drawn on images, prediction next to ground truth, training curves.

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
    fig = _figure(figsize=(max(width / dpi, 4.0), max(height / dpi, 2.0) + 0.5), dpi=dpi)
    for ax, img, title in zip(fig.subplots(1, 2), images, titles):
        ax.imshow(img)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    return _save_png(fig, path, dpi)


def plot_training_curves(results_csv_path: PathLike, out_png: PathLike) -> Path:
    """Plot a results.csv: losses per epoch (left) and AP / AP50 per epoch (right), as PNG.

    The csv has a header row and one row per epoch. Loss columns are those with "loss" in
    their name (``train_loss``, ``train_loss_ce``, ...); metric columns are ``AP`` and
    ``AP50``. Empty or non-numeric cells (epochs without evaluation) are skipped, not
    drawn as 0. Without an ``epoch`` column the row number counts from 1. A file with one
    row, or without metric columns, still gives a figure. Returns the output path.
    """
    with open(results_csv_path, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    epochs = _column(rows, "epoch") if "epoch" in columns else np.arange(1, len(rows) + 1, dtype=float)
    loss_columns = [c for c in columns if "loss" in c.lower()]
    metric_columns = [c for c in ("AP", "AP50") if c in columns]

    fig = _figure(figsize=(11, 4.2), dpi=100)
    ax_loss, ax_metric = fig.subplots(1, 2, sharex=True)  # same epoch axis, also when AP is sparse
    _plot_panel(ax_loss, epochs, {c: _column(rows, c) for c in loss_columns}, "loss", "no loss columns")
    _plot_panel(ax_metric, epochs, {c: _column(rows, c) for c in metric_columns}, "COCO AP",
                "no evaluation yet")
    if any(math.isfinite(v) for c in metric_columns for v in _column(rows, c)):
        ax_metric.set_ylim(bottom=0)  # AP on an absolute scale: 0.30 vs 0.31 should look close
    fig.tight_layout()
    return _save_png(fig, out_png, 100)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _figure(figsize: tuple[float, float], dpi: int):
    # matplotlib is imported here: it takes a noticeable fraction of a second to load and
    # only these figures need it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself to fig; no pyplot, no global backend switch
    return fig


def _save_png(fig, path: PathLike, dpi: int) -> Path:
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


def _plot_panel(ax, epochs: np.ndarray, series: dict, ylabel: str, empty_note: str) -> None:
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for name, values in series.items():
        keep = np.isfinite(values) & np.isfinite(epochs)
        if not keep.any():
            continue
        # Markers make a single epoch (or a metric measured every few epochs) visible.
        ax.plot(epochs[keep], values[keep], marker="o", markersize=3, label=name)
        drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if drawn:
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, color="gray")
