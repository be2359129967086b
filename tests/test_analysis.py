"""Beyond the 12 numbers (detrkit.analysis): the confusion matrix, F1 against the score threshold,
the files of write_analysis; detections matched as COCOeval matches them."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from detrkit.analysis import confusion_matrix, f1_curve, format_best_threshold, write_analysis


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
    # Nothing found at any threshold (an untrained model): no threshold is recommended.
    missed = f1_curve(gt, [{**d, "bbox": _box(500, 10)} for d in dets])["best"]
    assert missed["f1"] == 0.0 and "--threshold" not in format_best_threshold(missed, 0.5)
    b = curve["per_class"][1]
    assert b["name"] == "B" and b["gt"] == 0 and set(b["f1"]) == {None}  # no target, no detection


def test_f1_counts_agree_with_cocoeval(files):
    """True positives at IoU 0.5 are those of COCOeval's own matching (crowd, duplicates, classes)."""
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
