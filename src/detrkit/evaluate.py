"""COCO detection metrics: the 12 standard numbers and per-class AP, from detections.

The numbers are COCO's own: the matching, the 101-point interpolation and the
small/medium/large area ranges all come from a COCOeval implementation, never from a
re-implementation here. ``faster-coco-eval`` (a C++ COCOeval, a dependency of detrkit)
is used when it can be imported; otherwise ``pycocotools``. Both give the same numbers
(tests/test_evaluate.py checks them against pycocotools to 1e-6).

Detections are in the COCO results format throughout: one dict per box with
``image_id``, ``category_id`` (the dataset's own id, not a contiguous index),
``bbox`` (absolute ``[x, y, w, h]`` in pixels of the original image) and ``score``.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from detrkit.errors import DataError
from detrkit.files import read_json

# The 12 summary numbers, in the order COCOeval.summarize() computes them (its ``stats``):
# key, AP or AR, IoU range, area range, maxDets. ``format_metrics`` prints them in this order.
SUMMARY = (
    ("AP", "AP", "0.50:0.95", "all", 100),
    ("AP50", "AP", "0.50", "all", 100),
    ("AP75", "AP", "0.75", "all", 100),
    ("APs", "AP", "0.50:0.95", "small", 100),
    ("APm", "AP", "0.50:0.95", "medium", 100),
    ("APl", "AP", "0.50:0.95", "large", 100),
    ("AR1", "AR", "0.50:0.95", "all", 1),
    ("AR10", "AR", "0.50:0.95", "all", 10),
    ("AR100", "AR", "0.50:0.95", "all", 100),
    ("ARs", "AR", "0.50:0.95", "small", 100),
    ("ARm", "AR", "0.50:0.95", "medium", 100),
    ("ARl", "AR", "0.50:0.95", "large", 100),
)
METRIC_KEYS = tuple(row[0] for row in SUMMARY)

BACKENDS = ("auto", "faster_coco_eval", "pycocotools")

GroundTruth = Union[str, os.PathLike, dict]


def coco_metrics(gt_json_path_or_dict: GroundTruth, detections: Sequence[dict], *, per_class: bool = True,
                 verbose: bool = False, backend: str = "auto") -> dict:
    """COCO bbox evaluation of ``detections`` against a COCO annotation file or dict.

    Args:
        gt_json_path_or_dict: the ground truth, a COCO instances JSON path or the loaded dict.
            Every image listed in it is evaluated, also those without annotations (their
            detections are false positives). ``iscrowd=1`` boxes are handled by COCOeval:
            detections matched to them are ignored, neither right nor wrong.
        detections: COCO results (see the module docstring). Detections of a category the
            ground truth does not list are ignored, as COCOeval does (official COCO
            checkpoints predict ids of the 11 unused COCO categories, for instance).
            Neither argument is modified.
        per_class: also compute AP and AP50 of each category (key ``per_class``; absent if False).
        verbose: let COCOeval print its progress and its summary table.
        backend: ``"auto"`` (faster-coco-eval, else pycocotools), ``"faster_coco_eval"`` or
            ``"pycocotools"``.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
        "ARl"}``: python floats, fractions in [0, 1], -1.0 where COCO leaves a number undefined
        (e.g. ``APs`` when the ground truth has no small box). With ``per_class``, also
        ``"per_class"``: ``[{"id", "name", "AP", "AP50"}]`` in ascending id order (AP -1.0 for
        a category without ground truth boxes). No detections at all give 0 (not an error).

    Raises:
        DataError: the ground truth is not a usable COCO dict, or a detection is malformed or
            names an image the ground truth does not have (usually the wrong annotation file).
    """
    evaluation = coco_evaluation(gt_json_path_or_dict, detections, verbose=verbose, backend=backend)
    metrics = dict(evaluation.metrics)
    if not per_class:
        del metrics["per_class"]
    return metrics


@dataclass
class CocoEvaluation:
    """One COCOeval run: the summary numbers and the precision array behind them.

    ``precision (T, R, K)``: interpolated precision at IoU threshold ``iou_thresholds[t]``
    and recall ``recall_thresholds[r]`` for category ``categories[k]`` (area "all", 100
    detections per image), as COCOeval's ``accumulate`` leaves it: -1 for a category without
    ground truth, 0 past the highest recall the detections reach.
    """

    metrics: dict  # as coco_metrics returns, with per_class
    precision: np.ndarray  # (T, R, K)
    iou_thresholds: np.ndarray  # (T,) 0.50, 0.55, ..., 0.95
    recall_thresholds: np.ndarray  # (R,) 0.00, 0.01, ..., 1.00
    categories: list  # [{"id", "name"}] in the order of K (ascending id)


def coco_evaluation(gt_json_path_or_dict: GroundTruth, detections: Sequence[dict], *, verbose: bool = False,
                    backend: str = "auto") -> CocoEvaluation:
    """Run COCOeval once and keep its precision array (for precision-recall curves).

    Arguments and errors as :func:`coco_metrics`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    gt = _load_ground_truth(gt_json_path_or_dict)
    dets = _checked_detections(detections, {img["id"] for img in gt["images"]})
    if backend == "auto":
        backend = "faster_coco_eval" if _faster_coco_eval_available() else "pycocotools"
    run = _run_faster_coco_eval if backend == "faster_coco_eval" else _run_pycocotools
    stats, precision, params = run(gt, dets, verbose)

    metrics = {key: float(value) for key, value in zip(METRIC_KEYS, stats[:12])}
    names = {cat["id"]: cat.get("name", str(cat["id"])) for cat in gt["categories"]}
    metrics["per_class"] = _per_class_ap(precision, params, names)
    area = list(params.areaRngLbl).index("all")
    return CocoEvaluation(
        metrics=metrics, precision=np.asarray(precision)[:, :, :, area, -1],
        iou_thresholds=np.asarray(params.iouThrs, dtype=float), recall_thresholds=np.asarray(params.recThrs, dtype=float),
        categories=[{"id": int(c), "name": names.get(c, str(c))} for c in params.catIds],
    )


def detections_to_coco(predictions: Sequence[dict], image_ids: Sequence[int]) -> list[dict]:
    """Per-image predictions -> one flat COCO results list.

    Args:
        predictions: one dict per image, as :func:`detrkit.postprocess.postprocess` returns:
            ``scores (N,)``, ``labels (N,)`` dataset category ids, ``boxes (N, 4)`` absolute
            ``(x0, y0, x1, y1)``. Tensors (any device, any float dtype) or array-likes.
        image_ids: the COCO image id of each entry of ``predictions``.

    Returns:
        ``[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}]``,
        images in the given order, boxes in their order within each image. Values keep their
        full precision (no rounding): rounding boxes moves IoUs across thresholds.
    """
    if len(predictions) != len(image_ids):
        raise ValueError(f"got {len(predictions)} predictions but {len(image_ids)} image ids")
    results = []
    for pred, image_id in zip(predictions, image_ids):
        # float64 before subtracting: x1 - x0 of two float32 values is then exact, so the
        # width adds no rounding of its own on top of the model's float32 output.
        boxes = torch.as_tensor(pred["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
        scores = torch.as_tensor(pred["scores"]).detach().to("cpu", torch.float64).reshape(-1)
        labels = torch.as_tensor(pred["labels"]).detach().to("cpu").reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores and "
                             f"{len(labels)} labels; they must be the same length")
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)  # (N, 4)
        image_id = int(image_id)
        for box, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
            results.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": score})
    return results


def format_metrics(metrics: dict) -> str:
    """The 12 numbers in COCOeval's usual 12-line layout, then a per-class AP table."""
    lines = []
    for key, kind, iou, area, max_dets in SUMMARY:
        title = "Average Precision" if kind == "AP" else "Average Recall"
        value = metrics.get(key, -1.0)
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3d} ] "
                     f"= {value:0.3f}")
    rows = metrics.get("per_class")
    if rows:
        width = max(len("class"), *(len(str(r["name"])) for r in rows))
        lines.append("")
        lines.append(f"{'class':<{width}}  {'id':>6}  {'AP':>6}  {'AP50':>6}")
        for r in rows:
            lines.append(f"{str(r['name']):<{width}}  {r['id']:>6}  {_cell(r['AP']):>6}  {_cell(r['AP50']):>6}")
    return "\n".join(lines)


def format_best_threshold(best: dict, iou_threshold: float) -> str:
    """One line for the console: the score threshold with the best F1 (``f1_curve(...)["best"]``)."""
    if best["f1"] is None:
        return "best F1: undefined (no ground-truth boxes)"
    def cell(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return (f"best F1 {best['f1']:.3f} (precision {cell(best['precision'])}, recall {cell(best['recall'])}) at score > "
            f"{best['threshold']:.2f}, IoU >= {iou_threshold:g}: use detrkit predict --threshold {best['threshold']:.2f}")


def write_metrics(out_dir: Union[str, os.PathLike], metrics: dict, detections: Sequence[dict]) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``detections.json`` (COCO results format) into ``out_dir``.

    The folder is created if needed. Returns the two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, detections_path = out / "metrics.json", out / "detections.json"
    metrics_path.write_text(json.dumps(metrics, indent=2, default=_json_scalar) + "\n")
    # Compact: a detections file holds up to 100 boxes per image, for thousands of images.
    detections_path.write_text(json.dumps(list(detections), default=_json_scalar))
    return metrics_path, detections_path


# ---------------------------------------------------------------------------------------------
# Beyond the 12 numbers: what threshold to use and which classes get confused. Detections are
# matched to targets as COCOeval matches them (per image and class, highest score first, each
# taking the unmatched target it overlaps most with IoU >= the threshold; detections on crowd
# regions are ignored; at most 100 detections per image), so a detection that is a true
# positive here is one at that IoU threshold in the AP computation too.
# ---------------------------------------------------------------------------------------------
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
    gt, dets = _load_ground_truth(gt_json_path_or_dict), list(detections)
    categories, images = _per_image(gt, _checked_detections(dets, {img["id"] for img in gt["images"]}))
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
    gt = _load_ground_truth(gt_json_path_or_dict)
    categories, images = _per_image(gt, _checked_detections(detections, {img["id"] for img in gt["images"]}))
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
    from detrkit.visualize import plot_confusion_matrix, plot_f1_curve, plot_pr_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gt = _load_ground_truth(gt_json_path_or_dict)  # read the file once for the three passes
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


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------
def _load_ground_truth(source: GroundTruth) -> dict:
    """A private, normalised copy of the ground truth dict (COCO evaluators write into it)."""
    if isinstance(source, dict):
        gt, where = copy.deepcopy(source), "the ground truth dict"
    else:
        gt, where = read_json(source, DataError, "COCO annotation file"), str(source)
    if not isinstance(gt, dict) or "images" not in gt or "categories" not in gt:
        raise DataError(f"{where}: not a COCO annotation file (it needs 'images' and 'categories' lists)")
    gt.setdefault("annotations", [])
    for ann in gt["annotations"]:
        # COCOeval reads both keys unconditionally; fill what many hand-made files leave out.
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            # Area decides small/medium/large. COCO's own is the mask area; for box-only
            # data the box area is the only one there is.
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    return gt


def _checked_detections(detections: Sequence[dict], image_ids: set) -> list[dict]:
    """Shallow copies of the detections (loadRes adds keys to each dict), checked."""
    out = []
    for i, det in enumerate(detections):
        keys = det.keys() if isinstance(det, dict) else ()
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in keys]
        if missing:
            raise DataError(f"detection {i}: missing {', '.join(missing)} (COCO results format), got {det!r}")
        image_id, bbox = det["image_id"], det["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise DataError(f"detection {i}: bbox must be [x, y, w, h], got {bbox!r}")
        if image_id not in image_ids:
            raise DataError(f"detection {i}: image_id {image_id!r} is not in the ground truth; "
                            "are the detections from another annotation file?")
        out.append({**det, "bbox": list(bbox)})
    return out


# ---------------------------------------------------------------------------------------------
# Backends. Each returns (stats, precision, params): COCOeval's summary numbers, its
# precision array (T, R, K, A, M) and the params it was computed with.
# ---------------------------------------------------------------------------------------------
def _faster_coco_eval_available() -> bool:
    try:
        import faster_coco_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _run_faster_coco_eval(gt: dict, dets: list[dict], verbose: bool):
    from faster_coco_eval import COCO, COCOeval_faster

    say = print if verbose else _silent
    coco_gt = COCO(gt, print_function=say)
    coco_dt = coco_gt.loadRes(dets)  # an empty list gives an empty, evaluable result set
    coco_eval = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=say)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats, coco_eval.eval["precision"], coco_eval.params


def _run_pycocotools(gt: dict, dets: list[dict], verbose: bool):
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("COCO evaluation needs faster-coco-eval (pip install faster-coco-eval) "
                          "or pycocotools; neither can be imported") from None

    # pycocotools prints its progress with print(); there is no switch for it.
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = _pycocotools_index(COCO(), gt)
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:
            # loadRes([]) fails on anns[0]; an index without annotations is what it would build.
            coco_dt = _pycocotools_index(COCO(), {"images": gt["images"], "categories": gt["categories"],
                                                  "annotations": []})
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats, coco_eval.eval["precision"], coco_eval.params


def _pycocotools_index(coco, dataset: dict):
    # pycocotools' COCO() only reads files; this is what its constructor does after json.load.
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _per_class_ap(precision: np.ndarray, params, names: dict) -> list[dict]:
    """AP (IoU 0.50:0.95) and AP50 of each category, as COCOeval's summary computes the overall.

    ``precision`` is (T IoU thresholds, R recall points, K categories, A area ranges,
    M maxDets); -1 marks entries without ground truth. Per class: area "all", the last
    (largest) maxDets, mean over the entries > -1.
    """
    area = list(params.areaRngLbl).index("all")
    iou50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    rows = []
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k, area, -1]  # (T, R)
        rows.append({"id": int(cat_id), "name": names.get(cat_id, str(cat_id)),
                     "AP": _mean_defined(p), "AP50": _mean_defined(p[iou50])})
    return rows


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else -1.0


def _silent(*args, **kwargs) -> None:
    pass


def _cell(value: float) -> str:
    return "n/a" if value < 0 else f"{value:0.3f}"


def _json_scalar(value):
    # numpy / torch numbers in hand-built dicts: tolist() gives the python number (or list).
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
