"""RT-DETR release checkpoints (lyuwenyu/RT-DETR ``.pth``): parity with Hugging Face transformers.

No release file is downloaded. A random Hugging Face RT-DETR (v1, and v2 at the release's fixed
offset scale) is renamed to the release's names by the INVERSE of Hugging Face's own conversion
tables (``convert_rt_detr_original_pytorch_checkpoint_to_hf.py`` and its v2 twin: the
``create_rename_keys`` pairs and ``read_in_q_k_v``'s q/k/v split), written out below from those
scripts, not from detrkit's reader. What the release's files hold and Hugging Face's models do not
is added as the release writes it: ``num_batches_tracked`` of a backbone whose BatchNorm trains
(R18/R34: ``freeze_norm: False``), v2's anchors and valid mask for its fixed evaluation size, a
fixed AIFI position embedding. The state is saved as ``{"ema": {"module": state}}``, read by
``detrkit.load_model``, and its outputs compared with the Hugging Face model's on the same input.
"""
import json
import re

import pytest
import torch

from conftest import hf_rtdetr, randomise_hf_rtdetr, rtdetr_canvas, rtdetr_images, to_pixel_input, write_image
from detrkit.checkpoint import checkpoint_config, detect_format, load_model, load_state
from detrkit.cli import main
from detrkit.errors import CheckpointError
from detrkit.rtdetr_release import release_classes

transformers = pytest.importorskip("transformers")

TOL = 1e-4

# transformers 5 renames some modules in memory; its conversion scripts write these names.
_ON_DISK = [(".o_proj.", ".out_proj."), (".mlp.fc", ".fc"), ("model.encoder.aifi.", "model.encoder.encoder.")]
# Hugging Face -> release: the conversion scripts' (original, Hugging Face) pairs read right to left.
_TO_RELEASE = [
    (r"^model\.backbone\.model\.embedder\.embedder\.(\d)\.", lambda m: f"backbone.conv1.conv1_{int(m[1]) + 1}."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.0\.shortcut\.1\.",
     r"backbone.res_layers.\1.blocks.0.short.conv."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.0\.shortcut\.",
     r"backbone.res_layers.\1.blocks.0.short."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d)\.",
     lambda m: f"backbone.res_layers.{m[1]}.blocks.{m[2]}.branch2{'abc'[int(m[3])]}."),
    (r"^(backbone\..*)\.convolution\.", r"\1.conv."),
    (r"^(backbone\..*)\.normalization\.", r"\1.norm."),
    (r"^model\.encoder_input_proj\.", "encoder.input_proj."),
    (r"^model\.encoder\.", "encoder."),
    (r"^(encoder\.encoder\.\d+\.layers\.\d+)\.fc([12])\.", r"\1.linear\2."),
    (r"^(encoder\.encoder\.\d+\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(encoder\.encoder\.\d+\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"^model\.decoder\.layers\.", "decoder.decoder.layers."),
    (r"^(decoder\.decoder\.layers\.\d+)\.encoder_attn\.n_points_scale$", r"\1.cross_attn.num_points_scale"),
    (r"^(decoder\.decoder\.layers\.\d+)\.encoder_attn\.", r"\1.cross_attn."),
    (r"^(decoder\.decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"^(decoder\.decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
    (r"^(decoder\.decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"^(decoder\.decoder\.layers\.\d+)\.fc([12])\.", r"\1.linear\2."),
    (r"^model\.decoder\.class_embed\.", "decoder.dec_score_head."),
    (r"^model\.decoder\.bbox_embed\.", "decoder.dec_bbox_head."),
    (r"^model\.decoder\.query_pos_head\.", "decoder.query_pos_head."),
    (r"^model\.decoder_input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv."),
    (r"^model\.decoder_input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.norm."),
    (r"^model\.denoising_class_embed\.", "decoder.denoising_class_embed."),
    # v1's script; v2's names these model.encoder_output / encoder_score_head / encoder_bbox_head,
    # which the installed transformers calls enc_output / enc_score_head / enc_bbox_head.
    (r"^model\.enc_output\.", "decoder.enc_output."),
    (r"^model\.enc_score_head\.", "decoder.enc_score_head."),
    (r"^model\.enc_bbox_head\.", "decoder.enc_bbox_head."),
]
# The v2 script's names for the same modules (the release's HybridEncoder / decoder version 'v2').
_V2_NAMES = [(r"^encoder\.input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
             (r"^encoder\.input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.norm."),
             (r"^decoder\.enc_output\.0\.", "decoder.enc_output.proj."),
             (r"^decoder\.enc_output\.1\.", "decoder.enc_output.norm.")]


def to_release(hf_state: dict, v2: bool) -> dict:
    """A Hugging Face RT-DETR state dict in the release's names; q/k/v projections packed into
    ``in_proj_*`` (rows q, k, v: read_in_q_k_v slices them so). Hugging Face's top-level copies of
    the heads (``class_embed.*``, ``bbox_embed.*``) are not the release's: left out."""
    out, packed = {}, {}
    for key, value in hf_state.items():
        if not key.startswith("model."):
            continue
        for old, new in _ON_DISK:
            key = key.replace(old, new)
        for pattern, repl in _TO_RELEASE + (_V2_NAMES if v2 else []):
            key = re.sub(pattern, repl, key)
        qkv = re.match(r"^(.+\.self_attn)\.([qkv])_proj\.(weight|bias)$", key)
        if qkv:
            packed.setdefault(f"{qkv[1]}.in_proj_{qkv[3]}", {})[qkv[2]] = value
        else:
            out[key] = value
    for key, parts in packed.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    leftover = [k for k in out if not k.startswith(("backbone.", "encoder.", "decoder."))
                or re.search(r"convolution|normalization|encoder_attn|layer_norm|\.fc\d|model\.", k)]
    assert not leftover, f"the inverse table misses {leftover[:5]}"
    return out


def release_anchors(h: int, w: int, strides=(8, 16, 32)):
    """The release's ``_generate_anchors`` for an ``eval_spatial_size`` of (h, w): grid_size 0.05,
    eps 0.01, logits, inf where invalid."""
    anchors = []
    for level, s in enumerate(strides):
        gy, gx = torch.meshgrid(torch.arange(h // s), torch.arange(w // s), indexing="ij")
        xy = (torch.stack([gx, gy], -1)[None] + 0.5) / torch.tensor([w // s, h // s], dtype=torch.float32)
        anchors.append(torch.cat([xy, torch.ones_like(xy) * 0.05 * 2.0 ** level], -1).reshape(1, -1, 4))
    anchors = torch.cat(anchors, 1)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1, keepdim=True)
    return torch.where(valid, torch.log(anchors / (1 - anchors)), torch.inf), valid


def release_position(w: int, h: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The release's ``build_2d_sincos_position_embedding(w, h, dim, temperature)``."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = grid_w.flatten()[:, None] * omega[None], grid_h.flatten()[:, None] * omega[None]
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], 1)[None]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """``{version: (hf model, release .pth path, release state)}`` for "v1" and "v2": R18 layouts
    with 300 queries (the release's num_queries, which leaves no trace in the shapes)."""
    folder = tmp_path_factory.mktemp("release")
    models = []
    # Seeds whose query selection has no near-ties on the test input (see the parity test).
    for kind, seed in (("r18", 0), ("v2_release", 15)):
        torch.manual_seed(0)
        models.append(hf_rtdetr(kind, num_queries=300))
        randomise_hf_rtdetr(models[-1], seed)
    hf1, hf2 = (m.eval() for m in models)
    v1 = to_release(hf1.state_dict(), v2=False)
    # R18 release: the backbone's BatchNorm trains (freeze_norm False), so it has a counter.
    v1.update({k.replace("running_var", "num_batches_tracked"): torch.tensor(1000)
               for k in list(v1) if k.startswith("backbone.") and k.endswith("running_var")})
    v1["encoder.pos_embed2"] = release_position(10, 10, 256)  # fixed for eval_spatial_size [320, 320]
    v2 = to_release(hf2.state_dict(), v2=True)  # backbone BatchNorm frozen, as in the R50/R101 files
    v2["decoder.anchors"], v2["decoder.valid_mask"] = release_anchors(640, 640)
    paths = {"v1": folder / "rtdetr_r18vd_dec3_6x_coco.pth", "v2": folder / "rtdetrv2_r18vd_120e_coco.pth"}
    torch.save({"ema": {"module": v1, "updates": 1000}, "date": "2024-01-01T00:00:00", "last_epoch": 71}, paths["v1"])
    torch.save({"ema": {"module": v2}}, paths["v2"])
    return {"v1": (hf1, paths["v1"], v1), "v2": (hf2, paths["v2"], v2)}


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (ours - ref).abs().max().item()
    assert err < TOL, f"{what}: max difference {err:.2e}"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_release_file_outputs_equal_hugging_face(release, version):
    hf, path, _ = release[version]
    ours = load_model(path)
    x = rtdetr_canvas(rtdetr_images())
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = ours(to_pixel_input(x))
    # The best 300 cells become the queries, best first: two scores within float32 rounding of each
    # other could come out in either order (the outputs then a permutation of each other's), which
    # would make the input inconclusive, not the model wrong.
    best = ref.enc_outputs_class.amax(-1).sort(-1, descending=True).values[:, :301]
    assert (best[:, :-1] - best[:, 1:]).min() > 1e-5, "near-tied selection scores; choose another input"
    _close(out["pred_logits"], ref.logits, "logits")
    _close(out["pred_boxes"], ref.pred_boxes, "boxes")
    for i, aux in enumerate(out["aux_outputs"]):
        _close(aux["pred_logits"], ref.intermediate_logits[:, i], f"layer {i} logits")
        _close(aux["pred_boxes"], ref.intermediate_reference_points[:, i], f"layer {i} boxes")
    _close(out["enc_outputs"]["pred_logits"], ref.enc_topk_logits, "encoder proposal logits")
    _close(out["enc_outputs"]["pred_boxes"], ref.enc_topk_bboxes, "encoder proposal boxes")


def test_release_config_comes_from_the_shapes(release, tmp_path):
    hf1, path1, _ = release["v1"]
    v1, v2 = checkpoint_config(path1), checkpoint_config(release["v2"][1])
    assert detect_format(path1) == detect_format(release["v2"][1]) == "rtdetr_release"
    common = dict(arch="rtdetr", backbone="resnet18vd", dec_layers=3, csp_expansion=0.5, num_classes=7,
                  encoder_dim=256, d_model=256, nheads=8, num_queries=300, sampling_method="default")
    assert {k: getattr(v1, k) for k in common} == common == {k: getattr(v2, k) for k in common}
    assert (v1.num_points, v1.backbone_norm) == ((4, 4, 4), "batch")  # v1: 8 heads; a trained BatchNorm
    assert (v2.num_points, v2.backbone_norm) == ((3, 3, 3), "frozen")  # v2: from num_points_scale
    read1, read2 = load_state(path1), load_state(release["v2"][1])
    assert read1.inference["image_size"] == 320 and read2.inference["image_size"] == 640  # the fixed buffers' size
    torch.testing.assert_close(read1.aids["denoising.label_embed.weight"], hf1.model.denoising_class_embed.weight[:7])
    dsp = tmp_path / "rtdetrv2_r18vd_dsp_3x_coco.pth"  # discrete sampling leaves no trace but the name
    dsp.write_bytes(release["v2"][1].read_bytes())
    assert checkpoint_config(dsp).sampling_method == "discrete"


def test_release_state_under_model_and_classes(release, tmp_path):
    state = {k: v for k, v in release["v1"][2].items() if k != "encoder.pos_embed2"}
    torch.save({"model": state, "optimizer": {"state": {}}}, tmp_path / "checkpoint0071.pth")
    read = load_state(tmp_path / "checkpoint0071.pth")
    assert read.inference == {"image_size": 640, "max_size": None, "resize": "square"}  # nothing fixed: the release's
    assert read.classes == [{"index": i, "id": i, "name": str(i)} for i in range(7)]
    coco = release_classes(80)  # the release's mscoco_category2label order
    assert coco[0] == {"index": 0, "id": 1, "name": "person"}
    assert coco[79] == {"index": 79, "id": 90, "name": "toothbrush"}
    assert len({c["id"] for c in coco}) == 80 and 12 not in {c["id"] for c in coco}


def test_official_detr_pth_is_not_taken_for_a_release_one(tmp_path):
    path = tmp_path / "detr.pth"
    torch.save({"model": {"backbone.0.body.conv1.weight": torch.zeros(1), "class_embed.weight": torch.zeros(1)}}, path)
    assert detect_format(path) == "official"


def test_truncated_release_file_names_the_file(release, tmp_path):
    data = release["v1"][1].read_bytes()
    path = tmp_path / "rtdetr_truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*truncated"):
        load_model(path)


def test_release_file_missing_a_key_names_the_file_and_the_key(release, tmp_path):
    for key, named in [("decoder.dec_bbox_head.1.layers.2.weight", "decoder.bbox_embed.1.layers.2.weight"),
                       ("decoder.dec_score_head.0.weight", "decoder.dec_score_head.0.weight")]:
        state = {k: v for k, v in release["v1"][2].items() if k != key}
        path = tmp_path / "missing.pth"
        torch.save({"ema": {"module": state}}, path)
        with pytest.raises(CheckpointError, match=re.escape(str(path))) as err:
            load_model(path)
        assert named in str(err.value)


def test_release_fixed_size_buffers_must_be_the_models(release, tmp_path):
    state = dict(release["v2"][2])
    state["decoder.anchors"] = state["decoder.anchors"] + 0.1
    path = tmp_path / "shifted.pth"
    torch.save({"ema": {"module": state}}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*decoder.anchors"):
        load_model(path)


def test_predict_command_reads_a_release_file(release, tmp_path):
    write_image(tmp_path / "photos" / "a.png", 96, 72)
    out = tmp_path / "pred"
    assert main(["predict", "--weights", str(release["v1"][1]), str(tmp_path / "photos"), "--threshold", "0",
                 "--out", str(out), "--device", "cpu"]) == 0
    records = json.loads((out / "detections.json").read_text())
    assert (out / "a.png").exists() and len(records) == 1 and records[0]["detections"]
    assert {d["category_id"] for d in records[0]["detections"]} <= set(range(7))  # 7 classes: index = id


def test_fine_tuning_from_a_release_file(synthetic, tmp_path, capsys):
    """``train --weights FILE.pth``: the model and recipe come from the file's shapes, every class head
    starts afresh for other classes, everything else starts from the file (lr 0: nothing moves). A
    quarter-width v2 whose 4 heads its num_points_scale gives away; 300 queries, the release's."""
    backbone = dict(model_type="rt_detr_resnet", depths=[1, 1, 1, 1], layer_type="basic",
                    hidden_sizes=[16, 32, 64, 128], embedding_size=16, out_indices=[2, 3, 4])
    config = transformers.RTDetrV2Config(
        backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32, encoder_ffn_dim=64,
        d_model=32, decoder_ffn_dim=64, encoder_attention_heads=4, decoder_attention_heads=4, decoder_layers=2,
        num_queries=300, decoder_n_points=2, decoder_offset_scale=0.5, hidden_expansion=0.5, num_labels=80,
        decoder_in_channels=[32, 32, 32], use_pretrained_backbone=False)
    torch.manual_seed(0)
    state = to_release(transformers.RTDetrV2ForObjectDetection(config).state_dict(), v2=True)
    path = tmp_path / "rtdetrv2_tiny.pth"
    torch.save({"ema": {"module": state}}, path)
    read = load_state(path)
    assert (read.config.nheads, read.config.num_points, read.config.backbone_depths) == (4, (2, 2, 2), (1, 1, 1, 1))
    assert read.classes[:2] == [{"index": 0, "id": 1, "name": "person"}, {"index": 1, "id": 2, "name": "bicycle"}]
    data = synthetic(6, 2)
    assert main(["train", "--train-json", str(data["train_json"]), "--train-images", str(data["train_images"]),
                 "--image-size", "64", "--workers", "0", "--device", "cpu", "--batch-size", "2", "--epochs", "1",
                 "--lr", "0", "--lr-backbone", "0", "--weights", str(path), "--out", str(tmp_path / "ft")]) == 0
    assert "new class head" in capsys.readouterr().out
    tuned = torch.load(tmp_path / "ft" / "last" / "train_state.pt", weights_only=True)["model"]
    start = load_model(path).state_dict()
    assert tuned["decoder.class_embed.0.weight"].shape[0] != 80
    assert torch.equal(tuned["decoder.layers.1.cross_attn.sampling_offsets.weight"],
                       start["decoder.layers.1.cross_attn.sampling_offsets.weight"])
