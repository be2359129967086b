"""Beyond the 12 COCO numbers: which score threshold to use and which classes get confused.

:func:`f1_curve` (precision, recall and F1 against the score threshold), :func:`confusion_matrix`
and :func:`write_analysis` (those two, the precision-recall curves of :func:`detrkit.evaluate.coco_evaluation`
and a per-class table, written as files and pictures, drawn here: :func:`plot_pr_curves`,
:func:`plot_confusion_matrix`, :func:`plot_f1_curve`). Detections are in the COCO results format
(:mod:`detrkit.evaluate`).

Detections are matched to targets as COCOeval matches them (per image and class, highest score
first, each taking the unmatched target it overlaps most with IoU >= the threshold; detections
on crowd regions are ignored; at most 100 detections per image), so a detection that is a true
positive here is one at that IoU threshold in the AP computation too.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from detrkit.evaluate import GroundTruth, checked_detections, coco_evaluation, load_ground_truth
from detrkit.visualize import class_color, figure, save_png


def f1_curve(gt_json_path_or_dict: GroundTruth, detections: Sequence[dict], *, iou_threshold: float = 0.5,
             thresholds: Optional[Sequence[float]] = None) -> dict:
    """Precision, recall and F1 when only detections scoring above a threshold are kept.

    ``thresholds`` default to 0.00, 0.01, ..., 0.99; a detection is kept when its score is
    ``> threshold``, as ``detrkit predict --threshold`` keeps it. F1 ``= 2TP / (2TP + FP + FN)``.

    Returns ``{"iou_threshold", "thresholds" [N], "precision" [N], "recall" [N], "f1" [N] (all
    classes pooled), "per_class": [{"id", "name", "gt", "precision", "recall", "f1"}], "best":
    {"threshold", "f1", "precision", "recall"}}``: ``best`` is the lowest threshold with the highest
    pooled F1. Undefined values (no detection kept: precision; no target: recall) are None.
    """
    thresholds = np.round(np.arange(100) * 0.01, 2) if thresholds is None else np.asarray(thresholds, dtype=float)
    gt, dets = load_ground_truth(gt_json_path_or_dict), list(detections)
    categories, images = _per_image(gt, checked_detections(dets, {img["id"] for img in gt["images"]}))
    scores, cats, correct = [], [], []
    for img in images.values():
        matched, ignored = _match_same_class(img, iou_threshold)
        keep = ~ignored
        scores.append(img["det_scores"][keep])
        cats.append(img["det_cats"][keep])
        correct.append(matched[keep] >= 0)
    scores, cats, correct = (np.concatenate(a) for a in (scores, cats, correct))
    num_gt = np.bincount(np.concatenate([img["gt_cats"] for img in images.values()] + [np.zeros(0, int)]),
                         minlength=len(categories))

    def counts(select: np.ndarray, n_gt: int) -> dict:
        # Kept detections at each threshold: those with score > t (a suffix of the sorted scores).
        order = np.argsort(scores[select], kind="stable")
        s, c = scores[select][order], correct[select][order]
        tp_at_or_above = np.concatenate([np.cumsum(c[::-1])[::-1], [0]])  # TP among s[i:], per i
        first_kept = np.searchsorted(s, thresholds, side="right")  # index of the first score > t
        kept = len(s) - first_kept
        tp = tp_at_or_above[first_kept]
        fp, fn = kept - tp, n_gt - tp
        return {"precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn)}

    overall = counts(np.ones(len(scores), dtype=bool), int(num_gt.sum()))
    f1 = np.array([-1.0 if v is None else v for v in overall["f1"]])
    best = int(np.argmax(f1))  # the first (lowest) threshold reaching the maximum
    return {
        "iou_threshold": iou_threshold, "thresholds": thresholds.tolist(), **overall,
        "per_class": [{"id": c["id"], "name": c["name"], "gt": int(num_gt[k]), **counts(cats == k, int(num_gt[k]))}
                      for k, c in enumerate(categories)],
        "best": {"threshold": float(thresholds[best]), "f1": overall["f1"][best],
                 "precision": overall["precision"][best], "recall": overall["recall"][best]},
    }


def confusion_matrix(gt_json_path_or_dict: GroundTruth, detections: Sequence[dict], *, iou_threshold: float = 0.5,
                     score_threshold: float = 0.5) -> dict:
    """Which class each target was detected as, with "background" for missed and false detections.

    Detections scoring ``> score_threshold`` are matched in three steps: (1) as COCOeval
    matches them (same class, IoU >= ``iou_threshold``): the diagonal; (2) the detections left
    over, highest score first, take the left-over target of another class they overlap most
    (IoU >= ``iou_threshold``): a confusion; (3) left-over detections are false detections (row
    "background"), left-over targets missed (column "background"). Detections on crowd regions
    are not counted.

    Returns ``{"iou_threshold", "score_threshold", "labels": [K class names..., "background"],
    "ids": [K category ids], "matrix": (K+1) x (K+1) ints}``: rows are the ground truth, columns
    the prediction; the background/background cell is 0.
    """
    gt = load_ground_truth(gt_json_path_or_dict)
    categories, images = _per_image(gt, checked_detections(detections, {img["id"] for img in gt["images"]}))
    k = len(categories)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    for img in images.values():
        matched, ignored = _match_same_class(img, iou_threshold)
        kept = (img["det_scores"] > score_threshold) & ~ignored
        # Step 1 on the kept detections: greedy matching in score order means the matches of a
        # higher-scoring prefix of the detections do not depend on the rest.
        free_gt = np.ones(len(img["gt_cats"]), dtype=bool)
        free_det = kept.copy()
        for d in np.flatnonzero(kept & (matched >= 0)):
            matrix[img["gt_cats"][matched[d]], img["det_cats"][d]] += 1
            free_gt[matched[d]] = False
            free_det[d] = False
        ious = _iou(img["det_boxes"], img["gt_boxes"])  # (D, G)
        for d in np.flatnonzero(free_det & (ious >= iou_threshold).any(1)):  # step 2, in descending score order
            candidates = free_gt & (ious[d] >= iou_threshold)
            if candidates.any():
                g = int(np.argmax(np.where(candidates, ious[d], -1.0)))
                matrix[img["gt_cats"][g], img["det_cats"][d]] += 1
                free_gt[g] = False
                free_det[d] = False
        for d in np.flatnonzero(free_det):  # step 3
            matrix[k, img["det_cats"][d]] += 1
        for g in np.flatnonzero(free_gt):
            matrix[img["gt_cats"][g], k] += 1
    return {"iou_threshold": iou_threshold, "score_threshold": score_threshold,
            "labels": [c["name"] for c in categories] + ["background"], "ids": [c["id"] for c in categories],
            "matrix": matrix.tolist()}


def write_analysis(out_dir: Union[str, os.PathLike], gt_json_path_or_dict: GroundTruth, detections: Sequence[dict], *,
                   iou_threshold: float = 0.5, score_threshold: float = 0.5) -> dict:
    """Write the evaluation extras into ``out_dir`` and return what they found.

    Files: ``per_class.csv`` (AP, AP50, target count and best F1 of each class),
    ``pr_curves.png`` (precision-recall per class at IoU 0.5, and of all classes at each IoU
    threshold), ``confusion_matrix.png`` / ``.json`` (at ``iou_threshold`` and
    ``score_threshold``) and ``f1_curve.png`` / ``.json`` (F1 against the score threshold, at
    ``iou_threshold``). Returns ``{"best": f1_curve's best, "files": [paths]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gt = load_ground_truth(gt_json_path_or_dict)  # read the file once for the three passes
    evaluation = coco_evaluation(gt, detections)
    f1 = f1_curve(gt, detections, iou_threshold=iou_threshold)
    confusion = confusion_matrix(gt, detections, iou_threshold=iou_threshold, score_threshold=score_threshold)

    files = [out / "per_class.csv"]
    lines = ["id,name,gt_boxes,AP,AP50,best_F1"]
    for row, f in zip(evaluation.metrics["per_class"], f1["per_class"]):
        best_f1 = max((v for v in f["f1"] if v is not None), default=None)
        name = str(row["name"]).replace('"', '""')
        lines.append(f'{row["id"]},"{name}",{f["gt"]},{row["AP"]:.4f},{row["AP50"]:.4f},'
                     f'{"" if best_f1 is None else f"{best_f1:.4f}"}')
    files[0].write_text("\n".join(lines) + "\n")
    files.append(plot_pr_curves(evaluation, out / "pr_curves.png"))
    (out / "confusion_matrix.json").write_text(json.dumps(confusion, indent=1) + "\n")
    files += [out / "confusion_matrix.json", plot_confusion_matrix(confusion, out / "confusion_matrix.png")]
    (out / "f1_curve.json").write_text(json.dumps(f1) + "\n")
    files += [out / "f1_curve.json", plot_f1_curve(f1, out / "f1_curve.png")]
    return {"best": f1["best"], "files": files}


def _per_image(gt: dict, dets: list[dict], max_dets: int = 100) -> tuple[list[dict], dict]:
    """Ground truth and detections grouped by image, as numpy arrays.

    Returns the categories ``[{"id", "name"}]`` by ascending id (index = position) and
    ``{image_id: {"gt_boxes" (G, 4) xyxy, "gt_cats" (G,), "crowd_boxes", "crowd_cats",
    "det_boxes" (D, 4) xyxy, "det_cats" (D,), "det_scores" (D,)}}`` with the detections sorted
    by descending score and cut at ``max_dets`` (COCOeval's maxDets); detections of a
    category the ground truth does not list are dropped, as COCOeval drops them.
    """
    categories = sorted(({"id": c["id"], "name": c.get("name", str(c["id"]))} for c in gt["categories"]),
                        key=lambda c: c["id"])
    index = {c["id"]: k for k, c in enumerate(categories)}
    raw = {img["id"]: {"gt": [], "crowd": [], "det": []} for img in gt["images"]}
    for ann in gt["annotations"]:
        if ann["category_id"] in index and ann["image_id"] in raw:
            raw[ann["image_id"]]["crowd" if ann.get("iscrowd", 0) else "gt"].append(ann)
    for det in dets:
        if det["category_id"] in index:
            raw[det["image_id"]]["det"].append(det)

    def arrays(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        xywh = np.asarray([r["bbox"] for r in records], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # (N, 4) xyxy
        return boxes, np.asarray([index[r["category_id"]] for r in records], dtype=np.int64)

    images = {}
    for image_id, r in raw.items():
        # Stable, like COCOeval's mergesort: equal scores keep the detections' file order.
        dets_sorted = sorted(r["det"], key=lambda d: -float(d["score"]))[:max_dets]
        gt_boxes, gt_cats = arrays(r["gt"])
        crowd_boxes, crowd_cats = arrays(r["crowd"])
        det_boxes, det_cats = arrays(dets_sorted)
        images[image_id] = {"gt_boxes": gt_boxes, "gt_cats": gt_cats, "crowd_boxes": crowd_boxes,
                            "crowd_cats": crowd_cats, "det_boxes": det_boxes, "det_cats": det_cats,
                            "det_scores": np.asarray([float(d["score"]) for d in dets_sorted], dtype=np.float64)}
    return categories, images


def _match_same_class(img: dict, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's greedy matching in one image: ``(matched (D,) target index or -1, ignored (D,))``.

    Detections in descending score order each take the unmatched target of their class with
    the highest IoU >= ``iou_threshold``; an unmatched detection covering a crowd region of its
    class (intersection / detection area >= the threshold, COCO's crowd IoU) is ignored.
    """
    matched = np.full(len(img["det_cats"]), -1, dtype=np.int64)
    ious = _iou(img["det_boxes"], img["gt_boxes"])  # (D, G)
    candidates = (img["gt_cats"][None, :] == img["det_cats"][:, None]) & (ious >= iou_threshold)  # (D, G)
    free = np.ones(len(img["gt_cats"]), dtype=bool)
    # Only detections with some candidate can match; in score order, as the greedy matching needs.
    for i in np.flatnonzero(candidates.any(1)):
        left = candidates[i] & free
        if left.any():
            g = int(np.argmax(np.where(left, ious[i], -1.0)))
            matched[i] = g
            free[g] = False
    crowd = _iou(img["det_boxes"], img["crowd_boxes"], crowd=True)  # (D, C)
    on_crowd = ((img["crowd_cats"][None, :] == img["det_cats"][:, None]) & (crowd >= iou_threshold)).any(1)
    return matched, (matched < 0) & on_crowd


def _iou(a: np.ndarray, b: np.ndarray, crowd: bool = False) -> np.ndarray:
    """IoU of xyxy boxes ``a (N, 4)`` and ``b (M, 4)`` -> ``(N, M)``; with ``crowd``, intersection
    over the area of ``a`` (COCO's IoU against a crowd region)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)  # (N, M)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)[:, None]
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)[None, :]
    union = area_a if crowd else area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _ratio(num: np.ndarray, den: np.ndarray) -> list:
    """``num / den`` as a list of floats, None where ``den`` is 0."""
    return [float(n) / float(m) if m > 0 else None for n, m in zip(np.atleast_1d(num), np.atleast_1d(den))]


def format_best_threshold(best: dict, iou_threshold: float) -> str:
    """One line for the console: the score threshold with the best F1 (``f1_curve(...)["best"]``)."""
    if best["f1"] is None:
        return "best F1: undefined (no ground-truth boxes)"
    if best["f1"] == 0:  # no threshold to recommend
        return f"best F1 0.000: no detection overlaps a ground-truth box at IoU >= {iou_threshold:g}"
    def cell(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return (f"best F1 {best['f1']:.3f} (precision {cell(best['precision'])}, recall {cell(best['recall'])}) at score > "
            f"{best['threshold']:.2f}, IoU >= {iou_threshold:g}: use detrkit predict --threshold {best['threshold']:.2f}")


# ---------------------------------------------------------------------------------------------
# Pictures of the evaluation: precision-recall curves, confusion matrix, F1 curve
# ---------------------------------------------------------------------------------------------
def plot_pr_curves(evaluation, path: PathLike, *, dpi: int = 100) -> Path:
    """Precision-recall curves from COCOeval's precision array, as PNG.

    Left: each class at IoU 0.50 and their mean (legend: AP50). Right: the mean over classes
    at each IoU threshold 0.50 ... 0.95 (legend: AP at that IoU; their mean is COCO's AP).
    ``evaluation`` is a :class:`detrkit.evaluate.CocoEvaluation`. The curves are COCO's
    interpolated precision (the best precision at this recall or higher), 0 past the highest
    recall reached. Classes without ground truth are left out. Returns the path.
    """
    ev = evaluation
    recall = ev.recall_thresholds
    has_gt = (ev.precision[0] > -1).all(axis=0)  # (K,): COCO writes -1 for classes without ground truth
    fig = figure(figsize=(11, 4.5), dpi=dpi)
    ax_cls, ax_iou = fig.subplots(1, 2)
    i50 = int(np.argmin(np.abs(ev.iou_thresholds - 0.5)))
    many = has_gt.sum() > 20
    for k, cat in enumerate(ev.categories):
        if has_gt[k]:
            curve = ev.precision[i50, :, k]
            ax_cls.plot(recall, curve, linewidth=1 if many else 1.5, color=class_color(str(cat["name"])),
                        label=None if many else f"{cat['name']} {curve.mean():.3f}")
    if has_gt.any():
        mean50 = ev.precision[i50][:, has_gt].mean(axis=1)
        ax_cls.plot(recall, mean50, color="black", linewidth=2.5, label=f"all classes {mean50.mean():.3f}")
        cmap = _colormap("viridis")
        for t, iou in enumerate(ev.iou_thresholds):
            curve = ev.precision[t][:, has_gt].mean(axis=1)
            ax_iou.plot(recall, curve, color=cmap(t / max(len(ev.iou_thresholds) - 1, 1)),
                        label=f"IoU {iou:.2f}: {curve.mean():.3f}")
    ax_cls.set_title("per class at IoU 0.50 (legend: AP50)", fontsize=10)
    ax_iou.set_title("all classes at each IoU (legend: AP; mean = COCO AP)", fontsize=10)
    for ax in (ax_cls, ax_iou):
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="x-small", loc="lower left")
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center", color="gray")
    fig.tight_layout()
    return save_png(fig, path, dpi)


def plot_confusion_matrix(confusion: dict, path: PathLike, *, dpi: int = 100) -> Path:
    """The confusion matrix of :func:`detrkit.evaluate.confusion_matrix` as PNG: rows the
    ground truth, columns the prediction, the last of each "background"; cells coloured by the
    fraction of their row, counts written in. Returns the path."""
    labels = confusion["labels"]
    matrix = np.asarray(confusion["matrix"], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(labels)
    side = min(max(4.5, 0.55 * n + 2.5), 20)
    fig = figure(figsize=(side + 1, side), dpi=dpi)
    ax = fig.subplots()
    im = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if i == j == n - 1:
                    continue
                ax.text(j, i, f"{int(matrix[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if fraction[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), labels, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"IoU >= {confusion['iou_threshold']:g}, score > {confusion['score_threshold']:g}\n"
                 "row background: false detections; column background: missed targets", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row")
    fig.tight_layout()
    return save_png(fig, path, dpi)


def plot_f1_curve(curve: dict, path: PathLike, *, dpi: int = 100) -> Path:
    """F1 against the score threshold (from :func:`detrkit.evaluate.f1_curve`) as PNG: each
    class thin, all classes pooled thick, the best threshold marked. Returns the path."""
    t = np.asarray(curve["thresholds"])
    fig = figure(figsize=(7, 4.5), dpi=dpi)
    ax = fig.subplots()
    many = len(curve["per_class"]) > 20
    for row in curve["per_class"]:
        if row["gt"]:
            ax.plot(t, _floats(row["f1"]), linewidth=1, color=class_color(str(row["name"])),
                    label=None if many else row["name"])
    ax.plot(t, _floats(curve["f1"]), color="black", linewidth=2.5, label="all classes")
    best = curve["best"]
    if best["f1"] is not None:
        ax.axvline(best["threshold"], color="black", linestyle="--", linewidth=1)
        ax.set_title(f"best F1 {best['f1']:.3f} at score > {best['threshold']:.2f} "
                     f"(precision {best['precision']:.3f}, recall {best['recall']:.3f}), IoU >= {curve['iou_threshold']:g}",
                     fontsize=9)
    ax.set_xlabel("score threshold (predict --threshold)")
    ax.set_ylabel("F1")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", loc="best")
    fig.tight_layout()
    return save_png(fig, path, dpi)


def _floats(values: Sequence) -> np.ndarray:
    return np.asarray([math.nan if v is None else v for v in values], dtype=float)


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]
