"""COCO-format detection data: a validating loader with a report, and the torch Dataset.

:func:`load_coco` reads an annotation file once, repairs what it safely can (clamps boxes
to their image, drops empty or off-image boxes, counting each), and collects everything it
cannot fix into one :class:`~detrkit.errors.DataError` that lists every problem with its
record id and the fix. With ``strict=False`` it returns the :class:`CocoReport` with the
problems instead (what ``detrkit check-data`` prints).

:class:`CocoDetection` serves ``(image, target)`` pairs in the model's target contract
(DESIGN.md, "Targets"): contiguous class indices and normalised ``(cx, cy, w, h)`` boxes.
Dataset category ids are kept in ``dataset.categories`` (index ``i`` <-> ``categories[i]["id"]``).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detrkit.data.images import PathLike, check_images, open_rgb
from detrkit.data.transforms import finish_targets
from detrkit.errors import DataError
from detrkit.files import read_json

REQUIRED_KEYS = ("images", "annotations", "categories")
# A box edge moved by less than this (pixels) is float noise at the image border, not a repair
# worth counting (COCO has many boxes whose x + w exceeds the width by ~1e-6).
CLAMP_REPORT_TOLERANCE = 0.01
# How many unfixable problems the DataError message prints; the report keeps them all.
MAX_PROBLEMS_IN_MESSAGE = 100
# How many annotation ids of each kind of repair the summary names (the counts are complete).
MAX_REPAIR_IDS = 5
_INT64_MAX = 2**63 - 1


@dataclass
class CocoReport:
    """What :func:`load_coco` found in one annotation file.

    ``annotations`` counts every record in the file; ``boxes`` the training boxes kept
    (not crowd, not dropped). ``empty_images`` are images left with no training box
    (crowd-only images included). ``problems`` are the unfixable ones, one line each.
    """

    json_path: Path
    images: int = 0
    annotations: int = 0
    boxes: int = 0
    boxes_per_category: dict[int, int] = field(default_factory=dict)  # category id -> kept boxes
    category_names: dict[int, str] = field(default_factory=dict)  # category id -> name
    empty_images: int = 0
    crowd: int = 0
    clamped: int = 0
    dropped_degenerate: int = 0
    dropped_outside: int = 0
    # The first MAX_REPAIR_IDS annotation ids of each repair: "clamped", "degenerate", "outside".
    repair_ids: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def _repaired(self, kind: str, annotation_id: int) -> None:
        ids = self.repair_ids.setdefault(kind, [])
        if len(ids) < MAX_REPAIR_IDS:
            ids.append(annotation_id)

    def _ids(self, kind: str, count: int) -> str:
        ids = self.repair_ids.get(kind, [])
        if not ids:
            return ""
        more = ", ..." if count > len(ids) else ""
        return f" (annotation id{'s' if count > 1 else ''} {', '.join(map(str, ids))}{more})"

    def summary(self) -> str:
        """A few human-readable lines: counts, repairs and the problems."""
        lines = [
            f"{self.json_path}: {self.images} images ({self.empty_images} without boxes), "
            f"{self.annotations} annotations -> {self.boxes} training boxes, {self.crowd} crowd",
        ]
        per_cat = ", ".join(
            f"{self.category_names.get(cid, '?')} (id {cid}): {n}" for cid, n in self.boxes_per_category.items()
        )
        lines.append(f"  boxes per category: {per_cat or 'none'}")
        lines.append(
            f"  repaired: {self.clamped} boxes clamped to their image{self._ids('clamped', self.clamped)}; "
            f"dropped: {self.dropped_degenerate} with zero or negative size"
            f"{self._ids('degenerate', self.dropped_degenerate)}, {self.dropped_outside} outside their image"
            f"{self._ids('outside', self.dropped_outside)}"
        )
        if self.problems:
            lines.append(f"  {len(self.problems)} problems to fix:")
            lines.extend(f"    - {p}" for p in self.problems)
        else:
            lines.append("  no problems")
        return "\n".join(lines)


@dataclass
class CocoData:
    """A validated annotation file, stored compactly (a few arrays, no per-record dicts).

    Image ``k`` has id ``image_ids[k]``, file ``image_root / file_names[k]``, size
    ``sizes[k] = (h, w)`` and the training boxes ``boxes[offsets[k]:offsets[k + 1]]``
    (float32 absolute ``(x0, y0, x1, y1)``, clamped to the image) with contiguous class
    indices ``labels[...]`` (int64). Crowd boxes are not stored.
    """

    json_path: Path
    image_root: Path
    categories: list[dict]  # [{"id": int, "name": str}], index order
    image_ids: np.ndarray  # int64 (I,)
    file_names: list[str]
    sizes: np.ndarray  # int64 (I, 2): h, w as written in the JSON
    boxes: np.ndarray  # float32 (N, 4)
    labels: np.ndarray  # int64 (N,)
    offsets: np.ndarray  # int64 (I + 1,)
    report: CocoReport

    @property
    def cat_id_to_index(self) -> dict[int, int]:
        return {c["id"]: i for i, c in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.file_names)

    def image_path(self, k: int) -> Path:
        return self.image_root / self.file_names[k]

    def targets(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(T, 4)`` xyxy absolute and labels ``(T,)`` of image ``k``."""
        lo, hi = self.offsets[k], self.offsets[k + 1]
        return self.boxes[lo:hi], self.labels[lo:hi]


# ---------------------------------------------------------------------------------------------
# Small validators. Each returns None when the value is fine, else the text of the problem.
# ---------------------------------------------------------------------------------------------
def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    # JSON true/false are Python bools, which are ints; an id of `true` is a mistake.
    return isinstance(value, int) and not isinstance(value, bool) and -_INT64_MAX - 1 <= value <= _INT64_MAX


def _finite_number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:  # a huge JSON integer
        return None
    return x if math.isfinite(x) else None


def unsafe_file_name(name: Any) -> Optional[str]:
    """Why ``name`` cannot be a ``file_name`` relative to the image root, or None if it can.

    Lexical only: sub-folders are fine, ``..`` components and absolute paths (POSIX, Windows
    drive or UNC) are refused so an annotation file cannot read outside its image root.
    A symlink inside the root is the user's own choice and is followed.
    """
    if not isinstance(name, str) or not name.strip():
        return f"file_name {_short(name)} is not a non-empty string"
    if "\x00" in name:
        return "file_name contains a NUL character"
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        return f"file_name {name!r} is an absolute path; it must be relative to the image root"
    if ".." in posix.split("/"):
        return f"file_name {name!r} leaves the image root with '..'"
    return None


def normalize_categories(categories: Sequence[Any], where: str) -> list[dict]:
    """Check a user-given category list (``[{"id": int, "name": str}]``) and copy it.

    Raises DataError naming ``where`` (e.g. the checkpoint) on missing fields or duplicate ids.
    """
    out, seen = [], set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise DataError(f"{where}: category {i} is {_short(c)}; expected {{'id': int, 'name': str}}")
        if c["id"] in seen:
            raise DataError(f"{where}: category id {c['id']} appears twice; each class needs its own id")
        seen.add(c["id"])
        out.append({"id": c["id"], "name": c["name"]})
    if not out:
        raise DataError(f"{where}: the category list is empty")
    return out


def _categories_from_json(raw: list, json_path: Path, problems: list[str]) -> list[dict]:
    cats: dict[int, dict] = {}
    for k, c in enumerate(raw):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            problems.append(
                f"{json_path}: categories[{k}] = {_short(c)} has no integer 'id'; "
                "fix: give every category an integer id"
            )
            continue
        name = c.get("name")
        if not isinstance(name, str) or not name:
            problems.append(f"{json_path}: category id {c['id']}: 'name' is {_short(name)}; fix: give it a text name")
            continue
        if c["id"] in cats:
            problems.append(
                f"{json_path}: category id {c['id']} appears more than once; fix: give each category its own id"
            )
            continue
        cats[c["id"]] = {"id": c["id"], "name": name}
    if not raw:
        problems.append(f"{json_path}: 'categories' is empty; fix: list the classes as {{'id': int, 'name': str}}")
    return [cats[i] for i in sorted(cats)]


def _parse_images(raw: list, json_path: Path, problems: list[str]):
    """Valid image records as (id, file_name, h, w), and every image id written in the file."""
    valid: dict[int, tuple[str, int, int]] = {}
    all_ids: Counter = Counter()
    for k, im in enumerate(raw):
        if not isinstance(im, dict) or not _is_int(im.get("id")):
            problems.append(f"{json_path}: images[{k}] has no integer 'id'; fix: give every image an integer id")
            continue
        iid = im["id"]
        all_ids[iid] += 1
        if all_ids[iid] == 2:  # report a duplicated id once, however often it repeats
            problems.append(f"{json_path}: image id {iid} appears more than once; fix: give each image its own id")
        errs = []
        why = unsafe_file_name(im.get("file_name"))
        if why:
            errs.append(why)
        w, h = im.get("width"), im.get("height")
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            errs.append(f"width/height are {_short(w)}/{_short(h)}, expected positive integers (pixels)")
        for e in errs:
            problems.append(f"{json_path}: image id {iid}: {e}; fix: correct the image record")
        if not errs and all_ids[iid] == 1:
            valid[iid] = (im["file_name"], h, w)
    for iid, n in all_ids.items():
        if n > 1:
            valid.pop(iid, None)
    return valid, all_ids


def _check_bbox(bbox: Any) -> Union[tuple[float, float, float, float], str]:
    if not isinstance(bbox, (list, tuple)):
        return f"bbox is {_short(bbox)}, expected [x, y, width, height]"
    if len(bbox) != 4:
        return f"bbox {_short(bbox)} has {len(bbox)} numbers, expected 4: [x, y, width, height]"
    nums = [_finite_number(v) for v in bbox]
    if any(v is None for v in nums):
        return f"bbox {_short(bbox)} holds a value that is not a finite number (NaN, inf or text)"
    return tuple(nums)  # type: ignore[return-value]


def load_coco(json_path: PathLike, image_root: PathLike, *, categories: Optional[Sequence[dict]] = None,
              check_images: bool = False, strict: bool = True) -> CocoData:
    """Read and validate a COCO detection file.

    ``categories`` (``[{"id", "name"}]`` in index order) fixes the class mapping, e.g. to a
    checkpoint's; by default it is the file's own categories sorted by id. Repairs (counted
    in the report): boxes with zero or negative width/height and boxes entirely outside
    their image are dropped, boxes partly outside are clamped. Problems it cannot repair:
    malformed records, bbox not 4 finite numbers, unknown ``category_id`` or ``image_id``,
    duplicate image or annotation ids, ``file_name`` outside ``image_root``; with
    ``check_images`` also missing or unreadable image files and files whose size differs
    from the record's width/height. ``strict`` raises one DataError listing all of them;
    otherwise the records concerned are left out and the problems stay in ``report.problems``.
    Invalid JSON or a missing top-level key always raises.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    raw = read_json(json_path, DataError, "COCO annotation file")
    if not isinstance(raw, dict):
        raise DataError(f"{json_path}: expected a COCO object with {', '.join(REQUIRED_KEYS)}, got a {type(raw).__name__}")
    missing = [k for k in REQUIRED_KEYS if not isinstance(raw.get(k), list)]
    if missing:
        raise DataError(f"{json_path}: missing or not a list: {', '.join(missing)}; a COCO detection file needs "
                        f"'images', 'annotations' and 'categories' lists")
    problems: list[str] = []
    if not image_root.is_dir():
        problems.append(f"{json_path}: the image folder {image_root} does not exist; fix: pass the folder holding "
                        f"the images")
    if categories is None:
        cats = _categories_from_json(raw["categories"], json_path, problems)
    else:
        cats = normalize_categories(categories, "the given categories")
    images, all_image_ids = _parse_images(raw["images"], json_path, problems)
    report = CocoReport(json_path=json_path, images=len(raw["images"]), annotations=len(raw["annotations"]))
    report.category_names = {c["id"]: c["name"] for c in cats}
    per_image = _parse_annotations(raw["annotations"], json_path, images, all_image_ids,
                                   {c["id"]: i for i, c in enumerate(cats)}, report, problems)
    if check_images and image_root.is_dir():  # a missing root is one problem, not one per image
        problems.extend(_check_image_files(images, image_root, json_path))
    report.problems = problems
    if problems and strict:
        shown = problems[:MAX_PROBLEMS_IN_MESSAGE]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more (`detrkit check-data` lists them all)" if more else ""
        raise DataError(f"{json_path}: {len(problems)} problem(s) to fix before this data can be used:\n"
                        + "\n".join(f"  - {p}" for p in shown) + tail)
    return _pack(json_path, image_root, cats, images, per_image, report)


def _parse_annotations(raw: list, json_path: Path, images: dict, all_image_ids: Counter, cat_index: dict[int, int],
                       report: CocoReport, problems: list[str]) -> dict[int, list]:
    """The training boxes of each valid image, ``{image id: [(x0, y0, x1, y1, class index)]}``, clamped
    to the image; repairs are counted in ``report``, unfixable records added to ``problems``."""
    per_image: dict[int, list[tuple[float, float, float, float, int]]] = {iid: [] for iid in images}
    ann_ids: Counter = Counter()
    for k, ann in enumerate(raw):
        if not isinstance(ann, dict):
            problems.append(f"{json_path}: annotations[{k}] is {_short(ann)}, expected an object; fix: remove it")
            continue
        aid, iid, cid, crowd = ann.get("id"), ann.get("image_id"), ann.get("category_id"), ann.get("iscrowd", 0)
        name = f"annotation id {aid}" if _is_int(aid) else f"annotations[{k}]"
        errs = []
        if not _is_int(aid):
            errs.append(f"'id' is {_short(aid)}, expected an integer; fix: number the annotations")
        else:
            ann_ids[aid] += 1
            if ann_ids[aid] == 2:
                errs.append("the id appears more than once; fix: give each annotation its own id")
        if not _is_int(iid) or iid not in all_image_ids:
            errs.append(f"image_id {_short(iid)} is not in 'images'; fix: add the image or remove the annotation")
        if not _is_int(cid) or cid not in cat_index:
            known = ", ".join(str(c) for c in list(cat_index)[:20])
            errs.append(f"category_id {_short(cid)} is not a known category (ids: {known}); "
                        "fix: correct the id or add the category")
        if crowd not in (0, 1, None):  # True/False compare equal to 1/0
            errs.append(f"iscrowd is {_short(crowd)}, expected 0 or 1")
        box = _check_bbox(ann.get("bbox"))
        if isinstance(box, str):
            errs.append(box + "; fix: write 4 finite numbers or remove the annotation")
        if errs:
            problems.extend(f"{json_path}: {name}: {e}" for e in errs)
        elif iid in images:  # else the image record itself is broken (already reported)
            if crowd:
                report.crowd += 1  # kept in the JSON for evaluation, never a training target
                continue
            xyxy = _repaired_box(box, images[iid][1:], aid, report)
            if xyxy is not None:
                per_image[iid].append((*xyxy, cat_index[cid]))
    return per_image


def _repaired_box(box: tuple[float, float, float, float], size: tuple[int, int], aid: int,
                  report: CocoReport) -> Optional[tuple[float, float, float, float]]:
    """COCO ``[x, y, w, h]`` -> ``(x0, y0, x1, y1)`` clamped to the image of ``size`` ``(h, w)``, or None
    when nothing of it is left; each repair is counted in ``report``."""
    x, y, bw, bh = box
    if bw <= 0 or bh <= 0:
        report.dropped_degenerate += 1
        report._repaired("degenerate", aid)
        return None
    h, w = size
    x0, y0, x1, y1 = min(max(x, 0.0), w), min(max(y, 0.0), h), min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
    if x1 <= x0 or y1 <= y0:
        report.dropped_outside += 1
        report._repaired("outside", aid)
        return None
    if max(abs(x0 - x), abs(y0 - y), abs(x1 - x - bw), abs(y1 - y - bh)) > CLAMP_REPORT_TOLERANCE:
        report.clamped += 1
        report._repaired("clamped", aid)
    return x0, y0, x1, y1


def _pack(json_path, image_root, cats, images, per_image, report) -> CocoData:
    ids = list(images)
    counts = [len(per_image[i]) for i in ids]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = [b for i in ids for b in per_image[i]]
    arr = np.asarray(flat, dtype=np.float64).reshape(-1, 5)
    labels = arr[:, 4].astype(np.int64)
    report.boxes = len(flat)
    report.empty_images = sum(1 for n in counts if n == 0)
    per_cat = np.bincount(labels, minlength=len(cats))
    report.boxes_per_category = {c["id"]: int(n) for c, n in zip(cats, per_cat)}
    return CocoData(
        json_path=json_path, image_root=image_root, categories=cats, image_ids=np.asarray(ids, dtype=np.int64),
        file_names=[images[i][0] for i in ids],
        sizes=np.asarray([images[i][1:] for i in ids], dtype=np.int64).reshape(-1, 2),
        boxes=arr[:, :4].astype(np.float32), labels=labels, offsets=offsets, report=report,
    )


def _check_image_files(images: dict, image_root: Path, json_path: Path) -> list[str]:
    """The problems of the image files of ``images`` (``{id: (file_name, h, w)}``), each naming its image id."""
    ids = list(images)
    found = check_images([(image_root / images[i][0], images[i][1:]) for i in ids], json_path)
    return [f"{json_path}: image id {iid}: {problem}" for iid, problem in zip(ids, found) if problem]


# ---------------------------------------------------------------------------------------------
# The Dataset
# ---------------------------------------------------------------------------------------------
Transform = Callable[[Any, dict], tuple[Any, dict]]


class CocoDetection(Dataset):
    """A COCO-format detection data set for training and evaluation.

    ``json_path``: COCO annotation file; ``image_root``: the folder ``file_name`` is relative
    to (sub-folders allowed). ``categories``: the class mapping ``[{"id", "name"}]`` in index
    order, default the file's categories sorted by id. ``check_images``: open every image once
    now, so missing or broken files stop before training instead of in the middle of it.
    ``transforms(image, target)`` receives :meth:`load_item`'s pair (EXIF-rotated RGB), e.g. a
    preset from :mod:`detrkit.data.transforms`.

    ``dataset[i]`` returns ``(image, target)``: the image as the transforms leave it (uint8
    without transforms) and ``target`` with

    - ``boxes``: float32 ``[T, 4]`` ``(cx, cy, w, h)`` normalised by the final image size,
    - ``labels``: int64 ``[T]``, contiguous indices 0..K-1 into ``categories``,
    - ``image_id``: int, the COCO image id,
    - ``orig_size``: int64 ``[2]``, ``(h, w)`` of the (EXIF-rotated) file (of the canvas for a mosaic),
    - ``size``: int64 ``[2]``, ``(h, w)`` after the transforms.

    Crowd annotations are not targets (evaluation reads them from ``json_path``); images
    without boxes are kept (``T = 0``). If ``transforms`` leaves the boxes as
    ``BoundingBoxes`` (or is None), the dataset clamps, sanitises and normalises them itself.
    """

    def __init__(self, json_path: PathLike, image_root: PathLike, transforms: Optional[Transform] = None,
                 categories: Optional[Sequence[dict]] = None, check_images: bool = False) -> None:
        self.data = load_coco(json_path, image_root, categories=categories, check_images=check_images)
        self.transforms = transforms
        self._finish = finish_targets()

    @property
    def json_path(self) -> Path:
        """The annotation file as given: the evaluator's ground truth (crowd boxes included)."""
        return self.data.json_path

    @property
    def coco_json(self) -> Path:
        """Same as :attr:`json_path`: the file pycocotools / faster-coco-eval can load."""
        return self.data.json_path

    @property
    def image_root(self) -> Path:
        return self.data.image_root

    @property
    def categories(self) -> list[dict]:
        """``[{"id": int, "name": str}]``: index ``i`` is category ``categories[i]["id"]``."""
        return self.data.categories

    @property
    def cat_id_to_index(self) -> dict[int, int]:
        return self.data.cat_id_to_index

    @property
    def report(self) -> CocoReport:
        return self.data.report

    @property
    def image_ids(self) -> list[int]:
        return self.data.image_ids.tolist()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, k: int) -> tuple[Any, dict]:
        return self.prepare(*self.load_item(k), k, self.transforms)

    def load_item(self, k: int) -> tuple[tv_tensors.Image, dict]:
        """Image ``k`` before any transform: uint8 ``tv_tensors.Image`` ``3 x H x W``, ``{"boxes":
        BoundingBoxes (xyxy pixels, canvas (H, W)), "labels": int64 [T]}``."""
        path = self.data.image_path(k)
        pil = open_rgb(path, self.json_path)
        h, w = (int(v) for v in self.data.sizes[k])
        if (pil.height, pil.width) != (h, w):
            # The boxes were checked against the JSON size; silently using another would move them.
            raise DataError(f"{path}: image is {pil.width}x{pil.height} but {self.json_path} says {w}x{h} (image id "
                            f"{int(self.data.image_ids[k])}); fix: correct width/height (detrkit check-data lists all)")
        boxes, labels = self.data.targets(k)
        return tv_tensors.Image(F.pil_to_tensor(pil)), {  # uint8 (3, H, W)
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes), format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor(labels)}

    def prepare(self, image: tv_tensors.Image, target: dict, k: int, transforms: Optional[Transform]) -> tuple[Any, dict]:
        """:meth:`load_item`'s pair (or one composed of several, a mosaic) -> sample ``k``: ``transforms``
        applied, boxes normalised, ``image_id`` of image ``k``, ``orig_size`` that of ``image`` as given."""
        orig_size = torch.tensor(tuple(image.shape[-2:]), dtype=torch.int64)
        if transforms is not None:
            image, target = transforms(image, target)
        if isinstance(target["boxes"], tv_tensors.BoundingBoxes):
            image, target = self._finish(image, target)
        size = torch.tensor(tuple(image.shape[-2:]), dtype=torch.int64)
        return image, {**target, "image_id": int(self.data.image_ids[k]), "orig_size": orig_size, "size": size}
