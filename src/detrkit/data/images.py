"""Image files: opening them (EXIF orientation, colour modes) and checking them.

Nothing here knows about annotation formats: a caller says which file listed an image
(``listed_in``) so that errors can name it, and which size it expects.
"""
from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

from PIL import Image, ImageOps
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from detrkit.errors import DataError

PathLike = Union[str, "os.PathLike[str]"]
# An image given to inference: a file, a decoded PIL image, or a uint8 (3, H, W) tensor.
ImageInput = Union[str, Path, Image.Image, Tensor]

# The file name endings taken for images when a folder is searched.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# EXIF orientations 5..8 rotate by 90 degrees, so the displayed image has width and height swapped.
_EXIF_ORIENTATION_TAG = 0x0112
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)


def exif_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as displayed, i.e. after the EXIF orientation; reads the header only."""
    w, h = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # broken EXIF: open_rgb ignores it too
        orientation = 1
    return (h, w) if orientation in _ROTATING_ORIENTATIONS else (w, h)


def open_rgb(path: PathLike, listed_in: Optional[PathLike] = None) -> Image.Image:
    """Decode an image fully, apply its EXIF orientation, return it as RGB.

    Grayscale, palette, CMYK and alpha images become RGB (alpha is dropped). Any failure to
    read or decode (missing, empty, truncated, not an image) raises DataError naming ``path``
    (and ``listed_in``, the annotation file that lists it, when given).
    """
    where = f" (listed in {listed_in})" if listed_in else ""
    try:
        with Image.open(path) as raw:
            raw.load()
            try:
                im = ImageOps.exif_transpose(raw)  # a new image, so closing the file leaves it intact
            except Exception:  # a corrupt EXIF block should not make a decodable image unusable
                im = raw.copy()
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
        return im if im.mode == "RGB" else im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found{where}; fix: add the file or remove its record") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        fix = "re-export it or remove its record" if listed_in else "re-export it"
        why = "empty file: 0 bytes" if _is_empty(path) else f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: cannot read the image{where} ({why}); fix: {fix}") from None


def _is_empty(path) -> bool:
    try:
        return os.path.getsize(path) == 0
    except (OSError, TypeError):  # an in-memory file (BytesIO) has no size on disk
        return False


def image_tensor(image: ImageInput) -> Tensor:
    """A file path (opened with :func:`open_rgb`), PIL image or uint8 ``(3, H, W)`` tensor -> the
    uint8 ``(3, H, W)`` RGB tensor (a tensor is returned as it is)."""
    if isinstance(image, (str, Path)):
        image = open_rgb(image)
    if isinstance(image, Image.Image):
        image = F.pil_to_tensor(image.convert("RGB"))
    return image


def image_files(patterns: Sequence[str]) -> list[Path]:
    """The image files named by ``patterns``: files, folders (searched recursively for
    :data:`IMAGE_EXTENSIONS`) and glob patterns, in order. Raises DataError for a name that
    matches nothing, or when no image is found at all."""
    files: list[Path] = []
    for pattern in patterns:
        for m in [Path(m) for m in sorted(glob.glob(pattern))] or [Path(pattern)]:
            if m.is_dir():
                files += sorted(f for f in m.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            elif m.exists():
                files.append(m)
            else:
                raise DataError(f"{m}: no such file, folder or matching pattern")
    if not files:
        raise DataError(f"no images found in {' '.join(patterns)}")
    return files


def check_image(path: PathLike, size: tuple[int, int], listed_in: Optional[PathLike] = None) -> Optional[str]:
    """Why the image file ``path`` cannot be used as an image of ``size`` = ``(h, w)`` (as
    displayed, after EXIF rotation), or None when it can: it does not decode, or its size differs."""
    try:
        im = open_rgb(path, listed_in)
    except DataError as e:
        return str(e)
    h, w = size
    if (im.height, im.width) != (h, w):
        fix = "fix: correct width/height in the JSON"
        with Image.open(path) as raw:
            if raw.size == (w, h):
                fix = "the JSON has the size before EXIF rotation; fix: strip the EXIF orientation or re-annotate"
        return f"{path} is {im.width}x{im.height} but the JSON says {w}x{h}; {fix}"
    return None


def check_images(files: Sequence[tuple[Path, tuple[int, int]]], listed_in: Optional[PathLike] = None) -> list:
    """:func:`check_image` of every ``(path, (h, w))``, in order: None or the problem of each."""
    # Decoding releases the GIL, so threads scale with cores without copying the records.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda f: check_image(f[0], f[1], listed_in), files, chunksize=16))
