"""Foreign checkpoint layouts -> detrkit: official DETR (facebookresearch/detr), Hugging Face DETR
and Hugging Face RT-DETR v1/v2.

Each reader returns a :class:`Loaded`: the :class:`~detrkit.config.ModelConfig` the weights need,
the state dict in our parameter names, and the class mapping when the source has one. Every
key and shape is checked later, when the state is loaded into the model
(:func:`detrkit.checkpoint.check_and_load`); nothing is unpickled beyond tensors.

* Official DETR: a ``.pth`` file, a dict whose ``model`` entry is the state dict (as published
  for R50/R101/DC5); two prefixes differ from ours.
* Hugging Face ``DetrForObjectDetection``, ``RTDetrForObjectDetection`` and
  ``RTDetrV2ForObjectDetection``: a folder with ``config.json`` (``model_type`` one of
  :data:`HF_MODEL_TYPES`, which chooses the reader) and ``model.safetensors`` or ``pytorch_model.bin``.
* The RT-DETR v1/v2 release (lyuwenyu/RT-DETR): a ``.pth`` whose ``ema`` -> ``module`` (or ``model``)
  entry is the state dict, its config read from the shapes; in its own module,
  :mod:`detrkit.rtdetr_release`, which uses the helpers here (:func:`torch_load`,
  :func:`resnet_vd_trunk`, :func:`check_point_scale`, :func:`denoising_aids`, :data:`COCO_NAMES`).
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from detrkit.config import RESNET_VD, ModelConfig
from detrkit.errors import CheckpointError
from detrkit.files import read_json
from detrkit.model.backbone import STEM_WIDTH, scaled_width

# The Hugging Face config.json ``model_type`` values load_huggingface reads.
HF_MODEL_TYPES = ("detr", "rt_detr", "rt_detr_v2")
HF_RTDETR_TYPES = ("rt_detr", "rt_detr_v2")  # those read by load_hf_rtdetr


class Loaded(NamedTuple):
    """What a checkpoint reader returns."""

    config: ModelConfig
    state: dict[str, Tensor]  # in detrkit's parameter names
    classes: Optional[list[dict]]  # [{"index", "id", "name"}] in index order; None: index = id
    inference: Optional[dict]  # {"image_size", "max_size", "resize"} the model was trained with; None: unknown
    # Trained parameters of the training-only aids (detrkit.aids.AidedModel names), for fine-tuning
    # to start from: Hugging Face RT-DETR's denoising label table. None: nothing.
    aids: Optional[dict[str, Tensor]] = None


# ---------------------------------------------------------------------------------------------
# Official DETR (facebookresearch/detr) checkpoints
# ---------------------------------------------------------------------------------------------
def torch_load(path: Path, mmap: bool = False) -> object:
    """``torch.load`` that refuses anything but tensors and plain containers.

    ``argparse.Namespace`` is allowed too: official training checkpoints store their
    command-line arguments in one, and rebuilding it runs no code. ``mmap=True`` leaves the
    tensor data on disk until it is read (files in PyTorch's zip format only): a cheap look at
    the keys and shapes.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file holds Python objects other than tensors, which could run "
            f"code when unpickled ({str(e).splitlines()[0]}). Only load weights from sources you trust, "
            f"and prefer safetensors."
        ) from None
    except Exception as e:  # noqa: BLE001 - the unpickler fails in many ways on foreign bytes
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); "
                              f"is it truncated?") from None


def official_config(state: dict[str, Tensor], args: Optional[argparse.Namespace] = None,
                    filename: str = "") -> ModelConfig:
    """Infer the :class:`ModelConfig` of an official state dict from its keys and shapes.

    Dilation (DC5) and the number of heads leave no trace in the shapes: they come from the
    checkpoint's stored ``args`` when present, else from the file name ("dc5") and the paper (8).
    """
    def count(prefix: str) -> int:
        ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return len(ids)

    bottleneck = "backbone.0.body.layer1.0.conv3.weight" in state
    layer3 = count("backbone.0.body.layer3.")
    depth = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}
    if (bottleneck, layer3) not in depth:
        raise CheckpointError(f"{filename}: unrecognised ResNet backbone ({layer3} blocks in layer3)")
    return ModelConfig(
        backbone=depth[(bottleneck, layer3)],
        dilation=bool(getattr(args, "dilation", "dc5" in Path(filename).name.lower())),
        backbone_stages=4 if count("backbone.0.body.layer4.") else 3,
        num_classes=state["class_embed.weight"].shape[0] - 1,
        d_model=state["input_proj.weight"].shape[0],
        nheads=int(getattr(args, "nheads", 8)),
        enc_layers=count("transformer.encoder.layers."),
        dec_layers=count("transformer.decoder.layers."),
        dim_feedforward=state["transformer.encoder.layers.0.linear1.weight"].shape[0]
        if "transformer.encoder.layers.0.linear1.weight" in state
        else state["transformer.decoder.layers.0.linear1.weight"].shape[0],
        num_queries=state["query_embed.weight"].shape[0],
        pre_norm="transformer.encoder.norm.weight" in state,
        position_embedding="learned" if "backbone.1.row_embed.weight" in state else "sine",
    )


def official_to_detrkit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official key names -> ours: the backbone Joiner's ``backbone.0.body`` is our ``backbone.body``,
    its ``backbone.1`` (position encoding) our ``position``; everything else is the same name."""
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        k = re.sub(r"^backbone\.0\.body\.", "backbone.body.", k)
        k = re.sub(r"^backbone\.1\.", "position.", k)
        out[k] = v
    return out


def load_official(path: Path) -> Loaded:
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not an official DETR checkpoint (expected a dict with a 'model' state dict)")
    state = ckpt["model"]
    for needed in ("class_embed.weight", "query_embed.weight", "input_proj.weight"):
        if needed not in state:
            raise CheckpointError(f"{path}: not a DETR checkpoint (no '{needed}')")
    config = official_config(state, ckpt.get("args"), str(path))
    return Loaded(config, official_to_detrkit(state), None, None)


# ---------------------------------------------------------------------------------------------
# Hugging Face DetrForObjectDetection
# ---------------------------------------------------------------------------------------------
# Per-layer renames (Hugging Face name -> ours); q/k/v projections are packed separately.
_HF_ENCODER = {"self_attn.out_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm1",
               "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm2"}
_HF_DECODER = {"self_attn.out_proj": "self_attn.out_proj", "self_attn_layer_norm": "norm1",
               "encoder_attn.out_proj": "multihead_attn.out_proj", "encoder_attn_layer_norm": "norm2",
               "fc1": "linear1", "fc2": "linear2", "final_layer_norm": "norm3"}
_HF_TOP = {"model.input_projection.": "input_proj.", "model.query_position_embeddings.": "query_embed.",
           "model.decoder.layernorm.": "transformer.decoder.norm.", "class_labels_classifier.": "class_embed.",
           "bbox_predictor.": "bbox_embed.", "model.backbone.conv_encoder.model.": "backbone.body.",
           "model.backbone.position_embedding.row_embeddings.": "position.row_embed.",
           "model.backbone.position_embedding.column_embeddings.": "position.col_embed."}


def hf_config(cfg: dict, source: str = "") -> ModelConfig:
    """A Hugging Face ``DetrConfig`` dict -> :class:`ModelConfig`."""
    backbone = cfg.get("backbone") or (cfg.get("backbone_config") or {}).get("backbone")
    if not cfg.get("use_timm_backbone", True) or backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise CheckpointError(f"{source}: only timm ResNet backbones (resnet18/34/50/101) are supported, "
                              f"got {backbone!r} (use_timm_backbone={cfg.get('use_timm_backbone')})")
    if cfg.get("encoder_attention_heads") != cfg.get("decoder_attention_heads", cfg.get("encoder_attention_heads")):
        raise CheckpointError(f"{source}: different encoder and decoder head counts are not supported")
    if cfg.get("encoder_ffn_dim") != cfg.get("decoder_ffn_dim", cfg.get("encoder_ffn_dim")):
        raise CheckpointError(f"{source}: different encoder and decoder FFN sizes are not supported")
    return ModelConfig(
        backbone=backbone,
        dilation=bool(cfg.get("dilation", False)),
        num_classes=len(cfg["id2label"]) if "id2label" in cfg else int(cfg["num_labels"]),
        d_model=cfg["d_model"],
        nheads=cfg["encoder_attention_heads"],
        enc_layers=cfg["encoder_layers"],
        dec_layers=cfg["decoder_layers"],
        dim_feedforward=cfg["encoder_ffn_dim"],
        dropout=cfg.get("dropout", 0.1),
        num_queries=cfg["num_queries"],
        position_embedding="sine" if cfg.get("position_embedding_type", "sine") == "sine" else "learned",
        aux_loss=True,
    )


def hf_to_detrkit(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face key names -> ours, packing separate q/k/v projections into ``in_proj``.

    Accepts both the names Hugging Face writes to disk (``conv_encoder``, ``out_proj``, ``fc1``)
    and the newer in-memory ones (``backbone.model``, ``o_proj``, ``mlp.fc1``).
    """
    norm = {}
    for k, v in state.items():
        k = k.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        k = k.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")
        if not k.endswith("num_batches_tracked"):
            norm[k] = v
    out: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Tensor]] = {}
    for k, v in norm.items():
        m = re.match(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if m:
            part, i, name, kind = m.groups()
            ours_attn = {"self_attn": "self_attn", "encoder_attn": "multihead_attn"}
            qkv = re.match(r"(self_attn|encoder_attn)\.([qkv])_proj$", name)
            prefix = f"transformer.{part}.layers.{i}."
            if qkv:
                key = prefix + f"{ours_attn[qkv.group(1)]}.in_proj_{kind}"
                packed.setdefault(key, {})[qkv.group(2)] = v
                continue
            table = _HF_ENCODER if part == "encoder" else _HF_DECODER
            if name in table:
                out[prefix + f"{table[name]}.{kind}"] = v
                continue
            out["unexpected:" + k] = v
            continue
        for hf, ours in _HF_TOP.items():
            if k.startswith(hf):
                out[ours + k[len(hf):]] = v
                break
        else:
            out["unexpected:" + k] = v
    for key, parts in packed.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"incomplete attention projections for {key}: found {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # rows q, k, v as in_proj
    return out


def load_huggingface(path: Path) -> Loaded:
    """A Hugging Face folder: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, read
    by the reader of its ``model_type``: DETR here, RT-DETR v1/v2 by :func:`load_hf_rtdetr`."""
    cfg = read_json(path / "config.json", CheckpointError, "checkpoint config")
    if cfg.get("model_type") in HF_RTDETR_TYPES:
        return load_hf_rtdetr(path, cfg)
    config = hf_config(cfg, str(path / "config.json"))
    id2label = {int(k): v for k, v in cfg.get("id2label", {}).items()}
    classes = [{"index": i, "id": i, "name": id2label.get(i, str(i))} for i in range(config.num_classes)]
    return Loaded(config, hf_to_detrkit(_hf_weights(path)), classes, None)


def hf_model_config(cfg: dict, source: str = "") -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` dict, by its ``model_type``."""
    return rtdetr_config(cfg, source) if cfg.get("model_type") in HF_RTDETR_TYPES else hf_config(cfg, source)


def _hf_weights(path: Path) -> dict[str, Tensor]:
    """The state dict of a Hugging Face folder (safetensors preferred; a .bin holds tensors only)."""
    if (path / "model.safetensors").exists():
        try:
            return load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({e}); is it truncated?") from None
    if (path / "pytorch_model.bin").exists():
        state = torch_load(path / "pytorch_model.bin")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path / 'pytorch_model.bin'}: not a state dict")
        return state
    raise CheckpointError(f"{path}: a Hugging Face folder needs model.safetensors or pytorch_model.bin")


# ---------------------------------------------------------------------------------------------
# Hugging Face RTDetrForObjectDetection / RTDetrV2ForObjectDetection
# ---------------------------------------------------------------------------------------------
# Key names are accepted in both Hugging Face layouts: the one it writes to disk
# (``model.encoder.encoder.0.layers.0.fc1``, ``self_attn.out_proj``) and the one its modules use in
# memory (``model.encoder.aifi.0.layers.0.mlp.fc1``, ``self_attn.o_proj``). Separate q/k/v projections
# are packed into our ``in_proj_weight`` (rows q, k, v). RT-DETRv2's per-point scale buffer
# (``n_points_scale``) is checked against the point counts and dropped (ours follows from them), and
# its tied copies of the heads at the top level (``class_embed.*``, ``bbox_embed.*``) must equal the
# decoder's. Every key and shape is then checked against the model the config builds (load_model).
#
# Hugging Face options we do not follow: ``anchor_image_size`` (precomputed anchors for one input
# size; ours are computed for every input, equal at that size) and ``eval_size`` (with it set,
# Hugging Face's eval mode leaves AIFI's position embedding out; the release and we always add it).
# Hugging Face -> ours, applied in order to every key (after the in-memory names are mapped to the
# on-disk ones). Backbone: HF's "embedder.embedder" is our stem, "stages.s.layers.b.layer.j" is
# block b of layer{s+1}, conv{j+1}; a shortcut after a pool is "shortcut.1".
_RENAMES = [
    (r"^model\.backbone\.model\.embedder\.embedder\.(\d+)\.", r"backbone.stem.\1."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.",
     lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.(?:1\.)?",
     lambda m: f"backbone.layer{int(m[1]) + 1}.{m[2]}.shortcut."),
    (r"^model\.encoder_input_proj\.(\d+)\.0\.", r"encoder.input_proj.\1.conv."),
    (r"^model\.encoder_input_proj\.(\d+)\.1\.", r"encoder.input_proj.\1.bn."),
    (r"^model\.encoder\.encoder\.(\d+)\.layers\.(\d+)\.", r"encoder.aifi.\1.\2."),
    (r"^model\.encoder\.", "encoder."),
    (r"^model\.decoder_input_proj\.(\d+)\.0\.", r"decoder.input_proj.\1.conv."),
    (r"^model\.decoder_input_proj\.(\d+)\.1\.", r"decoder.input_proj.\1.bn."),
    (r"^model\.enc_output\.0\.", "decoder.enc_output."),
    (r"^model\.enc_output\.1\.", "decoder.enc_output_norm."),
    (r"^model\.enc_score_head\.", "decoder.enc_class."),
    (r"^model\.enc_bbox_head\.", "decoder.enc_bbox."),
    (r"^model\.weight_embedding\.", "decoder.tgt_embed."),
    (r"^model\.decoder\.", "decoder."),
    # Inside modules.
    (r"\.convolution\.", ".conv."), (r"\.normalization\.", ".bn."), (r"\.norm\.(?=[a-z_]+$)", ".bn."),
    (r"\.encoder_attn\.", ".cross_attn."), (r"\.fc1\.", ".linear1."), (r"\.fc2\.", ".linear2."),
    (r"\.self_attn_layer_norm\.", ".norm1."),
]
# The last LayerNorm of a layer: norm2 in AIFI layers, norm3 in decoder layers (after cross-attention's norm2).
_LAYER_NORMS = [(r"^(encoder\.aifi\.\d+\.\d+)\.final_layer_norm\.", r"\1.norm2."),
                (r"^(decoder\.layers\.\d+)\.encoder_attn_layer_norm\.", r"\1.norm2."),
                (r"^(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3.")]
_ON_DISK = [(".o_proj.", ".out_proj."), (".mlp.fc", ".fc"), ("model.encoder.aifi.", "model.encoder.encoder.")]


def rtdetr_config(cfg: dict, source: str = "") -> ModelConfig:
    """A Hugging Face ``RTDetrConfig`` / ``RTDetrV2Config`` dict -> :class:`ModelConfig` (``arch="rtdetr"``).

    Raises :class:`CheckpointError` naming ``source`` for anything our model does not build.
    """
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: {what} is not supported by detrkit's RT-DETR")

    bb = cfg.get("backbone_config") or {}
    if cfg.get("use_timm_backbone") or bb.get("model_type", "rt_detr_resnet") != "rt_detr_resnet":
        raise fail(f"backbone {bb.get('model_type') or cfg.get('backbone')!r} (only RTDetrResNet)")
    layout = (bb.get("layer_type", "bottleneck"), tuple(bb.get("depths", (3, 4, 6, 3))),
              tuple(bb.get("hidden_sizes", (256, 512, 1024, 2048))), bb.get("embedding_size", STEM_WIDTH))
    trunk = resnet_vd_trunk(*layout)
    if trunk is None:
        raise fail(f"ResNet layout (layer_type, depths, hidden_sizes, embedding_size) {layout}")
    checks = {
        "backbone hidden_act": (bb.get("hidden_act", "relu"), "relu"),
        "backbone downsample_in_bottleneck": (bb.get("downsample_in_bottleneck", False), False),
        "backbone downsample_in_first_stage": (bb.get("downsample_in_first_stage", False), False),
        "backbone out_indices": (list(bb.get("out_indices") or [2, 3, 4]), [2, 3, 4]),
        "encoder_in_channels": (list(cfg.get("encoder_in_channels", [512, 1024, 2048])), list(layout[2][1:])),
        "feat_strides": (list(cfg.get("feat_strides", [8, 16, 32])), [8, 16, 32]),
        "num_feature_levels": (cfg.get("num_feature_levels", 3), 3),
        "decoder_n_levels": (cfg.get("decoder_n_levels", 3), 3),
        "decoder_in_channels": (list(cfg.get("decoder_in_channels", [256] * 3)),
                                [cfg.get("encoder_hidden_dim", 256)] * 3),
        "activation_function": (cfg.get("activation_function", "silu"), "silu"),
        "encoder_activation_function": (cfg.get("encoder_activation_function", "gelu"), "gelu"),
        "decoder_activation_function": (cfg.get("decoder_activation_function", "relu"), "relu"),
        "layer_norm_eps": (cfg.get("layer_norm_eps", 1e-5), 1e-5),
        "batch_norm_eps": (cfg.get("batch_norm_eps", 1e-5), 1e-5),
        "with_box_refine": (cfg.get("with_box_refine", True), True),
        "decoder_attention_heads": (cfg.get("decoder_attention_heads", 8), cfg.get("encoder_attention_heads", 8)),
    }
    for key, (got, want) in checks.items():
        if got != want:
            raise fail(f"{key}={got!r} (expected {want!r})")
    try:
        return ModelConfig(
            arch="rtdetr",
            num_classes=len(cfg["id2label"]) if "id2label" in cfg else int(cfg.get("num_labels", 80)),
            **trunk,
            backbone_norm="frozen" if cfg.get("freeze_backbone_batch_norms", True) else "batch",
            encoder_dim=cfg.get("encoder_hidden_dim", 256),
            encoder_ffn_dim=cfg.get("encoder_ffn_dim", 1024),
            enc_layers=cfg.get("encoder_layers", 1),
            encode_levels=tuple(cfg.get("encode_proj_layers", (2,))),
            csp_expansion=float(cfg.get("hidden_expansion", 1.0)),
            pe_temperature=float(cfg.get("positional_encoding_temperature", 10000)),
            pre_norm=bool(cfg.get("normalize_before", False)),
            d_model=cfg.get("d_model", 256),
            nheads=cfg.get("encoder_attention_heads", 8),
            dec_layers=cfg.get("decoder_layers", 6),
            dim_feedforward=cfg.get("decoder_ffn_dim", 1024),
            num_queries=cfg.get("num_queries", 300),
            num_points=(cfg.get("decoder_n_points", 4),) * 3,
            offset_scale=float(cfg.get("decoder_offset_scale", 0.5)),
            sampling_method=cfg.get("decoder_method", "default"),
            learn_initial_query=bool(cfg.get("learn_initial_query", False)),
            dropout=float(cfg.get("dropout", 0.0)),
            aux_loss=True,
            frozen_stages=0,  # Hugging Face freezes no backbone parameter (only, by default, the BatchNorm statistics)
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid RT-DETR config ({e})") from None


def resnet_vd_trunk(kind: str, depths: tuple, widths: tuple, stem: int) -> Optional[dict]:
    """The ModelConfig trunk fields (``backbone``, ``backbone_width``, ``backbone_depths``) of a
    ResNet-vd layout (Hugging Face's, or read from the release's shapes): a published one, or one of
    them narrower or with other depths; None for anything else."""
    named = [(n, d, w) for n, (k, d, w) in RESNET_VD.items() if k == kind]
    named.sort(key=lambda entry: entry[1] != depths)  # the ResNet with these very depths first
    for name, named_depths, named_widths in named:
        width = widths[0] / named_widths[0]
        if [scaled_width(c, width) for c in named_widths] == list(widths) and scaled_width(STEM_WIDTH, width) == stem:
            return {"backbone": name, "backbone_width": width,
                    "backbone_depths": None if depths == named_depths else depths}
    return None


def hf_rtdetr_to_detrkit(state: dict[str, Tensor], config: ModelConfig) -> tuple[dict[str, Tensor], Optional[Tensor]]:
    """Hugging Face RT-DETR keys -> ours. Returns our state dict (keys nothing maps to are kept
    with an ``unexpected:`` prefix, for the key check to name) and the denoising label table."""
    out: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Tensor]] = {}
    tied: dict[str, Tensor] = {}
    label_embed = None
    for key, value in state.items():
        for old, new in _ON_DISK:
            key = key.replace(old, new)
        if key == "model.denoising_class_embed.weight":
            label_embed = value
            continue
        if re.match(r"^(class_embed|bbox_embed)\.\d+\.", key):  # v2's tied top-level copies
            tied["decoder." + key] = value
            continue
        if key.endswith(".encoder_attn.n_points_scale"):
            check_point_scale(key, value, config)
            continue
        for pattern, repl in _RENAMES + _LAYER_NORMS:
            key = re.sub(pattern, repl, key)
        qkv = re.match(r"^(.+\.self_attn)\.([qkv])_proj\.(weight|bias)$", key)
        if qkv:
            packed.setdefault(f"{qkv[1]}.in_proj_{qkv[3]}", {})[qkv[2]] = value
        elif key.startswith(("backbone.", "encoder.", "decoder.")):
            out[key] = value
        else:
            out["unexpected:" + key] = value
    for key, parts in packed.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"incomplete attention projections for {key}: found {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])  # in_proj rows: q, k, v
    for key, value in tied.items():
        if key not in out or out[key].shape != value.shape or not torch.equal(out[key], value):
            raise CheckpointError(f"{key[len('decoder.'):]} differs from model.{key}: Hugging Face ties them")
    return out, label_embed


def check_point_scale(key: str, value: Tensor, config: ModelConfig, source: str = "") -> None:
    """RT-DETRv2's per-point offset scale buffer (``1 / n`` for each of the n points of each level) must
    be the one ``config.num_points`` gives: ours is computed from them, so the buffer is dropped."""
    expected = torch.tensor([1.0 / n for n in config.num_points for _ in range(n)])
    if value.shape != expected.shape or not torch.allclose(value.float(), expected):
        where = f"{source}: " if source else ""
        raise CheckpointError(f"{where}{key}: per-point scales {value.tolist()} do not match the points per level "
                              f"{config.num_points} (1 / the points of each level)")


def load_hf_rtdetr(path: Path, cfg: dict) -> Loaded:
    """A Hugging Face RT-DETR v1/v2 folder whose ``config.json`` is ``cfg`` (see :data:`_RENAMES`).

    Its evaluation size is RT-DETR's (640 x 640, square); its denoising label table
    (``model.denoising_class_embed``, K + 1 rows, the last the padding row, which detrkit's label table
    does not have) comes back in :attr:`Loaded.aids`, for fine-tuning with denoising to start from.
    """
    config = rtdetr_config(cfg, str(path / "config.json"))
    state, label_embed = hf_rtdetr_to_detrkit(_hf_weights(path), config)
    aids = denoising_aids(label_embed, config, f"{path}: model.denoising_class_embed.weight")
    id2label = {int(k): v for k, v in cfg.get("id2label", {}).items()}
    classes = [{"index": i, "id": i, "name": id2label.get(i, str(i))} for i in range(config.num_classes)]
    return Loaded(config, state, classes, {"image_size": 640, "max_size": None, "resize": "square"}, aids)


def denoising_aids(label_embed: Optional[Tensor], config: ModelConfig, what: str) -> Optional[dict[str, Tensor]]:
    """RT-DETR's denoising label table as :attr:`Loaded.aids` (None: the checkpoint has none). It has
    K + 1 rows, the last the padding row, which detrkit's label table does not have; ``what`` names
    the tensor (file and key) in the error when its shape is not ``(K + 1, d_model)``."""
    if label_embed is None:
        return None
    if tuple(label_embed.shape) != (config.num_classes + 1, config.d_model):
        raise CheckpointError(f"{what} {tuple(label_embed.shape)} != {(config.num_classes + 1, config.d_model)}")
    return {"denoising.label_embed.weight": label_embed[:config.num_classes]}


# COCO 2017 category ids -> names (the ids official DETR checkpoints predict; gaps are "N/A").
COCO_NAMES = dict(enumerate([
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]))
