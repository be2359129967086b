"""The one function that turns a :class:`~detrkit.config.ModelConfig` into a model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from detrkit.config import ModelConfig
from detrkit.model.backbone import Backbone
from detrkit.model.detr import DETR
from detrkit.model.position import PositionEmbeddingLearned, PositionEmbeddingSine
from detrkit.model.rtdetr import RTDETR, build_rtdetr
from detrkit.model.transformer import DecoderLayer, Transformer
from detrkit.model.two_stage import ConditionalDecoderLayer, TwoStageDETR


def build_model(config: ModelConfig, *, train_backbone: bool = True,
                backbone_weights: Optional[Union[str, Path]] = None) -> Union[DETR, RTDETR]:
    """The model ``config.arch`` names: :class:`DETR` (``"detr"``), :class:`TwoStageDETR`
    (``"two_stage"``) or :class:`RTDETR` (``"rtdetr"``).

    ``train_backbone=False`` (the official rule when the backbone learning rate is 0) freezes
    the whole backbone; ``backbone_weights`` is a local torchvision ImageNet state-dict file
    (torchvision ResNets only). The model keeps ``config`` as ``model.config``.
    """
    if config.arch == "rtdetr":
        if backbone_weights is not None:
            raise ValueError("backbone weights are torchvision ResNet state dicts, and RT-DETR's ResNet-vd has none: "
                             "start from a Hugging Face RT-DETR folder with --weights instead")
        model = build_rtdetr(config, train_backbone=train_backbone)
        model.config = config
        return model
    backbone = Backbone(
        config.backbone, dilation=config.dilation, stages=config.backbone_stages, frozen_stages=config.frozen_stages,
        norm=config.backbone_norm, train_backbone=train_backbone, weights_path=backbone_weights,
    )
    half = config.d_model // 2
    position = PositionEmbeddingSine(half) if config.position_embedding == "sine" else PositionEmbeddingLearned(half)
    transformer = Transformer(
        d_model=config.d_model, nheads=config.nheads, enc_layers=config.enc_layers,
        dec_layers=config.dec_layers, dim_feedforward=config.dim_feedforward, dropout=config.dropout,
        pre_norm=config.pre_norm,
        decoder_layer=ConditionalDecoderLayer if config.conditional_attention else DecoderLayer,
    )
    cls = {"detr": DETR, "two_stage": TwoStageDETR}[config.arch]
    model = cls(backbone, position, transformer, config.num_classes, config.num_queries, config.aux_loss)
    model.config = config
    return model


def count_flops(config: ModelConfig, image_size: Sequence[int] = (640, 640), batch: int = 1) -> int:
    """Floating-point operations of one inference pass of ``config``'s model on ``batch`` images of
    ``image_size`` (H, W), as :class:`torch.utils.flop_counter.FlopCounterMode` counts them: 2 per
    multiply-add of the convolutions, matrix products and attention; normalisation, activations and
    the deformable sampling (grid_sample) are not counted. On meta tensors: nothing is computed or
    allocated, so any size costs a fraction of a second. RT-DETR-R18/R34/R50/R101 at 640 x 640:
    58 / 91 / 132 / 250 G (the paper's Table 2, all operations: 60 / 92 / 136 / 259 G); the same counts as
    benchmarks/flops.py on real tensors.
    """
    with torch.device("meta"):
        # No parameter needs a gradient: the counter's module hooks refuse a module input that is a
        # parameter requiring one (DETR passes its query embedding's weight to the decoder).
        model = build_model(config).eval().requires_grad_(False)
        images = torch.zeros(batch, 3, *image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    return counter.get_total_flops()
