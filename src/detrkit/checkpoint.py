"""Saving and loading weights: detrkit's own format, official DETR and Hugging Face DETR.

detrkit format: a folder with ``model.safetensors`` (the weights; the JSON config is also
kept in its metadata) and ``config.json``::

    {"format": "detrkit", "format_version": 1,
     "model": {...ModelConfig...},
     "classes": [{"index": 0, "id": 3, "name": "circle"}, ...]}

A folder is written as one unit (:func:`checkpoint_folder`: beside it, then two renames), so a
process killed during a save leaves the previous checkpoint whole, training state included.

``load_model`` also reads an official DETR checkpoint (``.pth``: a dict whose ``model`` entry
is the state dict, as published for R50/R101/DC5) and a Hugging Face ``DetrForObjectDetection``
folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``). Every key and shape
is checked; nothing is ever unpickled beyond tensors (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from detrkit.config import ModelConfig, config_from_dict
from detrkit.errors import CheckpointError
from detrkit.model.build import build_model
from detrkit.model.detr import DETR

FORMAT_VERSION = 1
PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------
# Class mapping: index -> dataset category id and name.
# ---------------------------------------------------------------------------------------------
def default_classes(num_classes: int) -> list[dict]:
    """Index i is category id i. For 91 classes these are COCO's ids and names (official checkpoints)."""
    names = COCO_NAMES if num_classes == 91 else {}
    return [{"index": i, "id": i, "name": names.get(i, "N/A" if names else str(i))} for i in range(num_classes)]


def set_classes(model: DETR, classes: Optional[list[dict]]) -> None:
    """Attach the class mapping (``[{"index", "id", "name"}]`` in index order) to a model."""
    classes = classes if classes is not None else default_classes(model.num_classes)
    if len(classes) != model.num_classes:
        raise CheckpointError(f"class mapping has {len(classes)} entries but the model has {model.num_classes} classes")
    model.classes = [{"index": i, "id": int(c["id"]), "name": str(c["name"])} for i, c in enumerate(classes)]


# ---------------------------------------------------------------------------------------------
# detrkit format
# ---------------------------------------------------------------------------------------------
def save_model(model: DETR, path: PathLike, *, classes: Optional[list[dict]] = None,
               inference: Optional[dict] = None) -> Path:
    """Save weights, model config and class mapping into the folder ``path``.

    ``inference`` records how images are sized for this model (``image_size``, ``max_size``);
    ``predict`` uses it.

    The folder is replaced as a whole (see :func:`checkpoint_folder`), so a process killed
    mid-save leaves the previous checkpoint complete. It must hold a checkpoint and nothing
    else: an existing folder that is not a detrkit checkpoint is refused, not replaced.
    """
    with checkpoint_folder(path) as tmp:
        write_model_files(model, tmp, classes=classes, inference=inference)
    return Path(path)


def write_model_files(model: DETR, folder: Path, *, classes: Optional[list[dict]] = None,
                      inference: Optional[dict] = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``folder`` (an existing folder; not
    atomic by itself: use it inside :func:`checkpoint_folder`, as :func:`save_model` does)."""
    if classes is not None:
        set_classes(model, classes)
    meta = {
        "format": "detrkit",
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.config),
        "classes": getattr(model, "classes", None) or default_classes(model.num_classes),
        "inference": inference or model.inference,
    }
    text = json.dumps(meta, indent=2)
    # safetensors refuses shared or non-contiguous storage: give it plain copies.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"detrkit": text})
    _test_pause("between-files")
    (folder / "config.json").write_text(text + "\n")


# ---------------------------------------------------------------------------------------------
# Atomic writes: a file, and a checkpoint folder as one unit
# ---------------------------------------------------------------------------------------------
def atomic_write(dest: Path, write) -> None:
    """Write one file through ``write(tmp_path)`` to a temporary name, fsync it, rename it to ``dest``."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _siblings(path: Path) -> tuple[Path, Path]:
    """The two hidden folders beside checkpoint folder ``path`` that a save uses: new and old."""
    return path.parent / f".{path.name}.new", path.parent / f".{path.name}.old"


@contextmanager
def checkpoint_folder(path: PathLike) -> Iterator[Path]:
    """Write a checkpoint folder as one unit.

    Yields an empty temporary folder beside ``path`` (``.NAME.new``) to write every file into.
    When the block ends without an error, the files are fsync'd and the folder takes the place
    of ``path`` by two renames: ``path`` -> ``.NAME.old``, ``.NAME.new`` -> ``path``; then the
    old one is deleted. A process killed at any moment therefore leaves either the previous
    folder at ``path``, complete, or (killed between the two renames) no ``path`` and the
    previous folder complete in ``.NAME.old``: readers use it (:func:`readable_folder`) and the
    next save moves it back first. The new folder is never trusted until it has been renamed.
    (Renaming one folder over another in a single step has no portable call.)
    """
    path = Path(path)
    new, old = _siblings(path)
    _recover(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not _is_detrkit_folder(path))):
        raise CheckpointError(f"{path}: exists and is not a detrkit checkpoint folder; refusing to replace it "
                              f"(choose a new folder)")
    new.mkdir(parents=True)
    try:
        yield new
        for f in new.iterdir():
            _fsync(f)
        _fsync(new)
        if path.exists():
            os.replace(path, old)
            _test_pause("between-renames")
        os.replace(new, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # gone after the rename; a partial folder after an error
    shutil.rmtree(old, ignore_errors=True)


def readable_folder(path: PathLike) -> Path:
    """The folder to read checkpoint ``path`` from: ``path`` itself, or the complete previous
    checkpoint in ``.NAME.old`` when a save was killed between its two renames. Reading never
    renames anything (a save may be running in another process)."""
    path = Path(path)
    old = _siblings(path)[1]
    return old if not path.exists() and old.is_dir() else path


def _recover(path: Path) -> None:
    """Undo what a killed save left beside ``path``: the previous folder goes back in place,
    a partial new one is deleted."""
    new, old = _siblings(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _is_detrkit_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("format") == "detrkit"
    except (OSError, ValueError, AttributeError):
        return False


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; folders cannot be opened on Windows: skipped there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause(point: str) -> None:
    """Fault injection for tests: with the environment variable ``DETRKIT_TEST_SAVE_PAUSE`` set
    to ``point`` (``between-files`` or ``between-renames``), a save announces
    ``paused at POINT`` on stderr and sleeps there for a minute, so a test can kill the process at
    that exact moment. Unset (always, outside tests) it does nothing."""
    if os.environ.get("DETRKIT_TEST_SAVE_PAUSE") == point:
        print(f"paused at {point}", file=sys.stderr, flush=True)
        time.sleep(60)


def _load_detrkit(path: Path) -> tuple[ModelConfig, dict[str, Tensor], list[dict]]:
    weights = path / "model.safetensors" if path.is_dir() else path
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e}); is it truncated?") from None
    cfg_file = weights.parent / "config.json"
    if cfg_file.exists():
        meta = _read_json(cfg_file)
    else:  # the weights file alone carries the same config in its metadata
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            text = (f.metadata() or {}).get("detrkit")
        if text is None:
            raise CheckpointError(f"{weights}: no config.json beside it and no detrkit metadata inside")
        meta = json.loads(text)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: format version {meta['format_version']} is newer than this detrkit "
                              f"reads ({FORMAT_VERSION}); upgrade detrkit")
    try:
        config = config_from_dict(ModelConfig, meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: invalid model config ({e})") from None
    return config, state, meta.get("classes"), meta.get("inference")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Official DETR (facebookresearch/detr) checkpoints
# ---------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> object:
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


def _load_official(path: Path) -> tuple[ModelConfig, dict[str, Tensor], list[dict]]:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not an official DETR checkpoint (expected a dict with a 'model' state dict)")
    state = ckpt["model"]
    for needed in ("class_embed.weight", "query_embed.weight", "input_proj.weight"):
        if needed not in state:
            raise CheckpointError(f"{path}: not a DETR checkpoint (no '{needed}')")
    config = official_config(state, ckpt.get("args"), str(path))
    return config, official_to_detrkit(state), None, None


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


def _load_hf(path: Path) -> tuple[ModelConfig, dict[str, Tensor], list[dict]]:
    cfg = _read_json(path / "config.json")
    config = hf_config(cfg, str(path / "config.json"))
    if (path / "model.safetensors").exists():
        try:
            state = load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({e}); is it truncated?") from None
    elif (path / "pytorch_model.bin").exists():
        state = _torch_load(path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{path}: a Hugging Face folder needs model.safetensors or pytorch_model.bin")
    id2label = {int(k): v for k, v in cfg.get("id2label", {}).items()}
    classes = [{"index": i, "id": i, "name": id2label.get(i, str(i))} for i in range(config.num_classes)]
    return config, hf_to_detrkit(state), classes, None


# ---------------------------------------------------------------------------------------------
# The one entry point
# ---------------------------------------------------------------------------------------------
def detect_format(path: PathLike) -> str:
    """``"detrkit"``, ``"huggingface"`` or ``"official"``, from the files alone."""
    path = readable_folder(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{path}: a checkpoint folder needs a config.json")
        cfg = _read_json(cfg_file)
        if cfg.get("format") == "detrkit":
            return "detrkit"
        if cfg.get("model_type") == "detr":
            return "huggingface"
        raise CheckpointError(f"{cfg_file}: neither a detrkit nor a Hugging Face DETR config")
    if path.suffix == ".safetensors":
        return "detrkit"
    return "official"


def load_state(path: PathLike) -> tuple[ModelConfig, dict[str, Tensor], Optional[list[dict]]]:
    """Read any supported checkpoint: its config, its state dict in our names, its class mapping."""
    return _load_any(path)[:3]


def _load_any(path: PathLike):
    path = readable_folder(path)
    fmt = detect_format(path)
    loader = {"detrkit": _load_detrkit, "huggingface": _load_hf, "official": _load_official}[fmt]
    return loader(path)


def check_and_load(model: DETR, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` after checking every key and shape; errors name them all."""
    own = model.state_dict()
    unexpected = sorted(k.removeprefix("unexpected:") for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                   for k in own if k in state and state[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        lines = [f"{source}: weights do not fit the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state)


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu", precision: str = "fp32") -> DETR:
    """Load a detrkit, official DETR or Hugging Face DETR checkpoint, ready for inference.

    Returns the model in eval mode on ``device`` with its class mapping in ``model.classes``.
    Inference is exact (the outputs of the plain modules to float32 rounding) and faster than
    the plain modules: BatchNorm folded into the backbone's convolutions, channels-last
    activations (:mod:`detrkit.model.backbone`). ``precision="bf16"`` runs the network under
    bfloat16 autocast with the folded convolution weights kept in bfloat16; outputs, and so
    postprocessing and matching, stay float32. It is faster only where bfloat16 matrix products
    are faster than float32 ones (GPUs; CPUs with AMX), see docs/benchmarks.md.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    config, state, classes, inference = _load_any(path)
    model = build_model(config)
    check_and_load(model, state, str(path))
    set_classes(model, classes)
    if inference:
        model.inference = dict(inference)
    model.precision = precision
    return model.to(device).eval()


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
