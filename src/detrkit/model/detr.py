"""DETR: backbone -> 1x1 projection -> transformer -> shared class and box heads.

The names of the parts are the paper's and the official code's (``input_proj``,
``query_embed``, ``class_embed``, ``bbox_embed``, ``pred_logits``, ``pred_boxes``,
``aux_outputs``), and so is the parameter layout: an official checkpoint maps onto it by
renaming two prefixes (see :mod:`detrkit.convert`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from detrkit.data.batch import pad_images
from detrkit.model.backbone import Backbone
from detrkit.model.heads import MLP, ExtraQueries, Images, in_precision, layer_outputs
from detrkit.model.transformer import Transformer
from detrkit.predict import Predicts


class DETR(nn.Module, Predicts):
    """The DETR detector.

    ``sigmoid_class`` tells how class scores are read: False (DETR) = softmax over
    ``num_classes + 1`` logits, the last "no object"; True (two-stage) = sigmoid per class.

    Train/eval contract: the model itself never matches or computes losses (see
    :class:`detrkit.HungarianMatcher` and :class:`detrkit.SetCriterion`); in train and eval
    mode alike it maps images to raw predictions. Inference uses ``pred_logits`` and
    ``pred_boxes`` (the last decoder layer) only, with no NMS.
    """

    sigmoid_class = False
    shared_heads = True  # one class head and one box head for every decoder layer (official)
    class_heads = ("class_embed.",)  # parameters that depend on the classes (fine-tuning re-initialises them)

    def __init__(self, backbone: Backbone, position: nn.Module, transformer: Transformer,
                 num_classes: int, num_queries: int, aux_loss: bool = True) -> None:
        super().__init__()
        d = transformer.d_model
        self.backbone = backbone
        self.position = position
        self.transformer = transformer
        self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)  # the last class is "no object"
        self.bbox_embed = MLP(d, d, 4, 3)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.d_model = d  # the width of the queries (training-only aids read it)
        self.aux_loss = aux_loss
        self.precision = "fp32"  # "bf16": run under bfloat16 autocast (fast inference mode)
        # How predict() sizes images (official 800/1333; data.transforms.inference_transforms).
        self.inference = {"image_size": 800, "max_size": None, "resize": "shorter"}
        self.classes = [{"index": i, "id": i, "name": str(i)} for i in range(num_classes)]

    def forward(self, images: Images, extra: Optional[ExtraQueries] = None) -> dict:
        """Detect objects.

        Args:
            images: a list of ``3 x H_i x W_i`` float tensors normalised with the ImageNet
                mean/std (sizes may differ), or a padded batch ``(images (B, 3, H, W),
                mask (B, H, W) bool, True = padding)``.
            extra: training-only queries appended after the model's own (query groups,
                denoising; :mod:`detrkit.aids`). Their predictions come back under
                ``extra_outputs`` (the same keys); the attention mask keeps the model's own
                queries from seeing them, so the other outputs are those of the plain model.

        Returns:
            dict with
            ``pred_logits (B, Q, num_classes + 1)``: class logits, the last is "no object";
            ``pred_boxes (B, Q, 4)``: ``(cx, cy, w, h)`` in [0, 1] relative to each image's own
            unpadded size;
            ``aux_outputs``: (when ``aux_loss``) a list of ``{"pred_logits", "pred_boxes"}``,
            one per decoder layer before the last.
        """
        x, mask = self._batch(images)
        return in_precision(self.precision, x.device.type, lambda: self._forward(x, mask, extra))

    def _forward(self, x: Tensor, mask: Tensor, extra: Optional[ExtraQueries] = None) -> dict:
        """The network on a padded batch ``x (B, 3, H, W)``, ``mask (B, H, W)``."""
        features, mask = self.backbone(x, mask)  # (B, C, h, w), (B, h, w)
        pos = self.position(mask)  # (B, D, h, w)
        q = self.num_queries
        query_pos, tgt, attn_mask = self.query_embed.weight, None, None  # (Q, D); the slots start at zero
        if extra is not None:  # training-only queries after the model's own, with their own content
            query_pos = torch.cat([query_pos.expand(x.shape[0], -1, -1), extra.position], 1)  # (B, Q + E, D)
            tgt = torch.cat([torch.zeros_like(query_pos[:, :q]), extra.content], 1)  # (B, Q + E, D)
            attn_mask = extra.attn_mask
        hs, _ = self.transformer(self.input_proj(features), mask, query_pos, pos, attn_mask, tgt)  # (L, B, Q(+E), D)
        out = self.heads(hs[:, :, :q])  # the model's own queries
        if extra is not None:
            out["extra_outputs"] = self.heads(hs[:, :, q:])
        return out

    def heads(self, hs: Tensor) -> dict:
        """The shared heads on every decoder layer's output ``hs (L, B, Q, D)``."""
        logits = self.class_embed(hs)  # (L, B, Q, K+1)
        boxes = self.bbox_embed(hs).sigmoid()  # (L, B, Q, 4)
        return layer_outputs(logits, boxes, self.aux_loss)

    @staticmethod
    def _batch(images: Images) -> tuple[Tensor, Tensor]:
        if isinstance(images, tuple) and len(images) == 2 and isinstance(images[0], Tensor) \
                and images[0].dim() == 4:
            x, mask = images
            if mask.dtype != torch.bool or mask.shape != (x.shape[0],) + x.shape[2:]:
                raise ValueError(
                    f"padding mask must be bool (B, H, W) = {(x.shape[0],) + tuple(x.shape[2:])}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            return x, mask
        if isinstance(images, Tensor):
            if images.dim() == 4:  # an unpadded batch of same-size images
                return images, images.new_zeros((images.shape[0],) + images.shape[2:], dtype=torch.bool)
            raise ValueError(f"expected a list of 3 x H x W images or a (B, 3, H, W) batch, got {tuple(images.shape)}")
        return pad_images(list(images))

