"""Training-only aids (query groups, denoising queries): they help training and change nothing else."""
import dataclasses
import json

import pytest
import torch

from detrkit.aids import AidedModel, Denoising
from detrkit.checkpoint import load_model
from detrkit.config import LossConfig
from detrkit.presets import preset
from detrkit.criterion import SetCriterion, build_criterion
from detrkit.data.synthetic import make_synthetic
from detrkit.matcher import HungarianMatcher
from detrkit.model.build import build_model

TINY = dict(num_classes=3, dropout=0.0)


def _model(two_stage=False, seed=0):
    torch.manual_seed(seed)
    return build_model(preset("detr_r18_tiny", arch="two_stage" if two_stage else "detr", **TINY)).eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 64, generator=g)]
    targets = [
        {"labels": torch.tensor([0, 2, 1]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .5, .3, .4], [.5, .5, .9, .9]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[.4, .6, .2, .1]])},
    ]
    return images, targets


def _criterion(model, loss):
    return build_criterion(model.num_classes, loss, num_aux=len(model.transformer.decoder.layers) - 1,
                           sigmoid_class=model.sigmoid_class)


def test_options_off_give_the_plain_losses_exactly():
    """Defaults: no aid, the official criterion (hand-built here), the same outputs and losses."""
    model = _model()
    images, targets = _batch()
    net = AidedModel(model, LossConfig())
    assert [n for n, _ in net.named_parameters()] == [f"model.{n}" for n, _ in model.named_parameters()]
    out = net(images, targets)
    plain_out = model(images)
    assert set(out) == set(plain_out)
    assert torch.equal(out["pred_logits"], plain_out["pred_logits"])
    losses = _criterion(model, LossConfig())(out, targets)
    base = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    official = SetCriterion(3, HungarianMatcher(1.0, 5.0, 2.0), {**base, **{f"{k}_{i}": w for k, w in base.items()
                                                                            for i in range(1)}}, eos_coef=0.1)
    expected = official(plain_out, targets)
    assert set(losses) == set(expected)
    for k in expected:
        assert torch.equal(losses[k], expected[k]), k


@pytest.mark.parametrize("two_stage", [False, True])
def test_denoising_leaves_the_model_outputs_and_losses_unchanged(two_stage):
    """The model's own queries cannot see the denoising queries: their outputs and losses are the plain ones."""
    model = _model(two_stage)
    images, targets = _batch()
    loss = LossConfig(denoising=3)
    torch.manual_seed(1)
    out = AidedModel(model, loss)(images, targets)
    plain = model(images)
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[k], plain[k], rtol=0, atol=1e-6)
    losses = _criterion(model, loss)(out, targets)
    plain_losses = _criterion(model, LossConfig())(plain, targets)
    for k, v in plain_losses.items():
        if k != "loss":
            torch.testing.assert_close(losses[k], v, rtol=0, atol=1e-5, msg=k)
    assert {"loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"} <= set(losses)
    weights = _criterion(model, loss).weight_dict
    assert weights["loss_ce_dn"] == weights["loss_ce"] and weights["loss_giou_dn"] == weights["loss_giou"]
    dn_total = sum(losses[k] * weights[k] for k in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn"))
    torch.testing.assert_close(losses["loss"], plain_losses["loss"] + dn_total, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("two_stage", [False, True])
def test_denoising_queries_never_enter_the_matching(two_stage):
    model = _model(two_stage)
    images, targets = _batch()
    criterion = _criterion(model, LossConfig(denoising=2))
    seen = []
    real_forward = criterion.matcher.forward

    def spy(outputs, tgts):
        seen.append(outputs["pred_logits"].shape[1])
        return real_forward(outputs, tgts)

    criterion.matcher.forward = spy
    out = AidedModel(model, LossConfig(denoising=2))(images, targets)
    assert out["dn_outputs"]["pred_logits"].shape[1] == 2 * 2 * 3  # groups x (pos + neg) x max targets
    criterion(out, targets)
    hw = out["enc_outputs"]["pred_logits"].shape[1] if two_stage else None
    assert seen and all(n in (model.num_queries, hw) for n in seen)  # model queries (and encoder tokens) only
    # The known assignment: positive query i of every group <-> target i.
    src, tgt = Denoising.indices(targets, out["dn_meta"])[0]
    assert src.tolist() == [0, 1, 2, 6, 7, 8] and tgt.tolist() == [0, 1, 2, 0, 1, 2]


def test_denoising_noise_positive_smaller_than_negative():
    model = _model(True)
    dn = Denoising(model, groups=4, box_noise=1.0, label_noise=0.0)
    _, targets = _batch()
    torch.manual_seed(0)  # the noise is random: fixed here so the test gives one answer
    content, boxes, mask, meta = dn.queries(targets)
    t = meta["pad"]
    truth = targets[0]["boxes"]
    grouped = boxes[0].reshape(4, 2, t, 4)[:, :, :3]  # (G, pos/neg, targets, 4)
    err = (grouped - truth).abs().sum(-1)
    assert (err[:, 0].mean() < err[:, 1].mean())  # negatives are further from the truth
    # Without label noise the content is the label embedding of each target.
    torch.testing.assert_close(content[0, :3], dn.label_embed(targets[0]["labels"]))
    # Padding queries of the image with one target start empty.
    assert torch.equal(content[1, 1:3], torch.zeros_like(content[1, 1:3]))
    q = model.num_queries
    assert mask[:q, q:].all() and not mask[q:, :q].any()  # model queries blind to them; they see the model's
    assert mask[q, q + 2 * t] and not mask[q, q + 2 * t - 1]  # groups blind to each other


def test_query_groups_are_independent():
    """Changing one group's queries changes neither the model's outputs nor another group's."""
    model = _model()
    images, targets = _batch()
    net = AidedModel(model, LossConfig(query_groups=3))
    out = net(images, targets)
    assert len(out["group_outputs"]) == 2
    q = model.num_queries
    with torch.no_grad():
        net.groups.query_embed.weight[q:] += 1.0  # the third group only
    changed = net(images, targets)
    torch.testing.assert_close(changed["pred_logits"], out["pred_logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(changed["group_outputs"][0]["pred_boxes"], out["group_outputs"][0]["pred_boxes"],
                               rtol=0, atol=1e-6)
    assert not torch.allclose(changed["group_outputs"][1]["pred_boxes"], out["group_outputs"][1]["pred_boxes"])
    torch.testing.assert_close(out["pred_logits"], model(images)["pred_logits"], rtol=0, atol=1e-6)
    losses = _criterion(model, LossConfig(query_groups=3))(out, targets)
    assert {"loss_ce_group", "loss_bbox_group", "loss_giou_group"} <= set(losses)


def test_query_groups_refuse_two_stage():
    with pytest.raises(ValueError, match="learned queries"):
        AidedModel(_model(True), LossConfig(query_groups=2))


def _hybrid_run(model, loss, seed=1):
    """The aided model's outputs on the test batch, with the denoising noise drawn from ``seed``."""
    images, targets = _batch()
    torch.manual_seed(seed)
    return AidedModel(model, loss)(images, targets)


@pytest.mark.parametrize("denoising", [0, 2])
def test_hybrid_queries_are_a_separate_branch(denoising):
    """H-DETR's hybrid queries: the model's outputs stay the plain ones, and the hybrid and denoising
    queries cannot see each other."""
    model = _model(True)
    images, targets = _batch()
    loss = LossConfig(hybrid_queries=4, hybrid_repeats=2, denoising=denoising)
    out = _hybrid_run(model, loss)
    plain = model(images)
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[k], plain[k], rtol=0, atol=1e-6)
    hybrid = out["hybrid_outputs"]
    assert hybrid["pred_logits"].shape == (2, 4, 3) and len(hybrid["aux_outputs"]) == 1
    other = _hybrid_run(model, LossConfig(hybrid_queries=0 if denoising else 4, denoising=2))
    # The denoising queries' outputs do not depend on the hybrid queries, nor the other way round.
    # (Logits: at initialisation the box heads output their reference boxes whatever the features.)
    key = "dn_outputs" if denoising else "hybrid_outputs"
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(out[key][k], other[key][k], rtol=0, atol=1e-6)


def test_hybrid_block_sees_only_itself():
    from detrkit.model.heads import fit_extra_mask

    q, m, e = 3, 2, 4
    dn = Denoising(_model(True), groups=2, box_noise=1.0, label_noise=0.0)
    dn.model_queries = q
    mask = dn.mask(1, 2)  # (Q + E, Q + E): two denoising groups of 2
    full = fit_extra_mask(mask, q, q, m)
    hyb = slice(q, q + m)
    assert full.shape == (q + m + e, q + m + e)
    assert not full[hyb, hyb].any() and full[hyb, :q].all() and full[hyb, q + m:].all()
    assert full[:q, hyb].all() and full[q + m:, hyb].all()
    kept = [*range(q), *range(q + m, q + m + e)]
    assert torch.equal(full[kept][:, kept], mask)  # the rest is the given mask


def test_hybrid_queries_are_matched_one_to_many():
    model = _model(True)
    _, targets = _batch()
    loss = LossConfig(hybrid_queries=4, hybrid_repeats=2)
    out = _hybrid_run(model, loss)
    criterion = _criterion(model, loss)
    matched = []
    real_forward = criterion.matcher.forward

    def spy(outputs, tgts):
        indices = real_forward(outputs, tgts)
        if outputs["pred_logits"].shape[1] == 4:  # the hybrid branch
            matched.append([(len(t["labels"]), len(i)) for t, (i, _) in zip(tgts, indices)])
        return indices

    criterion.matcher.forward = spy
    losses = criterion(out, targets)
    # Every hybrid layer (last + 1 auxiliary) is matched against the targets repeated twice:
    # image 0 has 3 targets -> 6 to match, 4 queries; image 1 has 1 target -> 2, both matched.
    assert matched == [[(6, 4), (2, 2)]] * 2
    plain = _criterion(model, LossConfig())(model(_batch()[0]), targets)
    hybrid_total = sum(losses[f"{k}_hybrid"] * criterion.weight_dict[f"{k}_hybrid"]
                       for k in ("loss_ce", "loss_bbox", "loss_giou"))
    torch.testing.assert_close(losses["loss"], plain["loss"] + hybrid_total, rtol=1e-6, atol=1e-5)


def test_hybrid_queries_refuse_plain_detr_and_bad_counts():
    with pytest.raises(ValueError, match="two-stage"):
        AidedModel(_model(), LossConfig(hybrid_queries=4))
    for bad in (dict(hybrid_queries=-1), dict(hybrid_repeats=0), dict(encoder_repeats=0)):
        with pytest.raises(ValueError, match="hybrid_queries|repeats"):
            LossConfig(**bad)


@pytest.mark.parametrize("option", [dict(denoising=2), dict(query_groups=2),
                                    dict(denoising=2, hybrid_queries=8, arch="two_stage")])
def test_trained_with_aids_saves_the_plain_model(option, tmp_path):
    """A run with an aid on: its checkpoint has the plain model's parameter names and the same outputs."""
    from detrkit.config import DataConfig, TrainConfig
    from detrkit.run import train

    paths = make_synthetic(tmp_path / "data", num_train=8, num_val=4, image_size=64)
    data = DataConfig(**{k: str(v) for k, v in paths.items()}, image_size=64, workers=0, augment="flip")
    option = dict(option)
    model_cfg = preset("detr_r18_tiny", dropout=0.0, arch=option.pop("arch", "detr"))
    run = train(model_cfg, LossConfig(**option), data,
                TrainConfig(model="detr_r18_tiny", epochs=1, batch_size=4, out=str(tmp_path / "run"), lr=1e-3))
    loaded = load_model(run / "last")
    plain = build_model(dataclasses.replace(loaded.config))
    assert list(loaded.state_dict()) == list(plain.state_dict())
    state = torch.load(run / "last" / "train_state.pt", weights_only=True)
    assert state["aids"] and all(not k.startswith("model.") for k in state["aids"])  # kept for resuming only
    # The run evaluated its in-memory model after the epoch: the loaded checkpoint gives the same detections.
    from detrkit.engine import evaluate_model

    _, detections = evaluate_model(loaded, {"val_json": str(paths["val_json"]), "val_images": str(paths["val_images"]),
                                            "workers": 0}, device="cpu")
    before = json.loads((run / "detections.json").read_text())
    assert len(detections) == len(before) > 0
    for a, b in zip(detections, before):
        assert a["category_id"] == b["category_id"] and a["image_id"] == b["image_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6) and a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)
