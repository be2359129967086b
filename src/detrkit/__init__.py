"""detrkit: DETR (End-to-End Object Detection with Transformers), faithful, readable and fast.

The public API::

    from detrkit import build_model, load_model, save_model, preset
    model = load_model("weights/")            # detrkit, official DETR .pth or Hugging Face folder
    outputs = model([image])                  # pred_logits, pred_boxes, aux_outputs
    detections = postprocess(outputs, [(h, w)], threshold=0.5)
"""
from detrkit.checkpoint import load_model, save_model
from detrkit.config import LossConfig, ModelConfig, preset
from detrkit.criterion import SetCriterion, build_criterion
from detrkit.matcher import HungarianMatcher
from detrkit.model.detr import DETR, build_model
from detrkit.postprocess import postprocess

__all__ = [
    "DETR", "HungarianMatcher", "LossConfig", "ModelConfig", "SetCriterion", "build_criterion",
    "build_model", "load_model", "postprocess", "preset", "save_model",
]
__version__ = "0.1.0"
