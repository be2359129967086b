"""The CNN backbone: a torchvision ResNet trunk with frozen BatchNorm.

The trunk is the ResNet without its global pooling and classifier. Its BatchNorm layers
are :class:`torchvision.ops.FrozenBatchNorm2d` (eps 1e-5): DETR trains with 2-4 images
per GPU, far too few for batch statistics, so the ImageNet statistics are kept fixed.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
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
        self.num_channels = BACKBONE_CHANNELS[name][stages - 1]
        self.stride = 2 ** (stages + 1) // (2 if dilation else 1)
        # Official rule: only layer2-4 learn (stem and layer1 stay at their ImageNet values),
        # and nothing learns when the backbone learning rate is 0.
        trainable = STAGES[frozen_stages:] if frozen_stages > 0 else ("conv1",) + STAGES
        for pname, p in self.body.named_parameters():
            p.requires_grad_(train_backbone and pname.split(".")[0] in trainable)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``images (B, 3, H, W)``, ``mask (B, H, W)`` bool, True = padding.

        Returns ``features (B, C, H/s, W/s)`` and the mask at that size, resampled with the
        legacy ``nearest`` interpolation as in the official code (a feature cell is padding
        when the pixel at its top-left-aligned sample point is).
        """
        features = self.body(images)
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, mask


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
