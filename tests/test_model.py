"""Model contracts on every preset family: shapes, masks, gradients, positional encoding."""
import math

import pytest
import torch
from conftest import TINY_TRANSFORMER, make_targets

from detrkit import build_criterion, build_model, preset
from detrkit.config import LossConfig, ModelConfig, TrainConfig
from detrkit.engine import make_optimizer
from detrkit.model.position import PositionEmbeddingLearned, PositionEmbeddingSine

TINY = dict(TINY_TRANSFORMER, num_queries=7, num_classes=3)  # the backbone is each test's


@pytest.mark.parametrize("overrides", [
    dict(backbone="resnet18"),
    dict(backbone="resnet18", backbone_stages=3),
    dict(backbone="resnet50", dilation=True),
    dict(backbone="resnet18", pre_norm=True, position_embedding="learned"),
])
def test_output_contract_and_every_parameter_gets_a_gradient(overrides):
    torch.manual_seed(0)
    config = ModelConfig(**{**TINY, **overrides, "frozen_stages": 0})
    model = build_model(config)
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 48)]
    out = model(images)
    assert out["pred_logits"].shape == (2, 7, 4)
    assert out["pred_boxes"].shape == (2, 7, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == config.dec_layers - 1
    for a in out["aux_outputs"]:
        assert a["pred_logits"].shape == (2, 7, 4) and a["pred_boxes"].shape == (2, 7, 4)
    criterion = build_criterion(3, LossConfig(), num_aux=config.dec_layers - 1)
    losses = criterion(out, make_targets())
    assert all(torch.isfinite(v).all() for v in losses.values())
    losses["loss"].backward()
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)}
    # The slots start at zero, so the first decoder layer's self-attention sees identical
    # all-zero inputs: its projections (and, while the biases are still 0, the LayerNorm
    # after it) get no gradient, in the official DETR as here. Everything else must learn.
    first_self_attn = {"transformer.decoder.layers.0.self_attn.in_proj_weight",
                       "transformer.decoder.layers.0.self_attn.out_proj.weight",
                       "transformer.decoder.layers.0.norm1.weight"}
    if config.pre_norm:  # there the constant slot reaches the cross-attention's LayerNorm too
        first_self_attn.add("transformer.decoder.layers.0.norm2.weight")
    assert no_grad <= first_self_attn, no_grad - first_self_attn
    assert "transformer.decoder.layers.0.self_attn.in_proj_weight" in no_grad  # the test can fail


def test_backbone_freezing_follows_the_official_rule():
    model = build_model(ModelConfig(**TINY, backbone="resnet18"))  # frozen_stages=1 default
    trainable = {n.split(".")[1] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    frozen = build_model(ModelConfig(**TINY, backbone="resnet18"), train_backbone=False)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    # The rest of the model always trains.
    assert all(p.requires_grad for n, p in frozen.named_parameters() if not n.startswith("backbone."))


def test_padded_cells_are_never_attended_to():
    """Whatever the features in padded cells hold, the transformer's outputs are the same.

    (The CNN itself does see the zero padding near an image's border, in the official
    DETR as here, so the test holds the features fixed and varies only the padded ones.)
    """
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, backbone="resnet18", dropout=0.0)).eval()
    src = torch.randn(2, 32, 4, 5)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool)
    mask[0, 3:, :] = True
    mask[0, :, 4:] = True
    pos = model.position(mask)
    noisy = src.clone()
    noisy[mask[:, None].expand_as(src)] = 100.0
    with torch.no_grad():
        hs, memory = model.transformer(src, mask, model.query_embed.weight, pos)
        hs2, memory2 = model.transformer(noisy, mask, model.query_embed.weight, pos)
    torch.testing.assert_close(hs, hs2, atol=1e-5, rtol=0)
    valid = ~mask.flatten(1)
    torch.testing.assert_close(memory[valid], memory2[valid], atol=1e-5, rtol=0)


def test_sine_encoding_values():
    """Channel layout: y first, then x; sin/cos interleaved; positions normalised to (0, 2*pi]."""
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, :, 2] = True  # the last column is padding
    pos = PositionEmbeddingSine(4)(mask)  # (1, 8, 2, 3)
    assert pos.shape == (1, 8, 2, 3)
    eps = 1e-6
    y = torch.tensor([1.0, 2.0]) / (2 + eps) * 2 * math.pi
    x = torch.tensor([1.0, 2.0]) / (2 + eps) * 2 * math.pi
    dim_t = 10000 ** (torch.tensor([0, 0, 2, 2]) / 4)
    # y channels 0..3 at column 0: sin(y/d0), cos(y/d1), sin(y/d2), cos(y/d3)
    expected_y = torch.stack([(y / dim_t[0]).sin(), (y / dim_t[1]).cos(), (y / dim_t[2]).sin(), (y / dim_t[3]).cos()])
    torch.testing.assert_close(pos[0, :4, :, 0], expected_y)
    expected_x = torch.stack([(x / dim_t[0]).sin(), (x / dim_t[1]).cos(), (x / dim_t[2]).sin(), (x / dim_t[3]).cos()])
    torch.testing.assert_close(pos[0, 4:, 0, :2], expected_x)


def test_learned_encoding_shape_and_size_limit():
    enc = PositionEmbeddingLearned(8)
    assert enc(torch.zeros(2, 5, 7, dtype=torch.bool)).shape == (2, 16, 5, 7)
    with pytest.raises(ValueError, match="larger than the learned position table"):
        enc(torch.zeros(1, 51, 3, dtype=torch.bool))


def test_presets():
    cfg = preset("detr_r50")
    assert (cfg.d_model, cfg.nheads, cfg.enc_layers, cfg.dec_layers, cfg.dim_feedforward, cfg.dropout,
            cfg.num_queries) == (256, 8, 6, 6, 2048, 0.1, 100)
    assert preset("detr_r101_dc5").dilation and preset("detr_r101_dc5").backbone == "resnet101"
    model = build_model(preset("detr_r50"))
    # The published DETR-R50 has 41.3M parameters with its 92-way head.
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(41.5e6, rel=0.01)
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("detr_r999")
    with pytest.raises(ValueError, match="bottleneck"):
        ModelConfig(backbone="resnet18", dilation=True)


def test_input_validation():
    model = build_model(ModelConfig(**TINY, backbone="resnet18"))
    with pytest.raises(ValueError, match="3 x H x W"):
        model([torch.randn(1, 32, 32)])
    with pytest.raises(ValueError, match="padding mask"):
        model((torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32)))


def test_bf16_precision_runs_and_returns_float32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, backbone="resnet18")).eval()
    images = [torch.randn(3, 64, 64)]
    with torch.no_grad():
        ref = model(images)
        model.precision = "bf16"
        fast = model(images)
    assert fast["pred_logits"].dtype == torch.float32
    assert (fast["pred_boxes"] - ref["pred_boxes"]).abs().max() < 0.05


def test_imagenet_weights_from_a_local_file(tmp_path):
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    model = build_model(ModelConfig(**TINY, backbone="resnet18"), backbone_weights=tmp_path / "resnet18.pth")
    torch.testing.assert_close(model.backbone.body.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    torch.testing.assert_close(model.backbone.body.bn1.running_var, resnet.bn1.running_var)
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="resnet34.pth"):
        build_model(ModelConfig(**TINY, backbone="resnet18"), backbone_weights=tmp_path / "resnet34.pth")


def _random_statistics(module: torch.nn.Module, gen: torch.Generator) -> None:
    """BatchNorm statistics and affine terms far from the identity, so folding is really tested."""
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "running_var"):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))


@pytest.mark.parametrize("overrides", [
    dict(backbone="resnet50"),  # bottleneck blocks, frozen BN
    dict(backbone="resnet50", dilation=True),
    dict(backbone="resnet18", backbone_norm="batch", backbone_stages=3),  # trainable BN, in eval mode
])
def test_folded_batchnorm_equals_the_torchvision_modules(overrides):
    """Eval forward (BatchNorm folded into the convolutions) == the unfolded torchvision trunk,
    and the state_dict is untouched by it."""
    from detrkit.model.backbone import Backbone

    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, **overrides})
    backbone = Backbone(cfg.backbone, dilation=cfg.dilation, stages=cfg.backbone_stages, norm=cfg.backbone_norm)
    _random_statistics(backbone, torch.Generator().manual_seed(1))
    backbone.eval()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(2, 3, 96, 64)
    mask = torch.zeros(2, 96, 64, dtype=torch.bool)
    with torch.inference_mode():
        ref = backbone.body(x)
        features, _ = backbone(x, mask)
    assert len(backbone._fold_cache) > 0  # the folded path really ran
    # Random deep ResNets reach |x| ~ 1e3: compare relative to the scale (float32 rounding).
    scale = float(ref.abs().max())
    torch.testing.assert_close(features, ref, atol=1e-5 * scale, rtol=0)
    after = backbone.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    # A changed statistic (here in place, as load_state_dict does) reaches the next forward.
    with torch.no_grad():
        backbone.body.bn1.running_var.mul_(4)
        ref = backbone.body(x)
        features, _ = backbone(x, mask)
    torch.testing.assert_close(features, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    # A forward that records gradients after an inference_mode one (cached folded weights).
    x.requires_grad_(True)
    features, _ = backbone(x, mask)
    features.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _evaluations_between_training_steps(model, evaluated, update=lambda: None) -> tuple[dict, dict]:
    """Two rounds of (evaluate ``evaluated()``, one fused AdamW step of ``model``, ``update()``), as
    ``detrkit train`` runs them; then ``evaluated()``'s outputs and those of a fresh model given its
    weights. The folded BatchNorm weights cached by one evaluation must not serve the next."""
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3, lr_backbone=1e-3))  # fused, as detrkit train's
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    for _ in range(2):
        with torch.inference_mode():
            evaluated()(images)  # fills the caches
        out = model.train()(images)
        (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        update()
    fresh = build_model(model.config)
    fresh.load_state_dict(evaluated().state_dict())
    with torch.inference_mode():
        return evaluated()(images), fresh.eval()(images)


@pytest.mark.parametrize("name", ["rtdetr_tiny", "detr_r18_tiny"])
def test_evaluation_between_training_steps_sees_the_new_weights(name):
    """The fused AdamW step and BatchNorm's running statistics change tensors without bumping
    their version counters, so the cache's key alone misses them: the switch to eval mode must."""
    torch.manual_seed(0)
    model = build_model(preset(name, num_classes=3, backbone_norm="batch"))
    ours, ref = _evaluations_between_training_steps(model, model.eval)
    torch.testing.assert_close(ours["pred_logits"], ref["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pred_boxes"], ref["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_the_ema_model_evaluates_with_its_current_average():
    """The EMA copy never leaves eval mode, so its folded weights stay cached across updates; its
    update must reach them (``_foreach_lerp_`` and ``copy_`` bump the version counters)."""
    from detrkit.ema import ModelEMA

    torch.manual_seed(0)
    model = build_model(preset("rtdetr_tiny", num_classes=3))
    ema = ModelEMA(model, decay=0.9, warmup=0)
    ours, ref = _evaluations_between_training_steps(model, lambda: ema.module, lambda: ema.update(model))
    torch.testing.assert_close(ours["pred_logits"], ref["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pred_boxes"], ref["pred_boxes"], atol=1e-5, rtol=1e-5)


def test_folded_frozen_batchnorm_trains_like_the_modules():
    """Training with frozen BN folded: the same loss and the same gradient for every weight."""
    from detrkit.model.backbone import Backbone

    torch.manual_seed(0)
    backbone = Backbone("resnet18", frozen_stages=1)
    _random_statistics(backbone, torch.Generator().manual_seed(2))
    backbone.train()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    backbone(x, mask)[0].square().mean().backward()
    folded = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}
    backbone.zero_grad()
    backbone.body(x).square().mean().backward()
    assert folded.keys() == {n for n, p in backbone.named_parameters() if p.requires_grad} and folded
    for n, p in backbone.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(folded[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    # The stem and layer1 do not learn: their folded weights are cached; layer2-4 are not.
    cached = {c for c in backbone._fold_cache}
    assert backbone.body.conv1 in cached and backbone.body.layer2[0].conv1 not in cached


def test_bf16_autocast_keeps_convolution_outputs_in_bf16():
    """Frozen BN with float32 statistics would turn every convolution output back into float32."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, backbone="resnet18")).eval()
    seen = []
    hook = model.input_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model.precision = "bf16"  # the forward runs under bfloat16 autocast
    with torch.inference_mode():
        model([torch.randn(3, 64, 64)])
    hook.remove()
    assert seen == [torch.bfloat16]
    weights = [w for key, w, b in model.backbone._fold_cache.values()]
    assert weights and all(w.dtype == torch.bfloat16 for w in weights)  # cast once, not on every call


def test_detr_outputs_with_and_without_the_backbone_speed_switches():
    """Folding BatchNorm and channels-last change the outputs by float32 rounding only (< 1e-4)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, backbone="resnet50")).eval()
    _random_statistics(model.backbone, torch.Generator().manual_seed(3))
    images = [torch.randn(3, 96, 128), torch.randn(3, 64, 100)]
    with torch.inference_mode():
        fast = model(images)
        model.backbone.fold = model.backbone.channels_last = False
        plain = model(images)
    torch.testing.assert_close(fast["pred_logits"], plain["pred_logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(fast["pred_boxes"], plain["pred_boxes"], atol=1e-4, rtol=0)


def test_a_caller_s_autocast_reaches_the_network():
    """bf16 training wraps the model call in autocast; the model must not switch it off."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, backbone="resnet18"))
    seen = []
    model.input_proj.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model([torch.randn(3, 64, 64)])
    model([torch.randn(3, 64, 64)])
    assert seen == [torch.bfloat16, torch.float32]
