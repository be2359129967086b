"""RT-DETR's decoder side: per-level projections, IoU-aware query selection, the decoder layers.

1. Each encoder map is projected to ``d_model`` channels (1x1 convolution + BatchNorm) and the
   maps are flattened into one sequence of S cells (the *memory*).
2. **Query selection.** Every cell is a candidate object: a class score and a box predicted
   relative to a fixed anchor (the cell's centre, size 0.05 * 2^level of the canvas). The Q cells
   with the best class score become the queries: their (projected) features the initial content,
   their boxes the initial references. RT-DETR trains those scores with the varifocal loss,
   whose target is the IoU of the box, so a high score means a well-localised box ("IoU-aware").
3. **Decoder layers** (post-norm): self-attention among the queries, deformable cross-attention
   around each reference box, FFN. The query position is an MLP of the current reference box.
   After each layer a per-layer box head predicts a correction in logit space; the refined box
   is that layer's prediction and, detached, the next layer's reference (Deformable DETR's
   iterative refinement, with Hugging Face's detach rule: no gradient flows from a layer's box
   back through the previous layers' boxes).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.model.backbone import ConvNorm
from detrkit.model.deformable import MSDeformableAttention
from detrkit.model.dropout import Dropout
from detrkit.model.heads import MLP, ExtraQueries, fit_extra_mask
from detrkit.model.transformer import MultiheadAttention

ANCHOR_SIZE = 0.05  # anchor width/height at stride 8, doubling per level (RT-DETR's grid_size)
ANCHOR_MARGIN = 0.01  # anchors with any coordinate outside (0.01, 0.99) are invalid (RT-DETR's eps)
PRIOR_PROB = 0.01  # initial foreground probability of the class heads (RT-DETR's bias_init_with_prob(0.01))


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with numerator and denominator kept >= eps (Hugging Face's arithmetic,
    so a box coordinate of exactly 0 or 1 maps to +-log(1e5))."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def anchors_for(shapes: Sequence[tuple[int, int]], device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Anchor boxes of every cell, in logit space: ``(1, S, 4)`` in ``dtype``, and ``valid (1, S, 1)``.

    A cell's anchor is ``(cx, cy, w, h) = ((j + 0.5) / W, (i + 0.5) / H, s, s)`` with
    ``s = ANCHOR_SIZE * 2^level``. Anchors too close to the border (any coordinate outside
    (ANCHOR_MARGIN, 1 - ANCHOR_MARGIN)) are invalid; their logits are the largest finite number,
    so whatever is added to them, their boxes are 1.
    """
    anchors = []
    for level, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype),
                                torch.arange(w, device=device, dtype=dtype), indexing="ij")
        centres = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2)  # (hw, 2)
        sizes = torch.full_like(centres, ANCHOR_SIZE * 2.0 ** level)
        anchors.append(torch.cat([centres, sizes], -1))
    anchors = torch.cat(anchors)[None]  # (1, S, 4)
    valid = ((anchors > ANCHOR_MARGIN) & (anchors < 1 - ANCHOR_MARGIN)).all(-1, keepdim=True)  # (1, S, 1)
    logits = torch.log(anchors / (1 - anchors))
    return logits.masked_fill(~valid, torch.finfo(dtype).max), valid


class DecoderLayer(nn.Module):
    """Self-attention -> deformable cross-attention -> FFN, each followed by residual + LayerNorm."""

    def __init__(self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, num_levels: int,
                 num_points: Sequence[int], offset_scale: float, method: str) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nheads, dropout)
        self.cross_attn = MSDeformableAttention(d_model, nheads, num_levels, num_points, offset_scale, method)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)  # inside the FFN
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        nn.init.xavier_uniform_(self.linear1.weight)  # RT-DETR's initialisation of the FFN
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, tgt: Tensor, query_pos: Tensor, boxes: Tensor, memory: Tensor,
                shapes: Sequence[tuple[int, int]], attn_mask: Optional[Tensor] = None) -> Tensor:
        """``tgt``, ``query_pos (B, N, D)``, ``boxes (B, N, 4)``, ``memory (B, S, D)`` -> ``(B, N, D)``.

        ``attn_mask (N, N)`` bool, True = the row query may not attend to the column query.
        """
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=attn_mask)))
        tgt = self.norm2(tgt + self.dropout2(self.cross_attn(tgt + query_pos, boxes, memory, shapes)))
        return self.norm3(tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class RTDETRDecoder(nn.Module):
    """Encoder maps -> query selection -> decoder layers -> per-layer class logits and boxes.

    Parameter names: ``input_proj`` (per level), ``enc_output`` + ``enc_output_norm``,
    ``enc_class``, ``enc_bbox`` (the proposal heads, named as in detrkit's two-stage model),
    ``query_pos_head``, ``layers``, and per layer ``class_embed`` / ``bbox_embed``.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, d_model: int = 256, nheads: int = 8,
                 dec_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.0, num_queries: int = 300,
                 num_points: Sequence[int] = (4, 4, 4), offset_scale: float = 0.5, method: str = "default",
                 learn_initial_query: bool = False) -> None:
        super().__init__()
        levels = len(in_channels)
        self.d_model = d_model
        self.num_queries = num_queries
        self.input_proj = nn.ModuleList(ConvNorm(c, d_model, 1) for c in in_channels)
        self.enc_output = nn.Linear(d_model, d_model)
        self.enc_output_norm = nn.LayerNorm(d_model)
        self.enc_class = nn.Linear(d_model, num_classes)
        self.enc_bbox = MLP(d_model, d_model, 4, 3)
        # RT-DETR's option: a learned initial content instead of the selected cells' features.
        self.tgt_embed = nn.Embedding(num_queries, d_model) if learn_initial_query else None
        self.query_pos_head = MLP(4, 2 * d_model, d_model, 2)  # reference box -> query position
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nheads, dim_feedforward, dropout, levels, num_points, offset_scale, method)
            for _ in range(dec_layers)
        )
        self.class_embed = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(dec_layers))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(dec_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """RT-DETR's initialisation: class heads at prior PRIOR_PROB, box heads predicting no
        correction (the anchor / reference itself), Xavier-uniform elsewhere."""
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for head in [self.enc_class, *self.class_embed]:
            nn.init.constant_(head.bias, bias)
        for mlp in [self.enc_bbox, *self.bbox_embed]:
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output.weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj.conv.weight)
        if self.tgt_embed is not None:
            nn.init.xavier_uniform_(self.tgt_embed.weight)

    def forward(self, maps: Sequence[Tensor], extra: Optional[ExtraQueries] = None) -> dict:
        """Decode the encoder maps.

        Args:
            maps: ``[(B, C_l, H_l, W_l)]``, finest first (the hybrid encoder's output).
            extra: training-only queries placed after the model's own: ``extra.content (B, E, D)``,
                ``extra.boxes (B, E, 4)`` cxcywh in [0, 1] of the canvas, ``extra.attn_mask``
                ``(Q+E, Q+E)``; ``extra.hybrid`` more encoder-selected queries (see
                :class:`~detrkit.model.heads.ExtraQueries`).

        Returns:
            ``logits (L, B, N, K)``, ``boxes (L, B, N, 4)`` (cxcywh in [0, 1] of the canvas) for the
            N = Q + M + E queries of every layer, ``enc_logits (B, Q, K)`` and ``enc_boxes (B, Q, 4)``
            (the selected cells' proposals), ``num_queries`` (Q) and ``num_hybrid`` (M).
        """
        memory, shapes = self._flatten(maps)  # (B, S, D)
        s = memory.shape[1]
        q = min(self.num_queries, s)
        m = 0 if extra is None else min(extra.hybrid, s - q)
        if m and self.tgt_embed is not None:
            raise ValueError("hybrid queries need contents chosen from the encoder, not learn_initial_query")
        tgt, ref, enc_logits, enc_boxes = self.select(memory, shapes, q + m)
        attn_mask = None
        if extra is not None:  # the training-only queries follow the Q (+ M) selected ones
            tgt = torch.cat([tgt, extra.content.to(tgt.dtype)], 1)  # (B, N, D)
            # Round trip through logits, as the reference computes its denoising boxes.
            ref = torch.cat([ref, inverse_sigmoid(extra.boxes.to(ref.dtype))], 1)  # (B, N, 4)
            attn_mask = fit_extra_mask(extra.attn_mask, self.num_queries, q, m)
        logits, boxes = self.decode(tgt, ref, memory, shapes, attn_mask)
        return {"logits": logits, "boxes": boxes, "enc_logits": enc_logits[:, :q], "enc_boxes": enc_boxes[:, :q],
                "num_queries": q, "num_hybrid": m}

    def _flatten(self, maps: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Project each map and concatenate them: ``(B, S, D)``, S = sum of h * w, row-major per level."""
        flat, shapes = [], []
        for proj, x in zip(self.input_proj, maps):
            x = proj(x)  # (B, D, h, w)
            shapes.append((x.shape[2], x.shape[3]))
            flat.append(x.flatten(2).transpose(1, 2))  # (B, hw, D)
        return torch.cat(flat, 1), shapes

    def select(self, memory: Tensor, shapes: Sequence[tuple[int, int]], k: int) -> tuple[Tensor, ...]:
        """Score every cell and keep the best ``k``.

        Returns ``content (B, k, D)`` (detached), ``reference (B, k, 4)`` box logits (detached),
        and the selected cells' ``logits (B, k, K)`` and boxes ``(B, k, 4)`` in [0, 1] (not
        detached: the encoder-proposal loss trains the heads and the encoder through them).
        """
        # float32 (float64 for a float64 model), also under bfloat16 autocast
        anchors, valid = anchors_for(shapes, memory.device, torch.promote_types(memory.dtype, torch.float32))
        # Invalid cells keep no features (their scores are then all alike, and their boxes 1).
        feats = self.enc_output_norm(self.enc_output(memory * valid.to(memory.dtype)))  # (B, S, D)
        logits = self.enc_class(feats)  # (B, S, K)
        top = logits.max(-1).values.topk(k, dim=1).indices  # (B, k), best first
        top_feats = feats.gather(1, top[..., None].expand(-1, -1, feats.shape[-1]))  # (B, k, D)
        top_logits = logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1]))
        # Boxes of the chosen cells only: the reference computes them for all S cells and keeps
        # k; the box head is row-wise, so the k rows are the same, at a fraction of the cost.
        top_anchors = anchors.expand(memory.shape[0], -1, -1).gather(1, top[..., None].expand(-1, -1, 4))
        top_coords = self.enc_bbox(top_feats) + top_anchors  # (B, k, 4) box logits
        if self.tgt_embed is not None:
            content = self.tgt_embed.weight[None, :k].expand(memory.shape[0], -1, -1)
        else:
            content = top_feats.detach()
        return content, top_coords.detach(), top_logits, top_coords.sigmoid()

    def decode(self, tgt: Tensor, ref_logits: Tensor, memory: Tensor, shapes: Sequence[tuple[int, int]],
               attn_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """The decoder layers with iterative box refinement -> ``logits (L, B, N, K)``, ``boxes (L, B, N, 4)``."""
        ref = ref_logits.sigmoid()  # (B, N, 4), no gradient: the selection's boxes are detached
        logits, boxes = [], []
        for layer, cls_head, box_head in zip(self.layers, self.class_embed, self.bbox_embed):
            tgt = layer(tgt, self.query_pos_head(ref), ref, memory, shapes, attn_mask)
            new_ref = (box_head(tgt) + inverse_sigmoid(ref)).sigmoid()
            logits.append(cls_head(tgt))
            boxes.append(new_ref)
            ref = new_ref.detach()  # the next layer refines this box, without a gradient path back
        return torch.stack(logits), torch.stack(boxes)
