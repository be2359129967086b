"""2-D positional encodings of the feature map (added to attention queries and keys)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """The fixed sine encoding of the official DETR (a 2-D "Attention is all you need" encoding).

    Each of y and x gets ``num_pos_feats = d_model / 2`` channels: y first, then x. Positions
    are the cumulative count of non-padding cells counted from 1, divided by the count at the
    image's last row/column (+1e-6) and scaled by 2*pi, so they run over (0, 2*pi] inside every
    image whatever its padding. Channel pair ``(2i, 2i+1)`` holds ``sin``/``cos`` of
    ``pos / temperature ** (2i / num_pos_feats)``, interleaved.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, mask: Tensor) -> Tensor:
        """``mask (B, H, W)`` bool, True = padding -> ``pos (B, 2 * num_pos_feats, H, W)`` float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B, H, W), 1..h inside the image
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)  # (F,)
        pos_x = x_embed[:, :, :, None] / dim_t  # (B, H, W, F)
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, 2F, H, W)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: one embedding per row and per column (feature maps up to 50x50).

    Unlike the sine encoding, the official learned variant puts x first, then y.
    """

    def __init__(self, num_pos_feats: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_pos_feats)
        self.col_embed = nn.Embedding(max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, mask: Tensor) -> Tensor:
        """``mask (B, H, W)`` -> ``pos (B, 2 * num_pos_feats, H, W)``; the mask only gives the size."""
        b, h, w = mask.shape
        if h > self.row_embed.num_embeddings or w > self.col_embed.num_embeddings:
            raise ValueError(
                f"feature map {h}x{w} is larger than the learned position table "
                f"({self.row_embed.num_embeddings}x{self.col_embed.num_embeddings}); use smaller images"
            )
        x_emb = self.col_embed(torch.arange(w, device=mask.device))  # (W, F)
        y_emb = self.row_embed(torch.arange(h, device=mask.device))  # (H, F)
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, w, -1), y_emb.unsqueeze(1).expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1)  # (B, 2F, H, W)


def box_sine_embedding(boxes: Tensor, d_model: int, temperature: float = 10000.0) -> Tensor:
    """``(B, Q, 4)`` boxes in [0, 1] -> ``(B, Q, 2 * d_model)``: d/2 sine channels per coordinate.

    The same sin/cos interleaving as the image encoding, so a box's embedding is comparable
    with the positional encoding of the feature cells it covers.
    """
    f = d_model // 2
    dim_t = torch.arange(f, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / f)  # (f,)
    pos = boxes.float()[..., None] * 2 * math.pi / dim_t  # (B, Q, 4, f)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)  # (B, Q, 4, f)
    # Order (cy, cx, w, h) so the first d channels match the image encoding's (y, x) layout.
    return torch.cat([pos[:, :, 1], pos[:, :, 0], pos[:, :, 2], pos[:, :, 3]], dim=-1)  # (B, Q, 4f)
