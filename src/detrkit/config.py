"""Every default of detrkit, written once.

Four dataclasses hold every setting: :class:`ModelConfig` (the network),
:class:`LossConfig` (matching costs and loss weights), :class:`DataConfig`
and :class:`TrainConfig`. Each default carries a comment saying where it
comes from: the paper / official implementation (facebookresearch/detr), or
our own measurement. The named presets at the bottom are the only other
place where numbers are chosen.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from detrkit.errors import DetrkitError


@dataclass
class ModelConfig:
    """The DETR network. Defaults are DETR-R50 as published (paper, Table 1)."""

    backbone: str = "resnet50"  # torchvision ResNet depth: resnet18/34/50/101
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

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.backbone not in BACKBONE_CHANNELS:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONE_CHANNELS)}")
        if self.dilation and self.backbone in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101), not {self.backbone}")
        if self.dilation and self.backbone_stages < 4:
            raise ValueError("dilation dilates layer4, so it needs backbone_stages=4")
        if self.backbone_norm not in ("frozen", "batch"):
            raise ValueError(f"backbone_norm must be 'frozen' or 'batch', got {self.backbone_norm!r}")
        if self.position_embedding not in ("sine", "learned"):
            raise ValueError(f"position_embedding must be 'sine' or 'learned', got {self.position_embedding!r}")
        if self.d_model % self.nheads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by nheads ({self.nheads})")
        if self.conditional_attention and self.arch != "two_stage":
            raise ValueError("conditional_attention needs the reference boxes of a two-stage model (arch='two_stage')")
        if self.d_model % 2:
            raise ValueError("d_model must be even: half the channels encode y, half x")


# The architectures build_model makes (detrkit.model.build), by ModelConfig.arch.
ARCHS = ("detr", "two_stage")

# Output channels of each ResNet stage (layer1..layer4).
BACKBONE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
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
        if self.query_groups < 1 or self.denoising < 0 or self.hybrid_queries < 0:
            raise ValueError("query_groups must be >= 1, denoising and hybrid_queries >= 0")
        if self.encoder_repeats < 1 or self.hybrid_repeats < 1:
            raise ValueError("encoder_repeats and hybrid_repeats must be >= 1")
        if self.smooth_l1_beta <= 0:
            raise ValueError("smooth_l1_beta must be > 0")


CLASS_COST_FORMULAS = ("neg_prob", "one_minus_prob")
CLASS_LOSSES = ("focal", "varifocal", "mal")  # LossConfig.class_loss of sigmoid-class models


@dataclass
class DataConfig:
    """Where the data is and how images are sized."""

    data: Optional[str] = None  # a folder in a common layout (COCO, Roboflow COCO, YOLO), found automatically
    train_json: Optional[str] = None  # explicit COCO annotation file of the training split
    train_images: Optional[str] = None  # image root its file_name entries are relative to
    val_json: Optional[str] = None
    val_images: Optional[str] = None
    # Shorter side at evaluation; training scales 480..800 scale with it (official). "auto": the
    # training images' median shorter side, at most AUTO_IMAGE_SIZE (the fast recipe's choice).
    image_size: int | str = 800
    max_size: Optional[int] = None  # longer side limit; None = image_size * 1333 / 800 (official ratio)
    workers: int = 2  # DataLoader worker processes
    augment: str = "detr"  # "detr": official flip + multi-scale + crop; "flip": flip only (small images)
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


# The largest size "auto" picks. Ours: on 2 CPU cores the fast model trains at ~33 img/s at
# 128 px, ~8 at 256 px and ~4 at 320 px (stride 8; benchmarks/profile_step.py), so 256 px still
# gives a few thousand images several epochs in a quarter of an hour; larger images are scaled down.
AUTO_IMAGE_SIZE = 256


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

    def __post_init__(self) -> None:
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


# ---------------------------------------------------------------------------------------------
# Presets. The paper's four (d 256, 8 heads, 6+6 layers, FFN 2048, dropout 0.1, 100 queries)
# and small ones for CPUs.
# ---------------------------------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    "detr_r50": dict(backbone="resnet50"),
    "detr_r50_dc5": dict(backbone="resnet50", dilation=True),
    "detr_r101": dict(backbone="resnet101"),
    "detr_r101_dc5": dict(backbone="resnet101", dilation=True),
    # Small presets for CPUs and small data: ResNet-18 trunk, narrower and shallower transformer.
    "detr_r18_small": dict(
        backbone="resnet18", d_model=128, nheads=8, enc_layers=3, dec_layers=3,
        dim_feedforward=512, num_queries=30, frozen_stages=0,
    ),
    # The fast-convergence model for CPUs and small data: the small preset's sizes, queries chosen
    # from the encoder with refined box references (docs/training.md).
    "detr_r18_fast": dict(
        backbone="resnet18", d_model=128, nheads=8, enc_layers=3, dec_layers=3,
        dim_feedforward=512, num_queries=30, frozen_stages=0, arch="two_stage",
        backbone_stages=2,  # stride 8: at 128 px, stride 16 puts two small objects in one cell (AP 0.15 vs 0.32 at 4 min)
        dropout=0.0,  # with 0.1 a CPU step takes 586 ms, not 339 (benchmarks/profile_step.py)
        backbone_norm="batch",  # trained from random weights: frozen identity BN would not normalise
    ),
    # The smallest useful model, for tests and smoke runs (seconds per step on a CPU).
    "detr_r18_tiny": dict(
        backbone="resnet18", backbone_stages=3, d_model=64, nheads=4, enc_layers=1, dec_layers=2,
        dim_feedforward=128, num_queries=10, frozen_stages=0,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


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
# Training recipes (`detrkit train --recipe NAME`): defaults for every config section, under
# the user's --config file and flags. Measurements behind them: docs/benchmarks.md.
# ---------------------------------------------------------------------------------------------
RECIPES: dict[str, dict[str, dict]] = {
    # The paper's: DETR-R50, AdamW 1e-4 / 1e-5, 300 epochs with the lr drop at 200 (the dataclass defaults).
    "paper": {"train": {"model": "detr_r50"}},
    # Learns in minutes from random weights on a CPU: the two-stage preset, focal loss weighted as
    # in Deformable DETR, a 5x larger learning rate with warm-up and cosine decay, flip-only augmentation.
    "fast": {
        "train": dict(model="detr_r18_fast", lr=5e-4, lr_backbone=5e-4, schedule="cosine", warmup=0.03,
                      batch_size=8,  # more updates per minute: AP 0.632 vs 0.592 at batch 16 in 10 min
                      epochs=1000,
                      precision="auto"),  # CPUs of one kind differ in whether bf16 trains faster (precision.py)
        # Varifocal targets and 3 denoising groups: AP 0.261 vs 0.209 (focal, none) after 1000 steps.
        # Encoder one-to-many matching x4: AP 0.722 vs 0.599 after 10 minutes (docs/benchmarks.md).
        "loss": dict(loss_ce=2.0, cost_class=2.0, class_loss="varifocal", denoising=3, encoder_repeats=4),
        # image_size "auto": native size up to 256 px (a larger image costs more than its pixels: the
        # encoder attends over (side / 8)^2 tokens). On 2 cores a loader process steals more than it gives.
        "data": dict(augment="flip", workers=0, image_size="auto"),
    },
}


def recipe(name: str) -> dict[str, dict]:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return {section: dict(values) for section, values in RECIPES[name].items()}


def resolve(recipe_name: Optional[str], *layers: dict[str, dict]):
    """``(ModelConfig, LossConfig, DataConfig, TrainConfig)`` from a recipe's defaults and layers of
    ``{"model"|"loss"|"data"|"train": {field: value}}`` applied in order (later layers win).

    ``model`` values override fields of the preset named by ``train.model``.
    """
    merged: dict[str, dict] = recipe(recipe_name) if recipe_name else {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    unknown = sorted(set(merged) - {"model", "loss", "data", "train"})
    if unknown:
        raise ValueError(f"unknown config sections: {', '.join(unknown)}")
    train = config_from_dict(TrainConfig, merged.get("train", {}))
    model = preset(train.model, **merged.get("model", {}))
    return (model, config_from_dict(LossConfig, merged.get("loss", {})),
            config_from_dict(DataConfig, merged.get("data", {})), train)


# ---------------------------------------------------------------------------------------------
# The demo: the one place its recipe is chosen (see docs/benchmarks.md for the measurements).
# ---------------------------------------------------------------------------------------------
DEMO = dict(
    recipe="fast",
    image_size=128,  # the synthetic set's images are 128 x 128
    num_train=2000,  # synthetic training images
    num_val=200,  # synthetic validation images
    minutes=10.0,  # training budget of `make demo`
    eval_every=2,  # epochs between evaluations (each costs ~5 s)
)
