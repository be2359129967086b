"""Box-aware train / val presets on :mod:`torchvision.transforms.v2`.

Contract. A preset is called as ``transform(image, target)`` where

- ``image`` is a ``tv_tensors.Image`` (``uint8``, ``3 x H x W``),
- ``target`` is a dict with ``boxes``: ``tv_tensors.BoundingBoxes`` in absolute ``(x0, y0, x1, y1)``
  pixels with ``canvas_size=(H, W)``, and ``labels``: int64 ``[T]``.

It returns ``(image, target)`` with ``image`` float32 ``3 x H' x W'`` normalised with the
ImageNet mean/std, and ``target["boxes"]`` a plain float32 ``[T', 4]`` tensor of
``(cx, cy, w, h)`` divided by the final ``(W', H', W', H')`` (so in [0, 1]); boxes that the
crop or resize made empty are dropped together with their labels (``T' <= T``).

All box geometry (flip, resize, crop, clamping, sanitising) is torchvision's: the boxes ride
along as ``BoundingBoxes`` and only the last step, :class:`NormalizeBoxes`, leaves them.

The numbers are the official DETR recipe (facebookresearch/detr ``datasets/coco.py``) at
``image_size=800``; ``image_size=S`` scales every pixel number by ``S / 800``. RT-DETR's recipe
(:func:`rtdetr_train_transforms`) works at the evaluation size.

:class:`Mosaic` composes four ``(image, target)`` pairs of that input contract into one, before
a preset runs on it (DEIM's dense one-to-one matching; the dataset side is
:class:`detrkit.data.sampler.MosaicSamples`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detrkit.data.images import ImageInput, image_tensor

# ImageNet statistics the torchvision ResNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official recipe at its reference size (shorter side 800, longer side at most 1333).
REFERENCE_SIZE = 800
REFERENCE_MAX_SIZE = 1333
TRAIN_SCALES = tuple(range(480, 801, 32))  # multi-scale shorter sides 480, 512, ..., 800
CROP_PRE_RESIZE = (400, 500, 600)  # shorter side before the random crop
CROP_SIZE_RANGE = (384, 600)  # random crop height and width, each uniform in this range

# DEIM's mosaic (ShihuaHuang95/DEIM configs/base/deim.yml, rt_deim.yml: Mosaic(output_size=320,
# rotation_range=10, translation_range=[0.1, 0.1], scaling_range=[0.5, 1.5], fill_value=0) for
# 640 px training): each tile's shorter side is half the training size, so the 2 x 2 canvas has
# about the training size; then one random affine map of the whole canvas.
MOSAIC_TILE_RATIO = 0.5  # tile shorter side / training image size (DEIM: 320 / 640)
MOSAIC_DEGREES = 10.0  # rotation uniform in [-10, 10] degrees
MOSAIC_TRANSLATE = (0.1, 0.1)  # shift uniform within +-10 % of the canvas width and height
MOSAIC_SCALE = (0.5, 1.5)  # zoom factor uniform in this range
MOSAIC_FILL = 0  # value of the pixels no image covers (DEIM: black canvas, fill_value 0)

# RT-DETR's training augmentation (lyuwenyu/RT-DETR rtdetrv2_pytorch/configs/rtdetrv2/include/dataloader.yml;
# the same ops in rtdetr_pytorch/configs/rtdetr/include/dataloader.yml): torchvision's transforms, with
# torchvision's defaults except these numbers.
RTDETR_DISTORT_P = 0.5  # RandomPhotometricDistort(p=0.5): each of its five distortions with probability 0.5
RTDETR_ZOOM_OUT_FILL = 0  # RandomZoomOut(fill=0): on a black canvas of 1 to 4 times the side, half the time
RTDETR_IOU_CROP_P = 0.8  # RandomIoUCrop(p=0.8): the release's subclass makes the SSD crop on 80 % of the images
RTDETR_MIN_BOX = 1  # SanitizeBoundingBoxes(min_size=1): boxes under 1 px dropped after the crop and at the end


def _scaled(values: Sequence[int], image_size: int) -> list[int]:
    """Reference pixel numbers scaled by ``image_size / 800``, rounded, duplicates removed, >= 1."""
    out: list[int] = []
    for v in values:
        s = max(1, round(v * image_size / REFERENCE_SIZE))
        if s not in out:  # rounding can merge neighbours at small sizes; keep each scale once
            out.append(s)
    return out


def _max_size(image_size: int, max_size: Optional[int]) -> int:
    """``max_size`` as given, or the official 800 / 1333 ratio applied to ``image_size``."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return _scaled([REFERENCE_MAX_SIZE], image_size)[0] if max_size is None else max_size


def _check_sizes(scales: Sequence[int], max_size: int) -> None:
    # torchvision's Resize refuses max_size <= size (it could not tell which side to fit).
    if max_size <= max(scales):
        raise ValueError(f"max_size ({max_size}) must be larger than the largest shorter-side size ({max(scales)})")


def _resize_shorter(size: int, max_size: Optional[int]) -> v2.Resize:
    """Shorter side to ``size`` unless the longer side would exceed ``max_size``; then longer = ``max_size``.

    This is DETR's ``get_size`` rule; torchvision rounds the other side down where the
    official code rounds it to nearest, so sizes can differ by one pixel. ``None``: no limit.
    """
    return v2.Resize(size=size, max_size=max_size)


def _resize(size: int, max_size: Optional[int], resize: str) -> v2.Resize:
    """``resize="shorter"``: :func:`_resize_shorter`; ``"square"``: both sides to ``size``, the aspect
    ratio not kept (RT-DETR's ``Resize(640, 640)``, bilinear as torchvision's and Hugging Face's)."""
    return v2.Resize(size=(size, size)) if resize == "square" else _resize_shorter(size, max_size)


def _random_resize(scales: Sequence[int], max_size: Optional[int], resize: str = "shorter") -> v2.Transform:
    """One of ``scales`` (uniformly) as the shorter side, longer side at most ``max_size`` (or as
    both sides, ``resize="square"``)."""
    if len(scales) == 1:
        return _resize(scales[0], max_size, resize)
    return v2.RandomChoice([_resize(s, max_size, resize) for s in scales])


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose height and width are each uniform in ``[min_size, max_size]``.

    The official recipe's crop: each side is drawn independently, capped by the image's own
    side (and ``min_size`` lowered to it for images smaller than ``min_size``), then the
    region's position is uniform. Boxes are cropped by torchvision's kernel; boxes left
    empty are removed later by ``SanitizeBoundingBoxes``.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def _side(self, image_side: int) -> int:
        hi = min(image_side, self.max_size)
        lo = min(self.min_size, hi)
        return int(torch.randint(lo, hi + 1, ()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch, cw = self._side(h), self._side(w)
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class IoUCrop(v2.RandomIoUCrop):
    """torchvision's SSD crop (:class:`~torchvision.transforms.v2.RandomIoUCrop`) with probability ``p``,
    otherwise the input unchanged: RT-DETR's ``RandomIoUCrop(p=0.8)``.

    As torchvision's, it zeroes the boxes whose centre falls outside the crop, for a following
    ``SanitizeBoundingBoxes`` to drop; on an image without boxes it keeps the whole image (its
    "no crop" option, drawn with probability 1/7 per round, is the only one that needs no box).
    """

    def __init__(self, p: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, *inputs: Any) -> Any:
        if torch.rand(()) >= self.p:
            return inputs if len(inputs) > 1 else inputs[0]
        return super().forward(*inputs)


class Mosaic:
    """Four ``(image, target)`` pairs -> one, DEIM's mosaic, box-aware.

    Each image is resized (boxes with it) to a shorter side of ``tile_size`` (no longer-side
    limit, as DEIM). The tiles go to the top-left corners of the four cells of a 2 x 2 grid whose
    cells are as large as the largest tile, on a canvas of ``fill`` (``2 h_max x 2 w_max``);
    their boxes move with them and their labels follow in order. Then one
    ``v2.RandomAffine(degrees, translate, scale, fill)`` (nearest-neighbour, as DEIM) maps the
    canvas and its boxes: torchvision puts each box's four transformed corners in their
    enclosing box and clamps it to the canvas; boxes that end up empty are dropped later
    (:func:`finish_targets`, as DEIM's ``SanitizeBoundingBoxes(min_size=1)``).

    Input and output follow this module's contract (uint8 ``tv_tensors.Image``, xyxy
    ``BoundingBoxes``, int64 labels); the output keeps the canvas size.
    """

    def __init__(self, tile_size: int, degrees: float = MOSAIC_DEGREES,
                 translate: tuple[float, float] = MOSAIC_TRANSLATE, scale: tuple[float, float] = MOSAIC_SCALE,
                 fill: int = MOSAIC_FILL) -> None:
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        self.resize = v2.Resize(size=tile_size)
        self.affine = v2.RandomAffine(degrees=degrees, translate=translate, scale=scale, fill=fill)
        self.fill = fill

    def __call__(self, samples: Sequence[tuple[tv_tensors.Image, dict]]) -> tuple[tv_tensors.Image, dict]:
        if len(samples) != 4:
            raise ValueError(f"a mosaic is made of 4 images, got {len(samples)}")
        tiles = [self.resize(image, target) for image, target in samples]
        h = max(image.shape[-2] for image, _ in tiles)
        w = max(image.shape[-1] for image, _ in tiles)
        canvas = torch.full((3, 2 * h, 2 * w), self.fill, dtype=torch.uint8)
        boxes, labels = [], []
        for (image, target), (top, left) in zip(tiles, ((0, 0), (0, w), (h, 0), (h, w))):
            canvas[:, top:top + image.shape[-2], left:left + image.shape[-1]] = image
            xyxy = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.XYXY)
            boxes.append(xyxy.as_subclass(Tensor).float() + torch.tensor([left, top, left, top], dtype=torch.float32))
            labels.append(target["labels"])
        target = {"boxes": tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY", canvas_size=(2 * h, 2 * w)),
                  "labels": torch.cat(labels)}
        return self.affine(tv_tensors.Image(canvas), target)


class NormalizeBoxes(v2.Transform):
    """Absolute ``BoundingBoxes`` -> plain float32 ``(cx, cy, w, h)`` divided by the canvas ``(W, H, W, H)``.

    The last step of every preset: after it the boxes are no longer a ``BoundingBoxes``, so
    later v2 transforms would not move them.
    """

    _transformed_types = (tv_tensors.BoundingBoxes,)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Tensor:
        h, w = inpt.canvas_size
        cxcywh = F.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=inpt.device)
        return cxcywh.as_subclass(Tensor).to(torch.float32) / scale


def finish_targets() -> v2.Compose:
    """Clamp boxes to the image, drop empty ones (labels in sync), normalise to ``(cx, cy, w, h)``.

    ``SanitizeBoundingBoxes`` drops boxes narrower or shorter than 1 pixel at the final size
    (torchvision's default) and removes the matching entries of ``target["labels"]``.
    """
    return v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(), NormalizeBoxes()])


def _to_model_input() -> list[v2.Transform]:
    # ToDtype with a single dtype converts only images (boxes keep their own dtype).
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]


def train_transforms(image_size: int = REFERENCE_SIZE, max_size: Optional[int] = None,
                     augment: str = "detr", resize: str = "shorter") -> v2.Compose:
    """The official DETR training augmentation, scaled to ``image_size``.

    Horizontal flip (p = 0.5), then with equal chance either

    - a random multi-scale resize: shorter side one of 480, 512, ..., 800 (longer side <= ``max_size``), or
    - resize the shorter side to 400/500/600, crop a random 384..600 region, then the same
      multi-scale resize,

    then float conversion and ImageNet normalisation. ``image_size=S`` multiplies every pixel
    number above by ``S / 800``, ``max_size`` included when it is None (1333 at 800, 213 at 128).
    ``augment="flip"`` keeps only the flip, at the evaluation size; ``augment="rtdetr"`` is RT-DETR's
    (:func:`rtdetr_train_transforms`). ``resize="square"`` makes each final size a square (RT-DETR),
    and ignores ``max_size``.
    """
    if augment == "flip":
        return _flip_only(image_size, max_size, resize)
    if augment == "rtdetr":
        return rtdetr_train_transforms(image_size, max_size, resize)
    if augment != "detr":
        raise ValueError(f"augment must be 'detr', 'flip' or 'rtdetr', got {augment!r}")
    max_size = _max_size(image_size, max_size)
    scales = _scaled(TRAIN_SCALES, image_size)
    pre_crop = _scaled(CROP_PRE_RESIZE, image_size)
    crop_min, crop_max = (_scaled([s], image_size)[0] for s in CROP_SIZE_RANGE)
    if resize != "square":
        _check_sizes(scales, max_size)
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomChoice(
                [
                    _random_resize(scales, max_size, resize),
                    v2.Compose(
                        [
                            # No longer-side limit before the crop, as in the official recipe.
                            _random_resize(pre_crop, None),
                            RandomSizeCrop(crop_min, crop_max),
                            _random_resize(scales, max_size, resize),
                        ]
                    ),
                ]
            ),
            *_to_model_input(),
            finish_targets(),
        ]
    )


def rtdetr_train_transforms(image_size: int = 640, max_size: Optional[int] = None,
                            resize: str = "square") -> v2.Compose:
    """RT-DETR's training augmentation, in the release's order: photometric distortion (brightness,
    contrast, saturation, hue, channel order; each with p 0.5), zoom-out onto a black canvas (p 0.5),
    the SSD IoU crop (p 0.8), drop the boxes the crop left out, horizontal flip (p 0.5), then the
    evaluation resize (the release: 640 x 640, ``resize="square"``), ImageNet normalisation and
    the boxes clamped, those under 1 px dropped, normalised.
    """
    return v2.Compose([
        v2.RandomPhotometricDistort(p=RTDETR_DISTORT_P),
        v2.RandomZoomOut(fill=RTDETR_ZOOM_OUT_FILL),
        IoUCrop(p=RTDETR_IOU_CROP_P),
        v2.SanitizeBoundingBoxes(min_size=RTDETR_MIN_BOX),
        v2.RandomHorizontalFlip(p=0.5),
        _eval_resize(image_size, max_size, resize),
        *_to_model_input(),
        finish_targets(),
    ])


def _flip_only(image_size: int, max_size: Optional[int], resize: str) -> v2.Compose:
    """Horizontal flip at the evaluation size: for small images, where the official scale
    augmentation shrinks objects below what a stride-16 feature map can separate."""
    return v2.Compose([v2.RandomHorizontalFlip(p=0.5), _eval_resize(image_size, max_size, resize),
                       *_to_model_input(), finish_targets()])


def _eval_resize(image_size: int, max_size: Optional[int], resize: str) -> v2.Resize:
    if resize not in ("shorter", "square"):
        raise ValueError(f"resize must be 'shorter' or 'square', got {resize!r}")
    max_size = _max_size(image_size, max_size)
    if resize == "shorter":
        _check_sizes([image_size], max_size)
    return _resize(image_size, max_size, resize)


def val_transforms(image_size: int = REFERENCE_SIZE, max_size: Optional[int] = None,
                   resize: str = "shorter") -> v2.Compose:
    """Evaluation: shorter side ``image_size`` (longer side <= ``max_size``), ImageNet normalisation;
    ``resize="square"``: ``image_size x image_size`` (RT-DETR's 640 x 640), ``max_size`` unused.

    ``max_size=None`` keeps the official 800 / 1333 ratio: ``round(1333 * image_size / 800)``.
    """
    return v2.Compose([_eval_resize(image_size, max_size, resize), *_to_model_input(), finish_targets()])


def inference_transforms(inference: dict) -> v2.Compose:
    """:func:`val_transforms` of a model's ``inference`` record (``image_size``, ``max_size``, ``resize``;
    records written before ``resize`` existed resize the shorter side)."""
    return val_transforms(inference["image_size"], inference.get("max_size"), inference.get("resize", "shorter"))


def prepare_image(image: ImageInput, transform: v2.Transform) -> tuple[Tensor, tuple[int, int]]:
    """One image for inference: a file path, PIL image or uint8 ``3 x H x W`` tensor ->
    ``(model input, original (h, w))``, through an evaluation preset such as :func:`val_transforms`."""
    image = image_tensor(image)
    size = tuple(image.shape[-2:])
    # The presets transform (image, target) pairs; an empty target carries no boxes.
    no_boxes = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=size),
                "labels": torch.zeros(0, dtype=torch.int64)}
    return transform(tv_tensors.Image(image), no_boxes)[0], size
