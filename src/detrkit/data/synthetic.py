"""The built-in synthetic shapes data set, written as real COCO files.

Layout under ``out_dir`` (the COCO layout :func:`detrkit.data.layouts.find_layout` detects)::

    annotations/instances_train.json   annotations/instances_val.json
    train/000000.jpg ...               val/000000.jpg ...
    synthetic.json                     the generation parameters (the cache key)

Each image: a two-colour gradient with random lines and pixel noise, and
``min_objects..max_objects`` shapes (circle, square, triangle, star) of random colour, size
and rotation, about ``empty_fraction`` of the images with none. A shape's size is the diameter
of the circle it fits in, drawn uniformly from ``object_size`` pixels (default: 10-60 px at
128 px, scaled with the image size). Later shapes may cover earlier ones, but every
shape keeps at least ``MIN_VISIBLE`` of its pixels, and its box is the box of its visible
pixels as drawn. Everything follows from ``seed``: image ``i`` of a split depends only on
``(seed, split, i)`` and the other parameters, so the same call writes the same files.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from detrkit.errors import DataError

# Category ids skip 4 on purpose: like COCO's 1..90 with gaps, so the demo exercises the
# dataset-id <-> contiguous-index mapping end to end.
CATEGORIES = ({"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"},
              {"id": 5, "name": "star"})
REFERENCE_SIZE = 128  # the pixel numbers below are for 128 px images; other sizes scale them
SHAPE_SIZE_RANGE = (10.0, 60.0)  # diameter of the circle each shape fits in, pixels at 128 px
MIN_OBJECT_SIZE = 2.0  # pixels: a smaller shape may not cover a single pixel centre, and nothing is drawn
MIN_VISIBLE = 0.6  # a new shape may hide at most 40% of any earlier shape, so every box shows its object
PLACEMENT_TRIES = 10  # positions tried before a shape that would hide too much is skipped
STAR_INNER_RATIO = 0.45  # inner / outer radius of the five-pointed star
MANIFEST = "synthetic.json"
FORMAT_VERSION = 1  # bump when the drawing changes, so cached sets are regenerated
_SPLIT_CODE = {"train": 0, "val": 1}  # part of each image's seed


def _polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape inscribed in a circle of diameter ``size``, rotated by ``angle``."""
    r = size / 2
    if kind == "square":
        radii, n = [r] * 4, 4  # side size / sqrt(2): at any rotation the square fits the circle
    elif kind == "triangle":
        radii, n = [r] * 3, 3
    else:  # star: outer and inner points alternate
        radii, n = [r if i % 2 == 0 else r * STAR_INNER_RATIO for i in range(10)], 10
    return [
        (cx + rad * math.cos(angle + 2 * math.pi * i / n), cy + rad * math.sin(angle + 2 * math.pi * i / n))
        for i, rad in enumerate(radii)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, geom: tuple, fill) -> None:
    cx, cy, size, angle = geom
    if kind == "circle":
        r = size / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(kind, cx, cy, size, angle), fill=fill)


def _background(rng: np.random.Generator, s: int) -> Image.Image:
    """A random two-colour linear gradient with a few random lines."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    t = (xx * math.cos(theta) + yy * math.sin(theta))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)  # (s, s) in [0, 1]
    pixels = c0 * (1 - t[..., None]) + c1 * t[..., None]  # (s, s, 3)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 6))):
        x0, y0, x1, y1 = rng.uniform(0, s, size=4)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(1, max(2, s // 48) + 1)))
    return image


def _contrasting_colour(rng: np.random.Generator, behind: np.ndarray) -> tuple[int, int, int]:
    """A random colour, redrawn a few times until it differs clearly from ``behind`` (mean RGB)."""
    for _ in range(8):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - behind).sum() > 120:
            break
    return tuple(int(v) for v in colour)


def _make_image(rng: np.random.Generator, s: int, objects: tuple[int, int], empty_fraction: float,
                object_size: Optional[tuple[float, float]]):
    """One image and its annotations ``[(category index, [x, y, w, h], visible area)]``."""
    image = _background(rng, s)
    draw = ImageDraw.Draw(image)
    owner = np.full((s, s), -1, dtype=np.int16)  # which shape each pixel shows; -1 = background
    areas: list[int] = []  # full (unoccluded) pixel area of each placed shape
    kinds: list[int] = []
    n = 0 if rng.random() < empty_fraction else int(rng.integers(objects[0], objects[1] + 1))
    # Without object_size: the reference range scaled, computed exactly as before the option
    # existed, so the default sets stay the same files (a scaled range would round differently).
    size_range, unit = (object_size, 1.0) if object_size else (SHAPE_SIZE_RANGE, s / REFERENCE_SIZE)
    for _ in range(n):
        k = int(rng.integers(len(CATEGORIES)))
        kind = CATEGORIES[k]["name"]
        size = rng.uniform(*size_range) * unit
        angle = rng.uniform(0, 2 * math.pi)
        # Pixels each earlier shape still shows; placement tries do not change it.
        visible = np.bincount(owner.ravel().astype(np.int64) + 1, minlength=len(areas) + 1)[1:]
        for _try in range(PLACEMENT_TRIES):
            cx, cy = rng.uniform(size / 2, s - size / 2, size=2)
            mask_img = Image.new("L", (s, s), 0)
            _draw_shape(ImageDraw.Draw(mask_img), kind, (cx, cy, size, angle), 255)
            mask = np.asarray(mask_img) > 0  # the exact pixels the same call paints on the image
            if not mask.any():
                continue
            covered = np.bincount(owner[mask].astype(np.int64) + 1, minlength=len(areas) + 1)[1:]
            if all(v - c >= MIN_VISIBLE * a for v, c, a in zip(visible, covered, areas)):
                behind = np.asarray(image)[mask].mean(axis=0)
                _draw_shape(draw, kind, (cx, cy, size, angle), _contrasting_colour(rng, behind))
                owner[mask] = len(areas)
                areas.append(int(mask.sum()))
                kinds.append(k)
                break
    # Noise over everything, shapes included, so edges are not perfectly clean.
    pixels = np.asarray(image).astype(np.float32)
    pixels += rng.normal(0.0, rng.uniform(3, 15), size=pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    found = []
    for j, k in enumerate(kinds):
        ys, xs = np.nonzero(owner == j)
        x0, y0 = int(xs.min()), int(ys.min())
        bbox = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]  # pixel edges
        found.append((k, bbox, float(len(xs))))
    return image, found


def _write_split(
    split: str, count: int, out_dir: Path, *, image_size: int, seed: int, objects: tuple[int, int],
    empty_fraction: float, object_size: Optional[tuple[float, float]], image_format: str,
) -> None:
    folder = out_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], i])
        image, shapes = _make_image(rng, image_size, objects, empty_fraction, object_size)
        file_name = f"{i:06d}.{image_format}"
        if image_format == "jpg":
            image.save(folder / file_name, quality=92)
        else:
            image.save(folder / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": image_size, "height": image_size})
        for k, bbox, area in shapes:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORIES[k]["id"],
                "bbox": bbox, "area": area, "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"detrkit synthetic shapes ({split})", "version": str(FORMAT_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": [dict(c, supercategory="shape") for c in CATEGORIES],
    }
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def _paths(out_dir: Path) -> dict[str, Path]:
    return {
        "train_json": out_dir / "annotations" / "instances_train.json",
        "train_images": out_dir / "train",
        "val_json": out_dir / "annotations" / "instances_val.json",
        "val_images": out_dir / "val",
    }


def _is_complete(out_dir: Path, params: dict) -> bool:
    """True when ``out_dir`` holds a finished set made with exactly ``params``."""
    try:
        if json.loads((out_dir / MANIFEST).read_text()) != params:
            return False
        paths = _paths(out_dir)
        for split in ("train", "val"):
            listed = json.loads(paths[f"{split}_json"].read_text())["images"]
            if not all((paths[f"{split}_images"] / im["file_name"]).is_file() for im in listed):
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def make_synthetic(
    out_dir: Union[str, Path],
    *,
    num_train: int = 2000,  # ours: enough for the tiny preset to learn the four shapes
    num_val: int = 200,  # ours: keeps `detrkit demo` evaluation to seconds on a CPU
    image_size: int = REFERENCE_SIZE,
    seed: int = 0,
    min_objects: int = 1,  # ours: objects in an image that is not one of the empty ones
    max_objects: int = 6,
    object_size: Optional[tuple[float, float]] = None,  # pixels; None = SHAPE_SIZE_RANGE scaled to image_size
    empty_fraction: float = 0.1,
    image_format: str = "jpg",
    force: bool = False,
) -> dict[str, Path]:
    """Write (or reuse) the synthetic shapes set under ``out_dir``.

    Returns ``{"train_json", "train_images", "val_json", "val_images"}`` paths, the same
    keys as :func:`detrkit.data.layouts.find_layout`. If ``out_dir`` already holds a
    complete set made with the same parameters (recorded in ``synthetic.json``), nothing is
    written unless ``force``. ``image_format`` is ``"jpg"`` or ``"png"``. Refuses to write
    into ``train/`` or ``val/`` folders that exist but were not made by this function.

    An image holds ``min_objects..max_objects`` shapes (uniform; none for about
    ``empty_fraction`` of the images), each ``object_size = (smallest, largest)`` pixels across
    (the diameter of the circle it fits in; its box can be smaller: a triangle's, or an
    occluded shape's). A shape that cannot be placed without hiding too much of the others is
    left out, so a crowded image can hold fewer than ``min_objects``.
    """
    _check_arguments(num_train, num_val, image_size, min_objects, max_objects, object_size, empty_fraction,
                     image_format)
    out_dir = Path(out_dir)
    params = dict(
        generator="detrkit.data.synthetic", version=FORMAT_VERSION, num_train=num_train, num_val=num_val,
        image_size=image_size, seed=seed, max_objects=max_objects, empty_fraction=empty_fraction,
        image_format=image_format,
    )
    # Recorded only when set: a set cached before these options existed stays valid.
    if min_objects != 1:
        params["min_objects"] = min_objects
    if object_size is not None:
        params["object_size"] = [float(v) for v in object_size]
    paths = _paths(out_dir)
    if not force and _is_complete(out_dir, params):
        return paths
    ours = (out_dir / MANIFEST).is_file()
    for split in ("train", "val"):
        folder = paths[f"{split}_images"]
        if folder.is_dir() and any(folder.iterdir()):
            if not ours:
                raise DataError(
                    f"{folder} exists and was not written by detrkit; fix: choose an empty or new output folder"
                )
            shutil.rmtree(folder)  # a set we made with other parameters: start clean, no stale images
    (out_dir / MANIFEST).unlink(missing_ok=True)  # written last: an interrupted run is never "complete"
    common = dict(image_size=image_size, seed=seed, objects=(min_objects, max_objects), empty_fraction=empty_fraction,
                  object_size=None if object_size is None else (float(object_size[0]), float(object_size[1])),
                  image_format=image_format)
    _write_split("train", num_train, out_dir, **common)
    _write_split("val", num_val, out_dir, **common)
    (out_dir / MANIFEST).write_text(json.dumps(params, indent=2))
    return paths


def _check_arguments(num_train: int, num_val: int, image_size: int, min_objects: int, max_objects: int,
                     object_size: Optional[tuple[float, float]], empty_fraction: float, image_format: str) -> None:
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if num_train < 0 or num_val < 0 or image_size < 16 or not 0 <= empty_fraction <= 1:
        raise ValueError("need num_train, num_val >= 0, image_size >= 16 and 0 <= empty_fraction <= 1")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if object_size is not None:
        if len(object_size) != 2 or not MIN_OBJECT_SIZE <= object_size[0] <= object_size[1] <= image_size:
            raise ValueError(f"object_size must be (smallest, largest) pixels with {MIN_OBJECT_SIZE} <= smallest "
                             f"<= largest <= image_size ({image_size}), got {tuple(object_size)}")
