"""A trained detector behind one adapter, whichever file holds it; ``detrkit predict`` over files.

:class:`Detector` is the one place that chooses between a checkpoint (:func:`detrkit.load_model`:
detrkit, official DETR or Hugging Face) and an exported ``.onnx`` file (onnxruntime). The server
(:mod:`detrkit.serve`) and ``detrkit predict`` (:func:`predict_files`) both use it, and both
kinds of model predict through :func:`detrkit.predict.predict_images`, so a checkpoint and its
export give the same detections (to float precision) everywhere.

:func:`predict_files` treats a bad file as the server treats a bad upload: a file that does not
read as an image (not an image, empty, truncated, ...) is skipped with one line naming it and
why, and everything else is still written.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from torch import Tensor

from detrkit.checkpoint import load_model
from detrkit.config import ModelConfig, config_from_dict
from detrkit.presets import PRESETS, preset
from detrkit.data.images import image_tensor
from detrkit.distributed import select_device
from detrkit.errors import DataError, DetrkitError
from detrkit.export import OnnxDetector
from detrkit.files import atomic_write_text
from detrkit.predict import detection_records
from detrkit.visualize import draw_detections, save_image


class Detector:
    """A checkpoint through :func:`load_model`, or an exported ``.onnx`` file through
    :class:`detrkit.export.OnnxDetector`; both ``predict`` methods are
    :func:`detrkit.predict.predict_images`.

    :meth:`predict` takes image files, RGB PIL images or uint8 ``(3, H, W)`` tensors and returns,
    per image, the detections scoring above ``threshold``: ``boxes (N, 4)`` absolute xyxy,
    ``scores (N,)``, ``labels (N,)`` category ids, ``names``. :meth:`detect` is the server's
    call: every candidate (threshold 0), one batch; the server filters each answer by the
    request's own threshold.
    """

    def __init__(self, weights, *, device: str = "auto", precision: str = "fp32") -> None:
        self.weights = Path(weights)
        if self.weights.suffix.lower() == ".onnx":
            if precision != "fp32":
                raise DetrkitError(f"{self.weights}: an ONNX export runs in float32; --precision {precision} "
                                   f"applies to PyTorch checkpoints")
            self.model, self.backend, self.device = OnnxDetector(self.weights), "onnxruntime", "cpu"
            self.config = _onnx_model_config(self.model)
        else:
            self.device = str(select_device(device))
            self.model = load_model(self.weights, device=self.device, precision=precision)
            self.backend, self.config = "pytorch", self.model.config
        self.precision = precision
        self.classes = [{"id": c["id"], "name": c["name"]} for c in self.model.classes]

    def predict(self, images: list, *, threshold: float = 0.5, batch_size: int = 8) -> list[dict]:
        return self.model.predict(images, threshold=threshold, batch_size=batch_size)

    def detect(self, images: list) -> list[dict]:
        return self.predict(images, threshold=0.0, batch_size=len(images))

    def info(self) -> dict:
        return {"weights": self.weights.name, "backend": self.backend, "device": self.device,
                "precision": self.precision, "preset": preset_name(self.config),
                "input": dict(self.model.inference), "classes": self.classes}


def _onnx_model_config(detector: OnnxDetector) -> Optional[ModelConfig]:
    """The model config an export recorded in its metadata; None when it has none this version reads."""
    try:
        recorded = json.loads(detector.session.get_modelmeta().custom_metadata_map.get("model_config", "null"))
        return config_from_dict(ModelConfig, recorded) if isinstance(recorded, dict) else None
    except (ValueError, TypeError):  # fields of another version: the preset is then unknown
        return None


def preset_name(config: Optional[ModelConfig]) -> Optional[str]:
    """The preset a model config is (classes and auxiliary outputs aside), or None."""
    if config is None:
        return None
    return next((name for name in PRESETS if dataclasses.replace(
        preset(name), num_classes=config.num_classes, aux_loss=config.aux_loss) == config), None)


# ---------------------------------------------------------------------------------------------
# detrkit predict: image files -> pictures and detections.json
# ---------------------------------------------------------------------------------------------
@dataclass
class Predicted:
    """What :func:`predict_files` wrote, and what it could not read."""

    records: list[dict] = field(default_factory=list)  # detections.json: {"file", "detections"} per image
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why it could not be read)

    def summary(self, out: Path) -> str:
        """The closing line: images and detections written, and the files skipped."""
        line = (f"{len(self.records)} images, {sum(len(r['detections']) for r in self.records)} detections "
                f"-> {out}")
        if self.skipped:
            line += (f"; skipped {len(self.skipped)} unreadable file{'s' * (len(self.skipped) > 1)}: "
                     f"{', '.join(str(f) for f, _ in self.skipped)}")
        return line


def predict_files(detector: Detector, files: Sequence[Path], out: Path, *, threshold: float = 0.5,
                  batch_size: int = 8) -> Predicted:
    """Detect objects in image ``files``: ``out/STEM.png`` with the boxes drawn for each image, and
    ``out/detections.json`` (``[{"file", "detections": [{"box", "score", "category_id", "name"}]}]``).

    A file that does not read as an image is skipped, with one line naming it and why; the
    images after it fill its place in the batch, so every image's detections are those of a run
    without the bad files.
    """
    out.mkdir(parents=True, exist_ok=True)
    done = Predicted()
    batch: list[tuple[Path, Tensor]] = []
    for i, f in enumerate(files):
        try:
            batch.append((f, image_tensor(f)))  # decoded here, so a bad file is caught alone
        except DataError as e:
            print(f"skipped {e}", flush=True)
            done.skipped.append((f, str(e)))
        if batch and (len(batch) == batch_size or i == len(files) - 1):
            done.records += _predict_batch(detector, batch, out, threshold)
            batch = []
    atomic_write_text(out / "detections.json", json.dumps(done.records, indent=1))
    return done


def _predict_batch(detector: Detector, batch: list[tuple[Path, Tensor]], out: Path, threshold: float) -> list[dict]:
    """One batch through the model: a picture per image, and its detections.json records."""
    records = []
    images = [img for _, img in batch]
    for (f, img), det in zip(batch, detector.predict(images, threshold=threshold, batch_size=len(images))):
        save_image(draw_detections(img, det["boxes"].cpu(), det["names"], det["scores"].cpu()), out / f"{f.stem}.png")
        records.append({"file": str(f), "detections": detection_records(det)})
    return records
