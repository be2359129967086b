"""Box-aware train / val presets (detrkit.data.transforms) on torchvision.transforms.v2."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from detrkit.data.coco import CocoDetection
from detrkit.data.transforms import (
    IMAGENET_MEAN, IMAGENET_STD, IoUCrop, Mosaic, finish_targets, rtdetr_train_transforms, train_transforms,
    val_transforms,
)
from detrkit.presets import resolve


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
# Mosaic (DEIM's dense one-to-one matching)
# ---------------------------------------------------------------------------------------------
GREY = 128  # the source images' background; the canvas fill is 0


def _colour(label: int) -> torch.Tensor:
    """A distinct solid colour for each object (never the background's or the fill's)."""
    return torch.tensor([40 + 50 * (label % 4), 30 + 60 * (label // 4 % 4), 200 - 20 * label], dtype=torch.uint8)


def _painted_sources(tile: int) -> list:
    """Four images whose shorter side is ``tile`` (so the tile resize keeps every pixel), each with
    two or three solid rectangles; object ``l`` (its label, unique over the four) in colour ``l``."""
    sizes = [(tile, tile + 16), (tile + 8, tile), (tile, tile), (tile + 24, tile)]
    samples, label = [], 0
    for i, (h, w) in enumerate(sizes):
        image = torch.full((3, h, w), GREY, dtype=torch.uint8)
        boxes, labels = [], []
        for x0, y0, bw, bh in ((2, 3, 10, 7), (w - 14, h - 12, 11, 9), (14, h // 2, 6, 5))[:2 + i % 2]:
            image[:, y0:y0 + bh, x0:x0 + bw] = _colour(label)[:, None, None]
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            labels.append(label)
            label += 1
        samples.append((tv_tensors.Image(image), {
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor(labels)}))
    return samples


def _pixels_of(image: torch.Tensor, label: int) -> torch.Tensor:
    """(N, 2) y, x of the pixels of object ``label``'s colour."""
    return (image == _colour(label)[:, None, None]).all(0).nonzero()


@pytest.mark.parametrize("seed", range(12))
def test_mosaic_boxes_are_the_pasted_objects_inside_the_canvas(seed):
    """Without rotation each kept box is the enclosing box of its object's pixels (to a pixel of
    nearest-neighbour rounding); with DEIM's rotation it still encloses them. Boxes stay inside the
    canvas; an object that left the canvas loses its box."""
    sources = _painted_sources(tile=32)
    sanitize = v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()])
    for degrees in (0.0, 10.0):
        torch.manual_seed(seed)
        image, target = sanitize(*Mosaic(32, degrees=degrees)(sources))
        h, w = image.shape[-2:]
        assert (h, w) == (2 * 56, 2 * 48)  # 2 x the largest tile height (56) and width (48)
        boxes = target["boxes"].as_subclass(torch.Tensor)
        assert target["boxes"].canvas_size == (h, w) and len(boxes) == len(target["labels"])
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        for box, label in zip(boxes.tolist(), target["labels"].tolist()):
            yx = _pixels_of(image, label)
            assert len(yx) > 0, (label, box)  # the object is under its box
            x0, y0 = yx[:, 1].min().item(), yx[:, 0].min().item()
            x1, y1 = yx[:, 1].max().item() + 1, yx[:, 0].max().item() + 1
            assert box[0] - 1 <= x0 and box[1] - 1 <= y0 and x1 <= box[2] + 1 and y1 <= box[3] + 1, (label, box)
            if degrees == 0:
                assert max(abs(a - b) for a, b in zip(box, (x0, y0, x1, y1))) <= 1, (label, box, (x0, y0, x1, y1))
        for label in set(range(10)) - set(target["labels"].tolist()):  # no box: at most a sliver is visible
            yx = _pixels_of(image, label)
            assert len(yx) == 0 or min(yx[:, 0].max() - yx[:, 0].min(), yx[:, 1].max() - yx[:, 1].min()) <= 1, label


def test_mosaic_holds_the_objects_of_four_images():
    sources = _painted_sources(tile=32)
    torch.manual_seed(0)
    image, target = Mosaic(32, degrees=0, translate=(0, 0), scale=(1, 1))(sources)
    assert target["labels"].tolist() == list(range(10))  # every object, in the order of the images
    assert (image[:, 56 + 32:, :48] == 0).all() and (image[:, 56:, 32:48] == 0).all()  # around the 32 x 32 third tile: fill
    assert (image[:, 56:56 + 32, :32] != 0).any(0).all()  # the third tile itself
    with pytest.raises(ValueError, match="4 images"):
        Mosaic(32)(sources[:3])


def test_rtdetr_augmentation_keeps_valid_boxes_inside_the_square_image():
    """RT-DETR's photometric distortion, zoom-out, IoU crop and flip on random images and boxes: the
    output is the recipe's size, its boxes are non-empty, inside the image, their labels in sync."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    transform = rtdetr_train_transforms(image_size=96)
    kept = given = 0
    for _ in range(60):
        h, w = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        image, target = _random_sample(rng, h, w, int(rng.integers(0, 6)))
        labels_in = target["labels"].tolist()
        out, t = transform(image, target)
        assert out.shape == (3, 96, 96) and out.dtype == torch.float32
        assert t["boxes"].shape == (len(t["labels"]), 4)
        assert set(t["labels"].tolist()) <= set(labels_in)  # boxes dropped with their labels, none invented
        cx, cy, bw, bh = t["boxes"].unbind(-1)
        assert (bw * 96 >= 1 - 1e-4).all() and (bh * 96 >= 1 - 1e-4).all()  # at least 1 px (min_size 1)
        assert (cx - bw / 2 >= -1e-6).all() and (cx + bw / 2 <= 1 + 1e-6).all()
        assert (cy - bh / 2 >= -1e-6).all() and (cy + bh / 2 <= 1 + 1e-6).all()
        kept, given = kept + len(t["labels"]), given + len(labels_in)
    assert 0.3 * given < kept < given  # the crop drops some boxes, keeps most
    # The recipe's own size: 640 x 640 whatever the photo's shape.
    data = resolve(None, {"train": {"model": "rtdetr_r18"}})[2]
    image, target = _random_sample(rng, 120, 200, 3)
    out, _ = train_transforms(data.image_size, data.max_size, data.augment, data.resize)(image, target)
    assert (data.augment, out.shape) == ("rtdetr", (3, 640, 640))


def test_the_iou_crop_runs_with_probability_p():
    """p 0 never crops; p 1 crops (the canvas shrinks) unless it draws the no-crop option; p 0.8 in between."""
    image = tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes([[40, 40, 60, 60]], format="XYXY", canvas_size=(100, 100)),
              "labels": torch.tensor([1])}
    torch.manual_seed(0)
    assert all(IoUCrop(p=0.0)(image, target)[0].shape == (3, 100, 100) for _ in range(20))
    cropped = {p: sum(IoUCrop(p=p)(image, target)[0].shape != (3, 100, 100) for _ in range(400)) for p in (1.0, 0.8)}
    # torchvision's crop also keeps the image whole on its "no crop" option (drawn again and again
    # while the IoU options find no crop in 40 trials); p = 0.8 crops 80 % as often.
    assert 150 < cropped[1.0] < 400 and 0.7 * cropped[1.0] < cropped[0.8] < 0.9 * cropped[1.0]
    with pytest.raises(ValueError):
        IoUCrop(p=1.5)
