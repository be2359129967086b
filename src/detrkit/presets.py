"""Named presets and training recipes: the only place besides the config dataclasses
(:mod:`detrkit.config`) where numbers are chosen.

* :data:`PRESETS`: model presets, each a set of :class:`~detrkit.config.ModelConfig` fields;
* :data:`RECIPES`: training recipes (``detrkit train --recipe NAME``), defaults for every config
  section, and :data:`RECIPE_BACKBONES` what one changes per backbone; :data:`FAMILY_RECIPES` names
  the recipe a model family trains with when none is given;
* :func:`resolve`: a recipe and layers of settings -> the four config dataclasses;
* :data:`DEMO`: the demo's choices.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from detrkit.checkpoint import checkpoint_config
from detrkit.config import DataConfig, LossConfig, ModelConfig, TrainConfig, config_from_dict

# ---------------------------------------------------------------------------------------------
# Presets. The paper's four (d 256, 8 heads, 6+6 layers, FFN 2048, dropout 0.1, 100 queries)
# and small ones for CPUs.
# ---------------------------------------------------------------------------------------------
# What every RT-DETR preset shares (Hugging Face's RTDetrConfig): 80 COCO classes, one AIFI layer,
# decoder FFN 1024, no dropout, 300 queries, every backbone stage trained (Hugging Face freezes only
# the backbone's BatchNorm statistics: backbone_norm "frozen").
_RTDETR = dict(arch="rtdetr", num_classes=80, enc_layers=1, dim_feedforward=1024, dropout=0.0, num_queries=300,
               frozen_stages=0)

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
    # The fast-convergence model for CPUs and small data: the small preset's widths, queries chosen
    # from the encoder with refined box references (docs/training.md).
    "detr_r18_fast": dict(
        backbone="resnet18", d_model=128, nheads=8, dec_layers=3,
        # One encoder layer, as RT-DETR's one AIFI layer: at 128 px two more cost 1.4x the training
        # time and learn no more per epoch (5 minutes on the demo set: AP 0.714 vs 0.663;
        # docs/benchmarks.md)
        enc_layers=1,
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
    # RT-DETR (Zhao et al. 2024), as Hugging Face's PekingU/rtdetr_r{18,34,50,101}vd (COCO, 640x640).
    "rtdetr_r18": dict(_RTDETR, backbone="resnet18vd", csp_expansion=0.5, dec_layers=3),
    "rtdetr_r34": dict(_RTDETR, backbone="resnet34vd", csp_expansion=0.5, dec_layers=4),
    "rtdetr_r50": dict(_RTDETR, backbone="resnet50vd"),
    "rtdetr_r101": dict(_RTDETR, backbone="resnet101vd", encoder_dim=384, encoder_ffn_dim=2048),
    # RT-DETRv2 (Lv et al. 2024), as PekingU/rtdetr_v2_r{18,34,50,101}vd: the same sizes. v2 changes
    # the decoder's sampling through three options whose published values are v1's arithmetic:
    # num_points per level, offset_scale, sampling_method ("discrete" in its deployment recipes);
    # each works on any RT-DETR preset.
    "rtdetrv2_r18": dict(_RTDETR, backbone="resnet18vd", csp_expansion=0.5, dec_layers=3),
    "rtdetrv2_r34": dict(_RTDETR, backbone="resnet34vd", csp_expansion=0.5, dec_layers=4),
    "rtdetrv2_r50": dict(_RTDETR, backbone="resnet50vd"),
    "rtdetrv2_r101": dict(_RTDETR, backbone="resnet101vd", encoder_dim=384, encoder_ffn_dim=2048),
    # The CPU-sized RT-DETR, at Ultralytics YOLO11n's cost (6.5 GFLOPs, 2.6 M parameters at 640 px;
    # this: 6.9 GFLOPs, 2.7 M with 80 classes), in the spirit of D-FINE-N: a ResNet-18-vd trunk at
    # 3/8 width with one block per stage, a 128-wide hybrid encoder with one CSP block, and a
    # 3-layer 128-wide decoder. Trained from random weights (batch statistics). Its measurements
    # against detr_r18_fast: docs/benchmarks.md.
    "rtdetr_n": dict(
        _RTDETR, backbone="resnet18vd", backbone_width=0.375, backbone_depths=(1, 1, 1, 1), backbone_norm="batch",
        encoder_dim=128, encoder_ffn_dim=512, csp_blocks=1, csp_expansion=0.5, d_model=128, nheads=8, dec_layers=3,
        dim_feedforward=512, num_queries=30, num_points=(4, 4, 4),
    ),
    # The smallest RT-DETR, for tests and smoke runs (a step in well under a second on a CPU).
    "rtdetr_tiny": dict(
        _RTDETR, backbone="resnet18vd", backbone_width=0.25, backbone_depths=(1, 1, 1, 1), backbone_norm="batch",
        encoder_dim=32, encoder_ffn_dim=64, csp_blocks=1, csp_expansion=0.5, d_model=32, nheads=4, dec_layers=2,
        dim_feedforward=64, num_queries=10, num_points=(2, 2, 2),
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a named preset, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Training recipes (`detrkit train --recipe NAME`): defaults for every config section, under
# the user's --config file and flags. Measurements behind them: docs/benchmarks.md.
# ---------------------------------------------------------------------------------------------
RECIPES: dict[str, dict[str, dict]] = {
    # The paper's: DETR-R50, AdamW 1e-4 / 1e-5, 300 epochs with the lr drop at 200 (the dataclass defaults).
    "paper": {"train": {"model": "detr_r50"}},
    # Learns in minutes from random weights on a CPU: the CPU-sized RT-DETR, focal-family loss weighted
    # as in Deformable DETR, a 5x larger learning rate with warm-up and cosine decay, flip-only
    # augmentation. The options below were chosen on detr_r18_fast, its model until 2026-11-29.
    "fast": {
        # rtdetr_n against detr_r18_fast (2-core AMD EPYC, docs/benchmarks.md): the demo set after 10
        # minutes, AP 0.820 vs 0.788; a 640 px stand-in after 15, 0.755 vs 0.581 (detr_r18_fast must
        # shrink it to 256 px).
        "train": dict(model="rtdetr_n",
                      lr=5e-4, lr_backbone=5e-4, schedule="cosine", warmup=0.03,
                      batch_size=8,  # more updates per minute: AP 0.632 vs 0.592 at batch 16 in 10 min
                      epochs=1000,
                      precision="auto"),  # CPUs of one kind differ in whether bf16 trains faster (precision.py)
        # Varifocal targets and 3 denoising groups: AP 0.261 vs 0.209 (focal, none) after 1000 steps.
        # Encoder one-to-many matching x4: AP 0.722 vs 0.599 after 10 minutes (docs/benchmarks.md).
        "loss": dict(loss_ce=2.0, cost_class=2.0, class_loss="varifocal", denoising=3, encoder_repeats=4),
        # image_size "auto": native size up to the model family's cap (config.AUTO_IMAGE_SIZE: 640 px
        # for rtdetr_n; 256 for detr_r18_fast, whose encoder attends over (side / 8)^2 tokens). On 2
        # cores a loader process steals more than it gives.
        "data": dict(augment="flip", workers=0, image_size="auto"),
    },
    # RT-DETR's own recipe: the loss of Hugging Face's RTDetrConfig (= the release's
    # rtdetr_criterion: varifocal loss, its weights and matching costs, 100 denoising queries), and
    # the release's optimisation, augmentation and 640 x 640 input. The one place these live.
    # Every loss term then equals Hugging Face's (tests/test_rtdetr_loss.py), with its
    # normalisations: boxes of the step (the denoising terms: times the groups), the encoder's
    # term on the Q selected proposals. One difference, under DDP only: Hugging Face divides by
    # its own process's boxes, the release and detrkit by the all-processes count / processes.
    # The files named are lyuwenyu/RT-DETR's rtdetrv2_pytorch/configs/rtdetr/ (the release's RT-DETR
    # training; rtdetr_pytorch/configs/rtdetr/ has the same numbers but for no learning-rate warm-up
    # and R101's weight decay on everything).
    # What changes with the backbone: RECIPE_BACKBONES.
    "rtdetr": {
        # AdamW lr 1e-4, backbone 1e-5, weight decay 1e-4, betas (0.9, 0.999), clip_max_norm 0.1:
        # TrainConfig's defaults are the release's too (include/optimizer.yml).
        "train": dict(model="rtdetr_r18",
                      epochs=72,  # the 6x schedule (include/optimizer.yml epoches)
                      batch_size=16,  # total_batch_size 16 (include/dataloader.yml: 4 GPUs x 4); per process here
                      lr_drop=1000,  # MultiStepLR milestones [1000], gamma 0.1: no drop within the schedule
                      warmup_steps=2000,  # lr_warmup_scheduler: LinearWarmup, warmup_duration 2000 (steps)
                      # weight_decay 0. for the norms (backbone, encoder, decoder) and the encoder's and
                      # decoder's biases (the backbone's convolutions have none): include/optimizer.yml's regexes
                      no_decay=("norm", "bias"),
                      ema=True),  # use_ema, decay 0.9999, warmups 2000 (TrainConfig's defaults are the release's)
        "loss": dict(class_loss="varifocal", vfl_alpha=0.75,  # focal_loss_alpha (varifocal negatives), gamma 2
                     loss_ce=1.0, loss_bbox=5.0, loss_giou=2.0,  # weight_loss_vfl / _bbox / _giou
                     cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,  # matcher_class_cost / _bbox_cost / _giou_cost
                     focal_alpha=0.25, focal_gamma=2.0,  # matcher_alpha, matcher_gamma (= the varifocal gamma)
                     # num_denoising 100, label_noise_ratio 0.5, box_noise_scale 1.0
                     denoising_queries=100, dn_label_noise=0.5, dn_box_noise=1.0),
        # 640 x 640, the aspect ratio not kept (include/dataloader.yml Resize [640, 640]; Hugging Face's
        # image processor), and the release's augmentation (data/transforms.py rtdetr_train_transforms),
        # off for the last epoch: RT-DETRv2's stop_epoch 71 of 72 (rtdetrv2_pytorch/configs/rtdetrv2/
        # include/dataloader.yml; the RT-DETR configs keep it to the end).
        "data": dict(image_size=640, resize="square", augment="rtdetr", augment_stop_epoch=-1),
    },
}

# What a recipe changes for the backbone it trains (a preset's, or a fine-tuned checkpoint's): its
# defaults over the recipe's, under the user's settings.
RECIPE_BACKBONES: dict[str, dict[str, dict[str, dict]]] = {
    "rtdetr": {
        # rtdetr_r18vd_6x_coco.yml, rtdetr_r34vd_6x_coco.yml: PResNet freeze_norm False, the backbone's
        # BatchNorm trains (Hugging Face's PekingU/rtdetr_r18vd and _r34vd freeze it, as R50/R101).
        "resnet18vd": {"model": dict(backbone_norm="batch")},
        "resnet34vd": {"model": dict(backbone_norm="batch")},
        # rtdetr_r101vd_6x_coco.yml: backbone lr 0.000001; weight decay 0 for the encoder's and
        # decoder's norms alone (its regex leaves out the biases).
        "resnet101vd": {"train": dict(lr_backbone=1e-6, no_decay=("norm",))},
    },
}

# The recipe a model family trains with when no recipe is named: RT-DETR presets train as RT-DETR
# does (the paper's DETR recipe, the dataclass defaults, would give them DETR's softmax loss settings).
FAMILY_RECIPES = {"rtdetr": "rtdetr"}


def recipe(name: str) -> dict[str, dict]:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return {section: dict(values) for section, values in RECIPES[name].items()}


def resolve(recipe_name: Optional[str], *layers: dict[str, dict]):
    """``(ModelConfig, LossConfig, DataConfig, TrainConfig)`` from a recipe's defaults and layers of
    ``{"model"|"loss"|"data"|"train": {field: value}}`` applied in order (later layers win).

    ``model`` values override fields of the preset named by ``train.model`` or, fine-tuning
    (``train.weights``), of the checkpoint's own model config (its architecture, and its dropout,
    frozen stages and backbone BatchNorm unless the layers set them). Without a recipe name, a model family with its
    own recipe (:data:`FAMILY_RECIPES`) gets that one; the recipe's entry in :data:`RECIPE_BACKBONES`
    for the model's backbone adds to its defaults.
    """
    merged: dict[str, dict] = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    unknown = sorted(set(merged) - {"model", "loss", "data", "train"})
    if unknown:
        raise ValueError(f"unknown config sections: {', '.join(unknown)}")
    weights = merged.get("train", {}).get("weights")
    base = checkpoint_config(weights) if weights is not None else None  # fine-tuning: the checkpoint's model
    if recipe_name is None:  # the model family's own recipe, if it has one
        arch = merged.get("model", {}).get("arch") or (base.arch if base is not None else PRESETS.get(
            merged.get("train", {}).get("model", TrainConfig.model), {}).get("arch", "detr"))
        recipe_name = FAMILY_RECIPES.get(arch)
    if recipe_name:
        defaults = recipe(recipe_name)
        with_recipe = {s: {**defaults.get(s, {}), **merged.get(s, {})} for s in set(merged) | set(defaults)}
        backbone = with_recipe.get("model", {}).get("backbone") or (base.backbone if base is not None else PRESETS.get(
            with_recipe["train"].get("model", TrainConfig.model), {}).get("backbone"))
        for section, values in RECIPE_BACKBONES.get(recipe_name, {}).get(backbone, {}).items():
            defaults.setdefault(section, {}).update(values)
        merged = {s: {**defaults.get(s, {}), **merged.get(s, {})} for s in set(merged) | set(defaults)}
    if recipe_name == "fast" and base is None and not merged["train"].get("backbone_weights"):
        # From random weights, so the backbone's BatchNorm trains: a frozen one (the published presets'
        # setting, for pretrained statistics) would keep identity statistics and normalise nothing.
        merged.setdefault("model", {}).setdefault("backbone_norm", "batch")
    train = config_from_dict(TrainConfig, merged.get("train", {}))
    model = (dataclasses.replace(base, **merged.get("model", {})) if base is not None
             else preset(train.model, **merged.get("model", {})))
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
