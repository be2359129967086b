"""From raw DETR outputs to detections: scores, dataset category ids, absolute boxes.

No NMS and no anchors: each query is one candidate detection. Its score is the highest
class probability other than "no object", its label that class.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from detrkit.boxes import cxcywh_to_xyxy, scale_boxes


def score_boxes(logits: Tensor, boxes: Tensor, sizes: Tensor, *, sigmoid_class: bool = False,
                top_k: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """The batch part of :func:`postprocess` (also traced into ONNX graphs).

    ``logits (B, Q, K+1)`` (``(B, Q, K)`` with ``sigmoid_class``), ``boxes (B, Q, 4)`` cxcywh in [0, 1],
    ``sizes (B, 2)`` float ``(h, w)`` -> ``scores (B, N)``, ``labels (B, N)`` class indices,
    ``boxes (B, N, 4)`` absolute xyxy; ``N = Q``, or ``min(top_k, Q*K)`` with ``sigmoid_class``.
    """
    boxes = scale_boxes(cxcywh_to_xyxy(boxes.float()), sizes)  # (B, Q, 4) absolute xyxy
    if sigmoid_class:
        _, q, k = logits.shape
        prob = logits.float().sigmoid().flatten(1)  # (B, Q*K)
        scores, flat = prob.topk(min(top_k, q * k), dim=1)  # (B, N)
        labels = flat % k
        boxes = torch.gather(boxes, 1, (flat // k)[..., None].expand(-1, -1, 4))  # (B, N, 4)
    else:
        scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)  # (B, Q): drop "no object"
    return scores, labels, boxes


@torch.no_grad()
def postprocess(outputs: dict, target_sizes: Tensor | Sequence[Sequence[int]], *, threshold: float = 0.0,
                index_to_category: Optional[Sequence[int]] = None, sigmoid_class: bool = False,
                top_k: int = 100) -> list[dict]:
    """Turn the last decoder layer's predictions into per-image detections.

    Args:
        outputs: ``pred_logits (B, Q, K+1)`` and ``pred_boxes (B, Q, 4)`` (cxcywh, [0, 1]).
        target_sizes: ``(B, 2)`` each image's ``(height, width)`` in pixels: the size the boxes
            are wanted in (usually the original image size).
        threshold: keep detections whose score is above it (0 keeps all Q).
        index_to_category: the dataset category id of each class index; without it the
            index is reported as the id (true of official COCO checkpoints, where index = COCO id).
        sigmoid_class: the logits are per-class sigmoid logits with no "no object" column
            (``model.sigmoid_class``: two-stage models). Then the ``top_k`` best (query, class) pairs are kept, so one query may
            report two classes: a better ranking for COCO AP than one class per query.

    Returns:
        One dict per image: ``scores (N,)``, ``labels (N,)`` int64 dataset category ids,
        ``boxes (N, 4)`` absolute ``(x0, y0, x1, y1)`` in pixels of ``target_sizes``.
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    sizes = torch.as_tensor(target_sizes, dtype=torch.float32, device=boxes.device)
    if sizes.shape != (logits.shape[0], 2):
        raise ValueError(f"target_sizes must be (B, 2) = ({logits.shape[0]}, 2), got {tuple(sizes.shape)}")
    scores, labels, boxes = score_boxes(logits, boxes, sizes, sigmoid_class=sigmoid_class, top_k=top_k)
    if index_to_category is not None:
        lut = torch.as_tensor(list(index_to_category), dtype=torch.int64, device=labels.device)
        labels = lut[labels]
    results = []
    for s, l, b in zip(scores, labels, boxes):
        keep = s > threshold
        results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep]})
    return results
