"""Every default of detrkit, written once.

Four dataclasses hold every setting: :class:`ModelConfig` (the network),
:class:`LossConfig` (matching costs and loss weights), :class:`DataConfig`
and :class:`TrainConfig`. Each default carries a comment saying where it
comes from: the paper / official implementation (facebookresearch/detr), or
our own measurement. The named presets and recipes (:mod:`detrkit.presets`) are the
only other place where numbers are chosen. The end of the module reads settings: from dicts
(checkpoints, run folders, ``--config`` files) and from flat options (flags, ``detrkit.train``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from detrkit.errors import DetrkitError
from detrkit.files import atomic_write_text


@dataclass
class ModelConfig:
    """The network. Defaults are DETR-R50 as published (paper, Table 1); ``arch`` chooses the
    family, and the RT-DETR presets (:data:`PRESETS`) set that family's sizes."""

    backbone: str = "resnet50"  # torchvision ResNet depth: resnet18/34/50/101 (RT-DETR: a RESNET_VD name)
    dilation: bool = False  # DC5: dilate layer4 instead of striding it (stride 16, paper sec. 4)
    backbone_stages: int = 4  # ResNet stages kept; 3 cuts after layer3 (stride 16, fewer channels: small presets)
    frozen_stages: int = 1  # stem + layer1 frozen, layer2-4 trained (official backbone.py); 0 = all trainable
    # "frozen": FrozenBatchNorm2d (official: ImageNet statistics, batches too small to estimate them).
    # "batch": trainable BatchNorm2d, for training from random weights, where frozen identity
    # statistics leave the ResNet unnormalised (our measurement, docs/benchmarks.md).
    backbone_norm: str = "frozen"
    num_classes: int = 91  # classes without "no object"; official COCO uses max id + 1 = 91
    d_model: int = 256  # transformer width (official hidden_dim)
    nheads: int = 8  # attention heads (official)
    enc_layers: int = 6  # encoder layers (official)
    dec_layers: int = 6  # decoder layers (official)
    dim_feedforward: int = 2048  # FFN width (official)
    dropout: float = 0.1  # dropout in attention and FFN (official)
    num_queries: int = 100  # object queries = maximum detections per image (official)
    pre_norm: bool = False  # LayerNorm before (True) or after (False, official) each sub-layer
    position_embedding: str = "sine"  # "sine" (official) or "learned"
    aux_loss: bool = True  # return every decoder layer's predictions (official: on)
    # The architecture, one of ARCHS: "detr" is the paper's; "two_stage" the fast-convergence model
    # (docs/training.md): queries chosen from the encoder with box references refined layer by
    # layer, sigmoid classification.
    arch: str = "detr"
    # Conditional DETR's cross-attention (two-stage models): each query's reference point enters
    # cross-attention as a separate spatial part of the query, concatenated with the content part
    # per head, instead of being added to it. False = DETR's addition.
    conditional_attention: bool = False
    # --- RT-DETR (arch "rtdetr", detrkit.model.rtdetr) only. The fields above keep their meaning:
    # d_model, nheads, dec_layers, dim_feedforward (the decoder's FFN), dropout, num_queries,
    # enc_layers (AIFI layers), pre_norm (AIFI only), backbone (a ResNet-vd of RESNET_VD),
    # backbone_norm, frozen_stages (see ResNetVd). Defaults: Hugging Face's RTDetrConfig, i.e.
    # PekingU/rtdetr_r50vd; the Hugging Face key is named where the name differs.
    encoder_dim: int = 256  # encoder_hidden_dim: width of the hybrid encoder's maps
    encoder_ffn_dim: int = 1024  # encoder_ffn_dim: AIFI's feed-forward width
    encode_levels: tuple[int, ...] = (2,)  # encode_proj_layers: AIFI on these levels (0 = finest); 2 = stride 32
    csp_expansion: float = 1.0  # hidden_expansion: CSP branch width / encoder_dim
    csp_blocks: int = 3  # RepVGG blocks per CSP fusion (Hugging Face: 3; the release: round(3 * depth_mult))
    pe_temperature: float = 10000.0  # positional_encoding_temperature of AIFI's sin-cos embedding
    # decoder_n_points: sampling points per head on each level. One count per level: RT-DETRv2's
    # option (its release trains (4, 4, 4) and fewer); v1 has the same count on every level.
    num_points: tuple[int, ...] = (4, 4, 4)
    offset_scale: float = 0.5  # RT-DETRv2 decoder_offset_scale: offsets in units of this x box size (v1: 0.5)
    sampling_method: str = "default"  # RT-DETRv2 decoder_method: "default" (bilinear) or "discrete" (one cell)
    learn_initial_query: bool = False  # learned initial decoder content instead of the selected cells' features
    # A slimmer trunk (ours, for CPU-sized models; 3 / 1.0 / None are the published models):
    feature_levels: int = 3  # feature maps used: the coarsest N of strides 8, 16, 32 (2: strides 16, 32, as D-FINE-N)
    backbone_width: float = 1.0  # ResNet-vd channel multiplier (stem and stages, rounded to multiples of 8)
    backbone_depths: Optional[tuple[int, ...]] = None  # ResNet-vd blocks per stage; None = the named ResNet's

    def __post_init__(self) -> None:
        for name in ("encode_levels", "num_points", "backbone_depths"):  # JSON and YAML give lists
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.backbone_norm not in ("frozen", "batch"):
            raise ValueError(f"backbone_norm must be 'frozen' or 'batch', got {self.backbone_norm!r}")
        if self.d_model % self.nheads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by nheads ({self.nheads})")
        if self.frozen_stages < 0:
            raise ValueError(f"frozen_stages must be >= 0, got {self.frozen_stages}")
        if self.arch == "rtdetr":
            self._check_rtdetr()
        else:
            self._check_detr()

    def _check_detr(self) -> None:
        if self.backbone not in BACKBONE_CHANNELS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONE_CHANNELS)}")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101), not {self.backbone}")
        if self.dilation and self.backbone_stages < 4:
            raise ValueError("dilation dilates layer4, so it needs backbone_stages=4")
        if self.position_embedding not in ("sine", "learned"):
            raise ValueError(f"position_embedding must be 'sine' or 'learned', got {self.position_embedding!r}")
        if self.conditional_attention and self.arch != "two_stage":
            raise ValueError("conditional_attention needs the reference boxes of a two-stage model (arch='two_stage')")
        if self.d_model % 2:
            raise ValueError("d_model must be even: half the channels encode y, half x")

    def _check_rtdetr(self) -> None:
        if self.backbone not in RESNET_VD:
            raise ValueError(f"unknown RT-DETR backbone {self.backbone!r}; choose one of {sorted(RESNET_VD)}")
        if self.dilation or self.conditional_attention:
            raise ValueError("dilation and conditional_attention are DETR options, not RT-DETR's")
        if self.feature_levels not in (2, 3):
            raise ValueError(f"feature_levels must be 2 (strides 16, 32) or 3 (8, 16, 32), got {self.feature_levels}")
        if len(self.num_points) != self.feature_levels or min(self.num_points) < 1:
            raise ValueError(f"num_points needs one count >= 1 for each of the {self.feature_levels} feature levels, "
                             f"got {self.num_points}")
        if not self.encode_levels or not set(self.encode_levels) <= set(range(self.feature_levels)):
            raise ValueError(f"encode_levels must be among the levels 0..{self.feature_levels - 1}, "
                             f"got {self.encode_levels}")
        if self.encoder_dim % self.nheads or self.encoder_dim % 4:
            raise ValueError(f"encoder_dim ({self.encoder_dim}) must be divisible by nheads ({self.nheads}) "
                             f"and by 4 (2-D sin-cos embedding)")
        if self.sampling_method not in ("default", "discrete"):
            raise ValueError(f"sampling_method must be 'default' or 'discrete', got {self.sampling_method!r}")
        if self.frozen_stages > 4:
            raise ValueError(f"frozen_stages must be at most 4 (ResNet-vd has 4 stages), got {self.frozen_stages}")
        if self.backbone_width <= 0 or self.csp_expansion <= 0 or self.csp_blocks < 1:
            raise ValueError("backbone_width and csp_expansion must be > 0, csp_blocks >= 1")
        if self.backbone_depths is not None and (len(self.backbone_depths) != 4 or min(self.backbone_depths) < 1):
            raise ValueError(f"backbone_depths needs 4 block counts >= 1, got {self.backbone_depths}")


# The architectures build_model makes (detrkit.model.build), by ModelConfig.arch: the paper's
# DETR, the two-stage model (detrkit.model.two_stage), RT-DETR v1/v2 (detrkit.model.rtdetr).
ARCHS = ("detr", "two_stage", "rtdetr")

# Output channels of each ResNet stage (layer1..layer4).
BACKBONE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}

# ResNet-vd (RT-DETR's backbone): block, blocks per stage, output channels per stage (Hugging Face
# RTDetrResNetConfig: layer_type, depths, hidden_sizes; RT-DETR's PResNet: depth 18/34/50/101).
RESNET_VD = {
    "resnet18vd": ("basic", (2, 2, 2, 2), (64, 128, 256, 512)),
    "resnet34vd": ("basic", (3, 4, 6, 3), (64, 128, 256, 512)),
    "resnet50vd": ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048)),
    "resnet101vd": ("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048)),
}


@dataclass
class LossConfig:
    """Hungarian matching costs and set-loss weights (official defaults)."""

    cost_class: float = 1.0  # matcher weight of the class term (official set_cost_class)
    cost_bbox: float = 5.0  # matcher weight of the L1 box term (official set_cost_bbox)
    cost_giou: float = 2.0  # matcher weight of the -GIoU term (official set_cost_giou)
    # The formula of the class cost (whose weight is cost_class), one of CLASS_COST_FORMULAS:
    # "neg_prob" is -p (official code); "one_minus_prob" is 1 - p (the paper's explanation). They
    # differ by a constant per target column, so the assignment is the same.
    class_cost_formula: str = "neg_prob"
    loss_ce: float = 1.0  # weight of the classification loss (official)
    loss_bbox: float = 5.0  # weight of the box regression loss (official bbox_loss_coef)
    loss_giou: float = 2.0  # weight of the 1 - GIoU loss (official giou_loss_coef)
    eos_coef: float = 0.1  # relative weight of the "no object" class in cross-entropy (official)
    bbox_loss: str = "l1"  # "l1" (paper, official) or "smooth_l1"
    smooth_l1_beta: float = 0.1  # Smooth L1 switch point in normalised box units (ours; boxes are in [0, 1])
    # Sigmoid (focal) classification, used by two-stage models: Deformable DETR's values.
    focal_alpha: float = 0.25  # focal loss alpha (Lin et al. 2017; Deformable DETR)
    focal_gamma: float = 2.0  # focal loss gamma (same)
    # One of CLASS_LOSSES. "focal": a matched query's target is 1 for its class (Deformable DETR).
    # "varifocal": the target is the IoU of its box with the object's, so scores rank boxes by
    # quality (VarifocalNet, RT-DETR); positives weighted by that IoU, negatives by vfl_alpha * p^gamma.
    # "mal": DEIM's matchability-aware loss: the target is IoU^mal_gamma, positives weighted 1 (so
    # a poorly matched query still learns), negatives by p^mal_gamma (times mal_alpha if set).
    class_loss: str = "focal"
    vfl_alpha: float = 0.75  # varifocal weight of the negatives (VarifocalNet, RT-DETR)
    mal_gamma: float = 1.5  # MAL's exponent (DEIM configs/base/deim.yml and rt_deim.yml: gamma 1.5)
    mal_alpha: Optional[float] = None  # MAL's weight of the negatives (DEIM's default None: no factor)
    # Two-stage only, training only: the encoder proposals are matched against every target
    # repeated this many times (H-DETR's one-to-many matching), so each object trains several
    # tokens instead of one. 1 = one-to-one. The decoder stays one-to-one, so no NMS is needed.
    encoder_repeats: int = 1
    # Two-stage only, training only: H-DETR's hybrid branch. This many more encoder tokens (the
    # next best after the model's own queries) go through the decoder as extra queries, each
    # layer matched one-to-many against every target repeated hybrid_repeats times; the model's
    # own queries cannot see them, so inference is unchanged. 0 = off.
    hybrid_queries: int = 0
    hybrid_repeats: int = 6  # H-DETR's k
    # Training-only aids (detrkit.aids); they leave the model, its checkpoints and its inference unchanged.
    query_groups: int = 1  # Group DETR: groups of learned queries, each matched one-to-one (paper: 11); 1 = off
    denoising: int = 0  # DN-DETR/DINO: groups of noised ground-truth queries (DINO: 100 queries ~ 5-10 groups); 0 = off
    # Denoising with a budget instead (RT-DETR, DINO): groups = this // the most targets of an image in
    # the batch, at least 1 (denoising_groups); 0 = off. At most one of the two is set.
    denoising_queries: int = 0
    dn_box_noise: float = 1.0  # box noise scale, in half box sizes (DINO: 1.0; DN-DETR: 0.4)
    dn_label_noise: float = 0.5  # label noise ratio; half of it is the share of flipped labels (DINO: 0.5)

    def __post_init__(self) -> None:
        if self.class_cost_formula not in CLASS_COST_FORMULAS:
            raise ValueError(f"class_cost_formula must be one of {', '.join(CLASS_COST_FORMULAS)}, "
                             f"got {self.class_cost_formula!r}")
        if self.bbox_loss not in ("l1", "smooth_l1"):
            raise ValueError(f"bbox_loss must be 'l1' or 'smooth_l1', got {self.bbox_loss!r}")
        if self.class_loss not in CLASS_LOSSES:
            raise ValueError(f"class_loss must be one of {', '.join(CLASS_LOSSES)}, got {self.class_loss!r}")
        if self.mal_gamma <= 0 or (self.mal_alpha is not None and self.mal_alpha <= 0):
            raise ValueError("mal_gamma and mal_alpha (when given) must be > 0")
        if self.query_groups < 1 or min(self.denoising, self.denoising_queries, self.hybrid_queries) < 0:
            raise ValueError("query_groups must be >= 1, denoising, denoising_queries and hybrid_queries >= 0")
        if self.denoising and self.denoising_queries:
            raise ValueError(f"denoising ({self.denoising} groups) and denoising_queries ({self.denoising_queries} "
                             f"in all) are both set: choose one (the other 0; a recipe may have set one)")
        if self.encoder_repeats < 1 or self.hybrid_repeats < 1:
            raise ValueError("encoder_repeats and hybrid_repeats must be >= 1")
        if self.smooth_l1_beta <= 0:
            raise ValueError("smooth_l1_beta must be > 0")


CLASS_COST_FORMULAS = ("neg_prob", "one_minus_prob")
CLASS_LOSSES = ("focal", "varifocal", "mal")  # LossConfig.class_loss of sigmoid-class models


def denoising_groups(groups: int, queries: int, most_targets: int) -> int:
    """The denoising groups of a batch whose fullest image has ``most_targets`` objects: ``groups``
    (LossConfig.denoising) when set, else ``queries // most_targets`` at least 1 (LossConfig.denoising_queries,
    RT-DETR's rule); 0 = no denoising, also when the batch has no targets."""
    if most_targets == 0:
        return 0
    return groups if groups else (max(queries // most_targets, 1) if queries else 0)


@dataclass
class DataConfig:
    """Where the data is and how images are sized."""

    data: Optional[str] = None  # a folder in a common layout (COCO, Roboflow COCO, YOLO), found automatically
    train_json: Optional[str] = None  # explicit COCO annotation file of the training split
    train_images: Optional[str] = None  # image root its file_name entries are relative to
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    # Shorter side at evaluation; training scales 480..800 scale with it (official). "auto": the
    # training images' median shorter side, at most AUTO_IMAGE_SIZE[arch] (the fast recipe's choice).
    image_size: int | str = 800
    max_size: Optional[int] = None  # longer side limit; None = image_size * 1333 / 800 (official ratio)
    workers: int = 2  # DataLoader worker processes
    # One of AUGMENTS. "detr": official flip + multi-scale + crop; "flip": flip only (small images);
    # "rtdetr": RT-DETR's photometric distortion, zoom-out, IoU crop and flip (data/transforms.py).
    augment: str = "detr"
    # From this epoch on (counted from 0; negative: from the end, -1 = the last) the training images
    # get only the flip and the resize, whatever `augment` (RT-DETRv2's stop_epoch policy: 71 of its
    # 72 epochs); None = never. Under a time budget the end is `epochs`'.
    augment_stop_epoch: Optional[int] = None
    # "shorter": the shorter side to image_size, the longer at most max_size (DETR). "square": both
    # sides to image_size, the aspect ratio not kept (RT-DETR's release and image processor: 640 x 640).
    resize: str = "shorter"
    check_images: bool = True  # open every image before training (ours: 2000 images of 128 px in 5 s on 2 cores); False skips
    # DEIM's dense one-to-one matching: the probability that a training image is a mosaic of four
    # (data/transforms.py Mosaic; DEIM: 0.5), so that each image holds more objects; 0 = off.
    mosaic: float = 0.0
    # The fraction of training (epochs, or the time budget) after which no mosaic is made, decided at
    # the start of each epoch. DEIM stops it at epoch 4 + E/2 of E (64 of 120): about half.
    mosaic_until: float = 0.5

    def __post_init__(self) -> None:
        if self.image_size != "auto" and not (isinstance(self.image_size, int) and self.image_size > 0):
            raise ValueError(f"image_size must be a positive number of pixels or 'auto', got {self.image_size!r}")
        if not 0 <= self.mosaic <= 1 or not 0 <= self.mosaic_until <= 1:
            raise ValueError(f"mosaic and mosaic_until must be in [0, 1], got {self.mosaic}, {self.mosaic_until}")
        if self.resize not in ("shorter", "square"):
            raise ValueError(f"resize must be 'shorter' or 'square', got {self.resize!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")


AUGMENTS = ("detr", "flip", "rtdetr")  # DataConfig.augment (detrkit.data.transforms.train_transforms)


# The largest size "auto" picks, per model family (ModelConfig.arch). DETR and the two-stage model
# attend over every stride-8 (or 32) cell, so their cost grows with the square of the pixels: on 2
# CPU cores (AMD EPYC, fp32, benchmarks/train_speed.py) detr_r18_fast trains at ~59 img/s at 128 px,
# ~16 at 256 px and ~9 at 320 px, and 256 px still gives a few thousand images several epochs in a
# quarter of an hour. RT-DETR attends only at
# stride 32 and samples a few points elsewhere, so its cost grows with the pixels: 640 px, the size
# its published weights know (training speeds: docs/benchmarks.md). Larger images are scaled down.
AUTO_IMAGE_SIZE = {"detr": 256, "two_stage": 256, "rtdetr": 640}


@dataclass
class TrainConfig:
    """The optimisation recipe. Defaults are the paper's (AdamW, lr 1e-4, backbone 1e-5, clip 0.1)."""

    model: str = "detr_r50"  # model preset (see PRESETS)
    weights: Optional[str] = None  # start from any checkpoint load_model reads (fine-tuning)
    backbone_weights: Optional[str] = None  # local torchvision ImageNet ResNet state dict
    epochs: int = 300  # official schedule length (the paper's 500-epoch runs use --epochs 500 --lr-drop 400)
    minutes: Optional[float] = None  # a time budget instead of (at most) `epochs`
    batch_size: int = 2  # images per process and micro-batch (official code: 2; the paper: 4 per GPU x 16 GPUs)
    lr: float = 1e-4  # transformer and heads (official)
    lr_backbone: float = 1e-5  # backbone (official); 0 freezes it
    weight_decay: float = 1e-4  # AdamW weight decay (official)
    clip: float = 0.1  # gradient-norm clipping (official clip_max_norm); 0 = off
    schedule: str = "step"  # "step" (official lr drop x0.1) or "cosine"
    lr_drop: Optional[float] = None  # epoch of the x0.1 drop; None = at 2/3 of training (official 200 of 300)
    warmup: float = 0.0  # linear warm-up, as a fraction of training (official: none)
    # Or a linear warm-up over this many optimiser steps, the factor (step + 1) / warmup_steps from
    # step 0 (RT-DETRv2's LinearWarmup); at most one of the two is set.
    warmup_steps: int = 0
    # Parameters trained without weight decay, any of NO_DECAY: "norm", the weights and biases of
    # normalisation layers (BatchNorm, LayerNorm, GroupNorm); "bias", every bias. Official DETR: none.
    no_decay: tuple[str, ...] = ()
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    out: str = "runs/train"  # run folder
    resume: bool = False  # continue the run in `out` from its last checkpoint
    device: str = "auto"  # "auto" = cuda if available else cpu
    seed: int = 42  # official seed
    # "fp32"; "bf16" (autocast); "fp16" (autocast with loss scaling, CUDA only). The matching and
    # the losses are always computed in float32. "auto": fp32 or bf16, whichever trains faster
    # here, measured at start-up on a few steps (detrkit/precision.py) and recorded in config.yaml.
    precision: str = "fp32"
    # Micro-batches per optimiser step: one step sees batch_size x accumulate x processes images,
    # and equals one step on a batch that large (the loss normalisers span every micro-batch).
    accumulate: int = 1
    # An exponential moving average of the weights, evaluated and saved for inference (best/, last/);
    # the raw weights are kept in last/train_state.pt to continue training.
    ema: bool = False
    ema_decay: float = 0.9999  # YOLOv5 and RT-DETR
    # The decay ramps up as ema_decay * (1 - exp(-updates / ema_warmup)) so the average is not
    # dominated by the random initial weights early on (YOLOv5; RT-DETR's `warmups`); 0 = constant.
    ema_warmup: int = 2000
    patience: Optional[int] = None  # stop when validation AP has not improved for this many epochs; None = never
    # Experiment logging (detrkit.loggers): any of LOGGERS, as a list or comma-separated names
    # ("tensorboard,mlflow"); none by default. Only rank 0 logs.
    log: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.log = logger_names(self.log)
        self.no_decay = names(self.no_decay, NO_DECAY, "no_decay", "kind")
        if not 0 <= self.warmup <= 1 or self.warmup_steps < 0:
            raise ValueError(f"warmup must be a fraction in [0, 1] and warmup_steps >= 0, got {self.warmup}, "
                             f"{self.warmup_steps}")
        if self.warmup and self.warmup_steps:
            raise ValueError(f"warmup ({self.warmup} of training) and warmup_steps ({self.warmup_steps}) are both set: "
                             f"choose one (the other 0; a recipe may have set one)")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise ValueError(f"precision must be 'fp32', 'bf16', 'fp16' or 'auto', got {self.precision!r}")
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")
        if not 0 < self.ema_decay < 1 or self.ema_warmup < 0:
            raise ValueError("ema_decay must be in (0, 1) and ema_warmup >= 0")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 epochs, got {self.patience}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError("minutes must be > 0")


NO_DECAY = ("norm", "bias")  # what TrainConfig.no_decay may name (detrkit.engine.make_optimizer)
LOGGERS = ("tensorboard", "mlflow", "wandb")  # what TrainConfig.log may name (detrkit.loggers)


def logger_names(value) -> tuple[str, ...]:
    """``"tensorboard,mlflow"``, ``["wandb", "tensorboard"]`` (items may hold commas), ``"none"``
    or nothing -> the logger names, each once, in order; an unknown name is a ValueError."""
    return names(value, LOGGERS, "log", "logger")


def names(value, allowed: tuple[str, ...], field: str, what: str) -> tuple[str, ...]:
    """A list setting: ``"a,b"``, ``["a", "b"]`` (items may hold commas), ``"none"`` or nothing -> the
    names, each once, in order; a name not in ``allowed`` is a ValueError naming ``field`` and ``what`` it is."""
    items = [value] if isinstance(value, str) else list(value or ())
    found = [n.strip().lower() for item in items for n in str(item).split(",") if n.strip()]
    found = [n for n in dict.fromkeys(found) if n != "none"]
    unknown = [n for n in found if n not in allowed]
    if unknown:
        raise ValueError(f"{field}: unknown {what} {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# Reading settings: from dicts (checkpoints' config.json, runs' config.yaml, --config files) and
# from flat options (command-line flags, flat YAML keys, detrkit.train's keywords).
# ---------------------------------------------------------------------------------------------
SECTIONS = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig, "train": TrainConfig}

# Fields renamed since checkpoints and run configs were first written: the old name, still read,
# -> the field it became (translated by config_from_dict, the one place config dicts are read).
RENAMED = {
    ModelConfig: {"two_stage": "arch"},  # two_stage: true/false became arch: "two_stage"/"detr"
    LossConfig: {"class_cost": "class_cost_formula"},  # beside the weight cost_class, easily taken for it
}


def config_from_dict(cls, values: dict):
    """Build a config dataclass from a dict, refusing unknown keys by name; old field names
    (:data:`RENAMED`) are read as the fields they became."""
    values = dict(values)
    for old, new in RENAMED.get(cls, {}).items():
        if old in values:
            value = values.pop(old)
            if old == "two_stage":
                value = "two_stage" if value else "detr"
            values.setdefault(new, value)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    return cls(**values)


def route(flat: dict) -> tuple[dict[str, dict], list[str]]:
    """Flat options (field names, ``-`` or ``_``) -> ``({"model"|"loss"|"data"|"train": {name: value}},
    unknown names)``. Every field name belongs to one section (old names, :data:`RENAMED`, to theirs)."""
    owner = {}
    for section, cls in SECTIONS.items():
        owner.update({f.name: section for f in dataclasses.fields(cls)})
        owner.update({old: section for old in RENAMED.get(cls, {})})
    sections: dict[str, dict] = {}
    unknown = []
    for key, value in flat.items():
        name = key.replace("-", "_")
        if name in owner:
            sections.setdefault(owner[name], {})[name] = value
        else:
            unknown.append(key)
    return sections, sorted(unknown)


def read_config_file(path: str) -> dict[str, dict]:
    """A ``--config`` YAML file -> config sections: sections ``model``/``loss``/``data``/``train``
    and flat option names (:func:`route`); ``model: {preset: NAME, field: value}`` names the
    preset and overrides its fields."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DetrkitError(f"{path}: cannot read the YAML config ({e})") from None
    if not isinstance(raw, dict):
        raise DetrkitError(f"{path}: the YAML config must be a mapping")
    sections = {s: dict(raw.pop(s) or {}) for s in SECTIONS if isinstance(raw.get(s), dict)}
    if "preset" in sections.get("model", {}):  # `model: {preset: NAME, <field overrides>}`
        raw["model"] = sections["model"].pop("preset")
    flat, unknown = route(raw)
    if unknown:
        raise DetrkitError(f"{path}: unknown keys {', '.join(unknown)}")
    for section, values in flat.items():
        sections.setdefault(section, {}).update(values)
    return sections


# ---------------------------------------------------------------------------------------------
# A run folder's config.yaml: the resolved configuration, written once a run is planned
# ---------------------------------------------------------------------------------------------
def save_run_config(path: Path, model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig,
                    train_cfg: TrainConfig, run_id: Optional[str] = None) -> None:
    """A run folder's ``config.yaml``: the four config sections as resolved, and the run's id (which
    checkpoints belong to this run). The experiment loggers log this file as the run's configuration."""
    text = yaml.safe_dump({"model": dataclasses.asdict(model_cfg), "loss": dataclasses.asdict(loss_cfg),
                           "data": dataclasses.asdict(data_cfg), "train": dataclasses.asdict(train_cfg),
                           "run": {"id": run_id}}, sort_keys=False)
    atomic_write_text(path, text)


def load_run_config(run_dir: Path) -> tuple[ModelConfig, LossConfig, DataConfig, TrainConfig]:
    """The four config sections of a run folder's ``config.yaml`` (:func:`save_run_config`)."""
    path = Path(run_dir) / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        return (config_from_dict(ModelConfig, raw["model"]), config_from_dict(LossConfig, raw["loss"]),
                config_from_dict(DataConfig, raw["data"]), config_from_dict(TrainConfig, raw["train"]))
    except FileNotFoundError:
        raise DetrkitError(f"{path}: not a run folder (no config.yaml)") from None
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise DetrkitError(f"{path}: invalid run configuration ({e})") from None
