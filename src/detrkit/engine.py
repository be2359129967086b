"""The training step loop, the optimiser and its schedule, and the evaluation pass.

Nothing here writes a file: the run folder (checkpoints, config.yaml, results, resume) is
:mod:`detrkit.run`'s. The same loop runs in one process or in several under ``torchrun``
(docs/distributed.md): every helper of :mod:`detrkit.distributed` is the identity in one process.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from detrkit import distributed
from detrkit.aids import AidedModel
from detrkit.config import DataConfig, TrainConfig, config_from_dict
from detrkit.criterion import SetCriterion
from detrkit.data.build import build_datasets, make_eval_loader
from detrkit.data.coco import CocoDetection
from detrkit.ema import ModelEMA
from detrkit.errors import DataError, DetrkitError
from detrkit.evaluate import coco_metrics, detections_to_coco
from detrkit.model.detr import DETR
from detrkit.postprocess import postprocess

MAX_BAD_STEPS = 5  # consecutive non-finite losses before a run stops


# ---------------------------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------------------------
# The layers whose weights and biases TrainConfig.no_decay's "norm" names.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: the backbone at ``lr_backbone``, everything else at ``lr`` (official), each part split
    by ``cfg.no_decay`` into parameters with and without weight decay (empty groups left out).

    ``model`` is a :class:`DETR` or an :class:`AidedModel` (whose aids train at ``lr``). Each group
    carries ``base_lr``, the learning rate :func:`set_lr` scales.
    """
    named = [(n.removeprefix("model."), p) for n, p in model.named_parameters() if p.requires_grad]
    undecayed = no_decay(model, cfg.no_decay)
    groups = []
    for lr, part in ((cfg.lr, [(n, p) for n, p in named if not n.startswith("backbone.")]),
                     (cfg.lr_backbone, [(n, p) for n, p in named if n.startswith("backbone.")])):
        for decayed in (True, False):
            params = [p for _, p in part if (id(p) not in undecayed) == decayed]
            if params:
                groups.append({"params": params, "lr": lr, "base_lr": lr,
                               "weight_decay": cfg.weight_decay if decayed else 0.0})
    # fused: the whole update of a tensor in one kernel (CPU and CUDA). On a CPU, a third of the
    # time of PyTorch's default there (a Python loop over the tensors): docs/benchmarks.md.
    fused = all(p.device.type in ("cpu", "cuda") for _, p in named)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def no_decay(model: nn.Module, kinds: tuple[str, ...]) -> set[int]:
    """The ids of ``model``'s parameters that ``kinds`` (TrainConfig.no_decay) exempt from weight decay:
    ``"norm"``, the parameters of :data:`NORM_LAYERS`, found by layer type (the RT-DETR release selects
    them by name, ``norm`` or ``bn``); ``"bias"``, every parameter whose name ends in ``bias``."""
    ids = set()
    if "norm" in kinds:
        ids |= {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    if "bias" in kinds:
        ids |= {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    return ids


def lr_factor(progress: float, cfg: TrainConfig, step: int = 0) -> float:
    """The learning-rate multiplier at ``progress`` in [0, 1] of the run (steps or time), at optimiser
    step ``step`` (from 0).

    Linear warm-up over the first ``warmup`` fraction, then either the official step decay
    (x0.1 at ``lr_drop`` epochs, by default at 2/3 of the run: epoch 200 of 300; never when
    ``lr_drop`` is past the last epoch, as RT-DETR's milestone 1000) or a cosine. With
    ``warmup_steps`` instead, that schedule times ``(step + 1) / warmup_steps`` until it reaches 1
    (RT-DETRv2's LinearWarmup, which sets the learning rate step by step over its MultiStepLR's).
    """
    warm = min((step + 1) / cfg.warmup_steps, 1.0) if cfg.warmup_steps else 1.0
    if cfg.warmup > 0 and progress < cfg.warmup:
        return max(progress / cfg.warmup, 1e-3)
    if cfg.schedule == "cosine":
        p = (progress - cfg.warmup) / max(1 - cfg.warmup, 1e-8)
        return warm * 0.5 * (1 + math.cos(math.pi * min(max(p, 0.0), 1.0)))
    if cfg.lr_drop is not None and cfg.lr_drop >= cfg.epochs:  # a milestone no run reaches, also under --minutes
        return warm
    drop_at = cfg.lr_drop / cfg.epochs if cfg.lr_drop is not None and cfg.minutes is None else 2 / 3
    return warm * (0.1 if progress >= drop_at else 1.0)


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
    mosaic_stopped: Optional[int] = None  # the first epoch without mosaics (DataConfig.mosaic_until), once reached

    def stop_mosaics(self, progress: float, until: float) -> bool:
        """Whether mosaics stop now (``mosaic_stopped`` becomes this epoch): at the start of the first
        epoch that begins at ``progress >= until``. Decided only when an epoch starts and kept in
        the state, so a resumed epoch reads what it began with."""
        if self.mosaic_stopped is None and self.position == 0 and progress >= until:
            self.mosaic_stopped = self.epoch
            return True
        return False

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

    def __post_init__(self) -> None:
        if self.cfg.precision not in ("fp32", *AMP_DTYPES):  # "auto" is settled before (detrkit.run.settle_precision)
            raise ValueError(f"a trainer needs precision fp32, bf16 or fp16, got {self.cfg.precision!r}")

    def forward_backward(self, micro_batches: list) -> dict[str, Tensor]:
        """Forward and backward passes over the micro-batches of one step; gradients add up in ``.grad``.

        Every loss is divided by the whole step's normalisers (all micro-batches, all processes),
        so the accumulated gradient is that of one batch holding all of them. Returns the step's
        losses: the loss terms summed over micro-batches, the logged errors averaged.
        """
        norm = None
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
                if norm is None:  # the step's denominators; the first outputs tell the number of queries
                    norm = self.criterion.normalizers([ts for _, _, ts in micro_batches], outputs)
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


def logged(losses: dict) -> dict:
    """The losses a run logs (results.csv, the loggers): the total and the final layer's terms,
    without the auxiliary layers' (suffix ``_0``, ``_1``, ...)."""
    return {k: v for k, v in losses.items() if not k[-1].isdigit()}


# What the step loop reports after each optimiser step: (step, logged losses + "lr").
StepLog = Callable[[int, dict[str, float]], None]


def train_one_epoch(trainer: Trainer, loader: DataLoader, state: TrainState, clock: Clock, stop: StopRequest,
                    epoch_size: int, log: Optional[StepLog] = None) -> str:
    """Train on ``loader`` (the rest of epoch ``state.epoch``) until it ends, the time budget ends or a stop
    is requested: returns ``"done"``, ``"time"`` or ``"stop"``. ``state`` follows every step; ``log``
    (the run's loggers) gets every step's losses, all processes' mean, and learning rate.

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
        set_lr(trainer.optimizer, lr_factor(progress, cfg, state.step))
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
            if log is not None:
                log(state.step, {**logged(values), "lr": trainer.optimizer.param_groups[0]["lr"]})
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
        results = postprocess(outputs, sizes, index_to_category=lut, sigmoid_class=model.sigmoid_class)
        batches.append(detections_to_coco(results, [t["image_id"] for t in targets]))
    return batches


def evaluate_dataset(model: DETR, dataset: CocoDetection, *, batch_size: int = 8, workers: int = 0,
             device: str | torch.device = "cpu") -> tuple[dict, list[dict]]:
    """COCO metrics of ``model`` on ``dataset``: ``(metrics, detections)``.

    ``metrics`` has the 12 COCO numbers (``AP`` ... ``ARl``) and ``per_class``; detections are
    in the COCO results format with the dataset's own category ids.

    Under ``torchrun`` every process predicts its share of the batches; rank 0 collects them in
    the single-process order and computes the metrics, which every process receives. The
    detections are returned on rank 0 (the others get an empty list).
    """
    device = distributed.select_device(str(device))
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
                                             "max_size": model.inference.get("max_size"),
                                             "resize": model.inference.get("resize", "shorter"), **data})
    _, val_set = build_datasets(data_cfg, categories=[{"id": c["id"], "name": c["name"]} for c in model.classes],
                                train=False)
    if val_set is None:
        raise DataError("no evaluation data: give --data DIR or --val-json FILE --val-images DIR")
    return evaluate_dataset(model, val_set, batch_size=batch_size, workers=data_cfg.workers, device=device)
