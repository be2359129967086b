"""Data folders in common layouts (detrkit.data.layouts): COCO, Roboflow COCO, YOLO."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CATEGORIES, ann, write_image, write_json

from detrkit.data.coco import CocoDetection
from detrkit.data.layouts import find_layout
from detrkit.data.synthetic import make_synthetic
from detrkit.errors import DataError


def test_coco_layout(tmp_path):
    make_synthetic(tmp_path / "syn", num_train=2, num_val=2)
    found = find_layout(tmp_path / "syn")
    assert found["train_json"].name == "instances_train.json" and found["train_images"].name == "train"

    # COCO 2017 names, images under images/.
    for split in ("train2017", "val2017"):
        write_image(tmp_path / "coco" / "images" / split / "1.jpg", 8, 8)
        write_json(tmp_path / "coco" / "annotations" / f"instances_{split}.json", {
            "images": [{"id": 1, "file_name": "1.jpg", "width": 8, "height": 8}],
            "annotations": [], "categories": CATEGORIES,
        })
    found = find_layout(tmp_path / "coco")
    assert found["val_images"] == tmp_path / "coco" / "images" / "val2017"
    assert found["val_json"].name == "instances_val2017.json"
    assert len(CocoDetection(found["val_json"], found["val_images"])) == 1


def test_roboflow_layout(tmp_path):
    for split in ("train", "valid", "test"):
        write_image(tmp_path / split / "img_1.jpg", 32, 16)
        write_json(tmp_path / split / "_annotations.coco.json", {
            "images": [{"id": 0, "file_name": "img_1.jpg", "width": 32, "height": 16}],
            "annotations": [ann(0, 0, 1, [2, 2, 8, 8])],
            "categories": [{"id": 0, "name": "things", "supercategory": "none"},
                           {"id": 1, "name": "cell", "supercategory": "things"}],
        })
    found = find_layout(tmp_path)
    assert found["val_json"] == tmp_path / "valid" / "_annotations.coco.json"
    assert found["train_images"] == tmp_path / "train"
    ds = CocoDetection(found["train_json"], found["train_images"])
    assert ds[0][1]["labels"].tolist() == [1]


def test_yolo_layout(tmp_path):
    (tmp_path / "data.yaml").write_text(
        "path: /somewhere/on/the/exporting/machine\ntrain: images/train\nval: images/val\nnames: [cat, dog]\n"
    )
    write_image(tmp_path / "images" / "train" / "a.jpg", 40, 20)
    write_image(tmp_path / "images" / "train" / "b.png", 10, 10)  # no label file: no objects
    write_image(tmp_path / "images" / "val" / "c.jpg", 16, 16)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "val").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text(
        "1 0.5 0.5 0.5 0.5\n\n0 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n"  # a box and a polygon
    )
    (tmp_path / "labels" / "val" / "c.txt").write_text("0 0.5 0.5 1 1\n")
    found = find_layout(tmp_path)
    assert found["train_json"] == tmp_path / ".detrkit" / "instances_train.json"
    ds = CocoDetection(found["train_json"], found["train_images"])
    assert [c["name"] for c in ds.categories] == ["cat", "dog"] and ds.cat_id_to_index == {0: 0, 1: 1}
    names = [Path(n).name for n in ds.data.file_names]
    image, target = ds[names.index("a.jpg")]
    assert image.shape == (3, 20, 40)
    assert target["labels"].tolist() == [1, 0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2]]))
    assert ds[names.index("b.png")][1]["boxes"].shape == (0, 4)

    # Converted once; a changed label file triggers a new conversion.
    stamp = found["train_json"].stat().st_mtime_ns
    find_layout(tmp_path)
    assert found["train_json"].stat().st_mtime_ns == stamp
    (tmp_path / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    find_layout(tmp_path)
    assert CocoDetection(found["train_json"], found["train_images"]).report.boxes == 1


def test_yolo_bad_label_lines_are_listed(tmp_path):
    (tmp_path / "data.yaml").write_text("train: images/train\nval: images/train\nnames: {0: cat}\n")
    write_image(tmp_path / "images" / "train" / "a.jpg", 8, 8)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("3 0.5 0.5 0.1 0.1\n0 0.5 0.5\n0 nan 0.5 0.1 0.1\n")
    with pytest.raises(DataError) as err:
        find_layout(tmp_path)
    msg = str(err.value)
    assert "a.txt:1" in msg and "a.txt:2" in msg and "a.txt:3" in msg


def test_unknown_layout_says_what_was_looked_for(tmp_path):
    (tmp_path / "stuff.txt").write_text("hello")
    with pytest.raises(DataError) as err:
        find_layout(tmp_path)
    assert str(tmp_path) in str(err.value)
    for name in ("COCO", "Roboflow", "YOLO"):
        assert name in str(err.value)
    with pytest.raises(DataError, match="not found"):
        find_layout(tmp_path / "missing")
