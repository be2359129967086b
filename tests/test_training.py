"""The training loop: gradient accumulation, EMA, early stopping, mid-epoch resume, the sample order."""
import copy
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

import detrkit.engine as engine
from detrkit.checkpoint import load_model, save_model
from detrkit.cli import main
from detrkit.config import load_run_config
from detrkit.presets import preset, resolve
from detrkit.data.sampler import EpochSampler
from detrkit.data.build import auto_image_size
from detrkit.data.transforms import IoUCrop, Mosaic
from detrkit.ema import ModelEMA
from detrkit.evaluate import METRIC_KEYS
from detrkit.model.build import build_model
from detrkit.run import initial_model, plan
from detrkit.run import train as train_run


@pytest.fixture(scope="module")
def shapes(synthetic):
    return synthetic(4, 4)


def _run(shapes, out, *, val=True, data=None, **train):
    """run.train on the synthetic set with the tiny preset, dropout off, flip-only augmentation
    (every image keeps its 64 x 64 size, so batches need no padding); ``data``: more DataConfig fields."""
    data = {"train_json": str(shapes["train_json"]), "train_images": str(shapes["train_images"]),
            "image_size": 64, "workers": 0, "augment": "flip", **(data or {})}
    if val:
        data |= {"val_json": str(shapes["val_json"]), "val_images": str(shapes["val_images"])}
    cfg = resolve(None, {"train": {"model": "detr_r18_tiny", "epochs": 1, "out": str(out), "device": "cpu", **train},
                         "data": data, "model": {"dropout": 0.0}})
    return train_run(*cfg)


def _rows(run):
    lines = (run / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


def test_accumulating_two_batches_of_2_equals_one_batch_of_4(shapes, tmp_path):
    # One optimiser step on the four images of the training set, in the same order.
    big = _run(shapes, tmp_path / "big", val=False, batch_size=4)
    acc = _run(shapes, tmp_path / "acc", val=False, batch_size=2, accumulate=2)
    a, b = load_file(big / "last" / "model.safetensors"), load_file(acc / "last" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    (ra,), (rb,) = _rows(big), _rows(acc)
    assert ra["steps"] == rb["steps"] == "1"
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou"):
        # The logged loss of the step is that of all four images: the normalisers span both micro-batches.
        assert float(ra[key]) == pytest.approx(float(rb[key]), abs=2e-5), key


def test_ema_is_evaluated_and_saved_beside_the_raw_weights(shapes, tmp_path):
    run = _run(shapes, tmp_path / "ema", batch_size=4, ema=True, ema_decay=0.5, ema_warmup=0)
    ema = load_file(run / "last" / "model.safetensors")
    raw = torch.load(run / "last" / "train_state.pt", weights_only=True)["model"]
    # The run's first model: the same seed and builder (tiny preset, 4 classes) as run.train.
    torch.manual_seed(42)
    model_cfg, _, _, train_cfg = resolve(None, {"train": {"model": "detr_r18_tiny"}, "model": {"dropout": 0.0}})
    classes = [{"id": i, "name": str(i)} for i in (1, 2, 3, 5)]
    init = initial_model(model_cfg, train_cfg, classes).state_dict()
    moved = [k for k in raw if not torch.equal(raw[k], init[k])]
    assert len(moved) > 20  # the step changed the raw weights ...
    for k in moved:  # ... and the average is halfway between the first and the new ones (decay 0.5, one step)
        assert not torch.equal(ema[k], raw[k]), k
        assert torch.allclose(ema[k], 0.5 * init[k] + 0.5 * raw[k], atol=1e-6), k
    # What the run reported is the EMA's evaluation; best/ holds the EMA too.
    reported = json.loads((run / "metrics.json").read_text())
    data = {"val_json": str(shapes["val_json"]), "val_images": str(shapes["val_images"]), "workers": 0}
    metrics, detections = engine.evaluate_model(load_model(run / "last"), data, batch_size=4, device="cpu")
    assert {k: metrics[k] for k in METRIC_KEYS} == {k: reported[k] for k in METRIC_KEYS}
    assert detections == json.loads((run / "detections.json").read_text())
    assert torch.equal(load_file(run / "best" / "model.safetensors")["class_embed.weight"], ema["class_embed.weight"])
    raw_model = load_model(run / "last")
    raw_model.load_state_dict(raw)
    _, raw_detections = engine.evaluate_model(raw_model, data, batch_size=4, device="cpu")
    assert raw_detections != detections


def test_patience_stops_when_ap_stops_improving(shapes, tmp_path):
    # lr 0: the weights (and so AP) never change, so AP stops improving after the first epoch.
    run = _run(shapes, tmp_path / "p", batch_size=4, lr=0.0, lr_backbone=0.0, epochs=5, patience=1)
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]


def test_resume_in_the_middle_of_an_epoch_continues_exactly(shapes, tmp_path, monkeypatch):
    """4 steps straight equal: 3 steps, Ctrl-C (in the middle of epoch 2), resume, 1 step: weights, EMA, losses.

    Dropout on, the official multi-scale augmentation and mosaics: the random states, the sampler
    position and each image's augmentation must all be restored."""
    common = ["--train-json", str(shapes["train_json"]), "--train-images", str(shapes["train_images"]),
              "--model", "detr_r18_tiny", "--image-size", "64", "--batch-size", "2", "--workers", "0",
              "--epochs", "2", "--ema", "--ema-warmup", "2", "--device", "cpu", "--mosaic", "0.5", "--mosaic-until", "1"]
    assert main(["train", *common, "--out", str(tmp_path / "a")]) == 0

    real_step = engine.Trainer.forward_backward
    steps = []

    def ctrl_c_in_step_3(self, micro_batches):
        steps.append(1)
        if len(steps) == 3:  # Ctrl-C during step 3: the loop finishes the step, saves and stops
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, micro_batches)

    monkeypatch.setattr(engine.Trainer, "forward_backward", ctrl_c_in_step_3)
    assert main(["train", *common, "--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(engine.Trainer, "forward_backward", real_step)
    saved = torch.load(tmp_path / "b" / "last" / "train_state.pt", weights_only=True)
    assert (saved["epoch"], saved["position"], saved["step"]) == (1, 2, 3)  # in the middle of epoch 2
    assert main(["train", "--resume", str(tmp_path / "b")]) == 0

    a, b = load_file(tmp_path / "a" / "last" / "model.safetensors"), load_file(tmp_path / "b" / "last" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA
    a = torch.load(tmp_path / "a" / "last" / "train_state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last" / "train_state.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the raw weights
    assert a["ema_updates"] == b["ema_updates"] == 4
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "a")] == \
           [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "b")]


def test_mosaics_stop_at_mosaic_until(shapes, tmp_path, monkeypatch, capsys):
    """Two epochs of 4 images, mosaics until half of training: 4 in epoch 1, none in epoch 2 (8 if it never stopped)."""
    made = []
    real = Mosaic.__call__
    monkeypatch.setattr(Mosaic, "__call__", lambda self, samples: made.append(1) or real(self, samples))
    run = _run(shapes, tmp_path / "m", val=False, batch_size=4, epochs=2, data={"mosaic": 1.0, "mosaic_until": 0.5})
    assert len(made) == 4
    assert torch.load(run / "last" / "train_state.pt", weights_only=True)["mosaic_stopped"] == 1
    assert "mosaic off from epoch 2 (50% of training done)" in capsys.readouterr().out


def test_the_augmentation_stops_at_augment_stop_epoch(shapes, tmp_path, monkeypatch, capsys):
    """Two epochs of 4 images with RT-DETR's augmentation stopped for the last epoch (-1): every image of
    epoch 1 goes through its IoU crop step, none of epoch 2 (8 if it never stopped)."""
    seen = []
    real = IoUCrop.forward
    monkeypatch.setattr(IoUCrop, "forward", lambda self, *inputs: seen.append(1) or real(self, *inputs))
    _run(shapes, tmp_path / "s", val=False, batch_size=4, epochs=2,
         data={"augment": "rtdetr", "augment_stop_epoch": -1, "resize": "square"})
    assert len(seen) == 4
    assert "augmentation 'rtdetr' off from epoch 2: flip and resize only" in capsys.readouterr().out


def test_fp16_on_a_cpu_is_a_clear_error(shapes, tmp_path, capsys):
    assert main(["train", "--train-json", str(shapes["train_json"]), "--train-images", str(shapes["train_images"]),
                 "--precision", "fp16", "--device", "cpu", "--out", str(tmp_path / "x")]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err


def test_the_fp16_loss_scaler_clips_true_gradients_and_its_skipped_steps_leave_the_ema():
    """The fp16 step (CUDA only in `train`) on its own, with PyTorch's CPU loss scaler."""
    torch.manual_seed(0)
    x = torch.randn(8, 4)

    def trainer(scaler):
        net = torch.nn.Linear(4, 2)
        net.load_state_dict(first)  # both trainers start from the same weights
        cfg = resolve(None, {"train": {"clip": 0.1, "lr": 0.1}})[3]
        optimizer = engine.make_optimizer(net, cfg)  # the training's own AdamW (fused), with the scaler
        return engine.Trainer(net, net, net, None, optimizer, cfg, torch.device("cpu"), scaler,
                              ModelEMA(net, decay=0.5, warmup=0))

    first = torch.nn.Linear(4, 2).state_dict()
    plain, scaled = trainer(None), trainer(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    plain.model(x).pow(2).sum().backward()
    assert torch.cat([p.grad.flatten() for p in plain.model.parameters()]).norm() > 1  # clipping to 0.1 acts
    scaled.scaler.scale(scaled.model(x).pow(2).sum()).backward()
    plain.optimizer_step()
    scaled.optimizer_step()
    # Unscaled before clipping: the same step as without a scaler (scaling by 2^12 is exact).
    for a, b in zip(plain.model.parameters(), scaled.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    # An overflowing step is skipped: weights and EMA unchanged, the scale halved.
    weights = copy.deepcopy(scaled.model.state_dict())
    ema = copy.deepcopy(scaled.ema.module.state_dict())
    (scaled.scaler.scale(scaled.model(x).sum()) * float("inf")).backward()
    scaled.optimizer_step()
    assert scaled.scaler.get_scale() == 2.0 ** 11
    for k in weights:
        assert torch.equal(scaled.model.state_dict()[k], weights[k])
        assert torch.equal(scaled.ema.module.state_dict()[k], ema[k])
    # The next finite step moves both again.
    scaled.scaler.scale(scaled.model(x).pow(2).sum()).backward()
    scaled.optimizer_step()
    assert not torch.equal(scaled.model.weight, weights["weight"])
    assert not torch.equal(scaled.ema.module.weight, ema["weight"])


@pytest.mark.parametrize("size,world", [(1, 1), (8, 2), (13, 2), (13, 3), (5, 8)])
def test_sampler_is_distributed_samplers_order_and_resumes_at_any_position(size, world):
    for epoch in (0, 3):
        full = []
        for rank in range(world):
            reference = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=7)
            reference.set_epoch(epoch)
            ours = EpochSampler(size, seed=7, epoch=epoch, rank=rank, world=world)
            assert list(ours) == list(reference) and len(ours) == len(reference)
            full.append(list(ours))
        # Resumed after k steps of batch 2: each process continues where it was.
        for k in range(len(full[0]) // 2 + 1):
            for rank in range(world):
                assert list(EpochSampler(size, seed=7, epoch=epoch, position=2 * k * world, rank=rank,
                                         world=world)) == full[rank][2 * k:]
        # Resumed with another number of processes: every process takes the same number of samples,
        # together covering the rest of the epoch.
        position = 2 * world
        rest = EpochSampler(size, seed=7, epoch=epoch).order()[position:]  # one process: no padding
        for other in (1, 2, 3):
            shares = [EpochSampler(size, seed=7, epoch=epoch, position=position, rank=r, world=other)
                      for r in range(other)]
            assert len({len(s) for s in shares}) == 1 and all(len(list(s)) == len(s) for s in shares)
            assert set(rest) <= set().union(*map(list, shares))
            assert bool(rest) == any(len(s) for s in shares)


def _coco_set(tmp_path, sizes, crowded=0):
    """Black PNGs of the given ``(h, w)`` sizes, one 8 px box each, ``crowded`` boxes in the first."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir(parents=True)
    images, anns = [], []
    for i, (h, w) in enumerate(sizes, 1):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        for j in range(crowded if i == 1 and crowded else 1):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "area": 64.0, "iscrowd": 0,
                         "bbox": [10 * (j % 5), 10 * (j // 5), 8, 8]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return {"train_json": str(path), "train_images": str(root)}


def test_auto_image_size_is_the_median_shorter_side_never_enlarged_at_most_the_cap(tmp_path):
    from detrkit.config import AUTO_IMAGE_SIZE, DataConfig

    small = _coco_set(tmp_path / "small", [(64, 80), (48, 64), (70, 60)])
    assert auto_image_size(DataConfig(**small), "two_stage") == 60  # median of 64, 48, 60
    assert auto_image_size(DataConfig(**small), "rtdetr") == 60  # never enlarged
    large = _coco_set(tmp_path / "large", [(300, 400), (1000, 900), (800, 700)])  # median shorter side 700
    assert AUTO_IMAGE_SIZE["two_stage"] == AUTO_IMAGE_SIZE["detr"] < 300
    assert auto_image_size(DataConfig(**large), "two_stage") == AUTO_IMAGE_SIZE["two_stage"]
    # The multi-scale family's cost grows with the pixels, not their square: it keeps more of them.
    assert 300 < AUTO_IMAGE_SIZE["rtdetr"] < 700
    assert auto_image_size(DataConfig(**large), "rtdetr") == AUTO_IMAGE_SIZE["rtdetr"]
    with pytest.raises(ValueError, match="auto"):
        DataConfig(image_size="big")


def test_a_new_model_gets_a_query_for_every_object_and_auto_size_is_recorded(tmp_path):
    data = _coco_set(tmp_path / "d", [(64, 64)] * 3, crowded=13)  # the tiny preset has 10 queries
    cfg = resolve(None, {"train": {"model": "detr_r18_tiny", "epochs": 1, "out": str(tmp_path / "run"),
                                   "device": "cpu", "batch_size": 3},
                         "data": {**data, "image_size": "auto", "workers": 0, "augment": "flip"}})
    folder = train_run(*cfg)
    saved = load_run_config(folder)
    assert saved[0].num_queries == 20 and saved[2].image_size == 64
    model = load_model(folder / "last")
    assert model.num_queries == 20 and model.inference["image_size"] == 64


def test_the_papers_model_from_random_weights_on_a_cpu_points_to_the_fast_recipe(shapes, tmp_path, capsys):
    data = {"train_json": str(shapes["train_json"]), "train_images": str(shapes["train_images"]), "image_size": 64}

    def notes(device="cpu", **train) -> list[str]:
        cfg = resolve(None, {"train": {"model": "detr_r18_tiny", "out": str(tmp_path), **train}, "data": data})
        capsys.readouterr()
        plan(*cfg, torch.device(device))
        return [line for line in capsys.readouterr().out.splitlines() if "hundreds of epochs" in line]

    assert notes() == ["note: detr_r18_tiny from random weights learns over hundreds of epochs (the paper: 300-500 "
                       "on 16 GPUs); on a CPU, --recipe fast trains a model that learns in minutes"]
    assert notes(model="detr_r18_fast") == []  # the fast recipe's model
    assert notes(backbone_weights="resnet18.pth") == [] and notes(resume=True) == []
    assert notes(device="cuda") == []
    save_model(build_model(preset("detr_r18_tiny", num_classes=4)), tmp_path / "w")
    assert notes(weights=str(tmp_path / "w")) == []  # fine-tuning


def test_auto_size_on_large_images_names_the_multi_scale_preset(tmp_path, capsys):
    """Images scaled down to DETR's cap: the plan says so and names rtdetr_n; an RT-DETR keeps them."""
    data = {**_coco_set(tmp_path / "large", [(300, 400), (320, 330), (310, 500)]), "image_size": "auto"}

    def planned(model: str) -> tuple[int, list[str]]:
        cfg = resolve("fast", {"train": {"model": model, "out": str(tmp_path / model)}, "data": data})
        capsys.readouterr()
        p = plan(*cfg, torch.device("cpu"))
        return p.data.image_size, [line for line in capsys.readouterr().out.splitlines() if "rtdetr_n" in line]

    size, hints = planned("detr_r18_tiny")
    assert size == 256 and len(hints) == 1 and "scaled down to 256 px" in hints[0]
    assert planned("rtdetr_tiny") == (310, [])  # the median shorter side, under RT-DETR's cap


def test_the_fast_recipe_trains_the_cpu_sized_rtdetr_at_any_image_size(tmp_path):
    """--recipe fast with no --model: rtdetr_n, auto-sized up to its family's cap (small images at
    their own size, large ones up to 640 px); a model the user names wins."""
    large = _coco_set(tmp_path / "large", [(700, 900), (720, 730), (710, 800)])  # median shorter side 710
    small = _coco_set(tmp_path / "small", [(128, 128), (120, 160), (130, 140)])  # median shorter side 128

    def chosen(data: dict, **train) -> tuple[str, str, int]:
        cfg = resolve("fast", {"train": {"out": str(tmp_path / "run"), **train}, "data": data})
        return cfg[3].model, cfg[0].arch, plan(*cfg, torch.device("cpu")).data.image_size

    assert chosen(large) == ("rtdetr_n", "rtdetr", 640)  # scaled down to the family's cap
    assert chosen(small) == ("rtdetr_n", "rtdetr", 128)  # at their own size
    assert chosen(small, model="detr_r18_fast")[:2] == ("detr_r18_fast", "two_stage")  # the user's choice
