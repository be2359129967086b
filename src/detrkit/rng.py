"""The random states of a process: read, set and seed them all at once.

A run draws from Python's ``random``, NumPy's global generator, torch's CPU generator and,
on a GPU, that GPU's generator. A checkpoint saves all of them (:func:`rng_state`) so that a
resumed run continues the very same streams (:func:`set_rng_state`); something that must leave
no trace on a run (measuring the precision, :mod:`detrkit.precision`) saves and restores them.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(device: torch.device) -> dict:
    """Every random state of this process, as tensors and plain values (``torch.save``-able)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned (also after a round trip through ``torch.save``)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
