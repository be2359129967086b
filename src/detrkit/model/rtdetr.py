"""RT-DETR v1/v2 (Zhao et al. 2024; Lv et al. 2024): the multi-scale real-time DETR.

The paper's DETR runs a transformer encoder over one stride-32 map and decodes N learned
queries with global cross-attention. RT-DETR keeps DETR's contract (a set of predictions,
matched one-to-one, no NMS) and changes three things to detect small objects in real time:

1. **Multi-scale features, cheaply fused**: a ResNet-vd gives maps at strides 8, 16 and 32; the
   hybrid encoder (:mod:`detrkit.model.hybrid_encoder`) runs attention on stride 32 only and
   fuses the scales with convolutions.
2. **Queries chosen from the encoder** (IoU-aware query selection): every cell of every level
   proposes a box; the best Q start the decoder, content and box (:mod:`detrkit.model.rtdetr_decoder`).
3. **Deformable cross-attention** (:mod:`detrkit.model.deformable`): each query samples a few
   points per level around its box, refined layer by layer.

Classification is a sigmoid per class (``pred_logits`` has no "no object" column).

The numbers and formulas are Hugging Face transformers' ``RTDetrForObjectDetection`` and
``RTDetrV2ForObjectDetection`` (themselves converted from the RT-DETR release); loading their
checkpoints (:mod:`detrkit.convert_rtdetr`) reproduces their outputs.

**Padding.** RT-DETR has no padding mask anywhere: it sees the padded canvas as it is (anchors,
positions and sampling all span the canvas), exactly like the reference, which trains and
evaluates on fixed 640x640 inputs. What the mask changes is only the frame of the boxes: they
are predicted relative to the canvas, and returned relative to each image's own (unpadded) size,
as every detrkit model returns them. The canvas is padded to a multiple of 32 (the coarsest
stride), since the top-down fusion needs each map to be exactly twice the next coarser one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.data.batch import pad_images
from detrkit.model.backbone import RESNET_VD, ResNetVd
from detrkit.model.detr import Images, _to_float
from detrkit.model.heads import ExtraQueries, layer_outputs
from detrkit.model.hybrid_encoder import HybridEncoder
from detrkit.model.rtdetr_decoder import RTDETRDecoder


@dataclass(frozen=True)
class RTDETRSizes:
    """Every size of an RT-DETR model. The defaults are Hugging Face's ``RTDetrConfig()``, which is
    the published ``PekingU/rtdetr_r50vd`` (see :data:`CHECKPOINTS` for the others); a comment on
    each field names the Hugging Face config key it comes from."""

    num_classes: int = 80  # num_labels: the 80 COCO categories of every published checkpoint
    # Backbone.
    backbone: str = "resnet50vd"  # backbone_config (layer_type, depths, hidden_sizes): a ResNet-vd of RESNET_VD
    backbone_norm: str = "frozen"  # freeze_backbone_batch_norms=True: "frozen"; False: "batch" (trained BN)
    # Hybrid encoder.
    encoder_dim: int = 256  # encoder_hidden_dim (= every decoder_in_channels): width of the fused maps
    encoder_ffn_dim: int = 1024  # encoder_ffn_dim: AIFI's feed-forward width
    enc_layers: int = 1  # encoder_layers: AIFI layers on each encoded level
    encode_levels: tuple[int, ...] = (2,)  # encode_proj_layers: AIFI on level 2 (stride 32) only
    expansion: float = 1.0  # hidden_expansion: CSP branch width / encoder_dim
    csp_blocks: int = 3  # RepVGG blocks per CSP fusion (fixed at 3 in Hugging Face; release: round(3 * depth_mult))
    pe_temperature: float = 10000.0  # positional_encoding_temperature of AIFI's sin-cos embedding
    pre_norm: bool = False  # normalize_before (AIFI only: the decoder is always post-norm)
    # Decoder.
    d_model: int = 256  # d_model
    nheads: int = 8  # encoder_attention_heads = decoder_attention_heads
    dec_layers: int = 6  # decoder_layers
    dim_feedforward: int = 1024  # decoder_ffn_dim
    num_queries: int = 300  # num_queries: the cells chosen from the encoder
    num_points: tuple[int, ...] = (4, 4, 4)  # decoder_n_points (per level in RT-DETRv2's release)
    offset_scale: float = 0.5  # v2 decoder_offset_scale: offsets in units of this x box size (v1: 0.5)
    sampling_method: str = "default"  # v2 decoder_method: "default" (bilinear) or "discrete"
    learn_initial_query: bool = False  # learn_initial_query: learned initial content
    dropout: float = 0.0  # dropout = attention_dropout = activation_dropout in every published config
    aux_loss: bool = True  # auxiliary_loss: every decoder layer's predictions are returned

    def __post_init__(self) -> None:
        if self.backbone not in RESNET_VD:
            raise ValueError(f"unknown RT-DETR backbone {self.backbone!r}; choose one of {sorted(RESNET_VD)}")
        if self.backbone_norm not in ("frozen", "batch"):
            raise ValueError(f"backbone_norm must be 'frozen' or 'batch', got {self.backbone_norm!r}")
        if len(self.num_points) != 3 or min(self.num_points) < 1:
            raise ValueError(f"num_points needs one count >= 1 for each of the 3 levels, got {self.num_points}")
        if not set(self.encode_levels) <= {0, 1, 2}:
            raise ValueError(f"encode_levels must be among the levels 0, 1, 2, got {self.encode_levels}")
        if self.d_model % self.nheads or self.encoder_dim % self.nheads:
            raise ValueError(f"d_model ({self.d_model}) and encoder_dim ({self.encoder_dim}) must be "
                             f"divisible by nheads ({self.nheads})")
        if self.encoder_dim % 4:
            raise ValueError(f"encoder_dim must be divisible by 4 (2-D sin-cos embedding), got {self.encoder_dim}")
        if self.sampling_method not in ("default", "discrete"):
            raise ValueError(f"sampling_method must be 'default' or 'discrete', got {self.sampling_method!r}")


# The published checkpoints (Hugging Face PekingU/rtdetr_r{18,34,50,101}vd, converted from the
# RT-DETR release; COCO, 640x640). What differs from the defaults:
#
#   checkpoint   backbone     expansion  encoder_dim  encoder_ffn_dim  dec_layers
#   r18vd        resnet18vd   0.5        256          1024             3
#   r34vd        resnet34vd   0.5        256          1024             4
#   r50vd        resnet50vd   1.0        256          1024             6
#   r101vd       resnet101vd  1.0        384          2048             6
#
# RT-DETRv2 (PekingU/rtdetr_v2_r{18,34,50,101}vd) has the same sizes; it differs in the decoder's
# cross-attention only, through three options whose defaults give v1's arithmetic: num_points per
# level (its release also trains (1, 1, 1), (2, 2, 2), (3, 3, 3)), offset_scale (0.5) and
# sampling_method ("discrete" in its "dsp" fine-tuning recipes). Hugging Face's v2 stores the
# per-point scale 1 / num_points as a buffer (n_points_scale) and allows one count for all levels.
CHECKPOINTS = {
    "rtdetr_r18": RTDETRSizes(backbone="resnet18vd", expansion=0.5, dec_layers=3),
    "rtdetr_r34": RTDETRSizes(backbone="resnet34vd", expansion=0.5, dec_layers=4),
    "rtdetr_r50": RTDETRSizes(backbone="resnet50vd"),
    "rtdetr_r101": RTDETRSizes(backbone="resnet101vd", encoder_dim=384, encoder_ffn_dim=2048),
}


class RTDETR(nn.Module):
    """The RT-DETR detector (see the module docstring).

    Train/eval contract as :class:`~detrkit.model.detr.DETR`: the model maps images to raw
    predictions and never matches or computes losses. BatchNorm layers of the hybrid encoder and
    the input projections learn (batch statistics in train mode, folded into their convolutions
    in eval mode); the backbone's are frozen unless built with ``backbone_norm="batch"``.
    """

    sigmoid_class = True

    def __init__(self, backbone: ResNetVd, encoder: HybridEncoder, decoder: RTDETRDecoder, num_classes: int,
                 aux_loss: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.d_model = decoder.d_model
        self.num_queries = decoder.num_queries
        self.aux_loss = aux_loss
        self.stride = backbone.strides[-1]  # the canvas is padded to a multiple of this
        self.precision = "fp32"  # "bf16": run under bfloat16 autocast (fast inference mode)
        self.inference = {"image_size": 640, "max_size": None}  # RT-DETR evaluates at 640 x 640
        self.classes = [{"index": i, "id": i, "name": str(i)} for i in range(num_classes)]

    def forward(self, images: Images, extra: Optional[ExtraQueries] = None) -> dict:
        """Detect objects.

        Args:
            images: a list of ``3 x H_i x W_i`` float tensors normalised with the ImageNet
                mean/std (sizes may differ), a batch ``(B, 3, H, W)``, or a padded batch
                ``(images (B, 3, H, W), mask (B, H, W) bool, True = padding)`` with each image
                at the top-left corner.
            extra: training-only queries after the model's own (denoising: ``content``,
                ``boxes`` cxcywh in [0, 1] of each image, ``attn_mask``; hybrid queries). Their
                predictions come back under ``extra_outputs`` (and ``hybrid_outputs``); the
                mask keeps the model's own queries from seeing them, so the other outputs are
                those of the plain model.

        Returns:
            dict with
            ``pred_logits (B, Q, num_classes)``: sigmoid class logits of the last decoder layer;
            ``pred_boxes (B, Q, 4)``: ``(cx, cy, w, h)`` relative to each image's own unpadded
            size (in [0, 1] inside the image);
            ``aux_outputs``: (when ``aux_loss``) ``{"pred_logits", "pred_boxes"}`` of each decoder
            layer before the last;
            ``enc_outputs``: ``{"pred_logits" (B, Q, K), "pred_boxes" (B, Q, 4)}``, the encoder's
            proposals for the Q cells chosen as queries, best score first, before any decoder
            layer: the tokens Hugging Face's and RT-DETR's losses train as the encoder term.
        """
        x, mask = self._batch(images)
        if self.precision != "bf16":
            # No autocast context of our own: it would switch off a caller's (bf16/fp16 training).
            return self._forward(x, mask, extra)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = self._forward(x, mask, extra)
        return _to_float(out)  # losses, matching and postprocessing always see float32

    def _forward(self, x: Tensor, mask: Optional[Tensor], extra: Optional[ExtraQueries]) -> dict:
        """The network on a canvas ``x (B, 3, H, W)`` (H, W multiples of the stride)."""
        scale = None if mask is None else _image_frame(mask)  # (B, 1, 4): canvas -> image coordinates
        if extra is not None and scale is not None and extra.boxes is not None:
            extra = ExtraQueries(extra.content, extra.attn_mask, extra.position, extra.boxes / scale, extra.hybrid)
        out = self.decoder(self.encoder(self.backbone(x)), extra)
        logits, boxes = out["logits"], out["boxes"]  # (L, B, N, .)
        enc_boxes = out["enc_boxes"]
        if scale is not None:
            boxes, enc_boxes = boxes * scale, enc_boxes * scale
        q, m = out["num_queries"], out["num_hybrid"]
        result = layer_outputs(logits[:, :, :q], boxes[:, :, :q], self.aux_loss)
        result["enc_outputs"] = {"pred_logits": out["enc_logits"], "pred_boxes": enc_boxes}
        if extra is not None:
            if m:
                result["hybrid_outputs"] = layer_outputs(logits[:, :, q:q + m], boxes[:, :, q:q + m], self.aux_loss)
            result["extra_outputs"] = layer_outputs(logits[:, :, q + m:], boxes[:, :, q + m:], self.aux_loss)
        return result

    def _batch(self, images: Images) -> tuple[Tensor, Optional[Tensor]]:
        """The input as a canvas ``(B, 3, H, W)`` padded to multiples of the stride, and its padding
        mask (None when the input is a batch tensor that needed no padding)."""
        if isinstance(images, tuple) and len(images) == 2 and isinstance(images[0], Tensor) \
                and images[0].dim() == 4:
            x, mask = images
            if mask.dtype != torch.bool or mask.shape != (x.shape[0],) + x.shape[2:]:
                raise ValueError(f"padding mask must be bool (B, H, W) = {(x.shape[0],) + tuple(x.shape[2:])}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
        elif isinstance(images, Tensor):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"expected a list of 3 x H x W images or a (B, 3, H, W) batch, "
                                 f"got {tuple(images.shape)}")
            x, mask = images, None
        else:
            x, mask = pad_images(list(images))
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.stride, -w % self.stride
        if pad_h or pad_w:
            if mask is None:
                mask = torch.zeros((x.shape[0], h, w), dtype=torch.bool, device=x.device)
            x = F.pad(x, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=True)
        return x, mask


def _image_frame(mask: Tensor) -> Tensor:
    """``(B, 1, 4)`` factors that turn canvas-relative ``(cx, cy, w, h)`` into image-relative ones
    (images at the top-left corner): ``W / w_i`` for x and width, ``H / h_i`` for y and height."""
    h, w = mask.shape[1:]
    rows = (~mask[:, :, 0]).sum(1).clamp(min=1).float()  # (B,) image heights in pixels
    cols = (~mask[:, 0, :]).sum(1).clamp(min=1).float()
    sx, sy = w / cols, h / rows
    return torch.stack([sx, sy, sx, sy], -1)[:, None]


def build_rtdetr(sizes: RTDETRSizes) -> RTDETR:
    """The RT-DETR of ``sizes`` with fresh weights (RT-DETR's initialisation, no backbone weights)."""
    backbone = ResNetVd(sizes.backbone, norm=sizes.backbone_norm)
    encoder = HybridEncoder(
        backbone.num_channels, hidden_dim=sizes.encoder_dim, nheads=sizes.nheads,
        dim_feedforward=sizes.encoder_ffn_dim, enc_layers=sizes.enc_layers, encode_levels=sizes.encode_levels,
        dropout=sizes.dropout, pre_norm=sizes.pre_norm, expansion=sizes.expansion, csp_blocks=sizes.csp_blocks,
        pe_temperature=sizes.pe_temperature,
    )
    decoder = RTDETRDecoder(
        [sizes.encoder_dim] * len(backbone.num_channels), sizes.num_classes, d_model=sizes.d_model,
        nheads=sizes.nheads, dec_layers=sizes.dec_layers, dim_feedforward=sizes.dim_feedforward,
        dropout=sizes.dropout, num_queries=sizes.num_queries, num_points=sizes.num_points,
        offset_scale=sizes.offset_scale, method=sizes.sampling_method,
        learn_initial_query=sizes.learn_initial_query,
    )
    model = RTDETR(backbone, encoder, decoder, sizes.num_classes, sizes.aux_loss)
    model.sizes = sizes
    return model
