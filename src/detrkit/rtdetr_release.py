"""The original RT-DETR release's checkpoints -> detrkit.

The release (lyuwenyu/RT-DETR: ``rtdetr_pytorch`` for v1, ``rtdetrv2_pytorch`` for v2) publishes
``.pth`` files written by ``torch.save``: a dict whose ``ema`` -> ``module`` entry is the state dict
of the averaged weights (the published files), or whose ``model`` entry is (a training checkpoint;
``ema`` is preferred when both are there, as the release's own fine-tuning does). A bare state dict
is read too. Only tensors and plain containers are unpickled (:func:`detrkit.convert.torch_load`).

**The config is not in the file**: it is read from the shapes (:func:`release_config`), as for an
official DETR checkpoint. What the shapes cannot tell is the release's constant or, for one
option, the file name the release publishes it under:

* attention heads: 8 in v1 (``nhead``, which no release config changes); v2 keeps a per-point
  scale buffer from which the points of each level, and so the heads, follow;
* queries: 300 (``num_queries`` of every release config) unless a learned initial query table says;
* the AIFI position temperature 10000, post-norm AIFI, no dropout (the release's defaults);
* RT-DETRv2's discrete sampling (``cross_attn_method: discrete``) changes no shape: it is read from
  the file name, ``..._dsp_...`` as the release names those models.

**Names.** The release's modules are detrkit's, renamed (:data:`_RENAMES`); its attention keeps
PyTorch's packed ``in_proj_weight``, as ours does. Two layouts of the same modules exist, v1's
(``encoder.input_proj.0.0``, ``decoder.enc_output.0``) and v2's (``.conv`` / ``.norm``,
``.proj`` / ``.norm``): both are read.

**BatchNorm.** The R18/R34 recipes train the backbone's BatchNorm (``freeze_norm: False``), so those
files hold ``num_batches_tracked`` for it; the R50/R101 ones freeze it and hold none. The
backbone is built with the kind of BatchNorm the file holds (``backbone_norm``); for inference both
are the same affine map. A missing ``num_batches_tracked`` of a trainable BatchNorm (files
converted from PaddlePaddle may lack them) is set to 0: inference never reads it.

**Buffers for one input size.** With ``eval_spatial_size`` set (640 x 640 in every release config),
the release precomputes for that size what it otherwise computes per input: the decoder's anchors
and valid mask (v2 registers them as buffers, so its files hold them; v1 keeps them out) and AIFI's
position embedding ``encoder.pos_embed{level}`` (kept out of the state dict by the release's code,
but read here should a file hold it). detrkit computes both for every input, equal at that size, so
they are checked against ours (a mismatch means the file is not the model its keys say) and then
dropped; the size they were made for becomes the model's inference size.

**Classes.** The release trains on COCO's 80 categories, mapped to contiguous labels in the order of
their ids (``mscoco_category2label``): a file with 80 classes gets COCO's ids and names; any other
count index = id. Images are resized to a square, 640 x 640 unless the buffers above say otherwise.

Not followed: the release's ``eval_idx`` (``rtdetr_r50vd_m``: trained with 6 decoder layers,
evaluated at the 3rd); detrkit, like Hugging Face's conversion of that model, reads the last layer.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from detrkit.config import ModelConfig
from detrkit.convert import COCO_NAMES, Loaded, check_point_scale, denoising_aids, resnet_vd_trunk, torch_load
from detrkit.errors import CheckpointError
from detrkit.model.hybrid_encoder import sincos_position_2d
from detrkit.model.rtdetr_decoder import anchors_for

RELEASE_HEADS = 8  # nhead of every release config (v1 files leave it no trace)
RELEASE_QUERIES = 300  # num_queries of every release config
RELEASE_PE_TEMPERATURE = 10000.0  # HybridEncoder pe_temperature
RELEASE_SIZE = 640  # eval_spatial_size [640, 640] of every release config
# COCO's 80 category ids in label order (the release's mscoco_category2label).
COCO_80 = tuple(i for i, name in COCO_NAMES.items() if name != "N/A")

# Keys that only the release's layout has: a state dict with any of them is read here.
_MARKERS = ("backbone.conv1.conv1_", "backbone.res_layers.", "encoder.input_proj.", "decoder.dec_score_head.",
            "decoder.decoder.layers.")
# Release -> ours, applied in order to every key. PResNet: ``conv1.conv1_j`` is our stem's convolution
# j-1, ``res_layers.s.blocks.b.branch2{a,b,c}`` block b of layer{s+1}, conv1..3; a first block's
# shortcut is ``short`` (stride 1) or ``short.conv`` after the average pool (stride 2, variant d).
_RENAMES = [
    (r"^backbone\.conv1\.conv1_(\d)\.", lambda m: f"backbone.stem.{int(m[1]) - 1}."),
    (r"^backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.branch2([abc])\.",
     lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.conv{'abc'.index(m[3]) + 1}."),
    (r"^backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.short\.(?:conv\.(?=conv\.|norm\.))?",
     lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.shortcut."),
    (r"^encoder\.input_proj\.(\d+)\.(?:0|conv)\.", r"encoder.input_proj.\1.conv."),
    (r"^encoder\.input_proj\.(\d+)\.(?:1|norm)\.", r"encoder.input_proj.\1.bn."),
    (r"^encoder\.encoder\.(\d+)\.layers\.(\d+)\.", r"encoder.aifi.\1.\2."),
    (r"^decoder\.enc_output\.(?:0|proj)\.", "decoder.enc_output."),
    (r"^decoder\.enc_output\.(?:1|norm)\.", "decoder.enc_output_norm."),
    (r"^decoder\.enc_score_head\.", "decoder.enc_class."),
    (r"^decoder\.enc_bbox_head\.", "decoder.enc_bbox."),
    (r"^decoder\.decoder\.layers\.", "decoder.layers."),
    (r"^decoder\.dec_score_head\.", "decoder.class_embed."),
    (r"^decoder\.dec_bbox_head\.", "decoder.bbox_embed."),
    (r"\.norm\.(?=[a-z_]+$)", ".bn."),  # every convolution's BatchNorm (ConvNormLayer.norm is our ConvNorm.bn)
]
# Buffers for one input size (see the module docstring): checked, then dropped.
_FIXED_SIZE = re.compile(r"^(decoder\.anchors|decoder\.valid_mask|encoder\.pos_embed(\d+))$")


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------
def find_release_state(ckpt: object) -> Optional[dict]:
    """The state dict inside a loaded release ``.pth`` (``ema.module``, else ``model``, else the dict
    itself) when its keys are the release's; None for anything else."""
    if not isinstance(ckpt, dict):
        return None
    ema = ckpt.get("ema")
    candidates = [ema.get("module") if isinstance(ema, dict) else None, ckpt.get("model"), ckpt]
    for state in candidates:
        if isinstance(state, dict) and any(isinstance(k, str) and k.startswith(_MARKERS) for k in state):
            return state
    return None


def _peek(path: Path) -> object:
    """The loaded file with its tensors memory-mapped (cheap: no tensor data is read); files in
    PyTorch's legacy (non-zip) format cannot be mapped and are read whole."""
    try:
        return torch_load(path, mmap=True)
    except CheckpointError:
        return torch_load(path)  # a legacy file; an unreadable one fails here with the reason


def is_release_file(path: Path) -> bool:
    """Whether the ``.pth`` at ``path`` holds an RT-DETR release state dict (raises CheckpointError
    naming the file when it is not a readable checkpoint at all, e.g. truncated)."""
    return find_release_state(_peek(path)) is not None


def release_file_config(path: Path) -> ModelConfig:
    """The :class:`ModelConfig` of a release file, from its shapes (tensor data left on disk)."""
    return release_config(_release_state(_peek(path), path), str(path))


def _release_state(ckpt: object, path: Path) -> dict:
    state = find_release_state(ckpt)
    if state is None:
        raise CheckpointError(f"{path}: not an RT-DETR release checkpoint (expected a dict whose 'ema' -> 'module' "
                              f"or 'model' entry is a state dict with keys such as decoder.dec_score_head.0.weight)")
    return state


def load_release(path: Path) -> Loaded:
    """Read an RT-DETR v1/v2 release ``.pth`` (see the module docstring). Its denoising label table
    (``decoder.denoising_class_embed``, K + 1 rows, the last the padding row) comes back in
    :attr:`Loaded.aids`, as for a Hugging Face folder."""
    state = _release_state(torch_load(path), path)
    config = release_config(state, str(path))
    weights, label_embed, size = release_to_detrkit(state, config, str(path))
    aids = denoising_aids(label_embed, config, f"{path}: decoder.denoising_class_embed.weight")
    side = size[0] if size is not None and size[0] == size[1] else RELEASE_SIZE
    inference = {"image_size": side, "max_size": None, "resize": "square"}
    return Loaded(config, weights, release_classes(config.num_classes), inference, aids)


def release_classes(num_classes: int) -> list[dict]:
    """80 classes: COCO's category ids and names in the release's label order; otherwise index = id."""
    if num_classes == len(COCO_80):
        return [{"index": i, "id": cid, "name": COCO_NAMES[cid]} for i, cid in enumerate(COCO_80)]
    return [{"index": i, "id": i, "name": str(i)} for i in range(num_classes)]


# ---------------------------------------------------------------------------------------------
# The config, from the shapes
# ---------------------------------------------------------------------------------------------
def _count(state: dict, prefix: str) -> int:
    """How many modules ``prefix0.``, ``prefix1.``, ... the state holds."""
    return len({m[1] for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _shape(state: dict, source: str, *keys: str) -> torch.Size:
    """The shape of the first of ``keys`` the state holds (the v1 and v2 names of one tensor)."""
    for key in keys:
        if key in state:
            return state[key].shape
    raise CheckpointError(f"{source}: no '{keys[0]}' in the RT-DETR release state dict (truncated or another model?)")


def release_config(state: dict, source: str = "") -> ModelConfig:
    """The :class:`ModelConfig` (``arch="rtdetr"``) of a release state dict, from its keys and shapes;
    ``source`` (the file) names it in errors and chooses discrete sampling (``_dsp_``)."""
    levels = _count(state, "encoder.input_proj.")
    encoder_dim = _shape(state, source, "encoder.input_proj.0.0.weight", "encoder.input_proj.0.conv.weight")[0]
    stacks, enc_layers = _count(state, "encoder.encoder."), _count(state, "encoder.encoder.0.layers.")
    if stacks > 1:
        raise CheckpointError(f"{source}: AIFI on {stacks} levels (use_encoder_idx) cannot be told from the "
                              f"shapes; detrkit reads the release's single AIFI level")
    if _count(state, "decoder.input_proj.") != levels:
        raise CheckpointError(f"{source}: the decoder reads {_count(state, 'decoder.input_proj.')} levels, the "
                              f"encoder gives {levels} (the release's extra strided levels are not supported)")
    num_classes = _shape(state, source, "decoder.dec_score_head.0.weight")[0]
    if _shape(state, source, "decoder.enc_score_head.weight")[0] != num_classes:
        raise CheckpointError(f"{source}: a class-agnostic encoder score head (query_select_method 'agnostic') "
                              f"is not supported by detrkit's RT-DETR")
    num_points, nheads = _release_points(state, levels, source)
    tgt = state.get("decoder.tgt_embed.weight")
    encoder_ffn = _shape(state, source, "encoder.encoder.0.layers.0.linear1.weight")[0] if enc_layers else 1024
    try:
        return ModelConfig(
            arch="rtdetr", num_classes=num_classes, **_release_trunk(state, source),
            encoder_dim=encoder_dim, encoder_ffn_dim=encoder_ffn, enc_layers=enc_layers, encode_levels=(levels - 1,),  # use_encoder_idx [2]: the coarsest level
            csp_expansion=_shape(state, source, "encoder.fpn_blocks.0.conv1.conv.weight")[0] / encoder_dim,
            csp_blocks=_count(state, "encoder.fpn_blocks.0.bottlenecks."),
            pe_temperature=RELEASE_PE_TEMPERATURE, pre_norm=False, dropout=0.0,
            d_model=_shape(state, source, "decoder.input_proj.0.conv.weight")[0], nheads=nheads,
            dec_layers=_count(state, "decoder.decoder.layers."),
            dim_feedforward=_shape(state, source, "decoder.decoder.layers.0.linear1.weight")[0],
            num_queries=tgt.shape[0] if tgt is not None else RELEASE_QUERIES,
            num_points=num_points, offset_scale=0.5,  # v1: / points * 0.5; v2: offset_scale, never configured
            sampling_method="discrete" if re.search(r"(^|[_.-])dsp\d*([_.-]|$)", Path(source).name) else "default",
            learn_initial_query=tgt is not None, feature_levels=levels, aux_loss=True,
            frozen_stages=0,  # every backbone parameter learns when fine-tuning, as from a Hugging Face folder
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: the shapes give no RT-DETR detrkit builds ({e})") from None


def _release_trunk(state: dict, source: str) -> dict:
    """The ModelConfig backbone fields of the release's PResNet (variant d) in ``state``."""
    stages = _count(state, "backbone.res_layers.")
    if not stages or "backbone.conv1.conv1_3.conv.weight" not in state:
        raise CheckpointError(f"{source}: the backbone is not the release's PResNet (ResNet-vd, three-convolution "
                              f"stem); other backbones (HGNetv2, ...) are not supported")
    if any(f"backbone.res_layers.{s}.blocks.0.short.conv.weight" in state for s in range(1, stages)):
        raise CheckpointError(f"{source}: a PResNet variant whose strided shortcuts have no average pool "
                              f"(not 'd') is not supported")
    kind = "bottleneck" if "backbone.res_layers.0.blocks.0.branch2c.conv.weight" in state else "basic"
    last = "branch2c" if kind == "bottleneck" else "branch2b"
    depths = tuple(_count(state, f"backbone.res_layers.{s}.blocks.") for s in range(stages))
    widths = tuple(_shape(state, source, f"backbone.res_layers.{s}.blocks.0.{last}.conv.weight")[0]
                   for s in range(stages))
    trunk = resnet_vd_trunk(kind, depths, widths, _shape(state, source, "backbone.conv1.conv1_3.conv.weight")[0])
    if stages != 4 or trunk is None:
        raise CheckpointError(f"{source}: PResNet with {kind} blocks {depths}, widths {widths} is not a ResNet-vd "
                              f"detrkit builds")
    frozen = not any(k.startswith("backbone.") and k.endswith("num_batches_tracked") for k in state)
    return {**trunk, "backbone_norm": "frozen" if frozen else "batch"}


def _release_points(state: dict, levels: int, source: str) -> tuple[tuple[int, ...], int]:
    """Sampling points per level and attention heads of the decoder's deformable attention.

    ``attention_weights`` has heads x (all points) rows. v2 keeps ``num_points_scale``, 1 / n for
    each of the n points of each level, which gives the points; v1 has the same count on every
    level and RELEASE_HEADS heads."""
    rows = _shape(state, source, "decoder.decoder.layers.0.cross_attn.attention_weights.weight")[0]
    scales = state.get("decoder.decoder.layers.0.cross_attn.num_points_scale")
    if scales is not None:
        counts, i, values = [], 0, scales.float().tolist()
        while i < len(values) and values[i] > 0:
            counts.append(max(1, round(1 / values[i])))
            i += counts[-1]
        heads, rest = divmod(rows, max(sum(counts), 1))
        if len(counts) != levels or i != len(values) or rest:
            raise CheckpointError(f"{source}: num_points_scale {values} does not give points for {levels} levels "
                                  f"that divide the {rows} attention weights")
        return tuple(counts), heads
    per_level, rest = divmod(rows, RELEASE_HEADS * levels)
    if rest or not per_level:
        raise CheckpointError(f"{source}: {rows} attention weights are not {RELEASE_HEADS} heads x {levels} levels "
                              f"x points")
    return (per_level,) * levels, RELEASE_HEADS


# ---------------------------------------------------------------------------------------------
# The weights
# ---------------------------------------------------------------------------------------------
def release_to_detrkit(state: dict, config: ModelConfig,
                       source: str = "") -> tuple[dict[str, Tensor], Optional[Tensor], Optional[tuple[int, int]]]:
    """Release keys -> ours (:data:`_RENAMES`). Returns our state dict (keys nothing maps to keep an
    ``unexpected:`` prefix, for the key check to name), the denoising label table, and the
    ``(height, width)`` the file's fixed-size buffers were made for (None: it has none)."""
    out: dict[str, Tensor] = {}
    fixed: dict[str, Tensor] = {}
    label_embed = None
    for key, value in state.items():
        if key == "decoder.denoising_class_embed.weight":
            label_embed = value
            continue
        if key.endswith(".cross_attn.num_points_scale"):  # v2; ours follows from num_points
            check_point_scale(key, value, config, source)
            continue
        if _FIXED_SIZE.match(key):
            fixed[key] = value
            continue
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[key if key.startswith(("backbone.", "encoder.", "decoder.")) else "unexpected:" + key] = value
    for key in [k for k in out if k.endswith(".running_var")]:
        if not (key.startswith("backbone.") and config.backbone_norm == "frozen"):
            # nn.BatchNorm2d's counter: used only by momentum=None training, never by inference.
            out.setdefault(key[: -len("running_var")] + "num_batches_tracked", torch.tensor(0))
    return out, label_embed, _fixed_size(fixed, config, source)


def _level_strides(config: ModelConfig) -> list[int]:
    return [32 // 2 ** (config.feature_levels - 1 - i) for i in range(config.feature_levels)]  # e.g. 8, 16, 32


def _fixed_size(fixed: dict[str, Tensor], config: ModelConfig, source: str) -> Optional[tuple[int, int]]:
    """Check the buffers the release made for one input size against ours; return that size."""
    size = None
    if "decoder.anchors" in fixed or "decoder.valid_mask" in fixed:
        if "decoder.anchors" not in fixed or "decoder.valid_mask" not in fixed:
            raise CheckpointError(f"{source}: decoder.anchors and decoder.valid_mask come together; one is missing")
        size = _anchor_size(fixed["decoder.anchors"], fixed["decoder.valid_mask"], config, source)
    for key, value in fixed.items():
        m = _FIXED_SIZE.match(key)
        if m[2] is not None:
            size = _check_position(key, int(m[2]), value, config, size, source)
    return size


def _anchor_size(anchors: Tensor, valid: Tensor, config: ModelConfig, source: str) -> tuple[int, int]:
    """The input size (sides multiples of 32) whose anchors and valid mask are these (release: anchors
    ``(1, S, 4)`` in logit space, inf where invalid; mask ``(1, S, 1)``)."""
    strides = _level_strides(config)
    cells = anchors.shape[1] if anchors.dim() == 3 else 0
    area = cells / sum(1 / s ** 2 for s in strides)  # height x width in pixels
    if anchors.shape != (1, cells, 4) or valid.shape != (1, cells, 1) or area != int(area):
        raise CheckpointError(f"{source}: decoder.anchors {tuple(anchors.shape)} / decoder.valid_mask "
                              f"{tuple(valid.shape)} are not anchors of {len(strides)} levels")
    area, side = int(area), math.isqrt(int(area))
    sizes = [(side, side)] + [(h, area // h) for h in range(32, area // 32 + 1, 32) if area % h == 0]
    for h, w in sizes:
        if h % 32 or w % 32:
            continue
        ours, ours_valid = anchors_for([(h // s, w // s) for s in strides], torch.device("cpu"))
        if torch.equal(ours_valid, valid.bool()) and torch.allclose(
                anchors.float()[valid.bool().expand_as(anchors)], ours[ours_valid.expand_as(ours)], atol=1e-4):
            return h, w
    raise CheckpointError(f"{source}: decoder.anchors / decoder.valid_mask are not RT-DETR's anchors for any "
                          f"input of {area} pixels (the file is not the model its other keys describe)")


def _check_position(key: str, level: int, value: Tensor, config: ModelConfig, size: Optional[tuple[int, int]],
                    source: str) -> tuple[int, int]:
    """A fixed AIFI position embedding ``(1, h*w, D)`` of ``level`` must be ours for that map; returns
    the input size it was made for. Square maps only: on other maps the release's embedding swaps
    the roles of x and y (see :func:`~detrkit.model.hybrid_encoder.sincos_position_2d`)."""
    stride = _level_strides(config)[level] if level < config.feature_levels else 0
    cells = value.shape[1] if value.dim() == 3 else 0
    h, w = (size[0] // stride, size[1] // stride) if size and stride else (math.isqrt(cells),) * 2
    if level not in config.encode_levels or value.shape != (1, h * w, config.encoder_dim) or h != w:
        raise CheckpointError(f"{source}: {key} {tuple(value.shape)} is not a square position embedding of the "
                              f"encoded level {config.encode_levels[0]} (width {config.encoder_dim})")
    ours = sincos_position_2d(h, w, config.encoder_dim, config.pe_temperature)
    if not torch.allclose(value.float(), ours, atol=1e-4):
        raise CheckpointError(f"{source}: {key} is not the sin-cos position embedding of a {h} x {w} map")
    return h * stride, w * stride
