"""COCO detection metrics: the 12 standard numbers and per-class AP, from detections.

The numbers are COCO's own: the matching, the 101-point interpolation and the
small/medium/large area ranges all come from a COCOeval implementation, never from a
re-implementation here: ``faster-coco-eval``'s C++ COCOeval (a dependency of detrkit),
whose numbers equal pycocotools' (tests/test_evaluate.py checks them to 1e-6). The F1 curve,
the confusion matrix and the other evaluation extras are :mod:`detrkit.analysis`'s.

Detections are in the COCO results format throughout: one dict per box with
``image_id``, ``category_id`` (the dataset's own id, not a contiguous index),
``bbox`` (absolute ``[x, y, w, h]`` in pixels of the original image) and ``score``.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster

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

GroundTruth = Union[str, os.PathLike, dict]


def coco_metrics(gt_json_path_or_dict: GroundTruth, detections: Sequence[dict], *, per_class: bool = True,
                 verbose: bool = False) -> dict:
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
    evaluation = coco_evaluation(gt_json_path_or_dict, detections, verbose=verbose)
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


def coco_evaluation(gt_json_path_or_dict: GroundTruth, detections: Sequence[dict], *,
                    verbose: bool = False) -> CocoEvaluation:
    """Run COCOeval once and keep its precision array (for precision-recall curves).

    Arguments and errors as :func:`coco_metrics`.
    """
    gt = load_ground_truth(gt_json_path_or_dict)
    dets = checked_detections(detections, {img["id"] for img in gt["images"]})
    stats, precision, params = _run_cocoeval(gt, dets, verbose)

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
# Inputs
# ---------------------------------------------------------------------------------------------
def load_ground_truth(source: GroundTruth) -> dict:
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


def checked_detections(detections: Sequence[dict], image_ids: set) -> list[dict]:
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
# COCOeval (faster-coco-eval's C++ implementation, a dependency of detrkit)
# ---------------------------------------------------------------------------------------------
def _run_cocoeval(gt: dict, dets: list[dict], verbose: bool):
    """COCOeval on ``gt`` and ``dets``: ``(stats, precision (T, R, K, A, M), params)``."""
    say = print if verbose else _silent
    coco_gt = COCO(gt, print_function=say)
    coco_dt = coco_gt.loadRes(dets)  # an empty list gives an empty, evaluable result set
    coco_eval = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=say)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats, coco_eval.eval["precision"], coco_eval.params


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
