"""The order of training samples: shuffled per epoch, split across processes, resumable mid-epoch.

Two things make a run reproducible whatever happens to it (a resume in the middle of an
epoch, more or fewer data-loader workers, more or fewer processes):

* :class:`EpochSampler` yields ``torch.utils.data.DistributedSampler``'s order (a permutation
  seeded by ``seed + epoch``, padded to a multiple of the number of processes, every
  process taking every ``world``-th index) and can start ``position`` samples into it. The
  position counts samples of the epoch's order consumed by all processes together, so a run
  stopped after ``k`` steps of ``batch x processes`` samples continues at ``k x batch x processes``,
  also with another number of processes.
* :class:`SeededSamples` draws each sample's random augmentation from its own generator
  seeded by ``(seed, epoch, index)``. The augmentation of an image then depends neither on
  which process or loader worker reads it nor on what was read before, so one process with
  batch 2B sees exactly the images that two processes with batch B see together.

:class:`MosaicSamples` (DEIM's dense one-to-one matching) makes some samples out of four
images. Under :class:`SeededSamples` its draws (whether to compose, which other images) come
from the same per-sample generator, so a mosaic too depends only on ``(seed, epoch, index)``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from detrkit.data.transforms import Mosaic


class EpochSampler(Sampler[int]):
    """``DistributedSampler(shuffle=True, drop_last=False)``'s indices for one process, from ``position`` on."""

    def __init__(self, size: int, *, seed: int, epoch: int, position: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position
        self.rank, self.world = rank, world

    def order(self) -> list[int]:
        """The epoch's order for all processes: a permutation padded (with its own start) to a multiple of ``world``."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)  # DistributedSampler's seeding
        order = _pad(torch.randperm(self.size, generator=g).tolist(), self.world)
        # Past the last real sample only padding is left (possible after a change of process count).
        rest = order[self.position:] if self.position < self.size else []
        # A position reached with another number of processes may leave a remainder that does not
        # split evenly: pad it again, so every process takes the same number of steps (DDP needs that).
        return _pad(rest, self.world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.rank::self.world])

    def __len__(self) -> int:
        remaining = math.ceil(self.size / self.world) * self.world - self.position if self.position < self.size else 0
        return math.ceil(remaining / self.world)


def _pad(order: list[int], world: int) -> list[int]:
    """``order`` extended by repeating its start to a multiple of ``world`` (DistributedSampler's padding)."""
    padding = -len(order) % world
    if not order or not padding:
        return order
    return order + (order * math.ceil(padding / len(order)))[:padding]


class SeededSamples(Dataset):
    """``dataset[i]`` with the torch random state seeded by ``(seed, epoch, i)`` while it is read.

    The global random state is saved and restored around each sample (``fork_rng``), so data
    loading in the main process leaves the stream that dropout draws from untouched.
    """

    def __init__(self, dataset: Dataset, *, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also (lazily) seed every GPU-type
            # backend, ~1 ms of Python per call, 3-5 % of a small model's training step.
            torch.default_generator.manual_seed(sample_seed)
            return self.dataset[index]


class MosaicSamples(Dataset):
    """DEIM's dense one-to-one matching: more objects per training image, so that one-to-one
    matching gives more queries a positive target.

    ``samples[i]`` is, with probability ``probability``, a :class:`~detrkit.data.transforms.Mosaic`
    of image ``i`` (top left) and three images drawn uniformly from the whole set (with
    replacement, as DEIM's ``random.choices``), passed through ``transforms`` (DEIM: flip and
    resize after a mosaic; its zoom-out and IoU crop are skipped for mosaic samples); otherwise
    ``dataset[i]`` unchanged. ``dataset`` is a :class:`~detrkit.data.coco.CocoDetection` (its
    ``load_item`` and ``prepare``); a mosaic sample carries image ``i``'s ``image_id``.

    Every draw uses torch's global generator: wrapped in :class:`SeededSamples`, a sample depends
    only on ``(seed, epoch, index)``.
    """

    def __init__(self, dataset, mosaic: Mosaic, transforms: Optional[Callable], probability: float) -> None:
        if not 0 <= probability <= 1:
            raise ValueError(f"mosaic probability must be in [0, 1], got {probability}")
        self.dataset, self.mosaic, self.transforms, self.probability = dataset, mosaic, transforms, probability

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if not torch.rand(()) < self.probability:  # DEIM: random.random() <= mosaic_prob
            return self.dataset[index]
        others = torch.randint(len(self.dataset), (3,)).tolist()
        image, target = self.mosaic([self.dataset.load_item(k) for k in (index, *others)])
        return self.dataset.prepare(image, target, index, self.transforms)
