"""RT-DETR everywhere DETR goes: its recipe, train (with the training-only options), eval, predict
(640 x 640 square sizing), ONNX export, explain, bf16, EMA and resume, two processes, and fine-tuning
from a Hugging Face folder. On the ``rtdetr_tiny`` preset and 64 px synthetic images."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import detrkit.engine as engine
from detrkit.aids import AidedModel
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
    assert (data.augment, data.augment_stop_epoch, train.batch_size, train.no_decay) == ("rtdetr", -1, 16, ("norm", "bias"))
    # Per backbone, as the release's configs: R18/R34 train their BatchNorm, R101's backbone learns at 1e-6.
    norms = {m: resolve(None, {"train": {"model": m}})[0].backbone_norm for m in ("rtdetr_r18", "rtdetr_r34", "rtdetr_r50")}
    assert norms == {"rtdetr_r18": "batch", "rtdetr_r34": "batch", "rtdetr_r50": "frozen"}
    assert resolve(None, {"train": {"model": "rtdetr_r50"}})[3].lr_backbone == 1e-5
    assert resolve(None, {"train": {"model": "rtdetrv2_r101"}})[3].lr_backbone == 1e-6
    assert resolve(None, {"train": {"model": "rtdetrv2_r101", "lr_backbone": 2e-5}})[3].lr_backbone == 2e-5  # flags win
    assert resolve(None, {"train": {"model": "rtdetr_r18"}, "model": {"backbone_norm": "frozen"}})[0].backbone_norm == "frozen"
    assert resolve(None, {"train": {"model": "detr_r18_tiny"}})[1] == LossConfig()  # DETR keeps the paper's
    assert resolve("fast", {"train": {"model": "rtdetr_tiny"}})[1].encoder_repeats == 4  # a named recipe wins
    with pytest.raises(ValueError, match="denoising .* and denoising_queries .* both set"):
        resolve(None, {"train": {"model": "rtdetr_tiny"}, "loss": {"denoising": 2}})
    assert resolve(None, {"train": {"model": "rtdetr_tiny"}, "loss": {"denoising": 2, "denoising_queries": 0}})[1].denoising == 2


# The release's parameter groups (lyuwenyu/RT-DETR rtdetrv2_pytorch/configs/rtdetr/): regexes over its
# parameter names, each with its lr / weight decay over AdamW's lr 1e-4, weight decay 1e-4. The first
# match wins (the release asserts none matches twice).
RELEASE_GROUPS = {
    "resnet18vd": [(r"^(?=.*backbone)(?!.*(?:norm|bn)).*$", 1e-5, 1e-4),  # include/optimizer.yml, as rtdetr_r18vd_6x
                   (r"^(?=.*backbone)(?=.*(?:norm|bn)).*$", 1e-5, 0.0),
                   (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", 1e-4, 0.0)],
    "resnet101vd": [(r"^(?=.*backbone)(?!.*norm|bn).*$", 1e-6, 1e-4),  # rtdetr_r101vd_6x_coco.yml
                    (r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$", 1e-4, 0.0)],
}


@pytest.mark.parametrize("backbone", ["resnet18vd", "resnet101vd"])
def test_the_optimiser_groups_are_the_releases(backbone):
    """Our groups (norm layers found by type, biases by name) equal the release's regexes applied to our
    names, whose norm layers are all named ...bn or ...norm...: R18 (trained BatchNorm, no decay on any
    norm nor on the encoder's and decoder's biases) and R101 (frozen BatchNorm, backbone lr 1e-6, no
    decay on the encoder's and decoder's norms only). The denoising table is the decoder's in the release."""
    model_cfg, loss_cfg, _, train_cfg = resolve(None, {"train": {"model": "rtdetr_tiny"}, "model": {
        "backbone": backbone, "backbone_depths": (1, 1, 1, 1), "backbone_norm": "batch" if backbone == "resnet18vd" else "frozen"}})
    assert model_cfg.backbone_norm == ("batch" if backbone == "resnet18vd" else "frozen")
    aided = AidedModel(build_model(dataclasses.replace(model_cfg, num_classes=3)), loss_cfg)
    optimizer = engine.make_optimizer(aided, train_cfg)
    ours = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    named = [(n.removeprefix("model.").replace("denoising.", "decoder.denoising."), p)
             for n, p in aided.named_parameters()]
    assert len(ours) == len(named) == sum(len(g["params"]) for g in optimizer.param_groups)  # each once
    for name, param in named:
        release = [(lr, wd) for pattern, lr, wd in RELEASE_GROUPS[backbone] if re.search(pattern, name)]
        assert len(release) <= 1 and ours[id(param)] == (release or [(1e-4, 1e-4)])[0], name
    kinds = {wd for _, wd in ours.values()}, {lr for lr, _ in ours.values()}
    assert kinds == ({0.0, 1e-4}, {1e-4, 1e-5 if backbone == "resnet18vd" else 1e-6})


def test_detr_recipes_decay_every_parameter():
    model_cfg, _, _, train_cfg = resolve("paper", {"train": {"model": "detr_r18_tiny"}})
    optimizer = engine.make_optimizer(build_model(model_cfg), train_cfg)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-4, 1e-4), (1e-5, 1e-4)]


def test_the_learning_rate_warms_up_over_2000_steps_and_never_drops():
    """LinearWarmup(2000): (step + 1) / 2000 from the first step, then MultiStepLR's milestone 1000
    (epochs), which no run reaches, also under a time budget."""
    train = resolve(None, {"train": {"model": "rtdetr_r18"}})[3]
    assert (train.warmup_steps, train.warmup, train.lr_drop) == (2000, 0.0, 1000)
    factors = [engine.lr_factor(0.01, train, step) for step in (0, 999, 1998, 1999, 5000)]
    assert factors == pytest.approx([1 / 2000, 0.5, 1999 / 2000, 1.0, 1.0])
    assert engine.lr_factor(0.999, train, 10 ** 6) == 1.0
    assert engine.lr_factor(0.9, dataclasses.replace(train, minutes=5.0), 10 ** 6) == 1.0
    # The warm-up multiplies the schedule: a drop at epoch 1 of 2 during it.
    drop = dataclasses.replace(train, epochs=2, lr_drop=1, warmup_steps=10)
    assert engine.lr_factor(0.6, drop, 4) == pytest.approx(0.05) and engine.lr_factor(0.4, drop, 4) == 0.5
    paper = resolve("paper", {})[3]  # DETR's: no warm-up, the drop at 2/3
    assert [engine.lr_factor(p, paper, 7) for p in (0.6, 0.7)] == [1.0, pytest.approx(0.1)]
    with pytest.raises(ValueError, match="warmup .* and warmup_steps .* are both set"):
        resolve("fast", {"train": {"warmup_steps": 100}})
    assert resolve("fast", {"train": {"warmup_steps": 100, "warmup": 0}})[3].warmup_steps == 100


def test_train_with_every_option_then_eval_predict_export_explain(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_data(shapes), *TINY, "--epochs", "1", "--batch-size", "2", "--out", str(run),
                 "--denoising-queries", "0", "--denoising", "2", "--encoder-repeats", "2", "--hybrid-queries", "4",
                 "--class-loss", "focal", "--num-points", "3", "2", "1", "--sampling-method", "discrete"]) == 0
    header, row = (line.split(",") for line in (run / "results.csv").read_text().splitlines()[:2])
    for key in ("train_loss_ce_dn", "train_loss_ce_hybrid", "train_loss_ce_enc", "train_loss_giou", "AP"):
        assert key in header, key
    assert float(dict(zip(header, row))["lr"]) == pytest.approx(1e-4 * 2 / 2000)  # step 2 of the recipe's warm-up
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


def test_resume_in_the_middle_of_an_epoch_continues_exactly(shapes, tmp_path, monkeypatch):
    """4 steps straight equal 3 steps, Ctrl-C, resume, 1 step: the recipe's EMA, its denoising
    queries (random noise), square multi-scale augmentation, trained BatchNorm."""
    common = ["--train-json", str(shapes["train_json"]), "--train-images", str(shapes["train_images"]), *TINY,
              "--batch-size", "2", "--epochs", "2", "--ema-warmup", "2"]
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0
    real_step = engine.Trainer.forward_backward
    steps = []

    def ctrl_c_in_step_3(self, micro_batches):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, micro_batches)

    monkeypatch.setattr(engine.Trainer, "forward_backward", ctrl_c_in_step_3)
    assert main(["train", *common, "--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(engine.Trainer, "forward_backward", real_step)
    assert main(["train", "--resume", str(tmp_path / "b")]) == 0
    a, b = load_file(tmp_path / "a" / "last" / "model.safetensors"), load_file(tmp_path / "b" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA
    a = torch.load(tmp_path / "a" / "last" / "train_state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last" / "train_state.pt", weights_only=True)
    assert a["ema_updates"] == b["ema_updates"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the raw weights
    assert all(torch.equal(a["aids"][k], b["aids"][k]) for k in a["aids"]) and "denoising.label_embed.weight" in a["aids"]


def test_two_processes_equal_one_process_accumulating_the_same_micro_batches(synthetic, tmp_path):
    """torchrun, 2 Gloo processes x 1 image against 1 process x 1 image x 2 accumulated: the same
    BatchNorm batches (RT-DETR trains its encoder's BatchNorm on batch statistics; on CPUs they are
    not synchronised across processes), the same normalisers (all-reduced), so the same step."""
    shapes = synthetic(2, 1)
    flags = [*_data(shapes, val=False), *TINY, "--augment", "flip", "--epochs", "1", "--denoising-queries", "0",
             "--hybrid-queries", "4", "--batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "detrkit", "train", *flags, "--out", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert main(["train", *flags, "--accumulate", "2", "--out", str(tmp_path / "one")]) == 0
    ddp = torch.load(tmp_path / "ddp" / "last" / "train_state.pt", weights_only=True)["model"]  # raw weights (EMA on)
    one = torch.load(tmp_path / "one" / "last" / "train_state.pt", weights_only=True)["model"]
    params = {n for n, _ in build_model(preset("rtdetr_tiny", num_classes=4)).named_parameters()}
    init = build_model(preset("rtdetr_tiny", num_classes=4)).state_dict()
    assert sum(not torch.allclose(one[k], init[k]) for k in params) > 20  # the step moved the weights
    # Adam's first step moves a weight by lr * g / (|g| + 1e-8): where a gradient is within rounding
    # of 0 (a few BatchNorm-trained convolution weights), rounding decides how far. Elsewhere: equal.
    diff = torch.cat([(ddp[k] - one[k]).abs().flatten() for k in params])
    assert diff.max() <= 1e-4 and (diff > 1e-6).float().mean() < 1e-3
    rows = [(tmp_path / run / "results.csv").read_text().splitlines() for run in ("ddp", "one")]
    header = rows[0][0].split(",")
    losses = [{k: v for k, v in zip(header, r[1].split(",")) if k.startswith("train_")} for r in rows]
    assert losses[0] == losses[1] and float(losses[0]["train_loss"]) > 0  # the whole step's losses, on both


def _hf_tiny(folder: Path, num_labels: int) -> torch.nn.Module:
    """A Hugging Face RT-DETR with a quarter-width, one-block-per-stage ResNet-vd, saved with save_pretrained."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection

    backbone = dict(model_type="rt_detr_resnet", depths=[1, 1, 1, 1], layer_type="basic",
                    hidden_sizes=[16, 32, 64, 128], embedding_size=16, out_indices=[2, 3, 4])
    config = RTDetrConfig(backbone_config=backbone, encoder_in_channels=[32, 64, 128], encoder_hidden_dim=32,
                          encoder_ffn_dim=64, d_model=32, decoder_ffn_dim=64, encoder_attention_heads=4,
                          decoder_attention_heads=4, decoder_layers=2, num_queries=10, decoder_n_points=2,
                          hidden_expansion=0.5, num_labels=num_labels, decoder_in_channels=[32, 32, 32],
                          use_pretrained_backbone=False)
    torch.manual_seed(0)
    model = RTDetrForObjectDetection(config)
    model.save_pretrained(folder)
    return model


def test_fine_tuning_a_hugging_face_folder(shapes, tmp_path, capsys):
    """Other classes: every class head starts afresh; the checkpoint's own classes (ids 0..3): every
    head is kept and the denoising label table starts from the checkpoint's. lr 0: nothing moves."""
    pytest.importorskip("transformers")
    hf = _hf_tiny(tmp_path / "hf", num_labels=4)
    train = ["--image-size", "64", "--workers", "0", "--device", "cpu", "--batch-size", "2", "--epochs", "1",
             "--lr", "0", "--lr-backbone", "0", "--weights", str(tmp_path / "hf")]
    assert main(["train", *_data(shapes, val=False), *train, "--out", str(tmp_path / "other")]) == 0
    start = load_model(tmp_path / "hf").state_dict()  # the Hugging Face weights in our names
    tuned = torch.load(tmp_path / "other" / "last" / "train_state.pt", weights_only=True)["model"]
    assert tuned["decoder.class_embed.0.weight"].shape == (4, 32)
    assert not torch.equal(tuned["decoder.class_embed.0.weight"], start["decoder.class_embed.0.weight"])
    assert not torch.equal(tuned["decoder.enc_class.weight"], start["decoder.enc_class.weight"])
    assert torch.equal(tuned["decoder.layers.0.linear1.weight"], start["decoder.layers.0.linear1.weight"])
    assert "new class head for 4 classes" in capsys.readouterr().out
    # Hugging Face freezes this ResNet-18-vd's BatchNorm; the recipe trains it, as the release's R18:
    # the frozen statistics and affine loaded, then batch statistics (2 steps of batch 2).
    assert load_model(tmp_path / "hf").config.backbone_norm == "frozen"
    assert load_model(tmp_path / "other" / "last").config.backbone_norm == "batch"
    assert tuned["backbone.stem.0.bn.num_batches_tracked"] == 2
    assert torch.equal(tuned["backbone.stem.0.bn.weight"], start["backbone.stem.0.bn.weight"])  # lr 0

    data = json.loads(Path(shapes["train_json"]).read_text())  # the same images, category ids 0..3
    ids = {c["id"]: i for i, c in enumerate(data["categories"])}
    data["categories"] = [{**c, "id": ids[c["id"]]} for c in data["categories"]]
    data["annotations"] = [{**a, "category_id": ids[a["category_id"]]} for a in data["annotations"]]
    (tmp_path / "same.json").write_text(json.dumps(data))
    assert main(["train", "--train-json", str(tmp_path / "same.json"), "--train-images", str(shapes["train_images"]),
                 *train, "--out", str(tmp_path / "same")]) == 0
    state = torch.load(tmp_path / "same" / "last" / "train_state.pt", weights_only=True)
    assert torch.equal(state["model"]["decoder.class_embed.0.weight"], start["decoder.class_embed.0.weight"])
    assert torch.equal(state["aids"]["denoising.label_embed.weight"], hf.model.denoising_class_embed.weight[:4])
    assert "denoising.label_embed.weight from" in capsys.readouterr().out
