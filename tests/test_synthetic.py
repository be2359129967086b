"""The built-in synthetic shapes set (detrkit.data.synthetic), written as real COCO files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_image

from detrkit.data.coco import CocoDetection, load_coco
from detrkit.data.synthetic import CATEGORIES as SYNTHETIC_CATEGORIES
from detrkit.data.synthetic import make_synthetic
from detrkit.data.transforms import val_transforms
from detrkit.errors import DataError


def test_synthetic_is_deterministic_and_readable(tmp_path):
    from pycocotools.coco import COCO

    a = make_synthetic(tmp_path / "a", num_train=12, num_val=4, seed=3)
    b = make_synthetic(tmp_path / "b", num_train=12, num_val=4, seed=3)
    c = make_synthetic(tmp_path / "c", num_train=12, num_val=4, seed=4)
    assert json.loads(a["train_json"].read_text()) == json.loads(b["train_json"].read_text())
    assert (a["train_images"] / "000005.jpg").read_bytes() == (b["train_images"] / "000005.jpg").read_bytes()
    assert (a["train_images"] / "000005.jpg").read_bytes() != (c["train_images"] / "000005.jpg").read_bytes()

    data = load_coco(a["train_json"], a["train_images"], check_images=True)
    assert data.categories == [{"id": c["id"], "name": c["name"]} for c in SYNTHETIC_CATEGORIES]
    assert data.report.boxes > 0 and not data.report.problems
    ds = CocoDetection(a["val_json"], a["val_images"], transforms=val_transforms(image_size=128))
    image, target = ds[0]
    assert image.shape == (3, 128, 128)
    gt = COCO(str(a["train_json"]))
    assert len(gt.getImgIds()) == 12 and sorted(gt.getCatIds()) == [1, 2, 3, 5]
    for a_ in gt.dataset["annotations"]:
        x, y, w, h = a_["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w >= 1 and h >= 1


def test_synthetic_content_statistics(tmp_path):
    paths = make_synthetic(tmp_path, num_train=200, num_val=0, seed=0)
    coco = json.loads(paths["train_json"].read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=201)[1:]
    assert per_image.max() <= 6
    assert 0.03 <= (per_image == 0).mean() <= 0.2  # about 10% empty
    sides = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    assert sides.min() >= 3 and sides.max() <= 62  # at most 60 px plus the rasteriser's edge pixels
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 5}


def test_synthetic_is_cached(tmp_path):
    paths = make_synthetic(tmp_path, num_train=3, num_val=2, image_format="png")
    stamp = paths["train_json"].stat().st_mtime_ns
    assert make_synthetic(tmp_path, num_train=3, num_val=2, image_format="png") == paths
    assert paths["train_json"].stat().st_mtime_ns == stamp
    # Other parameters regenerate and leave no stale images behind.
    make_synthetic(tmp_path, num_train=2, num_val=2, image_format="png")
    assert sorted(p.name for p in paths["train_images"].iterdir()) == ["000000.png", "000001.png"]


def test_synthetic_refuses_foreign_folders(tmp_path):
    write_image(tmp_path / "train" / "mine.jpg", 8, 8)
    with pytest.raises(DataError, match="not written by detrkit"):
        make_synthetic(tmp_path, num_train=1, num_val=1)
