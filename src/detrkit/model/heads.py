"""What the detectors share around the transformer: the input type, the MLP head, training-only
extra queries (and the attention block of hybrid ones), the per-layer output dict (``pred_logits``,
``pred_boxes``, ``aux_outputs``) and its float32 copy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# What a detector takes: a list of 3 x H x W images, or a padded batch (images (B, 3, H, W), mask (B, H, W)).
Images = Union[Sequence[Tensor], tuple[Tensor, Tensor]]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (the box head: 3 layers)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


@dataclass
class ExtraQueries:
    """Training-only decoder queries, appended after the model's own Q (see :mod:`detrkit.aids`).

    ``content (B, E, D)``: the initial decoder content; ``position (B, E, D)``: the query
    positional embedding (plain DETR); ``boxes (B, E, 4)``: reference boxes, cxcywh in [0, 1]
    (two-stage models, whose query position comes from the box); ``attn_mask (Q+E, Q+E)``
    bool, True = the row query may not attend to the column query.

    ``hybrid`` (two-stage models): this many more queries chosen from the encoder, the next best
    tokens after the model's own Q, placed between those and ``content`` (H-DETR's one-to-many
    branch). ``attn_mask`` does not cover them: the model inserts their rows and columns, and
    they see only each other. Their predictions come back under ``hybrid_outputs``.
    """

    content: Tensor
    attn_mask: Tensor
    position: Optional[Tensor] = None
    boxes: Optional[Tensor] = None
    hybrid: int = 0


def layer_outputs(logits: Sequence[Tensor], boxes: Sequence[Tensor], aux_loss: bool) -> dict:
    """Every decoder layer's ``(B, Q, .)`` predictions (a list, or a stacked ``(L, B, Q, .)``
    tensor) -> the output dict: ``pred_logits`` and ``pred_boxes`` of the last layer and, with
    ``aux_loss``, ``aux_outputs``: one ``{"pred_logits", "pred_boxes"}`` per earlier layer."""
    out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
    return out


def in_precision(precision: str, device_type: str, forward: Callable[[], dict]) -> dict:
    """``forward()`` in a model's inference precision: as it is for "fp32", with no autocast context
    of its own (``autocast(enabled=False)`` would switch off the autocast a caller runs the model
    under: bf16/fp16 training); for "bf16" under bfloat16 autocast, its outputs then in float32
    (losses, matching and postprocessing always see float32)."""
    if precision != "bf16":
        return forward()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = forward()
    return to_float(out)


def to_float(out):
    """Every tensor of a (nested) output dict / list in float32."""
    if isinstance(out, dict):
        return {k: to_float(v) for k, v in out.items()}
    if isinstance(out, list):
        return [to_float(v) for v in out]
    return out.float()


def _cut_to_queries(mask: Tensor, planned: int, q: int) -> Tensor:
    """``(planned + E, planned + E)`` -> ``(q + E, q + E)``: the rows and columns of the own queries
    past the first ``q`` left out."""
    if q == planned:
        return mask
    keep = torch.cat([torch.arange(q, device=mask.device), torch.arange(planned, mask.shape[0], device=mask.device)])
    return mask[keep[:, None], keep[None, :]]


def fit_extra_mask(mask: Tensor, planned: int, q: int, m: int) -> Tensor:
    """The attention mask (True = blocked) of the training-only queries, made for the model's
    ``planned`` own queries and ``E`` extra ones: ``(planned + E, planned + E)``, fitted to one
    forward pass: ``(q + M + E, q + M + E)``.

    - ``q`` own queries: fewer than ``planned`` when the input has fewer tokens than that (every
      token becomes a query); the rows and columns of the missing ones are left out.
    - ``m`` hybrid queries inserted after them, which see only each other and which no other query
      sees (H-DETR keeps its two branches apart).
    """
    mask = _cut_to_queries(mask, planned, q)
    if m == 0:
        return mask
    n = mask.shape[0] + m
    full = torch.ones(n, n, dtype=torch.bool, device=mask.device)
    kept = torch.cat([torch.arange(q, device=mask.device), torch.arange(q + m, n, device=mask.device)])
    full[kept[:, None], kept[None, :]] = mask
    full[q:q + m, q:q + m] = False
    return full
