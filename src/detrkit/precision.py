"""``--precision auto``: time a few real training steps in fp32 and in bf16, keep the faster.

Whether bfloat16 autocast speeds training up is a property of the machine, not of the model
alone: CPUs of one kind differ (a Zen 4 runs DETR-R50 inference 1.9x faster in bf16 yet trains
the fast preset no faster; a Xeon without AMX is slower in bf16 throughout), and on a GPU a
small model's step is bounded by kernel launches, where autocast's casts can cost more than
the faster matrix products save. So a run measures, once, at start-up:

* :func:`choose` runs ``WARMUP_STEPS + TIMED_STEPS`` optimiser steps per precision, alternating
  fp32 and bf16 (a change of machine load then hits both), on trainers built for the purpose
  from the run's own model and loss, and on the first real batches of its first epoch. The
  median step time of each precision decides (:func:`pick`).
* The run itself is untouched: its model, optimiser and EMA are built afterwards, every random
  state is restored, and the data order depends only on ``(seed, epoch)``.
* Under ``torchrun`` every process measures its share of the batches in lockstep (the losses'
  normalisers are all-reduced at each step) and the times are averaged across processes, so
  all processes take the same decision.
* The decision is written into the run's ``config.yaml`` (``train.precision``); a resumed run
  reads it there and does not measure again (:func:`detrkit.run.settle_precision`).
* On a GPU without native bf16 (before Ampere) fp32 is chosen without timing. Where it is
  native, bf16 is measured like on a CPU rather than assumed (see above).
"""
from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from typing import Callable, Optional

import torch

from detrkit import distributed
from detrkit.config import TrainConfig
from detrkit.data.build import make_train_loader
from detrkit.engine import Trainer
from detrkit.errors import DataError
from detrkit.rng import rng_state, set_rng_state

PRECISIONS = ("fp32", "bf16")  # what "auto" chooses between (fp16 needs loss scaling and a GPU: never chosen)
# Untimed steps per precision first (memory allocation, oneDNN / cuDNN kernel choice), then timed
# ones: with fewer (1 + 3, 3 + 3) the fast preset's start-ups kept fp32 two times in five where bf16
# trains it 1.15x faster (docs/training.md, "Precision: auto"). 16 steps in all.
WARMUP_STEPS = 3
TIMED_STEPS = 5
# bf16 must take less than this share of fp32's step time. Within 5 % a few steps on a shared
# machine cannot tell the two apart, and then fp32, which is exact, is kept.
BF16_MARGIN = 0.95


def clock() -> float:
    """The timer of :func:`measure` (a module function, so that tests can replace it)."""
    return time.perf_counter()


def untimed_choice(device: torch.device) -> Optional[str]:
    """The precision to take without timing, or None when it must be measured: fp32 on a GPU
    whose bf16 is emulated rather than native."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return "fp32"
    return None


def measure(step: Callable[[str], None], device: torch.device) -> dict[str, float]:
    """The median seconds of ``step(precision)`` for each of :data:`PRECISIONS`, alternating them,
    after :data:`WARMUP_STEPS` untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in PRECISIONS}
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        for name in PRECISIONS:
            _synchronize(device)  # a GPU runs asynchronously: time the work, not its launch
            start = clock()
            step(name)
            _synchronize(device)
            elapsed = clock() - start
            if i >= WARMUP_STEPS:
                times[name].append(elapsed)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick(seconds: dict[str, float]) -> str:
    """``"bf16"`` if its step takes less than :data:`BF16_MARGIN` of fp32's, else ``"fp32"``."""
    return "bf16" if seconds["bf16"] < BF16_MARGIN * seconds["fp32"] else "fp32"


def report(choice: str, seconds: dict[str, float]) -> str:
    """The one line a run prints about its choice."""
    if not seconds:
        return f"precision auto: {choice} (this GPU has no native bf16; not timed)"
    other = "bf16" if choice == "fp32" else "fp32"
    return (f"precision auto: {choice} (a training step took {seconds[choice] * 1e3:.0f} ms in {choice}, "
            f"{seconds[other] * 1e3:.0f} ms in {other}; median of {TIMED_STEPS} steps each)")


def first_steps(samples, cfg: TrainConfig) -> list[list]:
    """The micro-batch lists of the first ``WARMUP_STEPS + TIMED_STEPS`` optimiser steps of the first
    epoch (this process's share; the epoch's start again if it is shorter), read without workers."""
    loader = make_train_loader(samples, cfg.batch_size, 0, seed=cfg.seed, epoch=0)
    if len(loader) == 0:
        raise DataError("--precision auto: no training images to time the training steps on")
    batches = list(itertools.islice(itertools.cycle(loader), (WARMUP_STEPS + TIMED_STEPS) * cfg.accumulate))
    return [batches[i:i + cfg.accumulate] for i in range(0, len(batches), cfg.accumulate)]


def choose(make: Callable[[], tuple], cfg: TrainConfig, steps: list[list], device: torch.device) -> tuple[str, dict]:
    """``(precision, {precision: median step seconds})`` (the dict empty when not timed).

    ``make()`` builds what the run trains, a fresh copy each call: ``(model, aided model, criterion,
    optimiser)`` as :func:`detrkit.run.build` uses them; each precision trains its own copy with
    ``cfg`` (without an EMA, which costs the same in both). ``steps`` (:func:`first_steps`) are
    cycled through. Every process calls this.
    """
    untimed = untimed_choice(device)
    if untimed is not None:
        return untimed, {}
    saved = rng_state(device)  # building and training the copies draws random numbers
    try:
        trainers = {name: _trainer(make(), dataclasses.replace(cfg, precision=name), device) for name in PRECISIONS}
        feeds = {name: itertools.cycle(steps) for name in PRECISIONS}  # both see the same batches

        def step(name: str) -> None:
            trainers[name].forward_backward(next(feeds[name]))
            trainers[name].optimizer_step()

        local = measure(step, device)
    finally:
        set_rng_state(saved, device)
    agreed = distributed.all_mean(torch.tensor([local[name] for name in PRECISIONS], dtype=torch.float64,
                                               device=device)).tolist()
    seconds = dict(zip(PRECISIONS, agreed))
    return pick(seconds), seconds


def _trainer(parts: tuple, cfg: TrainConfig, device: torch.device) -> Trainer:
    model, aided, criterion, optimizer = parts
    return Trainer(model, aided.train(), aided, criterion.train(), optimizer, cfg, device)  # no DDP wrapper, no EMA
