"""Datasets and loaders from a :class:`~detrkit.config.DataConfig`.

The data is given as a folder in a common layout (:mod:`detrkit.data.layouts`) or as explicit
COCO files; explicit paths win. The training loader's order and augmentation depend only on
``(seed, epoch)``, so a resumed run, or a run with more processes or loader workers, sees the
same images (:mod:`detrkit.data.sampler`).
"""
from __future__ import annotations

import copy
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from detrkit import distributed
from detrkit.config import AUTO_IMAGE_SIZE, DataConfig
from detrkit.data.batch import collate
from detrkit.data.coco import CocoDetection, load_coco
from detrkit.data.layouts import find_layout
from detrkit.data.sampler import EpochSampler, MosaicSamples, SeededSamples
from detrkit.data.transforms import MOSAIC_TILE_RATIO, Mosaic, train_transforms, val_transforms
from detrkit.errors import DataError


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
    """``(train_set or None, val_set or None)``; the val set uses the train set's class mapping.

    ``cfg.image_size`` must be a number here (``"auto"`` is settled before: :func:`auto_image_size`).
    """
    paths = data_paths(cfg)
    train_set = val_set = None
    if train:
        _need_training_data(paths)
        train_set = CocoDetection(paths["train_json"], paths["train_images"],
                                  train_transforms(cfg.image_size, cfg.max_size, cfg.augment, cfg.resize),
                                  categories=categories,
                                  check_images=cfg.check_images)
        categories = train_set.categories
    if "val_json" in paths and "val_images" in paths:
        val_set = CocoDetection(paths["val_json"], paths["val_images"],
                                val_transforms(cfg.image_size, cfg.max_size, cfg.resize), categories=categories,
                                check_images=cfg.check_images and train)
    return train_set, val_set


def train_samples(train_set: CocoDetection, cfg: DataConfig, *, mosaic: bool, augment: bool = True):
    """What the training loader reads: ``train_set``, or with ``mosaic`` (and ``cfg.mosaic > 0``) DEIM's
    mosaics of it (:class:`~detrkit.data.sampler.MosaicSamples`): tiles of half the training size, and
    after the mosaic only a flip and the resize to the training size (as DEIM), whatever ``cfg.augment``.
    ``augment=False`` (past ``cfg.augment_stop_epoch``, :func:`augments`): the images that are no mosaic
    get that flip and resize too, instead of ``cfg.augment``."""
    if not augment:  # the same images and annotations, other transforms
        train_set = copy.copy(train_set)
        train_set.transforms = train_transforms(cfg.image_size, cfg.max_size, "flip", cfg.resize)
    if not mosaic or cfg.mosaic == 0:
        return train_set
    tile = max(1, round(cfg.image_size * MOSAIC_TILE_RATIO))
    return MosaicSamples(train_set, Mosaic(tile), train_transforms(cfg.image_size, cfg.max_size, "flip", cfg.resize),
                         cfg.mosaic)


def augments(cfg: DataConfig, epoch: int, epochs: int) -> bool:
    """Whether epoch ``epoch`` (from 0) of ``epochs`` trains with ``cfg.augment``: before
    ``cfg.augment_stop_epoch`` (negative: counted back from ``epochs``, -1 = the last epoch), always
    when it is None. A rule of the epoch number alone: a resumed epoch gets what it began with."""
    stop = cfg.augment_stop_epoch
    if stop is None:
        return True
    return epoch < (stop if stop >= 0 else max(epochs + stop, 0))


def _need_training_data(paths: dict[str, Path]) -> None:
    if "train_json" not in paths or "train_images" not in paths:
        raise DataError("no training data: give --data DIR or --train-json FILE --train-images DIR")


def median_shorter_side(cfg: DataConfig) -> float:
    """The training images' median shorter side in pixels (from the annotation file's width/height)."""
    paths = data_paths(cfg)
    _need_training_data(paths)
    sizes = load_coco(paths["train_json"], paths["train_images"]).sizes  # (I, 2) h, w
    if len(sizes) == 0:
        raise DataError(f"{paths['train_json']}: no images")
    return float(np.median(sizes.min(1)))


def auto_image_size(cfg: DataConfig, arch: str) -> int:
    """``image_size="auto"``: the training images' median shorter side (from the annotation
    file's width/height), at most ``AUTO_IMAGE_SIZE[arch]`` (:data:`~detrkit.config.AUTO_IMAGE_SIZE`,
    per model family): small images are
    never enlarged, large ones are scaled down to what a CPU can train on in minutes."""
    return int(min(median_shorter_side(cfg), AUTO_IMAGE_SIZE[arch]))


def auto_size_notes(size: int, arch: str, model: str) -> list[str]:
    """What a run says of its ``auto`` image size: the rule, and, when the images were scaled down to a
    single-scale model's cap, the multi-scale preset that keeps more of their pixels."""
    cap = AUTO_IMAGE_SIZE[arch]
    notes = [f"image size: {size} px (auto: the training images' median shorter side, at most {cap} for {model})"]
    if size == cap and cap < AUTO_IMAGE_SIZE["rtdetr"]:
        notes.append(f"your images are scaled down to {cap} px; --model rtdetr_n keeps up to {AUTO_IMAGE_SIZE['rtdetr']} "
                     "px at a cost that grows with the pixels, not their square (docs/custom-data.md)")
    return notes


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
