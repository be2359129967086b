"""Dropout with a cheaper random mask on CPUs.

On a CPU, :func:`torch.nn.functional.dropout` draws its mask with ``bernoulli_``, element by
element in scalar code, which costs several times the attention it follows. Here every element
takes 32 bits of a 64-bit draw from the same generator and is kept when they are at or above
``p * 2^32``, one vectorised comparison. The distribution is the same (each element is dropped
with probability ``p``, to within 2^-32, independently) and so is the scaling of the kept ones
by ``1 / (1 - p)``; only the random numbers differ. ``python benchmarks/bench.py --only
dropout`` measures both, docs/benchmarks.md records it and the training steps it shortens. On
GPUs PyTorch's dropout is used as it is.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def draws_own_mask(device: torch.device) -> bool:
    """Whether dropout on ``device`` uses :func:`keep_mask` (CPUs) rather than PyTorch's own."""
    return device.type == "cpu"


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> Tensor:
    """A CPU bool tensor of ``shape``, each element False (dropped) with probability ``p``.

    Drawn from the default CPU generator (``torch.manual_seed`` and saved RNG states apply).
    """
    dropped = round(p * 2 ** 32)  # of every 2^32 equally likely draws
    if dropped == 2 ** 32:  # p within 2^-33 of 1: the threshold below would not fit in int32
        return torch.zeros(shape, dtype=torch.bool)
    n = math.prod(shape)
    # The full 64-bit range (from the int64 minimum, no upper bound): every bit is random, so
    # each 32-bit half is uniform on [-2^31, 2^31).
    bits = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2 ** 63), None)
    halves = bits.view(torch.int32)[:n].view(shape)
    return halves >= dropped - 2 ** 31  # P(keep) = 1 - dropped / 2^32


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)``: zero each element with probability ``p``, scale the rest by ``1 / (1 - p)``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if not draws_own_mask(x.device) or p == 1.0:
        return F.dropout(x, p, True)
    return (x * keep_mask(x.shape, p)).mul_(1.0 / (1.0 - p))  # in place: x * mask's backward needs the mask only


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same train/eval behaviour) drawing its mask with :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
