"""Find the train/val annotation files and image folders of a data folder in a common layout.

:func:`find_layout` recognises, in this order:

- **COCO**: ``annotations/instances_<train>.json`` and ``annotations/instances_<val>.json`` with the
  images in ``<train>/`` and ``<val>/`` (or ``images/<train>/``), where ``<train>`` is the name's
  suffix: ``instances_train2017.json`` -> ``train2017/``;
- **Roboflow COCO export**: ``train/`` and ``valid/`` (or ``val/``), each holding
  ``_annotations.coco.json`` and its images;
- **YOLO**: ``data.yaml`` with ``names`` and ``train`` / ``val`` image folders (Ultralytics rules:
  relative to ``path`` or the YAML's folder; labels in the sibling ``labels`` folder, one
  ``class cx cy w h`` line per box, normalised). It is converted once to COCO files in
  ``<data_dir>/.detrkit/`` (category id = YOLO class index); the conversion is redone when a
  label, image or ``data.yaml`` changes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from PIL import Image

from detrkit.data.images import IMAGE_EXTENSIONS, exif_size
from detrkit.errors import DataError

CACHE_DIR = ".detrkit"  # inside the data folder: converted annotation files
ROBOFLOW_JSON = "_annotations.coco.json"
_LAYOUTS_LOOKED_FOR = (
    "COCO (annotations/instances_train*.json + annotations/instances_val*.json, images in train*/ and val*/ "
    "or images/train*/ and images/val*/); "
    "Roboflow COCO export (train/ and valid/, each with _annotations.coco.json and the images); "
    "YOLO (data.yaml with names, train and val; images/ and labels/ folders)"
)


def find_layout(data_dir: Union[str, Path]) -> dict[str, Path]:
    """Paths ``{"train_json", "train_images", "val_json", "val_images"}`` of a data folder.

    Raises DataError when the folder is missing, matches no known layout (naming the
    layouts looked for), or matches one ambiguously (e.g. two COCO train files).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    for finder in (_coco_layout, _roboflow_layout, _yolo_layout):
        found = finder(data_dir)
        if found is not None:
            return found
    raise DataError(
        f"{data_dir}: no known data layout found. Looked for: {_LAYOUTS_LOOKED_FOR}. "
        "Or pass --train-json, --train-images, --val-json, --val-images explicitly."
    )


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------
def _coco_split(data_dir: Path, prefix: str) -> Optional[tuple[Path, Path]]:
    """The ``(json, image folder)`` pair for ``instances_<prefix>*.json``, or None."""
    ann_dir = data_dir / "annotations"
    pairs = []
    for js in sorted(ann_dir.glob(f"instances_{prefix}*.json")):
        split = js.stem[len("instances_"):]  # instances_train2017 -> train2017
        for folder in (data_dir / split, data_dir / "images" / split):
            if folder.is_dir():
                pairs.append((js, folder))
                break
    if len(pairs) > 1:
        names = ", ".join(p[0].name for p in pairs)
        raise DataError(
            f"{ann_dir}: several {prefix} annotation files with image folders ({names}); "
            f"fix: pass --{prefix}-json and --{prefix}-images explicitly"
        )
    return pairs[0] if pairs else None


def _coco_layout(data_dir: Path) -> Optional[dict[str, Path]]:
    if not (data_dir / "annotations").is_dir():
        return None
    train, val = _coco_split(data_dir, "train"), _coco_split(data_dir, "val")
    if train is None and val is None:
        return None
    if train is None or val is None:
        missing = "train" if train is None else "val"
        raise DataError(
            f"{data_dir}: COCO layout without a {missing} split: expected annotations/instances_{missing}*.json "
            f"and a matching {missing}*/ image folder"
        )
    return {"train_json": train[0], "train_images": train[1], "val_json": val[0], "val_images": val[1]}


# ---------------------------------------------------------------------------------------------
# Roboflow COCO export
# ---------------------------------------------------------------------------------------------
def _roboflow_layout(data_dir: Path) -> Optional[dict[str, Path]]:
    train = data_dir / "train" / ROBOFLOW_JSON
    vals = [data_dir / name / ROBOFLOW_JSON for name in ("valid", "val")]
    val = next((v for v in vals if v.is_file()), None)
    if not train.is_file() and val is None:
        return None
    if not train.is_file() or val is None:
        raise DataError(
            f"{data_dir}: Roboflow COCO export needs both train/{ROBOFLOW_JSON} and valid/{ROBOFLOW_JSON}; "
            "fix: export a validation split too"
        )
    return {"train_json": train, "train_images": train.parent, "val_json": val, "val_images": val.parent}


# ---------------------------------------------------------------------------------------------
# YOLO
# ---------------------------------------------------------------------------------------------
def _yolo_layout(data_dir: Path) -> Optional[dict[str, Path]]:
    yaml_path = next((data_dir / n for n in ("data.yaml", "data.yml") if (data_dir / n).is_file()), None)
    if yaml_path is None:
        return None
    try:
        spec = yaml.safe_load(yaml_path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{yaml_path}: cannot read the YAML ({e})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{yaml_path}: expected a mapping with names, train and val")
    names = _yolo_names(spec, yaml_path)
    root = yaml_path.parent
    if isinstance(spec.get("path"), str):
        given = Path(spec["path"]) if Path(spec["path"]).is_absolute() else yaml_path.parent / spec["path"]
        # Exports often keep the exporting machine's absolute `path`; then the YAML's folder is the root.
        if given.is_dir():
            root = given
    out: dict[str, Path] = {}
    for split in ("train", "val"):
        if split not in spec:
            raise DataError(f"{yaml_path}: no '{split}' entry; fix: add the {split} image folder")
        images = _yolo_images(spec[split], root, yaml_path, split)
        json_path = data_dir / CACHE_DIR / f"instances_{split}.json"
        image_root = Path(os.path.commonpath([p.parent for p in images])) if images else root
        _convert_yolo_split(images, names, image_root, json_path, yaml_path, split)
        out[f"{split}_json"], out[f"{split}_images"] = json_path, image_root
    return out


def _yolo_names(spec: dict, yaml_path: Path) -> list[str]:
    """Class names in class-index order (``names`` as a list or as ``{index: name}``)."""
    names = spec.get("names")
    if isinstance(names, dict):
        try:
            idx = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            idx = None
        if idx is None or idx != list(range(len(idx))):
            raise DataError(f"{yaml_path}: 'names' keys must be the class indices 0..K-1")
        names = [names[k] if k in names else names[str(k)] for k in idx]
    if not isinstance(names, list) or not names:
        raise DataError(f"{yaml_path}: 'names' must list the class names (a list or {{index: name}})")
    return [str(n) for n in names]


def _resolve(entry: str, root: Path) -> Path:
    path = Path(entry)
    if path.is_absolute():
        return path
    candidate = root / path
    # Roboflow writes "../train/images" next to a data.yaml that sits beside train/; Ultralytics
    # falls back to dropping the leading "../" and so do we.
    if not candidate.exists() and entry.startswith("../"):
        candidate = root / entry[3:]
    return candidate


def _yolo_images(entry: Any, root: Path, yaml_path: Path, split: str) -> list[Path]:
    """Image files of a split: a folder, a .txt list of images, or a list of either."""
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for e in entries:
        if not isinstance(e, str):
            raise DataError(f"{yaml_path}: '{split}' is {e!r}; expected a folder or a .txt list of images")
        path = _resolve(e, root)
        if path.is_dir():
            images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.is_file() and path.suffix == ".txt":
            for line in path.read_text().splitlines():
                if line.strip():
                    images.append(_resolve(line.strip(), path.parent))
        else:
            raise DataError(f"{yaml_path}: the {split} images {path} do not exist; fix: correct '{split}'")
    return images


def _label_path(image: Path) -> Path:
    """Ultralytics rule: the last ``images`` folder in the path becomes ``labels``; extension ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _fingerprint(images: list[Path], names: list[str], yaml_path: Path) -> str:
    """Changes when any image, label file, the class names or the YAML changes (size and mtime)."""
    h = hashlib.sha256(json.dumps(names).encode())
    for p in [yaml_path, *images, *(_label_path(i) for i in images)]:
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def _convert_yolo_split(
    images: list[Path], names: list[str], image_root: Path, json_path: Path, yaml_path: Path, split: str
) -> None:
    """Write the COCO file of one YOLO split, unless an up-to-date one is already there."""
    stamp = _fingerprint(images, names, yaml_path)
    try:
        if json.loads(json_path.read_text())["info"]["detrkit_yolo_fingerprint"] == stamp:
            return
    except (OSError, ValueError, KeyError, TypeError):
        pass
    coco_images, annotations, problems = [], [], []
    for image_id, path in enumerate(images, start=1):
        try:
            with Image.open(path) as im:
                w, h = exif_size(im)  # labels are normalised by the displayed (EXIF-rotated) size
        except Exception as e:  # PIL raises many types for a bad file
            problems.append(f"{path}: cannot read the image ({e}); fix: remove or re-export it")
            continue
        coco_images.append({
            "id": image_id, "file_name": path.relative_to(image_root).as_posix(), "width": w, "height": h,
        })
        label = _label_path(path)
        if not label.is_file():
            continue  # YOLO's convention: no label file = no objects
        for n, line in enumerate(label.read_text().splitlines(), start=1):
            box = _parse_yolo_line(line, len(names))
            if isinstance(box, str):
                problems.append(f"{label}:{n}: {box}")
                continue
            if box is None:
                continue
            cls, cx, cy, bw, bh = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                "bbox": [(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h], "area": bw * w * bh * h,
                "iscrowd": 0,
            })
    if problems:
        raise DataError(
            f"{yaml_path}: {len(problems)} problem(s) in the YOLO {split} split:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    coco = {
        "info": {"description": f"converted by detrkit from {yaml_path}", "detrkit_yolo_fingerprint": stamp},
        "images": coco_images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in enumerate(names)],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(coco))
    tmp.replace(json_path)  # atomic: a reader never sees half a file


def _parse_yolo_line(line: str, num_classes: int):
    """``(class, cx, cy, w, h)`` of a label line, None for a blank line, or the problem as text.

    A polygon line (``class x1 y1 x2 y2 ...``, YOLO segmentation) gives its bounding box.
    """
    fields = line.split()
    if not fields:
        return None
    try:
        cls = int(fields[0])
        values = [float(v) for v in fields[1:]]
    except ValueError:
        return f"{line.strip()!r} is not 'class cx cy w h' numbers"
    if not 0 <= cls < num_classes:
        return f"class {cls} is not in data.yaml names (0..{num_classes - 1})"
    if len(values) == 4:
        cx, cy, w, h = values
    elif len(values) >= 6 and len(values) % 2 == 0:
        xs, ys = values[0::2], values[1::2]
        cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
    else:
        return f"expected 'class cx cy w h' (5 numbers), got {len(fields)}"
    if not all(map(math.isfinite, (cx, cy, w, h))):
        return "a coordinate is NaN or infinite"
    return cls, cx, cy, w, h
