"""An exponential moving average (EMA) of a model's weights, for evaluation and inference.

After every optimiser step ``ema = d * ema + (1 - d) * weights`` for every floating-point
parameter and buffer (buffers too, so trainable BatchNorm statistics are averaged with the
weights they belong to), with the decay ramped up from 0 (YOLOv5, RT-DETR):

    d(t) = decay * (1 - exp(-t / warmup)),   t = number of updates so far.

Early in training ``d`` is small and the average follows the weights closely; later it
averages over roughly ``1 / (1 - decay)`` steps. Without the ramp, a constant 0.9999 would keep
two thirds of the random initial weights in the average after 4000 steps.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    """The averaged copy (``.module``, in eval mode, no gradients) of a model and its update rule."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: int = 2000, updates: int = 0) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, updates

    def decay_at(self, updates: int) -> float:
        """The decay of update number ``updates`` (1 = the first)."""
        return self.decay * (1 - math.exp(-updates / self.warmup)) if self.warmup > 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimiser step)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        ema, new = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ema.items() if v.is_floating_point()]
        # lerp_(a, b, w) = a + w * (b - a) = (1 - w) * a + w * b, one fused kernel for all tensors.
        torch._foreach_lerp_([ema[k] for k in floats], [new[k].detach() for k in floats], 1 - d)
        for k, v in ema.items():
            if not v.is_floating_point():  # integer buffers (BatchNorm's num_batches_tracked) are copied
                v.copy_(new[k])
