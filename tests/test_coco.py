"""COCO files (detrkit.data.coco): reading, repairs, every problem named with its file, the Dataset.

Every test makes its own small data in ``tmp_path``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BRUSH, CATEGORIES, DOG, LIGHT, ann, write_image, write_json
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import tv_tensors

from detrkit.data.coco import CocoDetection, load_coco
from detrkit.errors import DataError


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
    write_image(tmp_path / "x.png", 10, 10)
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
    write_image(tmp_path / "x.png", 100, 50)
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
    write_image(tmp_path / "x.png", 20, 20)
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
    write_image(path, 64, 64)
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
    write_image(tmp_path / "x.png", 30, 20)
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
    write_image(tmp_path / "x.png", 20, 20)
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
    write_image(tmp_path / "x.png", 20, 10)
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
