"""Box formats, on top of :mod:`torchvision.ops`.

DETR predicts boxes as ``(cx, cy, w, h)`` normalised to [0, 1] by the image's own
(unpadded) width and height. Costs and GIoU are computed on ``(x0, y0, x1, y1)``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` centre/size boxes -> corner boxes."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` corner boxes -> centre/size boxes."""
    return box_convert(boxes, "xyxy", "cxcywh")


def scale_boxes(boxes: Tensor, sizes: Tensor) -> Tensor:
    """Normalised boxes ``(B, N, 4)`` times each image's ``(h, w)`` from ``sizes (B, 2)``."""
    h, w = sizes.unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1).to(boxes.dtype)  # (B, 4)
    return boxes * scale[:, None, :]


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union area of matched pairs ``boxes1[i]``, ``boxes2[i]``, both ``(N, 4)`` xyxy -> ``(N,)``, ``(N,)``."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = area1 + area2 - inter
    return inter / union, union


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matched pairs: ``boxes1[i]`` with ``boxes2[i]``, both ``(N, 4)`` xyxy -> ``(N,)``.

    The set loss needs GIoU of the matched pairs only. Computing it pairwise costs O(N)
    instead of the diagonal of an N x N matrix. It uses the exact formula of
    ``torchvision.ops.generalized_box_iou`` (no epsilon), so the loss values equal the
    official implementation's; ``torchvision.ops.generalized_box_iou_loss`` adds an
    epsilon of 1e-7 that shifts them for small boxes.
    """
    iou, union = elementwise_box_iou(boxes1, boxes2)
    # The smallest box enclosing both.
    lt_c = torch.min(boxes1[:, :2], boxes2[:, :2])
    rb_c = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    area_c = (rb_c - lt_c).clamp(min=0).prod(dim=1)
    return iou - (area_c - union) / area_c


def pairwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of every pair: ``boxes1 (..., N, 4)`` with ``boxes2 (..., M, 4)``, xyxy -> ``(..., N, M)``.

    ``torchvision.ops.generalized_box_iou`` (same formula, same order of operations), for a
    batch of box sets at once, and laid out per coordinate: every intermediate is an
    ``(..., N, M)`` array with M contiguous, not an ``(N, M, 2)`` one, which the matcher's cost
    of B images x 300 queries x 50 targets computes several times faster.
    """
    # Each coordinate as its own contiguous array: broadcasting strided views is 5x slower.
    x0, y0, x1, y1 = boxes1.movedim(-1, 0).contiguous().unsqueeze(-1)  # each (..., N, 1)
    u0, v0, u1, v1 = boxes2.movedim(-1, 0).contiguous().unsqueeze(-2)  # each (..., 1, M)
    area1 = (x1 - x0) * (y1 - y0)
    area2 = (u1 - u0) * (v1 - v0)
    inter = (torch.minimum(x1, u1) - torch.maximum(x0, u0)).clamp(min=0) * \
        (torch.minimum(y1, v1) - torch.maximum(y0, v0)).clamp(min=0)  # (..., N, M)
    union = area1 + area2 - inter
    iou = inter / union
    # The smallest box enclosing both.
    hull = (torch.maximum(x1, u1) - torch.minimum(x0, u0)).clamp(min=0) * \
        (torch.maximum(y1, v1) - torch.minimum(y0, v0)).clamp(min=0)
    return iou - (hull - union) / hull
