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
checkpoints (:mod:`detrkit.convert`) reproduces their outputs. The sizes are :class:`~detrkit.config.ModelConfig`
fields; the published models are the ``rtdetr_*`` presets (:mod:`detrkit.presets`).

**Input.** Like every detrkit model, RT-DETR takes images normalised with the ImageNet mean and
std (the data pipeline, ``predict``, evaluation, ONNX export and the server prepare them so).
Its weights, though, were trained on pixels in [0, 1]: the release and Hugging Face's image
processor only rescale (``do_normalize=False``). So the model's first step maps its input back,
``x * std + mean``, and sets the padding to 0, the value Hugging Face pads with. One input contract
for all models, and nothing outside the model needs to know.

**Padding.** RT-DETR has no padding mask anywhere: it sees the padded canvas as it is (anchors,
positions and sampling all span the canvas), exactly like the reference, which trains and
evaluates on fixed 640x640 inputs. What the mask changes is only the frame of the boxes: they
are predicted relative to the canvas, and returned relative to each image's own (unpadded) size,
as every detrkit model returns them. The canvas is padded to a multiple of 32 (the coarsest
stride), since the top-down fusion needs each map to be exactly twice the next coarser one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.config import ModelConfig
from detrkit.data.batch import pad_images
from detrkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detrkit.model.backbone import ResNetVd
from detrkit.model.heads import ExtraQueries, Images, in_precision, layer_outputs
from detrkit.model.hybrid_encoder import HybridEncoder
from detrkit.model.rtdetr_decoder import RTDETRDecoder
from detrkit.predict import Predicts


class RTDETR(nn.Module, Predicts):
    """The RT-DETR detector (see the module docstring).

    Train/eval contract as :class:`~detrkit.model.detr.DETR`: the model maps images to raw
    predictions and never matches or computes losses. BatchNorm layers of the hybrid encoder and
    the input projections learn (batch statistics in train mode, folded into their convolutions
    in eval mode); the backbone's are frozen unless built with ``backbone_norm="batch"``.
    """

    sigmoid_class = True
    shared_heads = False  # a class head and a box head per decoder layer
    # Parameters that depend on the classes (re-initialised when fine-tuning on other classes).
    class_heads = ("decoder.class_embed.", "decoder.enc_class.")

    def __init__(self, backbone: ResNetVd, encoder: HybridEncoder, decoder: RTDETRDecoder, num_classes: int,
                 aux_loss: bool = True, feature_levels: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.encoder = encoder
        self.decoder = decoder
        self.num_classes = num_classes
        self.d_model = decoder.d_model
        self.num_queries = decoder.num_queries
        self.aux_loss = aux_loss
        self.feature_levels = feature_levels  # the coarsest N backbone maps are used
        self.stride = backbone.strides[-1]  # the canvas is padded to a multiple of this
        self.precision = "fp32"  # "bf16": run under bfloat16 autocast (fast inference mode)
        # RT-DETR evaluates at 640 x 640 (the release; Hugging Face's image processor).
        self.inference = {"image_size": 640, "max_size": None, "resize": "square"}
        self.classes = [{"index": i, "id": i, "name": str(i)} for i in range(num_classes)]
        # The input's normalisation, undone (see the module docstring); not saved: constants.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

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
        return in_precision(self.precision, x.device.type, lambda: self._forward(x, mask, extra))

    def _forward(self, x: Tensor, mask: Optional[Tensor], extra: Optional[ExtraQueries]) -> dict:
        """The network on a normalised canvas ``x (B, 3, H, W)`` (H, W multiples of the stride)."""
        x = x * self.pixel_std + self.pixel_mean  # back to [0, 1], what the weights expect
        scale = None
        if mask is not None:
            x = x.masked_fill(mask[:, None], 0.0)  # padding 0, as Hugging Face pads
            scale = _image_frame(mask)  # (B, 1, 4): canvas -> image coordinates
        if extra is not None and scale is not None and extra.boxes is not None:
            extra = ExtraQueries(extra.content, extra.attn_mask, extra.position, extra.boxes / scale, extra.hybrid)
        features = self.backbone(x)[-self.feature_levels:]  # strides 8, 16, 32 (or 16, 32)
        out = self.decoder(self.encoder(features), extra)
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
        # While tracing (ONNX export), a padded input is always padded, by amounts the graph
        # computes from its size: one export serves every size, multiple of 32 or not.
        if (mask is not None and torch.jit.is_tracing()) or pad_h or pad_w:
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


def build_rtdetr(config: ModelConfig, *, train_backbone: bool = True) -> RTDETR:
    """The RT-DETR of ``config`` (``arch="rtdetr"``) with fresh weights: RT-DETR's initialisation, no
    backbone weights (start from a Hugging Face RT-DETR folder for pretrained ones). ``train_backbone=False``
    freezes the whole backbone."""
    backbone = ResNetVd(config.backbone, norm=config.backbone_norm, frozen_stages=config.frozen_stages,
                        train=train_backbone, width=config.backbone_width, depths=config.backbone_depths)
    in_channels = backbone.num_channels[-config.feature_levels:]
    encoder = HybridEncoder(
        in_channels, hidden_dim=config.encoder_dim, nheads=config.nheads, dim_feedforward=config.encoder_ffn_dim,
        enc_layers=config.enc_layers, encode_levels=config.encode_levels, dropout=config.dropout,
        pre_norm=config.pre_norm, expansion=config.csp_expansion, csp_blocks=config.csp_blocks,
        pe_temperature=config.pe_temperature,
    )
    decoder = RTDETRDecoder(
        [config.encoder_dim] * len(in_channels), config.num_classes, d_model=config.d_model, nheads=config.nheads,
        dec_layers=config.dec_layers, dim_feedforward=config.dim_feedforward, dropout=config.dropout,
        num_queries=config.num_queries, num_points=config.num_points, offset_scale=config.offset_scale,
        method=config.sampling_method, learn_initial_query=config.learn_initial_query,
    )
    return RTDETR(backbone, encoder, decoder, config.num_classes, config.aux_loss, config.feature_levels)
