"""detrkit: DETR (End-to-End Object Detection with Transformers), faithful, readable and fast.

The public API::

    import detrkit
    model = detrkit.load_model("weights/")       # detrkit, official DETR / RT-DETR .pth or Hugging Face folder
    outputs = model([image])                     # pred_logits, pred_boxes, aux_outputs
    detections = model.predict(["photo.jpg"], threshold=0.5)
    run_dir = detrkit.train(data="my_coco_dir", model="detr_r18_small", minutes=10)
    metrics = detrkit.evaluate(run_dir / "best", data="my_coco_dir")
    seen = detrkit.explain(model, "photo.jpg")   # detections + decoder / encoder attention maps
"""
from pathlib import Path
from typing import Optional, Union

from detrkit.checkpoint import load_model, save_model
from detrkit.config import DataConfig, LossConfig, ModelConfig, TrainConfig, route
from detrkit.presets import preset, resolve
from detrkit.criterion import SetCriterion, build_criterion
from detrkit.engine import evaluate_model
from detrkit.explain import explain
from detrkit.matcher import HungarianMatcher
from detrkit.model.build import build_model, count_flops
from detrkit.model.detr import DETR
from detrkit.model.rtdetr import RTDETR
from detrkit.postprocess import postprocess
from detrkit.run import train as run_training

__all__ = [
    "DETR", "RTDETR", "DataConfig", "HungarianMatcher", "LossConfig", "ModelConfig", "SetCriterion", "TrainConfig",
    "build_criterion", "build_model", "count_flops", "evaluate", "explain", "load_model", "postprocess", "preset", "save_model", "train",
]
__version__ = "0.1.0"


def train(*, recipe: Optional[str] = None, **options) -> Path:
    """Train a detector; the Python face of ``detrkit train``. Returns the run folder.

    ``recipe`` is ``"paper"`` or ``"fast"`` (docs/training.md); ``options`` are the command's
    flags as Python names, e.g. ``data="dir"``, ``train_json=..., train_images=..., val_json=...,
    val_images=...``, ``model="detr_r18_small"``, ``epochs=50``, ``minutes=10``, ``lr=1e-4``,
    ``bbox_loss="smooth_l1"``, ``out="runs/x"``; each goes to the config dataclass that owns it
    (:func:`detrkit.config.route`: TrainConfig, DataConfig, LossConfig, or ModelConfig fields
    overriding the preset's).
    """
    sections, unknown = route(options)
    if unknown:
        raise TypeError(f"unknown training options: {', '.join(unknown)}")
    return run_training(*resolve(recipe, sections))


def evaluate(weights: Union[str, Path, DETR, RTDETR], *, batch_size: int = 8, device: str = "auto", **data) -> dict:
    """COCO metrics of a checkpoint (or model) on the validation split given by ``data``
    (``data="dir"`` or ``val_json=..., val_images=...``): the 12 COCO numbers and ``per_class``."""
    model = weights if isinstance(weights, (DETR, RTDETR)) else load_model(weights)
    return evaluate_model(model, data, batch_size=batch_size, device=device)[0]
