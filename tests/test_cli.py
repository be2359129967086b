"""End-to-end: the command line on tiny data made here (seconds per test)."""
import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit import cli, load_model
from detrkit.cli import main
from detrkit.config import DataConfig, LossConfig, TrainConfig

TRAIN_FLAGS = ["--model", "detr_r18_tiny", "--image-size", "64", "--batch-size", "4", "--workers", "0"]


@pytest.fixture(scope="module")
def shapes(synthetic):
    return synthetic(12, 6)


def _data_flags(paths):
    return ["--train-json", str(paths["train_json"]), "--train-images", str(paths["train_images"]),
            "--val-json", str(paths["val_json"]), "--val-images", str(paths["val_images"])]


def test_train_resume_eval_predict(shapes, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *_data_flags(shapes), *TRAIN_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    for name in ("config.yaml", "results.csv", "results.png", "metrics.json", "detections.json"):
        assert (run / name).exists(), name
    assert (run / "last" / "train_state.pt").exists() and (run / "best" / "model.safetensors").exists()
    assert (run / "best" / "metrics.json").exists()  # the best checkpoint carries its own numbers
    assert (run / "best" / "f1_curve.json").exists() and (run / "best" / "confusion_matrix.png").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
                            "per_class"}
    # Resume continues at epoch 2 with the saved configuration.
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    rows = (run / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[2].startswith("2,")
    # eval and predict through the command line.
    assert main(["eval", "--weights", str(run / "best"), "--val-json", str(shapes["val_json"]),
                 "--val-images", str(shapes["val_images"]), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["AR100"] >= 0
    for name in ("per_class.csv", "pr_curves.png", "confusion_matrix.png", "confusion_matrix.json", "f1_curve.png",
                 "f1_curve.json"):
        assert (tmp_path / "eval" / name).exists(), name
    found = json.loads((tmp_path / "eval" / "f1_curve.json").read_text())["best"]["f1"] > 0
    # The console names the best threshold, or says there is none (a model this young may find nothing).
    assert ("use detrkit predict --threshold" if found else "no detection overlaps") in capsys.readouterr().out
    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert {d["category_id"] for d in detections} <= {1, 2, 3, 5}  # the data set's own ids
    assert main(["predict", "--weights", str(run / "best"), str(shapes["val_images"]), "--threshold", "0",
                 "--out", str(tmp_path / "pred")]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == 6
    records = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert len(records) == 6 and all(len(r["detections"]) == 10 for r in records)  # threshold 0 keeps every query
    capsys.readouterr()
    monkeypatch.setattr("detrkit.distributed.cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # a CPU without AMX
    assert main(["predict", "--weights", str(run / "best"), str(shapes["val_images"]), "--precision", "bf16",
                 "--device", "cpu", "--out", str(tmp_path / "pred16")]) == 0
    assert "without AMX" in capsys.readouterr().err


def test_bf16_on_a_cpu_without_amx_gets_a_note(monkeypatch, capsys):
    import detrkit.distributed as devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    devices.note_slow_bf16("bf16", "cpu")
    assert "without AMX" in capsys.readouterr().err
    devices.note_slow_bf16("fp32", "cpu")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    devices.note_slow_bf16("bf16", "cpu")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(devices, "cpu_flags", lambda: set())  # not Linux: nothing known, nothing said
    devices.note_slow_bf16("bf16", "cpu")
    assert capsys.readouterr().err == ""


def test_check_data_and_errors(shapes, tmp_path, capsys):
    assert main(["check-data", *_data_flags(shapes)]) == 0
    assert "no problems" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["check-data", "--train-json", str(bad), "--train-images", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "Traceback" not in err
    assert main(["train", "--data", str(tmp_path / "missing"), *TRAIN_FLAGS]) == 2
    assert main(["eval", "--weights", str(tmp_path / "nothing"), "--data", str(tmp_path)]) == 2
    assert main(["eval", "--weights", str(tmp_path / "nothing"), "--data", str(tmp_path), "--iou-threshold", "2"]) == 2
    assert "--iou-threshold must be in [0, 1]" in capsys.readouterr().err


def _subcommands() -> dict:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_help_documents_every_flag():
    """Every flag of every command has help; every TrainConfig, LossConfig and DataConfig field is a
    `train` flag, showing the dataclass's default."""
    commands = _subcommands()
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings or action.dest)
    train = {a.dest: a for a in commands["train"]._actions}
    special = {"resume": "RUN_DIR", "check_images": "do not open", "ema": "(default: off)", "log": "(default: none)"}  # not plain value flags
    for cls in (TrainConfig, LossConfig, DataConfig):
        for f in dataclasses.fields(cls):
            assert f.name in train, f"{cls.__name__}.{f.name} has no `train` flag"
            shown = special.get(f.name, f"(default: {f.default})")
            assert shown in (train[f.name].help + (train[f.name].metavar or "")), (f.name, train[f.name].help)
    out = subprocess.run([sys.executable, "-m", "detrkit", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--cost-class", "--class-cost-formula", "--eos-coef", "--dn-box-noise", "--conditional-attention"):
        assert flag in out.stdout, flag
    assert "(default: 0.0001)" in out.stdout  # defaults come from the config dataclasses
    out = subprocess.run([sys.executable, "-m", "detrkit", "explain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("IMAGE", "--weights", "--points", "--threshold", "--max-objects", "--out", "--matching", "--data",
                 "--train-json", "--train-images", "--split", "--index", "--cost-class", "--cost-bbox", "--cost-giou"):
        assert flag in out.stdout, flag


def test_yaml_config_and_saved_config(shapes, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: detr_r18_tiny\nepochs: 1\nbatch_size: 4\nlr: 0.0003\nimage_size: 64\nworkers: 0\n"
                   "bbox_loss: smooth_l1\n")
    assert main(["train", "--config", str(cfg), *_data_flags(shapes), "--out", str(tmp_path / "r")]) == 0
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "lr: 0.0003" in saved and "bbox_loss: smooth_l1" in saved and "image_size: 64" in saved
    bad = tmp_path / "bad.yaml"
    bad.write_text("lrr: 1\n")
    assert main(["train", "--config", str(bad), *_data_flags(shapes)]) == 2


def _external_coco(root: Path) -> dict:
    """A COCO set as another tool would write it: non-contiguous ids, word names, grayscale PNG
    and RGB JPEG, non-square sizes, empty images, crowd boxes, file_name in a sub-folder."""
    rng = np.random.default_rng(0)
    (root / "imgs" / "sub").mkdir(parents=True)
    cats = [{"id": 7, "name": "bolt"}, {"id": 19, "name": "nut"}]
    images, anns = [], []
    for i in range(10):
        h, w = (60, 90) if i % 2 else (80, 50)
        arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        boxes = []
        if i % 5 != 4:  # every fifth image is empty
            for j in range(2):
                x, y = int(rng.integers(0, w - 25)), int(rng.integers(0, h - 25))
                arr[y:y + 20, x:x + 20] = 220 if j == 0 else 120
                boxes.append((x, y, 20, 20, cats[j]["id"]))
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.jpg"
        img = Image.fromarray(arr)
        (img.convert("L") if i % 2 else img).save(root / "imgs" / name)
        images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
        for x, y, bw, bh, c in boxes:
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": c, "bbox": [x, y, bw, bh],
                         "area": bw * bh, "iscrowd": 0})
        if i == 3:
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 7, "bbox": [0, 0, 30, 30],
                         "area": 900, "iscrowd": 1})
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return {"json": path, "images": root / "imgs"}


def test_external_coco_set_trains_evaluates_predicts(tmp_path):
    ext = _external_coco(tmp_path / "ext")
    flags = ["--train-json", str(ext["json"]), "--train-images", str(ext["images"]),
             "--val-json", str(ext["json"]), "--val-images", str(ext["images"])]
    run = tmp_path / "run"
    assert main(["train", *flags, *TRAIN_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    assert main(["eval", "--weights", str(run / "best"), *flags[4:], "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    dets = json.loads((tmp_path / "ev" / "detections.json").read_text())
    assert {d["category_id"] for d in dets} <= {7, 19}
    assert [c["name"] for c in metrics["per_class"]] == ["bolt", "nut"]
    # The written numbers are pycocotools' own evaluation of the written detections.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(ext["json"]))
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "ev" / "detections.json")), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    for key, value in zip(("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
                          ev.stats):
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert main(["predict", "--weights", str(run / "best"), str(ext["images"] / "sub" / "*.png"),
                 "--out", str(tmp_path / "pred"), "--threshold", "0"]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == 5


def test_a_trivially_easy_set_is_learned(tmp_path):
    """A few hundred steps on one large bright square per image: the loss falls and AP rises."""
    rng = np.random.default_rng(0)
    root = tmp_path / "easy"
    (root / "img").mkdir(parents=True)
    images, anns = [], []
    for i in range(32):
        arr = np.zeros((64, 64, 3), np.uint8)
        s = int(rng.integers(28, 44))
        x, y = int(rng.integers(0, 64 - s)), int(rng.integers(0, 64 - s))
        arr[y:y + s, x:x + s] = 255
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        anns.append({"id": i + 1, "image_id": i, "category_id": 1, "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0})
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns,
                                               "categories": [{"id": 1, "name": "square"}]}))
    flags = ["--train-json", str(root / "ann.json"), "--train-images", str(root / "img"),
             "--val-json", str(root / "ann.json"), "--val-images", str(root / "img")]
    run = tmp_path / "run"
    assert main(["train", *flags, *TRAIN_FLAGS[:-4], "--batch-size", "8", "--workers", "0", "--image-size", "64",
                 "--epochs", "60", "--eval-every", "60", "--lr", "5e-4", "--lr-backbone", "5e-4",
                 "--schedule", "cosine", "--augment", "flip", "--out", str(run)]) == 0
    lines = (run / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    first, last = dict(zip(header, lines[1].split(","))), dict(zip(header, lines[-1].split(",")))
    assert float(last["train_loss"]) < 0.6 * float(first["train_loss"]), (first, last)
    # Plain DETR after 240 steps from random weights: AP50 0.35-0.41 over seeds 42 and 1 with flip-only
    # augmentation (0.2-0.7 with the official crops, too noisy to test); an untrained model scores ~0.
    assert float(last["AP50"]) > 0.2, last


def test_python_api_mirrors_the_cli(shapes, tmp_path):
    import detrkit

    run = detrkit.train(**{k: str(v) for k, v in shapes.items()}, model="detr_r18_tiny", image_size=64,
                        batch_size=4, workers=0, epochs=1, out=str(tmp_path / "api"))
    metrics = detrkit.evaluate(run / "best", val_json=str(shapes["val_json"]), val_images=str(shapes["val_images"]))
    assert 0 <= metrics["AP"] <= 1 and len(metrics["per_class"]) == 4
    model = detrkit.load_model(run / "best")
    files = sorted(Path(shapes["val_images"]).glob("*"))[:2]
    dets = model.predict(files, threshold=0.0)
    assert len(dets) == 2 and set(dets[0]) == {"boxes", "scores", "labels", "names"}
    assert set(dets[0]["names"]) <= {"circle", "square", "triangle", "star"}
    with pytest.raises(TypeError, match="unknown training options"):
        detrkit.train(epochz=3)


def test_fine_tuning_reinitialises_the_class_head(shapes, tmp_path):
    """--weights from a checkpoint with other classes keeps everything but the class head."""
    from safetensors.torch import load_file

    import detrkit
    from detrkit.config import ModelConfig

    src = detrkit.build_model(ModelConfig(backbone="resnet18", backbone_stages=3, d_model=64, nheads=4, enc_layers=1,
                                          dec_layers=2, dim_feedforward=128, num_queries=10, num_classes=91))
    detrkit.save_model(src, tmp_path / "coco")
    run = tmp_path / "ft"
    assert main(["train", *_data_flags(shapes), *TRAIN_FLAGS, "--weights", str(tmp_path / "coco"), "--epochs", "1",
                 "--lr", "0", "--lr-backbone", "0", "--out", str(run)]) == 0
    tuned = load_file(run / "last" / "model.safetensors")
    assert tuned["class_embed.weight"].shape == (5, 64)  # 4 shapes + no object
    torch.testing.assert_close(tuned["query_embed.weight"], src.query_embed.weight.detach())  # lr 0: unchanged


def test_fast_recipe_trains_and_evaluates(shapes, tmp_path):
    import yaml

    run = tmp_path / "fast"
    assert main(["train", "--recipe", "fast", *_data_flags(shapes), "--image-size", "64", "--batch-size", "4",
                 "--epochs", "1", "--out", str(run)]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["model"] == "rtdetr_n" and cfg["model"]["arch"] == "rtdetr"
    assert cfg["model"]["backbone_norm"] == "batch"
    assert cfg["data"]["augment"] == "flip" and cfg["train"]["lr"] == 5e-4 and cfg["loss"]["loss_ce"] == 2.0
    assert cfg["train"]["precision"] in ("fp32", "bf16")  # "auto" measured, and the choice recorded
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["AP"] <= 1
    dets = json.loads((run / "detections.json").read_text())
    assert len(dets) == 6 * 100  # top-100 (query, class) pairs per image
    # Flags still win over the recipe; the two-stage DETR, the recipe's model before rtdetr_n, with its own options.
    assert main(["train", "--recipe", "fast", *_data_flags(shapes), "--image-size", "64", "--batch-size", "4",
                 "--epochs", "1", "--model", "detr_r18_fast", "--lr", "1e-4", "--precision", "fp32", "--conditional-attention", "--encoder-repeats", "2",
                 "--hybrid-queries", "20", "--hybrid-repeats", "3", "--out", str(tmp_path / "f2")]) == 0
    cfg = yaml.safe_load((tmp_path / "f2" / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 1e-4 and cfg["model"]["conditional_attention"] and cfg["loss"]["encoder_repeats"] == 2
    assert cfg["train"]["precision"] == "fp32"
    assert cfg["loss"]["hybrid_queries"] == 20 and cfg["loss"]["hybrid_repeats"] == 3
    assert "train_loss_ce_hybrid" in (tmp_path / "f2" / "results.csv").read_text().splitlines()[0]
    assert any("ca_qsine_proj" in k for k in load_model(tmp_path / "f2" / "best").state_dict())


def test_train_stops_before_the_first_step_on_a_missing_image(shapes, tmp_path, capsys):
    import shutil

    data = tmp_path / "copy"
    shutil.copytree(Path(shapes["train_json"]).parent.parent, data)
    victim = sorted((data / "train").iterdir())[3]
    victim.unlink()
    flags = ["--train-json", str(data / "annotations" / "instances_train.json"), "--train-images", str(data / "train")]
    assert main(["train", *flags, *TRAIN_FLAGS, "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last").exists()  # nothing was trained


def _copy_of(shapes, dest: Path) -> dict:
    """A private copy of the shapes set (tests that change files must not touch the shared one)."""
    import shutil

    shutil.copytree(Path(shapes["train_json"]).parent.parent, dest)
    return {"json": dest / "annotations" / "instances_train.json", "images": dest / "train"}


def test_a_few_repairable_records_are_repaired_counted_and_training_goes_on(shapes, tmp_path, capsys):
    data = _copy_of(shapes, tmp_path / "data")
    coco = json.loads(data["json"].read_text())
    anns = coco["annotations"]
    x, y, w, h = anns[0]["bbox"]
    anns[0]["bbox"] = [-3.0, y, x + w + 3.0, h]  # 3 px left of the image: clamped to x = 0
    emptied = anns[-1]["image_id"]  # this image loses its boxes: all of them degenerate or outside
    coco["annotations"] = anns = [a for a in anns if a["image_id"] != emptied]
    anns += [{"id": 901, "image_id": emptied, "category_id": 1, "bbox": [10, 10, 0, 8], "iscrowd": 0},
             {"id": 902, "image_id": emptied, "category_id": 2, "bbox": [10, 10, 8, -2], "iscrowd": 0},
             {"id": 903, "image_id": 1, "category_id": 3, "bbox": [70, 70, 8, 8], "iscrowd": 0}]
    data["json"].write_text(json.dumps(coco))
    flags = ["--train-json", str(data["json"]), "--train-images", str(data["images"])]
    run = tmp_path / "run"
    assert main(["train", *flags, *TRAIN_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{data['json']}: 12 images (2 without boxes)" in out
    assert (f"repaired: 1 boxes clamped to their image (annotation id {anns[0]['id']}); dropped: 2 with zero or "
            f"negative size (annotation ids 901, 902), 1 outside their image (annotation id 903)") in out
    header, row = (run / "results.csv").read_text().splitlines()
    loss = float(dict(zip(header.split(","), row.split(",")))["train_loss"])
    assert np.isfinite(loss) and loss > 0
    from detrkit.checkpoint import load_train_state

    assert load_train_state(run / "last")["step"] == 3  # 12 images, batch 4: every step taken
    weights = load_model(run / "last").state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_an_image_broken_during_training_stops_with_one_line_naming_it(shapes, tmp_path, capsys, monkeypatch):
    """An image that passes the up-front check and then breaks: the loader process's error reaches
    the command line as one line naming the file (exit 2, no traceback)."""
    import detrkit.run as run

    data = _copy_of(shapes, tmp_path / "data")
    victim = sorted(data["images"].iterdir())[5]
    real = run.build_datasets

    def build_then_break(*args, **kwargs):
        sets = real(*args, **kwargs)  # every image is opened here
        victim.write_bytes(victim.read_bytes()[:200])
        return sets

    monkeypatch.setattr(run, "build_datasets", build_then_break)
    flags = ["--train-json", str(data["json"]), "--train-images", str(data["images"])]
    assert main(["train", *flags, *TRAIN_FLAGS, "--workers", "2", "--epochs", "1",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]  # the progress bar may come before it
    assert last_line.startswith(f"detrkit train: error: {victim}: cannot read the image"), err
    assert "Traceback" not in err and "DataLoader worker" not in err
    # --debug shows where it happened, in the loader process.
    assert main(["train", *flags, *TRAIN_FLAGS, "--workers", "2", "--epochs", "1", "--no-check-images", "--debug",
                 "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "DataLoader worker" in err and "in open_rgb" in err and err.strip().splitlines()[-1] == last_line


def _poison_losses(monkeypatch, bad_steps):
    """Make the training loss NaN at the criterion calls in ``bad_steps`` (0-based); returns the
    image ids of every batch the criterion saw."""
    import detrkit.run as run

    real = run.build_criterion
    seen: list[list[int]] = []

    def build(*args, **kwargs):
        criterion = real(*args, **kwargs)
        forward = criterion.forward

        def poisoned(outputs, targets, *args):
            losses = forward(outputs, targets, *args)
            if len(seen) in bad_steps:
                losses["loss"] = losses["loss"] * float("nan")
            seen.append([t["image_id"] for t in targets])
            return losses

        criterion.forward = poisoned
        return criterion

    monkeypatch.setattr(run, "build_criterion", build)
    return seen


def test_non_finite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(shapes, tmp_path, monkeypatch, capsys):
    """Epoch 1 (6 batches): batches 2 and 4 give NaN and are skipped with a warning. Epoch 2: every
    batch gives NaN, and the K-th in a row stops the run with a checkpoint and names the batch."""
    from detrkit.checkpoint import load_train_state
    from detrkit.engine import MAX_BAD_STEPS

    seen = _poison_losses(monkeypatch, bad_steps={1, 3, *range(6, 100)})
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="non-finite loss") as caught:
        assert main(["train", *_data_flags(shapes)[:4], *TRAIN_FLAGS, "--batch-size", "2", "--epochs", "3",
                     "--out", str(run)]) == 2
    assert len(seen) == 6 + MAX_BAD_STEPS  # stopped at the K-th bad batch in a row
    assert len([w for w in caught if "non-finite loss" in str(w.message)]) == 2 + MAX_BAD_STEPS
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"detrkit train: error: {MAX_BAD_STEPS} non-finite losses in a row (last batch: image ids "
                   f"{seen[-1]}); lower --lr or check the data (detrkit check-data)")
    state = load_train_state(run / "last")  # the checkpoint written on the way out
    assert (state["step"], state["epoch"]) == (4, 1)  # 4 good steps in epoch 1; none after
    assert all(torch.isfinite(v).all() for v in load_model(run / "last").state_dict().values())
