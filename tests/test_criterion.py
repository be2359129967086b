"""SetCriterion: keys, weights, empty images, the box losses' normalisation."""
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
