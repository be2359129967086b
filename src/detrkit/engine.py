"""Training and evaluation: the loop, the optimiser, the schedule, checkpoints and logs.

A run folder holds::

    config.yaml        the resolved configuration (model, loss, data, train) and the run's id
    last/              the latest checkpoint: model.safetensors + config.json + train_state.pt
    best/              the checkpoint with the best validation AP, with its metrics.json and detections.json
    results.csv        one row per epoch: losses, lr, the 12 COCO numbers, seconds
    results.png        loss and mAP curves
    metrics.json, detections.json   the latest evaluation

``model.safetensors`` holds the weights for inference: with ``--ema`` the moving average (which
is also what is evaluated), and ``last/train_state.pt`` then keeps the raw weights next to the
optimiser, the EMA's update count, the position in the epoch and the random states.

The same loop runs in one process or in several under ``torchrun`` (docs/distributed.md):
every helper of :mod:`detrkit.distributed` is the identity in one process.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import random
import signal
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from detrkit import distributed
from detrkit.aids import AidedModel
from detrkit.checkpoint import (
    check_and_load, checkpoint_folder, load_state, readable_folder, save_model, set_classes, write_model_files,
)
from detrkit.files import atomic_write
from detrkit.config import AUTO_IMAGE_SIZE, DataConfig, LossConfig, ModelConfig, TrainConfig, config_from_dict
from detrkit.criterion import SetCriterion, build_criterion
from detrkit.data.batch import collate
from detrkit.data.coco import CocoDetection, load_coco
from detrkit.data.layouts import find_layout
from detrkit.data.sampler import EpochSampler, SeededSamples
from detrkit.data.transforms import train_transforms, val_transforms
from detrkit.ema import ModelEMA
from detrkit.errors import DataError, DetrkitError
from detrkit.evaluate import (
    METRIC_KEYS, coco_metrics, detections_to_coco, format_best_threshold, write_analysis, write_metrics,
)
from detrkit.model.build import build_model
from detrkit.model.detr import DETR
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
        _need_training_data(paths)
        train_set = CocoDetection(paths["train_json"], paths["train_images"],
                                  train_transforms(cfg.image_size, cfg.max_size, cfg.augment), categories=categories,
                                  check_images=cfg.check_images)
        categories = train_set.categories
    if "val_json" in paths and "val_images" in paths:
        val_set = CocoDetection(paths["val_json"], paths["val_images"],
                                val_transforms(cfg.image_size, cfg.max_size), categories=categories,
                                check_images=cfg.check_images and train)
    return train_set, val_set


def _need_training_data(paths: dict[str, Path]) -> None:
    if "train_json" not in paths or "train_images" not in paths:
        raise DataError("no training data: give --data DIR or --train-json FILE --train-images DIR")


def auto_image_size(cfg: DataConfig) -> int:
    """``image_size="auto"``: the training images' median shorter side (from the annotation
    file's width/height), at most :data:`~detrkit.config.AUTO_IMAGE_SIZE`: small images are
    never enlarged, large ones are scaled down to what a CPU can train on in minutes."""
    paths = data_paths(cfg)
    _need_training_data(paths)
    sizes = load_coco(paths["train_json"], paths["train_images"]).sizes  # (I, 2) h, w
    if len(sizes) == 0:
        raise DataError(f"{paths['train_json']}: no images")
    return int(min(np.median(sizes.min(1)), AUTO_IMAGE_SIZE))


def make_train_loader(dataset, batch_size: int, workers: int, *, seed: int, epoch: int, position: int = 0) -> DataLoader:
    """This process's batches of epoch ``epoch``, starting ``position`` samples into the epoch's order.

    The order and each image's augmentation depend only on ``(seed, epoch)`` (data/sampler.py),
    so a resumed run, or a run with more processes or loader workers, sees the same images.
    """
    sampler = EpochSampler(len(dataset), seed=seed, epoch=epoch, position=position, rank=distributed.rank(),
                           world=distributed.world_size())
    # The generator seeds the loader workers; passing one also keeps the DataLoader from drawing
    # that seed from the global random state, which dropout uses.
    return DataLoader(SeededSamples(dataset, seed=seed, epoch=epoch), batch_size=batch_size, sampler=sampler,
                      num_workers=workers, collate_fn=collate, generator=torch.Generator().manual_seed(seed + epoch),
                      worker_init_fn=_ignore_sigint)


def _ignore_sigint(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the main process, which finishes its step and saves before stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_eval_loader(dataset, batch_size: int, workers: int) -> DataLoader:
    """This process's share of the evaluation batches, in order.

    Batch ``j`` holds images ``j*B .. j*B+B-1`` (the batches a single process makes) and goes to
    process ``j mod W``: every image is seen once, and padded with the same neighbours as in one
    process, so the detections are those of a single process.
    """
    n = len(dataset)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    mine = batches[distributed.rank()::distributed.world_size()]
    return DataLoader(dataset, batch_sampler=mine, num_workers=workers, collate_fn=collate)


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
    # fused: the whole update of a tensor in one kernel (CPU and CUDA). On a CPU, a third of the
    # time of PyTorch's default there (a Python loop over the tensors): docs/benchmarks.md.
    fused = all(p.device.type in ("cpu", "cuda") for _, p in named)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


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
# The state of a run, and stopping on request
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where a run is: everything besides weights, optimiser and random states needed to continue exactly."""

    epoch: int = 0  # epochs completed
    position: int = 0  # samples of the current epoch's order trained on, all processes together
    step: int = 0  # optimiser steps taken
    elapsed: float = 0.0  # training seconds (evaluation excluded), as all processes agreed
    best_ap: float = -1.0  # best validation AP so far
    best_epoch: int = 0  # the epoch that reached it (for --patience)
    sums: dict = field(default_factory=dict)  # loss sums of the current epoch's steps, for its results row
    count: int = 0  # steps in the current epoch
    bad_in_a_row: int = 0  # consecutive non-finite losses, across epoch boundaries (MAX_BAD_STEPS stops the run)

    def progress(self, cfg: TrainConfig, epoch_size: int) -> float:
        """Fraction of the run done (in samples), for the learning-rate schedule when there is no time budget."""
        return min((self.epoch * epoch_size + self.position) / (cfg.epochs * epoch_size), 1.0)


class Clock:
    """Training time (evaluation excluded), carried across resumes.

    Decisions (the schedule under a time budget, the end of the budget) read ``elapsed``, a
    value all processes agreed on at the last step, never their own clocks: processes that
    disagreed would set different learning rates or stop at different steps.
    """

    def __init__(self, cfg: TrainConfig, elapsed: float = 0.0) -> None:
        self.cfg = cfg
        self.elapsed = elapsed
        self._start: Optional[float] = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        """Add the running segment (this process's own time) to ``elapsed``."""
        if self._start is not None:
            self.elapsed += time.perf_counter() - self._start
            self._start = None

    def now(self) -> float:
        return self.elapsed + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def agree(self, value: float) -> None:
        """Set ``elapsed`` to the value the processes agreed on; a running segment restarts from here."""
        self.elapsed = value
        if self._start is not None:
            self._start = time.perf_counter()

    def progress(self) -> float:
        return min(self.elapsed / (60 * self.cfg.minutes), 1.0)

    def out_of_time(self) -> bool:
        return self.cfg.minutes is not None and self.elapsed >= 60 * self.cfg.minutes


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during training: finish the current step, save, then stop.

    The request is only noted here; the training loop acts on it at the next step, when all
    processes agree (a stop that only some processes saw would leave the others waiting).
    A second Ctrl-C stops at once, without saving.
    """

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None and distributed.is_main():
            tqdm.write(f"{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                       f"(Ctrl-C again to stop now without saving)")
        self.signal = signum


class Interrupted(KeyboardInterrupt):
    """Training stopped on request after saving a checkpoint."""


class NonFiniteLoss(DetrkitError):
    """Training diverged: several consecutive losses were NaN or infinite."""


# ---------------------------------------------------------------------------------------------
# One optimiser step, one epoch
# ---------------------------------------------------------------------------------------------
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Trainer:
    """What an optimiser step works on."""

    model: DETR  # the weights
    aided: AidedModel  # the model with its training-only aids: the optimiser's parameters
    net: nn.Module  # what computes the forward pass: ``aided``, or its DistributedDataParallel wrapper
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    device: torch.device
    scaler: Optional[torch.amp.GradScaler] = None  # fp16 only: scales the loss so small gradients survive
    ema: Optional[ModelEMA] = None

    def forward_backward(self, micro_batches: list) -> dict[str, Tensor]:
        """Forward and backward passes over the micro-batches of one step; gradients add up in ``.grad``.

        Every loss is divided by the whole step's normalisers (all micro-batches, all processes),
        so the accumulated gradient is that of one batch holding all of them. Returns the step's
        losses: the loss terms summed over micro-batches, the logged errors averaged.
        """
        norm = self.criterion.normalizers([ts for _, _, ts in micro_batches], self.model.num_queries, self.device)
        totals: dict[str, Tensor] = {}
        for i, (images, mask, targets) in enumerate(micro_batches):
            images, mask = images.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
            targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
            # DDP all-reduces the gradients during backward; only the last micro-batch needs that.
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last or self.net is self.aided else self.net.no_sync():
                with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(self.cfg.precision),
                                    enabled=self.cfg.precision != "fp32"):
                    outputs = self.net((images, mask), targets)
                losses = self.criterion(outputs, targets, norm)  # matching and losses in float32 (the criterion casts)
                loss = losses["loss"]
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float()
        summed = set(self.criterion.weight_dict) | {"loss"}
        return {k: v if k in summed else v / len(micro_batches) for k, v in totals.items()}

    def optimizer_step(self) -> None:
        """Clip, step, clear the gradients, update the EMA."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.cfg.clip > 0:
            nn.utils.clip_grad_norm_(self.aided.parameters(), self.cfg.clip)
        stepped = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf/NaN ...
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale  # ... and then the scale shrinks
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and stepped:
            self.ema.update(self.model)


def _groups(loader, k: int):
    """Consecutive groups of ``k`` batches (the last group may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
    if group:
        yield group


def train_one_epoch(trainer: Trainer, loader: DataLoader, state: TrainState, clock: Clock, stop: StopRequest,
                    epoch_size: int) -> str:
    """Train on ``loader`` (the rest of epoch ``state.epoch``) until it ends, the time budget ends or a stop
    is requested: returns ``"done"``, ``"time"`` or ``"stop"``. ``state`` follows every step.

    Each step ends with one all-reduce that gives every process the same numbers: the mean
    losses (for the log and the non-finite check), whether any process was asked to stop, and
    the training time. So all processes take the same decisions at the same step.
    """
    cfg, world = trainer.cfg, distributed.world_size()
    trainer.net.train()
    trainer.criterion.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    status = "done"
    clock.start()
    steps = math.ceil(len(loader) / cfg.accumulate)
    bar = tqdm(_groups(loader, cfg.accumulate), total=steps, desc=f"epoch {state.epoch + 1}", leave=False,
               dynamic_ncols=True, mininterval=1.0, disable=not distributed.is_main())
    seen, t0 = 0, time.perf_counter()
    for micro_batches in bar:
        progress = clock.progress() if cfg.minutes is not None else state.progress(cfg, epoch_size)
        set_lr(trainer.optimizer, lr_factor(progress, cfg))
        losses = trainer.forward_backward(micro_batches)
        flags = torch.tensor([float(stop.signal is not None), clock.now()], dtype=torch.float64, device=trainer.device)
        agreed = distributed.all_mean(torch.cat([torch.stack(list(losses.values())).double(), flags])).tolist()
        values = dict(zip(losses, agreed))  # one host-device synchronisation per step
        stop_requested = agreed[-2] > 0
        clock.agree(agreed[-1])
        images = sum(images.shape[0] for images, _, _ in micro_batches) * world
        state.position += images
        if not math.isfinite(values["loss"]):
            state.bad_in_a_row += 1
            trainer.optimizer.zero_grad(set_to_none=True)
            ids = [t.get("image_id") for _, _, ts in micro_batches for t in ts]
            if distributed.is_main():
                warnings.warn(f"non-finite loss at epoch {state.epoch + 1}, step {state.step} "
                              f"(image ids {ids}{' on rank 0' if world > 1 else ''}); step skipped")
            if state.bad_in_a_row >= MAX_BAD_STEPS:
                raise NonFiniteLoss(f"{state.bad_in_a_row} non-finite losses in a row (last batch: image ids {ids}); "
                                    f"lower --lr or check the data (detrkit check-data)")
        else:
            state.bad_in_a_row = 0
            trainer.optimizer_step()
            state.step += 1
            state.count += 1
            for k, v in values.items():
                state.sums[k] = state.sums.get(k, 0.0) + v
            seen += images
            bar.set_postfix(loss=f"{values['loss']:.3f}", ce=f"{values['loss_ce']:.3f}",
                            lr=f"{trainer.optimizer.param_groups[0]['lr']:.1e}",
                            img_s=f"{seen / (time.perf_counter() - t0):.1f}", refresh=False)
        if stop_requested:
            status = "stop"
            break
        if clock.out_of_time():
            status = "time"
            break
    bar.close()
    clock.stop()
    clock.agree(float(distributed.all_mean(torch.tensor([clock.elapsed], dtype=torch.float64,
                                                        device=trainer.device)).item()))
    return status


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def predict_batches(model: DETR, loader: DataLoader, device: torch.device) -> list[list[dict]]:
    """COCO-format detections (dataset category ids, absolute xywh in original pixels), one list per batch."""
    model.eval()
    lut = [c["id"] for c in model.classes]
    batches = []
    for images, mask, targets in tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True, mininterval=1.0,
                                      disable=not distributed.is_main()):
        outputs = model((images.to(device), mask.to(device)))
        sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocess(outputs, sizes, index_to_category=lut, sigmoid=model.sigmoid_class)
        batches.append(detections_to_coco(results, [t["image_id"] for t in targets]))
    return batches


def evaluate(model: DETR, dataset: CocoDetection, *, batch_size: int = 8, workers: int = 0,
             device: str | torch.device = "cpu") -> tuple[dict, list[dict]]:
    """COCO metrics of ``model`` on ``dataset``: ``(metrics, detections)``.

    ``metrics`` has the 12 COCO numbers (``AP`` ... ``ARl``) and ``per_class``; detections are
    in the COCO results format with the dataset's own category ids.

    Under ``torchrun`` every process predicts its share of the batches; rank 0 collects them in
    the single-process order and computes the metrics, which every process receives. The
    detections are returned on rank 0 (the others get an empty list).
    """
    device = select_device(str(device))
    model.to(device)
    mine = predict_batches(model, make_eval_loader(dataset, batch_size, workers), device)
    shares = distributed.gather_to_main(mine)
    metrics, detections = None, []
    if distributed.is_main():
        world = len(shares)
        n = sum(len(share) for share in shares)
        for j in range(n):  # batch j was predicted by process j mod W, as its (j // W)-th batch
            detections += shares[j % world][j // world]
        metrics = coco_metrics(dataset.json_path, detections)
    return distributed.broadcast_from_main(metrics), detections


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
def save_run_checkpoint(folder: Path, model: DETR, optimizer, state: dict, inference: dict) -> None:
    """``model`` (detrkit format: the weights for inference) + the training state needed to continue
    exactly, written as one unit: a kill mid-save leaves the previous weights and state together."""
    with checkpoint_folder(folder) as tmp:
        write_model_files(model, tmp, inference=inference)
        torch.save({"optimizer": optimizer.state_dict(), **state}, tmp / "train_state.pt")


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def load_train_state(folder: Path) -> dict:
    path = readable_folder(folder) / "train_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DetrkitError(f"{path}: no training state to resume from") from None
    except Exception as e:  # noqa: BLE001
        raise DetrkitError(f"{path}: unreadable training state ({type(e).__name__}: {e})") from None


def save_config(path: Path, model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig,
                train_cfg: TrainConfig, run_id: Optional[str] = None) -> None:
    """``config.yaml``: the four config sections, and the run's id (which checkpoints belong to this run)."""
    text = yaml.safe_dump({"model": dataclasses.asdict(model_cfg), "loss": dataclasses.asdict(loss_cfg),
                           "data": dataclasses.asdict(data_cfg), "train": dataclasses.asdict(train_cfg),
                           "run": {"id": run_id}}, sort_keys=False)
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


def _restartable(run_dir: Path) -> bool:
    """After ``torchrun`` restarted the processes: does ``last/`` hold a checkpoint of this very run?

    A fresh run writes a new id into config.yaml before its first step and into each
    checkpoint, so a ``last/`` left by an earlier run in the same folder is not resumed.
    """
    try:
        run_id = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("run", {}).get("id")
        return run_id is not None and load_train_state(run_dir / "last").get("run_id") == run_id
    except (OSError, yaml.YAMLError, AttributeError, DetrkitError):
        return False


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
        src_cfg, state, src_classes, _ = load_state(train_cfg.weights)
        model = build_model(dataclasses.replace(src_cfg, num_classes=len(classes), aux_loss=model_cfg.aux_loss,
                                                dropout=model_cfg.dropout, frozen_stages=model_cfg.frozen_stages),
                            train_backbone=train_backbone)
        same = src_classes is not None and [c["id"] for c in src_classes] == [c["id"] for c in classes]
        if not same:  # every class head (two-stage models also score encoder tokens) starts afresh
            fresh = {k: v for k, v in model.state_dict().items() if k.startswith(("class_embed.", "enc_class."))}
            state = {**state, **fresh}
            _log(f"fine-tuning: new class head for {len(classes)} classes (checkpoint had {src_cfg.num_classes})")
        check_and_load(model, state, str(train_cfg.weights))
    set_classes(model, classes)
    return model


def train(model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig, train_cfg: TrainConfig) -> Path:
    """Train, evaluating and checkpointing every ``eval_every`` epochs. Returns the run folder.

    With ``train_cfg.resume`` the run in ``train_cfg.out`` continues from ``last/``: model,
    optimiser, EMA, loss scaler, epoch and position in it, step, training time, random states
    and the results log. After ``torchrun`` restarted the processes (``--max-restarts``), a run
    resumes from its own ``last/`` by itself.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each process trains on its share of every batch
    (DistributedDataParallel); rank 0 writes the files.
    """
    joined_here = not distributed.is_distributed()  # a caller's own process group is left to the caller
    device = distributed.setup(train_cfg.device)
    try:
        return _train(model_cfg, loss_cfg, data_cfg, train_cfg, Path(train_cfg.out), device)
    finally:
        if joined_here:
            distributed.cleanup()


def _train(model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig, train_cfg: TrainConfig,
           run_dir: Path, device: torch.device) -> Path:
    main, world = distributed.is_main(), distributed.world_size()
    if train_cfg.precision == "fp16" and device.type != "cuda":
        raise DetrkitError("--precision fp16 needs a CUDA GPU (its loss scaling is for GPUs); on a CPU use bf16")
    if not train_cfg.resume and distributed.restart_count() > 0:
        if distributed.broadcast_from_main(main and _restartable(run_dir)):
            train_cfg = dataclasses.replace(train_cfg, resume=True)
    rank = distributed.rank()
    _seed_everything(train_cfg.seed + rank)  # each process its own dropout masks (official: seed + rank)

    if data_cfg.image_size == "auto":
        data_cfg = dataclasses.replace(data_cfg, image_size=auto_image_size(data_cfg))
        _log(f"image size: {data_cfg.image_size} px (auto: the training images' median shorter side, "
             f"at most {AUTO_IMAGE_SIZE})")
    # Only rank 0 opens every image; a broken file stops it, and torchrun then stops the others.
    train_set, val_set = build_datasets(dataclasses.replace(data_cfg, check_images=data_cfg.check_images and main))
    if main:
        print(train_set.report.summary())
    classes = [{"id": c["id"], "name": c["name"]} for c in train_set.categories]
    most = int(np.diff(train_set.data.offsets).max(initial=0))  # objects in the fullest training image
    if most > model_cfg.num_queries and not train_cfg.resume and train_cfg.weights is None:
        # DETR predicts at most one object per query: a new model gets enough of them.
        queries = 10 * math.ceil(most / 10)
        _log(f"training images hold up to {most} objects, more than the {model_cfg.num_queries} queries of "
             f"{train_cfg.model}: the model gets {queries} queries")
        model_cfg = dataclasses.replace(model_cfg, num_queries=queries)
    model = initial_model(model_cfg, train_cfg, classes)
    if most > model.num_queries:
        _log(f"warning: training images hold up to {most} objects, but the model predicts at most "
             f"{model.num_queries} per image")
    model_cfg = model.config
    if world > 1 and device.type == "cuda" and model_cfg.backbone_norm == "batch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all GPUs
    model.to(device)
    aided = AidedModel(model, loss_cfg).to(device)  # the model plus its training-only aids (if any)
    criterion = build_criterion(model.num_classes, loss_cfg, num_aux=model_cfg.dec_layers - 1 if model_cfg.aux_loss else 0,
                                sigmoid=model_cfg.two_stage).to(device)
    optimizer = make_optimizer(aided, train_cfg)
    scaler = torch.amp.GradScaler(device.type) if train_cfg.precision == "fp16" else None
    inference = {"image_size": data_cfg.image_size, "max_size": data_cfg.max_size}

    state, rng, run_id, resumed = TrainState(), None, None, None
    if train_cfg.resume:
        # Rank 0 reads the checkpoint and sends it to the others (no shared file system needed).
        resumed = distributed.broadcast_from_main(_read_last(run_dir) if main else None)
        saved = resumed["train_state"]
        check_and_load(model, resumed["model"], str(run_dir / "last"))
        aided.load_state_dict({**aided.state_dict(), **saved.get("aids", {})})
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
        rng, run_id = saved["rng"], saved.get("run_id")
        if main:
            restarted = f"torchrun restart {distributed.restart_count()}: " if distributed.restart_count() else ""
            print(f"{restarted}resuming {run_dir} at epoch {state.epoch + 1}"
                  f"{f', sample {state.position}' if state.position else ''} (step {state.step}, "
                  f"{state.elapsed / 60:.1f} min trained)")
    run_id = run_id or distributed.broadcast_from_main(uuid.uuid4().hex if main else None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(run_dir / "config.yaml", model_cfg, loss_cfg, data_cfg, train_cfg, run_id)

    net: nn.Module = aided
    if world > 1:
        # On channels-last activations a 1x1 convolution's weight gradient comes back with
        # other strides in its size-1 dimensions than the weight's ((C, 1, C, C) vs (C, 1, 1, 1)):
        # the same memory order, so DDP's copy into its bucket is a plain copy, but it warns
        # "may impair performance" on every run. Nothing to act on; silenced.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = nn.parallel.DistributedDataParallel(
            aided, device_ids=[device.index] if device.type == "cuda" else None,
            # The two-stage model's earlier-layer heads only get gradients from the auxiliary losses.
            find_unused_parameters=model_cfg.two_stage and not model_cfg.aux_loss)
    ema = None
    if train_cfg.ema:
        ema = ModelEMA(model, train_cfg.ema_decay, train_cfg.ema_warmup)
        if resumed is not None:
            check_and_load(ema.module, resumed["weights"], str(run_dir / "last"))
            ema.updates = resumed["train_state"].get("ema_updates") or 0
    trainer = Trainer(model, aided, net, criterion, optimizer, train_cfg, device, scaler, ema)
    weights = ema.module if ema is not None else model  # what is evaluated and saved for inference

    rows = read_results(run_dir)[:state.epoch] if main and train_cfg.resume else []
    clock = Clock(train_cfg, state.elapsed)
    if rng is not None:  # last, so that nothing above draws from the restored streams
        rng = rng if isinstance(rng, list) else [rng]  # checkpoints of single-process runs before DDP
        if len(rng) == world:
            _set_rng_state(rng[rank], device)
        else:  # another number of processes: the same samples follow, the random streams start afresh
            _seed_everything(train_cfg.seed + rank + 1000 * state.step)
            if main:
                print(f"note: the checkpoint was written by {len(rng)} processes, this run has {world}: "
                      f"same data order, new random streams")

    def save_last() -> None:
        """``last/``: the weights for inference, and the state to continue from (all processes call it)."""
        rngs = distributed.gather_to_main(_rng_state(device))
        state.elapsed = clock.elapsed
        if main:
            extra = {"scaler": scaler.state_dict() if scaler is not None else None, "rng": rngs, "run_id": run_id,
                     # the training-only aids' parameters, which the model's own checkpoint never holds
                     "aids": {k: v for k, v in aided.state_dict().items() if not k.startswith("model.")},
                     **dataclasses.asdict(state)}
            if ema is not None:  # model.safetensors holds the EMA; the raw weights continue training
                extra |= {"ema_updates": ema.updates,
                          "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            save_run_checkpoint(run_dir / "last", weights, optimizer, extra, inference)

    epoch_size = len(train_set)
    try:
        with StopRequest() as stop:
            while state.epoch < train_cfg.epochs and not clock.out_of_time():
                loader = make_train_loader(train_set, train_cfg.batch_size, data_cfg.workers, seed=train_cfg.seed,
                                           epoch=state.epoch, position=state.position)
                status = train_one_epoch(trainer, loader, state, clock, stop, epoch_size)
                if status == "stop":
                    save_last()
                    raise Interrupted(_stopped(run_dir, state))
                row = {"epoch": state.epoch + 1, "seconds": round(clock.elapsed, 1), "steps": state.step,
                       "lr": optimizer.param_groups[0]["lr"]}
                row.update({f"train_{k}": round(v / max(state.count, 1), 5) for k, v in state.sums.items()
                            if not k[-1].isdigit()})
                if status == "done":  # a time budget can end an epoch early: then it stays open
                    state.epoch, state.position, state.sums, state.count = state.epoch + 1, 0, {}, 0
                last = state.epoch >= train_cfg.epochs or status == "time"
                early_stop = False
                if val_set is not None and (row["epoch"] % train_cfg.eval_every == 0 or last):
                    metrics, detections = evaluate(weights, val_set, batch_size=train_cfg.batch_size,
                                                   workers=data_cfg.workers, device=device)
                    row.update({k: metrics[k] for k in METRIC_KEYS})
                    if main:
                        write_metrics(run_dir, metrics, detections)
                    if metrics["AP"] > state.best_ap:
                        state.best_ap, state.best_epoch = metrics["AP"], row["epoch"]
                        if main:
                            with checkpoint_folder(run_dir / "best") as tmp:  # with the best checkpoint's own numbers
                                write_model_files(weights, tmp, inference=inference)
                                write_metrics(tmp, metrics, detections)
                    elif (train_cfg.patience is not None and not last
                          and row["epoch"] - state.best_epoch >= train_cfg.patience):
                        early_stop = True
                    _log(f"epoch {row['epoch']}: loss {row.get('train_loss', float('nan')):.4f}  "
                         f"AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  ({clock.elapsed / 60:.1f} min)")
                else:
                    _log(f"epoch {row['epoch']}: loss {row.get('train_loss', float('nan')):.4f}  "
                         f"({clock.elapsed / 60:.1f} min)")
                if main:
                    rows.append(row)
                    write_results(run_dir, rows)
                save_last()
                if early_stop:
                    _log(f"early stop: no AP improvement for {train_cfg.patience} epochs "
                         f"(best AP {state.best_ap:.4f} at epoch {state.best_epoch})")
                    break
                if last:
                    break
                if distributed.any_process(stop.signal is not None, device):  # a request during the evaluation
                    raise Interrupted(_stopped(run_dir, state))
    except NonFiniteLoss:
        save_last()
        raise
    except Interrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, the state may be mid-step
        if main:
            print(f"\nstopped without saving; the last checkpoint is in {run_dir / 'last'}")
        raise
    if val_set is None and main:
        save_model(weights, run_dir / "best", inference=inference)
    elif main and (run_dir / "best" / "detections.json").is_file():
        # The extras of the best checkpoint from its saved detections: no second pass of the model.
        detections = json.loads((run_dir / "best" / "detections.json").read_text())
        extras = write_analysis(run_dir / "best", val_set.json_path, detections)
        print(format_best_threshold(extras["best"], 0.5))
    distributed.barrier()  # every process leaves with the files written
    return run_dir


def _stopped(run_dir: Path, state: TrainState) -> str:
    where = f"epoch {state.epoch + 1}, sample {state.position}" if state.position else f"the end of epoch {state.epoch}"
    message = (f"stopped at {where}: checkpoint saved in {run_dir / 'last'}; "
               f"continue with: detrkit train --resume {run_dir}")
    _log("\n" + message)
    return message


def _read_last(run_dir: Path) -> dict:
    """The checkpoint in ``run_dir/last`` to continue from: the training state, the raw weights
    (``model``) and the weights for inference (``weights``, the EMA when there is one)."""
    saved = load_train_state(run_dir / "last")
    weights = load_state(run_dir / "last").state
    # With an EMA, model.safetensors holds the average and train_state.pt the raw weights.
    return {"train_state": saved, "weights": weights, "model": saved.pop("model", weights)}


def _log(line: str) -> None:
    if distributed.is_main():
        tqdm.write(line)
