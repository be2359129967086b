"""The set loss: Hungarian matching, then classification and box losses on the matched pairs.

For every decoder layer (the last and, with auxiliary losses, each earlier one) the
predictions are matched to the targets on their own, and

* ``loss_ce``: cross-entropy over *all* Q predictions; matched ones learn their target's class,
  unmatched ones learn "no object", whose weight is ``eos_coef`` (0.1) to balance the many
  background predictions. A weighted mean, as ``F.cross_entropy`` with class weights computes;
* ``loss_bbox``: L1 (or Smooth L1) between matched predicted and target boxes (cxcywh, [0, 1]);
* ``loss_giou``: ``1 - GIoU`` of the matched pairs;

the box losses summed and divided by the number of target boxes in the batch. Keys of earlier
layers carry the suffix ``_{i}`` (``loss_ce_0`` ... for layer 0). ``class_error`` and
``cardinality_error`` are logged, never trained on.

Both denominators (the number of boxes, the sum of the cross-entropy weights) are those of the
whole optimiser step: every process and every accumulated micro-batch (:meth:`SetCriterion.normalizers`).
The gradient of W processes x K micro-batches x B images is then that of one batch of W*K*B.
(The official code divides the cross-entropy by each process's own weight sum, so there W
processes differ slightly from one; the box losses it normalises as here.)
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from detrkit import distributed
from detrkit.boxes import cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou
from detrkit.config import LossConfig, denoising_groups
from detrkit.matcher import HungarianMatcher, build_matcher

Indices = list[tuple[Tensor, Tensor]]


class Normalizers(NamedTuple):
    """The denominators of one optimiser step's losses, per process (see :meth:`SetCriterion.normalizers`)."""

    num_boxes: float  # target boxes of the step / processes, at least 1
    ce_weight: float  # sum of the cross-entropy class weights of every query of the step / processes
    dn_ce_weight: float = 1.0  # the same for the denoising queries (training-only aid), if any


class SetCriterion(nn.Module):
    """DETR's loss. ``forward(outputs, targets)`` -> dict of named losses plus ``loss`` (the weighted total)."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 eos_coef: float = 0.1, bbox_loss: str = "l1", smooth_l1_beta: float = 0.1, *,
                 sigmoid_class: bool = False, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 encoder_repeats: int = 1, class_loss: str = "focal", vfl_alpha: float = 0.75,
                 mal_gamma: float = LossConfig.mal_gamma, mal_alpha: Optional[float] = LossConfig.mal_alpha,
                 denoising: int = 0, denoising_queries: int = 0,
                 hybrid_repeats: int = LossConfig.hybrid_repeats) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)  # the one place the loss weights live
        self.eos_coef = eos_coef
        self.bbox_loss = bbox_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.sigmoid_class = sigmoid_class  # sigmoid focal classification (two-stage models) instead of softmax CE
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.encoder_repeats = encoder_repeats
        self.class_loss = class_loss  # with sigmoid: "focal", "varifocal" or "mal" (IoU-aware targets)
        self.vfl_alpha = vfl_alpha
        self.mal_gamma, self.mal_alpha = mal_gamma, mal_alpha
        self.hybrid_repeats = hybrid_repeats  # how often the hybrid queries' targets are repeated (H-DETR's k)
        # The denoising queries the model is trained with (detrkit.aids): fixed groups, or groups from a
        # budget of queries (config.denoising_groups); both 0 = none.
        self.denoising = denoising
        self.denoising_queries = denoising_queries
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    # --- the named losses -------------------------------------------------------------------
    def loss_labels(self, outputs: dict, targets: list[dict], indices: Indices, log: bool = True,
                    num_boxes: float = 1.0, ce_weight: Optional[float] = None) -> dict:
        """Cross-entropy over all queries; unmatched queries are "no object" (index num_classes).

        The weighted sum divided by ``ce_weight``; by default the weight sum of this batch, which
        makes it ``F.cross_entropy``'s weighted mean (official).

        With ``sigmoid_class``: focal loss over all queries and classes (a matched query's target is
        its class, every other entry 0), summed and divided by ``num_boxes`` (Deformable DETR).
        With ``class_loss="varifocal"`` the matched entry's target is the IoU of the predicted
        box with its object's (detached), positives weighted by that IoU and negatives by
        ``vfl_alpha * p^gamma`` (VarifocalNet; RT-DETR): a high score then means a good box.
        With ``class_loss="mal"`` (DEIM's matchability-aware loss) the target is ``IoU^mal_gamma``
        and every positive weighs 1, negatives ``p^mal_gamma`` (times ``mal_alpha`` when set).
        """
        logits = outputs["pred_logits"]  # (B, Q, K+1), or (B, Q, K) with sigmoid_class
        batch_idx, src_idx = _permutation(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, src_idx] = matched_labels
        if self.sigmoid_class and self.class_loss in ("varifocal", "mal"):
            quality = self._matched_iou(outputs, targets, indices, batch_idx, src_idx)
            iou_aware = self._varifocal if self.class_loss == "varifocal" else self._matchability
            losses = {"loss_ce": iou_aware(logits.float(), target_classes, quality) / num_boxes}
        elif self.sigmoid_class:
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()  # (B, Q, K)
            focal = sigmoid_focal_loss(logits.float(), onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
            losses = {"loss_ce": focal / num_boxes}
        else:
            weighted = F.cross_entropy(logits.transpose(1, 2).float(), target_classes, self.empty_weight,
                                       reduction="sum")
            if ce_weight is None:
                ce_weight = self.empty_weight[target_classes].sum()
            losses = {"loss_ce": weighted / ce_weight}
        if log:
            # Top-1 error on the matched queries, in percent. With no targets there is nothing
            # to get wrong: 0, not 100.
            if matched_labels.numel() == 0:
                losses["class_error"] = torch.zeros((), device=logits.device)
            else:
                correct = (logits[batch_idx, src_idx].argmax(-1) == matched_labels).float().mean()
                losses["class_error"] = 100 * (1 - correct)
        return losses

    @torch.no_grad()
    def _matched_iou(self, outputs: dict, targets: list[dict], indices: Indices, batch_idx: Tensor,
                     src_idx: Tensor) -> Tensor:
        """``(B, Q)``: the IoU of each matched query's box with its target's, 0 for unmatched queries."""
        src = outputs["pred_boxes"][batch_idx, src_idx].float()  # (M, 4)
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)  # (M, 4)
        iou, _ = elementwise_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt))
        quality = torch.zeros(outputs["pred_logits"].shape[:2], device=src.device)
        quality[batch_idx, src_idx] = iou.clamp(min=0)
        return quality

    def _varifocal(self, logits: Tensor, target_classes: Tensor, quality: Tensor) -> Tensor:
        """The summed varifocal loss of ``logits (B, Q, K)``; ``target_classes (B, Q)`` (K = background),
        ``quality (B, Q)`` the IoU target of each matched query."""
        with torch.no_grad():
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()  # (B, Q, K)
            score = onehot * quality[..., None]  # the IoU at the object's class, 0 elsewhere
            weight = self.vfl_alpha * logits.sigmoid().pow(self.focal_gamma) * (1 - onehot) + score
        return F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="sum")

    def _matchability(self, logits: Tensor, target_classes: Tensor, quality: Tensor) -> Tensor:
        """DEIM's summed matchability-aware loss (MAL), arguments as :meth:`_varifocal`.

        Beside varifocal: the target is ``IoU^gamma`` rather than the IoU, and a positive weighs 1
        rather than its IoU. With varifocal a query matched to an object it barely overlaps (common
        when images hold many objects, DEIM's dense one-to-one matching) gets both a low target
        and a low weight, so it hardly learns; MAL keeps the weight and only lowers the target.
        """
        with torch.no_grad():
            onehot = F.one_hot(target_classes, self.num_classes + 1)[..., :-1].float()  # (B, Q, K)
            score = onehot * quality[..., None].pow(self.mal_gamma)  # IoU^gamma at the object's class, 0 elsewhere
            negative = logits.sigmoid().pow(self.mal_gamma) * (1 - onehot)
            weight = (negative if self.mal_alpha is None else self.mal_alpha * negative) + onehot
        return F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="sum")

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: list[dict], indices: Indices) -> dict:
        """L1 between the number of predicted objects (argmax is not "no object") and of targets. Logged only."""
        logits = outputs["pred_logits"]
        if self.sigmoid_class:  # an object is a query with some class above probability 0.5
            predicted = (logits.max(-1).values > 0).sum(1).float()
        else:
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()  # (B,)
        actual = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"cardinality_error": F.l1_loss(predicted, actual)}

    def loss_boxes(self, outputs: dict, targets: list[dict], indices: Indices, num_boxes: float) -> dict:
        """L1 / Smooth L1 and 1 - GIoU on matched pairs, summed and divided by ``num_boxes``."""
        batch_idx, src_idx = _permutation(indices)
        src = outputs["pred_boxes"][batch_idx, src_idx].float()  # (M, 4)
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)  # (M, 4)
        if self.bbox_loss == "smooth_l1":
            reg = F.smooth_l1_loss(src, tgt, reduction="none", beta=self.smooth_l1_beta)
        else:
            reg = F.l1_loss(src, tgt, reduction="none")
        giou = elementwise_generalized_box_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt))  # (M,)
        # With no matched pairs both sums are over empty tensors: exactly 0, and still part of
        # the graph, so every box-head parameter gets a (zero) gradient.
        return {"loss_bbox": reg.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    # --- the whole loss --------------------------------------------------------------------
    def layer_losses(self, outputs: dict, targets: list[dict], norm: Normalizers, log: bool,
                     indices: Optional[Indices] = None) -> dict:
        """Match one decoder layer's predictions and compute its named losses."""
        if indices is None:
            indices = self.matcher(outputs, targets)
        losses = self.loss_labels(outputs, targets, indices, log=log, num_boxes=norm.num_boxes,
                                  ce_weight=norm.ce_weight)
        losses.update(self.loss_boxes(outputs, targets, indices, norm.num_boxes))
        losses.update(self.loss_cardinality(outputs, targets, indices))
        return losses

    def forward(self, outputs: dict, targets: list[dict], norm: Optional[Normalizers] = None) -> dict:
        """Losses of a batch.

        Args:
            outputs: the model's output dict (``pred_logits``, ``pred_boxes``, optional ``aux_outputs``).
            targets: one dict per image: ``labels (T,)`` int64 contiguous indices, ``boxes (T, 4)``
                cxcywh normalised by the image size.
            norm: the step's :class:`Normalizers` when the step spans several micro-batches;
                by default those of ``targets`` (across processes when distributed).

        Returns:
            ``loss_ce``, ``loss_bbox``, ``loss_giou``, ``class_error``, ``cardinality_error``;
            the same (without ``class_error``) with suffix ``_{i}`` for auxiliary layer i; and
            ``loss``, the sum of every key in ``weight_dict`` times its weight.
        """
        if norm is None:
            norm = self.normalizers([targets], outputs)
        losses = self.layer_losses(outputs, targets, norm, log=True)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self.layer_losses(aux, targets, norm, log=False)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        if "enc_outputs" in outputs:  # two-stage: the encoder proposals get the same set loss
            enc_targets, enc_norm = _one_to_many(targets, norm, self.encoder_repeats)
            enc_losses = self.layer_losses(outputs["enc_outputs"], enc_targets, enc_norm, log=False)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        if "group_outputs" in outputs:  # query groups (detrkit.aids): each group matched on its own
            group_losses = [self.all_layer_losses(g, targets, norm) for g in outputs["group_outputs"]]
            losses.update({f"{k}_group": sum(gl[k] for gl in group_losses) for k in _TRAINED})
        if "hybrid_outputs" in outputs:  # H-DETR's one-to-many branch: every target repeated k times
            hybrid = self.all_layer_losses(outputs["hybrid_outputs"], *_one_to_many(targets, norm, self.hybrid_repeats))
            losses.update({f"{k}_hybrid": hybrid[k] for k in _TRAINED})
        if "dn_outputs" in outputs:  # denoising queries: known targets (dn_indices), never matched
            dn_norm = Normalizers(norm.num_boxes * outputs["dn_meta"]["groups"], norm.dn_ce_weight)
            dn = self.all_layer_losses(outputs["dn_outputs"], targets, dn_norm, outputs["dn_indices"])
            losses.update({f"{k}_dn": dn[k] for k in _TRAINED})
        losses["loss"] = self.weighted_total(losses)
        return losses

    def all_layer_losses(self, outputs: dict, targets: list[dict], norm: Normalizers,
                         indices: Optional[Indices] = None) -> dict:
        """The trained losses of training-only queries, summed over the last and auxiliary layers.

        Each layer is matched on its own unless ``indices`` (a known assignment) is given.
        """
        layers = [outputs, *outputs.get("aux_outputs", [])]
        per_layer = [self.layer_losses(o, targets, norm, log=False, indices=indices) for o in layers]
        return {k: sum(pl[k] for pl in per_layer) for k in _TRAINED}

    def weighted_total(self, losses: dict) -> Tensor:
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)

    def normalizers(self, micro_batches: list[list[dict]], outputs: dict) -> Normalizers:
        """The loss denominators of a step whose images on this process are ``micro_batches``
        (one list of targets per micro-batch; a single batch is ``[targets]``), given the model's
        ``outputs`` of one of them (the number of queries Q and the device are read from them).

        Box losses are normalised by the number of target boxes across the whole step: every
        process and, with accumulation, every micro-batch. DDP averages gradients over the W
        processes, so each process divides by ``total / W``: the averaged gradient is then that
        of ``sum / total`` whatever the split of boxes across processes (the official code does
        the same for boxes).

        The cross-entropy is a weighted mean over every query of the step, weight 1 for a
        matched query and ``eos_coef`` for "no object". Matching pairs ``min(Q, T)`` queries of
        an image with ``T`` targets, so the weight sum is known before matching. Denoising
        queries (``G`` groups of ``2 x T_max`` per image, ``T_max`` the most targets of an image
        in the micro-batch) have ``G x T`` positives per image.
        """
        num_queries, device = outputs["pred_logits"].shape[1], outputs["pred_logits"].device
        boxes = ce = dn_ce = 0.0
        eos = float(self.empty_weight[-1])
        for targets in micro_batches:
            counts = [len(t["labels"]) for t in targets]
            matched = sum(min(n, num_queries) for n in counts)
            boxes += sum(counts)
            ce += matched + (len(counts) * num_queries - matched) * eos
            pad = max(counts, default=0)
            g = denoising_groups(self.denoising, self.denoising_queries, pad)
            dn_ce += sum(g * n + (2 * g * pad - g * n) * eos for n in counts)
        totals = distributed.all_sum(torch.tensor([boxes, ce, dn_ce], dtype=torch.float64, device=device)).tolist()
        world = distributed.world_size()
        return Normalizers(max(totals[0] / world, 1.0), totals[1] / world, max(totals[2] / world, 1.0))


_TRAINED = ("loss_ce", "loss_bbox", "loss_giou")  # the named losses that carry a weight


def _one_to_many(targets: list[dict], norm: Normalizers, k: int) -> tuple[list[dict], Normalizers]:
    """Every target repeated ``k`` times, so that matching gives each object ``k`` predictions
    (H-DETR's one-to-many matching), and the normalisers for that many target boxes."""
    if k == 1:
        return targets, norm
    repeated = [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
    return repeated, norm._replace(num_boxes=norm.num_boxes * k)


def _permutation(indices: Indices) -> tuple[Tensor, Tensor]:
    """Flatten per-image matches into (batch index, query index) for advanced indexing."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def weight_dict(loss: LossConfig, num_aux: int, encoder: bool = False) -> dict[str, float]:
    """The loss weights, with a copy for each auxiliary layer ``_0 .. _{num_aux-1}`` (and ``_enc``,
    and ``_group`` / ``_dn`` / ``_hybrid`` for the training-only queries when those are on)."""
    base = {"loss_ce": loss.loss_ce, "loss_bbox": loss.loss_bbox, "loss_giou": loss.loss_giou}
    weights = dict(base)
    suffixes = [str(i) for i in range(num_aux)] + ["enc"] * encoder
    denoising = loss.denoising > 0 or loss.denoising_queries > 0
    suffixes += ["group"] * (loss.query_groups > 1) + ["dn"] * denoising + ["hybrid"] * (loss.hybrid_queries > 0)
    for suffix in suffixes:
        weights.update({f"{k}_{suffix}": w for k, w in base.items()})
    return weights


def build_criterion(num_classes: int, loss: LossConfig, num_aux: int, *, sigmoid_class: bool = False) -> SetCriterion:
    """The one function that turns a :class:`LossConfig` into matcher + criterion.

    ``sigmoid_class`` is the model's (``model.sigmoid_class``): True for two-stage models, with
    focal classification and matching cost, and a loss on the encoder proposals.
    """
    return SetCriterion(num_classes, build_matcher(loss, sigmoid_class), weight_dict(loss, num_aux, encoder=sigmoid_class),
                        eos_coef=loss.eos_coef, bbox_loss=loss.bbox_loss, smooth_l1_beta=loss.smooth_l1_beta,
                        sigmoid_class=sigmoid_class, focal_alpha=loss.focal_alpha, focal_gamma=loss.focal_gamma,
                        encoder_repeats=loss.encoder_repeats, class_loss=loss.class_loss, vfl_alpha=loss.vfl_alpha,
                        mal_gamma=loss.mal_gamma, mal_alpha=loss.mal_alpha, denoising=loss.denoising,
                        denoising_queries=loss.denoising_queries, hybrid_repeats=loss.hybrid_repeats)
