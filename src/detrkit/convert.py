"""Foreign checkpoint layouts -> detrkit: official DETR (facebookresearch/detr) and Hugging Face DETR.

Each reader returns a :class:`Loaded`: the :class:`~detrkit.config.ModelConfig` the weights need,
the state dict in our parameter names, and the class mapping when the source has one. Every
key and shape is checked later, when the state is loaded into the model
(:func:`detrkit.checkpoint.check_and_load`); nothing is unpickled beyond tensors.

* Official DETR: a ``.pth`` file, a dict whose ``model`` entry is the state dict (as published
  for R50/R101/DC5); two prefixes differ from ours.
* Hugging Face ``DetrForObjectDetection``: a folder with ``config.json`` (``model_type`` one of
  :data:`HF_MODEL_TYPES`) and ``model.safetensors`` or ``pytorch_model.bin``.
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

from detrkit.config import ModelConfig
from detrkit.errors import CheckpointError
from detrkit.files import read_json

# The Hugging Face config.json ``model_type`` values load_huggingface reads.
HF_MODEL_TYPES = ("detr",)


class Loaded(NamedTuple):
    """What a checkpoint reader returns."""

    config: ModelConfig
    state: dict[str, Tensor]  # in detrkit's parameter names
    classes: Optional[list[dict]]  # [{"index", "id", "name"}] in index order; None: index = id
    inference: Optional[dict]  # {"image_size", "max_size"} the model was trained with; None: unknown


# ---------------------------------------------------------------------------------------------
# Official DETR (facebookresearch/detr) checkpoints
# ---------------------------------------------------------------------------------------------
def torch_load(path: Path) -> object:
    """``torch.load`` that refuses anything but tensors and plain containers.

    ``argparse.Namespace`` is allowed too: official training checkpoints store their
    command-line arguments in one, and rebuilding it runs no code.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
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
    """A Hugging Face ``DetrForObjectDetection`` folder: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``."""
    cfg = read_json(path / "config.json", CheckpointError, "checkpoint config")
    config = hf_config(cfg, str(path / "config.json"))
    if (path / "model.safetensors").exists():
        try:
            state = load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({e}); is it truncated?") from None
    elif (path / "pytorch_model.bin").exists():
        state = torch_load(path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: a Hugging Face folder needs model.safetensors or pytorch_model.bin")
    id2label = {int(k): v for k, v in cfg.get("id2label", {}).items()}
    classes = [{"index": i, "id": i, "name": id2label.get(i, str(i))} for i in range(config.num_classes)]
    return Loaded(config, hf_to_detrkit(state), classes, None)



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
