"""Experiment logging of a training run: TensorBoard, MLflow, Weights & Biases (``--log``).

Every logger gets the same events, named the same way (:class:`Loggers`)::

    train/<loss>, train/lr   every optimiser step, at x = the step: the losses results.csv averages
                             (the total and the final layer's terms; the mean over all processes)
                             and the step's learning rate
    epoch/<column>           every results.csv row, at x = its ``steps``: epoch, seconds, lr, and the
    val/<metric>             epoch's mean losses (``train_loss``, ...) under epoch/; the 12 COCO
                             numbers of an evaluation under val/
    config                   the resolved configuration (what config.yaml holds), when a run starts
                             or resumes
    best/predictions         at the end: the best checkpoint's detections (score > 0.5) on the first
                             validation images, beside the ground truth (also in best/predictions/)

Where they go:

- TensorBoard: event files in the run folder itself, so ``tensorboard --logdir runs`` lists every
  run by its folder name. TensorBoard is a dependency of detrkit.
- MLflow (``pip install 'detrkit[log]'``): the store ``MLFLOW_TRACKING_URI`` names, else a local file
  store in ``RUN/mlruns``; experiment ``MLFLOW_EXPERIMENT_NAME``, else "detrkit"; the run is named
  after the run folder and tagged ``detrkit.run_id``.
- W&B (``pip install 'detrkit[log]'``): project ``WANDB_PROJECT``, else "detrkit"; the mode the
  environment sets (``WANDB_MODE=offline`` logs locally, ``wandb login`` online); local files in
  ``RUN/wandb``; the W&B run id is the detrkit run id.

A resumed run (``--resume``, or after a torchrun restart) continues the same logs: TensorBoard
writes into the same folder, steps continuing, and tells readers to drop what an interrupted
process logged after the checkpoint it resumes from (``purge_step``); MLflow continues the run
tagged with this run's id; W&B resumes the run with this run's id (``resume="allow"``; offline,
each session is a separate folder that ``wandb sync`` uploads into the one run).

Only rank 0 logs: the other processes get an empty :class:`Loggers`.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from PIL import Image

from detrkit.data.coco import CocoDetection
from detrkit.data.images import image_tensor
from detrkit.errors import DetrkitError
from detrkit.evaluate import METRIC_KEYS
from detrkit.rng import rng_state, set_rng_state
from detrkit.visualize import draw_detections, side_by_side

LOG_EXTRA = "pip install 'detrkit[log]'"
EXPERIMENT = "detrkit"  # MLflow experiment and W&B project when the environment names none
RUN_ID_TAG = "detrkit.run_id"  # the MLflow tag that finds a run again on resume
PICTURES = 4  # validation images drawn with the best checkpoint's detections
PICTURE_THRESHOLD = 0.5  # the score above which they are drawn (detrkit predict's default)


def require_loggers(names) -> None:
    """Fail now, naming the extra, when a logger in ``names`` is not installed (every process checks,
    so that none starts training alone)."""
    for name in names:
        if importlib.util.find_spec(name) is not None:  # the package names are the loggers' names
            continue
        if name == "tensorboard":
            raise DetrkitError("--log tensorboard needs the tensorboard package, a dependency of detrkit: "
                               "pip install tensorboard")
        raise DetrkitError(f"--log {name} needs the log extra: {LOG_EXTRA}")


class Loggers:
    """The loggers of a run, all fed the same events; with none, every call does nothing. As a
    context manager it closes them at the end, as failed when the block raises."""

    def __init__(self, backends: Optional[list] = None) -> None:
        self.backends = backends or []

    def __enter__(self) -> "Loggers":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=kind is not None)

    def step(self, step: int, values: dict[str, float]) -> None:
        """One optimiser step: its logged losses and ``lr`` (:func:`detrkit.engine.train_one_epoch`)."""
        self._scalars({f"train/{k}": v for k, v in values.items()}, step)

    def epoch(self, row: dict) -> None:
        """One results.csv row, at its ``steps``."""
        self._scalars({("val/" if k in METRIC_KEYS else "epoch/") + k: float(v) for k, v in row.items()
                       if k != "steps"}, int(row["steps"]))

    def config(self, config: dict) -> None:
        for backend in self.backends:
            backend.config(config)

    def best_pictures(self, val_set: CocoDetection, detections: list[dict], best: Path, step: int) -> None:
        """At the end: the best checkpoint's ``detections`` (COCO results, best/detections.json) drawn
        on the first validation images, written to ``best/predictions/`` and logged."""
        if self.backends:
            paths = draw_best_pictures(val_set, detections, best / "predictions")
            for backend in self.backends:
                backend.pictures("best/predictions", paths, step)

    def close(self, failed: bool = False) -> None:
        """The end of the run (``failed``: stopped by an error or a stop request)."""
        for backend in self.backends:
            backend.close(failed)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for backend in self.backends:
            backend.scalars(values, step)


def open_loggers(names, run_dir: Path, run_id: str, step: int, device: torch.device) -> Loggers:
    """The loggers ``names`` (TrainConfig.log) of the run in ``run_dir``, resumed at ``step`` (0 for a
    new run), each given the run's ``config.yaml``. Call on rank 0 only, once config.yaml is written.

    The random states of ``device`` and the host are put back afterwards: whatever a logger draws
    while starting, training draws the same numbers with or without loggers.
    """
    require_loggers(names)
    if not names:
        return Loggers()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    kept = rng_state(device)
    make = {"tensorboard": lambda: TensorBoard(run_dir, step), "mlflow": lambda: MLflow(run_dir, run_id),
            "wandb": lambda: WandB(run_dir, run_id, config)}
    loggers = Loggers()
    try:
        for name in names:
            loggers.backends.append(make[name]())
        loggers.config(config)
    except BaseException:
        loggers.close(failed=True)
        raise
    finally:
        set_rng_state(kept, device)
    return loggers


# ---------------------------------------------------------------------------------------------
# The three backends: scalars, config, pictures, close
# ---------------------------------------------------------------------------------------------
class TensorBoard:
    """Event files in the run folder (``torch.utils.tensorboard``), read by TensorBoard."""

    def __init__(self, run_dir: Path, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Resumed at `step`: readers drop the events of steps after it that an interrupted process
        # wrote (they are trained again); the epoch row at `step` itself is kept.
        self.writer = SummaryWriter(str(run_dir), purge_step=step + 1 if step else None)
        self.step = step

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def config(self, config: dict) -> None:
        # Indented four spaces: TensorBoard renders text as Markdown, this keeps the YAML as written.
        text = "".join("    " + line for line in yaml.safe_dump(config, sort_keys=False).splitlines(True))
        self.writer.add_text("config", text, self.step)

    def pictures(self, tag: str, paths: list[Path], step: int) -> None:
        for path in paths:
            with Image.open(path) as im:
                self.writer.add_image(f"{tag}/{path.stem}", np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self, failed: bool) -> None:
        self.writer.close()


class MLflow:
    """One MLflow run per detrkit run, through ``MlflowClient`` (no global active run is touched)."""

    def __init__(self, run_dir: Path, run_id: str) -> None:
        import mlflow
        from mlflow.entities import Metric, Param

        self._metric, self._param = Metric, Param
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        if uri is None:
            # MLflow 3 keeps its file store (no database, no server) behind this opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
        runs = self.client.search_runs([experiment], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
        self.resumed = bool(runs)
        if runs:
            self.run_id = runs[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name,
                                                 tags={RUN_ID_TAG: run_id}).info.run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        now = int(1000 * time.time())
        self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step) for k, v in values.items()])

    def config(self, config: dict) -> None:
        if not self.resumed:  # MLflow parameters cannot change once logged; config.yaml shows the latest
            self.client.log_batch(self.run_id, params=[self._param(k, str(v)) for k, v in _flat(config).items()])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def pictures(self, tag: str, paths: list[Path], step: int) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path=tag)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandB:
    """One W&B run per detrkit run, its id the run id; created apart from the caller's own ``wandb.run``."""

    def __init__(self, run_dir: Path, run_id: str, config: dict) -> None:
        import wandb

        self._image = wandb.Image
        project = os.environ.get("WANDB_PROJECT") or EXPERIMENT
        try:  # the mode (online, offline, disabled) and the login come from the environment
            self.run = wandb.init(project=project, id=run_id, name=run_dir.name, dir=str(run_dir), config=config,
                                  resume="allow", reinit="create_new")
        except Exception as e:  # noqa: BLE001 - W&B raises its own types (no login, no network, ...)
            raise DetrkitError(f"W&B could not start a run ({type(e).__name__}: {e}); log in with `wandb login`, "
                               f"or set WANDB_MODE=offline to log locally (sync later with `wandb sync`)") from None

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def config(self, config: dict) -> None:
        pass  # given to wandb.init (there it is also merged on resume)

    def pictures(self, tag: str, paths: list[Path], step: int) -> None:
        self.run.log({tag: [self._image(str(p), caption=p.stem) for p in paths]}, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"model": {"d_model": 256}}`` -> ``{"model.d_model": 256}``."""
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


# ---------------------------------------------------------------------------------------------
# The best checkpoint's pictures
# ---------------------------------------------------------------------------------------------
def draw_best_pictures(val_set: CocoDetection, detections: list[dict], out: Path, count: int = PICTURES,
                  threshold: float = PICTURE_THRESHOLD) -> list[Path]:
    """The first ``count`` validation images with ``detections`` (COCO results format, the best
    checkpoint's, as saved in best/detections.json) scoring above ``threshold``, beside their
    ground truth: ``out/STEM.png``."""
    data = val_set.data
    names = {c["id"]: c["name"] for c in data.categories}
    written = []
    for k in range(min(count, len(data))):
        image = image_tensor(data.image_path(k))
        dets = [d for d in detections if d["image_id"] == int(data.image_ids[k]) and d["score"] > threshold]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)],
                             dtype=torch.float32).reshape(-1, 4)  # (N, 4) xywh -> xyxy
        pred = draw_detections(image, boxes, [names[d["category_id"]] for d in dets],
                               torch.tensor([d["score"] for d in dets]))
        gt_boxes, gt_labels = data.targets(k)
        gt = draw_detections(image, torch.from_numpy(gt_boxes), [data.categories[i]["name"] for i in gt_labels])
        written.append(side_by_side(pred, gt, out / f"{Path(data.file_names[k]).stem}.png"))
    return written
