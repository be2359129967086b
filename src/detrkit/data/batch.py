"""Batching images of different sizes: pad to the largest, with a padding mask."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def pad_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pad ``3 x H_i x W_i`` images into one batch at the top-left corner.

    Returns ``images (B, 3, H, W)`` (zeros in the padding) and ``mask (B, H, W)`` bool,
    True = padding, where ``H, W`` are the largest height and width in the list.
    """
    if len(images) == 0:
        raise ValueError("pad_images needs at least one image")
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"image {i}: expected a 3 x H x W tensor, got shape {tuple(img.shape)}")
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    first = images[0]
    batch = first.new_zeros((len(images), 3, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(images, batch, mask):
        pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return batch, mask


def collate(batch: Sequence[tuple[Tensor, dict]]) -> tuple[Tensor, Tensor, list[dict]]:
    """DataLoader ``collate_fn``: ``[(image, target), ...]`` -> ``(images, mask, targets)``."""
    images, targets = zip(*batch)
    padded, mask = pad_images(images)
    return padded, mask, list(targets)
