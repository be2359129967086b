"""Two-stage DETR: queries chosen from the encoder, boxes refined layer by layer.

Plain DETR starts every image from the same N learned queries, and global cross-attention
must learn from scratch where to look: on small data and small compute it barely learns
(see docs/benchmarks.md). This variant keeps DETR's contract (a set of predictions, matched
one-to-one, no NMS, no hand-made anchor boxes) and changes where the queries come from:

1. Encoder proposals (two-stage Deformable DETR, RT-DETR): every encoder token gets a class
   score and a box, relative to its own grid cell; the top-N tokens by score become the
   decoder's queries, their features the initial content and their boxes the references.
   The proposals are trained with the same set loss (keys with suffix ``_enc``).
2. Box references refined layer by layer (Deformable DETR's iterative refinement, DAB-DETR):
   each decoder layer predicts a correction of its reference box in inverse-sigmoid space, and
   the query's positional embedding is a sine encoding of the current box, so cross-attention
   knows where the object is. With ``conditional_attention`` the box centre's encoding is a
   separate spatial part of each cross-attention head's query (Conditional DETR) instead of
   being added to the content.
3. Sigmoid classification (trained with focal loss): ``pred_logits`` has ``num_classes``
   columns and no "no object" column; a class score is ``sigmoid(logit)``.

In training, :class:`detrkit.aids.AidedModel` may ask for more encoder tokens than the model's
own queries (``ExtraQueries.hybrid``, H-DETR's one-to-many branch); they are decoded beside the
model's queries behind an attention mask, so the model's outputs do not change.

The backbone, positional encoding and encoder/decoder layers are the plain DETR's; Conditional
DETR's cross-attention is built here from the same blocks (:class:`ConditionalDecoderLayer`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from detrkit.model.backbone import Backbone
from detrkit.model.detr import DETR
from detrkit.model.heads import MLP, ExtraQueries, fit_extra_mask, layer_outputs
from detrkit.model.position import box_sine_embedding
from detrkit.model.transformer import DecoderLayer, MultiheadAttention, Transformer

PRIOR_PROB = 0.01  # initial foreground probability of the sigmoid class heads (focal-loss practice)
ANCHOR_SIZE = 0.05  # initial proposal width/height relative to the image (two-stage Deformable DETR)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=eps, max=1 - eps)
    return torch.log(x / (1 - x))


class TwoStageDETR(DETR):
    """DETR with encoder-selected queries and iterative box refinement (see the module docstring).

    ``forward`` takes the same inputs as :class:`DETR` and returns the same keys, with
    ``pred_logits (B, Q, num_classes)`` sigmoid logits and, in addition, ``enc_outputs``:
    ``{"pred_logits" (B, HW, K), "pred_boxes" (B, HW, 4)}``, the encoder proposals.
    """

    sigmoid_class = True
    shared_heads = False  # a class head and a box head per decoder layer (Deformable DETR's refinement)
    class_heads = ("class_embed.", "enc_class.")  # the encoder proposals are scored per class too

    def __init__(self, backbone: Backbone, position: nn.Module, transformer: Transformer,
                 num_classes: int, num_queries: int, aux_loss: bool = True) -> None:
        super().__init__(backbone, position, transformer, num_classes, num_queries, aux_loss)
        d = transformer.d_model
        num_layers = len(transformer.decoder.layers)
        del self.query_embed  # queries come from the encoder
        self.class_embed = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(num_layers))
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_class = nn.Linear(d, num_classes)
        self.enc_bbox = MLP(d, d, 4, 3)
        self.ref_point_head = MLP(4 * (d // 2), d, d, 2)  # box sine embedding -> query position
        self.conditional = isinstance(transformer.decoder.layers[0], ConditionalDecoderLayer)
        if self.conditional:
            self.query_scale = MLP(d, d, d, 2)  # content -> channel scales of the spatial query (Conditional DETR)
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for head in [*self.class_embed, self.enc_class]:
            nn.init.constant_(head.bias, bias)
        for mlp in [*self.bbox_embed, self.enc_bbox]:
            # Start from the reference box itself: a zero correction.
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)

    def proposals(self, memory: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """One class score and box per encoder token.

        ``memory (B, HW, D)``, ``mask (B, H, W)`` -> ``logits (B, HW, K)`` (padding tokens at -1e4)
        and ``boxes (B, HW, 4)``, each relative to a grid-cell anchor of the image's own size.
        """
        b, h, w = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).clamp(min=1).float()  # (B,) rows inside each image
        valid_w = (~mask[:, 0, :]).sum(1).clamp(min=1).float()
        ys, xs = torch.meshgrid(torch.arange(h, device=mask.device, dtype=torch.float32),
                                torch.arange(w, device=mask.device, dtype=torch.float32), indexing="ij")
        cx = (xs.reshape(1, -1) + 0.5) / valid_w[:, None]  # (B, HW)
        cy = (ys.reshape(1, -1) + 0.5) / valid_h[:, None]
        size = torch.full_like(cx, ANCHOR_SIZE)
        anchors = torch.stack([cx, cy, size, size], dim=-1)  # (B, HW, 4)
        invalid = mask.flatten(1) | (cx >= 1) | (cy >= 1)  # (B, HW)
        feats = self.enc_output_norm(self.enc_output(memory.masked_fill(invalid[..., None], 0.0)))
        # A large finite negative, not -inf: focal loss on -inf logits would compute 0 * inf = NaN.
        logits = self.enc_class(feats).masked_fill(invalid[..., None], -1e4)
        boxes = (self.enc_bbox(feats) + inverse_sigmoid(anchors)).sigmoid()
        return logits, boxes, feats

    def _forward(self, x: Tensor, mask: Tensor, extra: Optional[ExtraQueries] = None) -> dict:
        features, mask = self.backbone(x, mask)  # (B, C, h, w), (B, h, w)
        memory, pos, flat_mask = self.transformer.encode(self.input_proj(features), mask, self.position(mask))
        enc_logits, enc_boxes, enc_feats = self.proposals(memory, mask)  # (B, hw, K), (B, hw, 4), (B, hw, D)

        # The top-Q tokens by best class score become the queries (content and reference box);
        # in training, the next M tokens may follow as H-DETR's one-to-many branch.
        k = min(self.num_queries, enc_logits.shape[1])
        m = 0 if extra is None else min(extra.hybrid, enc_logits.shape[1] - k)
        top = enc_logits.max(-1).values.topk(k + m, dim=1).indices  # (B, Q + M), best first
        tgt = torch.gather(enc_feats, 1, top[..., None].expand(-1, -1, enc_feats.shape[-1])).detach()
        ref = torch.gather(enc_boxes, 1, top[..., None].expand(-1, -1, 4)).detach()  # (B, Q + M, 4)
        attn_mask = None
        if extra is not None:  # training-only queries (denoising) after the Q (+ M) chosen ones
            tgt = torch.cat([tgt, extra.content.to(tgt.dtype)], 1)  # (B, Q + M + E, D)
            ref = torch.cat([ref, extra.boxes.to(ref.dtype)], 1)  # (B, Q + M + E, 4)
            attn_mask = fit_extra_mask(extra.attn_mask, self.num_queries, k, m)

        logits, boxes = self._decode(tgt, ref, memory, pos, flat_mask, attn_mask)  # per layer (B, Q + M + E, .)
        out = layer_outputs([a[:, :k] for a in logits], [b[:, :k] for b in boxes], self.aux_loss)
        out["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": enc_boxes}
        if extra is not None:
            if m:
                out["hybrid_outputs"] = layer_outputs([a[:, k:k + m] for a in logits],
                                                      [b[:, k:k + m] for b in boxes], self.aux_loss)
            out["extra_outputs"] = layer_outputs([a[:, k + m:] for a in logits], [b[:, k + m:] for b in boxes],
                                                 self.aux_loss)
        return out

    def _decode(self, tgt: Tensor, ref: Tensor, memory: Tensor, pos: Tensor, mask: Tensor,
                attn_mask: Optional[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The decoder layers with box refinement: ``tgt (B, Q, D)`` content, ``ref (B, Q, 4)``
        reference boxes; ``memory``, ``pos (B, HW, D)``, ``mask (B, HW)`` -> every layer's class
        logits ``(B, Q, K)`` and refined boxes ``(B, Q, 4)``."""
        d = self.transformer.d_model
        decoder = self.transformer.decoder
        logits, boxes = [], []
        for i, (layer, cls_head, box_head) in enumerate(zip(decoder.layers, self.class_embed, self.bbox_embed)):
            sine = box_sine_embedding(ref, d).to(tgt.dtype)  # (B, Q, 2D): (cy, cx, w, h)
            query_pos = self.ref_point_head(sine)  # (B, Q, D)
            if self.conditional:
                # The centre's encoding, in the image encoding's (y, x) layout, scaled channel by
                # channel by what the query holds (lambda_q of Conditional DETR; 1 in the first layer).
                spatial = sine[..., :d] if i == 0 else sine[..., :d] * self.query_scale(tgt)
                tgt = layer(tgt, memory, pos.to(tgt.dtype), query_pos, mask, attn_mask, spatial, first=i == 0)
            else:
                tgt = layer(tgt, memory, pos.to(tgt.dtype), query_pos, mask, attn_mask)
            hs = decoder.norm(tgt)
            new_boxes = (box_head(hs) + inverse_sigmoid(ref)).sigmoid()  # refine the reference
            logits.append(cls_head(hs))
            boxes.append(new_boxes)
            ref = new_boxes.detach()  # each layer learns its own correction (Deformable DETR)
        return logits, boxes


class ConditionalAttention(MultiheadAttention):
    """Conditional DETR's cross-attention (Meng et al. 2021), with :class:`MultiheadAttention`'s parameters.

    Each head's query and key are its content part *concatenated* with a spatial part,
    ``(D/h) -> (2D/h)``, so the score is a content match plus a separate position match,
    ``q_c.k_c + q_s.k_s``, scaled by ``1/sqrt(2D/h)``; the values stay content only.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                query_spatial: Tensor, key_spatial: Tensor) -> Tensor:
        """``query (B, Lq, D)``, ``key``/``value (B, Lk, D)``, and the already projected
        ``query_spatial (B, Lq, D)``, ``key_spatial (B, Lk, D)`` -> ``(B, Lq, D)``."""
        q, k, v = self.project(query, key, value)  # (B, h, L, D/h)
        b, h, lq, dh = q.shape
        qs = query_spatial.view(b, lq, h, dh).transpose(1, 2)  # (B, h, Lq, D/h)
        ks = key_spatial.view(b, k.shape[2], h, dh).transpose(1, 2)  # (B, h, Lk, D/h)
        return self.attend(torch.cat([q, qs], -1), torch.cat([k, ks], -1), v, key_padding_mask)  # (B, h, L, 2D/h)


class ConditionalDecoderLayer(DecoderLayer):
    """The paper's decoder layer with Conditional DETR's cross-attention (:class:`ConditionalAttention`).

    It takes ``spatial_query (B, Q, D)``, the sine encoding of each query's reference point
    (scaled by its content), projected by ``ca_qsine_proj``; the image positions, projected by
    ``ca_kpos_proj``, are the spatial keys. As in Conditional DETR, the positions are also added
    to the content query and keys in the ``first`` layer only.
    """

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, pre_norm: bool) -> None:
        super().__init__(d_model, nheads, dim_feedforward, dropout, pre_norm)
        self.multihead_attn = ConditionalAttention(d_model, nheads, dropout)
        self.ca_qsine_proj = nn.Linear(d_model, d_model)  # projections of the spatial query and key
        self.ca_kpos_proj = nn.Linear(d_model, d_model)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_key_padding_mask: Optional[Tensor], self_attn_mask: Optional[Tensor] = None,
                spatial_query: Optional[Tensor] = None, first: bool = False) -> Tensor:
        """As :meth:`DecoderLayer.forward`, with ``spatial_query (B, Q, D)`` (see the class docstring)."""
        def cross_attention(x: Tensor) -> Tensor:
            content_q, content_k = (x + query_pos, memory + pos) if first else (x, memory)
            return self.multihead_attn(content_q, content_k, memory, memory_key_padding_mask,
                                       self.ca_qsine_proj(spatial_query), self.ca_kpos_proj(pos))

        tgt = self.self_attention(tgt, query_pos, self_attn_mask)
        tgt = self.residual(tgt, cross_attention, self.norm2, self.dropout2)
        return self.residual(tgt, self.feed_forward, self.norm3, self.dropout3)

