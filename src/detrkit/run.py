"""A training run and its folder: plan -> build -> restore -> fit.

A run folder holds::

    config.yaml        the resolved configuration (model, loss, data, train) and the run's id
    last/              the latest checkpoint: model.safetensors + config.json + train_state.pt
    best/              the checkpoint with the best validation AP, with its metrics.json and detections.json
    results.csv        one row per epoch: losses, lr, the 12 COCO numbers, seconds
    results.png        loss and mAP curves
    metrics.json, detections.json   the latest evaluation
    events.out.tfevents.*, mlruns/, wandb/   with --log: the experiment logs (detrkit.loggers)

``model.safetensors`` holds the weights for inference: with ``--ema`` the moving average (which
is also what is evaluated), and ``last/train_state.pt`` then keeps the raw weights next to the
optimiser, the EMA's update count, the position in the epoch and the random states.

:func:`train` runs four steps. :func:`plan` settles the final configuration once (resuming
after a torchrun restart, the automatic image size, the classes, the number of queries, a
fine-tuned model's architecture; with :func:`settle_precision` the precision "auto" measures)
before anything of the run is built; :func:`build` makes the model,
its aids, the loss, the optimiser; :func:`restore` continues a run from ``last/``; :func:`fit`
runs the epochs, evaluating, keeping ``last/`` and ``best/`` and the results log. Under
``torchrun`` every process runs them (docs/distributed.md); rank 0 writes the files.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from detrkit import distributed, precision
from detrkit.aids import AidedModel
from detrkit.analysis import format_best_threshold, write_analysis
from detrkit.checkpoint import (
    check_and_load, checkpoint_folder, load_state, load_train_state, read_run_checkpoint, save_model, save_run_checkpoint,
    set_classes, write_model_files,
)
from detrkit.config import DataConfig, LossConfig, ModelConfig, TrainConfig, load_run_config, save_run_config
from detrkit.convert import Loaded
from detrkit.criterion import SetCriterion, build_criterion
from detrkit.data.build import (
    augments, auto_image_size, auto_size_notes, build_datasets, make_train_loader, train_samples,
)
from detrkit.data.coco import CocoDetection
from detrkit.ema import ModelEMA
from detrkit.engine import (
    Clock, Interrupted, NonFiniteLoss, StopRequest, Trainer, TrainState, evaluate_dataset, logged, make_optimizer,
    train_one_epoch,
)
from detrkit.errors import DetrkitError
from detrkit.evaluate import METRIC_KEYS, write_metrics
from detrkit.files import atomic_write_text
from detrkit.loggers import Loggers, open_loggers, require_loggers
from detrkit.model.build import build_model
from detrkit.model.detr import DETR
from detrkit.rng import rng_state, seed_everything, set_rng_state
from detrkit.visualize import plot_training_curves


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
        run = build(settle_precision(plan(model_cfg, loss_cfg, data_cfg, train_cfg, device), device), device)
        restore(run)
        with run.log:  # closed as failed when fit raises
            return fit(run)
    finally:
        if joined_here:
            distributed.cleanup()


# ---------------------------------------------------------------------------------------------
# Plan: the final configuration, settled once
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What a run is made of; nothing in it changes once planned."""

    model: ModelConfig  # final: the classes of the data, the queries it needs, a fine-tuned model's architecture
    loss: LossConfig
    data: DataConfig  # final: image_size is a number
    train: TrainConfig  # final: resume is True after a torchrun restart
    run_dir: Path
    train_set: CocoDetection
    val_set: Optional[CocoDetection]
    classes: list[dict]  # [{"id", "name"}] in index order: the training set's categories
    start: Optional[Loaded]  # the checkpoint a fine-tuned model starts from (train.weights)

    @property
    def inference(self) -> dict:
        """How the trained model sizes images (recorded in its checkpoints)."""
        return {"image_size": self.data.image_size, "max_size": self.data.max_size, "resize": self.data.resize}


def plan(model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig, train_cfg: TrainConfig,
         device: torch.device) -> Plan:
    """Read the data (and the checkpoint to start from) and settle every setting that depends on them."""
    main, run_dir = distributed.is_main(), Path(train_cfg.out)
    require_loggers(train_cfg.log)  # a missing extra stops every process before anything is read
    if train_cfg.precision == "fp16" and device.type != "cuda":
        raise DetrkitError("--precision fp16 needs a CUDA GPU (its loss scaling is for GPUs); on a CPU use bf16")
    if not train_cfg.resume and distributed.restart_count() > 0:
        if distributed.broadcast_from_main(main and _restartable(run_dir)):
            train_cfg = dataclasses.replace(train_cfg, resume=True)
    if data_cfg.image_size == "auto":
        data_cfg = dataclasses.replace(data_cfg, image_size=auto_image_size(data_cfg, model_cfg.arch))
        model = train_cfg.model if train_cfg.weights is None else "the checkpoint's model"
        for note in auto_size_notes(data_cfg.image_size, model_cfg.arch, model):
            _log(note)
    # Only rank 0 opens every image; a broken file stops it, and torchrun then stops the others.
    train_set, val_set = build_datasets(dataclasses.replace(data_cfg, check_images=data_cfg.check_images and main))
    if main:
        print(train_set.report.summary())
    classes = [{"id": c["id"], "name": c["name"]} for c in train_set.categories]
    most = int(np.diff(train_set.data.offsets).max(initial=0))  # objects in the fullest training image
    start = load_state(train_cfg.weights) if train_cfg.weights is not None else None
    if start is not None and not _same_classes(start, classes):
        _log(f"fine-tuning: new class head for {len(classes)} classes (checkpoint had {start.config.num_classes})")
    if device.type == "cpu" and model_cfg.arch == "detr" and start is None and train_cfg.backbone_weights is None \
            and not train_cfg.resume:  # the paper's model from random weights: a newcomer who left out --recipe
        _log(f"note: {train_cfg.model} from random weights learns over hundreds of epochs (the paper: 300-500 on "
             f"16 GPUs); on a CPU, --recipe fast trains a model that learns in minutes")
    model_cfg = _model_config(model_cfg, train_cfg, len(classes), most, start)
    return Plan(model_cfg, loss_cfg, data_cfg, train_cfg, run_dir, train_set, val_set, classes, start)


def _model_config(model_cfg: ModelConfig, train_cfg: TrainConfig, num_classes: int, most: int,
                  start: Optional[Loaded]) -> ModelConfig:
    """The model to train: ``model_cfg`` for the data's classes, with a query for every object of the
    fullest image; or, fine-tuning, the checkpoint's architecture with the run's training settings
    (auxiliary losses, dropout, frozen stages, frozen or trained BatchNorm)."""
    if start is not None:
        model_cfg = dataclasses.replace(start.config, aux_loss=model_cfg.aux_loss, dropout=model_cfg.dropout,
                                        frozen_stages=model_cfg.frozen_stages, backbone_norm=model_cfg.backbone_norm)
    model_cfg = dataclasses.replace(model_cfg, num_classes=num_classes)
    if most > model_cfg.num_queries and not train_cfg.resume and start is None:
        # DETR predicts at most one object per query: a new model gets enough of them.
        queries = 10 * math.ceil(most / 10)
        _log(f"training images hold up to {most} objects, more than the {model_cfg.num_queries} queries of "
             f"{train_cfg.model}: the model gets {queries} queries")
        model_cfg = dataclasses.replace(model_cfg, num_queries=queries)
    if most > model_cfg.num_queries:
        _log(f"warning: training images hold up to {most} objects, but the model predicts at most "
             f"{model_cfg.num_queries} per image")
    return model_cfg


# ---------------------------------------------------------------------------------------------
# Build: the model, its aids, the loss, the optimiser
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A planned run with what it trains and where it is."""

    plan: Plan
    device: torch.device
    model: DETR  # the raw weights
    aided: AidedModel  # the model plus its training-only aids: the optimiser's parameters
    trainer: Trainer
    state: TrainState
    run_id: Optional[str] = None
    rows: Optional[list] = None  # results.csv so far (rank 0)
    log: Loggers = dataclasses.field(default_factory=Loggers)  # --log (rank 0; empty elsewhere)
    saved: Optional[dict] = None  # last/ of a resumed run, between build and restore: "train_state", "model", "weights"

    @property
    def weights(self) -> DETR:
        """What is evaluated and saved for inference: the EMA when there is one."""
        return self.trainer.ema.module if self.trainer.ema is not None else self.model


def build(p: Plan, device: torch.device) -> Run:
    """The model (new, or started from ``p.start``), its aids, the loss, the optimiser, DDP and EMA."""
    cfg = p.train
    seed_everything(cfg.seed + distributed.rank())  # each process its own dropout masks (official: seed + rank)
    model, aided, criterion, optimizer = _trainable(p, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    saved = None
    if cfg.resume:  # the weights and optimiser state before DDP and the EMA copy them
        # Rank 0 reads the checkpoint and sends it to the others (no shared file system needed).
        saved = distributed.broadcast_from_main(read_run_checkpoint(p.run_dir / "last") if distributed.is_main() else None)
        check_and_load(model, saved["model"], str(p.run_dir / "last"))
        aided.load_state_dict({**aided.state_dict(), **saved["train_state"].get("aids", {})})
        optimizer.load_state_dict(saved["train_state"]["optimizer"])
        if scaler is not None and saved["train_state"].get("scaler"):
            scaler.load_state_dict(saved["train_state"]["scaler"])
    net = _parallel(aided, model, device)  # under DDP every process now holds rank 0's weights
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema else None
    if ema is not None and saved is not None:
        check_and_load(ema.module, saved["weights"], str(p.run_dir / "last"))
        ema.updates = saved["train_state"].get("ema_updates") or 0
    trainer = Trainer(model, aided, net, criterion, optimizer, cfg, device, scaler, ema)
    return Run(p, device, model, aided, trainer, TrainState(), saved=saved)


def _trainable(p: Plan, device: torch.device) -> tuple[DETR, AidedModel, SetCriterion, torch.optim.Optimizer]:
    """What a training step works on, on ``device``: the model (new, or from ``p.start``), the model
    with its training-only aids (the optimiser's parameters), the loss and the optimiser."""
    model = initial_model(p.model, p.train, p.classes, p.start)
    if distributed.world_size() > 1 and device.type == "cuda" and any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all GPUs (RT-DETR's encoder too)
    model.to(device)
    aided = AidedModel(model, p.loss).to(device)  # the model plus its training-only aids (if any)
    if p.start is not None and p.start.aids and _same_classes(p.start, p.classes):  # e.g. RT-DETR's denoising labels
        _log(f"fine-tuning: {', '.join(aided.start_from(p.start.aids))} from {p.train.weights}")
    criterion = build_criterion(model.num_classes, p.loss, num_aux=p.model.dec_layers - 1 if p.model.aux_loss else 0,
                                sigmoid_class=model.sigmoid_class).to(device)
    return model, aided, criterion, make_optimizer(aided, p.train)


def settle_precision(p: Plan, device: torch.device) -> Plan:
    """The plan with ``precision="auto"`` replaced by what this run trains in: measured on trainers
    of its own model and its first batches (:mod:`detrkit.precision`), or, when it resumes, the
    choice it made when it started (its config.yaml; after a torchrun restart too)."""
    if p.train.precision != "auto":
        return p
    if p.train.resume:
        choice = distributed.broadcast_from_main(load_run_config(p.run_dir)[3].precision if distributed.is_main() else None)
    else:
        steps = precision.first_steps(train_samples(p.train_set, p.data, mosaic=True), p.train)
        choice, seconds = precision.choose(lambda: _trainable(p, device), p.train, steps, device)
        _log(precision.report(choice, seconds))
    return dataclasses.replace(p, train=dataclasses.replace(p.train, precision=choice))


def initial_model(model_cfg: ModelConfig, train_cfg: TrainConfig, classes: list[dict],
                  start: Optional[Loaded] = None) -> DETR:
    """A new model for ``classes``, or one started from the checkpoint ``start`` (fine-tuning; then
    ``model_cfg`` is its architecture, :func:`plan`). When the checkpoint's classes differ from the
    data set's, the class heads are re-initialised and everything else kept."""
    train_backbone = train_cfg.lr_backbone > 0
    cfg = dataclasses.replace(model_cfg, num_classes=len(classes))
    if start is None:
        model = build_model(cfg, train_backbone=train_backbone, backbone_weights=train_cfg.backbone_weights)
    else:
        model = build_model(cfg, train_backbone=train_backbone)
        # BatchNorm frozen in the checkpoint and trained here (RT-DETR R18/R34's recipe on Hugging Face's
        # weights), or the other way round: the same statistics and affine; only the update counter,
        # which a frozen BatchNorm lacks, is left out or starts at 0.
        own = {k: v for k, v in model.state_dict().items() if k.endswith(".num_batches_tracked")}
        state = {**own, **{k: v for k, v in start.state.items() if k in own or not k.endswith(".num_batches_tracked")}}
        if not _same_classes(start, classes):  # every class head (encoder scores too, where there are) starts afresh
            fresh = {k: v for k, v in model.state_dict().items() if k.startswith(model.class_heads)}
            state = {**state, **fresh}
        check_and_load(model, state, str(train_cfg.weights))
    set_classes(model, classes)
    return model


def _same_classes(start: Loaded, classes: list[dict]) -> bool:
    return start.classes is not None and [c["id"] for c in start.classes] == [c["id"] for c in classes]


def _parallel(aided: AidedModel, model: DETR, device: torch.device) -> nn.Module:
    """What computes the forward pass: ``aided`` itself, or under torchrun its DistributedDataParallel wrapper."""
    if distributed.world_size() == 1:
        return aided
    # On channels-last activations a 1x1 convolution's weight gradient comes back with
    # other strides in its size-1 dimensions than the weight's ((C, 1, C, C) vs (C, 1, 1, 1)):
    # the same memory order, so DDP's copy into its bucket is a plain copy, but it warns
    # "may impair performance" on every run. Nothing to act on; silenced.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return nn.parallel.DistributedDataParallel(
        aided, device_ids=[device.index] if device.type == "cuda" else None,
        # Models with a head per decoder layer: the earlier layers' heads only get gradients
        # from the auxiliary losses.
        find_unused_parameters=not model.shared_heads and not model.aux_loss)


# ---------------------------------------------------------------------------------------------
# Restore: where a resumed run was; the run's id and config.yaml; the random states last
# ---------------------------------------------------------------------------------------------
def restore(run: Run) -> None:
    """Continue from ``last/`` (with ``resume``): position, results log and random states; write config.yaml."""
    p, main, world, rank = run.plan, distributed.is_main(), distributed.world_size(), distributed.rank()
    rng = None
    if run.saved is not None:
        saved = run.saved.pop("train_state")
        run.saved = None  # the weights are loaded (build); what is left is read here
        run.state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
        rng, run.run_id = saved["rng"], saved.get("run_id")
        if main:
            state = run.state
            restarted = f"torchrun restart {distributed.restart_count()}: " if distributed.restart_count() else ""
            print(f"{restarted}resuming {p.run_dir} at epoch {state.epoch + 1}"
                  f"{f', sample {state.position}' if state.position else ''} (step {state.step}, "
                  f"{state.elapsed / 60:.1f} min trained)")
    run.run_id = run.run_id or distributed.broadcast_from_main(uuid.uuid4().hex if main else None)
    if main:
        p.run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(p.run_dir / "config.yaml", p.model, p.loss, p.data, p.train, run.run_id)
        run.log = open_loggers(p.train.log, p.run_dir, run.run_id, run.state.step, run.device)
    run.rows = read_results(p.run_dir)[:run.state.epoch] if main and p.train.resume else []
    if rng is not None:  # last, so that nothing above draws from the restored streams
        rng = rng if isinstance(rng, list) else [rng]  # checkpoints of single-process runs before DDP
        if len(rng) == world:
            set_rng_state(rng[rank], run.device)
        else:  # another number of processes: the same samples follow, the random streams start afresh
            seed_everything(p.train.seed + rank + 1000 * run.state.step)
            if main:
                print(f"note: the checkpoint was written by {len(rng)} processes, this run has {world}: "
                      f"same data order, new random streams")


# ---------------------------------------------------------------------------------------------
# Fit: the epochs, evaluation, last/ and best/, the results log
# ---------------------------------------------------------------------------------------------
def fit(run: Run) -> Path:
    """Train epoch after epoch until the epochs or the time budget end, patience runs out or a stop is requested."""
    p, state = run.plan, run.state
    clock = Clock(p.train, state.elapsed)
    try:
        with StopRequest() as stop:
            while state.epoch < p.train.epochs and not clock.out_of_time():
                loader = make_train_loader(epoch_samples(run, clock), p.train.batch_size, p.data.workers,
                                           seed=p.train.seed, epoch=state.epoch, position=state.position)
                status = train_one_epoch(run.trainer, loader, state, clock, stop, len(p.train_set), run.log.step)
                if status == "stop":
                    save_last(run, clock)
                    raise Interrupted(_stopped(p.run_dir, state))
                last = status == "time" or state.epoch + (status == "done") >= p.train.epochs
                early_stop = end_epoch(run, clock, status, last)
                if early_stop or last:
                    break
                if distributed.any_process(stop.signal is not None, run.device):  # a request during the evaluation
                    raise Interrupted(_stopped(p.run_dir, state))
    except NonFiniteLoss:
        save_last(run, clock)
        raise
    except Interrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, the state may be mid-step
        if distributed.is_main():
            print(f"\nstopped without saving; the last checkpoint is in {p.run_dir / 'last'}")
        raise
    _finish(run)
    distributed.barrier()  # every process leaves with the files written
    return p.run_dir


def epoch_samples(run: Run, clock: Clock):
    """The training samples of the epoch at ``run.state``: with DEIM's mosaics until ``mosaic_until`` of
    training, with ``augment`` until ``augment_stop_epoch``, then with the flip and the resize only."""
    p, state = run.plan, run.state
    progress = clock.progress() if p.train.minutes is not None else state.progress(p.train, len(p.train_set))
    if p.data.mosaic > 0 and state.stop_mosaics(progress, p.data.mosaic_until):
        _log(f"mosaic off from epoch {state.epoch + 1} ({progress:.0%} of training done)")
    augment = augments(p.data, state.epoch, p.train.epochs)
    if not augment and state.position == 0 and (state.epoch == 0 or augments(p.data, state.epoch - 1, p.train.epochs)):
        _log(f"augmentation {p.data.augment!r} off from epoch {state.epoch + 1}: flip and resize only")
    return train_samples(p.train_set, p.data, mosaic=state.mosaic_stopped is None, augment=augment)


def end_epoch(run: Run, clock: Clock, status: str, last: bool) -> bool:
    """After an epoch (or the end of the time budget): its results row, the evaluation, ``best/``
    and ``last/``. Returns True when patience has run out."""
    p, state, main = run.plan, run.state, distributed.is_main()
    row = {"epoch": state.epoch + 1, "seconds": round(clock.elapsed, 1), "steps": state.step,
           "lr": run.trainer.optimizer.param_groups[0]["lr"]}
    row.update({f"train_{k}": round(v / max(state.count, 1), 5) for k, v in logged(state.sums).items()})
    if status == "done":  # a time budget can end an epoch early: then it stays open
        state.epoch, state.position, state.sums, state.count = state.epoch + 1, 0, {}, 0
    early_stop = False
    summary = f"epoch {row['epoch']}: loss {row.get('train_loss', float('nan')):.4f}  "
    if p.val_set is not None and (row["epoch"] % p.train.eval_every == 0 or last):
        metrics, detections = evaluate_dataset(run.weights, p.val_set, batch_size=p.train.batch_size,
                                               workers=p.data.workers, device=run.device)
        row.update({k: metrics[k] for k in METRIC_KEYS})
        if main:
            write_metrics(p.run_dir, metrics, detections)
        if metrics["AP"] > state.best_ap:
            state.best_ap, state.best_epoch = metrics["AP"], row["epoch"]
            if main:
                with checkpoint_folder(p.run_dir / "best") as tmp:  # with the best checkpoint's own numbers
                    write_model_files(run.weights, tmp, inference=p.inference)
                    write_metrics(tmp, metrics, detections)
        elif p.train.patience is not None and not last and row["epoch"] - state.best_epoch >= p.train.patience:
            early_stop = True
        summary += f"AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  "
    _log(summary + f"({clock.elapsed / 60:.1f} min)")
    if main:
        run.rows.append(row)
        write_results(p.run_dir, run.rows)
        run.log.epoch(row)
    save_last(run, clock)
    if early_stop:
        _log(f"early stop: no AP improvement for {p.train.patience} epochs "
             f"(best AP {state.best_ap:.4f} at epoch {state.best_epoch})")
    return early_stop


def save_last(run: Run, clock: Clock) -> None:
    """``last/``: the weights for inference, and the state to continue from (all processes call it)."""
    rngs = distributed.gather_to_main(rng_state(run.device))
    run.state.elapsed = clock.elapsed
    if not distributed.is_main():
        return
    trainer = run.trainer
    extra = {"scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None, "rng": rngs,
             "run_id": run.run_id,
             # the training-only aids' parameters, which the model's own checkpoint never holds
             "aids": {k: v for k, v in run.aided.state_dict().items() if not k.startswith("model.")},
             **dataclasses.asdict(run.state)}
    if trainer.ema is not None:  # model.safetensors holds the EMA; the raw weights continue training
        extra |= {"ema_updates": trainer.ema.updates,
                  "model": {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}}
    save_run_checkpoint(run.plan.run_dir / "last", run.weights, trainer.optimizer, extra, run.plan.inference)


def _finish(run: Run) -> None:
    """``best/`` without validation data: the last weights; with it: the extras of the best checkpoint."""
    p = run.plan
    if not distributed.is_main():
        return
    if p.val_set is None:
        save_model(run.weights, p.run_dir / "best", inference=p.inference)
    elif (p.run_dir / "best" / "detections.json").is_file():
        # The extras of the best checkpoint from its saved detections: no second pass of the model.
        detections = json.loads((p.run_dir / "best" / "detections.json").read_text())
        extras = write_analysis(p.run_dir / "best", p.val_set.json_path, detections)
        print(format_best_threshold(extras["best"], 0.5))
        run.log.best_pictures(p.val_set, detections, p.run_dir / "best", run.state.step)


def _stopped(run_dir: Path, state: TrainState) -> str:
    where = f"epoch {state.epoch + 1}, sample {state.position}" if state.position else f"the end of epoch {state.epoch}"
    message = (f"stopped at {where}: checkpoint saved in {run_dir / 'last'}; "
               f"continue with: detrkit train --resume {run_dir}")
    _log("\n" + message)
    return message


def _log(line: str) -> None:
    if distributed.is_main():
        tqdm.write(line)


# ---------------------------------------------------------------------------------------------
# The files of a run: last/ to resume from, config.yaml, results
# ---------------------------------------------------------------------------------------------
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


def write_results(run_dir: Path, rows: list[dict]) -> None:
    """``results.csv`` (one row per epoch) and its plot ``results.png``."""
    first = ["epoch", "seconds", "steps", "lr"]
    keys = first + sorted({k for r in rows for k in r} - set(first) - set(METRIC_KEYS)) + list(METRIC_KEYS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "results.csv", buf.getvalue())
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
