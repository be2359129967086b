"""Hugging Face RT-DETR checkpoints (``RTDetrForObjectDetection``, ``RTDetrV2ForObjectDetection``)
-> detrkit's :class:`~detrkit.model.rtdetr.RTDETR`.

A Hugging Face folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).
:func:`read_hf_rtdetr` turns it into :class:`RTDETRSizes`, our state dict and the class names,
checking every key and shape against the model those sizes build: a file that does not fit
fails with the missing, unexpected and wrong-shape keys named.

Key names are accepted in both Hugging Face layouts: the one it writes to disk
(``model.encoder.encoder.0.layers.0.fc1``, ``self_attn.out_proj``) and the one its modules use
in memory (``model.encoder.aifi.0.layers.0.mlp.fc1``, ``self_attn.o_proj``). Separate q/k/v
projections are packed into our ``in_proj_weight`` (rows q, k, v). RT-DETRv2's per-point scale
buffer (``n_points_scale``) is checked against the point counts and dropped (ours follows from
them), and its tied copies of the heads at the top level (``class_embed.*``, ``bbox_embed.*``)
must equal the decoder's.

The denoising label embedding (``model.denoising_class_embed``, K + 1 rows, the last one the
padding row) is not part of our model: it is returned beside it, in :class:`HFRTDETR.denoising`,
with the denoising settings of the config, for the training-only denoising aid to start from.

Hugging Face options we do not follow: ``anchor_image_size`` (precomputed anchors for one input
size; ours are computed for every input, equal at that size) and ``eval_size`` (with it set,
Hugging Face's eval mode leaves AIFI's position embedding out; the release and we always add it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from detrkit.convert import torch_load
from detrkit.errors import CheckpointError
from detrkit.files import read_json
from detrkit.model.backbone import RESNET_VD, STEM_WIDTH
from detrkit.model.rtdetr import RTDETR, RTDETRSizes, build_rtdetr


@dataclass
class HFRTDETR:
    """What a Hugging Face RT-DETR folder holds, in our terms.

    ``sizes``: the constructor values; ``state``: our state dict; ``classes``: one
    ``{"index", "id", "name"}`` per class (``id2label``); ``denoising``: ``label_embed``
    ``(K + 1, D)`` (row K = padding, Hugging Face's ``denoising_class_embed``) or None when the
    checkpoint has none, ``num_denoising`` (total denoising queries per batch),
    ``label_noise_ratio``, ``box_noise_scale``.
    """

    sizes: RTDETRSizes
    state: dict[str, Tensor]
    classes: list[dict]
    denoising: dict = field(default_factory=dict)


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


def rtdetr_sizes(cfg: dict, source: str = "") -> RTDETRSizes:
    """A Hugging Face ``RTDetrConfig`` / ``RTDetrV2Config`` dict -> :class:`RTDETRSizes`.

    Raises :class:`CheckpointError` naming ``source`` for anything our model does not build.
    """
    def fail(what: str) -> CheckpointError:
        return CheckpointError(f"{source}: {what} is not supported by detrkit's RT-DETR")

    bb = cfg.get("backbone_config") or {}
    if cfg.get("use_timm_backbone") or bb.get("model_type", "rt_detr_resnet") != "rt_detr_resnet":
        raise fail(f"backbone {bb.get('model_type') or cfg.get('backbone')!r} (only RTDetrResNet)")
    layout = (bb.get("layer_type", "bottleneck"), tuple(bb.get("depths", (3, 4, 6, 3))),
              tuple(bb.get("hidden_sizes", (256, 512, 1024, 2048))))
    names = [n for n, v in RESNET_VD.items() if v == layout]
    if not names or bb.get("embedding_size", STEM_WIDTH) != STEM_WIDTH:
        raise fail(f"ResNet layout {layout} with stem {bb.get('embedding_size', STEM_WIDTH)}")
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
        return RTDETRSizes(
            num_classes=len(cfg["id2label"]) if "id2label" in cfg else int(cfg.get("num_labels", 80)),
            backbone=names[0],
            backbone_norm="frozen" if cfg.get("freeze_backbone_batch_norms", True) else "batch",
            encoder_dim=cfg.get("encoder_hidden_dim", 256),
            encoder_ffn_dim=cfg.get("encoder_ffn_dim", 1024),
            enc_layers=cfg.get("encoder_layers", 1),
            encode_levels=tuple(cfg.get("encode_proj_layers", (2,))),
            expansion=float(cfg.get("hidden_expansion", 1.0)),
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
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid RT-DETR config ({e})") from None


def hf_rtdetr_to_detrkit(state: dict[str, Tensor], sizes: RTDETRSizes) -> tuple[dict[str, Tensor], Optional[Tensor]]:
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
            _check_point_scale(key, value, sizes)
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


def _check_point_scale(key: str, value: Tensor, sizes: RTDETRSizes) -> None:
    expected = torch.tensor([1.0 / n for n in sizes.num_points for _ in range(n)])
    if value.shape != expected.shape or not torch.allclose(value.float(), expected):
        raise CheckpointError(f"{key}: per-point scales {value.tolist()} do not match decoder_n_points "
                              f"{sizes.num_points} (1 / points of each level)")


def read_hf_rtdetr(path: Union[str, Path]) -> HFRTDETR:
    """Read a Hugging Face RT-DETR v1/v2 folder and check every key and shape (see the module docstring)."""
    path = Path(path)
    cfg = read_json(path / "config.json", CheckpointError, "checkpoint config")
    if cfg.get("model_type") not in ("rt_detr", "rt_detr_v2"):
        raise CheckpointError(f"{path / 'config.json'}: model_type {cfg.get('model_type')!r} "
                              f"is not rt_detr or rt_detr_v2")
    sizes = rtdetr_sizes(cfg, str(path / "config.json"))
    state = _read_weights(path)
    ours, label_embed = hf_rtdetr_to_detrkit(state, sizes)
    with torch.device("meta"):  # only the names and shapes are needed: nothing is allocated
        expected = build_rtdetr(sizes).state_dict()
    check_keys(ours, expected, str(path))
    id2label = {int(k): v for k, v in cfg.get("id2label", {}).items()}
    classes = [{"index": i, "id": i, "name": id2label.get(i, str(i))} for i in range(sizes.num_classes)]
    if label_embed is not None and tuple(label_embed.shape) != (sizes.num_classes + 1, sizes.d_model):
        raise CheckpointError(f"{path}: model.denoising_class_embed.weight {tuple(label_embed.shape)} != "
                              f"{(sizes.num_classes + 1, sizes.d_model)}")
    denoising = {"label_embed": label_embed, "num_denoising": cfg.get("num_denoising", 100),
                 "label_noise_ratio": cfg.get("label_noise_ratio", 0.5),
                 "box_noise_scale": cfg.get("box_noise_scale", 1.0)}
    return HFRTDETR(sizes, ours, classes, denoising)


def load_hf_rtdetr(path: Union[str, Path]) -> tuple[RTDETR, HFRTDETR]:
    """The model of a Hugging Face RT-DETR folder with its weights, in eval mode, and what was read."""
    read = read_hf_rtdetr(path)
    model = build_rtdetr(read.sizes)
    model.load_state_dict(read.state)
    model.classes = read.classes
    return model.eval(), read


def check_keys(state: dict[str, Tensor], expected: dict[str, Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected and wrong-shape key of ``state``
    against ``expected`` (a state dict; only its names and shapes are read)."""
    unexpected = sorted(k.removeprefix("unexpected:") for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state)
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
                   for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if unexpected or missing or wrong:
        lines = [f"{source}: weights do not fit the RT-DETR its config.json describes"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        raise CheckpointError("\n".join(lines))


def _read_weights(path: Path) -> dict[str, Tensor]:
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
