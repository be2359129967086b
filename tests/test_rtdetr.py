"""RT-DETR v1/v2: parity with Hugging Face transformers, and the invariants of its parts.

Hugging Face models are built with random weights from their config classes (no download),
saved with ``save_pretrained`` and read back by :func:`detrkit.load_model`. Hugging Face takes
pixels in [0, 1] and we take them ImageNet-normalised (the model undoes it), so our side gets
the normalised copy of the same pixels. Their random
initialisation makes every feature map nearly constant (BatchNorm weights ~ N(0, 0.01)), so
that the query selection would pick among near-ties; the weights are therefore redrawn at a
variance-preserving scale first, so that the comparison means something.

Eval mode is compared in float32, as it runs. Where float32 rounding alone would make two
correct implementations differ by more than the tolerance, both run in float64 instead (and then
agree to ~1e-11): training mode, whose BatchNorm divides by the statistics of a small batch and
amplifies rounding differences of 1e-6 to 1e-3 through a random network, and discrete sampling,
where a location within rounding noise of a cell boundary may pick either cell.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import rtdetr_canvas as _canvas, rtdetr_images as _images, to_pixel_input as _norm
from detrkit.checkpoint import load_model
from detrkit.data.transforms import inference_transforms, prepare_image
from detrkit.errors import CheckpointError
from detrkit.export import sample_batch, check_onnx, export_onnx
from detrkit.model.backbone import ConvNorm
from detrkit.model.build import build_model, count_flops
from detrkit.model.deformable import MSDeformableAttention, capture_sampling
from detrkit.model.heads import ExtraQueries
from detrkit.model.hybrid_encoder import RepVggBlock
from detrkit.presets import preset

transformers = pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture(scope="module")
def r18(hf_rtdetr_pairs):
    return hf_rtdetr_pairs("r18")


def _scale(images, canvas=160):
    """Canvas-relative -> image-relative box factors, (B, 1, 4)."""
    return torch.tensor([[[canvas / im.shape[2], canvas / im.shape[1]] * 2] for im in images])


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (ours - ref).abs().max().item()
    assert err < TOL, f"{what}: max difference {err:.2e}"


def _assert_matches(out: dict, ref, scale=1.0, skip: int = 0) -> None:
    """Our outputs against Hugging Face's: last layer, every earlier layer, encoder proposals.
    ``skip``: Hugging Face's leading denoising queries, not part of the model's own outputs."""
    _assert_close(out["pred_logits"], ref.logits[:, skip:], "logits")
    _assert_close(out["pred_boxes"], ref.pred_boxes[:, skip:] * scale, "boxes")
    layers = ref.intermediate_logits.shape[1]
    assert len(out["aux_outputs"]) == layers - 1
    for i, aux in enumerate(out["aux_outputs"]):
        _assert_close(aux["pred_logits"], ref.intermediate_logits[:, i, skip:], f"layer {i} logits")
        _assert_close(aux["pred_boxes"], ref.intermediate_reference_points[:, i, skip:] * scale, f"layer {i} boxes")
    _assert_close(out["enc_outputs"]["pred_logits"], ref.enc_topk_logits, "encoder proposal logits")
    _assert_close(out["enc_outputs"]["pred_boxes"], ref.enc_topk_bboxes * scale, "encoder proposal boxes")


@pytest.mark.parametrize("kind", ["r18", "r50", "v2"])
def test_outputs_equal_hugging_face(hf_rtdetr_pairs, kind):
    hf, ours, read = hf_rtdetr_pairs(kind)
    assert read.config.backbone == {"r18": "resnet18vd", "r50": "resnet50vd", "v2": "resnet18vd"}[kind]
    assert ours.inference == {"image_size": 640, "max_size": None, "resize": "square"}  # RT-DETR's evaluation size
    images = _images()
    x = _canvas(images)
    with torch.no_grad():
        # Hugging Face takes a pixel mask and ignores it: the network sees the canvas as it is.
        ref = hf(pixel_values=x, pixel_mask=torch.ones(2, 160, 160, dtype=torch.long))
        on_canvas = ours(_norm(x))  # a batch tensor: boxes relative to the canvas, as Hugging Face's
        per_image = ours([_norm(im) for im in images])  # padded by us: boxes relative to each image
    _assert_matches(on_canvas, ref)
    _assert_matches(per_image, ref, scale=_scale(images))


def test_predict_sizes_images_as_hugging_faces_image_processor(r18):
    """RT-DETR's processor: 640 x 640 bilinear, pixels in [0, 1] (no normalisation). Ours: the same
    square resize from the model's inference record, normalised (which the model then undoes)."""
    import numpy as np
    from PIL import Image
    from transformers import RTDetrImageProcessor

    rng = np.random.default_rng(0)
    for h, w in ((480, 853), (320, 400)):  # shrunk and enlarged
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = RTDetrImageProcessor()(images=image, return_tensors="pt")["pixel_values"]  # (1, 3, 640, 640)
        x, size = prepare_image(image, inference_transforms(r18[1].inference))
        assert size == (h, w) and x.shape == (3, 640, 640)
        torch.testing.assert_close(_norm(ref[0]), x, atol=1e-5, rtol=0)


def _float64(*models):
    return [copy.deepcopy(m).double() for m in models]


def test_v2_discrete_sampling_equals_hugging_face(hf_rtdetr_pairs):
    """Discrete sampling rounds each location to a cell (float64, see the module docstring). The
    test checks that no location lies within rounding noise of a cell boundary, where either cell
    would be right (the input would be inconclusive, not the model wrong)."""
    hf, ours = _float64(*hf_rtdetr_pairs("v2_discrete")[:2])
    x = _canvas(_images()).double()
    with torch.no_grad(), capture_sampling(ours) as records:
        ref = hf(pixel_values=x)
        out = ours(_norm(x))
    for name, calls in records.items():
        locations, shapes, counts = calls[0]["locations"], calls[0]["shapes"], calls[0]["num_points"]
        start = 0
        for (h, w), n in zip(shapes, counts):
            cells = locations[..., start:start + n, :] * torch.tensor([w, h]) + 0.5
            margin = (cells - cells.round()).abs().min().item()
            assert margin > 1e-6, f"{name}: a sampling location lies on a cell boundary; choose another input"
            start += n
    _assert_matches(out, ref)


def _hf_targets(dtype=torch.float32):
    boxes = [[[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.9, 0.8]], [[0.4, 0.5, 0.4, 0.6]]]
    return [{"class_labels": torch.tensor(labels), "boxes": torch.tensor(b, dtype=dtype)}
            for labels, b in zip([[1, 4, 6], [2]], boxes)]


def test_denoising_queries_equal_hugging_face(r18, monkeypatch):
    """Training mode (BatchNorm on batch statistics; float64, see the module docstring) with
    Hugging Face's denoising queries passed in: the model's own outputs and the denoising
    queries' are both Hugging Face's."""
    from transformers.models.rt_detr import modeling_rt_detr

    read = r18[2]
    hf, ours = _float64(*r18[:2])
    made = {}
    original = modeling_rt_detr.get_contrastive_denoising_training_group

    def record(*args, **kwargs):
        content, boxes_logit, float_mask, meta = original(*args, **kwargs)
        # Hugging Face makes its additive mask float32 whatever the model's dtype, and PyTorch's
        # CPU scaled_dot_product_attention misreads a float32 mask beside float64 queries (the
        # masked queries are not masked): give the float64 run a float64 mask.
        made["queries"] = (content, boxes_logit, float_mask.to(content.dtype), meta)
        return made["queries"]

    monkeypatch.setattr(modeling_rt_detr, "get_contrastive_denoising_training_group", record)
    x = _canvas(_images()).double()
    hf.train()
    ours.train()
    torch.manual_seed(3)
    with torch.no_grad():
        ref = hf(pixel_values=x, labels=_hf_targets(torch.float64))
    content, boxes_logit, float_mask, meta = made["queries"]
    e, q = meta["dn_num_split"]
    # Hugging Face puts the denoising queries first, we put them after the model's own Q.
    order = torch.cat([torch.arange(e, e + q), torch.arange(e)])
    blocked = torch.isinf(float_mask)[order][:, order]
    extra = ExtraQueries(content, blocked, boxes=boxes_logit.sigmoid())
    with torch.no_grad():
        out = ours(_norm(x), extra)
    assert e > 0 and out["extra_outputs"]["pred_logits"].shape[1] == e
    _assert_matches(out, ref, skip=e)
    dn = out["extra_outputs"]
    _assert_close(dn["pred_logits"], ref.logits[:, :e], "denoising logits")
    _assert_close(dn["pred_boxes"], ref.pred_boxes[:, :e], "denoising boxes")
    for i, aux in enumerate(dn["aux_outputs"]):
        _assert_close(aux["pred_logits"], ref.intermediate_logits[:, i, :e], f"denoising layer {i} logits")
        _assert_close(aux["pred_boxes"], ref.intermediate_reference_points[:, i, :e], f"denoising layer {i} boxes")
    # The label table for the training-only denoising aid comes with the converted weights (less
    # Hugging Face's padding row, which our padding queries do without).
    torch.testing.assert_close(read.aids["denoising.label_embed.weight"],
                               r18[0].model.denoising_class_embed.weight.detach()[:7])


def test_extra_queries_leave_the_model_outputs_unchanged(r18):
    _, ours, _ = r18
    images = _images()
    gen = torch.Generator().manual_seed(4)
    q, e = ours.num_queries, 6
    mask = torch.zeros(q + e, q + e, dtype=torch.bool)
    mask[:q, q:] = True  # the model's own queries do not see the extra ones
    boxes = torch.rand(2, e, 4, generator=gen) * 0.5 + 0.2
    extra = ExtraQueries(torch.randn(2, e, 256, generator=gen), mask, boxes=boxes)
    with torch.no_grad():
        plain = ours(images)
        aided = ours(images, extra)
    for key in ("pred_logits", "pred_boxes"):
        _assert_close(aided[key], plain[key], key)
    _assert_close(aided["enc_outputs"]["pred_boxes"], plain["enc_outputs"]["pred_boxes"], "encoder boxes")
    assert aided["extra_outputs"]["pred_boxes"].shape == (2, e, 4)


# --- Invariants of our own model ------------------------------------------------------------------------------
SMALL = dict(num_classes=3, num_points=(2, 3, 1), offset_scale=0.6)  # the tiny preset with v2's options


def _small(**overrides):
    return build_model(preset("rtdetr_tiny", **SMALL, **overrides))


@pytest.mark.parametrize("hybrid, method", [(0, "default"), (4, "default"), (0, "discrete")])
def test_every_parameter_gets_a_gradient(hybrid, method):
    torch.manual_seed(0)
    model = _small(sampling_method=method).train()
    with torch.no_grad():  # box heads start at zero, which blocks the gradient of their first layers
        for mlp in [model.decoder.enc_bbox, *model.decoder.bbox_embed]:
            mlp.layers[-1].weight.normal_(0, 0.01)
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 96, generator=gen), torch.randn(3, 96, 64, generator=gen)]
    mask = torch.zeros(10 + 4, 10 + 4, dtype=torch.bool)
    mask[:10, 10:] = True
    boxes = torch.rand(2, 4, 4, generator=gen) * 0.5 + 0.2
    extra = ExtraQueries(torch.randn(2, 4, 32, generator=gen), mask, boxes=boxes, hybrid=hybrid)
    out = model(images, extra)
    parts = [out, out["enc_outputs"], out["extra_outputs"], *out["aux_outputs"], *out["extra_outputs"]["aux_outputs"]]
    if hybrid:
        parts.append(out["hybrid_outputs"])
        assert out["hybrid_outputs"]["pred_logits"].shape == (2, hybrid, 3)
    loss = sum(p["pred_logits"].sum() + p["pred_boxes"].sum() for p in parts)
    assert torch.isfinite(loss)
    loss.backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    # Discrete sampling rounds the locations: its offsets are frozen (RT-DETRv2's release).
    assert all(".cross_attn.sampling_offsets." in n for n in frozen) and bool(frozen) == (method == "discrete")
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)]
    assert not missing, f"no (finite, non-zero) gradient for {missing}"


def test_an_input_with_fewer_cells_than_queries_takes_extra_queries():
    """A 64 x 64 input has 64 + 16 + 4 = 84 cells, fewer than 100 queries: every cell becomes a query,
    and the training-only queries' mask, made for the model's 100, is cut to them: the outputs are
    those of the same weights with 84 queries."""
    torch.manual_seed(0)
    models = [_small(num_queries=100).train(), _small(num_queries=84).train()]
    models[1].load_state_dict(models[0].state_dict())
    gen = torch.Generator().manual_seed(0)
    images, content, boxes = [torch.randn(3, 64, 64, generator=gen)], torch.randn(1, 4, 32), torch.rand(1, 4, 4)
    outs = []
    for model in models:
        q = model.num_queries
        mask = torch.zeros(q + 4, q + 4, dtype=torch.bool)
        mask[:q, q:] = True
        with torch.no_grad():
            outs.append(model(images, ExtraQueries(content, mask, boxes=boxes * 0.5 + 0.2)))
    assert outs[0]["pred_logits"].shape == (1, 84, 3) and outs[0]["extra_outputs"]["pred_logits"].shape == (1, 4, 3)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(outs[0][key], outs[1][key])
        torch.testing.assert_close(outs[0]["extra_outputs"][key], outs[1]["extra_outputs"][key])


def test_boxes_are_relative_to_each_image():
    """A padded image gets the boxes the same canvas gives, re-expressed in its own size."""
    torch.manual_seed(0)
    model = _small().eval()
    image = torch.randn(3, 64, 96)
    canvas = _norm(torch.zeros(1, 3, 96, 96))  # padding is black: 0 in [0, 1]
    canvas[0, :, :64] = image
    with torch.no_grad():
        padded = model([image, torch.zeros(3, 96, 96)])  # pads the first image to 96 x 96
        direct = model(canvas)
    expected = direct["pred_boxes"][0] * torch.tensor([1.0, 96 / 64, 1.0, 96 / 64])
    _assert_close(padded["pred_boxes"][0], expected, "boxes")
    _assert_close(padded["pred_logits"][0], direct["pred_logits"][0], "logits")
    # A size off the stride is padded to the next multiple of 32: boxes stay relative to it.
    with torch.no_grad():
        odd = model(torch.randn(1, 3, 70, 90))
    assert odd["pred_boxes"].shape == (1, 10, 4) and torch.isfinite(odd["pred_boxes"]).all()


def test_parameters_are_hugging_faces_but_the_denoising_label_table(r18):
    hf, ours, _ = r18
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(hf) - count(ours) == (7 + 1) * 256  # HF's denoising_class_embed: (K + 1) x d_model
    # The paper's sizes (RT-DETR, Table 2: 20, 31, 42 and 76 M parameters with 80 classes; whole millions).
    with torch.device("meta"):
        counts = [count(build_model(preset(f"rtdetr_r{d}"))) / 1e6 for d in (18, 34, 50, 101)]
    assert [int(c) for c in counts] == [20, 31, 42, 76]


def test_slim_trunks_are_config_knobs_and_cost_fewer_flops():
    """A narrower ResNet-vd, fewer blocks, two feature levels: the same classes, fewer FLOPs."""
    slim = preset("rtdetr_r18", backbone_width=0.5, backbone_depths=(1, 1, 1, 1), feature_levels=2,
                  encode_levels=(1,), num_points=(4, 4))
    model = build_model(slim).eval()
    assert [c.conv.out_channels for c in model.backbone.stem] == [16, 16, 32]
    assert model.backbone.num_channels == [64, 128, 256] and len(model.backbone.layer3) == 1
    assert len(model.encoder.input_proj) == len(model.decoder.input_proj) == 2
    with torch.no_grad(), capture_sampling(model) as records:
        out = model([torch.randn(3, 96, 128)])
    assert out["pred_boxes"].shape == (1, 3 * 4 + 6 * 8, 4)  # every cell of strides 16 and 32 is a query
    assert records["decoder.layers.0.cross_attn"][0]["shapes"] == [(6, 8), (3, 4)]
    flops = {name: count_flops(cfg) / 1e9 for name, cfg in (("r18", preset("rtdetr_r18")), ("slim", slim))}
    assert 55 < flops["r18"] < 60  # the paper: 60 GFLOPs, all operations counted
    assert flops["slim"] < 0.4 * flops["r18"]
    with pytest.raises(ValueError, match="one count >= 1 for each of the 2 feature levels"):
        preset("rtdetr_r18", feature_levels=2, encode_levels=(1,))


def test_the_cpu_sized_preset_costs_what_yolo11n_costs():
    """rtdetr_n: a YOLO11n budget (6.5 GFLOPs, 2.6 M parameters at 640 px, 80 classes), all three
    levels kept (stride 8 is where small objects are)."""
    cfg = preset("rtdetr_n")
    model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    gflops = count_flops(cfg, (640, 640)) / 1e9
    assert 2.0 < params < 3.2 and 5.5 < gflops < 7.5
    assert len(model.decoder.input_proj) == 3
    assert gflops < 0.15 * count_flops(preset("rtdetr_r18"), (640, 640)) / 1e9


# --- Deformable attention ---------------------------------------------------------------------------------------
def _naive(value, shapes, locations, weights, counts):
    """Per point, per head, bilinear interpolation written out: ``value (B, S, h, c)``,
    ``locations (B, Q, h, P, 2)`` in [0, 1], ``weights (B, Q, h, P)`` -> ``(B, Q, h * c)``."""
    b, _, heads, c = value.shape
    q = locations.shape[1]
    out = torch.zeros(b, q, heads, c, dtype=torch.float64)
    level_of = [lvl for lvl, n in enumerate(counts) for _ in range(n)]
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for bi in range(b):
        for qi in range(q):
            for hi in range(heads):
                for p, lvl in enumerate(level_of):
                    h, w = shapes[lvl]
                    x = locations[bi, qi, hi, p, 0].item() * w - 0.5  # pixel centres at integers
                    y = locations[bi, qi, hi, p, 1].item() * h - 0.5
                    x0, y0 = math.floor(x), math.floor(y)
                    for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                        if 0 <= yy < h and 0 <= xx < w:
                            share = (1 - abs(x - xx)) * (1 - abs(y - yy))
                            cell = value[bi, starts[lvl] + yy * w + xx, hi].double()
                            out[bi, qi, hi] += weights[bi, qi, hi, p].item() * share * cell
    return out.reshape(b, q, heads * c)


def _identity_projections(attn: MSDeformableAttention) -> None:
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(proj.weight.shape[0]))
            proj.bias.zero_()


def test_deformable_attention_equals_naive_bilinear_sampling():
    torch.manual_seed(0)
    heads, c, counts, shapes = 2, 3, (2, 3, 1), [(5, 4), (3, 2), (1, 2)]
    attn = MSDeformableAttention(heads * c, heads, 3, counts, offset_scale=0.7)
    _identity_projections(attn)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 1.0)
        attn.attention_weights.weight.normal_(0, 1.0)
    query = torch.randn(2, 4, heads * c)
    boxes = torch.cat([torch.rand(2, 4, 2), torch.rand(2, 4, 2) * 0.6 + 0.1], -1)
    value = torch.randn(2, sum(h * w for h, w in shapes), heads * c)
    with torch.no_grad(), capture_sampling(attn) as records:
        out = attn(query, boxes, value, shapes)
    rec = records[""][0]
    # The recorded locations are the formula: box centre + offset * (1 / level points) * 0.7 * box size.
    offsets = attn.sampling_offsets(query).view(2, 4, heads, 6, 2)
    per_point = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3, 1.0])[:, None]
    expected = boxes[:, :, None, None, :2] + offsets * per_point * 0.7 * boxes[:, :, None, None, 2:]
    torch.testing.assert_close(rec["locations"], expected)
    assert rec["num_points"] == counts and rec["shapes"] == shapes
    torch.testing.assert_close(rec["weights"].sum(-1), torch.ones(2, 4, heads))
    assert (rec["locations"] < 0).any() and (rec["locations"] > 1).any()  # zero padding is exercised
    naive = _naive(value.view(2, -1, heads, c), shapes, rec["locations"], rec["weights"], counts)
    torch.testing.assert_close(out.double(), naive, atol=1e-5, rtol=1e-5)
    # Padding cells in value_mask contribute nothing: the same as zeroed values.
    value_mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    value_mask[:, ::3] = True
    with torch.no_grad():
        masked = attn(query, boxes, value, shapes, value_mask)
        zeroed = attn(query, boxes, value.masked_fill(value_mask[..., None], 0.0), shapes)
    torch.testing.assert_close(masked, zeroed)


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_deformable_sampling_equals_hugging_face_v2_kernel(method):
    """Per-level point counts (which Hugging Face's v2 kernel takes, though its module does not)."""
    from transformers.models.rt_detr_v2.modeling_rt_detr_v2 import multi_scale_deformable_attention_v2

    torch.manual_seed(0)
    heads, c, counts, shapes = 4, 8, (2, 3, 1), [(6, 5), (3, 3), (2, 2)]
    attn = MSDeformableAttention(heads * c, heads, 3, counts, method=method)
    _identity_projections(attn)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0, 1.0)
        attn.attention_weights.weight.normal_(0, 1.0)
    query, boxes = torch.randn(2, 7, heads * c), torch.rand(2, 7, 4) * 0.8 + 0.1
    value = torch.randn(2, sum(h * w for h, w in shapes), heads * c)
    with torch.no_grad(), capture_sampling(attn) as records:
        out = attn(query, boxes, value, shapes)
    rec = records[""][0]
    ref = multi_scale_deformable_attention_v2(value.view(2, -1, heads, c), shapes, rec["locations"], rec["weights"],
                                              list(counts), method)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_sampling_at_pixel_centres_returns_the_pixel_values():
    h, w, c = 4, 5, 3
    value = torch.randn(1, h * w, c)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1)  # (hw, 2)
    for method, shift in (("default", 0.0), ("discrete", -0.25)):
        attn = MSDeformableAttention(c, 1, 1, 1, method=method)
        _identity_projections(attn)
        with torch.no_grad():
            attn.sampling_offsets.bias.zero_()  # sample exactly at the box centre, weight 1
            # Discrete sampling rounds location * size to the nearest integer (the release's rule),
            # so a quarter cell before each centre names that cell.
            boxes = torch.cat([centres + shift / torch.tensor([w, h]), torch.full((h * w, 2), 0.1)], -1)[None]
            out = attn(torch.zeros(1, h * w, c), boxes, value, [(h, w)])
        torch.testing.assert_close(out, value, msg=method)


# --- Folding and the converter -----------------------------------------------------------------------------------
def test_eval_mode_folding_equals_the_modules():
    torch.manual_seed(0)
    block = RepVggBlock(8)
    for conv in (block.conv1, block.conv2):
        with torch.no_grad():
            conv.bn.running_mean.normal_()
            conv.bn.running_var.uniform_(0.5, 1.5)
            conv.bn.weight.normal_()
            conv.bn.bias.normal_()
    block.eval()
    x = torch.randn(2, 8, 6, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        folded = block(x)  # one 3x3 convolution
        branches = F.silu(block.conv1.bn(block.conv1.conv(x)) + block.conv2.bn(block.conv2.conv(x)))
    torch.testing.assert_close(folded, branches, atol=1e-5, rtol=1e-5)
    conv = ConvNorm(8, 4, 3, 2, act="silu").eval()
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.silu(conv.bn(conv.conv(x))), atol=1e-5, rtol=1e-5)


def test_converter_names_every_bad_key(r18, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    hf, _, _ = r18
    folder = tmp_path / "bad"
    hf.save_pretrained(folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.enc_score_head.bias"]
    state["model.extra.weight"] = torch.zeros(1)
    state["model.decoder.query_pos_head.layers.0.weight"] = torch.zeros(3, 4)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    text = str(err.value)
    assert str(folder) in text and "decoder.enc_class.bias" in text and "model.extra.weight" in text
    assert "decoder.query_pos_head.layers.0.weight (3, 4) != (512, 4)" in text
    config = json.loads((folder / "config.json").read_text())
    config["decoder_activation_function"] = "gelu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="decoder_activation_function='gelu'"):
        load_model(folder)


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_one_onnx_export_serves_every_image_size(tmp_path, method):
    """grid_sample (and the gather of discrete sampling) export with the TorchScript-based exporter;
    anchors, valid cells, AIFI positions, the canvas padding and the sampling grids are computed
    from the input's shape in the graph, so a file traced at one size equals PyTorch at others."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _small(sampling_method=method).eval()
    with torch.no_grad():  # off the initial grid-like offsets, whose rounding ties discrete sampling breaks either way
        for layer in model.decoder.layers:
            layer.cross_attn.sampling_offsets.weight.normal_(0, 0.1)
    path = export_onnx(model, tmp_path / "m.onnx", image_size=(128, 96), dynamic_batch=True)
    for size in [(128, 96), (160, 224), (100, 150)]:  # traced; larger; not a multiple of the stride
        images, mask = sample_batch(size, 2, "cpu")  # two images of different sizes, padded together
        assert check_onnx(model, path, images=images, mask=mask) < 1e-4, size
