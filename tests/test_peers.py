"""benchmarks/peers.py's plumbing that needs no Ultralytics: the COCO -> YOLO copy of a data set,
and the peers' detections mapped back to the data set's own image and category ids.

Trains nothing and measures nothing; the Ultralytics side runs in its own venv (the script's
docstring), and this file checks that loading the script never imports it.
"""
import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_image

from detrkit.data.synthetic import make_synthetic

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def peers():
    import runpy

    sys.path.insert(0, str(BENCHMARKS))  # the script imports its neighbour benchmarks/flops.py
    try:
        module = runpy.run_path(str(BENCHMARKS / "peers.py"), run_name="peers")
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert "ultralytics" not in sys.modules  # detrkit's side never imports it
    return module


@pytest.fixture
def coco_set(tmp_path):
    """Category ids with gaps, listed out of order; a sub-folder; a crowd box, a box across the
    image border, a box outside it, and an image without objects."""
    root = tmp_path / "images"
    images = [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 50},
              {"id": 9, "file_name": "sub/b.PNG", "width": 64, "height": 64},
              {"id": 12, "file_name": "c.jpg", "width": 40, "height": 80}]
    for im in images:
        write_image(root / im["file_name"], im["width"], im["height"])
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [90, 40, 20, 20], "area": 400, "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 9, "category_id": 11, "bbox": [0, 0, 64, 32], "area": 2048, "iscrowd": 0},
        {"id": 4, "image_id": 9, "category_id": 2, "bbox": [4, 40, 10, 10], "area": 100, "iscrowd": 1},  # crowd
        {"id": 5, "image_id": 9, "category_id": 5, "bbox": [70, 70, 5, 5], "area": 25, "iscrowd": 0},  # outside
    ]
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 11, "name": "c11"}, {"id": 2, "name": "c2"}, {"id": 5, "name": "c5"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    return {"train_json": tmp_path / "instances.json", "train_images": root,
            "val_json": tmp_path / "instances.json", "val_images": root}


def _labels(folder: Path, stem) -> list[list[float]]:
    return [[float(v) for v in line.split()] for line in (folder / f"{stem}.txt").read_text().splitlines()]


def _flat(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


def test_coco_to_yolo(peers, coco_set, tmp_path):
    yolo = peers["coco_to_yolo"](coco_set, tmp_path / "yolo")
    assert yolo["category_ids"] == [2, 5, 11]  # class index i = the i-th id in ascending order
    assert yolo["boxes"] == {"train": 3, "val": 3}  # not the crowd box nor the one outside the image
    data = yaml.safe_load(yolo["yaml"].read_text())
    assert data["names"] == {0: "c2", 1: "c5", 2: "c11"} and data["train"] == "images/train"
    images, labels = tmp_path / "yolo" / "images" / "train", tmp_path / "yolo" / "labels" / "train"
    assert sorted(p.name for p in images.iterdir()) == ["12.jpg", "7.jpg", "9.png"]  # named by image id
    assert (images / "9.png").resolve() == (coco_set["train_images"] / "sub" / "b.PNG").resolve()
    assert _flat(_labels(labels, 7)) == pytest.approx([1, 0.2, 0.2, 0.2, 0.2,  # [10, 5, 20, 10] in 100 x 50
                                                       0, 0.95, 0.9, 0.1, 0.2])  # clipped to [90, 40, 100, 50]
    assert _flat(_labels(labels, 9)) == pytest.approx([2, 0.5, 0.25, 1.0, 0.5])
    assert (labels / "12.txt").read_text() == ""  # an image without objects: a background image
    # Rebuilt from scratch each time: no stale files.
    (images / "stale.jpg").write_text("x")
    peers["coco_to_yolo"](coco_set, tmp_path / "yolo")
    assert not (images / "stale.jpg").exists()


def test_peer_detections_map_back_to_coco_ids(peers):
    predictions = {"9": [[1.0, 2.0, 11.0, 22.0, 0.5, 2], [0.0, 0.0, 4.0, 4.0, 0.9, 0]],
                   "7": [[5.0, 5.0, 6.0, 7.0, 0.25, 1]], "12": []}
    dets = peers["peer_detections_to_coco"](predictions, [2, 5, 11])
    assert dets == [
        {"image_id": 7, "category_id": 5, "bbox": [5.0, 5.0, 1.0, 2.0], "score": 0.25},
        {"image_id": 9, "category_id": 2, "bbox": [0.0, 0.0, 4.0, 4.0], "score": 0.9},  # best first
        {"image_id": 9, "category_id": 11, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5},
    ]
    many = {"3": [[0, 0, 1, 1, i / 200, 0] for i in range(150)]}
    kept = peers["peer_detections_to_coco"](many, [4], max_det=100)
    assert len(kept) == 100 and min(d["score"] for d in kept) == 50 / 200  # the 100 best


def test_a_perfect_peer_scores_one_through_the_round_trip(peers, tmp_path):
    # The labels written for the peer, read back as a perfect detector would report them, must
    # score AP 1 against the original COCO file: image ids, category ids (1, 2, 3, 5) and boxes
    # all map back.
    paths = make_synthetic(tmp_path / "shapes", num_train=2, num_val=6, image_size=64)
    yolo = peers["coco_to_yolo"](paths, tmp_path / "yolo")
    coco = json.loads(paths["val_json"].read_text())
    predictions = {}
    for im in coco["images"]:
        w, h = im["width"], im["height"]
        rows = _labels(tmp_path / "yolo" / "labels" / "val", im["id"])
        predictions[str(im["id"])] = [[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h,
                                       0.9, k] for k, cx, cy, bw, bh in rows]
    assert sum(map(len, predictions.values())) == len(coco["annotations"]) > 0
    run = {"model": "perfect", "seconds": 120.0, "images_seen": 6, "train_images": 3, "image_size": 64,
           "gflops": 1.0, "detections": peers["peer_detections_to_coco"](predictions, yolo["category_ids"])}
    row = peers["score"](run, paths["val_json"])
    assert row["metrics"]["AP"] == pytest.approx(1.0) and row["metrics"]["AR100"] == pytest.approx(1.0)
    assert row["minutes"] == 2.0 and row["epochs"] == 2.0 and row["img_s"] == 0.05
    assert peers["table_row"](row, "shapes", 0.5).startswith("| perfect | shapes | 64 | 1.000 | 1.000 |")
    # With every class index shifted by one, the same boxes score nothing: the mapping matters.
    shifted = {k: [r[:5] + [(r[5] + 1) % 4] for r in v] for k, v in predictions.items()}
    wrong = dict(run, detections=peers["peer_detections_to_coco"](shifted, yolo["category_ids"]))
    assert peers["score"](wrong, paths["val_json"])["metrics"]["AP"] == 0.0


def test_images_trained_and_image_size(peers):
    assert peers["images_trained"](250, 8, 2000) == 2000  # one epoch
    assert peers["images_trained"](3, 16, 40) == 40  # an epoch of 40 images: steps of 16, 16 and 8
    assert peers["images_trained"](4, 16, 40) == 40 + 16
    assert peers["images_trained"](2, 16, 40) == 32
    assert peers["image_size"]({"images": [{"width": 640, "height": 480}] * 2 + [{"width": 100, "height": 90}]}) == 640
    assert peers["image_size"]({"images": [{"width": 100, "height": 90}]}) == 128  # a multiple of 32


def test_flops_counts_convolutions_and_attention_in_eval_mode(peers):
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from flops import forward_gflops
    finally:
        sys.path.remove(str(BENCHMARKS))
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert forward_gflops(conv, torch.zeros(1, 3, 8, 8)) * 1e9 == 2 * 8 * 8 * 8 * 3 * 9  # 2 per multiply-add

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    t, d = 5, 16
    expected = 2 * (4 * t * d * d + 2 * t * t * d)  # q, k, v and output projections; QK^T and AV
    model = SelfAttention()
    assert torch.backends.mha.get_fastpath_enabled()
    assert forward_gflops(model, torch.zeros(1, t, d)) * 1e9 == expected  # the fused fast path would hide it
    assert torch.backends.mha.get_fastpath_enabled() and model.training  # settings restored
