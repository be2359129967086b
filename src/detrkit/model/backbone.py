"""The CNN backbones: a torchvision ResNet trunk with frozen BatchNorm, and ResNet-vd (RT-DETR).

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
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from detrkit.config import BACKBONE_CHANNELS, RESNET_VD

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
        # convolution: rebuilt when a weight or statistic changes (see :func:`folded`). Not a buffer:
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
        return conv_bn(x, conv, bn, self._fold_cache, F.relu_ if relu else None)

    def train(self, mode: bool = True) -> "Backbone":
        self._fold_cache.clear()  # the cache cannot see training's updates (see folded)
        return super().train(mode)


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.Module, cache: dict, act=None) -> Tensor:
    """``act(bn(conv(x)))``, as one convolution where folding is exact.

    A BatchNorm in training mode normalises with the batch's statistics: nothing to fold, the
    two modules run as they are. Otherwise (frozen, or eval mode) the pair is one convolution
    with the weights of :func:`folded`, kept in ``cache`` (a dict owned by the caller).
    """
    if isinstance(bn, _BatchNorm) and bn.training:  # BatchNorm2d, or SyncBatchNorm under DDP on GPUs
        x = bn(conv(x))
        if x.requires_grad:
            dense_grad(x)
    else:
        weight, bias = folded(conv, bn, x, cache)
        x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return act(x) if act is not None else x


def dense_grad(x: Tensor) -> None:
    """Have the gradient of ``x`` handed on dense, in the memory layout of ``x``, when it arrives strided.

    A feature map that is then concatenated (the hybrid encoder's fusion, the decoder's flattened
    memory) gets back a gradient that is a slice of a larger one: strided with gaps. BatchNorm's
    backward on CPUs takes a slow path for such a gradient (2 x 256 x 80 x 80: 23 ms instead of
    2 ms); one copy into a dense tensor is far cheaper. The values are the same. (A tensor hook,
    not an autograd function: the activation after the BatchNorm may work in place.)
    """
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format

    def hook(grad: Tensor) -> Tensor:
        dense = grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)
        return grad if dense else grad.contiguous(memory_format=layout)

    x.register_hook(hook)


def folded(conv: nn.Conv2d, bn: nn.Module, x: Tensor, cache: dict) -> tuple[Tensor, Tensor]:
    """The (weight, bias) of ``conv`` followed by ``bn`` (fixed statistics) as one convolution.

    Recomputed on every call while gradients flow to the convolution's weight (the product is
    differentiable and cheap next to the convolution). Otherwise cached in ``cache[conv]``, in
    the dtype the convolution will run in (bfloat16 under bfloat16 autocast, so autocast does
    not cast the weights again on every call) and in the memory layout of the activations ``x``.

    The cache's key sees in-place changes that bump a tensor's version counter (``copy_``, so
    ``load_state_dict``; the ``torch._foreach_*`` ops of the EMA) and moves (``.to()``), but
    training's own updates bump nothing: BatchNorm writes its running statistics inside its
    kernel, and the fused AdamW step (``torch._fused_adamw_``) writes the weights likewise. So
    every owner of a cache clears it on each switch between training and eval mode
    (``Backbone.train``, ``ConvNorm.train``); stale folded weights would make every evaluation
    during training score an early snapshot of the backbone.
    """
    if torch.is_grad_enabled() and conv.weight.requires_grad:
        return _fold(conv, bn)
    # (Meta tensors, which count FLOPs without computing, have no autocast to ask about.)
    autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    # In-place updates (optimiser steps, load_state_dict) bump _version; .to() changes data_ptr.
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    key = (dtype, layout, x.device) + tuple((t._version, t.data_ptr()) for t in tensors)
    cached = cache.get(conv)
    if cached is None or cached[0] != key:
        # Ordinary tensors even when called under inference_mode, so the cache can serve a
        # later forward that records gradients for its input.
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = _fold(conv, bn)
            weight = weight.to(dtype).contiguous(memory_format=layout)
            cached = (key, weight, bias.to(dtype))
        cache[conv] = cached
    return cached[1], cached[2]


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


# ---------------------------------------------------------------------------------------------
# ResNet-vd: the RT-DETR backbone
# ---------------------------------------------------------------------------------------------
def _silu(x: Tensor) -> Tensor:
    return F.silu(x, inplace=not torch.is_grad_enabled())  # silu's backward needs its input


# relu in place always: its backward needs only its output.
ACTIVATIONS = {"relu": F.relu_, "silu": _silu, None: None}

STEM_WIDTH = 64  # ResNet's stem width (He et al. 2016); the deep stem's first two convolutions use half


def scaled_width(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8 (at least 8): the slim trunks' channel counts."""
    return channels if width == 1.0 else max(8, int(round(channels * width / 8)) * 8)


class ConvNorm(nn.Module):
    """Convolution (no bias) -> BatchNorm -> optional activation, run as one folded convolution
    wherever that is exact (frozen BatchNorm, or any BatchNorm in eval mode; see :func:`conv_bn`).

    ``norm``: "frozen" (:class:`~torchvision.ops.FrozenBatchNorm2d`) or "batch" (``nn.BatchNorm2d``,
    batch statistics in training). ``act``: "relu", "silu" or None. Padding defaults to
    ``(kernel - 1) // 2`` ("same" for odd kernels at stride 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
                 act: Optional[str] = None, norm: str = "batch", eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2,
                              bias=False)
        self.bn = FrozenBatchNorm2d(out_channels, eps) if norm == "frozen" else nn.BatchNorm2d(out_channels, eps)
        self.act = act
        self._fold_cache: dict = {}  # see :func:`folded`; never in the state_dict

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn(x, self.conv, self.bn, self._fold_cache, ACTIVATIONS[self.act])

    def train(self, mode: bool = True) -> "ConvNorm":
        self._fold_cache.clear()  # the cache cannot see training's updates (see folded)
        return super().train(mode)

    def folds(self) -> bool:
        """Whether the BatchNorm uses fixed statistics now (so the pair is one affine convolution)."""
        return not (isinstance(self.bn, _BatchNorm) and self.bn.training)

    def folded(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The folded (weight, bias) for activations like ``x`` (only when :meth:`folds`)."""
        return folded(self.conv, self.bn, x, self._fold_cache)


class BlockVd(nn.Module):
    """One residual block of ResNet-vd: ``relu(branch(x) + shortcut(x))``.

    ``basic`` (ResNet-18/34): 3x3 (stride) -> 3x3. ``bottleneck`` (ResNet-50/101): 1x1 -> 3x3
    (stride: the "b" placement of the stride) -> 1x1, the middle width a quarter of the output.
    The "d" in vd is the shortcut of a downsampling block: a 2x2 average pool (stride 2, partial
    windows at odd edges averaged over what they cover) before a stride-1 1x1 convolution, so
    no input pixel is skipped, where plain ResNet strides the 1x1 convolution.
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int, stride: int, project: bool,
                 norm: str) -> None:
        super().__init__()
        if kind == "basic":
            self.conv1 = ConvNorm(in_channels, out_channels, 3, stride, act="relu", norm=norm)
            self.conv2 = ConvNorm(out_channels, out_channels, 3, norm=norm)
            self.conv3 = None
        else:
            width = out_channels // 4
            self.conv1 = ConvNorm(in_channels, width, 1, act="relu", norm=norm)
            self.conv2 = ConvNorm(width, width, 3, stride, act="relu", norm=norm)
            self.conv3 = ConvNorm(width, out_channels, 1, norm=norm)
        self.pool = stride == 2
        self.shortcut = ConvNorm(in_channels, out_channels, 1, norm=norm) if project else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        if self.conv3 is not None:
            out = self.conv3(out)
        identity = F.avg_pool2d(x, 2, 2, ceil_mode=True) if self.pool else x
        if self.shortcut is not None:
            identity = self.shortcut(identity)
        return F.relu_(out.add_(identity))  # in place: neither add's nor relu's backward needs the input


class ResNetVd(nn.Module):
    """ResNet-vd (He et al. 2019, "Bag of Tricks"), the backbone of RT-DETR and of Hugging Face's
    ``RTDetrResNetBackbone``: the feature maps of stages 2-4, strides 8, 16 and 32.

    Two changes from ResNet: the stem is three 3x3 convolutions (stride 2, 32 -> 32 -> 64
    channels) instead of one 7x7, and downsampling shortcuts average-pool (see :class:`BlockVd`).
    The first block of every stage has a projection shortcut, even at stride 1 where ResNet-18/34
    would add the input as it is (the RT-DETR release's PResNet, kept by Hugging Face).

    ``norm="frozen"`` (Hugging Face's ``freeze_backbone_batch_norms=True``, its default) keeps
    ImageNet statistics; ``"batch"`` trains BatchNorm as RT-DETR's R18/R34 recipes do
    (``freeze_norm: False``).

    ``frozen_stages`` has :class:`Backbone`'s meaning: 0 = every parameter learns (Hugging Face,
    which freezes nothing but the BatchNorm statistics), k >= 1 = the stem and the first k stages
    are frozen. The release's PResNet ``freeze_at`` translates as: -1 -> 0, k >= 1 -> k; its
    ``freeze_at: 0`` (the stem alone, R50/R101 recipes) has no equivalent here (the nearest are 0
    and 1). ``train=False`` freezes everything (a backbone learning rate of 0).

    ``width`` multiplies every channel count (stem included; rounded to multiples of 8) and
    ``depths`` replaces the blocks per stage: the slim trunks of CPU-sized models. 1.0 and None
    are the published ResNet-vd.
    """

    def __init__(self, name: str = "resnet50vd", *, norm: str = "frozen", frozen_stages: int = 0, train: bool = True,
                 width: float = 1.0, depths: Optional[tuple[int, ...]] = None) -> None:
        super().__init__()
        if name not in RESNET_VD:
            raise ValueError(f"unknown ResNet-vd {name!r}; choose one of {sorted(RESNET_VD)}")
        kind, named_depths, widths = RESNET_VD[name]
        depths = depths or named_depths
        widths = [scaled_width(w, width) for w in widths]
        stem = scaled_width(STEM_WIDTH, width)
        self.stem = nn.Sequential(
            ConvNorm(3, stem // 2, 3, 2, act="relu", norm=norm),
            ConvNorm(stem // 2, stem // 2, 3, act="relu", norm=norm),
            ConvNorm(stem // 2, stem, 3, act="relu", norm=norm),
        )
        in_channels = stem
        for i, (depth, out) in enumerate(zip(depths, widths)):
            stride = 1 if i == 0 else 2  # layer1 follows the stem's max pool (stride 4 already)
            # Hugging Face projects a bottleneck stage's first block only where the shape changes.
            project = kind == "basic" or in_channels != out or stride != 1
            blocks = [BlockVd(kind, in_channels, out, stride, project, norm)]
            blocks += [BlockVd(kind, out, out, 1, False, norm) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_channels = out
        self.num_channels = list(widths[1:])  # of the returned maps: layer2, layer3, layer4
        self.strides = [8, 16, 32]
        self.channels_last = True  # the layout oneDNN and cuDNN convolutions prefer (speed only)
        parts = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        frozen = parts if not train else parts[: frozen_stages + 1] if frozen_stages > 0 else []
        for part in frozen:  # the stem counts as one part: frozen_stages k freezes k + 1 parts
            part.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images (B, 3, H, W)`` -> ``[(B, C2, H/8, W/8), (B, C3, H/16, W/16), (B, C4, H/32, W/32)]``
        (sizes rounded up at each stride-2 step; channels-last memory layout)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = F.max_pool2d(self.stem(images), 3, 2, 1)
        x = self.layer1(x)
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]
