"""Data: COCO loading and validation, transforms, the synthetic set, folder layouts.

Every test makes its own small data in ``tmp_path``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from detrkit.data.coco import CocoDetection, load_coco
from detrkit.data.layouts import find_layout
from detrkit.data.synthetic import CATEGORIES as SYNTHETIC_CATEGORIES
from detrkit.data.synthetic import make_synthetic
from detrkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    finish_targets,
    train_transforms,
    val_transforms,
)
from detrkit.errors import DataError

# Non-contiguous ids, out of order in the file, names with spaces: sorted by id they map to 0, 1, 2.
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "traffic light"}]
DOG, LIGHT, BRUSH = 0, 1, 2  # contiguous indices of ids 3, 7, 90


def save_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "L":
        image = image.convert("L")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "RGBA":
        image = image.convert("RGBA")
    image.save(path)


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def ann(aid, image_id, category_id, bbox, **extra):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


@pytest.fixture
def small_coco(tmp_path):
    """Four images: RGB JPEG, grayscale PNG in a sub-folder, an empty palette PNG, an RGBA PNG."""
    root = tmp_path / "images"
    save_image(root / "a.jpg", 64, 48)
    save_image(root / "sub" / "b.png", 40, 80, mode="L")
    save_image(root / "c.png", 30, 20, mode="P")
    save_image(root / "d.png", 50, 50, mode="RGBA")
    coco = {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 64, "height": 48},
            {"id": 20, "file_name": "sub/b.png", "width": 40, "height": 80},
            {"id": 30, "file_name": "c.png", "width": 30, "height": 20},
            {"id": 40, "file_name": "d.png", "width": 50, "height": 50},
        ],
        "annotations": [
            ann(1, 10, 3, [4, 6, 20, 10]),
            ann(2, 10, 90, [30, 10, 10, 20]),
            ann(3, 10, 7, [0, 0, 64, 48], iscrowd=1),
            ann(4, 20, 7, [0, 0, 40, 80]),
            ann(5, 40, 90, [10, 10, 5, 5]),
        ],
        "categories": CATEGORIES,
    }
    return write_json(tmp_path / "ann.json", coco), root


# ---------------------------------------------------------------------------------------------
# Reading COCO
# ---------------------------------------------------------------------------------------------
def test_reads_small_coco_set(small_coco):
    json_path, root = small_coco
    ds = CocoDetection(json_path, root)
    assert len(ds) == 4
    assert ds.image_ids == [10, 20, 30, 40]
    assert ds.json_path == json_path == ds.coco_json

    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert image.shape == (3, 48, 64)
    assert target["image_id"] == 10
    assert target["orig_size"].tolist() == [48, 64] and target["size"].tolist() == [48, 64]
    assert target["orig_size"].dtype == torch.int64
    # The crowd box (annotation 3) is not a training target.
    assert target["labels"].tolist() == [DOG, BRUSH] and target["labels"].dtype == torch.int64
    assert target["boxes"].dtype == torch.float32
    expected = torch.tensor([[14 / 64, 11 / 48, 20 / 64, 10 / 48], [35 / 64, 20 / 48, 10 / 64, 20 / 48]])
    torch.testing.assert_close(target["boxes"], expected)

    gray, target = ds[1]  # sub-folder file_name, grayscale -> 3 equal channels, non-square
    assert gray.shape == (3, 80, 40)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert target["labels"].tolist() == [LIGHT]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))

    palette, target = ds[2]  # no annotations: kept with T = 0
    assert palette.shape == (3, 20, 30)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)

    rgba, _ = ds[3]
    assert rgba.shape == (3, 50, 50)

    report = ds.report
    assert (report.images, report.annotations, report.boxes, report.crowd, report.empty_images) == (4, 5, 4, 1, 1)
    assert report.boxes_per_category == {3: 1, 7: 1, 90: 2}
    assert "traffic light (id 7): 1" in report.summary()


def test_category_mapping_round_trip(small_coco):
    json_path, root = small_coco
    ds = CocoDetection(json_path, root)
    assert [c["id"] for c in ds.categories] == [3, 7, 90]
    assert [c["name"] for c in ds.categories] == ["dog", "traffic light", "toothbrush"]
    for i, c in enumerate(ds.categories):
        assert ds.cat_id_to_index[c["id"]] == i

    # A given mapping (e.g. a checkpoint's) wins over the file's order.
    given = [{"id": 90, "name": "toothbrush"}, {"id": 7, "name": "traffic light"}, {"id": 3, "name": "dog"}]
    ds2 = CocoDetection(json_path, root, categories=given)
    assert ds2.cat_id_to_index == {90: 0, 7: 1, 3: 2}
    assert ds2[0][1]["labels"].tolist() == [2, 0]


def test_category_ids_starting_at_zero(tmp_path):
    save_image(tmp_path / "x.png", 10, 10)
    cats = [{"id": 0, "name": "background-ish"}, {"id": 1, "name": "cat"}]
    js = write_json(tmp_path / "a.json", {
        "images": [{"id": 0, "file_name": "x.png", "width": 10, "height": 10}],
        "annotations": [ann(0, 0, 1, [1, 1, 4, 4]), ann(1, 0, 0, [2, 2, 4, 4])],
        "categories": cats,
    })
    ds = CocoDetection(js, tmp_path)
    assert ds.cat_id_to_index == {0: 0, 1: 1}
    assert ds[0][1]["labels"].tolist() == [1, 0]


def test_exif_orientation_is_applied(tmp_path):
    # Stored 40 wide x 20 high, EXIF orientation 6 (rotate 90): displayed 20 wide x 40 high.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white in the stored image
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif.tobytes())
    js = write_json(tmp_path / "a.json", {
        "images": [{"id": 1, "file_name": "r.jpg", "width": 20, "height": 40}],
        "annotations": [], "categories": CATEGORIES,
    })
    load_coco(js, tmp_path, check_images=True)
    image, target = CocoDetection(js, tmp_path)[0]
    assert image.shape == (3, 40, 20) and target["orig_size"].tolist() == [40, 20]
    assert image[:, :15].float().mean() > 200  # the white half is on top after rotation


def test_clamping_and_dropping_are_counted(tmp_path):
    save_image(tmp_path / "x.png", 100, 50)
    js = write_json(tmp_path / "a.json", {
        "images": [{"id": 1, "file_name": "x.png", "width": 100, "height": 50}],
        "annotations": [
            ann(1, 1, 3, [10, 10, 20, 20]),  # fine
            ann(2, 1, 3, [-10, 40, 30, 20]),  # partly outside: clamped to [0, 40, 20, 10]
            ann(3, 1, 3, [90, -5, 20, 10]),  # partly outside: clamped to [90, 0, 10, 5]
            ann(4, 1, 3, [10, 10, 0, 5]),  # zero width
            ann(5, 1, 3, [10, 10, 5, -3]),  # negative height
            ann(6, 1, 3, [150, 10, 20, 20]),  # right of the image
            ann(7, 1, 3, [-30, -30, 20, 20]),  # above-left of the image
            ann(8, 1, 3, [100, 0, 10, 10]),  # touches the right edge only: nothing inside
        ],
        "categories": CATEGORIES,
    })
    data = load_coco(js, tmp_path)
    r = data.report
    assert (r.clamped, r.dropped_degenerate, r.dropped_outside, r.boxes) == (2, 2, 3, 3)
    boxes, labels = data.targets(0)
    np.testing.assert_allclose(boxes, [[10, 10, 30, 30], [0, 40, 20, 50], [90, 0, 100, 5]])
    assert labels.tolist() == [0, 0, 0]
    # The summary line names the file, counts each repair and names the annotations.
    line = r.summary().splitlines()[2]
    assert line == ("  repaired: 2 boxes clamped to their image (annotation ids 2, 3); dropped: 2 with zero or "
                    "negative size (annotation ids 4, 5), 3 outside their image (annotation ids 6, 7, 8)")
    assert r.summary().startswith(str(js)) and "no problems" in r.summary()


# ---------------------------------------------------------------------------------------------
# Bad inputs: each a DataError that names the file
# ---------------------------------------------------------------------------------------------
def _valid_coco() -> dict:
    return {
        "images": [{"id": 1, "file_name": "x.png", "width": 20, "height": 20}],
        "annotations": [ann(1, 1, 3, [1, 1, 5, 5])],
        "categories": CATEGORIES,
    }


def _bad_bbox_length(c):
    c["annotations"][0]["bbox"] = [1, 2, 3]


def _nan_bbox(c):
    c["annotations"][0]["bbox"] = [1, float("nan"), 3, 3]


def _inf_bbox(c):
    c["annotations"][0]["bbox"] = [1, 1, float("inf"), 3]


def _text_bbox(c):
    c["annotations"][0]["bbox"] = [1, 1, "3", 3]


def _unknown_category(c):
    c["annotations"][0]["category_id"] = 4


def _duplicate_image_id(c):
    c["images"].append({"id": 1, "file_name": "x.png", "width": 20, "height": 20})


def _duplicate_annotation_id(c):
    c["annotations"].append(ann(1, 1, 3, [2, 2, 5, 5]))


def _unknown_image_id(c):
    c["annotations"][0]["image_id"] = 99


def _parent_file_name(c):
    c["images"][0]["file_name"] = "../x.png"


def _absolute_file_name(c):
    c["images"][0]["file_name"] = "/etc/passwd"


def _missing_size(c):
    del c["images"][0]["width"]


def _negative_size(c):
    c["images"][0]["height"] = -20


def _bbox_not_a_list(c):
    c["annotations"][0]["bbox"] = "1 1 5 5"


def _windows_absolute_file_name(c):
    c["images"][0]["file_name"] = "C:\\data\\x.png"


def _unc_file_name(c):
    c["images"][0]["file_name"] = "\\\\server\\share\\x.png"


def _nested_parent_file_name(c):
    c["images"][0]["file_name"] = "sub/../../x.png"


@pytest.mark.parametrize(
    "corrupt, record, words",
    [
        (_bad_bbox_length, "annotation id 1", "has 3 numbers, expected 4"),
        (_bbox_not_a_list, "annotation id 1", "expected [x, y, width, height]"),
        (_nan_bbox, "annotation id 1", "not a finite number"),
        (_inf_bbox, "annotation id 1", "not a finite number"),
        (_text_bbox, "annotation id 1", "not a finite number"),
        (_unknown_category, "annotation id 1", "category_id 4 is not a known category"),
        (_duplicate_image_id, "image id 1", "appears more than once"),
        (_duplicate_annotation_id, "annotation id 1", "appears more than once"),
        (_unknown_image_id, "annotation id 1", "image_id 99 is not in 'images'"),
        (_parent_file_name, "image id 1", "leaves the image root"),
        (_nested_parent_file_name, "image id 1", "leaves the image root"),
        (_absolute_file_name, "image id 1", "absolute path"),
        (_windows_absolute_file_name, "image id 1", "absolute path"),
        (_unc_file_name, "image id 1", "absolute path"),
        (_missing_size, "image id 1", "width/height"),
        (_negative_size, "image id 1", "width/height"),
    ],
)
def test_bad_records_raise_data_error_naming_the_file(tmp_path, corrupt, record, words):
    save_image(tmp_path / "x.png", 20, 20)
    coco = _valid_coco()
    corrupt(coco)
    js = tmp_path / "bad.json"
    js.write_text(json.dumps(coco))  # json writes NaN/Infinity literals, which Python's reader accepts
    with pytest.raises(DataError) as err:
        load_coco(js, tmp_path)
    problem = str(err.value).splitlines()[1]  # the first (here the only) problem, one line
    assert problem.startswith(f"  - {js}: {record}") and words in problem and "fix" in problem, problem
    with pytest.raises(DataError):
        CocoDetection(js, tmp_path)


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not valid JSON"),
        ('{"images": [], "annotations": []}', "categories"),
        ('{"images": [], "categories": []}', "annotations"),
        ('{"annotations": [], "categories": []}', "images"),
        ("[1, 2]", "expected a COCO object"),
        ('{"images": {}, "annotations": [], "categories": []}', "images"),
    ],
)
def test_bad_files_raise_data_error_naming_the_file(tmp_path, text, words):
    js = tmp_path / "broken.json"
    js.write_text(text)
    with pytest.raises(DataError) as err:
        load_coco(js, tmp_path)
    assert str(js) in str(err.value) and words in str(err.value)


def test_missing_json_or_image_folder_names_it(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        load_coco(tmp_path / "nope.json", tmp_path)
    js = write_json(tmp_path / "a.json", _valid_coco())
    with pytest.raises(DataError, match="image folder .*no_such_dir does not exist"):
        load_coco(js, tmp_path / "no_such_dir", check_images=True)


def _truncated_jpeg(path: Path):
    save_image(path, 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make_file",
    [
        None,  # missing
        lambda p: p.write_bytes(b""),  # zero bytes
        _truncated_jpeg,
        lambda p: p.write_text("this is not an image\n"),  # text named .jpg
    ],
    ids=["missing", "zero-byte", "truncated", "text"],
)
def test_unreadable_images(tmp_path, make_file):
    path = tmp_path / "img" / "x.jpg"
    path.parent.mkdir()
    if make_file is not None:
        make_file(path)
    js = write_json(tmp_path / "a.json", {
        "images": [{"id": 5, "file_name": "x.jpg", "width": 64, "height": 64}],
        "annotations": [], "categories": CATEGORIES,
    })
    ds = CocoDetection(js, tmp_path / "img")  # files are not opened by default
    with pytest.raises(DataError) as err:
        ds[0]
    assert str(path) in str(err.value)
    with pytest.raises(DataError) as err:
        load_coco(js, tmp_path / "img", check_images=True)
    assert str(path) in str(err.value) and "image id 5" in str(err.value)


def test_an_image_broken_after_the_check_names_its_file_from_a_loader_process(small_coco):
    """Loader processes re-raise in the main process; the error is still a one-line DataError
    naming the file, with the worker's traceback kept for --debug."""
    from detrkit.data.build import make_eval_loader

    json_path, root = small_coco
    ds = CocoDetection(json_path, root, check_images=True)  # every file opens now
    _truncated_jpeg(root / "a.jpg")  # ... and then one is damaged
    with pytest.raises(DataError) as err:
        for _ in make_eval_loader(ds, batch_size=1, workers=2):
            pass
    message = str(err.value)
    assert message.startswith(str(root / "a.jpg")) and "cannot read the image" in message and "\n" not in message
    assert "DataLoader worker" in err.value.worker_traceback and "open_rgb" in err.value.worker_traceback


def test_size_mismatch_is_a_problem(tmp_path):
    save_image(tmp_path / "x.png", 30, 20)
    js = write_json(tmp_path / "a.json", {
        "images": [{"id": 1, "file_name": "x.png", "width": 20, "height": 30}],
        "annotations": [], "categories": CATEGORIES,
    })
    with pytest.raises(DataError) as err:
        load_coco(js, tmp_path, check_images=True)
    assert f"{js}: image id 1: {tmp_path / 'x.png'} is 30x20 but the JSON says 20x30" in str(err.value)
    with pytest.raises(DataError) as err:  # not checked up front: the loader refuses it too
        CocoDetection(js, tmp_path)[0]
    assert str(err.value).startswith(f"{tmp_path / 'x.png'}: image is 30x20") and "image id 1" in str(err.value)


def test_all_problems_are_listed_together(tmp_path):
    save_image(tmp_path / "x.png", 20, 20)
    coco = _valid_coco()
    coco["images"].append({"id": 2, "file_name": "../escape.png", "width": 20, "height": 20})
    coco["annotations"] += [
        ann(11, 1, 3, [1, 1, 5]),
        ann(12, 1, 42, [1, 1, 5, 5]),
        ann(13, 77, 3, [1, 1, 5, 5]),
        ann(14, 1, 3, [1, 1, 2, 2]),
        ann(14, 1, 3, [1, 1, 2, 2]),
    ]
    js = write_json(tmp_path / "many.json", coco)
    with pytest.raises(DataError) as err:
        load_coco(js, tmp_path, check_images=True)
    msg = str(err.value)
    for words in ("image id 2", "annotation id 11", "annotation id 12", "annotation id 13", "annotation id 14"):
        assert words in msg
    assert "5 problem(s)" in msg
    # Non-strict keeps going, drops the bad records and reports every problem.
    data = load_coco(js, tmp_path, strict=False)
    assert len(data.report.problems) == 5 and len(data) == 1
    assert data.report.boxes == 2  # annotations 1 and the first 14
    assert "5 problems to fix" in data.report.summary()


# ---------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------
def _random_sample(rng: np.random.Generator, h: int, w: int, n: int):
    image = tv_tensors.Image(torch.from_numpy(rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)))
    x0 = rng.uniform(0, w - 2, n)
    y0 = rng.uniform(0, h - 2, n)
    x1 = np.minimum(x0 + rng.uniform(1, w, n), w)
    y1 = np.minimum(y0 + rng.uniform(1, h, n), h)
    boxes = torch.tensor(np.stack([x0, y0, x1, y1], 1), dtype=torch.float32)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.arange(n, dtype=torch.int64),
    }
    return image, target


def test_horizontal_flip_moves_a_known_box(small_coco):
    json_path, root = small_coco
    ds = CocoDetection(json_path, root, transforms=v2.RandomHorizontalFlip(p=1.0))
    _, target = ds[0]
    # Dog box x in [4, 24] of a 64 wide image -> [40, 60]; y unchanged.
    torch.testing.assert_close(target["boxes"][0], torch.tensor([50 / 64, 11 / 48, 20 / 64, 10 / 48]))


def test_sanitize_keeps_labels_in_sync():
    image = tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes([[0, 0, 10, 10], [50, 50, 90, 90], [35, 35, 45, 45]],
                                          format="XYXY", canvas_size=(100, 100)),
        "labels": torch.tensor([7, 8, 9]),
    }
    # The centre crop keeps pixels 30..70: the first box is gone, the second is cut to 50..70.
    out_image, out = v2.Compose([v2.CenterCrop(40), finish_targets()])(image, target)
    assert out_image.shape == (3, 40, 40)
    assert out["labels"].tolist() == [8, 9]
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.75, 0.75, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]]))
    assert type(out["boxes"]) is torch.Tensor


def test_train_preset_on_random_inputs():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    transform = train_transforms(image_size=128)
    scales = set(range(77, 129))
    for _ in range(60):
        h, w = int(rng.integers(20, 400)), int(rng.integers(20, 400))
        image, target = _random_sample(rng, h, w, int(rng.integers(0, 6)))
        out_image, out = transform(image, target)
        assert out_image.dtype == torch.float32 and out_image.shape[0] == 3
        oh, ow = out_image.shape[-2:]
        assert min(oh, ow) in scales or max(oh, ow) == 213, (h, w, oh, ow)
        assert max(oh, ow) <= 213
        boxes = out["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape == (len(out["labels"]), 4)
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 2:] > 0).all()
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        assert (xyxy >= -1e-5).all() and (xyxy <= 1 + 1e-5).all()
        # Labels are the original box indices, so a dropped box removes exactly its own label.
        assert out["labels"].tolist() == sorted(out["labels"].tolist())


def test_train_preset_scales_with_image_size():
    # The multi-scale shorter sides at 128 are 77..128 (480..800 times 0.16); longer side <= 213.
    seen = set()
    torch.manual_seed(1)
    image, target = _random_sample(np.random.default_rng(1), 300, 400, 2)
    transform = train_transforms(image_size=128)
    for _ in range(200):
        out_image, _ = transform(image, target)
        seen.add(min(out_image.shape[-2:]))
    assert {77, 128} <= seen and max(seen) == 128


def test_val_preset_sizes_and_normalisation():
    image = tv_tensors.Image(torch.full((3, 300, 200), 255, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes([[0, 0, 200, 300]], format="XYXY", canvas_size=(300, 200)),
              "labels": torch.tensor([1])}
    out_image, out = val_transforms(image_size=128)(image, target)
    assert out_image.shape == (3, 192, 128)  # shorter side 128, longer 192 <= 213
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(out_image[:, 0, 0], expected)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    # A long image: the longer side is capped at max_size and the shorter one follows.
    wide = tv_tensors.Image(torch.zeros((3, 100, 400), dtype=torch.uint8))
    empty = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(100, 400)),
             "labels": torch.zeros(0, dtype=torch.int64)}
    out_image, out = val_transforms(image_size=128)(wide, empty)
    assert out_image.shape == (3, 53, 213)  # DETR's rule: round(213 * 100 / 400) = 53
    assert out["boxes"].shape == (0, 4)
    assert val_transforms()(wide, empty)[0].shape == (3, 333, 1333)
    with pytest.raises(ValueError, match="max_size"):
        val_transforms(image_size=800, max_size=800)


def test_dataset_with_train_preset(small_coco):
    json_path, root = small_coco
    torch.manual_seed(0)
    ds = CocoDetection(json_path, root, transforms=train_transforms(image_size=64))
    for k in range(len(ds)):
        image, target = ds[k]
        assert image.dtype == torch.float32
        assert target["size"].tolist() == list(image.shape[-2:])
        assert len(target["boxes"]) == len(target["labels"])


# ---------------------------------------------------------------------------------------------
# Synthetic set
# ---------------------------------------------------------------------------------------------
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
    save_image(tmp_path / "train" / "mine.jpg", 8, 8)
    with pytest.raises(DataError, match="not written by detrkit"):
        make_synthetic(tmp_path, num_train=1, num_val=1)


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
def test_coco_layout(tmp_path):
    make_synthetic(tmp_path / "syn", num_train=2, num_val=2)
    found = find_layout(tmp_path / "syn")
    assert found["train_json"].name == "instances_train.json" and found["train_images"].name == "train"

    # COCO 2017 names, images under images/.
    for split in ("train2017", "val2017"):
        save_image(tmp_path / "coco" / "images" / split / "1.jpg", 8, 8)
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
        save_image(tmp_path / split / "img_1.jpg", 32, 16)
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
    save_image(tmp_path / "images" / "train" / "a.jpg", 40, 20)
    save_image(tmp_path / "images" / "train" / "b.png", 10, 10)  # no label file: no objects
    save_image(tmp_path / "images" / "val" / "c.jpg", 16, 16)
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
    save_image(tmp_path / "images" / "train" / "a.jpg", 8, 8)
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


# ---------------------------------------------------------------------------------------------
# Property: the loader raises DataError and nothing else, whatever the records hold
# ---------------------------------------------------------------------------------------------
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.just(-1), st.just(0), st.just(5),
)
_junk = st.one_of(st.none(), st.booleans(), st.text(max_size=3), _numbers, st.lists(st.integers(), max_size=2))
_annotation = st.fixed_dictionaries(
    {
        "id": st.one_of(st.integers(0, 5), _junk),
        "image_id": st.one_of(st.integers(0, 3), _junk),
        "category_id": st.one_of(st.sampled_from([3, 7, 90, 0, 4]), _junk),
        "bbox": st.one_of(st.lists(_numbers, min_size=0, max_size=6), _junk),
    },
    optional={"iscrowd": st.one_of(st.sampled_from([0, 1]), _junk)},
)


_image = st.fixed_dictionaries(
    {
        "id": st.one_of(st.integers(0, 3), _junk),
        "file_name": st.one_of(st.sampled_from(["x.png", "missing.png", "../x.png", "/x.png", ""]), _junk),
        "width": st.one_of(st.just(20), _numbers, _junk),
        "height": st.one_of(st.just(10), _numbers, _junk),
    }
)
_good_images = [{"id": 1, "file_name": "x.png", "width": 20, "height": 10},
                {"id": 2, "file_name": "x.png", "width": 20, "height": 10}]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    annotations=st.lists(st.one_of(_annotation, _junk), max_size=6),
    images=st.one_of(st.just(_good_images), st.lists(st.one_of(_image, _junk), max_size=3)),
    check=st.booleans(),
)
def test_loader_raises_only_data_error(tmp_path, annotations, images, check):
    save_image(tmp_path / "x.png", 20, 10)
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    js = tmp_path / "h.json"
    js.write_text(json.dumps(coco))
    try:
        data = load_coco(js, tmp_path, check_images=check)
    except DataError as e:
        assert str(js) in str(e)
        return
    # Whatever survives is a clean target.
    for k in range(len(data)):
        boxes, _ = data.targets(k)
        h, w = data.sizes[k]
        assert np.isfinite(boxes).all() and (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all()
        assert (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
    assert set(data.labels.tolist()) <= {0, 1, 2}
    assert data.offsets[-1] == len(data.boxes) == data.report.boxes
