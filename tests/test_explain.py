"""Attention capture changes no number; the maps are the attention the model applied; explain and
the matching view run end to end on tiny models."""
import pytest
import torch
from conftest import TINY as TINY_BASE
from PIL import Image
from torch import nn

from detrkit import build_model, save_model
from detrkit.cli import main
from detrkit.config import ModelConfig
from detrkit.explain import explain, match
from detrkit.matcher import HungarianMatcher
from detrkit.model.transformer import MultiheadAttention, capture_attention

TINY = dict(TINY_BASE, enc_layers=2, num_queries=6, num_classes=4, dropout=0.0)
# The synthetic shapes set's categories (ids with a gap, as real data sets have).
CLASSES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"},
           {"id": 5, "name": "star"}]


def _images():
    gen = torch.Generator().manual_seed(0)
    # Different sizes: the second is padded, so its feature map has padding cells.
    return [torch.randn(3, 96, 128, generator=gen), torch.randn(3, 64, 80, generator=gen)]


def _flat(out: dict) -> list:
    tensors = [out["pred_logits"], out["pred_boxes"]]
    for aux in out.get("aux_outputs", []):
        tensors += [aux["pred_logits"], aux["pred_boxes"]]
    if "enc_outputs" in out:
        tensors += [out["enc_outputs"]["pred_logits"], out["enc_outputs"]["pred_boxes"]]
    return tensors


@pytest.mark.parametrize("two_stage", [False, True], ids=["detr", "two_stage"])
def test_capture_changes_no_output_and_maps_sum_to_one(two_stage):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, arch="two_stage" if two_stage else "detr")).eval()
    images = _images()
    with torch.no_grad():
        plain = model(images)
        with capture_attention(model) as maps:
            captured = model(images)
        again = model(images)  # capture is off again after the block
    for a, b, c in zip(_flat(plain), _flat(captured), _flat(again)):
        assert torch.equal(a, b) and torch.equal(a, c)  # bit-identical
    assert all(m.store is None for m in model.modules() if isinstance(m, MultiheadAttention))

    hw = (96 // 16) * (128 // 16)  # 3 stages: stride 16; 6 x 8 cells, the batch's padded size
    q, h = 6, 4
    expected = {f"transformer.encoder.layers.{i}.self_attn": (2, h, hw, hw) for i in range(2)}
    for i in range(2):
        expected[f"transformer.decoder.layers.{i}.self_attn"] = (2, h, q, q)
        expected[f"transformer.decoder.layers.{i}.multihead_attn"] = (2, h, q, hw)
    assert {name: tuple(calls[0].shape) for name, calls in maps.items()} == expected
    assert all(len(calls) == 1 for calls in maps.values())

    # Image 2 (64 x 80) covers 4 x 5 of the 6 x 8 cells; the rest is padding and gets weight 0.
    padding = torch.ones(6, 8, dtype=torch.bool)
    padding[:4, :5] = False
    padding = padding.flatten()
    for name, (weights,) in maps.items():
        assert (weights >= 0).all()
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5), name
        if weights.shape[-1] == hw:  # keys are image cells
            assert (weights[1][..., padding] == 0).all(), name
            assert (weights[0] > 0).all(), name  # image 1 has no padding


def test_captured_weights_are_the_attention_applied():
    """Weights x values reproduce the module's output, and agree with nn.MultiheadAttention's own."""
    torch.manual_seed(0)
    d, heads = 16, 4
    ours = MultiheadAttention(d, heads).eval()
    reference = nn.MultiheadAttention(d, heads, batch_first=True).eval()
    reference.load_state_dict(ours.state_dict())  # the same parameter layout
    query, key = torch.randn(2, 5, d), torch.randn(2, 9, d)
    value = torch.randn(2, 9, d)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    with torch.no_grad(), capture_attention(ours) as maps:
        out = ours(query, key, value, key_padding_mask=padding)
    weights = maps[""][0]  # the module itself has the empty name: (B, h, Lq, Lk)
    _, _, w_v = ours.in_proj_weight.chunk(3)
    _, _, b_v = ours.in_proj_bias.chunk(3)
    with torch.no_grad():
        v = nn.functional.linear(value, w_v, b_v).view(2, 9, heads, d // heads).transpose(1, 2)
        rebuilt = ours.out_proj((weights @ v).transpose(1, 2).reshape(2, 5, d))
        ref_out, ref_weights = reference(query, key, value, key_padding_mask=padding, average_attn_weights=False)
    assert torch.allclose(rebuilt, out, atol=1e-6)
    assert torch.allclose(weights, ref_weights, atol=1e-6)
    assert torch.allclose(out, ref_out, atol=1e-6)


def test_explain_api_on_a_tiny_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, arch="two_stage")).eval()
    model.inference = {"image_size": 64, "max_size": None}
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)  # resized to 64 x 96: 4 x 6 cells
    result = explain(model, image, threshold=0.0, max_objects=3, points=[(10, 5), (59, 39)])
    assert torch.equal(result.image, image)
    assert len(result.boxes) == len(result.queries) == len(result.names) == 3
    assert result.decoder_attention.shape == (3, 4, 6) and result.encoder_attention.shape == (2, 4, 6)
    for maps in (result.decoder_attention, result.encoder_attention):
        assert torch.allclose(maps.sum((1, 2)), torch.ones(len(maps)), atol=1e-5)
    assert result.cell_size == (10.0, 10.0)  # stride 16 at scale 64 / 40
    assert result.upsample(result.decoder_attention).shape == (3, 40, 60)
    # The rows are the queries' own: the same as reading the captured tensor directly.
    cross = result.attention["transformer.decoder.layers.1.multihead_attn"][0].mean(0)  # (Q, HW)
    assert torch.equal(result.decoder_attention[1].flatten(), cross[result.queries[1]])
    # Point (59, 39) lies in the last cell (row 3, column 5).
    enc = result.attention["transformer.encoder.layers.1.self_attn"][0].mean(0)  # (HW, HW)
    assert torch.equal(result.encoder_attention[1].flatten(), enc[3 * 6 + 5])
    with pytest.raises(ValueError, match="outside"):
        explain(model, image, points=[(60, 10)])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY))
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny", classes=CLASSES,
                      inference={"image_size": 64, "max_size": None})


def test_explain_cli_writes_a_png(checkpoint, tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (90, 140, 200)).save(image)
    out = tmp_path / "explained.png"
    assert main(["explain", "--weights", str(checkpoint), str(image), "--threshold", "0", "--max-objects", "2",
                 "--points", "10,20", "50,30", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).format == "PNG"
    assert "2 detections, 2 reference points" in capsys.readouterr().out
    # User errors: one line, exit 2.
    assert main(["explain", "--weights", str(checkpoint), "--device", "cpu"]) == 2
    assert main(["explain", "--weights", str(checkpoint), str(image), "--points", "3;4", "--device", "cpu"]) == 2
    assert main(["explain", "--weights", str(checkpoint), str(image), "--points", "500,4", "--device", "cpu"]) == 2
    assert main(["explain", "--weights", str(checkpoint), str(tmp_path / "missing.png")]) == 2
    err = capsys.readouterr().err
    assert "'3;4' is not X,Y" in err and "outside the 96x64 image" in err and "missing.png" in err


@pytest.fixture(scope="module")
def shapes(synthetic):
    return synthetic(3, 1, seed=1)


def test_match_api_reports_the_matchers_assignment_and_costs(checkpoint, shapes):
    from detrkit import load_model
    from detrkit.data.coco import CocoDetection
    from detrkit.data.transforms import val_transforms

    model = load_model(checkpoint)
    dataset = CocoDetection(shapes["train_json"], shapes["train_images"], transforms=val_transforms(64),
                            categories=CLASSES)
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    index = next(i for i in range(len(dataset)) if len(dataset[i][1]["labels"]))
    result = match(model, dataset, index, matcher)
    x, target = dataset[index]
    with torch.no_grad():
        out = model([x])
    (rows, cols), = matcher(out, [target])
    assert result.pairs == list(zip(rows.tolist(), cols.tolist())) and len(result.pairs) == len(target["labels"])
    c = result.costs
    assert torch.allclose(c["total"], 2 * c["class"] + 5 * c["bbox"] + 2 * c["giou"], atol=1e-5)
    assert ((c["class"] >= -1) & (c["class"] <= 0)).all()  # -p
    assert ((c["giou"] >= -1) & (c["giou"] <= 1)).all()
    assert result.pred_boxes.shape == (6, 4) and result.target_boxes.shape == (len(target["labels"]), 4)
    assert result.target_boxes.max() <= 64 + 1e-3  # pixels of the 64 x 64 file


def test_matching_view_cli(checkpoint, shapes, tmp_path, capsys):
    paths = shapes
    out = tmp_path / "matching.png"
    args = ["explain", "--weights", str(checkpoint), "--matching", "--train-json", str(paths["train_json"]),
            "--train-images", str(paths["train_images"]), "--device", "cpu"]
    assert main([*args, "--index", "1", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"
    assert "targets matched to queries" in capsys.readouterr().out
    assert main([*args, "--index", "7"]) == 2  # out of range
    assert main([*args, "--split", "val"]) == 2  # no val split given
    assert main(["explain", "--weights", str(checkpoint), "--matching"]) == 2  # no data
    err = capsys.readouterr().err
    assert "out of range" in err and "no val split" in err and "needs data" in err
