"""Bipartite (Hungarian) matching between predictions and ground-truth objects.

DETR predicts a fixed-size set of Q boxes per image and compares it with the T <= Q
targets through a one-to-one assignment that minimises the total matching cost

    C[q, t] = w_class * class_cost(q, t) + w_l1 * ||b_q - b_t||_1 + w_giou * (-GIoU(b_q, b_t)),

where ``class_cost`` is ``-p_q(c_t)`` (official code) or ``1 - p_q(c_t)`` (as the method is
usually explained; ``LossConfig.class_cost_formula``). The two differ by the constant ``w_class`` in every entry, which changes
the total cost of every complete assignment by the same ``w_class * T``: the optimum is the same.
Unmatched predictions are trained towards "no object".
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import generalized_box_iou

from detrkit.boxes import cxcywh_to_xyxy, pairwise_generalized_box_iou
from detrkit.config import LossConfig


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets, one image at a time.

    The official code builds one ``B*Q x sum(T)`` cost matrix and uses only its diagonal
    blocks (image b's queries against image b's targets). Here only those blocks are computed:
    ``Q x T_b`` per image, all images at once on targets padded to the largest count. The
    same numbers in the blocks, so the same assignments (see :func:`full_matrix_match`, the
    official method, kept as the reference), for about ``1/B`` of the work.
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 class_cost_formula: str = "neg_prob", *, sigmoid_class: bool = False, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0) -> None:
        """Weights of the three cost terms; ``class_cost_formula`` ``"neg_prob"`` (-p) or
        ``"one_minus_prob"`` (1 - p) for softmax models (checked by :class:`~detrkit.config.LossConfig`);
        ``sigmoid_class``: the model's classes are per-class sigmoids (``model.sigmoid_class``)."""
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.class_cost_formula = class_cost_formula
        # Sigmoid-classified models (two-stage) are matched with the focal terms they are trained
        # with (Deformable DETR): the class cost is focal(p, positive) - focal(p, negative).
        self.sigmoid_class = sigmoid_class
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """The matching cost of one image, or of a batch of images.

        ``logits (..., Q, K+1)`` (``(..., Q, K)`` with ``sigmoid_class``), ``boxes (..., Q, 4)`` cxcywh;
        ``labels (..., T)``, ``tgt_boxes (..., T, 4)`` cxcywh -> ``C (..., Q, T)``, where ``...``
        is nothing (one image) or ``B`` (a batch, every image with T targets). Always computed
        in float32: half-precision costs round distinct candidates to the same value and can
        hold NaN.
        """
        terms = self.cost_terms(logits, boxes, labels, tgt_boxes)
        return self.cost_bbox * terms["bbox"] + self.cost_class * terms["class"] + self.cost_giou * terms["giou"]

    def cost_terms(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> dict[str, Tensor]:
        """The three unweighted terms of :meth:`cost_matrix`, each ``(..., Q, T)`` float32:
        ``class`` (``-p``, ``1 - p`` or the focal difference), ``bbox`` (L1 distance of the
        cxcywh boxes) and ``giou`` (``-GIoU``)."""
        boxes = boxes.float()
        tgt_boxes = tgt_boxes.float()
        q = logits.shape[-2]
        index = labels.unsqueeze(-2).expand(*labels.shape[:-1], q, labels.shape[-1])  # (..., Q, T)
        if self.sigmoid_class:
            p = logits.float().sigmoid().gather(-1, index)  # (..., Q, T)
            a, g = self.focal_alpha, self.focal_gamma
            pos = a * (1 - p) ** g * -(p + 1e-8).log()
            neg = (1 - a) * p ** g * -(1 - p + 1e-8).log()
            cost_class = pos - neg
        else:
            p = logits.float().softmax(-1).gather(-1, index)  # (..., Q, T): probability of each target's class
            cost_class = 1 - p if self.class_cost_formula == "one_minus_prob" else -p
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)  # (..., Q, T)
        cost_giou = -pairwise_generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(tgt_boxes))  # (..., Q, T)
        return {"class": cost_class, "bbox": cost_bbox, "giou": cost_giou}

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Match each image's predictions to its targets.

        Args:
            outputs: ``pred_logits (B, Q, K+1)`` and ``pred_boxes (B, Q, 4)`` (cxcywh, [0, 1]).
            targets: one dict per image with ``labels (T_i,)`` int64 and ``boxes (T_i, 4)``
                cxcywh normalised by the image size.

        Returns:
            One ``(pred_indices, target_indices)`` pair of int64 CPU tensors per image, each of
            length ``min(Q, T_i)``; target indices refer to the image's own target list.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        counts = [len(t["labels"]) for t in targets]
        width = max(counts, default=0)
        empty = torch.empty(0, dtype=torch.int64)
        if width == 0:
            return [(empty, empty) for _ in targets]
        # Targets padded to the largest count; the padding (label 0, box (0.5, 0.5, 0.5, 0.5),
        # so that every GIoU is defined) only fills columns that are cut off before solving.
        labels = pad_sequence([t["labels"] for t in targets], batch_first=True)  # (B, T_max)
        tgt_boxes = pad_sequence([t["boxes"].float() for t in targets], batch_first=True, padding_value=0.5)
        cost = self.cost_matrix(logits, boxes, labels, tgt_boxes).cpu()  # (B, Q, T_max)
        # One reduction instead of an element-wise test: NaN and inf survive a sum, and finite
        # costs (probabilities, L1 distances and GIoUs of boxes in [0, 1]) cannot overflow it.
        if not torch.isfinite(cost.sum()):
            b = next(b for b, n in enumerate(counts) if not torch.isfinite(cost[b, :, :n]).all())
            raise ValueError(_non_finite_message(b, logits[b], boxes[b], targets[b]))
        indices = []
        for b, n in enumerate(counts):
            if n == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(cost[b, :, :n].numpy())  # image b's (Q, T_b) block
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(loss: LossConfig, sigmoid_class: bool = False) -> HungarianMatcher:
    """The matcher of a :class:`~detrkit.config.LossConfig`, for a model whose ``sigmoid_class`` is given
    (the one place the loss settings become a matcher: training, and ``detrkit explain --matching``)."""
    return HungarianMatcher(loss.cost_class, loss.cost_bbox, loss.cost_giou, loss.class_cost_formula,
                            sigmoid_class=sigmoid_class, focal_alpha=loss.focal_alpha, focal_gamma=loss.focal_gamma)


@torch.no_grad()
def full_matrix_match(matcher: HungarianMatcher, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
    """The official DETR matcher, kept as the reference for :class:`HungarianMatcher` (tests and
    benchmarks/bench.py): one ``(B*Q) x sum(T)`` cost matrix of every query against every target
    in the batch, with torchvision's GIoU, cut into per-image blocks, each solved on its own;
    the off-diagonal blocks are computed and thrown away. Softmax classes only. Same arguments
    and result as ``matcher(outputs, targets)``.
    """
    b, q = outputs["pred_logits"].shape[:2]
    prob = outputs["pred_logits"].flatten(0, 1).float().softmax(-1)  # (B*Q, K+1)
    out_boxes = outputs["pred_boxes"].flatten(0, 1).float()  # (B*Q, 4)
    labels = torch.cat([t["labels"] for t in targets])  # (sum T,)
    tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()  # (sum T, 4)
    cost_class = -prob[:, labels] if matcher.class_cost_formula == "neg_prob" else 1 - prob[:, labels]
    cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
    cost_giou = -generalized_box_iou(cxcywh_to_xyxy(out_boxes), cxcywh_to_xyxy(tgt_boxes))
    cost = matcher.cost_bbox * cost_bbox + matcher.cost_class * cost_class + matcher.cost_giou * cost_giou
    blocks = cost.view(b, q, -1).cpu().split([len(t["labels"]) for t in targets], -1)
    indices = []
    for i, block in enumerate(blocks):
        rows, cols = linear_sum_assignment(block[i].numpy())  # image i's queries against its targets
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


def _non_finite_message(b: int, logits: Tensor, boxes: Tensor, target: dict) -> str:
    """Name the tensor that made the matching cost non-finite (instead of failing inside scipy)."""
    for name, value in (("pred_logits", logits), ("pred_boxes", boxes), ("targets['boxes']", target["boxes"])):
        if not torch.isfinite(value).all():
            return f"matching cost of image {b} in the batch is not finite: {name} holds NaN or inf"
    return f"matching cost of image {b} in the batch is not finite (degenerate boxes give an undefined GIoU)"
