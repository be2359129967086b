"""Training and evaluation: the loop, the optimiser, the schedule, checkpoints and logs.

A run folder holds::

    config.yaml        the resolved configuration (model, loss, data, train)
    last/              the latest checkpoint: model.safetensors + config.json + train_state.pt
    best/              the checkpoint with the best validation AP, with its metrics.json and detections.json
    results.csv        one row per epoch: losses, lr, the 12 COCO numbers, seconds
    results.png        loss and mAP curves
    metrics.json, detections.json   the latest evaluation
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from detrkit.aids import AidedModel
from detrkit.checkpoint import (
    atomic_write, check_and_load, checkpoint_folder, load_state, readable_folder, save_model, set_classes,
    write_model_files,
)
from detrkit.config import DataConfig, LossConfig, ModelConfig, TrainConfig, config_from_dict, preset
from detrkit.criterion import SetCriterion, build_criterion
from detrkit.data.batch import collate
from detrkit.data.coco import CocoDetection
from detrkit.data.layouts import find_layout
from detrkit.data.transforms import train_transforms, val_transforms
from detrkit.errors import DataError, DetrkitError
from detrkit.evaluate import (
    METRIC_KEYS, coco_metrics, detections_to_coco, format_best_threshold, write_analysis, write_metrics,
)
from detrkit.model.detr import DETR, build_model
from detrkit.postprocess import postprocess

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run stops


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def data_paths(cfg: DataConfig) -> dict[str, Path]:
    """The four paths of a data config: explicit flags win over a layout found in ``cfg.data``."""
    found = find_layout(cfg.data) if cfg.data else {}
    paths = {}
    for key in ("train_json", "train_images", "val_json", "val_images"):
        value = getattr(cfg, key) or found.get(key)
        if value is not None:
            paths[key] = Path(value)
    return paths


def build_datasets(cfg: DataConfig, categories: Optional[list[dict]] = None, *, train: bool = True):
    """``(train_set or None, val_set or None)``; the val set uses the train set's class mapping."""
    paths = data_paths(cfg)
    train_set = val_set = None
    if train:
        if "train_json" not in paths or "train_images" not in paths:
            raise DataError("no training data: give --data DIR or --train-json FILE --train-images DIR")
        train_set = CocoDetection(paths["train_json"], paths["train_images"],
                                  train_transforms(cfg.image_size, cfg.max_size, cfg.augment), categories=categories,
                                  check_images=cfg.check_images)
        categories = train_set.categories
    if "val_json" in paths and "val_images" in paths:
        val_set = CocoDetection(paths["val_json"], paths["val_images"],
                                val_transforms(cfg.image_size, cfg.max_size), categories=categories,
                                check_images=cfg.check_images and train)
    return train_set, val_set


def make_loader(dataset, batch_size: int, workers: int, *, shuffle: bool, seed: int = 0) -> DataLoader:
    """A loader whose order depends only on ``seed`` (so a resumed run sees the same batches)."""
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, generator=gen) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      collate_fn=collate, generator=gen, persistent_workers=False, drop_last=False)


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with two groups: the backbone at ``lr_backbone``, everything else at ``lr`` (official).

    ``model`` is a :class:`DETR` or an :class:`AidedModel` (whose aids train at ``lr``).
    """
    named = [(n.removeprefix("model."), p) for n, p in model.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if n.startswith("backbone.")]
    rest = [p for n, p in named if not n.startswith("backbone.")]
    groups = [{"params": rest, "lr": cfg.lr, "base_lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr_backbone, "base_lr": cfg.lr_backbone})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(progress: float, cfg: TrainConfig) -> float:
    """The learning-rate multiplier at ``progress`` in [0, 1] of the run (steps or time).

    Linear warm-up over the first ``warmup`` fraction, then either the official step decay
    (x0.1 at ``lr_drop`` epochs, by default at 2/3 of the run: epoch 200 of 300) or a cosine.
    """
    if cfg.warmup > 0 and progress < cfg.warmup:
        return max(progress / cfg.warmup, 1e-3)
    if cfg.schedule == "cosine":
        p = (progress - cfg.warmup) / max(1 - cfg.warmup, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min(max(p, 0.0), 1.0)))
    drop_at = cfg.lr_drop / cfg.epochs if cfg.lr_drop is not None and cfg.minutes is None else 2 / 3
    return 0.1 if progress >= drop_at else 1.0


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# ---------------------------------------------------------------------------------------------
# One epoch, and evaluation
# ---------------------------------------------------------------------------------------------
class Clock:
    """Training time (excluding evaluation), carried across resumes; the budget's progress."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, elapsed: float = 0.0, step: int = 0) -> None:
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.elapsed = elapsed
        self.step = step
        self._start: Optional[float] = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self.elapsed += time.perf_counter() - self._start
            self._start = None

    def now(self) -> float:
        return self.elapsed + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def progress(self) -> float:
        if self.cfg.minutes is not None:
            return min(self.now() / (60 * self.cfg.minutes), 1.0)
        return min(self.step / (self.cfg.epochs * self.steps_per_epoch), 1.0)

    def out_of_time(self) -> bool:
        return self.cfg.minutes is not None and self.now() >= 60 * self.cfg.minutes


def train_one_epoch(model: AidedModel, criterion: SetCriterion, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    device: torch.device, cfg: TrainConfig, clock: Clock, epoch: int) -> dict[str, float]:
    """One pass over ``loader`` (or until the time budget ends). Returns the mean of every loss key."""
    model.train()
    criterion.train()
    sums: dict[str, float] = {}
    count = bad = 0
    clock.start()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, dynamic_ncols=True, mininterval=1.0)
    seen, t0 = 0, time.perf_counter()
    for images, mask, targets in bar:
        set_lr(optimizer, lr_factor(clock.progress(), cfg))
        images, mask = images.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            outputs = model((images, mask), targets)
        losses = criterion(outputs, targets)  # matching and losses in float32 (the criterion casts)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            bad += 1
            ids = [t.get("image_id") for t in targets]
            warnings.warn(f"non-finite loss at epoch {epoch + 1}, step {clock.step} (image ids {ids}); step skipped")
            if bad >= MAX_BAD_STEPS:
                raise NonFiniteLoss(f"{bad} non-finite losses in a row (last batch: image ids {ids}); "
                                    f"lower --lr or check the data (detrkit check-data)")
            optimizer.zero_grad(set_to_none=True)
            continue
        bad = 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        clock.step += 1
        count += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        seen += images.shape[0]
        bar.set_postfix(loss=f"{loss.detach().item():.3f}", ce=f"{losses['loss_ce'].detach().item():.3f}",
                        lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                        img_s=f"{seen / (time.perf_counter() - t0):.1f}", refresh=False)
        if clock.out_of_time():
            break
    bar.close()
    clock.stop()
    return {k: v / max(count, 1) for k, v in sums.items()} | {"steps": count}


class NonFiniteLoss(DetrkitError):
    """Training diverged: several consecutive losses were NaN or infinite."""


@torch.no_grad()
def predict_dataset(model: DETR, loader: DataLoader, device: torch.device) -> list[dict]:
    """COCO-format detections (dataset category ids, absolute xywh in original pixels) of a loader."""
    model.eval()
    lut = [c["id"] for c in model.classes]
    detections = []
    for images, mask, targets in tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True, mininterval=1.0):
        outputs = model((images.to(device), mask.to(device)))
        sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocess(outputs, sizes, index_to_category=lut, sigmoid=model.sigmoid_class)
        detections += detections_to_coco(results, [t["image_id"] for t in targets])
    return detections


def evaluate(model: DETR, dataset: CocoDetection, *, batch_size: int = 8, workers: int = 0,
             device: str | torch.device = "cpu") -> tuple[dict, list[dict]]:
    """COCO metrics of ``model`` on ``dataset``: ``(metrics, detections)``.

    ``metrics`` has the 12 COCO numbers (``AP`` ... ``ARl``) and ``per_class``; detections are
    in the COCO results format with the dataset's own category ids.
    """
    device = select_device(str(device))
    model.to(device)
    loader = make_loader(dataset, batch_size, workers, shuffle=False)
    detections = predict_dataset(model, loader, device)
    return coco_metrics(dataset.json_path, detections), detections


def evaluate_model(model: DETR, data: dict, *, batch_size: int = 8,
                   device: str | torch.device = "auto") -> tuple[dict, list[dict]]:
    """COCO metrics of a loaded model on the validation split that ``data`` (DataConfig fields:
    ``data=DIR`` or ``val_json``/``val_images``) names, with the model's own class mapping and
    image size: ``(metrics, detections)``."""
    data_cfg = config_from_dict(DataConfig, {"image_size": model.inference["image_size"],
                                             "max_size": model.inference.get("max_size"), **data})
    _, val_set = build_datasets(data_cfg, categories=[{"id": c["id"], "name": c["name"]} for c in model.classes],
                                train=False)
    if val_set is None:
        raise DataError("no evaluation data: give --data DIR or --val-json FILE --val-images DIR")
    return evaluate(model, val_set, batch_size=batch_size, workers=data_cfg.workers, device=device)


# ---------------------------------------------------------------------------------------------
# Checkpoints of a run
# ---------------------------------------------------------------------------------------------
def save_run_checkpoint(folder: Path, net: AidedModel, optimizer, state: dict, inference: dict) -> None:
    """Model (detrkit format) + the training state needed to continue exactly (optimiser, RNG,
    and the training-only aids' parameters, which the model's own checkpoint never holds),
    written as one unit: a kill mid-save leaves the previous weights and state together."""
    aids = {k: v for k, v in net.state_dict().items() if not k.startswith("model.")}
    with checkpoint_folder(folder) as tmp:
        write_model_files(net.model, tmp, inference=inference)
        torch.save({"optimizer": optimizer.state_dict(), **state, "aids": aids, "rng": _rng_state()},
                   tmp / "train_state.pt")


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_train_state(folder: Path) -> dict:
    path = readable_folder(folder) / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DetrkitError(f"{path}: no training state to resume from") from None
    except Exception as e:  # noqa: BLE001
        raise DetrkitError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None


def save_config(path: Path, model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig,
                train_cfg: TrainConfig) -> None:
    text = yaml.safe_dump({"model": dataclasses.asdict(model_cfg), "loss": dataclasses.asdict(loss_cfg),
                           "data": dataclasses.asdict(data_cfg), "train": dataclasses.asdict(train_cfg)},
                          sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_run_config(run_dir: Path) -> tuple[ModelConfig, LossConfig, DataConfig, TrainConfig]:
    path = Path(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        return (config_from_dict(ModelConfig, raw["model"]), config_from_dict(LossConfig, raw["loss"]),
                config_from_dict(DataConfig, raw["data"]), config_from_dict(TrainConfig, raw["train"]))
    except FileNotFoundError:
        raise DetrkitError(f"{path}: not a run folder (no config.yaml)") from None
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise DetrkitError(f"{path}: invalid run configuration ({e})") from None


# ---------------------------------------------------------------------------------------------
# Results log
# ---------------------------------------------------------------------------------------------
def write_results(run_dir: Path, rows: list[dict]) -> None:
    """``results.csv`` (one row per epoch) and its plot ``results.png``."""
    from detrkit.visualize import plot_training_curves

    keys = ["epoch", "seconds", "steps", "lr"] + sorted({k for r in rows for k in r} - {"epoch", "seconds", "steps", "lr"}
                                                        - set(METRIC_KEYS)) + list(METRIC_KEYS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "results.csv", lambda tmp: Path(tmp).write_text(buf.getvalue()))
    try:
        plot_training_curves(run_dir / "results.csv", run_dir / "results.png")
    except Exception as e:  # noqa: BLE001 - a plot must never stop training
        warnings.warn(f"could not draw results.png: {e}")


def read_results(run_dir: Path) -> list[dict]:
    path = run_dir / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------
def initial_model(model_cfg: ModelConfig, train_cfg: TrainConfig, classes: list[dict]) -> DETR:
    """A new model for ``classes``, or one started from ``train_cfg.weights`` (fine-tuning).

    With weights, the architecture is the checkpoint's; when its classes differ from the data
    set's, the class head is re-initialised and everything else kept.
    """
    train_backbone = train_cfg.lr_backbone > 0
    if train_cfg.weights is None:
        model = build_model(dataclasses.replace(model_cfg, num_classes=len(classes)),
                            train_backbone=train_backbone, backbone_weights=train_cfg.backbone_weights)
    else:
        src_cfg, state, src_classes = load_state(train_cfg.weights)
        model = build_model(dataclasses.replace(src_cfg, num_classes=len(classes), aux_loss=model_cfg.aux_loss,
                                                dropout=model_cfg.dropout, frozen_stages=model_cfg.frozen_stages),
                            train_backbone=train_backbone)
        same = src_classes is not None and [c["id"] for c in src_classes] == [c["id"] for c in classes]
        if not same:  # every class head (two-stage models also score encoder tokens) starts afresh
            fresh = {k: v for k, v in model.state_dict().items() if k.startswith(("class_embed.", "enc_class."))}
            state = {**state, **fresh}
            print(f"fine-tuning: new class head for {len(classes)} classes (checkpoint had {src_cfg.num_classes})")
        check_and_load(model, state, str(train_cfg.weights))
    set_classes(model, classes)
    return model


def train(model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig, train_cfg: TrainConfig) -> Path:
    """Train, evaluating and checkpointing every ``eval_every`` epochs. Returns the run folder.

    With ``train_cfg.resume`` the run in ``train_cfg.out`` continues from ``last/``: model,
    optimiser, epoch, step, training time, RNG states and the results log.
    """
    run_dir = Path(train_cfg.out)
    device = select_device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)
    random.seed(train_cfg.seed)
    np.random.seed(train_cfg.seed)

    train_set, val_set = build_datasets(data_cfg)
    print(train_set.report.summary())
    classes = [{"id": c["id"], "name": c["name"]} for c in train_set.categories]
    model = initial_model(model_cfg, train_cfg, classes)
    model_cfg = model.config
    model.to(device)
    net = AidedModel(model, loss_cfg).to(device)  # the model plus its training-only aids (if any)
    criterion = build_criterion(model.num_classes, loss_cfg, num_aux=model_cfg.dec_layers - 1 if model_cfg.aux_loss else 0,
                                sigmoid=model_cfg.two_stage).to(device)
    optimizer = make_optimizer(net, train_cfg)
    inference = {"image_size": data_cfg.image_size, "max_size": data_cfg.max_size}

    start_epoch, best_ap, rows, elapsed, step = 0, -1.0, [], 0.0, 0
    if train_cfg.resume:
        state = load_train_state(run_dir / "last")
        _, weights, _ = load_state(run_dir / "last")
        check_and_load(model, weights, str(run_dir / "last"))
        optimizer.load_state_dict(state["optimizer"])
        net.load_state_dict({**net.state_dict(), **state.get("aids", {})})
        start_epoch, best_ap, elapsed, step = state["epoch"], state["best_ap"], state["elapsed"], state["step"]
        _set_rng_state(state["rng"])
        rows = read_results(run_dir)[:start_epoch]
        print(f"resuming {run_dir} at epoch {start_epoch + 1} (step {step}, {elapsed / 60:.1f} min trained)")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir / "config.yaml", model_cfg, loss_cfg, data_cfg, train_cfg)

    loader_len = math.ceil(len(train_set) / train_cfg.batch_size)
    clock = Clock(train_cfg, loader_len, elapsed, step)
    epoch = start_epoch

    def save_last() -> None:
        save_run_checkpoint(run_dir / "last", net, optimizer,
                            {"epoch": epoch, "step": clock.step, "elapsed": clock.elapsed, "best_ap": best_ap},
                            inference)

    try:
        while epoch < train_cfg.epochs and not clock.out_of_time():
            loader = make_loader(train_set, train_cfg.batch_size, data_cfg.workers, shuffle=True,
                                 seed=train_cfg.seed + epoch)
            stats = train_one_epoch(net, criterion, loader, optimizer, device, train_cfg, clock, epoch)
            epoch += 1
            row = {"epoch": epoch, "seconds": round(clock.elapsed, 1), "steps": clock.step,
                   "lr": optimizer.param_groups[0]["lr"]}
            row.update({f"train_{k}": round(v, 5) for k, v in stats.items()
                        if k != "steps" and not k[-1].isdigit()})
            last = epoch >= train_cfg.epochs or clock.out_of_time()
            if val_set is not None and (epoch % train_cfg.eval_every == 0 or last):
                metrics, detections = evaluate(model, val_set, batch_size=train_cfg.batch_size,
                                               workers=data_cfg.workers, device=device)
                row.update({k: metrics[k] for k in METRIC_KEYS})
                write_metrics(run_dir, metrics, detections)
                if metrics["AP"] > best_ap:
                    best_ap = metrics["AP"]
                    with checkpoint_folder(run_dir / "best") as tmp:  # with the best checkpoint's own numbers
                        write_model_files(model, tmp, inference=inference)
                        write_metrics(tmp, metrics, detections)
                tqdm.write(f"epoch {epoch}: loss {stats.get('loss', float('nan')):.4f}  AP {metrics['AP']:.4f}  "
                           f"AP50 {metrics['AP50']:.4f}  ({clock.elapsed / 60:.1f} min)")
            else:
                tqdm.write(f"epoch {epoch}: loss {stats.get('loss', float('nan')):.4f}  ({clock.elapsed / 60:.1f} min)")
            rows.append(row)
            write_results(run_dir, rows)
            save_last()
    except KeyboardInterrupt:
        clock.stop()
        save_last()
        print(f"\ninterrupted: checkpoint saved in {run_dir / 'last'}; continue with: detrkit train --resume {run_dir}")
        raise
    except NonFiniteLoss:
        save_last()
        raise
    if val_set is None:
        save_model(model, run_dir / "best", inference=inference)
    elif (run_dir / "best" / "detections.json").is_file():
        # The extras of the best checkpoint from its saved detections: no second pass of the model.
        detections = json.loads((run_dir / "best" / "detections.json").read_text())
        extras = write_analysis(run_dir / "best", val_set.json_path, detections)
        print(format_best_threshold(extras["best"], 0.5))
    return run_dir
