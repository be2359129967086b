"""COCO metrics: equal to pycocotools' COCOeval on the same files, and the edge cases."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch

from conftest import make_ground_truth

from detrkit.errors import DataError
from detrkit.evaluate import METRIC_KEYS, coco_metrics, detections_to_coco, format_metrics, write_metrics


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
