"""SetCriterion: keys, weights, empty images, the box losses' normalisation."""
import itertools
import math

import pytest
import torch
from conftest import make_targets

from detrkit import build_criterion
from detrkit.config import LossConfig
from detrkit.criterion import weight_dict


def _outputs(gen, b=2, q=6, k=3, aux=2):
    def layer():
        return {"pred_logits": torch.randn(b, q, k + 1, generator=gen, requires_grad=True),
                "pred_boxes": (torch.rand(b, q, 4, generator=gen) * 0.4 + 0.1).requires_grad_()}
    out = layer()
    out["aux_outputs"] = [layer() for _ in range(aux)]
    return out


def test_keys_and_weighted_total():
    gen = torch.Generator().manual_seed(0)
    crit = build_criterion(3, LossConfig(), num_aux=2)
    losses = crit(_outputs(gen), make_targets())
    for suffix in ("", "_0", "_1"):
        for k in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert k + suffix in losses
    assert "class_error" in losses and "class_error_0" not in losses
    expected = sum(losses[k] * w for k, w in weight_dict(LossConfig(), 2).items())
    torch.testing.assert_close(losses["loss"], expected)
    assert weight_dict(LossConfig(), 1) == {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2,
                                            "loss_ce_0": 1, "loss_bbox_0": 5, "loss_giou_0": 2}


def test_no_boxes_give_exactly_zero_box_loss_and_correct_logs():
    gen = torch.Generator().manual_seed(1)
    crit = build_criterion(3, LossConfig(), num_aux=2)
    out = _outputs(gen)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = crit(out, empty)
    for suffix in ("", "_0", "_1"):
        assert losses["loss_bbox" + suffix].item() == 0.0
        assert losses["loss_giou" + suffix].item() == 0.0
    assert losses["class_error"].item() == 0.0  # nothing to get wrong, not 100
    assert losses["loss_ce"].item() > 0
    losses["loss"].backward()
    assert out["pred_boxes"].grad is not None and out["pred_boxes"].grad.abs().sum() == 0


def test_cross_entropy_is_weighted_mean_with_eos_coef():
    """With no targets every query is "no object": the weighted mean equals the plain mean."""
    logits = torch.randn(1, 4, 3)
    crit = build_criterion(2, LossConfig(), num_aux=0)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = crit({"pred_logits": logits, "pred_boxes": torch.rand(1, 4, 4)}, empty)
    expected = -torch.log_softmax(logits, -1)[0, :, 2].mean()
    torch.testing.assert_close(losses["loss_ce"], expected)


def test_box_losses_of_a_perfect_match_are_zero_and_normalised_by_box_count():
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]])
    logits = torch.tensor([[[5.0, -5, -5, -5], [-5, -5, 5, -5]]])
    targets = [{"labels": torch.tensor([0, 2]), "boxes": boxes[0].clone()}]
    crit = build_criterion(3, LossConfig(), num_aux=0)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-7)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["class_error"].item() == 0
    # Shift one box by 0.1 in x: L1 sum 0.1 over 2 target boxes.
    shifted = boxes.clone()
    shifted[0, 0, 0] += 0.1
    losses = crit({"pred_logits": logits, "pred_boxes": shifted}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.05, abs=1e-6)


def test_smooth_l1_option():
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.3]]])
    target = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.32, 0.4, 0.2, 0.3]])}]
    logits = torch.zeros(1, 1, 2)
    l1 = build_criterion(1, LossConfig(), 0)({"pred_logits": logits, "pred_boxes": boxes}, target)
    sl1 = build_criterion(1, LossConfig(bbox_loss="smooth_l1", smooth_l1_beta=0.1), 0)(
        {"pred_logits": logits, "pred_boxes": boxes}, target)
    assert l1["loss_bbox"].item() == pytest.approx(0.02, abs=1e-6)
    assert sl1["loss_bbox"].item() == pytest.approx(0.5 * 0.02 ** 2 / 0.1, abs=1e-7)
    with pytest.raises(ValueError):
        LossConfig(bbox_loss="l2")


def test_varifocal_targets_are_the_iou_of_the_matched_box():
    """One image, one target, two queries: the matched query's target at its class is its IoU."""
    logits = torch.tensor([[[0.3, -1.0], [-0.5, 0.2]]])  # (1, 2 queries, 2 classes), sigmoid
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.1, 0.1, 0.05, 0.05]]])  # query 0 half-overlaps the target
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    criterion = build_criterion(2, LossConfig(class_loss="varifocal"), num_aux=0, sigmoid_class=True)
    loss = criterion.loss_labels({"pred_logits": logits, "pred_boxes": boxes}, targets,
                                 [(torch.tensor([0]), torch.tensor([0]))], log=False, num_boxes=1.0)["loss_ce"]
    iou = 0.5  # the target (0.4..0.6 square) covers half of query 0's (0.3..0.7 x 0.4..0.6) box
    score = torch.zeros(1, 2, 2)
    score[0, 0, 0] = iou
    p = logits.sigmoid()
    weight = 0.75 * p ** 2 * (score == 0) + score
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="sum")
    torch.testing.assert_close(loss, expected)
    focal = build_criterion(2, LossConfig(), num_aux=0, sigmoid_class=True).loss_labels(
        {"pred_logits": logits, "pred_boxes": boxes}, targets, [(torch.tensor([0]), torch.tensor([0]))],
        log=False, num_boxes=1.0)["loss_ce"]
    assert not torch.isclose(loss, focal)  # the option changes the loss


def _mal_by_hand(logits: torch.Tensor, iou: dict, gamma: float, alpha=None) -> torch.Tensor:
    """DEIM's MAL written out entry by entry: ``iou`` maps (image, query, class) of each positive to its IoU."""
    total = torch.zeros((), dtype=torch.float64)
    for b, q, k in itertools.product(*(range(n) for n in logits.shape)):
        x = float(logits[b, q, k])
        p = 1 / (1 + math.exp(-x))
        if (b, q, k) in iou:
            t, w = iou[(b, q, k)] ** gamma, 1.0
        else:
            t, w = 0.0, (1.0 if alpha is None else alpha) * p ** gamma
        total += -w * (t * math.log(p) + (1 - t) * math.log(1 - p))
    return total


def test_mal_is_deims_formula_and_differs_from_varifocal():
    """Two images, three queries, two classes: query 0 of image 0 overlaps its object with IoU 0.5,
    query 2 of image 1 with IoU 0.25; MAL's target is IoU^1.5 with weight 1."""
    logits = torch.tensor([[[0.3, -1.0], [-0.5, 0.2], [1.5, -2.0]],
                           [[-0.2, 0.4], [0.9, -0.3], [-1.1, 0.7]]])  # (2 images, 3 queries, 2 classes)
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.1, 0.1, 0.05, 0.05], [0.8, 0.8, 0.1, 0.1]],
                          [[0.2, 0.2, 0.1, 0.1], [0.9, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    indices = [(torch.tensor([0]), torch.tensor([0])), (torch.tensor([2]), torch.tensor([0]))]
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    positives = {(0, 0, 0): 0.5, (1, 2, 1): 0.25}

    def loss(**options):
        criterion = build_criterion(2, LossConfig(**options), num_aux=0, sigmoid_class=True)
        return criterion.loss_labels(outputs, targets, indices, log=False, num_boxes=2.0)["loss_ce"]

    mal = loss(class_loss="mal")
    assert LossConfig().mal_gamma == 1.5 and LossConfig().mal_alpha is None  # DEIM's configs
    torch.testing.assert_close(mal.double(), _mal_by_hand(logits, positives, 1.5) / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss(class_loss="mal", mal_gamma=2.0, mal_alpha=0.5).double(),
                               _mal_by_hand(logits, positives, 2.0, alpha=0.5) / 2, rtol=1e-6, atol=0)
    assert abs(mal - loss(class_loss="varifocal")) > 0.05  # another loss than varifocal on the same inputs
    with pytest.raises(ValueError):
        LossConfig(class_loss="mal", mal_gamma=0)


def test_mal_of_an_image_without_objects_is_finite_and_only_the_negative_term():
    logits = torch.tensor([[[0.3, -1.0], [-0.5, 0.2]]], requires_grad=True)
    outputs = {"pred_logits": logits, "pred_boxes": torch.rand(1, 2, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    criterion = build_criterion(2, LossConfig(class_loss="mal"), num_aux=0, sigmoid_class=True)
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    p = logits.detach().sigmoid()
    negatives_only = (p ** 1.5 * torch.nn.functional.softplus(logits.detach())).sum()  # -log(1 - p) = softplus(x)
    torch.testing.assert_close(losses["loss_ce"], negatives_only)  # num_boxes is clamped to 1
    losses["loss"].backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad > 0).all()  # every score is pushed down
