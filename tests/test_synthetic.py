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


def _set_digest(paths) -> str:
    """sha256 over both splits' annotations (canonical JSON) and every image's decoded pixels."""
    import hashlib

    from PIL import Image

    h = hashlib.sha256()
    for split in ("train", "val"):
        coco = json.loads(paths[f"{split}_json"].read_text())
        h.update(json.dumps(coco, sort_keys=True).encode())
        for im in coco["images"]:
            h.update(np.asarray(Image.open(paths[f"{split}_images"] / im["file_name"])).tobytes())
    return h.hexdigest()


def test_default_sets_are_those_made_before_the_size_and_count_options(tmp_path):
    # Digests of the sets the generator wrote before --objects and --object-size existed (PNG, so
    # the pixels do not depend on a JPEG codec). `make demo`'s cached set must stay the same data;
    # a new numpy random stream or Pillow rasteriser would change them too (then bump FORMAT_VERSION).
    a = make_synthetic(tmp_path / "a", num_train=6, num_val=3, seed=0, image_format="png")
    assert _set_digest(a) == "146335b296fb49c00f0f7550b651a65bf044564c625ce842347cd86e06e107bb"
    b = make_synthetic(tmp_path / "b", num_train=6, num_val=3, seed=5, image_size=64, image_format="png")
    assert _set_digest(b) == "c98dd0f413e8340e970a684031db7435f1708cfcc2a91cc3485030ad2909b4cf"
    # The manifest (the cache key) is unchanged too, so sets cached before stay valid.
    assert set(json.loads((tmp_path / "a" / "synthetic.json").read_text())) == {
        "generator", "version", "num_train", "num_val", "image_size", "seed", "max_objects", "empty_fraction",
        "image_format"}
    # At 128 px the explicit reference range draws exactly the default set.
    c = make_synthetic(tmp_path / "c", num_train=6, num_val=3, seed=0, image_format="png", object_size=(10, 60),
                       min_objects=1, max_objects=6)
    assert _set_digest(c) == _set_digest(a)


def test_object_size_and_count_ranges(tmp_path):
    paths = make_synthetic(tmp_path, num_train=30, num_val=0, image_size=256, object_size=(8, 24), min_objects=8,
                           max_objects=12, empty_fraction=0.0, image_format="png")
    coco = json.loads(paths["train_json"].read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=31)[1:]
    assert per_image.min() == 8 and per_image.max() == 12  # small shapes in a large image: every one placed
    sides = np.array([max(a["bbox"][2:]) for a in coco["annotations"]])
    # At most 24 px plus the rasteriser's edge pixels; at least a 60%-visible triangle of 8 px.
    assert sides.max() <= 26 and sides.min() >= 4
    assert np.median(sides) < 20  # drawn across the range, not pinned to its top
    # The default range at 256 px is 20-120 px: far larger shapes.
    default = make_synthetic(tmp_path / "default", num_train=30, num_val=0, image_size=256, image_format="png")
    default_sides = [max(a["bbox"][2:]) for a in json.loads(default["train_json"].read_text())["annotations"]]
    assert np.median(default_sides) > 40
    manifest = json.loads((tmp_path / "synthetic.json").read_text())
    assert manifest["object_size"] == [8.0, 24.0] and manifest["min_objects"] == 8 and manifest["max_objects"] == 12


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_objects=3, max_objects=2), "min_objects <= max_objects"),
    (dict(min_objects=-1), "min_objects <= max_objects"),
    (dict(object_size=(20, 10)), "object_size"),
    (dict(object_size=(1, 10)), "object_size"),
    (dict(image_size=64, object_size=(8, 65)), "image_size"),
])
def test_bad_ranges_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic(tmp_path, num_train=1, num_val=1, **kwargs)
    assert not (tmp_path / "train").exists()  # refused before anything is written


def test_synth_command_with_ranges_writes_a_valid_set(tmp_path, capsys):
    from detrkit.cli import main

    out = tmp_path / "stand-in"
    assert main(["synth", str(out), "--image-size", "160", "--object-size", "8", "32", "--objects", "2", "4",
                 "--num-train", "6", "--num-val", "3"]) == 0
    assert main(["check-data", "--data", str(out)]) == 0
    coco = json.loads((out / "annotations" / "instances_train.json").read_text())
    assert all(im["width"] == im["height"] == 160 for im in coco["images"])
    assert max(max(a["bbox"][2:]) for a in coco["annotations"]) <= 34
    capsys.readouterr()
    assert main(["synth", str(tmp_path / "bad"), "--objects", "5", "2"]) == 2
    assert "min_objects <= max_objects" in capsys.readouterr().err
