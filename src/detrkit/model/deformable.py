"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021), as RT-DETR v1/v2 use it.

Global cross-attention compares every query with every feature-map cell. Deformable attention
instead lets each query *look* at a few points near its reference box on every level of the
feature pyramid: a linear layer predicts, per head, where the points are (offsets from the box
centre, in units of the box size) and how much each one weighs (a softmax over all the points
of all levels); the output is the weighted sum of the values bilinearly interpolated at those
points. The cost grows with the number of queries and points, not with the image size.

The sampling is :func:`torch.nn.functional.grid_sample`, so the module runs on any device
PyTorch runs on and exports to ONNX (opset 16+) with no custom kernel. RT-DETRv2's options:

* ``num_points`` per level (a tuple), each level's offsets scaled by ``1 / its point count``;
* ``offset_scale``: offsets are in units of ``offset_scale`` times the box size (0.5: the
  half-size, RT-DETR v1's only choice);
* ``method="discrete"``: each point takes the value of one cell (rounded coordinates, as the
  RT-DETRv2 release computes them) instead of interpolating, a cheaper kernel for deployment.
  The rounding passes no gradient to the sampling offsets.

:func:`capture_sampling` records where every query looked and with what weight, for pictures.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention over a flattened feature pyramid.

    Parameters (the names of Deformable DETR, RT-DETR and Hugging Face): ``sampling_offsets``
    (D -> heads * points * 2), ``attention_weights`` (D -> heads * points), ``value_proj`` and
    ``output_proj`` (D -> D). Output features are laid out head by head, then point by point
    in level order (all of level 0's points, then level 1's, ...), then (x, y).
    """

    # A list while capture_sampling is active: each call appends one record (see capture_sampling).
    store: Optional[list] = None

    def __init__(self, d_model: int = 256, nheads: int = 8, num_levels: int = 3,
                 num_points: Union[int, Sequence[int]] = 4, offset_scale: float = 0.5,
                 method: str = "default") -> None:
        super().__init__()
        if d_model % nheads:
            raise ValueError(f"d_model ({d_model}) must be divisible by nheads ({nheads})")
        points = (num_points,) * num_levels if isinstance(num_points, int) else tuple(num_points)
        if len(points) != num_levels or min(points) < 1:
            raise ValueError(f"num_points needs one count >= 1 per level ({num_levels}), got {num_points}")
        if method not in ("default", "discrete"):
            raise ValueError(f"method must be 'default' (bilinear) or 'discrete', got {method!r}")
        self.nheads = nheads
        self.num_points = points
        self.offset_scale = offset_scale
        self.method = method
        total = sum(points)
        self.sampling_offsets = nn.Linear(d_model, nheads * total * 2)
        self.attention_weights = nn.Linear(d_model, nheads * total)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # 1 / (its level's point count) for every point: a level with more points spreads them
        # over the same area. Not persistent: it follows from num_points.
        scale = torch.tensor([1.0 / n for n in points for _ in range(n)])
        self.register_buffer("point_scale", scale, persistent=False)
        self.reset_parameters()
        if method == "discrete":  # rounding passes no gradient to the offsets: frozen, as in RT-DETRv2's release
            self.sampling_offsets.requires_grad_(False)

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: head h's points start on a ray at angle 2*pi*h/heads,
        point k of a level at k times the unit step, all weighted equally."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.nheads, dtype=torch.float32) * (2.0 * math.pi / self.nheads)
        rays = torch.stack([angles.cos(), angles.sin()], -1)  # (heads, 2)
        rays = rays / rays.abs().max(-1, keepdim=True).values  # onto the unit square's border
        steps = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.num_points])  # (P,)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((rays[:, None, :] * steps[None, :, None]).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, boxes: Tensor, value: Tensor, shapes: Sequence[tuple[int, int]],
                value_mask: Optional[Tensor] = None) -> Tensor:
        """Attend from each query to points around its reference box.

        Args:
            query: ``(B, Q, D)``, position embedding already added.
            boxes: ``(B, Q, 4)`` reference boxes ``(cx, cy, w, h)`` in [0, 1] of the padded canvas.
            value: ``(B, S, D)``, the feature maps flattened row by row and concatenated level by
                level, ``S = sum(h * w for h, w in shapes)``.
            shapes: ``(h, w)`` of each level, finest first.
            value_mask: ``(B, S)`` bool, True = padding: such cells contribute zeros. RT-DETR
                passes None (it attends to the padded canvas as it is).

        Returns:
            ``(B, Q, D)``.
        """
        b, q, d = query.shape
        h, total = self.nheads, sum(self.num_points)
        if value.shape[1] != sum(hh * ww for hh, ww in shapes):
            raise ValueError(f"value has {value.shape[1]} cells, the shapes {list(shapes)} make "
                             f"{sum(hh * ww for hh, ww in shapes)}")
        value = self.value_proj(value)
        if value_mask is not None:
            value = value.masked_fill(value_mask[..., None], 0.0)
        # (B, S, D) -> (B*h, D/h, S): one copy, then each level is a (B*h, D/h, h_l, w_l) view.
        value = value.view(b, -1, h, d // h).permute(0, 2, 3, 1).reshape(b * h, d // h, -1)
        offsets = self.sampling_offsets(query).view(b, q, h, total, 2)
        weights = self.attention_weights(query).view(b, q, h, total).softmax(-1)  # over all levels' points
        # Offsets are in units of offset_scale * box size, divided by the level's point count.
        scale = self.point_scale.to(offsets.dtype)[:, None] * self.offset_scale  # (P, 1)
        locations = boxes[:, :, None, None, :2] + offsets * scale * boxes[:, :, None, None, 2:]  # (B, Q, h, P, 2)
        if self.store is not None:
            self.store.append({"locations": locations.detach().float(), "weights": weights.detach().float(),
                               "num_points": self.num_points, "shapes": [tuple(s) for s in shapes]})
        # (B, Q, h, P, .) -> (B*h, Q, P, .): the layout grid_sample and the weighted sum want.
        locations = locations.transpose(1, 2).reshape(b * h, q, total, 2)
        weights = weights.transpose(1, 2).reshape(b * h, 1, q, total)
        # split, not one slice per level: its backward is one concatenation, where each slice's
        # would fill a whole (B*h, D/h, S) gradient with zeros.
        levels = value.split([hh * ww for hh, ww in shapes], dim=-1)
        out = None
        for (hh, ww), level, where, weight in zip(shapes, levels, locations.split(self.num_points, dim=2),
                                                  weights.split(self.num_points, dim=-1)):
            sampled = self._sample(level.view(b * h, d // h, hh, ww), where)  # (B*h, D/h, Q, n); where (B*h, Q, n, 2)
            part = (sampled * weight).sum(-1)  # (B*h, D/h, Q)
            out = part if out is None else out + part
        out = out.view(b, d, q).transpose(1, 2)  # (B, Q, D): heads' channels side by side
        return self.output_proj(out)

    def _sample(self, level: Tensor, locations: Tensor) -> Tensor:
        """Values of ``level (N, C, h, w)`` at ``locations (N, Q, n, 2)`` ((x, y) in [0, 1] of the
        map, pixel centres at (i + 0.5) / w) -> ``(N, C, Q, n)``; zero outside the map."""
        if self.method == "default":
            # grid_sample's grid is in [-1, 1]; with align_corners=False, -1 and 1 are the map's
            # outer edges, so 2 * location - 1 puts pixel centres where they belong.
            return F.grid_sample(level, 2 * locations - 1, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)
        n, c, hh, ww = level.shape
        # RT-DETRv2's discrete sampling: cell floor(location * size + 0.5), clamped into the map
        # (the release truncates a non-negative number; below zero both clamp to 0). This rounds
        # to the nearest cell *corner*, half a cell off the nearest centre, as the release does.
        # Each coordinate times its own map size: traced as the map's size, so an ONNX export serves any size.
        x = (locations[..., 0] * ww + 0.5).floor().long().clamp(0, ww - 1)
        y = (locations[..., 1] * hh + 0.5).floor().long().clamp(0, hh - 1)
        index = (y * ww + x).reshape(n, 1, -1).expand(-1, c, -1)  # (N, C, Q*n)
        return level.reshape(n, c, hh * ww).gather(2, index).view(n, c, *locations.shape[1:3])


@contextlib.contextmanager
def capture_sampling(model: nn.Module) -> Iterator[dict[str, list[dict]]]:
    """Record where every :class:`MSDeformableAttention` in ``model`` samples, and how much.

    Yields a dict from module name (``"decoder.layers.0.cross_attn"``, ...) to the list of its
    calls, each a dict: ``locations (B, Q, heads, P, 2)`` float32, (x, y) in [0, 1] of the
    padded input canvas; ``weights (B, Q, heads, P)`` float32, summing to 1 over the P points of
    all levels; ``num_points`` (points per level: the first ``num_points[0]`` of P sample level
    0, ...); ``shapes`` (each level's (h, w)). Nothing is recorded, and nothing costs, when off;
    the outputs are the same with and without capture.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, MSDeformableAttention)]
    records: dict[str, list[dict]] = {}
    for name, m in modules:
        m.store = records.setdefault(name, [])
    try:
        yield records
    finally:
        for _, m in modules:
            m.store = None
