"""The fast-convergence architecture: encoder-selected queries, refined boxes, sigmoid classes."""
import dataclasses
import math

import pytest
import torch
from conftest import make_targets, tiny_config

from detrkit import build_criterion, build_model, load_model, postprocess, preset, save_model
from detrkit.config import LossConfig, ModelConfig
from detrkit.model.heads import ExtraQueries
from detrkit.model.position import box_sine_embedding
from detrkit.model.transformer import MultiheadAttention
from detrkit.model.two_stage import ConditionalAttention, TwoStageDETR, inverse_sigmoid

CFG = tiny_config(num_queries=6, num_classes=3, arch="two_stage")
TARGETS = make_targets()


def _images():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(3, 96, 128, generator=gen), torch.randn(3, 128, 64, generator=gen)]


def test_outputs_and_losses():
    torch.manual_seed(0)
    model = build_model(CFG)
    assert isinstance(model, TwoStageDETR) and model.sigmoid_class
    out = model(_images())
    assert out["pred_logits"].shape == (2, 6, 3)  # sigmoid logits: no "no object" column
    assert out["pred_boxes"].shape == (2, 6, 4) and ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == 1
    enc = out["enc_outputs"]
    assert enc["pred_logits"].shape[:2] == enc["pred_boxes"].shape[:2] == (2, 8 * 8)
    # Padding tokens (image 2 is 64 wide: columns 4..7 of the 8x8 map) are never proposed.
    padded = enc["pred_logits"][1].view(8, 8, 3)[:, 4:]
    assert (padded <= -1e3).all()
    losses = build_criterion(3, LossConfig(), num_aux=1, sigmoid_class=True)(out, TARGETS)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_ce_enc", "loss_giou_enc"):
        assert torch.isfinite(losses[key]), key
    assert "loss_ce_enc" in losses and torch.isfinite(losses["loss"])


@pytest.mark.parametrize("conditional", [False, True])
def test_every_parameter_learns_after_one_step(conditional):
    """The box heads start at a zero correction (their inner layers get gradient from step 2)."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, conditional_attention=conditional))
    crit = build_criterion(3, LossConfig(), num_aux=1, sigmoid_class=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        crit(model(_images()), TARGETS)["loss"].backward()
        opt.step()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert no_grad == set()


def test_an_input_with_fewer_tokens_than_queries_takes_extra_queries():
    """A 64 x 64 input has 4 x 4 tokens, fewer than 100 queries: every token becomes a query, and the
    training-only queries' mask, made for the model's 100, is cut to them: the outputs are those of
    the same weights with 16 queries."""
    torch.manual_seed(0)
    models = [build_model(dataclasses.replace(CFG, num_queries=q)).eval() for q in (100, 16)]
    models[1].load_state_dict(models[0].state_dict())
    gen = torch.Generator().manual_seed(0)
    images, content = [torch.randn(3, 64, 64, generator=gen)], torch.randn(1, 3, 32, generator=gen)
    boxes = torch.rand(1, 3, 4, generator=gen) * 0.5 + 0.2
    outs = []
    for model in models:
        q = model.num_queries
        mask = torch.zeros(q + 3, q + 3, dtype=torch.bool)
        mask[:q, q:] = True
        with torch.no_grad():
            outs.append(model(images, ExtraQueries(content, mask, boxes=boxes)))
    assert outs[0]["pred_logits"].shape == (1, 16, 3) and outs[0]["extra_outputs"]["pred_logits"].shape == (1, 3, 3)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outs[0][key], outs[1][key])
        torch.testing.assert_close(outs[0]["extra_outputs"][key], outs[1]["extra_outputs"][key])


def test_box_refinement_starts_at_the_reference():
    """Zero-initialised correction heads: every layer returns its reference box unchanged."""
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    with torch.no_grad():
        out = model(_images())
    torch.testing.assert_close(out["aux_outputs"][0]["pred_boxes"], out["pred_boxes"])
    boxes = torch.rand(5, 4) * 0.8 + 0.1
    torch.testing.assert_close(inverse_sigmoid(boxes).sigmoid(), boxes)
    assert box_sine_embedding(boxes[None], 32).shape == (1, 5, 64)


@pytest.mark.parametrize("conditional", [False, True])
def test_save_load_round_trip(tmp_path, conditional):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, conditional_attention=conditional)).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, TwoStageDETR)
    with torch.no_grad():
        a, b = model(_images()), loaded(_images())
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])


def test_sigmoid_postprocess_keeps_best_query_class_pairs():
    logits = torch.tensor([[[4.0, 3.0], [-5.0, -5.0], [0.0, 5.0]]])  # query 0 is confident in both classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.3, 0.3, 0.2, 0.2]]])
    res = postprocess({"pred_logits": logits, "pred_boxes": boxes}, [[100, 100]], sigmoid_class=True, top_k=3,
                      index_to_category=[10, 20])[0]
    assert res["labels"].tolist() == [20, 10, 20]
    torch.testing.assert_close(res["scores"], torch.sigmoid(torch.tensor([5.0, 4.0, 3.0])))
    torch.testing.assert_close(res["boxes"][1], res["boxes"][2])  # both from query 0


def test_focal_matching_is_optimal():
    import itertools

    from detrkit import HungarianMatcher

    gen = torch.Generator().manual_seed(1)
    out = {"pred_logits": torch.randn(1, 5, 3, generator=gen), "pred_boxes": torch.rand(1, 5, 4, generator=gen) * 0.5 + 0.1}
    tgt = [{"labels": torch.tensor([0, 2, 1]), "boxes": torch.rand(3, 4, generator=gen) * 0.4 + 0.1}]
    m = HungarianMatcher(2, 5, 2, sigmoid_class=True)
    (rows, cols), = m(out, tgt)
    cost = m.cost_matrix(out["pred_logits"][0], out["pred_boxes"][0], tgt[0]["labels"], tgt[0]["boxes"])
    best = min(sum(float(cost[q, t]) for t, q in enumerate(p)) for p in itertools.permutations(range(5), 3))
    assert float(cost[rows, cols].sum()) == pytest.approx(best, abs=1e-5)


def test_fast_preset_is_two_stage():
    assert preset("detr_r18_fast").arch == "two_stage" and preset("detr_r50").arch == "detr"


def test_encoder_one_to_many_matching_trains_more_proposals():
    """encoder_repeats=K matches each target to K encoder tokens; the decoder stays one-to-one."""
    torch.manual_seed(0)
    model = build_model(CFG)
    out = model(_images())
    one = build_criterion(3, LossConfig(), num_aux=1, sigmoid_class=True)
    many = build_criterion(3, LossConfig(encoder_repeats=3), num_aux=1, sigmoid_class=True)
    a, b = one(out, TARGETS), many(out, TARGETS)
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"):  # decoder losses unchanged
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["loss_ce_enc"], b["loss_ce_enc"])
    repeated = [{"labels": t["labels"].repeat(3), "boxes": t["boxes"].repeat(3, 1)} for t in TARGETS]
    matches = many.matcher(out["enc_outputs"], repeated)
    assert [len(r) for r, _ in matches] == [6, 3]
    assert all(len(set(r.tolist())) == len(r) for r, _ in matches)  # distinct tokens


def test_conditional_cross_attention_is_content_plus_spatial_match():
    """Conditional DETR: per head, softmax((q_c.k_c + q_s.k_s) / sqrt(2 d_h)) over content values."""
    torch.manual_seed(0)
    attn = ConditionalAttention(8, nheads=2)
    b, lq, lk, h, dh = 2, 3, 5, 2, 4
    query, key, qs, ks = (torch.randn(b, n, 8) for n in (lq, lk, lq, lk))
    out = attn(query, key, key, None, query_spatial=qs, key_spatial=ks)
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)

    def heads(x):  # (B, L, 8) -> (B, h, L, d_h)
        return x.view(b, -1, h, dh).transpose(1, 2)

    qc, kc, v = heads(query @ w_q.T + b_q), heads(key @ w_k.T + b_k), heads(key @ w_v.T + b_v)
    scores = (qc @ kc.transpose(-1, -2) + heads(qs) @ heads(ks).transpose(-1, -2)) / math.sqrt(2 * dh)
    expected = attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, 8))
    torch.testing.assert_close(out, expected)
    # Without the spatial parts it is the plain attention: the spatial match changes the result.
    plain = MultiheadAttention(8, nheads=2)
    plain.load_state_dict(attn.state_dict())  # the same parameters
    assert not torch.allclose(plain(query, key, key), out)


def test_conditional_attention_needs_reference_boxes():
    with pytest.raises(ValueError, match="two-stage"):
        ModelConfig(conditional_attention=True)
