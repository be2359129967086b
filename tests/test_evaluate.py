"""COCO metrics: equal to pycocotools' COCOeval on the same files, and the edge cases."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import sys

import numpy as np
import pytest
import torch

from detrkit.errors import DataError
from detrkit.evaluate import METRIC_KEYS, coco_metrics, detections_to_coco, format_metrics, write_metrics


# Non-contiguous ids, as real data sets have; "star" has no ground-truth box at all.
CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"},
              {"id": 12, "name": "triangle"}, {"id": 20, "name": "star"}]
GT_CATEGORY_IDS = (3, 7, 12)
# Box sides giving each COCO area range: small < 32^2 <= medium < 96^2 <= large.
SIDES = {"small": (8, 28), "medium": (34, 90), "large": (100, 180)}


def make_ground_truth(seed: int = 0) -> dict:
    """Six images: five with 3-12 boxes of every size and class (one crowd box), one empty."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, 7):
        width, height = 320 + 40 * image_id, 240 + 20 * image_id
        images.append({"id": image_id, "file_name": f"{image_id:03d}.png", "width": width, "height": height})
        if image_id == 4:
            continue  # an image without annotations: every detection on it is a false positive
        for j in range(int(rng.integers(3, 13))):
            lo, hi = SIDES[("small", "medium", "large")[j % 3]]
            w, h = (float(v) for v in rng.uniform(lo, hi, size=2))
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.choice(GT_CATEGORY_IDS)),
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    # A crowd region: detections inside it are ignored, neither true nor false positives.
    annotations.append({"id": len(annotations) + 1, "image_id": 2, "category_id": 7,
                        "bbox": [10.0, 10.0, 200.0, 150.0], "area": 30000.0, "iscrowd": 1})
    return {"images": images, "categories": CATEGORIES, "annotations": annotations}


def make_detections(gt: dict, seed: int = 1) -> list[dict]:
    """Noisy detections: exact, jittered (some past IoU 0.5), wrong class, duplicates, false positives."""
    rng = np.random.default_rng(seed)
    dets = []
    for ann in gt["annotations"]:
        if ann["iscrowd"]:
            continue
        x, y, w, h = ann["bbox"]
        kind = rng.choice(["exact", "jitter", "big_jitter", "wrong_class", "missed"], p=[.25, .35, .15, .15, .10])
        if kind == "missed":
            continue
        if kind in ("jitter", "big_jitter"):
            s = 0.08 if kind == "jitter" else 0.35
            x, y = x + rng.normal(0, s) * w, y + rng.normal(0, s) * h
            w, h = w * np.exp(rng.normal(0, s)), h * np.exp(rng.normal(0, s))
        category = ann["category_id"]
        if kind == "wrong_class":
            category = int(rng.choice([c for c in GT_CATEGORY_IDS if c != category]))
        dets.append({"image_id": ann["image_id"], "category_id": category,
                     "bbox": [float(x), float(y), float(w), float(h)], "score": float(rng.uniform(0.3, 1.0))})
        if rng.uniform() < 0.2:  # a duplicate: the second match of one box is a false positive
            dets.append({**dets[-1], "score": float(rng.uniform(0.05, 0.6))})
    for img in gt["images"]:
        for _ in range(int(rng.integers(2, 6))):  # false positives anywhere, the empty image included
            w, h = (float(v) for v in rng.uniform(10, 150, size=2))
            dets.append({"image_id": img["id"], "category_id": int(rng.choice(GT_CATEGORY_IDS + (20,))),
                         "bbox": [float(rng.uniform(0, img["width"] - w)), float(rng.uniform(0, img["height"] - h)),
                                  w, h], "score": float(rng.uniform(0.0, 0.7))})
    # Inside the crowd region: ignored by COCOeval.
    dets.append({"image_id": 2, "category_id": 7, "bbox": [40.0, 30.0, 60.0, 50.0], "score": 0.95})
    return dets


def pycocotools_reference(gt_path, dt_path):
    """pycocotools' own COCOeval, straight from the files: (stats, precision, catIds)."""
    COCO = pytest.importorskip("pycocotools.coco").COCO
    COCOeval = pytest.importorskip("pycocotools.cocoeval").COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(str(dt_path))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats, ev.eval["precision"], ev.params.catIds


def reference_per_class(precision, cat_ids):
    """Per-class AP and AP50 straight from pycocotools' precision (T, R, K, A, M): area all, maxDets 100."""
    out = {}
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, 2]
        p50 = precision[0, :, k, 0, 2]  # iouThrs[0] == 0.5
        out[cat_id] = (np.mean(p[p > -1]) if (p > -1).any() else -1.0,
                       np.mean(p50[p50 > -1]) if (p50 > -1).any() else -1.0)
    return out


@pytest.fixture
def files(tmp_path):
    gt = make_ground_truth()
    dets = make_detections(gt)
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text(json.dumps(dets))
    return gt, dets, gt_path, dt_path


@pytest.mark.parametrize("gt_as", ["path", "dict"])
def test_equals_pycocotools(files, gt_as):
    gt, dets, gt_path, dt_path = files
    stats, precision, cat_ids = pycocotools_reference(gt_path, dt_path)
    assert 0.05 < stats[0] < 0.95  # the data really is noisy: neither trivial nor hopeless

    metrics = coco_metrics(gt_path if gt_as == "path" else gt, json.loads(dt_path.read_text()))
    for key, expected in zip(METRIC_KEYS, stats[:12]):
        assert metrics[key] == pytest.approx(expected, abs=1e-6), key
    assert all(isinstance(metrics[k], float) for k in METRIC_KEYS)

    expected = reference_per_class(precision, cat_ids)
    assert [r["id"] for r in metrics["per_class"]] == [3, 7, 12, 20]
    assert [r["name"] for r in metrics["per_class"]] == ["circle", "square", "triangle", "star"]
    for row in metrics["per_class"]:
        ap, ap50 = expected[row["id"]]
        assert row["AP"] == pytest.approx(ap, abs=1e-6), row
        assert row["AP50"] == pytest.approx(ap50, abs=1e-6), row
    assert metrics["per_class"][-1]["AP"] == -1.0  # "star" has no ground truth: undefined


def test_inputs_untouched_and_results_repeatable(files):
    gt, dets, _, _ = files
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    assert coco_metrics(gt, dets) == coco_metrics(gt, dets)
    assert gt == gt_before and dets == dets_before  # COCO evaluators write into what they get


def test_perfect_detections():
    gt = make_ground_truth()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"] if not a["iscrowd"]]
    metrics = coco_metrics(gt, dets)
    for key in METRIC_KEYS:
        if key != "AR1":
            assert metrics[key] == pytest.approx(1.0, abs=1e-9), key
    assert 0 < metrics["AR1"] < 1  # one detection per image and class cannot recall several boxes
    for row in metrics["per_class"]:
        assert row["AP"] == pytest.approx(1.0 if row["id"] != 20 else -1.0, abs=1e-9)


def test_no_detections(capsys):
    metrics = coco_metrics(make_ground_truth(), [])
    for key in METRIC_KEYS:
        assert metrics[key] == 0.0, key  # every area range has ground truth here, so all are defined
    assert [r["AP"] for r in metrics["per_class"]] == [0.0, 0.0, 0.0, -1.0]
    assert capsys.readouterr().out == ""  # quiet by default


def test_undefined_is_minus_one_and_per_class_optional():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 5, "name": "dot"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10]}]}  # no area/iscrowd
    metrics = coco_metrics(gt, [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10], "score": 0.5}],
                           per_class=False)
    assert "per_class" not in metrics
    assert metrics["APs"] == pytest.approx(1.0) and metrics["APm"] == -1.0 and metrics["ARl"] == -1.0


def test_bad_inputs_are_data_errors(tmp_path):
    gt = make_ground_truth()
    with pytest.raises(DataError, match="image_id 99"):
        coco_metrics(gt, [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(DataError, match="detection 0"):
        coco_metrics(gt, [{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(DataError, match="not found"):
        coco_metrics(tmp_path / "missing.json", [])
    with pytest.raises(TypeError, match="backend"):  # one evaluator, faster-coco-eval's: nothing to choose
        coco_metrics(gt, [], backend="pycocotools")


def test_detections_to_coco():
    preds = [
        {"scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([7, 12]),
         "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.1, 0.2, 5.7, 3.3]])},
        {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"scores": torch.tensor([0.5]), "labels": torch.tensor([3]), "boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0]])},
    ]
    out = detections_to_coco(preds, [torch.tensor(11), 12, 13])
    assert len(out) == 3
    assert out[0] == {"image_id": 11, "category_id": 7, "bbox": [10.0, 20.0, 20.0, 40.0],
                      "score": pytest.approx(0.9)}
    assert out[2]["image_id"] == 13 and out[2]["bbox"] == [1.0, 2.0, 3.0, 6.0]
    # Full precision: exactly the float32 values, not rounded to a few decimals.
    b = torch.tensor([0.1, 0.2, 5.7, 3.3])
    x, y, w, h = out[1]["bbox"]
    assert (x, y) == (float(b[0]), float(b[1]))
    assert w == float(b[2]) - float(b[0]) and h == float(b[3]) - float(b[1])
    assert out[1]["score"] == float(torch.tensor(0.25))
    assert all(type(v) is int for d in out for v in (d["image_id"], d["category_id"]))
    assert all(type(v) is float for d in out for v in d["bbox"] + [d["score"]])
    with pytest.raises(ValueError, match="2 image ids"):
        detections_to_coco(preds, [1, 2])


def test_round_trip_through_detections_to_coco():
    """Ground-truth boxes as xyxy predictions, converted back, score AP 1."""
    gt = make_ground_truth()
    preds, ids = [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        preds.append({"scores": torch.ones(len(anns)), "labels": torch.tensor([a["category_id"] for a in anns]),
                      "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)})
        ids.append(img["id"])
    assert coco_metrics(gt, detections_to_coco(preds, ids))["AP"] == pytest.approx(1.0)


def test_format_and_write(files, tmp_path):
    gt, dets, _, _ = files
    metrics = coco_metrics(gt, dets)
    text = format_metrics(metrics)
    lines = text.splitlines()
    assert lines[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = ")
    assert lines[11].startswith(" Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = ")
    assert lines[0].endswith(f"{metrics['AP']:0.3f}")
    for name in ("circle", "square", "triangle", "star"):
        assert name in text
    assert "n/a" in text  # star's undefined AP

    metrics_path, dets_path = write_metrics(tmp_path / "out" / "eval", metrics, dets)
    assert json.loads(metrics_path.read_text()) == metrics
    assert json.loads(dets_path.read_text()) == dets
    assert metrics_path.name == "metrics.json" and dets_path.name == "detections.json"


# ---------------------------------------------------------------------------------------------
# Evaluation extras: confusion matrix, F1 against the threshold, the files of write_analysis
# ---------------------------------------------------------------------------------------------
def _box(x, y, side=40.0):
    return [float(x), float(y), side, side]


def _hand_made():
    """Image 1: targets A1, B, A2. Image 2: no target but a crowd region of A."""
    gt = {"images": [{"id": 1, "width": 200, "height": 200}, {"id": 2, "width": 200, "height": 200}],
          "categories": [{"id": 7, "name": "C"}, {"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": _box(10, 10)},    # A1: found
              {"id": 2, "image_id": 1, "category_id": 2, "bbox": _box(100, 10)},   # B: detected as A
              {"id": 3, "image_id": 1, "category_id": 1, "bbox": _box(10, 100)},   # A2: missed
              {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": 1}]}
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": _box(10, 10), "score": 0.9},    # A on A1: right
        {"image_id": 1, "category_id": 1, "bbox": _box(104, 10), "score": 0.8},   # A on B (IoU 0.82): confusion
        {"image_id": 1, "category_id": 2, "bbox": _box(150, 150), "score": 0.7},  # B on nothing: false
        {"image_id": 1, "category_id": 1, "bbox": _box(12, 10), "score": 0.6},    # duplicate of A1: false
        {"image_id": 1, "category_id": 7, "bbox": _box(10, 100), "score": 0.3},   # C on A2, below 0.5
        {"image_id": 2, "category_id": 1, "bbox": _box(20, 20), "score": 0.95},   # inside the crowd: ignored
        {"image_id": 2, "category_id": 1, "bbox": _box(150, 150), "score": 0.55},  # A on nothing: false
    ]
    return gt, dets


def test_confusion_matrix_on_a_hand_made_case():
    from detrkit.analysis import confusion_matrix

    gt, dets = _hand_made()
    cm = confusion_matrix(gt, dets, iou_threshold=0.5, score_threshold=0.5)
    assert cm["labels"] == ["A", "B", "C", "background"] and cm["ids"] == [1, 2, 7]  # ascending id
    # rows: ground truth A, B, C, background; columns: prediction A, B, C, background
    assert cm["matrix"] == [[1, 0, 0, 1],   # A1 found, A2 missed
                            [1, 0, 0, 0],   # B detected as A
                            [0, 0, 0, 0],
                            [2, 1, 0, 0]]   # false: the duplicate A and the A of image 2; the B on nothing
    # A lower score threshold lets C on A2 in: a confusion instead of a miss.
    low = confusion_matrix(gt, dets, iou_threshold=0.5, score_threshold=0.2)["matrix"]
    assert low[0] == [1, 0, 1, 0]
    # A stricter IoU: A on B (IoU 0.82) no longer hits it: B missed, one more false A.
    strict = confusion_matrix(gt, dets, iou_threshold=0.9, score_threshold=0.5)["matrix"]
    assert strict[1] == [0, 0, 0, 1] and strict[3] == [3, 1, 0, 0]


def test_f1_curve_on_a_hand_made_case():
    from detrkit.analysis import f1_curve, format_best_threshold

    gt = {"images": [{"id": 1, "width": 400, "height": 100}],
          "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": _box(100 * i, 10)} for i in range(4)]}
    # Scores 0.9, 0.8, 0.3 hit targets; 0.6 and 0.2 hit nothing; one target is never found.
    dets = [{"image_id": 1, "category_id": 1, "bbox": _box(0, 10), "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": _box(100, 10), "score": 0.8},
            {"image_id": 1, "category_id": 1, "bbox": _box(0, 60), "score": 0.6},
            {"image_id": 1, "category_id": 1, "bbox": _box(200, 10), "score": 0.3},
            {"image_id": 1, "category_id": 1, "bbox": _box(300, 60), "score": 0.2}]
    curve = f1_curve(gt, dets)
    at = dict(zip(curve["thresholds"], curve["f1"]))
    assert at[0.0] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # all kept: TP 3, FP 2, FN 1
    assert at[0.2] == pytest.approx(0.75)  # score > 0.2: the 0.2 false positive is dropped
    assert at[0.5] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert at[0.7] == pytest.approx(2 * 2 / (2 * 2 + 0 + 2))
    assert at[0.95] == 0.0  # nothing kept: precision undefined, F1 0 (there are targets)
    best = curve["best"]
    assert best == {"threshold": 0.2, "f1": pytest.approx(0.75), "precision": pytest.approx(0.75),
                    "recall": pytest.approx(0.75)}  # the lowest threshold of the 0.2..0.29 plateau
    assert "--threshold 0.20" in format_best_threshold(best, 0.5)
    b = curve["per_class"][1]
    assert b["name"] == "B" and b["gt"] == 0 and set(b["f1"]) == {None}  # no target, no detection


def test_f1_counts_agree_with_cocoeval(files):
    """True positives at IoU 0.5 are those of COCOeval's own matching (crowd, duplicates, classes)."""
    from detrkit.analysis import f1_curve

    gt, dets, gt_path, dt_path = files
    COCO = pytest.importorskip("pycocotools.coco").COCO
    COCOeval = pytest.importorskip("pycocotools.cocoeval").COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(dt_path)), "bbox")
        ev.evaluate()
    curve = f1_curve(gt, dets, thresholds=[-1.0, 0.5])
    for k, cat_id in enumerate(ev.params.catIds):
        records = [e for e in ev.evalImgs if e is not None and e["category_id"] == cat_id
                   and e["aRng"] == ev.params.areaRng[0]]
        row = curve["per_class"][k]
        assert row["id"] == cat_id
        for i, t in enumerate((-1.0, 0.5)):
            tp = sum(int(((e["dtMatches"][0] > 0) & ~e["dtIgnore"][0] & (np.array(e["dtScores"]) > t)).sum())
                     for e in records)
            kept = sum(int((~e["dtIgnore"][0] & (np.array(e["dtScores"]) > t)).sum()) for e in records)
            if row["gt"]:
                assert round(row["recall"][i] * row["gt"]) == tp
            if kept:
                assert row["precision"][i] == pytest.approx(tp / kept)


def test_write_analysis_files(files, tmp_path):
    from detrkit.analysis import write_analysis

    gt, dets, gt_path, _ = files
    result = write_analysis(tmp_path / "eval", gt_path, dets, iou_threshold=0.5, score_threshold=0.4)
    names = sorted(p.name for p in result["files"])
    assert names == ["confusion_matrix.json", "confusion_matrix.png", "f1_curve.json", "f1_curve.png",
                     "per_class.csv", "pr_curves.png"]
    for p in result["files"]:
        assert p.is_file() and p.stat().st_size > 0
    rows = (tmp_path / "eval" / "per_class.csv").read_text().splitlines()
    assert rows[0] == "id,name,gt_boxes,AP,AP50,best_F1" and len(rows) == 5
    assert rows[4].startswith('20,"star",0,-1.0000')  # no ground truth: AP undefined
    cm = json.loads((tmp_path / "eval" / "confusion_matrix.json").read_text())
    assert cm["score_threshold"] == 0.4
    # Every non-crowd target is counted once in its row (found, confused or missed).
    targets = [a for a in gt["annotations"] if not a["iscrowd"]]
    assert sum(map(sum, cm["matrix"][:-1])) == len(targets)
    assert 0 < result["best"]["f1"] <= 1
