"""The CNN backbone: a torchvision ResNet trunk with frozen BatchNorm.

The trunk is the ResNet without its global pooling and classifier. Its BatchNorm layers
are :class:`torchvision.ops.FrozenBatchNorm2d` (eps 1e-5): DETR trains with 2-4 images
per GPU, far too few for batch statistics, so the ImageNet statistics are kept fixed.

A BatchNorm that uses fixed statistics is an affine map per channel, so it can be folded
into the convolution before it: ``bn(conv(x)) = conv'(x)`` with ``W' = W * s``,
``b' = beta - mean * s``, ``s = gamma / sqrt(var + eps)``. The trunk runs that way whenever
it is exact (frozen BatchNorm always, trainable BatchNorm in eval mode): one pass over each
activation instead of two or three, and under bfloat16 autocast the convolution outputs stay
bfloat16 (a separate frozen BatchNorm with float32 statistics turns them back into float32).
The modules and their ``state_dict`` are untouched; only the forward pass differs.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from detrkit.config import BACKBONE_CHANNELS

STAGES = ("layer1", "layer2", "layer3", "layer4")


class Backbone(nn.Module):
    """ResNet trunk -> one feature map at stride 32 (16 with DC5 or 3 stages) + its padding mask.

    Parameter names follow torchvision (``body.conv1.weight``, ``body.layer1.0.bn1.weight``,
    ...), which is also the official DETR checkpoint's layout under ``backbone.0.body``.
    """

    def __init__(
        self,
        name: str = "resnet50",
        *,
        dilation: bool = False,
        stages: int = 4,
        frozen_stages: int = 1,
        norm: str = "frozen",
        train_backbone: bool = True,
        weights_path: Optional[str | Path] = None,
    ) -> None:
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None,  # nothing is ever downloaded; ImageNet weights come from a local file
            replace_stride_with_dilation=[False, False, dilation],
            norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d,
        )
        if weights_path is not None:
            load_imagenet_weights(resnet, weights_path)
        kept = ("conv1", "bn1", "relu", "maxpool") + STAGES[:stages]
        self.body = nn.Sequential(OrderedDict((n, m) for n, m in resnet.named_children() if n in kept))
        self.stages = STAGES[:stages]
        self.num_channels = BACKBONE_CHANNELS[name][stages - 1]
        self.stride = 2 ** (stages + 1) // (2 if dilation else 1)
        # Official rule: only layer2-4 learn (stem and layer1 stay at their ImageNet values),
        # and nothing learns when the backbone learning rate is 0.
        trainable = STAGES[frozen_stages:] if frozen_stages > 0 else ("conv1",) + STAGES
        for pname, p in self.body.named_parameters():
            p.requires_grad_(train_backbone and pname.split(".")[0] in trainable)
        # Two switches that change speed, not results (benchmarks/bench.py measures each):
        # BatchNorm folded into the convolutions (see trunk), and channels-last activations,
        # the layout the CPU (oneDNN) and GPU (cuDNN) convolutions prefer.
        self.fold = True
        self.channels_last = True
        # Folded (weight, bias) of the convolutions whose weights get no gradient, keyed by
        # convolution: rebuilt when a weight or statistic changes (see _folded). Not a buffer:
        # it never reaches the state_dict.
        self._fold_cache: dict[nn.Conv2d, tuple[tuple, Tensor, Tensor]] = {}

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``images (B, 3, H, W)``, ``mask (B, H, W)`` bool, True = padding.

        Returns ``features (B, C, H/s, W/s)`` (in channels-last memory layout) and the mask at
        that size, resampled with the legacy ``nearest`` interpolation as in the official
        code (a feature cell is padding when the pixel at its top-left-aligned sample point is).
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.trunk(images) if self.fold else self.body(images)
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, mask

    def trunk(self, x: Tensor) -> Tensor:
        """``self.body(x)`` with every BatchNorm folded into the convolution before it, where exact."""
        body = self.body
        x = self._conv_bn(x, body.conv1, body.bn1, relu=True)
        x = body.maxpool(x)
        for stage in self.stages:
            for block in getattr(body, stage):
                x = self._block(block, x)
        return x

    def _block(self, block: nn.Module, x: Tensor) -> Tensor:
        """One torchvision ``BasicBlock`` or ``Bottleneck``, as its own forward computes it."""
        out = self._conv_bn(x, block.conv1, block.bn1, relu=True)
        if isinstance(block, Bottleneck):
            out = self._conv_bn(out, block.conv2, block.bn2, relu=True)
            out = self._conv_bn(out, block.conv3, block.bn3)
        else:
            out = self._conv_bn(out, block.conv2, block.bn2)
        identity = x if block.downsample is None else self._conv_bn(x, block.downsample[0], block.downsample[1])
        return F.relu_(out.add_(identity))

    def _conv_bn(self, x: Tensor, conv: nn.Conv2d, bn: nn.Module, relu: bool = False) -> Tensor:
        """``relu(bn(conv(x)))``, as one convolution where folding is exact."""
        if isinstance(bn, nn.BatchNorm2d) and bn.training:  # batch statistics: nothing to fold
            x = bn(conv(x))
        else:
            weight, bias = self._folded(conv, bn, x)
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return F.relu_(x) if relu else x

    def _folded(self, conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """The (weight, bias) of ``conv`` followed by ``bn`` (fixed statistics) as one convolution.

        Recomputed on every call while gradients flow to the convolution's weight (training
        layer2-4: the product is differentiable and cheap next to the convolution). Otherwise
        cached, in the dtype the convolution will run in (bfloat16 under bfloat16 autocast, so
        autocast does not cast the weights again on every call) and in the activations' layout.
        """
        if torch.is_grad_enabled() and conv.weight.requires_grad:
            return _fold(conv, bn)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        # In-place updates (optimiser steps, load_state_dict) bump _version; .to() changes data_ptr.
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        key = (dtype, layout, x.device) + tuple((t._version, t.data_ptr()) for t in tensors)
        cached = self._fold_cache.get(conv)
        if cached is None or cached[0] != key:
            # Ordinary tensors even when called under inference_mode, so the cache can serve a
            # later forward that records gradients for its input.
            with torch.inference_mode(False), torch.no_grad():
                weight, bias = _fold(conv, bn)
                weight = weight.to(dtype).contiguous(memory_format=layout)
                cached = (key, weight, bias.to(dtype))
            self._fold_cache[conv] = cached
        return cached[1], cached[2]

    def train(self, mode: bool = True) -> "Backbone":
        if mode:  # the cached weights of layers about to learn would go stale, unused
            self._fold_cache.clear()
        return super().train(mode)


def _fold(conv: nn.Conv2d, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """``bn(conv(x)) == conv2d(x, weight, bias)`` for a BatchNorm with fixed statistics.

    The same arithmetic as :class:`torchvision.ops.FrozenBatchNorm2d`: ``scale = gamma *
    rsqrt(var + eps)``, ``shift = beta - mean * scale``, applied to the convolution's output
    channels. (ResNet convolutions have no bias of their own.)
    """
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv.weight * scale[:, None, None, None], shift


def load_imagenet_weights(resnet: nn.Module, path: str | Path) -> None:
    """Load a torchvision ImageNet ResNet state dict from a local file (never downloaded).

    The classifier (``fc.*``) is ignored; every other key and shape must match.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path}: cannot read backbone weights ({e})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: not a torchvision {type(resnet).__name__} state dict "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]})"
        )
    resnet.load_state_dict(state, strict=False)
