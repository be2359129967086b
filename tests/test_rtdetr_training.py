"""RT-DETR everywhere DETR goes: its recipe, train (with the training-only options), eval, predict
(640 x 640 square sizing), ONNX export, explain, bf16, EMA and resume, two processes, and fine-tuning
from a Hugging Face folder. On the ``rtdetr_tiny`` preset and 64 px synthetic images."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import detrkit.engine as engine
from detrkit.checkpoint import load_model, save_model
from detrkit.cli import main
from detrkit.config import LossConfig
from detrkit.data.transforms import inference_transforms, prepare_image
from detrkit.explain import SamplingExplanation, explain
from detrkit.export import check_onnx, sample_batch
from detrkit.model.build import build_model
from detrkit.model.deformable import capture_sampling
from detrkit.presets import preset, recipe, resolve

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "rtdetr_tiny", "--image-size", "64", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def shapes(synthetic):
    return synthetic(4, 4)


def _data(shapes, val: bool = True) -> list[str]:
    flags = ["--train-json", str(shapes["train_json"]), "--train-images", str(shapes["train_images"])]
    if val:
        flags += ["--val-json", str(shapes["val_json"]), "--val-images", str(shapes["val_images"])]
    return flags


def test_the_rtdetr_recipe_is_the_familys_default_and_flags_win():
    model, loss, data, train = resolve(None, {"train": {"model": "rtdetr_r18"}})
    assert loss == LossConfig(**recipe("rtdetr")["loss"]) and loss.class_loss == "varifocal"
    assert (loss.cost_class, loss.loss_ce, loss.vfl_alpha, loss.focal_alpha, loss.denoising_queries) == (2, 1, .75, .25, 100)
    assert (data.image_size, data.resize, train.ema, train.epochs) == (640, "square", True, 72)
    assert resolve(None, {"train": {"model": "detr_r18_tiny"}})[1] == LossConfig()  # DETR keeps the paper's
    assert resolve("fast", {"train": {"model": "rtdetr_tiny"}})[1].encoder_repeats == 4  # a named recipe wins
    with pytest.raises(ValueError, match="denoising .* and denoising_queries .* both set"):
        resolve(None, {"train": {"model": "rtdetr_tiny"}, "loss": {"denoising": 2}})
    assert resolve(None, {"train": {"model": "rtdetr_tiny"}, "loss": {"denoising": 2, "denoising_queries": 0}})[1].denoising == 2


def test_train_with_every_option_then_eval_predict_export_explain(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_data(shapes), *TINY, "--epochs", "1", "--batch-size", "2", "--out", str(run),
                 "--denoising-queries", "0", "--denoising", "2", "--encoder-repeats", "2", "--hybrid-queries", "4",
                 "--class-loss", "focal", "--num-points", "3", "2", "1", "--sampling-method", "discrete"]) == 0
    header = (run / "results.csv").read_text().splitlines()[0]
    for key in ("train_loss_ce_dn", "train_loss_ce_hybrid", "train_loss_ce_enc", "train_loss_giou", "AP"):
        assert key in header, key
    model = load_model(run / "best")
    assert model.config.num_points == (3, 2, 1) and model.config.sampling_method == "discrete"
    assert model.inference == {"image_size": 64, "max_size": None, "resize": "square"}  # the rtdetr recipe's sizing
    assert main(["eval", "--weights", str(run / "best"), "--val-json", str(shapes["val_json"]),
                 "--val-images", str(shapes["val_images"]), "--out", str(tmp_path / "eval")]) == 0
    assert 0 <= json.loads((tmp_path / "eval" / "metrics.json").read_text())["AP"] <= 1

    photo = tmp_path / "photo.png"
    Image.new("RGB", (60, 40), (90, 140, 200)).save(photo)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0][0].shape)))
    dets = model.predict([photo], threshold=0.0)
    assert seen == [(1, 3, 64, 64)]  # a 60 x 40 photo resized to 64 x 64, as RT-DETR's processor does
    assert dets[0]["boxes"][:, 2].max() <= 60 + 1e-3 and dets[0]["boxes"][:, 3].max() <= 40 + 1e-3
    assert main(["predict", "--weights", str(run / "best"), str(photo), "--threshold", "0",
                 "--out", str(tmp_path / "pred")]) == 0

    onnx = tmp_path / "m.onnx"
    assert main(["export", "--weights", str(run / "best"), "--image-size", "64", "64", "--out", str(onnx)]) == 0
    for size in [(64, 64), (96, 128)]:  # one file, two image sizes
        images, mask = sample_batch(size, 2, "cpu")
        assert check_onnx(model, onnx, images=images, mask=mask) < 1e-4, size

    assert main(["explain", "--weights", str(run / "best"), str(photo), "--threshold", "0", "--max-objects", "2",
                 "--out", str(tmp_path / "explain.png"), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "explain.png").format == "PNG"
    assert "2 detections, their sampling points" in capsys.readouterr().out
    assert main(["explain", "--weights", str(run / "best"), str(photo), "--points", "3,4", "--device", "cpu"]) == 2


def test_explain_gives_each_detections_sampling_points():
    torch.manual_seed(0)
    model = build_model(preset("rtdetr_tiny", num_classes=3, num_points=(3, 2, 1))).eval()
    model.inference = {"image_size": 64, "max_size": None, "resize": "square"}
    image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)  # resized to 64 x 64, which is the canvas
    result = explain(model, image, threshold=0.0, max_objects=3)
    assert isinstance(result, SamplingExplanation) and len(result.boxes) == len(result.queries) == 3
    heads = model.decoder.layers[-1].cross_attn.nheads
    assert result.points.shape == (3, heads, 6, 2) and result.levels.tolist() == [0, 0, 0, 1, 1, 2]
    assert result.strides == [8, 16, 32] and result.layer == "decoder.layers.1.cross_attn"
    torch.testing.assert_close(result.weights.sum(-1), torch.ones(3, heads))  # a softmax per head
    # The points are the layer's sampling locations ([0, 1] of the canvas) in the photo's pixels.
    x, _ = prepare_image(image, inference_transforms(model.inference))
    with torch.no_grad(), capture_sampling(model) as records:
        model([x])
    locations = records[result.layer][0]["locations"][0][result.queries]  # (3, heads, 6, 2)
    torch.testing.assert_close(result.points, locations * torch.tensor([60.0, 40.0]))
    # Not a DETR: no encoder attention, so no reference points.
    with pytest.raises(ValueError, match="RT-DETR does not have"):
        explain(model, image, points=[(1, 1)])


def test_bf16_inference_runs_under_autocast_and_returns_float32(tmp_path):
    """bf16 may reorder proposals whose scores tie to its precision, so the model keeps every cell
    (more queries than the 126 cells of a 64 x 96 image) and queries are paired by proposal box."""
    torch.manual_seed(0)
    model = build_model(preset("rtdetr_tiny", num_classes=3, num_queries=300))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # variance-preserving weights: a fresh model's near-constant features say little
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5, generator=gen)
    path = save_model(model, tmp_path / "m")
    fp32, bf16 = load_model(path), load_model(path, precision="bf16")
    seen = []
    bf16.decoder.layers[0].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    x = [torch.randn(3, 64, 96)]
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    assert seen == [torch.bfloat16] and b["pred_logits"].dtype == b["pred_boxes"].dtype == torch.float32
    distance = torch.cdist(a["enc_outputs"]["pred_boxes"][0], b["enc_outputs"]["pred_boxes"][0])  # (126, 126)
    assert distance.min(1).values.max() < 0.01
    pair = distance.argmin(1)
    assert (a["pred_boxes"][0] - b["pred_boxes"][0][pair]).abs().max() < 0.01
    assert (a["pred_logits"][0].sigmoid() - b["pred_logits"][0][pair].sigmoid()).abs().max() < 0.01
